//! A reused pod address is reachable at once (root; skips loudly without it, fails under
//! MESH_E2E=1). Three nodes on a small range (`10.32.0.0/24`: a handful of blocks) so an
//! address can be made to come round again: a pod is deleted, the node's space is filled
//! through the agent's API until the allocator wraps around to the freed address, and a
//! new pod gets it. Its node, a pod beside it and a pod on another node had all cached
//! the old pod's MAC (they pinged it); each must reach the new pod within 1 s.
//!
//! Run on a kernel VXLAN node (reached from a userspace node) and on a userspace node
//! (reached from a kernel one).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_testbed::probe::agent_request;
use mesh_testbed::{suite, AgentOptions, Testbed};
use serde_json::json;

const LAYOUT: [&str; 3] = ["vxlan", "udp", "vxlan"];
const TARGET: Duration = Duration::from_secs(1);

fn main() {
    suite::run(
        "address reuse, 3 nodes (vxlan, udp, vxlan) on a /24",
        setup,
        &[
            (
                "a reused address on a kernel node is reachable from its node, a pod beside it and a remote pod within 1 s",
                reuse_on_vxlan_node,
            ),
            (
                "a reused address on a userspace node is reachable from its node, a pod beside it and a remote pod within 1 s",
                reuse_on_udp_node,
            ),
        ],
    );
}

fn setup() -> Result<Testbed> {
    let mut tb = Testbed::new("ar")?;
    let peers: Vec<String> = (1..=LAYOUT.len())
        .map(|i| format!("192.168.77.{i}"))
        .collect();
    for backend in LAYOUT {
        tb.add_node(&AgentOptions {
            ipalloc_init: Some(format!("consensus={}", LAYOUT.len())),
            dataplane: backend.into(),
            extra: vec![
                "--peers".into(),
                peers.join(","),
                "--ipalloc-range".into(),
                "10.32.0.0/24".into(),
            ],
        })?;
    }
    for i in 0..LAYOUT.len() {
        tb.start_agent(i)?;
    }
    for i in 0..LAYOUT.len() {
        tb.wait_ready(i, Duration::from_secs(30))?;
    }
    Ok(tb)
}

fn reuse_on_vxlan_node(tb: &mut Testbed) -> Result<()> {
    reuse(tb, 0, 1, "v")
}

fn reuse_on_udp_node(tb: &mut Testbed) -> Result<()> {
    reuse(tb, 1, 2, "u")
}

/// Time until `to` answers a ping from `netns` (one ping every 50 ms), or `None` after 5 s.
fn time_to_reach(tb: &Testbed, netns: &str, to: Ipv4Addr) -> Result<Option<Duration>> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let out = tb.ns_output(netns, &["ping", "-c1", "-W", "0.05", &to.to_string()])?;
        if out.status.success() {
            return Ok(Some(started.elapsed()));
        }
    }
    Ok(None)
}

fn reuse(tb: &mut Testbed, node: usize, remote_node: usize, tag: &str) -> Result<()> {
    let list = tb.conflist(node, "1.1.0", &[]);
    let remote_list = tb.conflist(remote_node, "1.1.0", &[]);
    let victim = tb.add_pod(node, &format!("{tag}old"), &list, &json!({}))?;
    let beside = tb.add_pod(node, &format!("{tag}beside"), &list, &json!({}))?;
    let remote = tb.add_pod(
        remote_node,
        &format!("{tag}remote"),
        &remote_list,
        &json!({}),
    )?;
    let addr = tb.pods[victim].address.context("victim address")?;
    let from = [
        ("its node", tb.nodes[node].netns.clone()),
        ("a pod beside it", tb.pods[beside].netns.clone()),
        ("a remote pod", tb.pods[remote].netns.clone()),
    ];
    // Everyone talks to the old pod first, so each has its MAC cached.
    for (who, ns) in &from {
        if time_to_reach(tb, ns, addr)?.is_none() {
            bail!("{who} cannot reach the first pod at {addr} at all");
        }
    }
    let att = tb.pods[victim].attachment.clone();
    let cached = tb.pods[victim].result.clone();
    let failed = tb
        .runner(node)
        .del(&list, &att, cached.as_ref(), &json!({}))?;
    ensure!(failed.is_empty(), "DEL failed: {failed:?}");

    // Fill the node's space through the API until the allocator comes round to `addr`
    // (round-robin: the freed address is the last one handed out again).
    let socket = tb.nodes[node].socket.clone();
    let mut fillers = 0;
    loop {
        let held: Vec<String> = tb.allocations(node)?.into_iter().map(|a| a.1).collect();
        let free_is_addr = !held.iter().any(|a| a.starts_with(&format!("{addr}/")));
        ensure!(free_is_addr, "{addr} was handed out to a filler");
        let answer = agent_request(
            &socket,
            "POST",
            "/v1/allocations",
            Some(
                &json!({"network": "mesh", "container_id": format!("{tag}filler{fillers}"), "ifname": "eth0"}),
            ),
        )?;
        fillers += 1;
        let got = answer["address"].as_str().unwrap_or_default().to_string();
        if got.starts_with(&format!("{addr}/")) {
            // Give it back: the pod below must get it.
            agent_request(
                &socket,
                "DELETE",
                &format!(
                    "/v1/allocations/{tag}filler{}/eth0?network=mesh",
                    fillers - 1
                ),
                None,
            )?;
            break;
        }
        ensure!(fillers < 600, "the allocator never came back to {addr}");
    }
    let new = tb.add_pod(node, &format!("{tag}new"), &list, &json!({}))?;
    ensure!(
        tb.pods[new].address == Some(addr),
        "the new pod got {:?}, not the reused {addr}",
        tb.pods[new].address
    );
    let mut report = Vec::new();
    let mut slow = Vec::new();
    for (who, ns) in &from {
        match time_to_reach(tb, ns, addr)? {
            Some(t) => {
                report.push(format!("{who} {t:.0?}"));
                if t > TARGET {
                    slow.push(format!("{who} took {t:.1?}"));
                }
            }
            None => slow.push(format!("{who}: not reached in 5 s")),
        }
    }
    println!(
        "  {addr} reused after {fillers} fillers; reached from {}",
        report.join(", ")
    );
    ensure!(
        slow.is_empty(),
        "the reused address {addr} was not reachable within {TARGET:?}: {}",
        slow.join("; ")
    );
    // Give the fillers' space back for the next case.
    for f in 0..fillers - 1 {
        agent_request(
            &socket,
            "DELETE",
            &format!("/v1/allocations/{tag}filler{f}/eth0?network=mesh"),
            None,
        )?;
    }
    Ok(())
}
