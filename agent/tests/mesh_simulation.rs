//! Deterministic simulation of the mesh core (see `sim/mod.rs`).
//!
//! Environment knobs for longer campaigns outside CI:
//! - `MESH_SIM_SEEDS=N` seeds per campaign (default 1000), `MESH_SIM_NODES=N` (default 50),
//! - `MESH_SIM_SEED=S` re-runs one seed (printed by a failure),
//! - `MESH_SIM_STATS=1` prints convergence rounds and gossip bytes (see `dissemination_stats`).

mod sim;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_agent::mesh::CoreConfig;
use mesh_proto::gossip::{GossipMessage, Liveness};
use mesh_proto::peer::Capabilities;
use rand::seq::IteratorRandom;
use rand::Rng;
use sim::{NetConfig, Sim};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts `n` nodes over the first two seconds, each bootstrapping through an earlier one.
fn start_cluster(sim: &mut Sim) {
    let n = sim.len();
    for i in 0..n {
        let at = (i as u64 * 2000) / n as u64;
        sim.run_until(at);
        let bootstrap = if i == 0 {
            None
        } else {
            Some(sim.rng().random_range(0..i))
        };
        sim.start(i, bootstrap);
    }
}

struct Outcome {
    detect_ms: u64,
    converge_ms: u64,
}

/// One seed: join under loss, crash one node (everyone must mark it dead), partition a third
/// of the cluster and heal, restart the crashed node (it must come back alive), and require
/// one identical view everywhere within a bound.
fn run_seed(seed: u64, nodes: usize) -> Outcome {
    let mut sim = Sim::new(seed, nodes, NetConfig::default(), CoreConfig::default());
    start_cluster(&mut sim);
    let t = sim.run_until_pred(30_000, 250, Sim::converged);
    assert!(
        t.is_some(),
        "seed {seed}: {nodes} nodes did not converge after joining (MESH_SIM_SEED={seed})"
    );

    let victim = sim.rng().random_range(0..nodes);
    let crash_at = sim.now_ms;
    sim.crash(victim);
    let detected = sim.run_until_pred(crash_at + 30_000, 100, |s| s.all_see_down(victim));
    let Some(detected) = detected else {
        panic!("seed {seed}: crashed node {victim} not marked dead by every live peer within 30 s (MESH_SIM_SEED={seed})");
    };

    let side: BTreeSet<usize> = (0..nodes)
        .filter(|i| *i != victim)
        .choose_multiple(sim.rng(), nodes / 3)
        .into_iter()
        .collect();
    sim.partition(&side);
    sim.run_until(sim.now_ms + 15_000);
    sim.heal();
    let healed_at = sim.now_ms;
    sim.start(victim, Some((victim + 1) % nodes));
    let converged = sim.run_until_pred(healed_at + 90_000, 250, |s| {
        s.converged() && s.all_see_alive(victim)
    });
    let Some(converged) = converged else {
        panic!("seed {seed}: no identical view within 90 s after heal and restart (MESH_SIM_SEED={seed})");
    };
    Outcome {
        detect_ms: detected - crash_at,
        converge_ms: converged - healed_at,
    }
}

#[test]
fn campaign_50_nodes_10pct_loss_converges_detects_and_recovers() {
    let nodes = env_u64("MESH_SIM_NODES", 50) as usize;
    let seeds: Vec<u64> = match std::env::var("MESH_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MESH_SIM_SEED must be a number")],
        Err(_) => (1..=env_u64("MESH_SIM_SEEDS", 1000)).collect(),
    };
    let worst_detect = AtomicU64::new(0);
    let worst_converge = AtomicU64::new(0);
    let next = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(seeds.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = seeds.get(i) else { break };
                let o = run_seed(seed, nodes);
                worst_detect.fetch_max(o.detect_ms, Ordering::Relaxed);
                worst_converge.fetch_max(o.converge_ms, Ordering::Relaxed);
            });
        }
    });
    println!(
        "simulated {} seeds x {nodes} nodes, 10% loss: worst crash detection {} ms, worst convergence after heal {} ms",
        seeds.len(),
        worst_detect.load(Ordering::Relaxed),
        worst_converge.load(Ordering::Relaxed)
    );
}

#[test]
fn late_gossip_cannot_resurrect_a_dead_peer() {
    let mut sim = Sim::new(7, 8, NetConfig::default(), CoreConfig::default());
    start_cluster(&mut sim);
    assert!(sim.run_until_pred(30_000, 100, Sim::converged).is_some());
    // Keep the victim's alive record as a node had it, to replay it after its death.
    let victim = 3;
    let stale = sim
        .core(0)
        .unwrap()
        .member(&sim.id(victim))
        .unwrap()
        .update();
    assert_eq!(stale.liveness.state, Liveness::Alive);
    sim.crash(victim);
    let now = sim.now_ms;
    assert!(sim
        .run_until_pred(now + 30_000, 100, |s| s.all_see_down(victim))
        .is_some());
    for to in (0..8).filter(|i| *i != victim) {
        sim.inject(
            1,
            to,
            GossipMessage::Updates {
                updates: vec![stale.clone()],
            },
        );
    }
    let now = sim.now_ms;
    sim.run_until(now + 20_000);
    assert!(
        sim.all_see_down(victim),
        "a replayed alive record resurrected a dead peer"
    );
}

#[test]
fn restarted_peer_refutes_its_death_with_a_higher_incarnation() {
    let mut sim = Sim::new(11, 10, NetConfig::default(), CoreConfig::default());
    start_cluster(&mut sim);
    assert!(sim.run_until_pred(30_000, 100, Sim::converged).is_some());
    let old_inc = sim.core(4).unwrap().own_record().incarnation;
    sim.crash(4);
    let now = sim.now_ms;
    assert!(sim
        .run_until_pred(now + 30_000, 100, |s| s.all_see_down(4))
        .is_some());
    sim.start(4, Some(0));
    let now = sim.now_ms;
    assert!(sim
        .run_until_pred(now + 30_000, 100, |s| s.all_see_alive(4) && s.converged())
        .is_some());
    assert!(sim.core(4).unwrap().own_record().incarnation > old_inc);
}

#[test]
fn control_connections_stay_bounded_at_300_nodes() {
    let net = NetConfig {
        loss: 0.0,
        duplicate: 0.0,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(3, 300, net, CoreConfig::default());
    start_cluster(&mut sim);
    assert!(
        sim.run_until_pred(60_000, 500, Sim::converged).is_some(),
        "300 nodes did not converge"
    );
    let degree = sim.max_degree();
    assert!(
        degree <= 20,
        "a node holds {degree} control connections; the design bounds it near 2*(2+3)"
    );
}

struct Dissemination {
    join_ms: u64,
    rounds: u64,
    bytes_per_node_s: f64,
}

/// Join time (until every node knows every node as up), rounds (gossip intervals) for one
/// record change to reach every node, and steady-state gossip bytes per node per second.
fn dissemination(nodes: usize, seed: u64, loss: f64) -> Dissemination {
    let net = NetConfig {
        loss,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(seed, nodes, net, CoreConfig::default());
    start_cluster(&mut sim);
    let join_ms = sim
        .run_until_pred(120_000, 250, Sim::all_know_all)
        .unwrap_or_else(|| panic!("{nodes} nodes did not all learn of each other within 120 s"));
    sim.run_until(sim.now_ms + 20_000);
    // Steady-state traffic over 20 simulated seconds.
    sim.measure_bytes = true;
    let (b0, t0) = (sim.stats.bytes, sim.now_ms);
    sim.run_until(t0 + 20_000);
    let bytes_per_node_s = (sim.stats.bytes - b0) as f64 / nodes as f64 / 20.0;
    // One record change, timed until every node holds it.
    let start = sim.now_ms;
    sim.set_capabilities(
        0,
        Capabilities {
            dataplanes: vec!["vxlan".into()],
            ..Capabilities::default()
        },
    );
    let version = sim.core(0).unwrap().own_record().version;
    let incarnation = sim.core(0).unwrap().own_record().incarnation;
    let id = sim.id(0);
    let done = sim
        .run_until_pred(start + 60_000, 10, |s| {
            (0..s.len()).filter_map(|i| s.core(i)).all(|c| {
                c.member(&id)
                    .is_some_and(|m| m.record.content_key() >= (incarnation, version))
            })
        })
        .expect("change did not spread");
    let rounds = (done - start).div_ceil(CoreConfig::default().gossip_interval.as_millis() as u64);
    Dissemination {
        join_ms,
        rounds,
        bytes_per_node_s,
    }
}

#[test]
fn dissemination_stats() {
    let report = |nodes: usize, loss: f64| {
        let d = dissemination(nodes, 5, loss);
        println!(
            "{nodes} nodes, {:.0}% loss: all know all after {} ms; a change reaches every node in {} gossip rounds; steady state {:.0} B/s of gossip per node",
            loss * 100.0,
            d.join_ms,
            d.rounds,
            d.bytes_per_node_s
        );
        d
    };
    let d = report(50, 0.10);
    assert!(
        d.rounds <= 25,
        "a change took {} rounds to reach 50 nodes",
        d.rounds
    );
    if std::env::var("MESH_SIM_STATS").is_ok() {
        let nodes = env_u64("MESH_SIM_NODES", 1000) as usize;
        report(50, 0.0);
        report(nodes, 0.0);
        report(nodes, 0.10);
    }
}
