//! What reaches the driver from outside its loop: requests from the local API and the
//! Kubernetes task (`ApiRequest`), and what it publishes for the probes (`Health`).

use std::collections::BTreeSet;
use std::time::Instant;

use mesh_proto::api::{
    AllocationRequest, AllocationView, AttachmentRef, IpamStatusResponse, Report,
};
use tokio::sync::oneshot;

use crate::ipam::allocations::AttachmentKey;
use crate::ipam::service::{AllocationReply, ApiFailure, ReclaimReply};

/// The driver's heartbeat, read by the liveness and readiness probes directly (never
/// queued behind CNI calls in the request channel): when it was last in its loop, and
/// whether it is ready (connected to a peer, or has none to connect to).
#[derive(Clone, Copy, Debug)]
pub struct Health {
    pub beat: Instant,
    pub ready: bool,
}

/// A request to the driver; each carries the channel its answer goes back on.
pub enum ApiRequest {
    Report(oneshot::Sender<Report>),
    Allocate {
        request: AllocationRequest,
        reply: AllocationReply,
    },
    Release {
        key: AttachmentKey,
        reply: oneshot::Sender<Result<(), ApiFailure>>,
    },
    ListAllocations(oneshot::Sender<Vec<AllocationView>>),
    Gc {
        network: String,
        valid: Vec<AttachmentRef>,
        reply: oneshot::Sender<Result<Vec<AllocationView>, ApiFailure>>,
    },
    IpamStatus(oneshot::Sender<IpamStatusResponse>),
    /// `meshctl rmpeer NAME`, or the Kubernetes leader reclaiming a deleted Node's space.
    Reclaim {
        name: String,
        mode: crate::ipam::core::ReclaimMode,
        reply: ReclaimReply,
    },
    /// The peer targets derived from Node objects (`--kube`), replacing the previous set.
    SetKubeTargets(BTreeSet<String>),
    /// The elected first split (`--kube`: the Lease holder): the answer says how many
    /// addresses this node took, or why it did not split.
    FirstSplit(oneshot::Sender<Result<u64, String>>),
}
