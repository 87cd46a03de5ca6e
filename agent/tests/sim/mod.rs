//! A deterministic simulator for `MeshCore`: many cores in one thread, a seeded scheduler,
//! a fake clock, and a network that loses, duplicates, delays (and so reorders) messages,
//! partitions, crashes and restarts nodes. Connections are modelled the way the driver
//! makes them: a core asks for neighbours, the simulated driver links reachable ones, and
//! links across a partition or to a crashed node drop after the QUIC idle timeout.
//!
//! Invariants are checked after every step; a violation panics with the seed, so the
//! failing schedule re-runs by itself with `MESH_SIM_SEED=<seed>`.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use mesh_agent::mesh::{CoreConfig, Input, MeshCore, MeshEvent, Output};
use mesh_proto::gossip::GossipMessage;
use mesh_proto::peer::Capabilities;
use mesh_proto::{PeerId, PeerRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod checks;

/// How long a link survives after its peer stops answering (QUIC idle timeout).
const LINK_IDLE_TIMEOUT_MS: u64 = 10_000;
/// How often the simulated driver re-dials missing neighbours.
const REDIAL_MS: u64 = 1_000;

#[derive(Clone, Debug)]
pub struct NetConfig {
    pub loss: f64,
    pub duplicate: f64,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            loss: 0.10,
            duplicate: 0.02,
            min_delay_ms: 1,
            max_delay_ms: 40,
        }
    }
}

/// (content key, liveness key) of one member in one node's view.
type MemberKey = ((u64, u64), (u64, u8));

enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: GossipMessage,
    },
    Timer {
        node: usize,
        generation: u64,
    },
    DriverTick {
        node: usize,
        generation: u64,
    },
}

struct Node {
    core: Option<MeshCore>,
    /// What the node's store holds: survives crashes.
    stored_incarnation: u64,
    /// Bumped on every restart so events of an earlier life are ignored.
    generation: u64,
    desired: BTreeSet<usize>,
    bootstrap: Option<usize>,
    /// Last (content key, liveness key) this node held for each member: must never go down.
    seen: BTreeMap<PeerId, MemberKey>,
    timer_at: Option<u64>,
}

pub struct Stats {
    pub messages: u64,
    pub bytes: u64,
    pub steps: u64,
}

pub struct Sim {
    pub seed: u64,
    pub now_ms: u64,
    base: Instant,
    rng: StdRng,
    pub net: NetConfig,
    cfg: CoreConfig,
    nodes: Vec<Node>,
    ids: Vec<PeerId>,
    index: BTreeMap<PeerId, usize>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    /// Partition group per node; nodes in different groups cannot talk.
    group: Vec<u8>,
    /// Links (a < b) and when they became unreachable, if they did.
    links: BTreeMap<(usize, usize), Option<u64>>,
    pub stats: Stats,
    pub measure_bytes: bool,
}

impl Sim {
    pub fn new(seed: u64, nodes: usize, net: NetConfig, cfg: CoreConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids: Vec<PeerId> = Vec::new();
        while ids.len() < nodes {
            let id = PeerId(rng.random());
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let nodes = (0..nodes)
            .map(|_| Node {
                core: None,
                stored_incarnation: 0,
                generation: 0,
                desired: BTreeSet::new(),
                bootstrap: None,
                seen: BTreeMap::new(),
                timer_at: None,
            })
            .collect();
        Sim {
            seed,
            now_ms: 0,
            base: Instant::now(),
            rng,
            net,
            cfg,
            group: vec![0; ids.len()],
            nodes,
            ids,
            index,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            links: BTreeMap::new(),
            stats: Stats {
                messages: 0,
                bytes: 0,
                steps: 0,
            },
            measure_bytes: false,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn id(&self, node: usize) -> PeerId {
        self.ids[node]
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.nodes[node].core.is_some()
    }

    pub fn core(&self, node: usize) -> Option<&MeshCore> {
        self.nodes[node].core.as_ref()
    }

    fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "simulator invariant violated (seed {seed}, t={t}ms): {what}\n  re-run: MESH_SIM_SEED={seed} cargo test -p mesh-agent --test mesh_simulation",
            seed = self.seed,
            t = self.now_ms
        )
    }

    fn schedule(&mut self, at: u64, event: Event) {
        let key = self.next_event;
        self.next_event += 1;
        self.events.insert(key, event);
        self.queue.push(Reverse((at, key)));
    }

    /// Starts (or restarts after a crash) a node that bootstraps through `bootstrap`.
    pub fn start(&mut self, node: usize, bootstrap: Option<usize>) {
        assert!(
            self.nodes[node].core.is_none(),
            "node {node} already running"
        );
        let n = &mut self.nodes[node];
        // Like the agent: every start bumps and stores the incarnation before anything is sent.
        n.stored_incarnation += 1;
        n.generation += 1;
        n.bootstrap = bootstrap;
        n.desired.clear();
        n.seen.clear();
        let record = PeerRecord {
            id: self.ids[node],
            name: format!("node-{node}"),
            incarnation: n.stored_incarnation,
            version: 0,
            addresses: vec![],
            capabilities: Capabilities::default(),
            connections: vec![],
        };
        let mut cfg = self.cfg.clone();
        cfg.seed = self.seed ^ (node as u64) << 32 ^ n.generation;
        let core = MeshCore::new(cfg, record, self.instant(self.now_ms));
        self.nodes[node].core = Some(core);
        let generation = self.nodes[node].generation;
        self.schedule(self.now_ms, Event::DriverTick { node, generation });
        self.arm_timer(node);
    }

    pub fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.core = None;
        n.timer_at = None;
        n.generation += 1;
        let now = self.now_ms;
        for ((a, b), broken) in self.links.iter_mut() {
            if (*a == node || *b == node) && broken.is_none() {
                *broken = Some(now);
            }
        }
    }

    /// Splits the cluster: `side_b` nodes can only talk among themselves.
    pub fn partition(&mut self, side_b: &BTreeSet<usize>) {
        for i in 0..self.nodes.len() {
            self.group[i] = u8::from(side_b.contains(&i));
        }
        let now = self.now_ms;
        let group = self.group.clone();
        for ((a, b), broken) in self.links.iter_mut() {
            if group[*a] != group[*b] && broken.is_none() {
                *broken = Some(now);
            }
        }
    }

    pub fn heal(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
        for ((a, b), broken) in self.links.iter_mut() {
            let up = self.nodes[*a].core.is_some() && self.nodes[*b].core.is_some();
            if up {
                *broken = None;
            }
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
            && self.nodes[a].core.is_some()
            && self.nodes[b].core.is_some()
    }

    fn arm_timer(&mut self, node: usize) {
        let Some(core) = self.nodes[node].core.as_ref() else {
            return;
        };
        // Round up: a deadline inside a millisecond must not fire before it is due.
        let at = core
            .poll_timeout()
            .saturating_duration_since(self.base)
            .as_nanos()
            .div_ceil(1_000_000) as u64;
        let at = at.max(self.now_ms);
        if self.nodes[node].timer_at.is_some_and(|t| t <= at) {
            return;
        }
        self.nodes[node].timer_at = Some(at);
        let generation = self.nodes[node].generation;
        self.schedule(at, Event::Timer { node, generation });
    }

    /// Runs the simulation until `until_ms`.
    pub fn run_until(&mut self, until_ms: u64) {
        let mut same_instant = 0u32;
        while let Some(Reverse((at, key))) = self.queue.peek().copied() {
            if at > until_ms {
                break;
            }
            self.queue.pop();
            let Some(event) = self.events.remove(&key) else {
                continue;
            };
            same_instant = if at == self.now_ms {
                same_instant + 1
            } else {
                0
            };
            if same_instant > 200_000 {
                let what = match &event {
                    Event::Deliver { from, to, msg } => {
                        format!("deliver {from}->{to} {}", msg.kind())
                    }
                    Event::Timer { node, .. } => format!("timer of node {node}"),
                    Event::DriverTick { node, .. } => format!("driver tick of node {node}"),
                };
                self.fail(format!(
                    "livelock: 200000 events at one instant, e.g. {what}"
                ));
            }
            self.now_ms = at;
            self.step(event);
        }
        self.now_ms = until_ms;
    }

    /// Runs until `pred` holds (checked every `every_ms`) or `deadline_ms` passes.
    pub fn run_until_pred(
        &mut self,
        deadline_ms: u64,
        every_ms: u64,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        loop {
            if pred(self) {
                return Some(self.now_ms);
            }
            if self.now_ms >= deadline_ms {
                return None;
            }
            let next = (self.now_ms + every_ms).min(deadline_ms);
            self.run_until(next);
        }
    }

    fn step(&mut self, event: Event) {
        self.stats.steps += 1;
        match event {
            Event::Deliver { from, to, msg } => {
                if !self.reachable(from, to) {
                    return;
                }
                let touched: Vec<PeerId> = match &msg {
                    GossipMessage::Ping { updates, .. }
                    | GossipMessage::Ack { updates, .. }
                    | GossipMessage::Updates { updates } => {
                        updates.iter().map(|u| u.record.id).collect()
                    }
                    _ => Vec::new(),
                };
                let from_id = self.ids[from];
                self.input(to, Input::Message { from: from_id, msg }, touched);
            }
            Event::Timer { node, generation } => {
                if self.nodes[node].generation != generation
                    || self.nodes[node].timer_at != Some(self.now_ms)
                {
                    return;
                }
                self.nodes[node].timer_at = None;
                let due = self.nodes[node]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.poll_timeout() <= self.instant(self.now_ms));
                if due {
                    self.input(node, Input::Timer, Vec::new());
                } else {
                    self.arm_timer(node);
                }
            }
            Event::DriverTick { node, generation } => {
                if self.nodes[node].generation != generation || self.nodes[node].core.is_none() {
                    return;
                }
                self.driver_tick(node);
                self.schedule(
                    self.now_ms + REDIAL_MS,
                    Event::DriverTick { node, generation },
                );
            }
        }
    }

    /// What the agent's connection manager does once a second: dial missing neighbours
    /// (or the bootstrap peer while alone) and drop links whose peer went silent.
    fn driver_tick(&mut self, node: usize) {
        let now = self.now_ms;
        // Links whose peer went silent time out; links neither end wants any more (a
        // bootstrap link once real neighbours exist) are closed like the driver's idle close.
        let wanted = |s: &Sim, a: usize, b: usize| {
            s.nodes[a].desired.contains(&b) || s.nodes[b].desired.contains(&a)
        };
        let expired: Vec<(usize, usize)> = self
            .links
            .iter()
            .filter(|((a, b), broken)| {
                (*a == node || *b == node)
                    && (broken.is_some_and(|t| now >= t + LINK_IDLE_TIMEOUT_MS)
                        || (broken.is_none() && !wanted(self, *a, *b)))
            })
            .map(|(k, _)| *k)
            .collect();
        for (a, b) in expired {
            self.links.remove(&(a, b));
            for (me, other) in [(a, b), (b, a)] {
                if self.nodes[me].core.is_some() {
                    let peer = self.ids[other];
                    self.input(me, Input::PeerDisconnected { peer }, Vec::new());
                }
            }
        }
        let mut want: Vec<usize> = self.nodes[node].desired.iter().copied().collect();
        let has_links = self.links.keys().any(|(a, b)| *a == node || *b == node);
        if let (false, Some(b)) = (has_links, self.nodes[node].bootstrap) {
            want.push(b);
        }
        for other in want {
            let key = (node.min(other), node.max(other));
            if other == node || self.links.contains_key(&key) || !self.reachable(node, other) {
                continue;
            }
            self.links.insert(key, None);
            let (Some(rec_a), Some(rec_b)) = (
                self.nodes[node]
                    .core
                    .as_ref()
                    .map(|c| c.own_record().clone()),
                self.nodes[other]
                    .core
                    .as_ref()
                    .map(|c| c.own_record().clone()),
            ) else {
                continue;
            };
            self.input(
                node,
                Input::PeerConnected {
                    record: rec_b,
                    outbound: true,
                },
                Vec::new(),
            );
            if self.nodes[other].core.is_some() {
                self.input(
                    other,
                    Input::PeerConnected {
                        record: rec_a,
                        outbound: false,
                    },
                    Vec::new(),
                );
            }
        }
    }

    fn input(&mut self, node: usize, input: Input, mut touched: Vec<PeerId>) {
        let now = self.instant(self.now_ms);
        let Some(core) = self.nodes[node].core.as_mut() else {
            return;
        };
        if let Input::PeerConnected { record, .. } = &input {
            touched.push(record.id);
        }
        let outputs = core.handle(now, input);
        for out in outputs {
            match out {
                Output::Send { to, msg } => self.transmit(node, to, msg),
                Output::SetNeighbours(set) => {
                    let desired = set
                        .iter()
                        .filter_map(|id| self.index.get(id).copied())
                        .collect();
                    self.nodes[node].desired = desired;
                }
                Output::PersistIncarnation(inc) => {
                    let n = &mut self.nodes[node];
                    n.stored_incarnation = n.stored_incarnation.max(inc);
                }
                Output::Event(MeshEvent::StateChanged { peer, .. }) => touched.push(peer),
                Output::Event(_) => {}
            }
        }
        self.check_node(node, &touched);
        self.arm_timer(node);
    }

    fn transmit(&mut self, from: usize, to: PeerId, msg: GossipMessage) {
        let Some(&to) = self.index.get(&to) else {
            self.fail(format!("node {from} sent to unknown peer {to}"));
        };
        self.stats.messages += 1;
        if self.measure_bytes {
            self.stats.bytes += postcard::to_allocvec(&msg)
                .map(|v| v.len() as u64)
                .unwrap_or(0);
        }
        if self.rng.random_bool(self.net.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.net.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self
                .rng
                .random_range(self.net.min_delay_ms..=self.net.max_delay_ms);
            self.schedule(
                self.now_ms + delay,
                Event::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    pub fn set_capabilities(&mut self, node: usize, caps: Capabilities) {
        self.input(node, Input::SetCapabilities(caps), Vec::new());
    }

    /// Delivers a message as if `from` had sent it long ago (a late duplicate).
    pub fn inject(&mut self, from: usize, to: usize, msg: GossipMessage) {
        let from_id = self.ids[from];
        let touched = match &msg {
            GossipMessage::Updates { updates } => updates.iter().map(|u| u.record.id).collect(),
            _ => Vec::new(),
        };
        self.input(to, Input::Message { from: from_id, msg }, touched);
    }
}
