//! This node's identity: peer id, incarnation and TLS key, kept across restarts.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError};
use mesh_proto::PeerId;

pub(super) const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");

pub(super) const KEY_PEER_ID: &str = "peer_id";
pub(super) const KEY_INCARNATION: &str = "incarnation";
pub(super) const KEY_NODE_KEY: &str = "node_key_pkcs8";
pub(super) const KEY_NODE_NAME: &str = "node_name";

#[derive(Clone, Debug)]
pub struct Identity {
    pub peer_id: PeerId,
    /// Already bumped and committed for this run.
    pub incarnation: u64,
    /// PKCS#8 DER of the node's TLS key.
    pub node_key: Vec<u8>,
    /// The node name of the previous run, if it differs from this one.
    pub renamed_from: Option<String>,
}

fn u64_from(bytes: &[u8], what: &'static str) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        detail: format!("{} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

impl Store {
    /// Loads the identity, creating it on first start, and commits the next incarnation
    /// before returning it: a restarted agent must never reuse an incarnation.
    pub fn start_identity(
        &self,
        node_name: &str,
        fresh_key: Vec<u8>,
    ) -> Result<Identity, StoreError> {
        let tx = self.db.begin_write()?;
        let identity = {
            let mut t = tx.open_table(IDENTITY)?;
            let peer_id = match t.get(KEY_PEER_ID)? {
                Some(v) => PeerId(u64_from(v.value(), "peer id")?),
                None => PeerId(rand::random::<u64>()),
            };
            let incarnation = match t.get(KEY_INCARNATION)? {
                Some(v) => u64_from(v.value(), "incarnation")?.saturating_add(1),
                None => 1,
            };
            let node_key = match t.get(KEY_NODE_KEY)? {
                Some(v) => v.value().to_vec(),
                None => fresh_key,
            };
            let renamed_from = t
                .get(KEY_NODE_NAME)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned())
                .filter(|old| old != node_name);
            t.insert(KEY_PEER_ID, peer_id.0.to_be_bytes().as_slice())?;
            t.insert(KEY_INCARNATION, incarnation.to_be_bytes().as_slice())?;
            t.insert(KEY_NODE_KEY, node_key.as_slice())?;
            t.insert(KEY_NODE_NAME, node_name.as_bytes())?;
            Identity {
                peer_id,
                incarnation,
                node_key,
                renamed_from,
            }
        };
        tx.commit()?;
        Ok(identity)
    }

    /// Commits a higher incarnation (after refuting a suspicion). Never lowers it.
    pub fn raise_incarnation(&self, incarnation: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(IDENTITY)?;
            let current = match t.get(KEY_INCARNATION)? {
                Some(v) => u64_from(v.value(), "incarnation")?,
                None => 0,
            };
            if incarnation > current {
                t.insert(KEY_INCARNATION, incarnation.to_be_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored incarnation, for status and tests.
    pub fn incarnation(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(IDENTITY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        match t.get(KEY_INCARNATION)? {
            Some(v) => u64_from(v.value(), "incarnation"),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reopen_and_incarnation_grows() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Store::open(dir.path()).unwrap();
            s.start_identity("a", vec![1, 2, 3]).unwrap()
        };
        assert_eq!(first.incarnation, 1);
        let s = Store::open(dir.path()).unwrap();
        let second = s.start_identity("b", vec![9]).unwrap();
        assert_eq!(second.peer_id, first.peer_id);
        assert_eq!(second.incarnation, 2);
        assert_eq!(second.node_key, vec![1, 2, 3]);
        assert_eq!(second.renamed_from.as_deref(), Some("a"));
        s.raise_incarnation(7).unwrap();
        s.raise_incarnation(5).unwrap();
        assert_eq!(s.incarnation().unwrap(), 7);
    }
}
