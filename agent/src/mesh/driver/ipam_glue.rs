//! The driver's IPAM side: timers, the mesh's view fed to IPAM, IPAM frames, and the
//! allocation API. Every IPAM step persists before its messages leave (`IpamService`);
//! a failed store write stops the agent rather than break a promise.

use std::time::Instant;

use mesh_proto::wire::Frame;

use super::{ApiRequest, Driver};
use crate::ipam::core::{IpamInput, PeerInfo};
use crate::ipam::service::{ApiFailure, Sends};
use crate::mesh::core::Input;
use crate::store::StoreError;

fn store_failure(e: &StoreError) -> ApiFailure {
    ApiFailure {
        status: 500,
        code: "store_failed",
        message: format!("state store write failed: {e}"),
    }
}

impl Driver {
    /// A timer fired: run whichever core is due.
    pub(super) fn on_wake(&mut self) {
        let now = Instant::now();
        if self.core.poll_timeout() <= now {
            self.feed(Input::Timer);
        }
        if self.ipam.poll_timeout() <= now {
            self.ipam_step(IpamInput::Timer);
        }
    }

    pub(super) fn ipam_step(&mut self, input: IpamInput) {
        let now = Instant::now();
        let result = self.ipam.handle(now, input);
        self.after_ipam(result, now);
    }

    fn after_ipam(&mut self, result: Result<Sends, StoreError>, now: Instant) {
        match result {
            Ok(sends) => {
                if let Some(link) = &self.node_net {
                    let gateway = self.ipam.gateway();
                    link.gateway.send_if_modified(|g| {
                        let changed = *g != gateway;
                        *g = gateway;
                        changed
                    });
                }
                for (to, msg) in sends {
                    self.send_frame(to, &Frame::Ipam(msg), "ipam", now);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store IPAM state; stopping rather than handing out unrecorded addresses");
                self.fatal = Some(format!("IPAM store write failed: {e}"));
            }
        }
    }

    /// Tells IPAM who is up and who our neighbours are, when that changed.
    pub(super) fn sync_topology(&mut self, now: Instant) {
        if self.fatal.is_some() {
            return;
        }
        let peers: Vec<PeerInfo> = self
            .core
            .members()
            .map(|m| PeerInfo {
                id: m.record.id,
                name: m.record.name.clone(),
                up: m.is_up(),
            })
            .collect();
        let neighbours = self.core.neighbours().iter().copied().collect();
        let result = self.ipam.topology(now, peers, neighbours);
        self.after_ipam(result, now);
    }

    pub(super) fn on_ipam_api(&mut self, req: ApiRequest) {
        let now = Instant::now();
        match req {
            ApiRequest::Report(_) | ApiRequest::SetKubeTargets(_) => {}
            ApiRequest::FirstSplit(reply) => match self.ipam.split_elected(now) {
                Ok((sends, outcome)) => {
                    if let Ok(addresses) = &outcome {
                        tracing::info!(
                            addresses,
                            "first split of the range, as the elected leader"
                        );
                    }
                    let _ = reply.send(outcome);
                    self.after_ipam(Ok(sends), now);
                }
                Err(e) => {
                    let _ = reply.send(Err(format!("state store write failed: {e}")));
                    self.after_ipam(Err(e), now);
                }
            },
            ApiRequest::Allocate { request, reply } => {
                let result = self.ipam.allocate(now, request, reply);
                self.after_ipam(result, now);
            }
            ApiRequest::Release { key, reply } => {
                let result = self.ipam.release(key);
                let answer = result.as_ref().map(|_| ()).map_err(store_failure);
                let _ = reply.send(answer);
                self.after_ipam(result.map(|_| Vec::new()), now);
            }
            ApiRequest::ListAllocations(reply) => {
                let _ = reply.send(self.ipam.list());
            }
            ApiRequest::Gc {
                network,
                valid,
                reply,
            } => {
                let result = self.ipam.gc(&network, valid);
                let answer = result.as_ref().map(Clone::clone).map_err(store_failure);
                let _ = reply.send(answer);
                self.after_ipam(result.map(|_| Vec::new()), now);
            }
            ApiRequest::IpamStatus(reply) => {
                let _ = reply.send(self.ipam.status());
            }
            ApiRequest::Reclaim { name, mode, reply } => {
                let result = self.ipam.reclaim(now, name, mode, reply);
                self.after_ipam(result, now);
            }
        }
    }
}
