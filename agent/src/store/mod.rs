//! Durable state in one embedded ACID database (redb) under `--state-dir`.
//!
//! Owns the file and its tables; every write is one committed transaction, so what a
//! caller was told survives `kill -9`. Never holds a transaction across an await point.

mod dataplane;
mod identity;
mod ipam;

use std::path::{Path, PathBuf};

pub use identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open state database {path}: {source} (is another mesh-agent using this --state-dir?)"
    )]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("state database: {0}")]
    Db(String),
    #[error("state database holds a corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

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
        Ok(Store { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
