//! Durable state in one embedded ACID database (redb) under `--state-dir`.
//!
//! Owns the file and its tables; every write is one committed transaction, so what a
//! caller was told survives `kill -9`. Never holds a transaction across an await point.

mod dataplane;
mod identity;
mod inspect;
mod ipam;

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, TableDefinition, TableHandle};

pub use identity::Identity;
pub use inspect::{inspect, repair, Discard, Finding, Inspection};

/// The layout this agent writes. 1: the tables before the store carried a version (read
/// and migrated); 2: allocations keyed by CNI network name, the round-robin cursor.
pub const SCHEMA_VERSION: u32 = 2;

const META: TableDefinition<&str, u32> = TableDefinition::new("mesh_meta");
const KEY_SCHEMA: &str = "schema_version";

/// Every table a mesh store may hold; anything else means the file is not ours.
const KNOWN_TABLES: [&str; 5] = [
    "mesh_meta",
    "identity",
    "ipam",
    "allocations",
    "dataplane_endpoints",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open state database {path}: {source} ({})", open_hint(source))]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("state database: {0}")]
    Db(String),
    #[error("state database holds a corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The file cannot be used as it is; `reason` says why. Nothing was changed.
    #[error("state database {path} {reason}")]
    Refused { path: PathBuf, reason: String },
}

fn open_hint(e: &redb::DatabaseError) -> &'static str {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => "is another mesh-agent using this --state-dir?",
        redb::DatabaseError::Storage(redb::StorageError::Io(_)) => "check the disk and permissions",
        _ => "the file is damaged or not a mesh state database: see 'mesh-agent store inspect'",
    }
}

impl StoreError {
    /// Whether this error means the store itself is unusable (as opposed to a full disk
    /// or a lock held by another agent): the operator then needs `mesh-agent store`.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::Refused { .. } | StoreError::Db(_)
        )
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Runs a blocking store operation (a commit waits for fsync) without holding up the other
/// tasks of this runtime worker — probes, CNI calls, QUIC: on the multi-threaded runtime
/// the worker first hands its queue to another thread (`block_in_place`); elsewhere (a
/// test's current-thread runtime, no runtime) it simply runs. The caller still waits for
/// the commit, so nothing is promised before it is durable.
pub fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub struct Store {
    db: redb::Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<dir>/mesh.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("mesh.redb");
        let db = redb::Database::create(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let store = Store { db, path };
        store.check_schema()?;
        Ok(store)
    }

    /// Refuses a file that is not a mesh store or is newer than this agent; stamps a new
    /// one; migrates an older one in a single transaction (all or nothing).
    fn check_schema(&self) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        match found {
            None => self.migrate(0),
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            Some(v) if v > SCHEMA_VERSION => Err(self.refused(format!(
                "was written by a newer mesh-agent (schema {v}; this one knows up to \
                 {SCHEMA_VERSION}): run the newer version, or go back to the copy the newer \
                 version kept when it migrated this file (mesh.redb.before-schema-{v}, if it \
                 made one; allocations made since are not in it)"
            ))),
            Some(v) => self.migrate(v),
        }
    }

    /// The stored schema version: `None` for a new, empty file; 1 for a mesh store from
    /// before versions were kept. Refuses a file holding tables mesh never writes.
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        let tx = self.db.begin_read()?;
        let tables: Vec<String> = tx.list_tables()?.map(|t| t.name().to_string()).collect();
        let foreign: Vec<&String> = tables
            .iter()
            .filter(|t| !KNOWN_TABLES.contains(&t.as_str()))
            .collect();
        if !foreign.is_empty() {
            return Err(self.refused(format!(
                "is not a mesh state database (it holds tables mesh never writes: {}): \
                 point --state-dir at mesh's own directory",
                foreign
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if tables.is_empty() {
            return Ok(None);
        }
        let meta = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Some(1)),
            Err(e) => return Err(self.refused(format!("has an unreadable version table: {e}"))),
        };
        match meta.get(KEY_SCHEMA)? {
            Some(v) => Ok(Some(v.value())),
            None => Err(self.refused("has a version table without a version".into())),
        }
    }

    fn migrate(&self, from: u32) -> Result<(), StoreError> {
        if from != 0 {
            // A way back for a rollback to the agent that wrote it (it cannot read the new
            // layout). Nothing is being written while the file is copied: we hold its lock.
            let copy = self
                .path
                .with_file_name(format!("mesh.redb.before-schema-{SCHEMA_VERSION}"));
            std::fs::copy(&self.path, &copy).map_err(|e| {
                self.refused(format!(
                    "needs migrating to schema {SCHEMA_VERSION}, and a copy could not be kept first ({}: {e}); nothing was changed",
                    copy.display()
                ))
            })?;
        }
        let tx = self.db.begin_write()?;
        if from == 1 {
            ipam::migrate_allocations_v1(&tx)?;
        }
        tx.open_table(META)?.insert(KEY_SCHEMA, SCHEMA_VERSION)?;
        tx.commit()?;
        if from != 0 {
            tracing::info!(path = %self.path.display(), from, to = SCHEMA_VERSION, "state database migrated");
        }
        Ok(())
    }

    /// Opens a table for reading: `None` only when it does not exist yet; a table of
    /// another layout is refused (never read as empty).
    fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        tx: &redb::ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
        match tx.open_table(def) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.refused(format!("has a table mesh cannot read: {e}"))),
        }
    }

    fn refused(&self, reason: String) -> StoreError {
        StoreError::Refused {
            path: self.path.clone(),
            reason,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::allocations::AttachmentKey;

    fn raw_db(dir: &Path) -> redb::Database {
        redb::Database::create(dir.join("mesh.redb")).unwrap()
    }

    #[test]
    fn a_table_of_another_layout_is_refused_not_read_as_empty() {
        // Before schema checks, any error opening a table loaded as "no allocations", and
        // the addresses were handed out again.
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        {
            let db = raw_db(dir.path());
            let tx = db.begin_write().unwrap();
            tx.delete_table(ipam::ALLOCATIONS).unwrap();
            let other: TableDefinition<u64, u64> = TableDefinition::new("allocations");
            tx.open_table(other).unwrap().insert(7, 7).unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let e = s.load_ipam("10.32.0.0/12").unwrap_err();
        assert!(e.is_damage());
        let text = e.to_string();
        assert!(
            text.contains("mesh.redb") && text.contains("allocations"),
            "{text}"
        );
    }

    #[test]
    fn a_foreign_or_newer_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = raw_db(dir.path());
            let tx = db.begin_write().unwrap();
            let users: TableDefinition<&str, &str> = TableDefinition::new("users");
            tx.open_table(users).unwrap().insert("a", "b").unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("not a mesh state database"), "{e}");
        assert!(e.to_string().contains("users"), "{e}");
        {
            let db = raw_db(dir.path());
            let tx = db.begin_read().unwrap();
            assert_eq!(tx.list_tables().unwrap().count(), 1, "nothing written");
        }

        let newer = tempfile::tempdir().unwrap();
        drop(Store::open(newer.path()).unwrap());
        {
            let db = raw_db(newer.path());
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(KEY_SCHEMA, SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(newer.path()).err().unwrap();
        assert!(e.to_string().contains("newer mesh-agent"), "{e}");
    }

    #[test]
    fn a_store_from_before_versions_is_migrated_with_its_allocations() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = raw_db(dir.path());
            let tx = db.begin_write().unwrap();
            let old = ipam::StoredAllocationV1 {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                addr: 42,
                pod: None,
                netns: None,
            };
            let bytes = postcard::to_allocvec(&old).unwrap();
            tx.open_table(ipam::ALLOCATIONS)
                .unwrap()
                .insert("c1\0eth0", bytes.as_slice())
                .unwrap();
            tx.open_table(ipam::IPAM)
                .unwrap()
                .insert(ipam::KEY_RANGE, b"10.32.0.0/12".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), Some(SCHEMA_VERSION));
        assert!(
            dir.path().join("mesh.redb.before-schema-2").exists(),
            "a copy for a rollback is kept"
        );
        let r = s.load_ipam("10.32.0.0/12").unwrap();
        assert_eq!(r.allocations.len(), 1);
        assert_eq!(
            r.allocations[0].key,
            AttachmentKey {
                network: String::new(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            }
        );
        assert_eq!(r.allocations[0].addr, 42);
    }

    #[test]
    fn a_damaged_allocation_row_stops_the_migration_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = raw_db(dir.path());
            let tx = db.begin_write().unwrap();
            tx.open_table(ipam::ALLOCATIONS)
                .unwrap()
                .insert("c1\0eth0", [0xffu8; 3].as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(dir.path()).err().unwrap();
        assert!(e.is_damage(), "{e}");
        let s = inspect(dir.path()).unwrap();
        assert_eq!(
            s.schema,
            Some(1),
            "not stamped: the migration did not happen"
        );
        assert!(!s.findings.is_empty(), "{}", s.render());
    }
}
