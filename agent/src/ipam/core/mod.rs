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
//!   fully free aligned block of at most half its free space (`donation.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mesh_proto::ipam::{IpamMessage, RingEntry};
use mesh_proto::PeerId;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

use super::allocations::{AllocError, Allocation, AllocationTable, AttachmentKey};
use super::block::Block;
use super::paxos::{AcceptorState, Paxos, Step};
use super::ring::RangeRing;

mod reclaim;

pub use reclaim::ReclaimStart;

/// The key under which the node's gateway (bridge) address is reserved.
pub const GATEWAY_CONTAINER: &str = "_gateway";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMode {
    /// Agreement among a quorum of the first N peers.
    Consensus(usize),
    /// Every peer is given the same list of names.
    Seed(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct IpamConfig {
    pub range: Block,
    pub min_prefix: u8,
    pub init: InitMode,
    pub anti_entropy_interval: Duration,
    /// How long a space request may stay unanswered before another donor is tried.
    pub request_timeout: Duration,
    /// How long a donor that said no is left alone.
    pub denial_backoff: Duration,
    pub seed: u64,
}

impl IpamConfig {
    pub fn new(range: Block, init: InitMode) -> IpamConfig {
        IpamConfig {
            range,
            min_prefix: 26,
            init,
            anti_entropy_interval: Duration::from_secs(3),
            request_timeout: Duration::from_secs(2),
            denial_backoff: Duration::from_secs(10),
            seed: 0,
        }
    }
}

/// A peer as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: PeerId,
    pub name: String,
    pub up: bool,
}

#[derive(Clone, Debug)]
pub enum IpamInput {
    Message {
        from: PeerId,
        msg: IpamMessage,
    },
    /// The mesh's current view: every known peer, and our neighbours (delta targets).
    Topology {
        peers: Vec<PeerInfo>,
        neighbours: Vec<PeerId>,
    },
    Timer,
}

/// A durable change; must be committed before anything after it leaves the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamWrite {
    /// The whole ring (canonical entries).
    Ring(Vec<RingEntry>),
    Acceptor(AcceptorState),
    Allocate(Allocation),
    Release(AttachmentKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamEvent {
    /// The ring was split for the first time among these peers.
    Split {
        members: usize,
    },
    /// Space arrived from a donor: pending allocations can be retried.
    SpaceGranted {
        from: PeerId,
        block: String,
    },
    SpaceDenied {
        from: PeerId,
    },
    SpaceRequested {
        to: PeerId,
    },
    /// Two owners claimed one block at one version; resolved the same way everywhere.
    Conflict {
        block: String,
        kept: PeerId,
        dropped: PeerId,
    },
    /// A peer's IPAM state is incompatible with ours (e.g. another seed list); ignored.
    Incompatible {
        peer: PeerId,
        reason: String,
    },
    /// A peer sent ring entries we could not accept.
    BadEntry {
        peer: PeerId,
        reason: String,
    },
    /// A space request went unanswered; the donor is skipped for a while.
    SpaceRequestTimedOut {
        to: PeerId,
    },
    /// A dead peer's space moved to `to` (id 0 when decided here as coordinator).
    Reclaimed {
        id: u64,
        dead: PeerId,
        to: PeerId,
    },
    ReclaimRefused {
        id: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamOutput {
    Send { to: PeerId, msg: IpamMessage },
    Persist(IpamWrite),
    Event(IpamEvent),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// No ring yet; the text says why (e.g. awaiting consensus).
    #[error("IPAM not ready: {0}")]
    NotReady(String),
    /// Space was requested from a peer; try again shortly.
    #[error("waiting for address space from {0}")]
    Waiting(String),
    #[error("range {0} is exhausted: no free address on this node and no reachable peer with free space")]
    Exhausted(Block),
}

/// What a restarted node read back from its store.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    pub ring: Vec<RingEntry>,
    pub acceptor: AcceptorState,
    pub allocations: Vec<Allocation>,
}

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

fn seed_hash(names: &[String]) -> u64 {
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for n in sorted {
        for b in n.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl IpamCore {
    pub fn new(
        cfg: IpamConfig,
        me: PeerId,
        my_name: &str,
        restored: Restored,
        now: Instant,
    ) -> IpamCore {
        let mut ring = RangeRing::new(cfg.range, cfg.min_prefix);
        for e in &restored.ring {
            // Our own store: entries were validated before they were written.
            let _ = ring.merge(e);
        }
        let mut allocs = AllocationTable::default();
        for a in restored.allocations {
            allocs.restore(a);
        }
        let paxos = match cfg.init {
            InitMode::Consensus(n) => Some(Paxos::new(me, n.max(1), restored.acceptor)),
            InitMode::Seed(_) => None,
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
        IpamCore {
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
        }
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
            InitMode::Consensus(_) => None,
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
                    InitMode::Consensus(_) => None,
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
                            InitMode::Seed(_) => 0,
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

    fn try_first_split(&mut self, now: Instant) {
        if self.ring.is_split() {
            return;
        }
        match self.cfg.init.clone() {
            InitMode::Seed(names) => {
                let mut ids = Vec::new();
                for n in &names {
                    match self.peers.iter().find(|(_, p)| &p.name == n) {
                        Some((id, _)) => ids.push(*id),
                        None => {
                            self.next_proposal = now + Duration::from_secs(1);
                            return;
                        }
                    }
                }
                let ring = RangeRing::initial_split(self.cfg.range, self.cfg.min_prefix, &ids);
                self.merge_entries(now, self.me, &ring.entries());
            }
            InitMode::Consensus(_) => {
                let up = self.up_peers();
                let Some(paxos) = self.paxos.as_ref() else {
                    return;
                };
                if up.len() < paxos.quorum() {
                    self.proposal_armed = false;
                    self.next_proposal = now + Duration::from_secs(1);
                    return;
                }
                // Lowest id first; the others wait their turn so proposers rarely duel.
                let rank = up.iter().position(|p| *p == self.me).unwrap_or(0) as u32;
                let jitter =
                    Duration::from_millis(rand::Rng::random_range(&mut self.rng, 0..500u64));
                if !self.proposal_armed {
                    self.proposal_armed = true;
                    self.next_proposal = now + Duration::from_secs(2) * rank + jitter;
                }
                if now < self.next_proposal {
                    return;
                }
                // If this round stalls (lost messages, a duel), try again later.
                self.next_proposal = now + Duration::from_secs(2) * (rank + 1) + jitter;
                if let Some(paxos) = self.paxos.as_mut() {
                    let step = paxos.propose(&up);
                    self.apply_paxos(now, step);
                }
            }
        }
    }

    fn apply_paxos(&mut self, now: Instant, step: Step) {
        if let Some(state) = step.persist {
            self.out
                .push(IpamOutput::Persist(IpamWrite::Acceptor(state)));
        }
        for (to, m) in step.send {
            if to == self.me {
                let peers = self.up_peers();
                if let Some(paxos) = self.paxos.as_mut() {
                    let inner = paxos.handle(self.me, m, &peers, &peers);
                    self.apply_paxos(now, inner);
                }
            } else {
                self.send(to, IpamMessage::Paxos(m));
            }
        }
        if let Some(members) = step.decided {
            let ring = RangeRing::initial_split(self.cfg.range, self.cfg.min_prefix, &members);
            self.merge_entries(now, self.me, &ring.entries());
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

    fn ask_for_space(&mut self, now: Instant) -> Result<Allocation, AllocateError> {
        if let Some(r) = &self.request {
            return Err(AllocateError::Waiting(self.name_of(r.to)));
        }
        let shares = self.ring.shares();
        let donor = self
            .up_peers()
            .into_iter()
            .filter(|p| *p != self.me && !self.denied.contains_key(p))
            .map(|p| {
                let owned = shares.get(&p).copied().unwrap_or(0);
                // What it told us, else what it owns (an upper bound).
                let free = self
                    .peers
                    .get(&p)
                    .and_then(|s| s.free)
                    .unwrap_or(owned)
                    .min(owned);
                (free, p)
            })
            .filter(|(free, _)| *free > 0)
            .max();
        let Some((_, to)) = donor else {
            return Err(AllocateError::Exhausted(self.cfg.range));
        };
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.request = Some(SpaceRequest {
            id,
            to,
            deadline: now + self.cfg.request_timeout,
        });
        self.out
            .push(IpamOutput::Event(IpamEvent::SpaceRequested { to }));
        self.send(to, IpamMessage::SpaceRequest { id });
        Err(AllocateError::Waiting(self.name_of(to)))
    }

    fn on_space_request(&mut self, from: PeerId, id: u64) {
        let Some(block) = self.donation() else {
            self.send(from, IpamMessage::SpaceDenied { id });
            return;
        };
        match self.ring.hand_over(self.me, block, from) {
            Ok(entries) => {
                // Committed before the grant (or any delta) leaves.
                self.out
                    .push(IpamOutput::Persist(IpamWrite::Ring(self.ring.entries())));
                self.send(
                    from,
                    IpamMessage::SpaceGrant {
                        id,
                        entries: entries.clone(),
                    },
                );
                self.flood(Some(from), entries);
            }
            Err(_) => self.send(from, IpamMessage::SpaceDenied { id }),
        }
    }

    /// The block to give away: the largest fully free aligned block of ours that is at
    /// most half our free space (and not below the minimum block size).
    fn donation(&self) -> Option<Block> {
        let free = self.free();
        let reserved = self.reserved();
        let min_prefix = self.ring.min_prefix();
        let mut best: Option<Block> = None;
        let mut stack = self.ring.blocks_of(self.me);
        while let Some(b) = stack.pop() {
            // Anchor blocks stay put: they locate the reclaim coordinator (reclaim.rs).
            let untouched = self.allocs.used_in(b) == 0
                && !reserved.iter().any(|a| b.contains_addr(*a))
                && !self.holds_anchor(b);
            if untouched && b.size() * 2 <= free {
                if best.is_none_or(|x| {
                    b.size() > x.size() || (b.size() == x.size() && b.start > x.start)
                }) {
                    best = Some(b);
                }
            } else if b.prefix < min_prefix {
                if let Some((lo, hi)) = b.halves() {
                    stack.push(lo);
                    stack.push(hi);
                }
            }
        }
        best
    }

    /// Releases an allocation; unknown keys are fine (CNI DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> (Option<Allocation>, Vec<IpamOutput>) {
        let gone = if key.container_id == GATEWAY_CONTAINER {
            None
        } else {
            self.allocs.release(key)
        };
        if gone.is_some() {
            self.out
                .push(IpamOutput::Persist(IpamWrite::Release(key.clone())));
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
        container_id: GATEWAY_CONTAINER.to_string(),
        ifname: "mesh0".to_string(),
    }
}
