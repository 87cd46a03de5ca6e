//! The data plane end to end, shared by the `vxlan`, `udp` and mixed suites (root; skips
//! loudly without it, fails under MESH_E2E=1): 3 node namespaces on one underlay bridge,
//! each with a real mesh-agent on the backend its layout names, 2 pods per node attached
//! through the real mesh-cni. Cases that only make sense for one backend (the kernel keeps
//! forwarding while its agent is stopped) are picked by the layout of the node they touch.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_testbed::{probe, suite, AgentOptions, Testbed};
use serde_json::json;

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;

/// The backend of each node (`vxlan` or `udp`), set once by the suite's `main`.
static LAYOUT: OnceLock<[&'static str; NODES]> = OnceLock::new();

fn backend(i: usize) -> &'static str {
    LAYOUT.get().map_or("vxlan", |l| l[i])
}

/// The device our routes use on node `i`.
fn device(i: usize) -> &'static str {
    match backend(i) {
        "udp" => "mesh-tun",
        _ => "mesh-vxlan",
    }
}

pub fn run(suite: &str, tag: &'static str, layout: [&'static str; NODES]) {
    let _ = LAYOUT.set(layout);
    let _ = TAG.set(tag);
    // The kernel keeps forwarding while node 2's agent is down; a userspace node cannot
    // (its device goes with the agent), so there the case is that traffic resumes.
    let restart: (&str, suite::Case) = if layout[1] == "vxlan" {
        (
            "a stopped agent does not stop traffic through its node",
            agent_stop_keeps_traffic,
        )
    } else {
        (
            "traffic through a userspace node resumes after its agent restarts",
            agent_restart_resumes_traffic,
        )
    };
    let cases: Vec<(&str, suite::Case)> = CASES
        .iter()
        .copied()
        .map(|c| if c.0 == RESTART { restart } else { c })
        .collect();
    suite::run(suite, setup, &cases);
}

static TAG: OnceLock<&'static str> = OnceLock::new();
const RESTART: &str = "(agent restart case, picked by layout)";

const CASES: &[(&str, suite::Case)] = &[
    (
        "every pod reaches every pod and every node, no NAT",
        full_matrix,
    ),
    (
        "bulk TCP crosses intact between every pair of nodes",
        bulk_tcp_between_nodes,
    ),
    (
        "userspace nodes count their traffic, batched, with nothing dropped",
        forwarder_metrics,
    ),
    ("the underlay carries VXLAN with our VNI", underlay_is_vxlan),
    ("a route deleted by hand comes back", route_is_restored),
    (
        "egress is masqueraded, pod to node is not",
        egress_masquerade,
    ),
    (
        "a kube-proxy style ClusterIP DNAT to a remote pod works",
        cluster_ip_dnat,
    ),
    (
        "a full-size packet crosses without fragmentation",
        full_size_packet,
    ),
    (RESTART, agent_stop_keeps_traffic),
    (
        "meshctl status connections names each peer's data plane",
        connections_name_the_data_plane,
    ),
    (
        "--uninstall removes chains, devices and routes",
        uninstall_cleans_the_node,
    ),
    (
        "a removed node's routes go once rmpeer reclaims its blocks",
        rmpeer_removes_routes,
    ),
];

fn setup() -> Result<Testbed> {
    let mut tb = Testbed::new(TAG.get().copied().unwrap_or("ov"))?;
    let peers: Vec<String> = (1..=NODES).map(|i| format!("192.168.77.{i}")).collect();
    for i in 0..NODES {
        tb.add_node(&AgentOptions {
            ipalloc_init: Some(format!("consensus={NODES}")),
            dataplane: backend(i).into(),
            extra: vec!["--peers".into(), peers.join(",")],
        })?;
    }
    for i in 0..NODES {
        tb.start_agent(i)?;
    }
    for i in 0..NODES {
        tb.wait_ready(i, Duration::from_secs(30))?;
    }
    for n in 0..NODES {
        let list = tb.conflist(n, "1.1.0", &[]);
        for p in 0..PODS_PER_NODE {
            tb.add_pod(n, &format!("n{}p{}", n + 1, p + 1), &list, &json!({}))?;
        }
    }
    // Routes follow the gossip of blocks and endpoints: wait until each node routes every
    // other node's blocks.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts: Vec<usize> = (0..NODES)
            .map(|i| routes(&tb, i).map(|r| r.len()).unwrap_or(0))
            .collect();
        if counts.iter().all(|c| *c >= NODES - 1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("pod routes never appeared on every node: {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(tb)
}

/// Our routes on node `i` (`ip route show dev <device> proto 109`).
fn routes(tb: &Testbed, i: usize) -> Result<Vec<String>> {
    let out = tb.ns(
        &tb.nodes[i].netns,
        &["ip", "route", "show", "dev", device(i), "proto", "109"],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn full_matrix(tb: &mut Testbed) -> Result<()> {
    let pods: Vec<(String, Ipv4Addr, usize)> = tb
        .pods
        .iter()
        .map(|p| (p.netns.clone(), p.address.expect("address"), p.node))
        .collect();
    let mut port = 18000;
    for (a_ns, a_ip, a_node) in &pods {
        for (b_ns, b_ip, b_node) in &pods {
            if a_ns == b_ns {
                continue;
            }
            ensure!(
                tb.pings(a_ns, *b_ip)?,
                "{a_ns} ({a_ip}, node {a_node}) cannot ping {b_ip} (node {b_node})"
            );
            port += 1;
            let seen = probe::udp_source(a_ns, b_ns, *b_ip, port).with_context(|| {
                format!("UDP from {a_ns} ({a_ip}, node {a_node}) to {b_ip} (node {b_node})")
            })?;
            ensure!(
                seen == *a_ip,
                "{b_ns} saw {seen} as the source of {a_ip}: NAT?"
            );
        }
        for n in &tb.nodes {
            ensure!(
                tb.pings(a_ns, n.underlay_ip)?,
                "{a_ns} cannot ping node {}",
                n.name
            );
            ensure!(
                tb.pings(&n.netns, *a_ip)?,
                "node {} cannot ping {a_ip}",
                n.name
            );
        }
    }
    Ok(())
}

fn bulk_tcp_between_nodes(tb: &mut Testbed) -> Result<()> {
    let first: Vec<(String, Ipv4Addr)> = (0..NODES)
        .map(|n| {
            let p = tb
                .pods
                .iter()
                .find(|p| p.node == n)
                .expect("a pod per node");
            (p.netns.clone(), p.address.expect("address"))
        })
        .collect();
    let mut port = 18500;
    for (a, (a_ns, _)) in first.iter().enumerate() {
        for (b, (b_ns, b_ip)) in first.iter().enumerate() {
            if a == b {
                continue;
            }
            port += 1;
            let gbps =
                probe::tcp_transfer(a_ns, b_ns, *b_ip, port, 64 << 20).with_context(|| {
                    format!(
                        "64 MiB over TCP from node {} ({}) to node {} ({})",
                        a + 1,
                        backend(a),
                        b + 1,
                        backend(b)
                    )
                })?;
            println!(
                "  node {} ({}) -> node {} ({}): 64 MiB intact, {gbps:.1} Gbit/s",
                a + 1,
                backend(a),
                b + 1,
                backend(b)
            );
        }
    }
    Ok(())
}

/// Runs after the bulk transfers: every `udp` node has moved packets both ways, in far
/// fewer sendmsg calls than packets (UDP GSO), and dropped nothing as foreign or
/// malformed.
fn forwarder_metrics(tb: &mut Testbed) -> Result<()> {
    for i in (0..NODES).filter(|i| backend(*i) == "udp") {
        let m = probe::metrics(&tb.nodes[i].netns)?;
        let get = |name: &str| {
            m.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| *v)
                .sum::<f64>()
        };
        let tx = get("mesh_forwarder_packets_total{direction=\"tx\"}");
        let rx = get("mesh_forwarder_packets_total{direction=\"rx\"}");
        let sends = get("mesh_forwarder_sends_total");
        let foreign = get("mesh_forwarder_dropped_total{reason=\"foreign\"}");
        let malformed = get("mesh_forwarder_dropped_total{reason=\"malformed\"}");
        let errors = get("mesh_forwarder_errors_total");
        println!(
            "  node {}: tx {tx} packets in {sends} sends ({:.1} per send), rx {rx}, errors {errors}",
            i + 1,
            tx / sends.max(1.0)
        );
        ensure!(
            tx > 10_000.0 && rx > 10_000.0,
            "node {} forwarded too little: tx {tx}, rx {rx}",
            i + 1
        );
        ensure!(
            sends * 4.0 < tx,
            "node {}: {sends} sends for {tx} packets: no GSO batching",
            i + 1
        );
        ensure!(
            foreign == 0.0 && malformed == 0.0 && errors == 0.0,
            "node {}: dropped foreign {foreign}, malformed {malformed}, errors {errors}",
            i + 1
        );
    }
    Ok(())
}

fn underlay_is_vxlan(tb: &mut Testbed) -> Result<()> {
    let (a, b) = (
        tb.pods[0].netns.clone(),
        tb.pods[PODS_PER_NODE].address.context("addr")?,
    );
    let mut cap = Command::new("ip")
        .args([
            "netns",
            "exec",
            &tb.underlay,
            "tcpdump",
            "-n",
            "-v",
            "-l",
            "-T",
            "vxlan",
            "-c",
            "2",
            "-i",
            "ul0",
            "udp",
            "port",
            "8472",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("tcpdump (apt-get install tcpdump)")?;
    // Ping only once tcpdump says it is listening (under load it can take a while).
    let mut err = std::io::BufReader::new(cap.stderr.take().context("tcpdump stderr")?);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut err, &mut first)?;
    ensure!(
        first.contains("listening"),
        "tcpdump did not start: {first}"
    );
    for _ in 0..3 {
        tb.pings(&a, b)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && cap.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = cap.kill();
    let out = cap.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("VXLAN") && text.contains("vni 6783"),
        "the capture did not decode as VXLAN vni 6783:\n{text}"
    );
    ensure!(
        text.contains(&b.to_string()),
        "inner packet to {b} not seen:\n{text}"
    );
    Ok(())
}

fn route_is_restored(tb: &mut Testbed) -> Result<()> {
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

fn agent_stop_keeps_traffic(tb: &mut Testbed) -> Result<()> {
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

fn egress_masquerade(tb: &mut Testbed) -> Result<()> {
    let ext_ip = Ipv4Addr::new(192, 168, 77, 250);
    let ext = match tb
        .leftover_namespaces()
        .into_iter()
        .find(|n| n.ends_with("-ext"))
    {
        Some(ns) => ns,
        None => tb.add_external("ext", ext_ip)?,
    };
    let pod = &tb.pods[0];
    let (pod_ns, pod_ip, node) = (pod.netns.clone(), pod.address.context("addr")?, pod.node);
    let node_ip = tb.nodes[node].underlay_ip;
    let seen = probe::udp_source(&pod_ns, &ext, ext_ip, 19001)?;
    if seen != node_ip {
        let nat = tb.ns(&tb.nodes[node].netns, &["iptables", "-t", "nat", "-S"])?;
        bail!(
            "the external host saw {seen}, expected the node address {node_ip}; nat table:\n{}",
            String::from_utf8_lossy(&nat.stdout)
        );
    }
    let other = (node + 1) % NODES;
    let seen = probe::udp_source(
        &pod_ns,
        &tb.nodes[other].netns,
        tb.nodes[other].underlay_ip,
        19002,
    )?;
    ensure!(
        seen == pod_ip,
        "node {} saw {seen} from pod {pod_ip}: pod-to-node must not be NATed",
        other + 1
    );
    Ok(())
}

fn cluster_ip_dnat(tb: &mut Testbed) -> Result<()> {
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let port = 5353;
    let client = tb
        .pods
        .iter()
        .find(|p| p.node == 0)
        .context("pod on node 1")?;
    let server = tb
        .pods
        .iter()
        .find(|p| p.node == 1)
        .context("pod on node 2")?;
    let (client_ns, client_ip) = (client.netns.clone(), client.address.context("addr")?);
    let (server_ns, server_ip) = (server.netns.clone(), server.address.context("addr")?);
    let node_ns = tb.nodes[0].netns.clone();
    let rules = mesh_testbed::checks::kube_proxy_rules(cluster_ip, port, server_ip);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node_ns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
    ensure!(
        child.wait()?.success(),
        "iptables-restore of the kube-proxy rules failed"
    );
    // Pod -> ClusterIP: DNATed to the remote pod, source kept (traffic from the cluster
    // range is not marked for masquerade).
    let seen = probe::udp_source(&client_ns, &server_ns, cluster_ip, port)?;
    ensure!(
        seen == client_ip,
        "the endpoint saw {seen}, expected the client pod {client_ip}"
    );
    // Node -> ClusterIP: marked and masqueraded by kube-proxy's rule (once: ours steps
    // aside for marked packets), and the reply finds its way back.
    let seen = probe::udp_source(&node_ns, &server_ns, cluster_ip, port)?;
    let gateway = tb.gateway(0)?;
    ensure!(
        seen == gateway,
        "the endpoint saw {seen} from the node, expected its gateway {gateway}"
    );
    Ok(())
}

fn full_size_packet(tb: &mut Testbed) -> Result<()> {
    let a = &tb.pods[0];
    let b = tb
        .pods
        .iter()
        .find(|p| p.node != a.node)
        .context("remote pod")?;
    let mtu = a
        .result
        .as_ref()
        .and_then(|r| r["interfaces"][2]["mtu"].as_u64())
        .context("pod MTU in the CNI result")?;
    ensure!(mtu == 1450, "pod MTU {mtu}, expected underlay 1500 - 50");
    let size = (mtu - 28).to_string();
    let out = tb.ns_output(
        &a.netns,
        &[
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size,
            &b.address.context("addr")?.to_string(),
        ],
    )?;
    ensure!(
        out.status.success(),
        "a {mtu}-byte packet with DF did not cross: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn uninstall_cleans_the_node(tb: &mut Testbed) -> Result<()> {
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
fn rmpeer_removes_routes(tb: &mut Testbed) -> Result<()> {
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

fn agent_restart_resumes_traffic(tb: &mut Testbed) -> Result<()> {
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

fn connections_name_the_data_plane(tb: &mut Testbed) -> Result<()> {
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

fn matrix_without(tb: &Testbed, gone: usize) -> Result<()> {
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
