//! Cases about what crosses the data plane: reachability without NAT, bulk TCP, the
//! forwarder's counters, VXLAN on the wire, egress masquerade, ClusterIP DNAT, MTU.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_testbed::{probe, Testbed};

use super::{backend, NODES, PODS_PER_NODE};

pub(super) fn full_matrix(tb: &mut Testbed) -> Result<()> {
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

pub(super) fn bulk_tcp_between_nodes(tb: &mut Testbed) -> Result<()> {
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
pub(super) fn forwarder_metrics(tb: &mut Testbed) -> Result<()> {
    for i in 0..NODES {
        let m = probe::metrics(&tb.nodes[i].netns)?;
        let get = |name: &str| {
            m.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| *v)
                .sum::<f64>()
        };
        let tx = get("mesh_forwarder_packets_total{direction=\"tx\"}");
        let rx = get("mesh_forwarder_packets_total{direction=\"rx\"}");
        if backend(i) != "udp" {
            // The kernel forwards for a vxlan node: no userspace counter may move.
            ensure!(
                tx == 0.0 && rx == 0.0,
                "node {} runs vxlan but its userspace forwarder counted tx {tx}, rx {rx}",
                i + 1
            );
            continue;
        }
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

pub(super) fn underlay_is_vxlan(tb: &mut Testbed) -> Result<()> {
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

pub(super) fn egress_masquerade(tb: &mut Testbed) -> Result<()> {
    let ext_ip = Ipv4Addr::new(192, 168, 77, 250);
    let ext = tb.external_host("ext", ext_ip)?;
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

pub(super) fn cluster_ip_dnat(tb: &mut Testbed) -> Result<()> {
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
    // The library's rules use this ClusterIP and port.
    mesh_testbed::checks::install_kube_proxy_rules(tb, &node_ns, server_ip)?;
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

pub(super) fn full_size_packet(tb: &mut Testbed) -> Result<()> {
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
