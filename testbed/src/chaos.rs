//! Scripted faults with expectations (`mesh-testbed chaos`), each followed by the full
//! connectivity check: an agent killed with SIGKILL and restarted, one node's underlay link
//! cut and healed, a node deleted (its range reclaimed with `meshctl rmpeer`), a node
//! added. A scenario passes when its own expectation holds and the check afterwards is
//! all green.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use crate::checks::{connectivity, live_nodes, wait_for_routes, wait_for_traffic};
use crate::{AgentOptions, Testbed};

/// How nodes added by the scenarios run.
pub struct ChaosConfig {
    /// `--dataplane` for a node the scenario adds.
    pub new_node_dataplane: String,
    pub pods_per_node: usize,
}

type Scenario = fn(&mut Testbed, &ChaosConfig, &mut dyn Write) -> Result<()>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("kill -9 an agent and restart it", kill_and_restart),
    (
        "cut a node's underlay link, then heal it",
        partition_and_heal,
    ),
    ("delete a node; rmpeer reclaims its range", delete_node),
    ("add a node", add_node),
];

/// Runs every scenario in order; true when all passed.
pub fn run_all(tb: &mut Testbed, cfg: &ChaosConfig, out: &mut dyn Write) -> Result<bool> {
    let mut failed = 0;
    for (i, (name, scenario)) in SCENARIOS.iter().enumerate() {
        writeln!(out, "\n=== chaos {}/{}: {name}", i + 1, SCENARIOS.len())?;
        out.flush()?;
        let started = Instant::now();
        let outcome = scenario(tb, cfg, out).and_then(|()| {
            wait_for_routes(tb, Duration::from_secs(30))?;
            let converged = wait_for_traffic(tb, Duration::from_secs(30))?;
            say(
                out,
                format!("pod-to-pod traffic through after {converged:.1?}"),
            )?;
            if connectivity(tb, out)? {
                Ok(())
            } else {
                bail!("the connectivity check after the fault failed")
            }
        });
        match outcome {
            Ok(()) => writeln!(out, "=== PASS {name} ({:.1?})", started.elapsed())?,
            Err(e) => {
                failed += 1;
                writeln!(out, "=== FAIL {name}: {e:#}")?;
            }
        }
    }
    writeln!(
        out,
        "\n{}",
        if failed == 0 {
            "all chaos scenarios passed".to_string()
        } else {
            format!("{failed} chaos scenario(s) FAILED")
        }
    )?;
    Ok(failed == 0)
}

fn say(out: &mut dyn Write, what: impl std::fmt::Display) -> Result<()> {
    writeln!(out, "  {what}")?;
    out.flush()?;
    Ok(())
}

/// The liveness node `observer` reports for `peer` (`meshctl status peers -o json`).
fn peer_state(tb: &Testbed, observer: usize, peer: &str) -> Result<String> {
    let v = tb.meshctl_json(observer, &["status", "peers"])?;
    Ok(v["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
        .and_then(|p| p["state"].as_str())
        .unwrap_or("unknown")
        .to_string())
}

fn wait_state(
    tb: &Testbed,
    observer: usize,
    peer: &str,
    want: &[&str],
    within: Duration,
) -> Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        let s = peer_state(tb, observer, peer)?;
        if want.contains(&s.as_str()) {
            return Ok((s, started.elapsed()));
        }
        ensure!(
            started.elapsed() < within,
            "{} still sees {peer} as {s} after {within:?} (expected {want:?})",
            tb.nodes[observer].name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kill_and_restart(tb: &mut Testbed, _: &ChaosConfig, out: &mut dyn Write) -> Result<()> {
    let live = live_nodes(tb);
    ensure!(live.len() >= 2, "needs two nodes");
    let victim = live[1];
    let name = tb.nodes[victim].name.clone();
    tb.kill_agent(victim)?;
    say(out, format!("killed the agent on {name} (SIGKILL)"))?;
    // A kernel VXLAN node keeps forwarding without its agent.
    let kernel = tb.nodes[victim].dataplane == "vxlan";
    if kernel {
        let target = tb
            .pods
            .iter()
            .find(|p| p.node == victim)
            .and_then(|p| p.address);
        let from = tb.pods.iter().find(|p| p.node != victim);
        if let (Some(ip), Some(from)) = (target, from) {
            ensure!(
                tb.pings(&from.netns, ip)?,
                "{ip} on {name} unreachable while its (kernel VXLAN) agent is down"
            );
            say(
                out,
                format!(
                    "{} still reaches {ip} on {name} while its agent is down",
                    from.name
                ),
            )?;
        }
    }
    tb.start_agent(victim)?;
    let started = Instant::now();
    tb.wait_ready(victim, Duration::from_secs(30))?;
    say(
        out,
        format!("{name} ready again after {:.1?}", started.elapsed()),
    )?;
    Ok(())
}

fn partition_and_heal(tb: &mut Testbed, _: &ChaosConfig, out: &mut dyn Write) -> Result<()> {
    let live = live_nodes(tb);
    ensure!(live.len() >= 2, "needs two nodes");
    let (observer, victim) = (live[0], *live.last().context("a node")?);
    let name = tb.nodes[victim].name.clone();
    tb.set_underlay_link(victim, false)?;
    say(out, format!("cut {name}'s underlay link"))?;
    let seen = wait_state(
        tb,
        observer,
        &name,
        &["suspect", "dead"],
        Duration::from_secs(30),
    );
    tb.set_underlay_link(victim, true)?;
    let (state, after) = seen?;
    say(
        out,
        format!(
            "{} saw {name} as {state} after {after:.1?}; link healed",
            tb.nodes[observer].name
        ),
    )?;
    let (_, back) = wait_state(tb, observer, &name, &["alive"], Duration::from_secs(60))?;
    say(out, format!("{name} alive again {back:.1?} after the heal"))?;
    Ok(())
}

fn delete_node(tb: &mut Testbed, _: &ChaosConfig, out: &mut dyn Write) -> Result<()> {
    let live = live_nodes(tb);
    ensure!(live.len() >= 3, "needs three nodes (two stay)");
    let (observer, victim) = (live[0], *live.last().context("a node")?);
    let name = tb.nodes[victim].name.clone();
    tb.remove_node(victim)?;
    say(
        out,
        format!("deleted {name} (agent stopped, pods and namespace removed)"),
    )?;
    let meshctl = tb.bin("meshctl").display().to_string();
    let socket = tb.nodes[observer].socket.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = tb.ns_output(
            &tb.nodes[observer].netns,
            &[&meshctl, "--socket", &socket, "rmpeer", &name],
        )?;
        if r.status.success() {
            say(
                out,
                format!(
                    "meshctl rmpeer {name}: {}",
                    String::from_utf8_lossy(&r.stdout).trim()
                ),
            )?;
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "rmpeer {name} kept failing: {}",
            String::from_utf8_lossy(&r.stderr).trim()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn add_node(tb: &mut Testbed, cfg: &ChaosConfig, out: &mut dyn Write) -> Result<()> {
    let peers: Vec<String> = live_nodes(tb)
        .iter()
        .map(|i| tb.nodes[*i].underlay_ip.to_string())
        .collect();
    let i = tb.add_node(&AgentOptions {
        ipalloc_init: None,
        dataplane: cfg.new_node_dataplane.clone(),
        extra: vec!["--peers".into(), peers.join(",")],
    })?;
    tb.start_agent(i)?;
    let started = Instant::now();
    tb.wait_ready(i, Duration::from_secs(60))?;
    let name = tb.nodes[i].name.clone();
    say(
        out,
        format!(
            "{name} joined and has address space after {:.1?}",
            started.elapsed()
        ),
    )?;
    let list = tb.conflist(i, "1.1.0", &[]);
    for p in 0..cfg.pods_per_node {
        tb.add_pod(i, &format!("{name}p{}", p + 1), &list, &json!({}))?;
    }
    say(
        out,
        format!("{} pod(s) attached on {name}", cfg.pods_per_node),
    )?;
    Ok(())
}
