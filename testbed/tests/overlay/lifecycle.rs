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

/// Pings 50 times a second from a pod on node 1 to a pod on node 2 while one of the two
/// agents is restarted — stopped politely (SIGTERM, a rolling update) or killed (kill -9,
/// an OOM kill) — then started again. On the kernel data plane the kernel keeps carrying
/// the traffic and the restarted agent adopts what it finds: not one ping may be lost. A
/// userspace node's device goes with its agent: there the gap is measured, reported and
/// held to `USERSPACE_RESTART_GAP_MS`.
pub(super) fn agent_restart_loses_no_ping(tb: &mut Testbed) -> Result<()> {
    let from = tb
        .pods
        .iter()
        .find(|p| p.node == 0)
        .context("no pod on node 1")?
        .netns
        .clone();
    let to = tb
        .pods
        .iter()
        .find(|p| p.node == 1)
        .and_then(|p| p.address)
        .context("no pod on node 2")?;
    let kernel_only = backend(0) == "vxlan" && backend(1) == "vxlan";
    for node in [0, 1] {
        for kill in [false, true] {
            let how = if kill { "kill -9" } else { "SIGTERM" };
            let ping = Pinger::start(&from, to)?;
            std::thread::sleep(Duration::from_millis(500));
            if kill {
                tb.kill_agent(node)?;
            } else {
                tb.stop_agent(node)?;
            }
            tb.start_agent(node)?;
            let ready = tb.wait_ready(node, Duration::from_secs(30));
            // Keep pinging a while after the restart: a late cut would show here.
            std::thread::sleep(Duration::from_secs(2));
            let text = ping.finish()?;
            ready.map_err(|e| anyhow!("node {}'s agent did not come back: {e}", node + 1))?;
            let (answered, lost, gap) =
                ping_loss(&text).with_context(|| format!("ping output: {text}"))?;
            println!(
                "  node {} {how}: {answered} pings answered, {lost} lost (longest gap {gap} ms)",
                node + 1
            );
            if kernel_only {
                ensure!(
                    lost == 0,
                    "the kernel data plane lost {lost} pings across a {how} restart of node {}'s agent",
                    node + 1
                );
            } else {
                ensure!(
                    gap <= USERSPACE_RESTART_GAP_MS,
                    "traffic through a userspace node stopped {gap} ms across a {how} restart (target: {USERSPACE_RESTART_GAP_MS} ms)"
                );
            }
        }
    }
    Ok(())
}

/// The longest a userspace node may drop traffic while its agent restarts (its TUN device
/// and forwarder go with the process; the restart itself takes about a second here).
const USERSPACE_RESTART_GAP_MS: u64 = 5000;

/// `ping -i 0.02` in a namespace, stopped (SIGINT) by `finish` — or killed when dropped, so
/// an early return leaves no ping behind.
struct Pinger(Option<std::process::Child>);

impl Pinger {
    fn start(netns: &str, to: Ipv4Addr) -> Result<Pinger> {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "ping", "-n", "-i", "0.02"])
            .arg(to.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("start ping")?;
        Ok(Pinger(Some(child)))
    }

    fn finish(mut self) -> Result<String> {
        let child = self.0.take().context("ping already finished")?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (answered, lost, longest gap in ms) from ping's per-reply lines, at 20 ms per ping. Lost
/// counts the sequence numbers missing between the first and the last answer: the echo
/// still in flight when ping was stopped is not a loss.
fn ping_loss(out: &str) -> Result<(u64, u64, u64)> {
    let mut seqs: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let (first, last) = match (seqs.first(), seqs.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => bail!("no ping was answered"),
    };
    let answered = seqs.len() as u64;
    let lost = (last - first + 1) - answered;
    let gap = seqs
        .windows(2)
        .map(|w| (w[1] - w[0]) * 20)
        .max()
        .unwrap_or(0);
    Ok((answered, lost, gap))
}
