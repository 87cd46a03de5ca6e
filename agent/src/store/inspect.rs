//! `mesh-agent store inspect|repair`: what an operator runs when the agent refuses its
//! state database. Inspect reads the file without changing it and lists every problem
//! with its way out; repair keeps a copy of the file first and removes only what the
//! operator names (`--discard`) plus the data-plane cache, which is re-learned from the
//! mesh. Nothing here guesses what a damaged allocation was.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::dataplane::{StoredEndpoint, ENDPOINTS};
use super::identity::{IDENTITY, KEY_INCARNATION, KEY_NODE_KEY, KEY_NODE_NAME, KEY_PEER_ID};
use super::ipam::{
    StoredAllocation, StoredAllocationV1, ALLOCATIONS, IPAM, KEY_ACCEPTOR, KEY_LAST, KEY_RANGE,
    KEY_RING,
};
use super::{StoreError, KEY_SCHEMA, KNOWN_TABLES, META, SCHEMA_VERSION};
use crate::ipam::paxos::AcceptorState;
use mesh_proto::ipam::RingEntry;

/// What `repair --discard` may remove, each with what it costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Discard {
    /// The remembered tunnel endpoints (a cache: re-learned from the mesh).
    Endpoints,
    /// Every pod address this node handed out. Drain the node's pods first: their
    /// addresses are forgotten and will be handed out again.
    Allocations,
    /// The ring and the Paxos acceptor state: the node learns the ring back from its
    /// peers. Never on the only node of a mesh (its blocks would be lost).
    Ring,
    /// Peer id, incarnation and key: the node joins as a new peer; reclaim the old one
    /// with `meshctl rmpeer` from another node. Drain the node and discard allocations too:
    /// the old peer's blocks, with the addresses its pods hold, go to other nodes.
    Identity,
    /// Tables mesh never writes (a foreign file shares the directory).
    Foreign,
}

impl Discard {
    fn tables(self, found: &[String]) -> Vec<String> {
        match self {
            Discard::Endpoints => vec![ENDPOINTS.name().to_string()],
            Discard::Allocations => vec![ALLOCATIONS.name().to_string()],
            Discard::Ring => vec![IPAM.name().to_string()],
            Discard::Identity => vec![IDENTITY.name().to_string()],
            Discard::Foreign => found
                .iter()
                .filter(|t| !KNOWN_TABLES.contains(&t.as_str()))
                .cloned()
                .collect(),
        }
    }
}

/// One problem, and what the operator can do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub table: String,
    pub problem: String,
    pub way_out: String,
}

/// The result of reading a store without changing it.
#[derive(Debug, Default)]
pub struct Inspection {
    pub path: PathBuf,
    pub schema: Option<u32>,
    pub tables: Vec<String>,
    /// Human-readable summary lines (identity, range, counts).
    pub summary: Vec<String>,
    pub findings: Vec<Finding>,
}

impl Inspection {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "state database: {}", self.path.display());
        let schema = match self.schema {
            None => "none (empty file)".to_string(),
            Some(1) => "1 (before versions were kept; migrated on the next start)".to_string(),
            Some(v) => format!("{v} (this agent writes {SCHEMA_VERSION})"),
        };
        let _ = writeln!(out, "schema: {schema}");
        let _ = writeln!(out, "tables: {}", self.tables.join(", "));
        for line in &self.summary {
            let _ = writeln!(out, "{line}");
        }
        if self.findings.is_empty() {
            let _ = writeln!(out, "no problems found");
        }
        for f in &self.findings {
            let _ = writeln!(out, "PROBLEM in {}: {}", f.table, f.problem);
            let _ = writeln!(out, "  way out: {}", f.way_out);
        }
        out
    }
}

fn finding(table: &str, problem: impl Into<String>, way_out: impl Into<String>) -> Finding {
    Finding {
        table: table.to_string(),
        problem: problem.into(),
        way_out: way_out.into(),
    }
}

const DISCARD_ALLOCATIONS: &str =
    "drain this node's pods, then 'mesh-agent store repair --discard allocations' \
     (their addresses are forgotten); or restore the file from a backup";
const DISCARD_RING: &str =
    "if other nodes are up, 'mesh-agent store repair --discard ring' (the ring is \
     learned back from them); if this was the only node, restore the file from a backup";
const DISCARD_IDENTITY: &str =
    "drain this node's pods, then 'mesh-agent store repair --discard identity --discard allocations' \
     (the node rejoins as a new peer; reclaim the old one with 'meshctl rmpeer' on another node: \
     its blocks, and the addresses in them, go to other nodes)";

/// Reads `<dir>/mesh.redb` without changing it.
pub fn inspect(dir: &Path) -> Result<Inspection, StoreError> {
    let path = dir.join("mesh.redb");
    let db = redb::ReadOnlyDatabase::open(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    let tx = db.begin_read()?;
    let mut ins = Inspection {
        path,
        tables: tx.list_tables()?.map(|t| t.name().to_string()).collect(),
        ..Inspection::default()
    };
    for t in &ins.tables {
        if !KNOWN_TABLES.contains(&t.as_str()) {
            ins.findings.push(finding(
                t,
                "a table mesh never writes: this file may not be mesh's",
                "check --state-dir; if the mesh tables are right, 'mesh-agent store repair --discard foreign'",
            ));
        }
    }
    ins.schema = if ins.tables.is_empty() {
        None
    } else {
        match tx.open_table(META) {
            Ok(t) => match t.get(KEY_SCHEMA)? {
                Some(v) => Some(v.value()),
                None => {
                    ins.findings.push(finding(
                        META.name(),
                        "no schema version",
                        "restore the file from a backup",
                    ));
                    None
                }
            },
            Err(redb::TableError::TableDoesNotExist(_)) => Some(1),
            Err(e) => {
                ins.findings.push(finding(
                    META.name(),
                    e.to_string(),
                    "restore the file from a backup",
                ));
                None
            }
        }
    };
    if let Some(v) = ins.schema.filter(|v| *v > SCHEMA_VERSION) {
        ins.findings.push(finding(
            META.name(),
            format!("written by a newer mesh-agent (schema {v})"),
            "run the newer mesh-agent",
        ));
    }
    inspect_identity(&tx, &mut ins);
    inspect_ipam(&tx, &mut ins);
    inspect_allocations(&tx, &mut ins);
    inspect_endpoints(&tx, &mut ins);
    Ok(ins)
}

/// Opens a table; a missing one is `None`, a wrong layout is a finding.
fn open<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    ins: &mut Inspection,
    way_out: &str,
) -> Option<redb::ReadOnlyTable<K, V>> {
    match tx.open_table(def) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => {
            ins.findings
                .push(finding(def.name(), e.to_string(), way_out));
            None
        }
    }
}

fn inspect_identity(tx: &redb::ReadTransaction, ins: &mut Inspection) {
    let Some(t) = open(tx, IDENTITY, ins, DISCARD_IDENTITY) else {
        return;
    };
    let get = |k: &str| t.get(k).ok().flatten().map(|v| v.value().to_vec());
    let peer = get(KEY_PEER_ID);
    let inc = get(KEY_INCARNATION);
    let name = get(KEY_NODE_NAME);
    let key = get(KEY_NODE_KEY);
    let as_u64 = |b: &Option<Vec<u8>>| {
        b.as_deref()
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    match (as_u64(&peer), as_u64(&inc), key.as_ref().map(Vec::len)) {
        (Some(p), Some(i), Some(k)) if k > 0 => ins.summary.push(format!(
            "identity: peer {p:016x}, incarnation {i}, node name {}",
            name.map(|n| String::from_utf8_lossy(&n).into_owned())
                .unwrap_or_default()
        )),
        _ => ins.findings.push(finding(
            IDENTITY.name(),
            "peer id, incarnation or node key is missing or malformed",
            DISCARD_IDENTITY,
        )),
    }
}

fn inspect_ipam(tx: &redb::ReadTransaction, ins: &mut Inspection) {
    let Some(t) = open(tx, IPAM, ins, DISCARD_RING) else {
        return;
    };
    let get = |k: &str| t.get(k).ok().flatten().map(|v| v.value().to_vec());
    if let Some(r) = get(KEY_RANGE) {
        ins.summary
            .push(format!("range: {}", String::from_utf8_lossy(&r)));
    }
    match get(KEY_RING).map(|b| postcard::from_bytes::<Vec<RingEntry>>(&b)) {
        Some(Ok(ring)) => {
            let mut per_owner: BTreeMap<u64, usize> = BTreeMap::new();
            for e in &ring {
                *per_owner.entry(e.owner.0).or_default() += 1;
            }
            ins.summary.push(format!(
                "ring: {} entries, {} owners",
                ring.len(),
                per_owner.len()
            ));
        }
        Some(Err(e)) => ins.findings.push(finding(
            IPAM.name(),
            format!("the ring does not decode: {e}"),
            DISCARD_RING,
        )),
        None => {}
    }
    if let Some(Err(e)) = get(KEY_ACCEPTOR).map(|b| postcard::from_bytes::<AcceptorState>(&b)) {
        ins.findings.push(finding(
            IPAM.name(),
            format!("the Paxos state does not decode: {e}"),
            DISCARD_RING,
        ));
    }
    if let Some(b) = get(KEY_LAST) {
        if b.len() != 4 {
            ins.findings.push(finding(
                IPAM.name(),
                format!("the allocation cursor is {} bytes, expected 4", b.len()),
                DISCARD_RING,
            ));
        }
    }
}

fn inspect_allocations(tx: &redb::ReadTransaction, ins: &mut Inspection) {
    let Some(t) = open(tx, ALLOCATIONS, ins, DISCARD_ALLOCATIONS) else {
        return;
    };
    let v1 = ins.schema == Some(1);
    let mut by_addr: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut count = 0usize;
    let Ok(rows) = t.iter() else {
        ins.findings.push(finding(
            ALLOCATIONS.name(),
            "the table cannot be read",
            DISCARD_ALLOCATIONS,
        ));
        return;
    };
    for row in rows {
        let Ok((k, v)) = row else {
            ins.findings.push(finding(
                ALLOCATIONS.name(),
                "a row cannot be read",
                DISCARD_ALLOCATIONS,
            ));
            continue;
        };
        let decoded = if v1 {
            postcard::from_bytes::<StoredAllocationV1>(v.value())
                .map(|a| (a.addr, format!("{}/{}", a.container_id, a.ifname)))
        } else {
            postcard::from_bytes::<StoredAllocation>(v.value()).map(|a| {
                (
                    a.addr,
                    format!("{}/{}/{}", a.network, a.container_id, a.ifname),
                )
            })
        };
        match decoded {
            Ok((addr, who)) => {
                count += 1;
                by_addr.entry(addr).or_default().push(who);
            }
            Err(e) => ins.findings.push(finding(
                ALLOCATIONS.name(),
                format!(
                    "row {:?} does not decode: {e}",
                    k.value().replace('\0', "/")
                ),
                DISCARD_ALLOCATIONS,
            )),
        }
    }
    ins.summary.push(format!("allocations: {count}"));
    for (addr, holders) in by_addr.into_iter().filter(|(_, h)| h.len() > 1) {
        ins.findings.push(finding(
            ALLOCATIONS.name(),
            format!(
                "{} is held by {} attachments: {}",
                std::net::Ipv4Addr::from(addr),
                holders.len(),
                holders.join(", ")
            ),
            DISCARD_ALLOCATIONS,
        ));
    }
}

fn inspect_endpoints(tx: &redb::ReadTransaction, ins: &mut Inspection) {
    let way_out = "'mesh-agent store repair' (a cache of gossip: dropped and learned again)";
    let Some(t) = open(tx, ENDPOINTS, ins, way_out) else {
        return;
    };
    let mut count = 0usize;
    let mut bad = 0usize;
    if let Ok(rows) = t.iter() {
        for row in rows {
            match row.map(|(_, v)| postcard::from_bytes::<StoredEndpoint>(v.value()).is_ok()) {
                Ok(true) => count += 1,
                _ => bad += 1,
            }
        }
    }
    ins.summary
        .push(format!("remembered tunnel endpoints: {count}"));
    if bad > 0 {
        ins.findings.push(finding(
            ENDPOINTS.name(),
            format!("{bad} rows do not decode"),
            way_out,
        ));
    }
}

/// Copies the file aside, lets redb verify and repair its own structure, drops the
/// data-plane cache if it is damaged, and removes what `discard` names. Returns what it
/// did; the caller then inspects again.
pub fn repair(dir: &Path, discard: &[Discard]) -> Result<Vec<String>, StoreError> {
    let path = dir.join("mesh.redb");
    let mut done = Vec::new();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let backup = dir.join(format!("mesh.redb.before-repair-{secs}"));
    std::fs::copy(&path, &backup).map_err(|e| {
        StoreError::Db(format!(
            "cannot copy {} to {} before repairing it: {e}",
            path.display(),
            backup.display()
        ))
    })?;
    done.push(format!("kept a copy of the file as {}", backup.display()));
    let before = inspect(dir)?;
    let mut db = redb::Database::open(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    match db.check_integrity() {
        Ok(true) => done.push("redb integrity check: passed".into()),
        Ok(false) => done.push("redb integrity check: failed, repaired by redb".into()),
        Err(e) => return Err(StoreError::Db(format!("redb integrity check: {e}"))),
    }
    let mut tables: Vec<String> = Vec::new();
    let cache_damaged = before.findings.iter().any(|f| f.table == ENDPOINTS.name());
    if cache_damaged && !discard.contains(&Discard::Endpoints) {
        tables.push(ENDPOINTS.name().to_string());
    }
    for d in discard {
        tables.extend(d.tables(&before.tables));
    }
    tables.sort();
    tables.dedup();
    let tx = db.begin_write()?;
    for t in &tables {
        let handle: TableDefinition<&[u8], &[u8]> = TableDefinition::new(t);
        // Deleting by name works whatever the table's layout.
        if tx.delete_table(handle)? {
            done.push(format!("removed table {t}"));
        }
    }
    tx.commit()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_table_of_another_layout_is_a_finding_and_repair_removes_only_what_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        {
            let db = redb::Database::create(dir.path().join("mesh.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            let bad: TableDefinition<u64, u64> = TableDefinition::new("allocations");
            tx.open_table(bad).unwrap().insert(1, 2).unwrap();
            tx.commit().unwrap();
        }
        let ins = inspect(dir.path()).unwrap();
        assert_eq!(ins.schema, Some(SCHEMA_VERSION));
        assert_eq!(ins.findings.len(), 1, "{}", ins.render());
        assert_eq!(ins.findings[0].table, "allocations");
        assert!(ins.render().contains("--discard allocations"));
        let done = repair(dir.path(), &[]).unwrap();
        assert!(done[0].contains("before-repair"));
        assert_eq!(
            inspect(dir.path()).unwrap().findings.len(),
            1,
            "nothing named, nothing removed"
        );
        repair(dir.path(), &[Discard::Allocations]).unwrap();
        assert!(inspect(dir.path()).unwrap().findings.is_empty());
        Store::open(dir.path()).unwrap();
    }
}
