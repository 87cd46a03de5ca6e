//! The driver's Kubernetes side (`--kube`): dial targets from Node objects, and the
//! integration's state for `meshctl status`. The Kubernetes API itself is `crate::k8s`.

use std::collections::BTreeSet;
use std::time::Instant;

use tokio::sync::watch;
use tracing::info;

use super::Driver;
use crate::mesh::links::DialRole;

impl Driver {
    /// Shows the Kubernetes integration's state in `meshctl status`.
    pub fn with_kube(mut self, status: watch::Receiver<mesh_proto::api::KubeStatus>) -> Driver {
        self.kube_status = Some(status);
        self
    }

    /// New Node-derived targets are dialed and kept like `--peers`; a target whose Node is
    /// gone is no longer kept (its link closes when idle, unless it is a neighbour).
    pub(super) fn set_kube_targets(&mut self, targets: BTreeSet<String>) {
        let now = Instant::now();
        for gone in self.kube_targets.difference(&targets) {
            if self.cfg.persistent_peers.contains(gone) {
                continue;
            }
            if let Some(d) = self.links.dials.get_mut(gone) {
                d.role = DialRole::OnDemand;
            }
        }
        for new in targets.difference(&self.kube_targets) {
            info!(target = %new, "peer target from a Kubernetes Node");
            self.links
                .want(new.clone(), None, DialRole::Persistent, now);
        }
        self.kube_targets = targets;
        self.dial_due(now);
    }
}
