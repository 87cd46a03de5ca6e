//! The driver's data-plane side: what the tunnel backends should program, published from
//! the mesh's view and the IPAM ring, with a memory that survives restarts — the endpoints of
//! block owners are kept in the store, and nothing is pruned until this run has heard of
//! every block owner — so an agent restart (a rolling update, an OOM kill) never cuts
//! traffic the kernel was carrying.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_proto::PeerId;
use tracing::{info, warn};

use super::Driver;
use crate::dataplane::{self, Endpoint};
use crate::store::Store;

/// After a start, the data plane removes nothing it does not want until every block owner
/// has been heard of in this run, or this long has passed (an owner that never returns and
/// is never reclaimed must not hold the decision forever).
const SYNC_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct TunnelMemory {
    /// Endpoints of block owners (and live peers), as last stored.
    endpoints: BTreeMap<PeerId, Endpoint>,
    /// The last store write failed: retry on the next round.
    unsaved: bool,
    /// This run has heard of every block owner (or waited `SYNC_LIMIT`).
    synced: bool,
}

impl TunnelMemory {
    /// The remembered endpoints. A cache of gossip: unreadable, it costs a slower restart
    /// (routes wait for their owners to be heard again), never correctness.
    pub fn load(store: &Store) -> TunnelMemory {
        let endpoints = store.load_endpoints().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the remembered tunnel endpoints; after this restart routes wait for their owners to be heard again");
            BTreeMap::new()
        });
        TunnelMemory {
            endpoints,
            ..TunnelMemory::default()
        }
    }
}

impl Driver {
    /// Tells the data plane what to program: remote nodes, their endpoints and blocks.
    pub(super) fn publish_dataplane(&mut self) {
        if self
            .node_net
            .as_ref()
            .and_then(|n| n.tunnel.as_ref())
            .is_none()
        {
            return;
        }
        let me = self.core.own_record().id;
        let ring = self.ipam.core().ring();
        let in_view: BTreeSet<PeerId> = self.core.members().map(|m| m.record.id).collect();
        let memory = &mut self.tunnel_memory;
        if !memory.synced {
            let all_heard = ring
                .iter()
                .all(|(_, o)| o.owner == me || in_view.contains(&o.owner));
            let waited = self.started.elapsed();
            if all_heard || waited >= SYNC_LIMIT {
                info!(
                    after = ?waited,
                    all_owners_heard = all_heard,
                    "the data plane is in sync with the mesh: entries it no longer wants may be removed"
                );
                memory.synced = true;
            }
        }
        let live = dataplane::endpoints(me, self.core.members().map(|m| &m.record));
        let endpoints = dataplane::remembered_endpoints(&memory.endpoints, live, &in_view, ring);
        if endpoints != memory.endpoints || memory.unsaved {
            let saved = crate::store::off_the_workers(|| self.store.save_endpoints(&endpoints));
            if let Err(e) = &saved {
                if !memory.unsaved {
                    warn!(error = %e, "cannot remember the tunnel endpoints (retrying); a restart now would wait for peers");
                }
            }
            memory.unsaved = saved.is_err();
            memory.endpoints = endpoints;
        }
        // Pod traffic to any node we program routes to is not NATed, remembered ones too.
        let mut nodes = dataplane::node_addresses(self.core.members().map(|m| &m.record));
        nodes.extend(memory.endpoints.values().map(|e| e.underlay));
        nodes.sort();
        nodes.dedup();
        let desired = dataplane::Desired {
            local_gateway: self.ipam.gateway().map(|g| g.0),
            remotes: dataplane::remotes(&memory.endpoints, ring),
            nodes,
            prune: memory.synced,
        };
        let Some(tunnel) = self.node_net.as_ref().and_then(|n| n.tunnel.as_ref()) else {
            return;
        };
        tunnel.desired.send_if_modified(|d| {
            let changed = *d != desired;
            *d = desired;
            changed
        });
    }
}
