//! JSON bodies of the agent's local HTTP API (unix socket), read by `meshctl`, `mesh-cni`
//! and tests. Key names are a public contract (ARCHITECTURE.md, Interfaces): extend, never rename.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub id: String,
    pub incarnation: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpamSummary {
    pub range: String,
    pub status: String,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub node: NodeInfo,
    pub ready: bool,
    /// Number of peers this node knows, itself included, in any state.
    pub peers: usize,
    /// Peers by liveness (`alive`, `suspect`, `dead`, `left`).
    pub peer_states: BTreeMap<String, usize>,
    /// Control connections by state (`established`, `pending`, `retrying`, `failed`).
    pub connections: BTreeMap<String, usize>,
    pub ipam: IpamSummary,
    /// `mutual-tls (cluster secret)` or `insecure-no-auth`.
    pub auth: String,
    pub listen: String,
    pub dataplane: String,
    pub protocol: ProtocolRange,
    pub agent_version: String,
    pub uptime_seconds: u64,
    /// The node bridge pods attach to; absent with `--dataplane none`.
    #[serde(default)]
    pub node_network: Option<NodeNetworkStatus>,
    /// The Kubernetes integration; absent without `--kube`.
    #[serde(default)]
    pub kube: Option<KubeStatus>,
}

/// What the Kubernetes side of the agent (`--kube`) is doing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KubeStatus {
    /// `watching nodes` once the Node list arrived, else what it waits for or why it fails.
    pub api: String,
    /// Node objects seen (this node's included).
    pub nodes: usize,
    /// Nodes that became peer targets (have an address), this node excluded.
    pub peer_targets: usize,
    /// The holder of the mesh Lease (the single writer for the first split and reclaims).
    pub leader: Option<String>,
    pub is_leader: bool,
    /// `NetworkUnavailable` as this agent last set it on its Node (`False` once ready).
    pub network_unavailable: Option<String>,
    /// Reclaims of deleted Nodes' space made by this node, newest last.
    pub reclaims: Vec<String>,
    /// The newest of `errors`, if any.
    pub last_error: Option<String>,
    /// What currently fails, by area (`connect`, `watch`, `node`, `lease`): each entry
    /// stays until a call of that area succeeds, so one failing call cannot hide another.
    #[serde(default)]
    pub errors: std::collections::BTreeMap<String, String>,
}

/// The node side of the pod network (`mesh0`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeNetworkStatus {
    pub bridge: String,
    /// Bridge present, up, with the gateway address: pods can be attached.
    pub ready: bool,
    /// Gateway address with the range prefix, once IPAM gave this node space.
    pub address: Option<String>,
    pub mtu: u32,
    /// Why it is not ready, in words.
    pub problem: Option<String>,
    /// What is wrong with the cross-node tunnel (VXLAN device, routes), if anything.
    #[serde(default)]
    pub tunnel_problem: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtocolRange {
    pub min: u16,
    pub max: u16,
}

/// One link in a peer's gossiped connection list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerLink {
    /// The other end's name (or id when its name is not known yet).
    pub peer: String,
    pub peer_id: String,
    pub direction: String,
    pub state: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub id: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: String,
    pub incarnation: u64,
    pub version: u64,
    pub addresses: Vec<String>,
    pub connections: Vec<PeerLink>,
    /// True for the node answering the request.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub dataplanes: Vec<String>,
    /// Seconds since this node last saw the peer's liveness change.
    pub state_age_seconds: u64,
}

/// `GET /v1/status/peers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeersResponse {
    pub peers: Vec<PeerView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    /// The peer's name once the handshake told us, else empty.
    pub peer: String,
    pub peer_id: String,
    pub address: String,
    /// `in` or `out`.
    pub direction: String,
    /// `established`, `pending`, `retrying: <why>`, `failed: <why>`.
    pub state: String,
    /// The reason behind the state, empty when established.
    pub reason: String,
    /// The data plane in use towards this peer (`none` for a control-plane-only agent).
    pub dataplane: String,
    /// Seconds since the state last changed.
    pub since_seconds: u64,
}

/// `GET /v1/status/connections`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsResponse {
    pub connections: Vec<ConnectionView>,
}

/// `GET /v1/report`: everything in one document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub status: StatusResponse,
    pub peers: PeersResponse,
    pub connections: ConnectionsResponse,
}

/// Every error answer of the local API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// `POST /v1/allocations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationRequest {
    /// The CNI network name (`name` in the network configuration). Absent from older
    /// plugins: then the allocation is not scoped to a network.
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub pod: Option<PodRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteView {
    pub dst: String,
    pub gw: String,
}

/// Answer to `POST /v1/allocations` (201, or 200 for a repeated request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationResponse {
    /// `A.B.C.D/P`, P being the cluster range's prefix.
    pub address: String,
    pub gateway: String,
    pub routes: Vec<RouteView>,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationView {
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub address: String,
    #[serde(default)]
    pub pod: Option<PodRef>,
}

/// `GET /v1/allocations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationsResponse {
    pub allocations: Vec<AllocationView>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
}

/// `POST /v1/allocations/gc`: everything not listed is released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcRequest {
    /// The network being collected: only its allocations (and those from before
    /// allocations carried a network name) are considered. Empty: every allocation.
    #[serde(default)]
    pub network: String,
    pub valid: Vec<AttachmentRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcResponse {
    pub released: Vec<AllocationView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpamOwnerView {
    pub peer: String,
    pub name: String,
    pub addresses: u64,
    pub share: f64,
    pub reachable: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpamLocalView {
    pub blocks: Vec<String>,
    pub allocated: usize,
    pub free: u64,
    pub gateway: Option<String>,
}

/// `GET /v1/status/ipam`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpamStatusResponse {
    pub range: String,
    pub status: String,
    pub owners: Vec<IpamOwnerView>,
    pub local: IpamLocalView,
    /// Addresses owned by peers this node cannot reach, as a share of the range.
    pub unreachable_share: f64,
    /// Peers whose IPAM state this node refuses (e.g. another seed list), with the reason.
    #[serde(default)]
    pub refused_peers: Vec<String>,
}

/// Answer to `DELETE /v1/peers/{name}` (`meshctl rmpeer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReclaimResponse {
    pub peer: String,
    pub message: String,
}
