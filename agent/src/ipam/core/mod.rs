//! `IpamCore`: the pure state machine that splits the range among peers and hands out
//! addresses on this node. No I/O, no clock reads: `handle(now, input)`, `allocate`,
//! `release`, `poll_timeout()`; the caller persists every `IpamWrite` before it sends
//! anything that follows it, and before it answers an allocation.
//!
//! - First split: `seed=` (every peer computes the same ring once it knows all seed
//!   names) or `consensus=N` (single-decree Paxos on the member set, `paxos.rs`).
//! - Ring changes flood to mesh neighbours as deltas; an anti-entropy round every few
//!   seconds compares hashes and pulls the whole ring on a mismatch.
//! - A node out of space asks the peer with the most free space; the donor hands over a
//!   fully free aligned block of at most half its free space (`space.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use mesh_proto::ipam::{IpamMessage, RingEntry};
use mesh_proto::PeerId;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

use super::allocations::{AllocError, Allocation, AllocationTable, AttachmentKey};
use super::block::Block;
use super::paxos::Paxos;
use super::ring::RangeRing;

mod first_split;
mod reclaim;
mod space;
mod types;

use first_split::seed_hash;
pub use reclaim::{ReclaimMode, ReclaimStart};
pub use types::{
    AllocateError, InitMode, IpamConfig, IpamEvent, IpamInput, IpamOutput, IpamWrite, PeerInfo,
    RestoreError, Restored,
};

/// The key under which the node's gateway (bridge) address is reserved.
pub const GATEWAY_CONTAINER: &str = "_gateway";

struct PeerState {
    name: String,
    up: bool,
    /// Free addresses the peer last told us about.
    free: Option<u64>,
    incompatible: Option<String>,
    /// The peer votes with another `consensus=N`; its Paxos messages are ignored.
    consensus_mismatch: Option<String>,
}

struct SpaceRequest {
    id: u64,
    to: PeerId,
    deadline: Instant,
}

pub struct IpamCore {
    pub(super) cfg: IpamConfig,
    pub(super) me: PeerId,
    pub(super) ring: RangeRing,
    pub(super) allocs: AllocationTable,
    paxos: Option<Paxos>,
    peers: BTreeMap<PeerId, PeerState>,
    neighbours: Vec<PeerId>,
    request: Option<SpaceRequest>,
    next_request_id: u64,
    denied: BTreeMap<PeerId, Instant>,
    reclaims: Vec<reclaim::PendingReclaim>,
    next_anti_entropy: Instant,
    next_proposal: Instant,
    proposal_armed: bool,
    rng: StdRng,
    out: Vec<IpamOutput>,
}

impl IpamCore {
    pub fn new(
        cfg: IpamConfig,
        me: PeerId,
        my_name: &str,
        restored: Restored,
        now: Instant,
    ) -> Result<IpamCore, RestoreError> {
        // Our own store: entries were validated before they were written, so anything
        // refused now means the store is damaged or not ours — never start on a guess.
        let mut ring = RangeRing::new(cfg.range, cfg.min_prefix);
        for e in &restored.ring {
            ring.merge(e).map_err(|source| RestoreError::RingEntry {
                entry: format!("{:#x}/{} of {} v{}", e.start, e.prefix, e.owner, e.version),
                source,
            })?;
        }
        let mut allocs = AllocationTable::default();
        for a in restored.allocations {
            let what = format!(
                "{} for {}/{}/{}",
                std::net::Ipv4Addr::from(a.addr),
                a.key.network,
                a.key.container_id,
                a.key.ifname
            );
            if !allocs.restore(a) {
                return Err(RestoreError::DuplicateAllocation(what));
            }
        }
        allocs.restore_last(restored.last_allocated);
        let paxos = match cfg.init {
            InitMode::Consensus(n) => Some(Paxos::new(me, n.max(1), restored.acceptor)),
            InitMode::Seed(_) | InitMode::Elected => None,
        };
        let mut peers = BTreeMap::new();
        peers.insert(
            me,
            PeerState {
                name: my_name.to_string(),
                up: true,
                free: None,
                incompatible: None,
                consensus_mismatch: None,
            },
        );
        Ok(IpamCore {
            rng: StdRng::seed_from_u64(cfg.seed ^ me.0),
            next_anti_entropy: now + cfg.anti_entropy_interval,
            next_proposal: now,
            proposal_armed: false,
            cfg,
            me,
            ring,
            allocs,
            paxos,
            peers,
            neighbours: Vec::new(),
            request: None,
            next_request_id: 0,
            denied: BTreeMap::new(),
            reclaims: Vec::new(),
            out: Vec::new(),
        })
    }

    pub fn ring(&self) -> &RangeRing {
        &self.ring
    }

    pub fn allocations(&self) -> &AllocationTable {
        &self.allocs
    }

    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_anti_entropy;
        if !self.ring.is_split() {
            t = t.min(self.next_proposal);
        }
        if let Some(r) = &self.request {
            t = t.min(r.deadline);
        }
        if let Some(d) = self.reclaims.iter().map(|r| r.deadline).min() {
            t = t.min(d);
        }
        t
    }

    fn up_peers(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.up && p.incompatible.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    /// One line for `meshctl status ipam`.
    /// Peers whose IPAM state we refuse, with why.
    pub fn incompatible_peers(&self) -> Vec<(String, String)> {
        self.peers
            .values()
            .filter_map(|p| p.incompatible.as_ref().map(|r| (p.name.clone(), r.clone())))
            .collect()
    }

    /// How many allocation callers are waiting on a space request (0 or 1 in flight).
    pub fn pending_requests(&self) -> usize {
        usize::from(self.request.is_some())
    }

    pub fn status(&self) -> String {
        if self.ring.is_split() {
            if let Some(r) = &self.request {
                return format!("waiting for address space from {}", self.name_of(r.to));
            }
            let reachable_space = self
                .ring
                .iter()
                .any(|(_, o)| self.peers.get(&o.owner).is_some_and(|p| p.up));
            if !reachable_space {
                return "all ranges owned by unreachable peers: use 'meshctl rmpeer' for peers that are gone".into();
            }
            return "ready".into();
        }
        match &self.cfg.init {
            InitMode::Consensus(n) => {
                let known = self.up_peers().len();
                format!(
                    "awaiting consensus (quorum {}, known {known} of {n})",
                    n / 2 + 1
                )
            }
            InitMode::Elected => {
                "awaiting the first split by the elected leader (Kubernetes Lease)".into()
            }
            InitMode::Seed(names) => {
                let missing: Vec<&String> = names
                    .iter()
                    .filter(|n| !self.peers.values().any(|p| &p.name == *n))
                    .collect();
                format!(
                    "awaiting seed peers (missing: {})",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }

    pub fn name_of(&self, id: PeerId) -> String {
        self.peers
            .get(&id)
            .map_or_else(|| id.to_string(), |p| p.name.clone())
    }

    /// Whether `peer` is up in the mesh's view (for `unreachable` marks).
    pub fn is_up(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// The node's gateway (bridge) address, reserved once it owns space.
    pub fn gateway(&self) -> Option<u32> {
        self.allocs.get(&gateway_key()).map(|a| a.addr)
    }

    fn reserved(&self) -> BTreeSet<u32> {
        // The range's network and broadcast addresses are never valid host addresses.
        let r = self.cfg.range;
        BTreeSet::from([r.start, r.last()])
    }

    /// Free addresses in our blocks.
    pub fn free(&self) -> u64 {
        let reserved = self.reserved();
        self.ring
            .blocks_of(self.me)
            .iter()
            .map(|b| {
                let res = reserved.iter().filter(|a| b.contains_addr(**a)).count() as u64;
                b.size() - self.allocs.used_in(*b) - res
            })
            .sum()
    }

    pub fn handle(&mut self, now: Instant, input: IpamInput) -> Vec<IpamOutput> {
        match input {
            IpamInput::Message { from, msg } => self.on_message(now, from, msg),
            IpamInput::Topology { peers, neighbours } => self.on_topology(now, peers, neighbours),
            IpamInput::Timer => self.on_timer(now),
        }
        std::mem::take(&mut self.out)
    }

    fn on_topology(&mut self, now: Instant, peers: Vec<PeerInfo>, neighbours: Vec<PeerId>) {
        for p in peers {
            if p.id == self.me {
                continue;
            }
            let entry = self.peers.entry(p.id).or_insert(PeerState {
                name: p.name.clone(),
                up: p.up,
                free: None,
                incompatible: None,
                consensus_mismatch: None,
            });
            entry.name = p.name;
            entry.up = p.up;
        }
        self.neighbours = neighbours;
        self.try_first_split(now);
    }

    fn on_timer(&mut self, now: Instant) {
        if self.request.as_ref().is_some_and(|r| now >= r.deadline) {
            if let Some(r) = self.request.take() {
                // Treated like a denial, and reported, so waiting callers try another donor now.
                self.denied.insert(r.to, now);
                self.out
                    .push(IpamOutput::Event(IpamEvent::SpaceRequestTimedOut {
                        to: r.to,
                    }));
            }
        }
        self.denied
            .retain(|_, at| now.duration_since(*at) < self.cfg.denial_backoff);
        self.expire_reclaims(now);
        if self.cfg.claim_space
            && self.ring.is_split()
            && self.request.is_none()
            && self.ring.blocks_of(self.me).is_empty()
        {
            // Waiting or Exhausted: either way the timer comes back.
            let _ = self.ask_for_space(now);
        }
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + self.cfg.anti_entropy_interval;
            // Neighbours only: they have a link already, so anti-entropy never makes the
            // transport dial (and later close) a connection just for this.
            let up = self.up_peers();
            let targets: Vec<PeerId> = self
                .neighbours
                .iter()
                .copied()
                .filter(|p| up.contains(p))
                .collect();
            if let Some(to) = targets.choose(&mut self.rng).copied() {
                let msg = self.summary();
                self.send(to, msg);
            }
        }
        self.try_first_split(now);
    }

    fn summary(&self) -> IpamMessage {
        let seed = match &self.cfg.init {
            InitMode::Seed(names) => Some(seed_hash(names)),
            InitMode::Consensus(_) | InitMode::Elected => None,
        };
        IpamMessage::Summary {
            hash: self.ring.hash(),
            free: self.free(),
            seed,
        }
    }

    fn on_message(&mut self, now: Instant, from: PeerId, msg: IpamMessage) {
        if self
            .peers
            .get(&from)
            .is_some_and(|p| p.incompatible.is_some())
        {
            return;
        }
        match msg {
            IpamMessage::Entries { entries } => self.merge_entries(now, from, &entries),
            IpamMessage::Summary { hash, free, seed } => {
                let ours = match &self.cfg.init {
                    InitMode::Seed(names) => Some(seed_hash(names)),
                    InitMode::Consensus(_) | InitMode::Elected => None,
                };
                if let (Some(a), Some(b)) = (ours, seed) {
                    if a != b {
                        let reason =
                            "it was started with another --ipalloc-init seed list".to_string();
                        if let Some(p) = self.peers.get_mut(&from) {
                            p.incompatible = Some(reason.clone());
                        }
                        self.out.push(IpamOutput::Event(IpamEvent::Incompatible {
                            peer: from,
                            reason,
                        }));
                        return;
                    }
                }
                if let Some(p) = self.peers.get_mut(&from) {
                    p.free = Some(free);
                }
                if hash != self.ring.hash() {
                    // Push ours and pull theirs: one round repairs both sides.
                    let entries = self.ring.entries();
                    self.send(from, IpamMessage::Entries { entries });
                    self.send(from, IpamMessage::Pull);
                }
            }
            IpamMessage::Pull => {
                let entries = self.ring.entries();
                self.send(from, IpamMessage::Entries { entries });
            }
            IpamMessage::SpaceRequest { id } => self.on_space_request(from, id),
            IpamMessage::ReclaimRequest { id, dead, force } => {
                self.on_reclaim_request(from, id, dead, force)
            }
            IpamMessage::ReclaimGranted { id, entries } => {
                self.on_reclaim_answer(now, from, id, Ok(entries))
            }
            IpamMessage::ReclaimRefused { id, reason } => {
                self.on_reclaim_answer(now, from, id, Err(reason))
            }
            IpamMessage::SpaceGrant { id, entries } => {
                self.merge_entries(now, from, &entries);
                // A grant that arrives after we gave up on it still brings space: report it.
                let ours = entries.iter().any(|e| e.owner == self.me);
                if self.request.as_ref().is_some_and(|r| r.id == id) || ours {
                    if self.request.as_ref().is_some_and(|r| r.id == id) {
                        self.request = None;
                    }
                    let block = entries.first().map_or_else(String::new, |e| {
                        Block {
                            start: e.start,
                            prefix: e.prefix,
                        }
                        .to_string()
                    });
                    self.out
                        .push(IpamOutput::Event(IpamEvent::SpaceGranted { from, block }));
                }
            }
            IpamMessage::SpaceDenied { id } => {
                if self.request.as_ref().is_some_and(|r| r.id == id) {
                    self.request = None;
                }
                self.denied.insert(from, now);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.free = Some(0);
                }
                self.out
                    .push(IpamOutput::Event(IpamEvent::SpaceDenied { from }));
            }
            IpamMessage::Paxos(m) => {
                if self.ring.is_split() {
                    // Already decided: the ring itself tells them.
                    let entries = self.ring.entries();
                    self.send(from, IpamMessage::Entries { entries });
                    return;
                }
                let peers = self.up_peers();
                if let Some(paxos) = self.paxos.as_mut() {
                    let step = paxos.handle(from, m, &peers, &peers);
                    if let Some(theirs) = step.mismatched_n {
                        let ours = match self.cfg.init {
                            InitMode::Consensus(n) => n,
                            InitMode::Seed(_) | InitMode::Elected => 0,
                        };
                        let reason = format!(
                            "it runs --ipalloc-init consensus={theirs}, this node consensus={ours}: give every initial peer the same N"
                        );
                        // Only its votes are ignored: once a ring exists it is merged as usual.
                        if let Some(p) = self.peers.get_mut(&from) {
                            p.consensus_mismatch = Some(reason.clone());
                        }
                        self.out.push(IpamOutput::Event(IpamEvent::Incompatible {
                            peer: from,
                            reason,
                        }));
                        return;
                    }
                    self.apply_paxos(now, step);
                }
            }
        }
    }

    /// Merges entries from a peer; persists and floods what changed.
    fn merge_entries(&mut self, now: Instant, from: PeerId, entries: &[RingEntry]) {
        let was_split = self.ring.is_split();
        let mut changed = Vec::new();
        for e in entries {
            match self.ring.merge(e) {
                Ok(outcome) => {
                    if outcome.changed {
                        changed.push(*e);
                    }
                    for c in outcome.conflicts {
                        self.out.push(IpamOutput::Event(IpamEvent::Conflict {
                            block: c.block.to_string(),
                            kept: c.kept,
                            dropped: c.dropped,
                        }));
                    }
                }
                Err(e) => {
                    self.out.push(IpamOutput::Event(IpamEvent::BadEntry {
                        peer: from,
                        reason: e.to_string(),
                    }));
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        self.out
            .push(IpamOutput::Persist(IpamWrite::Ring(self.ring.entries())));
        if !was_split && self.ring.is_split() {
            let members = self.ring.shares().len();
            self.out
                .push(IpamOutput::Event(IpamEvent::Split { members }));
        }
        self.ensure_gateway();
        self.flood(Some(from), changed);
        let _ = now;
    }

    /// Sends changed entries to every neighbour except the one they came from.
    fn flood(&mut self, except: Option<PeerId>, entries: Vec<RingEntry>) {
        let targets: Vec<PeerId> = self
            .neighbours
            .iter()
            .copied()
            .filter(|p| Some(*p) != except)
            .collect();
        for to in targets {
            self.send(
                to,
                IpamMessage::Entries {
                    entries: entries.clone(),
                },
            );
        }
    }

    fn ensure_gateway(&mut self) {
        if self.gateway().is_some() {
            return;
        }
        let blocks = self.ring.blocks_of(self.me);
        if blocks.is_empty() {
            return;
        }
        let reserved = self.reserved();
        if let Ok((a, _)) = self
            .allocs
            .allocate(gateway_key(), &blocks[..1], &reserved, None, None)
        {
            self.out.push(IpamOutput::Persist(IpamWrite::Allocate(a)));
        }
    }

    /// Allocates an address for a pod interface (idempotent per key). The outputs (a
    /// `Persist` first) must be carried out before the answer is given.
    pub fn allocate(
        &mut self,
        now: Instant,
        key: AttachmentKey,
        pod: Option<(String, String)>,
        netns: Option<String>,
    ) -> (Result<Allocation, AllocateError>, Vec<IpamOutput>) {
        let result = self.allocate_inner(now, key, pod, netns);
        (result, std::mem::take(&mut self.out))
    }

    fn allocate_inner(
        &mut self,
        now: Instant,
        key: AttachmentKey,
        pod: Option<(String, String)>,
        netns: Option<String>,
    ) -> Result<Allocation, AllocateError> {
        if let Some(a) = self.allocs.get(&key) {
            return Ok(a.clone());
        }
        if !self.ring.is_split() {
            return Err(AllocateError::NotReady(self.status()));
        }
        self.ensure_gateway();
        let blocks = self.ring.blocks_of(self.me);
        let reserved = self.reserved();
        match self.allocs.allocate(key, &blocks, &reserved, pod, netns) {
            Ok((a, fresh)) => {
                if fresh {
                    self.out
                        .push(IpamOutput::Persist(IpamWrite::Allocate(a.clone())));
                }
                Ok(a)
            }
            Err(AllocError::NoSpace) => self.ask_for_space(now),
        }
    }

    /// Releases an allocation; unknown keys are fine (CNI DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> (Option<Allocation>, Vec<IpamOutput>) {
        let gone = if key.container_id == GATEWAY_CONTAINER {
            None
        } else {
            self.allocs.release(key)
        };
        if let Some(a) = &gone {
            // The key it was held under (it may predate network names).
            self.out
                .push(IpamOutput::Persist(IpamWrite::Release(a.key.clone())));
        }
        (gone, std::mem::take(&mut self.out))
    }

    fn send(&mut self, to: PeerId, msg: IpamMessage) {
        if to != self.me {
            self.out.push(IpamOutput::Send { to, msg });
        }
    }
}

pub fn gateway_key() -> AttachmentKey {
    AttachmentKey {
        network: String::new(),
        container_id: GATEWAY_CONTAINER.to_string(),
        ifname: "mesh0".to_string(),
    }
}
