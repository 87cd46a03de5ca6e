//! What the driver tells people: log lines and metrics for mesh events, the status
//! report the local API serves, and the gauges refreshed on every maintenance tick.

use std::time::Instant;

use mesh_proto::api::{ConnectionsResponse, PeersResponse, Report};
use mesh_proto::gossip::Liveness;
use mesh_proto::PeerId;
use tracing::{debug, info};

use super::Driver;
use crate::api::metrics::{EventLabel, StateLabel};
use crate::mesh::core::MeshEvent;
use crate::mesh::status;

impl Driver {
    pub(super) fn on_event(&mut self, e: MeshEvent) {
        let label = |event: &'static str| EventLabel { event };
        match e {
            MeshEvent::StateChanged {
                peer,
                name,
                from,
                to,
            } => {
                let event = match to {
                    Liveness::Alive => "alive",
                    Liveness::Suspect => "suspect",
                    Liveness::Dead => "dead",
                    Liveness::Left => "left",
                };
                self.metrics
                    .detector_events
                    .get_or_create(&label(event))
                    .inc();
                let from = from.map_or("unknown", Liveness::as_str);
                info!(peer = %peer, name = %name, from, to = to.as_str(), "peer state changed");
            }
            MeshEvent::Refuted { incarnation } => {
                self.metrics
                    .detector_events
                    .get_or_create(&label("refuted"))
                    .inc();
                info!(incarnation, "refuted a suspicion about this node");
            }
            MeshEvent::ProbeFailed { peer } => {
                self.metrics
                    .detector_events
                    .get_or_create(&label("probe_failed"))
                    .inc();
                debug!(peer = %peer, "probe failed");
            }
            MeshEvent::IndirectProbe { peer } => {
                self.metrics
                    .detector_events
                    .get_or_create(&label("indirect_probe"))
                    .inc();
                debug!(peer = %peer, "direct probe late; probing through relays");
            }
            MeshEvent::Forgotten { peer } => debug!(peer = %peer, "forgot a long-dead peer"),
            MeshEvent::IdCollision { name, addresses } => {
                self.metrics
                    .detector_events
                    .get_or_create(&label("id_collision"))
                    .inc();
                tracing::error!(
                    other_name = %name,
                    other_addresses = ?addresses,
                    "another node gossips our peer id: was this node's state dir copied? give one of them a fresh --state-dir"
                );
            }
        }
    }

    pub(super) fn update_gauges(&self, now: Instant) {
        self.ipam.update_gauges();
        let report = self.report(now);
        self.metrics.connections.clear();
        for (state, n) in &report.status.connections {
            self.metrics
                .connections
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n as i64);
        }
        self.metrics.peers.clear();
        for (state, n) in &report.status.peer_states {
            self.metrics
                .peers
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n as i64);
        }
    }

    /// The data plane carrying pod traffic to `peer`, for `meshctl status connections`:
    /// our backend, and the peer's when it runs the other one (same wire, both work).
    fn dataplane_to(&self, peer: Option<&PeerId>) -> String {
        use crate::dataplane::backend_of;
        let Some(ours) = backend_of(&self.core.own_record().capabilities) else {
            return format!(
                "none (this node runs --dataplane {})",
                self.cfg.info.dataplane
            );
        };
        match peer.and_then(|p| self.core.member(p)) {
            None => "-".into(),
            Some(m) => match backend_of(&m.record.capabilities) {
                Some(theirs) if theirs == ours => ours.to_string(),
                Some(theirs) => format!("{ours} (peer runs {theirs})"),
                None => "none (the peer carries no pod traffic)".into(),
            },
        }
    }

    /// Connected to a peer, or with none to connect to.
    pub(super) fn is_ready(&self) -> bool {
        let has_targets = !self.cfg.persistent_peers.is_empty() || !self.kube_targets.is_empty();
        !has_targets || !self.links.links.is_empty()
    }

    pub(super) fn report(&self, now: Instant) -> Report {
        let names = |p: &PeerId| self.core.member(p).map(|m| m.record.name.clone());
        let connections = ConnectionsResponse {
            connections: self.links.views(names, |p| self.dataplane_to(p), now),
        };
        let peers = PeersResponse {
            peers: status::peer_views(&self.core, now),
        };
        let ready = self.is_ready();
        let status = status::summary(
            &self.core,
            &self.cfg.info,
            &connections,
            ready,
            now.duration_since(self.started),
        );
        let mut status = status;
        let ipam = self.ipam.status();
        status.ipam.status = ipam.status;
        status.node_network = self.node_net.as_ref().map(|l| {
            let mut n = l.status.borrow().clone();
            n.tunnel_problem = l.tunnel.as_ref().and_then(|t| t.problem.borrow().clone());
            n
        });
        status.kube = self.kube_status.as_ref().map(|k| k.borrow().clone());
        Report {
            status,
            peers,
            connections,
        }
    }
}
