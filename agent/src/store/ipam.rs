//! IPAM's durable state: the ring, the Paxos acceptor, and per-pod allocations.
//!
//! Every batch of writes the IPAM core asks for is one committed transaction, so an
//! address is on disk before the CNI plugin hears of it, and a block is on disk before the
//! hand-over message leaves.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::ipam::allocations::{Allocation, AttachmentKey};
use crate::ipam::core::{IpamWrite, Restored};
use crate::ipam::paxos::AcceptorState;
use mesh_proto::ipam::RingEntry;

pub(super) const IPAM: TableDefinition<&str, &[u8]> = TableDefinition::new("ipam");
pub(super) const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");

pub(super) const KEY_RING: &str = "ring";
pub(super) const KEY_ACCEPTOR: &str = "acceptor";
pub(super) const KEY_RANGE: &str = "range";
pub(super) const KEY_LAST: &str = "last_allocated";

/// Schema 2.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredAllocation {
    pub(super) network: String,
    pub(super) container_id: String,
    pub(super) ifname: String,
    pub(super) addr: u32,
    pub(super) pod: Option<(String, String)>,
    pub(super) netns: Option<String>,
}

/// Schema 1 (before allocations carried their network name).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredAllocationV1 {
    pub(super) container_id: String,
    pub(super) ifname: String,
    pub(super) addr: u32,
    pub(super) pod: Option<(String, String)>,
    pub(super) netns: Option<String>,
}

fn alloc_key(k: &AttachmentKey) -> String {
    // NUL cannot appear in a network name, container id or interface name given through CNI.
    format!("{}\0{}\0{}", k.network, k.container_id, k.ifname)
}

/// Rewrites schema-1 allocations as schema 2 (network unknown: empty), inside the
/// caller's transaction. A row that does not decode stops the migration (nothing is
/// written) rather than being dropped.
pub(super) fn migrate_allocations_v1(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut table = tx.open_table(ALLOCATIONS)?;
    let mut rows = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let old: StoredAllocationV1 =
            postcard::from_bytes(v.value()).map_err(corrupt("allocation (schema 1)"))?;
        rows.push((k.value().to_string(), old));
    }
    for (old_key, old) in rows {
        table.remove(old_key.as_str())?;
        let new = StoredAllocation {
            network: String::new(),
            container_id: old.container_id,
            ifname: old.ifname,
            addr: old.addr,
            pod: old.pod,
            netns: old.netns,
        };
        let key = format!("\0{}\0{}", new.container_id, new.ifname);
        let bytes = postcard::to_allocvec(&new).map_err(corrupt("allocation"))?;
        table.insert(key.as_str(), bytes.as_slice())?;
    }
    Ok(())
}

fn corrupt(what: &'static str) -> impl Fn(postcard::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

impl Store {
    /// Loads IPAM state. A store written for another `--ipalloc-range` is refused rather
    /// than silently discarded: its allocations may still be in use.
    pub fn load_ipam(&self, range: &str) -> Result<Restored, StoreError> {
        let tx = self.db.begin_read()?;
        let mut restored = Restored::default();
        if let Some(t) = self.read_table(&tx, IPAM)? {
            if let Some(stored) = t.get(KEY_RANGE)? {
                let stored = String::from_utf8_lossy(stored.value()).into_owned();
                if stored != range {
                    return Err(StoreError::Db(format!(
                        "this state dir belongs to --ipalloc-range {stored}, not {range}: start with the same range, \
                         or move the state dir away to start this node afresh (its allocations are lost)"
                    )));
                }
            }
            if let Some(v) = t.get(KEY_RING)? {
                restored.ring = postcard::from_bytes::<Vec<RingEntry>>(v.value())
                    .map_err(corrupt("IPAM ring"))?;
            }
            if let Some(v) = t.get(KEY_ACCEPTOR)? {
                restored.acceptor = postcard::from_bytes::<AcceptorState>(v.value())
                    .map_err(corrupt("Paxos state"))?;
            }
            if let Some(v) = t.get(KEY_LAST)? {
                let bytes: [u8; 4] = v.value().try_into().map_err(|_| StoreError::Corrupt {
                    what: "allocation cursor",
                    detail: format!("{} bytes, expected 4", v.value().len()),
                })?;
                restored.last_allocated = Some(u32::from_be_bytes(bytes));
            }
        }
        if let Some(t) = self.read_table(&tx, ALLOCATIONS)? {
            for row in t.iter()? {
                let (_, v) = row?;
                let s: StoredAllocation =
                    postcard::from_bytes(v.value()).map_err(corrupt("allocation"))?;
                restored.allocations.push(Allocation {
                    key: AttachmentKey {
                        network: s.network,
                        container_id: s.container_id,
                        ifname: s.ifname,
                    },
                    addr: s.addr,
                    pod: s.pod,
                    netns: s.netns,
                });
            }
        }
        Ok(restored)
    }

    /// Commits IPAM writes in one transaction.
    pub fn apply_ipam(&self, range: &str, writes: &[IpamWrite]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(IPAM)?;
            let mut allocs = tx.open_table(ALLOCATIONS)?;
            meta.insert(KEY_RANGE, range.as_bytes())?;
            for w in writes {
                match w {
                    IpamWrite::Ring(entries) => {
                        let bytes = postcard::to_allocvec(entries).map_err(corrupt("IPAM ring"))?;
                        meta.insert(KEY_RING, bytes.as_slice())?;
                    }
                    IpamWrite::Acceptor(a) => {
                        let bytes = postcard::to_allocvec(a).map_err(corrupt("Paxos state"))?;
                        meta.insert(KEY_ACCEPTOR, bytes.as_slice())?;
                    }
                    IpamWrite::Allocate(a) => {
                        let s = StoredAllocation {
                            network: a.key.network.clone(),
                            container_id: a.key.container_id.clone(),
                            ifname: a.key.ifname.clone(),
                            addr: a.addr,
                            pod: a.pod.clone(),
                            netns: a.netns.clone(),
                        };
                        let bytes = postcard::to_allocvec(&s).map_err(corrupt("allocation"))?;
                        allocs.insert(alloc_key(&a.key).as_str(), bytes.as_slice())?;
                        meta.insert(KEY_LAST, a.addr.to_be_bytes().as_slice())?;
                    }
                    IpamWrite::Release(k) => {
                        allocs.remove(alloc_key(k).as_str())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::PeerId;

    #[test]
    fn ipam_state_round_trips_and_range_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = AttachmentKey {
            network: "mesh".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        {
            let s = Store::open(dir.path()).unwrap();
            let a = Allocation {
                key: key.clone(),
                addr: 7,
                pod: Some(("ns".into(), "p".into())),
                netns: None,
            };
            let ring = vec![RingEntry {
                start: 0,
                prefix: 24,
                owner: PeerId(1),
                version: 1,
            }];
            s.apply_ipam(
                "10.32.0.0/12",
                &[IpamWrite::Ring(ring), IpamWrite::Allocate(a)],
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let r = s.load_ipam("10.32.0.0/12").unwrap();
        assert_eq!(r.ring.len(), 1);
        assert_eq!(r.allocations.len(), 1);
        assert_eq!(r.allocations[0].pod, Some(("ns".into(), "p".into())));
        s.apply_ipam("10.32.0.0/12", &[IpamWrite::Release(key)])
            .unwrap();
        assert!(s.load_ipam("10.32.0.0/12").unwrap().allocations.is_empty());
        assert!(s
            .load_ipam("10.64.0.0/12")
            .unwrap_err()
            .to_string()
            .contains("belongs to --ipalloc-range"));
    }
}
