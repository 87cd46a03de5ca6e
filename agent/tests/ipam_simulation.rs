//! Deterministic simulation of `IpamCore`: several nodes split a small range by consensus
//! or seed list, allocate and release addresses under message loss, duplication,
//! reordering, partitions and crash-restarts (including a crash between "allocated" and
//! "answered"), with the safety invariants checked after every step:
//!
//! - no address is owned by two nodes (each node's own belief about its blocks);
//! - no address is allocated twice, across every node's durable store;
//! - every allocation a client was told about is still in its node's store;
//! - after heal, every ring is identical, split, and covers the range exactly once.
//!
//! `MESH_IPAM_SEEDS=N` (default 10000), `MESH_IPAM_SEED=S` re-runs one seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering};
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
struct Store {
    ring: Vec<RingEntry>,
    acceptor: AcceptorState,
    allocations: BTreeMap<AttachmentKey, Allocation>,
}

struct Node {
    core: Option<IpamCore>,
    store: Store,
    generation: u64,
    timer_at: Option<u64>,
    /// Allocations a client was answered with.
    acked: BTreeMap<AttachmentKey, u32>,
}

enum Event {
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

struct Sim {
    seed: u64,
    now_ms: u64,
    base: Instant,
    rng: StdRng,
    nodes: Vec<Node>,
    ids: Vec<PeerId>,
    group: Vec<u8>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    cfg: IpamConfig,
    loss: f64,
    stats: Stats,
    /// Like the mesh's bounded neighbour set: the next k nodes by index (None = everyone).
    neighbour_limit: Option<usize>,
    /// Postcard bytes of every IPAM message sent, when measuring.
    bytes_sent: u64,
}

/// What a seed exercised, so the campaign can prove it was not vacuous.
#[derive(Default, Clone, Copy)]
struct Stats {
    allocated: u64,
    grants: u64,
    exhausted: u64,
    crashes: u64,
    conflicts: u64,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
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

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "IPAM invariant violated (seed {s}, t={t}ms): {what}\n  re-run: MESH_IPAM_SEED={s} cargo test -p mesh-agent --test ipam_simulation",
            s = self.seed,
            t = self.now_ms
        )
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.next_event += 1;
        self.events.insert(self.next_event, e);
        self.queue.push(Reverse((at, self.next_event)));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.group[a] == self.group[b]
            && self.nodes[a].core.is_some()
            && self.nodes[b].core.is_some()
    }

    fn start(&mut self, i: usize) {
        let st = self.nodes[i].store.clone();
        let restored = Restored {
            ring: st.ring,
            acceptor: st.acceptor,
            allocations: st.allocations.into_values().collect(),
        };
        let mut cfg = self.cfg.clone();
        cfg.seed = self.seed ^ i as u64;
        let core = IpamCore::new(
            cfg,
            self.ids[i],
            &format!("node-{i}"),
            restored,
            self.at(self.now_ms),
        );
        self.nodes[i].core = Some(core);
        self.nodes[i].generation += 1;
        self.nodes[i].timer_at = None;
        self.topology_changed();
    }

    fn crash(&mut self, i: usize) {
        self.stats.crashes += 1;
        self.nodes[i].core = None;
        self.nodes[i].generation += 1;
        self.topology_changed();
    }

    /// Every running node learns who is up and reachable (as the mesh would tell it).
    fn topology_changed(&mut self) {
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

    fn input(&mut self, i: usize, input: IpamInput) {
        let now = self.at(self.now_ms);
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let out = core.handle(now, input);
        self.carry_out(i, out);
    }

    fn carry_out(&mut self, i: usize, out: Vec<IpamOutput>) {
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

    fn persist(&mut self, i: usize, w: IpamWrite) {
        let st = &mut self.nodes[i].store;
        match w {
            IpamWrite::Ring(entries) => st.ring = entries,
            IpamWrite::Acceptor(a) => st.acceptor = a,
            IpamWrite::Allocate(a) => {
                st.allocations.insert(a.key.clone(), a);
            }
            IpamWrite::Release(k) => {
                st.allocations.remove(&k);
            }
        }
    }

    fn arm(&mut self, i: usize) {
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

    fn run_until(&mut self, until: u64) {
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
    fn allocate(&mut self, i: usize, key: AttachmentKey, crash_before_answer: bool) {
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

    fn release(&mut self, i: usize, key: &AttachmentKey) {
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let (_, out) = core.release(key);
        // The client asked for the release: it no longer expects the address to be kept.
        self.nodes[i].acked.remove(key);
        self.carry_out(i, out);
    }

    fn check(&self) {
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

    fn converged(&self) -> bool {
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

fn key(n: u32) -> AttachmentKey {
    AttachmentKey {
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
    }
}

fn run_seed(seed: u64) -> (u64, Stats) {
    let n = 3 + (seed % 3) as usize;
    let mut sim = Sim::new(seed, n);
    // Nodes start over the first second; a late joiner sometimes comes much later.
    let late = if seed.is_multiple_of(5) {
        Some(n - 1)
    } else {
        None
    };
    for i in 0..n {
        if Some(i) != late {
            let at = sim.rng.random_range(0..1000).max(sim.now_ms);
            sim.run_until(at);
            sim.start(i);
        }
    }
    let mut next_key = 0u32;
    let mut partitioned_until = None;
    let mut down_until: BTreeMap<usize, u64> = BTreeMap::new();
    let end = 25_000;
    while sim.now_ms < end {
        let t = sim.now_ms + 50;
        sim.run_until(t);
        if let (Some(l), true) = (
            late,
            sim.now_ms >= 8_000
                && sim.nodes[n - 1].core.is_none()
                && sim.nodes[n - 1].generation == 0,
        ) {
            sim.start(l);
        }
        for (i, until) in down_until.clone() {
            if sim.now_ms >= until {
                down_until.remove(&i);
                sim.start(i);
            }
        }
        if partitioned_until.is_some_and(|u| sim.now_ms >= u) {
            partitioned_until = None;
            sim.group.iter_mut().for_each(|g| *g = 0);
            sim.topology_changed();
        }
        let i = sim.rng.random_range(0..n);
        let roll: f64 = sim.rng.random();
        if roll < 0.55 {
            next_key += 1;
            let crash = sim.rng.random_bool(0.005);
            sim.allocate(i, key(next_key), crash);
            if crash {
                down_until.insert(i, sim.now_ms + 2_000);
            }
        } else if roll < 0.65 {
            // A retried ADD must get the same answer.
            if let Some((k, addr)) = sim.nodes[i]
                .acked
                .iter()
                .next()
                .map(|(k, a)| (k.clone(), *a))
            {
                let now = sim.at(sim.now_ms);
                if let Some(core) = sim.nodes[i].core.as_mut() {
                    let (r, out) = core.allocate(now, k.clone(), None, None);
                    sim.carry_out(i, out);
                    if r.map(|a| a.addr) != Ok(addr) {
                        sim.fail(format!(
                            "retried ADD of {k:?} on node {i} did not return {addr}"
                        ));
                    }
                }
            }
        } else if roll < 0.85 {
            let victim = sim.nodes[i]
                .acked
                .keys()
                .nth(sim.rng.random_range(0..8))
                .cloned();
            if let Some(k) = victim {
                sim.release(i, &k);
            }
        } else if roll < 0.86 && sim.nodes[i].core.is_some() && down_until.is_empty() {
            sim.crash(i);
            down_until.insert(i, sim.now_ms + sim.rng.random_range(500..4000));
        } else if roll < 0.865 && partitioned_until.is_none() {
            for g in sim.group.iter_mut() {
                *g = u8::from(sim.rng.random_bool(0.4));
            }
            partitioned_until = Some(sim.now_ms + 5_000);
            sim.topology_changed();
        }
    }
    // Heal everything and let the rings converge.
    sim.group.iter_mut().for_each(|g| *g = 0);
    for i in 0..n {
        if sim.nodes[i].core.is_none() {
            sim.start(i);
        }
    }
    sim.topology_changed();
    let healed = sim.now_ms;
    while !sim.converged() {
        if sim.now_ms > healed + 60_000 {
            sim.fail("rings did not converge within 60 s after heal".into());
        }
        let t = sim.now_ms + 100;
        sim.run_until(t);
    }
    (sim.now_ms - healed, sim.stats)
}

#[test]
fn ipam_campaign_no_double_ownership_no_duplicate_no_loss() {
    let seeds: Vec<u64> = match std::env::var("MESH_IPAM_SEED") {
        Ok(s) => vec![s.parse().expect("MESH_IPAM_SEED must be a number")],
        Err(_) => (1..=std::env::var("MESH_IPAM_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000))
            .collect(),
    };
    let next = AtomicU64::new(0);
    let worst = AtomicU64::new(0);
    let totals = std::sync::Mutex::new(Stats::default());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(seeds.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = seeds.get(i) else { break };
                let (converge_ms, st) = run_seed(seed);
                worst.fetch_max(converge_ms, Ordering::Relaxed);
                if let Ok(mut t) = totals.lock() {
                    t.allocated += st.allocated;
                    t.grants += st.grants;
                    t.exhausted += st.exhausted;
                    t.crashes += st.crashes;
                    t.conflicts += st.conflicts;
                }
            });
        }
    });
    let t = *totals.lock().unwrap();
    println!(
        "IPAM: {} seeds, worst convergence after heal {} ms; {} allocations, {} space grants, {} exhausted answers, {} crashes, {} ring conflicts",
        seeds.len(),
        worst.load(Ordering::Relaxed),
        t.allocated,
        t.grants,
        t.exhausted,
        t.crashes,
        t.conflicts
    );
    // The campaign must have exercised what it claims to check.
    assert!(
        t.allocated > 0 && t.crashes > 0,
        "campaign exercised nothing"
    );
    if seeds.len() >= 100 {
        assert!(
            t.grants > 0 && t.exhausted > 0,
            "no space hand-over or exhaustion happened in {} seeds",
            seeds.len()
        );
    }
    assert_eq!(
        t.conflicts, 0,
        "ring conflicts mean two writers claimed one block"
    );
}

#[test]
fn a_peer_with_another_seed_list_is_refused() {
    let range: Block = "10.32.0.0/22".parse().unwrap();
    let t0 = Instant::now();
    let a_cfg = IpamConfig::new(range, InitMode::Seed(vec!["a".into(), "b".into()]));
    let b_cfg = IpamConfig::new(range, InitMode::Seed(vec!["a".into(), "x".into()]));
    let mut a = IpamCore::new(a_cfg, PeerId(1), "a", Restored::default(), t0);
    let mut b = IpamCore::new(b_cfg, PeerId(2), "b", Restored::default(), t0);
    let peers = |up| {
        vec![
            PeerInfo {
                id: PeerId(1),
                name: "a".into(),
                up,
            },
            PeerInfo {
                id: PeerId(2),
                name: "b".into(),
                up,
            },
        ]
    };
    a.handle(
        t0,
        IpamInput::Topology {
            peers: peers(true),
            neighbours: vec![PeerId(2)],
        },
    );
    b.handle(
        t0,
        IpamInput::Topology {
            peers: peers(true),
            neighbours: vec![PeerId(1)],
        },
    );
    let later = t0 + Duration::from_secs(10);
    let out = b.handle(later, IpamInput::Timer);
    let summary = out
        .into_iter()
        .find_map(|o| match o {
            IpamOutput::Send {
                msg: m @ IpamMessage::Summary { .. },
                ..
            } => Some(m),
            _ => None,
        })
        .expect("b sends a summary");
    let out = a.handle(
        later,
        IpamInput::Message {
            from: PeerId(2),
            msg: summary,
        },
    );
    assert!(
        out.iter().any(|o| matches!(
            o,
            IpamOutput::Event(mesh_agent::ipam::core::IpamEvent::Incompatible { .. })
        )),
        "{out:?}"
    );
}

/// Ring gossip cost at 100 nodes (closing-note figure): steady-state bytes per node per
/// second, and bytes for one hand-over to reach everyone. Neighbours as in the mesh (5).
#[test]
fn ring_gossip_bytes_at_100_nodes() {
    let n = 100;
    let mut sim = Sim::new(2, n); // even seed: consensus
    sim.cfg.init = InitMode::Seed((0..n).map(|i| format!("node-{i}")).collect());
    sim.cfg.min_prefix = 26;
    sim.cfg.range = "10.32.0.0/16".parse().unwrap();
    sim.loss = 0.0;
    sim.neighbour_limit = Some(5);
    for i in 0..n {
        sim.start(i);
    }
    sim.run_until(20_000);
    assert!(
        sim.converged(),
        "100 seeded nodes did not agree on one ring"
    );
    let (b0, t0) = (sim.bytes_sent, sim.now_ms);
    sim.run_until(t0 + 60_000);
    let steady = (sim.bytes_sent - b0) as f64 / n as f64 / 60.0;
    // Exhaust node 0's share so it asks a peer for space: one hand-over, flooded.
    let b1 = sim.bytes_sent;
    let mut k = 0;
    while sim.stats.grants == 0 && k < 20_000 {
        sim.allocate(0, key(k), false);
        k += 1;
        if k % 500 == 0 {
            let t = sim.now_ms + 100;
            sim.run_until(t);
        }
    }
    let t = sim.now_ms + 5_000;
    sim.run_until(t);
    assert!(sim.stats.grants > 0, "no hand-over happened");
    assert!(sim.converged(), "the hand-over did not reach everyone");
    let handover = sim.bytes_sent - b1;
    println!("ring gossip, 100 simulated nodes: {steady:.1} B/s per node at steady state; {handover} B cluster-wide for one hand-over (incl. anti-entropy during it)");
}
