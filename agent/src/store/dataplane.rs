//! The data plane's memory of remote tunnel endpoints (`dataplane::Endpoint`: each block
//! owner's name, underlay address, VXLAN port and VTEP MAC), kept beside the ring so that a
//! restarted agent programs every block owner at once instead of waiting for it to be heard
//! again. A cache of gossip, not a promise to anyone: the driver rewrites it when it changes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::dataplane::Endpoint;
use mesh_proto::PeerId;

pub(super) const ENDPOINTS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("dataplane_endpoints");

#[derive(Serialize, Deserialize)]
pub(super) struct StoredEndpoint {
    name: String,
    underlay: [u8; 4],
    port: u16,
    mac: [u8; 6],
}

impl Store {
    /// The remembered endpoints (none in a store that never had any).
    pub fn load_endpoints(&self) -> Result<BTreeMap<PeerId, Endpoint>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(ENDPOINTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let s: StoredEndpoint =
                postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                    what: "data-plane endpoint",
                    detail: e.to_string(),
                })?;
            out.insert(
                PeerId(k.value()),
                Endpoint {
                    name: s.name,
                    underlay: Ipv4Addr::from(s.underlay),
                    port: s.port,
                    mac: s.mac,
                },
            );
        }
        Ok(out)
    }

    /// Replaces the remembered endpoints with `endpoints`, in one transaction.
    pub fn save_endpoints(&self, endpoints: &BTreeMap<PeerId, Endpoint>) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ENDPOINTS)?;
            t.retain(|k, _| endpoints.contains_key(&PeerId(k)))?;
            for (id, e) in endpoints {
                let s = StoredEndpoint {
                    name: e.name.clone(),
                    underlay: e.underlay.octets(),
                    port: e.port,
                    mac: e.mac,
                };
                let bytes = postcard::to_allocvec(&s).map_err(|e| StoreError::Corrupt {
                    what: "data-plane endpoint",
                    detail: e.to_string(),
                })?;
                t.insert(id.0, bytes.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(n: u8) -> Endpoint {
        Endpoint {
            name: format!("n{n}"),
            underlay: Ipv4Addr::new(192, 168, 1, n),
            port: 8472,
            mac: [0x0a, 0x76, 0, 0, 0, n],
        }
    }

    #[test]
    fn endpoints_survive_a_reopen_and_are_replaced_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.load_endpoints().unwrap().is_empty());
            let all: BTreeMap<PeerId, Endpoint> = [(PeerId(2), ep(2)), (PeerId(3), ep(3))]
                .into_iter()
                .collect();
            s.save_endpoints(&all).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let back = s.load_endpoints().unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[&PeerId(3)], ep(3));
        let only: BTreeMap<PeerId, Endpoint> = [(PeerId(3), ep(3))].into_iter().collect();
        s.save_endpoints(&only).unwrap();
        assert_eq!(s.load_endpoints().unwrap(), only);
    }
}
