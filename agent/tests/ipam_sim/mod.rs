//! The IPAM simulator's engine: nodes with a modelled durable store, a seeded network
//! that loses, duplicates and delays messages, partitions, crash-restarts, and the safety
//! invariants checked after every step. The campaigns live in `ipam_simulation.rs`.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use mesh_agent::ipam::allocations::{Allocation, AttachmentKey};
use mesh_agent::ipam::block::Block;
use mesh_agent::ipam::core::{
    AllocateError, InitMode, IpamConfig, IpamCore, IpamEvent, IpamInput, IpamOutput, IpamWrite,
    PeerInfo, Restored,
};
use mesh_agent::ipam::paxos::AcceptorState;
use mesh_proto::ipam::{IpamMessage, RingEntry, NOBODY};
use mesh_proto::PeerId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Default, Clone)]
pub struct Store {
    pub ring: Vec<RingEntry>,
    pub acceptor: AcceptorState,
    pub allocations: BTreeMap<AttachmentKey, Allocation>,
    pub last_allocated: Option<u32>,
}

pub struct Node {
    pub core: Option<IpamCore>,
    pub store: Store,
    pub generation: u64,
    pub timer_at: Option<u64>,
    /// Allocations a client was answered with.
    pub acked: BTreeMap<AttachmentKey, u32>,
}

pub enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: IpamMessage,
    },
    Timer {
        node: usize,
        generation: u64,
    },
}

pub struct Sim {
    pub seed: u64,
    pub now_ms: u64,
    pub base: Instant,
    pub rng: StdRng,
    pub nodes: Vec<Node>,
    pub ids: Vec<PeerId>,
    pub group: Vec<u8>,
    pub queue: BinaryHeap<Reverse<(u64, u64)>>,
    pub events: BTreeMap<u64, Event>,
    pub next_event: u64,
    pub cfg: IpamConfig,
    pub loss: f64,
    pub stats: Stats,
    /// Like the mesh's bounded neighbour set: the next k nodes by index (None = everyone).
    pub neighbour_limit: Option<usize>,
    /// Postcard bytes of every IPAM message sent, when measuring.
    pub bytes_sent: u64,
}

/// What a seed exercised, so the campaign can prove it was not vacuous.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub allocated: u64,
    pub grants: u64,
    pub exhausted: u64,
    pub crashes: u64,
    pub conflicts: u64,
}

impl Sim {
    pub fn new(seed: u64, n: usize) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let ids: Vec<PeerId> = (0..n)
            .map(|i| PeerId(((i as u64 + 1) << 32) | rng.random::<u32>() as u64))
            .collect();
        // Small on purpose: nodes run out, ask each other for space, and exhaust the range.
        let range: Block = "10.32.0.0/24".parse().unwrap();
        let init = if seed.is_multiple_of(2) {
            InitMode::Consensus(n)
        } else {
            InitMode::Seed((0..n).map(|i| format!("node-{i}")).collect())
        };
        let mut cfg = IpamConfig::new(range, init);
        cfg.min_prefix = 28;
        let nodes = (0..n)
            .map(|_| Node {
                core: None,
                store: Store::default(),
                generation: 0,
                timer_at: None,
                acked: BTreeMap::new(),
            })
            .collect();
        Sim {
            seed,
            now_ms: 0,
            base: Instant::now(),
            rng,
            nodes,
            ids,
            group: vec![0; n],
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            cfg,
            loss: 0.10,
            stats: Stats::default(),
            neighbour_limit: None,
            bytes_sent: 0,
        }
    }

    pub fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    pub fn fail(&self, what: String) -> ! {
        panic!(
            "IPAM invariant violated (seed {s}, t={t}ms): {what}\n  re-run: MESH_IPAM_SEED={s} cargo test -p mesh-agent --test ipam_simulation",
            s = self.seed,
            t = self.now_ms
        )
    }

    pub fn schedule(&mut self, at: u64, e: Event) {
        self.next_event += 1;
        self.events.insert(self.next_event, e);
        self.queue.push(Reverse((at, self.next_event)));
    }

    pub fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
            && self.nodes[a].core.is_some()
            && self.nodes[b].core.is_some()
    }

    pub fn start(&mut self, i: usize) {
        let st = self.nodes[i].store.clone();
        let restored = Restored {
            ring: st.ring,
            acceptor: st.acceptor,
            allocations: st.allocations.into_values().collect(),
            last_allocated: st.last_allocated,
        };
        let mut cfg = self.cfg.clone();
        cfg.seed = self.seed ^ i as u64;
        let core = IpamCore::new(
            cfg,
            self.ids[i],
            &format!("node-{i}"),
            restored,
            self.at(self.now_ms),
        )
        .expect("a consistent restored state");
        self.nodes[i].core = Some(core);
        self.nodes[i].generation += 1;
        self.nodes[i].timer_at = None;
        self.topology_changed();
    }

    pub fn crash(&mut self, i: usize) {
        self.stats.crashes += 1;
        self.nodes[i].core = None;
        self.nodes[i].generation += 1;
        self.topology_changed();
    }

    /// Every running node learns who is up and reachable (as the mesh would tell it).
    pub fn topology_changed(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                continue;
            }
            let peers: Vec<PeerInfo> = (0..self.nodes.len())
                .map(|j| PeerInfo {
                    id: self.ids[j],
                    name: format!("node-{j}"),
                    up: j == i || self.reachable(i, j),
                })
                .collect();
            let n = self.nodes.len();
            let limit = self.neighbour_limit.unwrap_or(n);
            let neighbours = (1..n)
                .map(|k| (i + k) % n)
                .filter(|j| self.reachable(i, *j))
                .take(limit)
                .map(|j| self.ids[j])
                .collect();
            self.input(i, IpamInput::Topology { peers, neighbours });
        }
    }

    pub fn input(&mut self, i: usize, input: IpamInput) {
        let now = self.at(self.now_ms);
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let out = core.handle(now, input);
        self.carry_out(i, out);
    }

    pub fn carry_out(&mut self, i: usize, out: Vec<IpamOutput>) {
        for o in out {
            match o {
                IpamOutput::Persist(w) => self.persist(i, w),
                IpamOutput::Send { to, msg } => {
                    self.bytes_sent += postcard::to_allocvec(&msg).map_or(0, |v| v.len() as u64);
                    let Some(to) = self.ids.iter().position(|x| *x == to) else {
                        self.fail(format!("send to unknown {to}"))
                    };
                    if self.rng.random_bool(self.loss) {
                        continue;
                    }
                    let copies = if self.rng.random_bool(0.02) { 2 } else { 1 };
                    for _ in 0..copies {
                        let d = self.rng.random_range(1..40);
                        self.schedule(
                            self.now_ms + d,
                            Event::Deliver {
                                from: i,
                                to,
                                msg: msg.clone(),
                            },
                        );
                    }
                }
                IpamOutput::Event(IpamEvent::SpaceGranted { .. }) => self.stats.grants += 1,
                IpamOutput::Event(IpamEvent::Conflict { .. }) => self.stats.conflicts += 1,
                IpamOutput::Event(_) => {}
            }
        }
        self.arm(i);
        self.check();
    }

    pub fn persist(&mut self, i: usize, w: IpamWrite) {
        let st = &mut self.nodes[i].store;
        match w {
            IpamWrite::Ring(entries) => st.ring = entries,
            IpamWrite::Acceptor(a) => st.acceptor = a,
            IpamWrite::Allocate(a) => {
                st.last_allocated = Some(a.addr);
                st.allocations.insert(a.key.clone(), a);
            }
            IpamWrite::Release(k) => {
                st.allocations.remove(&k);
            }
        }
    }

    pub fn arm(&mut self, i: usize) {
        let Some(core) = self.nodes[i].core.as_ref() else {
            return;
        };
        let at = (core
            .poll_timeout()
            .saturating_duration_since(self.base)
            .as_nanos()
            .div_ceil(1_000_000) as u64)
            .max(self.now_ms);
        if self.nodes[i].timer_at.is_some_and(|t| t <= at) {
            return;
        }
        self.nodes[i].timer_at = Some(at);
        let generation = self.nodes[i].generation;
        self.schedule(
            at,
            Event::Timer {
                node: i,
                generation,
            },
        );
    }

    pub fn run_until(&mut self, until: u64) {
        while let Some(Reverse((at, key))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            let Some(e) = self.events.remove(&key) else {
                continue;
            };
            self.now_ms = at;
            match e {
                Event::Deliver { from, to, msg } => {
                    if self.reachable(from, to) {
                        let from = self.ids[from];
                        self.input(to, IpamInput::Message { from, msg });
                    }
                }
                Event::Timer { node, generation } => {
                    if self.nodes[node].generation == generation
                        && self.nodes[node].timer_at == Some(at)
                    {
                        self.nodes[node].timer_at = None;
                        self.input(node, IpamInput::Timer);
                    }
                }
            }
        }
        self.now_ms = until;
    }

    /// A client asks node `i` for an address; `crash_before_answer` kills the node right
    /// after the allocation was stored but before the client heard of it.
    pub fn allocate(&mut self, i: usize, key: AttachmentKey, crash_before_answer: bool) {
        let now = self.at(self.now_ms);
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let (result, out) = core.allocate(now, key.clone(), None, None);
        self.carry_out(i, out);
        if let Ok(a) = result {
            if a.addr == 0 || !self.nodes[i].store.allocations.contains_key(&key) {
                self.fail(format!("node {i} answered {key:?} before storing it"));
            }
            self.stats.allocated += 1;
            if crash_before_answer {
                self.crash(i);
            } else {
                self.nodes[i].acked.insert(key, a.addr);
            }
        } else if let Err(AllocateError::Exhausted(_)) = result {
            // Expected under pressure: the range is tiny on purpose.
            self.stats.exhausted += 1;
        }
    }

    pub fn release(&mut self, i: usize, key: &AttachmentKey) {
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let (_, out) = core.release(key);
        // The client asked for the release: it no longer expects the address to be kept.
        self.nodes[i].acked.remove(key);
        self.carry_out(i, out);
    }

    pub fn check(&self) {
        // Ownership: each node's own belief about its blocks must be disjoint from others'.
        let mut owned: Vec<(u64, u64, usize)> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(c) = &n.core {
                for b in c.ring().blocks_of(self.ids[i]) {
                    owned.push((u64::from(b.start), b.end(), i));
                }
            }
        }
        owned.sort_unstable();
        for w in owned.windows(2) {
            if w[1].0 < w[0].1 && w[0].2 != w[1].2 {
                self.fail(format!(
                    "nodes {} and {} both own {:#x}",
                    w[0].2, w[1].2, w[1].0
                ));
            }
        }
        // Allocations: unique across every store; live ones inside the node's own blocks.
        let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for a in n.store.allocations.values() {
                if let Some(j) = seen.insert(a.addr, i) {
                    self.fail(format!(
                        "address {} allocated by node {j} and node {i}",
                        std::net::Ipv4Addr::from(a.addr)
                    ));
                }
                if let Some(c) = &n.core {
                    if c.ring().owner_of(a.addr).map(|(_, o)| o.owner) != Some(self.ids[i]) {
                        self.fail(format!(
                            "node {i} holds {} outside its own blocks",
                            std::net::Ipv4Addr::from(a.addr)
                        ));
                    }
                }
            }
            for (k, addr) in &n.acked {
                if n.store.allocations.get(k).map(|a| a.addr) != Some(*addr) {
                    self.fail(format!("node {i} lost acknowledged allocation {k:?}"));
                }
            }
        }
    }

    pub fn converged(&self) -> bool {
        let rings: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.ring().hash())
            .collect();
        let split = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .all(|c| c.ring().iter().all(|(_, o)| o.owner != NOBODY));
        split && rings.windows(2).all(|w| w[0] == w[1])
    }
}

pub fn key(n: u32) -> AttachmentKey {
    AttachmentKey {
        network: "mesh".into(),
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
    }
}
