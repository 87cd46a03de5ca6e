//! Cases about the data plane's life: repair, agent stop and restart, what `meshctl`
//! reports per peer, `--uninstall`, a node removed with `rmpeer`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_testbed::Testbed;

use super::{backend, device, routes, NODES};

pub(super) fn route_is_restored(tb: &mut Testbed) -> Result<()> {
    let before = routes(tb, 0)?;
    let victim = before.first().context("no routes on node 1")?.clone();
    let dst = victim
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    tb.ns(
        &tb.nodes[0].netns,
        &["ip", "route", "del", &dst, "dev", device(0)],
    )?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if routes(tb, 0)?.iter().any(|r| r.starts_with(&dst)) {
            println!("  {dst} restored after {:.1?}", started.elapsed());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("route {dst} not restored within 10 s")
}

pub(super) fn agent_stop_keeps_traffic(tb: &mut Testbed) -> Result<()> {
    tb.stop_agent(1)?;
    let result = (|| -> Result<()> {
        let on_node2 = tb
            .pods
            .iter()
            .filter(|p| p.node == 1)
            .map(|p| p.address.expect("addr"))
            .collect::<Vec<_>>();
        for p in tb.pods.iter().filter(|p| p.node != 1) {
            for ip in &on_node2 {
                ensure!(
                    tb.pings(&p.netns, *ip)?,
                    "{} cannot reach {ip} while node 2's agent is stopped",
                    p.name
                );
            }
        }
        Ok(())
    })();
    tb.start_agent(1)?;
    tb.wait_ready(1, Duration::from_secs(30))
        .map_err(|e| anyhow!("agent did not come back: {e}"))?;
    result
}

pub(super) fn uninstall_cleans_the_node(tb: &mut Testbed) -> Result<()> {
    let node = NODES - 1;
    tb.stop_agent(node)?;
    let ns = tb.nodes[node].netns.clone();
    let agent = tb.bin("mesh-agent").display().to_string();
    let out = tb.ns_output(&ns, &[&agent, "--uninstall"])?;
    ensure!(
        out.status.success(),
        "--uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for link in ["mesh-vxlan", "mesh-tun", "mesh0"] {
        let out = tb.ns_output(&ns, &["ip", "link", "show", link])?;
        ensure!(
            !out.status.success(),
            "{link} is still there after --uninstall"
        );
    }
    for table in ["nat", "filter"] {
        let rules = tb.ns(&ns, &["iptables", "-t", table, "-S"])?;
        let rules = String::from_utf8_lossy(&rules.stdout).to_string();
        ensure!(!rules.contains("MESH-"), "{table} rules left: {rules}");
    }
    let routes = tb.ns(&ns, &["ip", "route", "show", "proto", "109"])?;
    ensure!(
        routes.stdout.is_empty(),
        "routes left: {}",
        String::from_utf8_lossy(&routes.stdout)
    );
    Ok(())
}

/// Runs after `uninstall_cleans_the_node` (the last node's agent is stopped for good).
pub(super) fn rmpeer_removes_routes(tb: &mut Testbed) -> Result<()> {
    let gone = NODES - 1;
    let gone_ip = tb.nodes[gone].underlay_ip.to_string();
    let gone_name = tb.nodes[gone].name.clone();
    // Kernel routes name the next hop; a userspace node's routes only name its device.
    let kernel_nodes: Vec<usize> = (0..gone).filter(|i| backend(*i) == "vxlan").collect();
    for i in &kernel_nodes {
        ensure!(
            routes(tb, *i)?.iter().any(|r| r.contains(&gone_ip)),
            "node {} had no routes via {gone_ip} to begin with",
            i + 1
        );
    }
    let meshctl = tb.bin("meshctl").display().to_string();
    let socket = tb.nodes[0].socket.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    // rmpeer refuses while the peer still looks alive; a stopped agent says goodbye, so
    // this normally succeeds at once.
    loop {
        let out = tb.ns_output(
            &tb.nodes[0].netns,
            &[&meshctl, "--socket", &socket, "rmpeer", &gone_name],
        )?;
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "rmpeer {gone_name} kept failing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let left: Vec<String> = kernel_nodes
            .iter()
            .flat_map(|i| routes(tb, *i).unwrap_or_default())
            .filter(|r| r.contains(&gone_ip))
            .collect();
        if left.is_empty() {
            for &i in &kernel_nodes {
                for (what, args) in [
                    ("neighbour", ["ip", "neigh", "show", "dev", "mesh-vxlan"]),
                    ("FDB", ["bridge", "fdb", "show", "dev", "mesh-vxlan"]),
                ] {
                    let out = tb.ns(&tb.nodes[i].netns, &args)?;
                    ensure!(
                        !String::from_utf8_lossy(&out.stdout).contains(&gone_ip),
                        "node {} kept the {what} entry for {gone_ip}",
                        i + 1
                    );
                }
            }
            println!(
                "  routes via {gone_ip} gone from every node {:.1?} after rmpeer",
                started.elapsed()
            );
            // The reclaimed space is routed to its new owner: pods still reach each other.
            return matrix_without(tb, gone);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("routes via {gone_ip} still present 15 s after rmpeer")
}

pub(super) fn agent_restart_resumes_traffic(tb: &mut Testbed) -> Result<()> {
    tb.stop_agent(1)?;
    tb.start_agent(1)?;
    let started = Instant::now();
    tb.wait_ready(1, Duration::from_secs(30))
        .map_err(|e| anyhow!("agent did not come back: {e}"))?;
    let on_node2: Vec<Ipv4Addr> = tb
        .pods
        .iter()
        .filter(|p| p.node == 1)
        .map(|p| p.address.expect("addr"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in tb.pods.iter().filter(|p| p.node != 1) {
        for ip in &on_node2 {
            while !tb.pings(&p.netns, *ip)? {
                ensure!(
                    Instant::now() < deadline,
                    "{} cannot reach {ip} 20 s after node 2's agent restarted",
                    p.name
                );
            }
        }
    }
    println!(
        "  traffic through node 2 back {:.1?} after its agent started",
        started.elapsed()
    );
    Ok(())
}

pub(super) fn connections_name_the_data_plane(tb: &mut Testbed) -> Result<()> {
    let meshctl = tb.bin("meshctl").display().to_string();
    for i in 0..NODES {
        let socket = tb.nodes[i].socket.display().to_string();
        let out = tb.ns(
            &tb.nodes[i].netns,
            &[
                &meshctl,
                "--socket",
                &socket,
                "status",
                "connections",
                "-o",
                "json",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("meshctl status connections -o json on node {}", i + 1))?;
        let conns = v["connections"].as_array().context("connections")?;
        ensure!(!conns.is_empty(), "node {} lists no connections", i + 1);
        for c in conns {
            let peer = c["peer"].as_str().unwrap_or_default();
            let j = tb
                .nodes
                .iter()
                .position(|n| n.name == peer)
                .with_context(|| format!("unknown peer {peer}"))?;
            let want = if backend(i) == backend(j) {
                backend(i).to_string()
            } else {
                format!("{} (peer runs {})", backend(i), backend(j))
            };
            ensure!(
                c["dataplane"] == want.as_str(),
                "node {} says {} for {peer}, expected {want}",
                i + 1,
                c["dataplane"]
            );
        }
    }
    Ok(())
}

pub(super) fn matrix_without(tb: &Testbed, gone: usize) -> Result<()> {
    let pods: Vec<(String, Ipv4Addr)> = tb
        .pods
        .iter()
        .filter(|p| p.node != gone)
        .map(|p| (p.netns.clone(), p.address.expect("address")))
        .collect();
    for (a, _) in &pods {
        for (b, ip) in &pods {
            if a != b {
                ensure!(tb.pings(a, *ip)?, "{a} cannot reach {ip} after the reclaim");
            }
        }
    }
    Ok(())
}
