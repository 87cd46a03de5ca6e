//! The connectivity checks `mesh-testbed check` prints (and every chaos scenario reruns):
//! a ping matrix between every pod and node, pod source addresses preserved across nodes,
//! a kube-proxy-style ClusterIP DNAT to a pod on another node, and egress masquerade to a
//! host outside the cluster range. Each check prints one line; the result says whether all
//! passed.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{probe, Testbed};

/// The "external" host on the underlay (outside the cluster range).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 250);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 5353;

/// What kube-proxy (iptables mode) writes for a ClusterIP Service, reduced to one endpoint.
pub fn kube_proxy_rules(cluster_ip: Ipv4Addr, port: u16, endpoint: Ipv4Addr) -> String {
    format!(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-MESHTEST - [0:0]
:KUBE-SEP-MESHTEST - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d {cluster_ip}/32 -p udp -m udp --dport {port} -j KUBE-SVC-MESHTEST
-A KUBE-SVC-MESHTEST ! -s 10.32.0.0/12 -d {cluster_ip}/32 -p udp -m udp --dport {port} -j KUBE-MARK-MASQ
-A KUBE-SVC-MESHTEST -j KUBE-SEP-MESHTEST
-A KUBE-SEP-MESHTEST -p udp -m udp -j DNAT --to-destination {endpoint}:{port}
COMMIT
"
    )
}

/// Installs the kube-proxy-style rules in `netns` (replacing an earlier endpoint).
pub fn install_kube_proxy_rules(tb: &Testbed, netns: &str, endpoint: Ipv4Addr) -> Result<()> {
    let present = tb.ns(netns, &["iptables", "-t", "nat", "-S"])?;
    let text = String::from_utf8_lossy(&present.stdout).to_string();
    let rules = kube_proxy_rules(CLUSTER_IP, SERVICE_PORT, endpoint);
    // Declared chains are flushed by iptables-restore; the hooks into the built-in chains
    // are not, so they are left out once present.
    let rules: String = rules
        .lines()
        .filter(|l| {
            !(text.contains("-j KUBE-SERVICES") && l.starts_with("-A PREROUTING")
                || text.contains("-j KUBE-SERVICES") && l.starts_with("-A OUTPUT")
                || text.contains("-j KUBE-POSTROUTING") && l.starts_with("-A POSTROUTING"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .as_mut()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(
        child.wait()?.success(),
        "iptables-restore of the kube-proxy rules failed"
    );
    Ok(())
}

/// Indices of the nodes still in the testbed.
pub fn live_nodes(tb: &Testbed) -> Vec<usize> {
    (0..tb.nodes.len())
        .filter(|i| !tb.nodes[*i].removed)
        .collect()
}

/// Waits until every live node has a mesh route (through its tunnel device) to every pod
/// on the other live nodes — on the kernel device, a route *to the pod's own node*: right
/// after a node joins, the donor's older, wider route still covers the joiner's new block,
/// and accepting it let a check start before the joiner's route existed.
pub fn wait_for_routes(tb: &Testbed, within: Duration) -> Result<()> {
    let live = live_nodes(tb);
    let deadline = Instant::now() + within;
    loop {
        let mut missing = Vec::new();
        for i in &live {
            let node = &tb.nodes[*i];
            for p in tb.pods.iter().filter(|p| p.node != *i) {
                let Some(ip) = p.address else { continue };
                let out = tb.ns(&node.netns, &["ip", "route", "get", &ip.to_string()]);
                let text = out
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                let to_owner = format!("via {} dev mesh-vxlan", tb.nodes[p.node].underlay_ip);
                if !text.contains(&to_owner) && !text.contains("dev mesh-tun") {
                    missing.push(format!("{}->{}", node.name, p.name));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pod routes missing after {within:?}: {}",
            missing.join(" ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every pod has had an answer from every pod on another live node (one ping
/// per attempt, answered pairs are not asked again) and returns how long that took. After a
/// fault the kernel state can be complete while traffic is not through yet (seen: pods on old
/// nodes unanswered by a just-joined node's pods for several seconds under CPU load, with
/// every route, neighbour and FDB entry already in place), so checks that judge the steady
/// state wait for this first; a pair still silent at `within` is an error naming it.
pub fn wait_for_traffic(tb: &Testbed, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    let live = live_nodes(tb);
    let pods: Vec<(&str, &str, Ipv4Addr, usize)> = tb
        .pods
        .iter()
        .filter(|p| live.contains(&p.node))
        .filter_map(|p| Some((p.name.as_str(), p.netns.as_str(), p.address?, p.node)))
        .collect();
    let mut pending: Vec<(&str, &str, &str, Ipv4Addr)> = Vec::new();
    for (a, a_ns, _, a_node) in &pods {
        for (b, _, b_ip, b_node) in &pods {
            if a_node != b_node {
                pending.push((a, a_ns, b, *b_ip));
            }
        }
    }
    loop {
        let mut still = Vec::new();
        for (a, a_ns, b, ip) in pending {
            let answered = tb
                .ns_output(a_ns, &["ping", "-c", "1", "-W", "1", &ip.to_string()])
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !answered {
                still.push((a, a_ns, b, ip));
            }
        }
        if still.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            let names: Vec<String> = still
                .iter()
                .map(|(a, _, b, _)| format!("{a}->{b}"))
                .collect();
            bail!(
                "pods still unanswered after {within:?}: {}",
                names.join(" ")
            );
        }
        pending = still;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 2 when a ping is answered, 1 when only a second one is, 0 when neither (2 s each).
fn answered(tb: &Testbed, from_ns: &str, to: Ipv4Addr) -> Result<u32> {
    if tb.pings(from_ns, to)? {
        Ok(2)
    } else {
        Ok(u32::from(tb.pings(from_ns, to)?))
    }
}

fn seen(r: &Result<Ipv4Addr>) -> String {
    match r {
        Ok(ip) => format!("seen as {ip}"),
        Err(e) => format!("{e:#}"),
    }
}

/// What the kernel thinks of an unanswered pair: the sender's neighbour entry and route,
/// and, for a pod, its node's route to the destination and its bridge neighbour entry.
fn diagnose(
    tb: &Testbed,
    from: &str,
    from_ns: &str,
    to: &str,
    ip: Ipv4Addr,
    out: &mut dyn Write,
) -> Result<()> {
    let ip_text = ip.to_string();
    let show = |ns: &str, args: &[&str]| -> String {
        tb.ns_output(ns, args)
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .replace('\n', " | ");
                if text.is_empty() {
                    "(none)".to_string()
                } else {
                    text
                }
            })
            .unwrap_or_else(|e| e.to_string())
    };
    writeln!(out, "  why {from} -> {to} ({ip}) failed:")?;
    writeln!(
        out,
        "    {from} neigh: {}",
        show(from_ns, &["ip", "neigh", "show", "to", &ip_text])
    )?;
    writeln!(
        out,
        "    {from} route: {}",
        show(from_ns, &["ip", "route", "get", &ip_text])
    )?;
    if let Some(p) = tb.pods.iter().find(|p| p.netns == from_ns) {
        let node = &tb.nodes[p.node];
        writeln!(
            out,
            "    {} route: {}",
            node.name,
            show(
                &node.netns,
                &[
                    "ip",
                    "route",
                    "get",
                    &ip_text,
                    "iif",
                    "mesh0",
                    "from",
                    &p.address.map(|a| a.to_string()).unwrap_or_default()
                ]
            )
        )?;
        writeln!(
            out,
            "    {} neigh: {}",
            node.name,
            show(&node.netns, &["ip", "neigh", "show", "to", &ip_text])
        )?;
    }
    if let Some(p) = tb.pods.iter().find(|p| p.address == Some(ip)) {
        let node = &tb.nodes[p.node];
        let back = tb
            .pods
            .iter()
            .find(|q| q.netns == from_ns)
            .and_then(|q| q.address);
        if let Some(back) = back {
            writeln!(
                out,
                "    {} route back: {}",
                node.name,
                show(&node.netns, &["ip", "route", "get", &back.to_string()])
            )?;
        }
    }
    Ok(())
}

/// Runs every check, printing as it goes; true when all passed.
pub fn connectivity(tb: &mut Testbed, out: &mut dyn Write) -> Result<bool> {
    let mut failed = 0usize;
    let live = live_nodes(tb);
    // Endpoints: every pod, then every node (by its underlay address).
    let mut ends: Vec<(String, String, Ipv4Addr)> = tb
        .pods
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.netns.clone(), p.address?)))
        .collect();
    for i in &live {
        let n = &tb.nodes[*i];
        ends.push((n.name.clone(), n.netns.clone(), n.underlay_ip));
    }
    let width = ends.iter().map(|e| e.0.len()).max().unwrap_or(4).max(4) + 2;
    let mut lost_one = 0usize;
    let mut unanswered = Vec::new();
    writeln!(out, "ping matrix (row -> column):")?;
    write!(out, "{:width$}", "")?;
    for (name, ..) in &ends {
        write!(out, "{name:>width$}")?;
    }
    writeln!(out)?;
    for (from, from_ns, _) in &ends {
        write!(out, "{from:width$}")?;
        for (to, _, ip) in &ends {
            let cell = if from == to {
                "-"
            } else {
                match answered(tb, from_ns, *ip)? {
                    2 => "ok",
                    1 => {
                        lost_one += 1;
                        "ok*"
                    }
                    _ => {
                        failed += 1;
                        unanswered.push((from.clone(), from_ns.clone(), to.clone(), *ip));
                        "FAIL"
                    }
                }
            };
            write!(out, "{cell:>width$}")?;
        }
        writeln!(out)?;
        out.flush()?;
    }
    if lost_one > 0 {
        writeln!(
            out,
            "ok* = the first ping was lost, a second one answered ({lost_one} pair(s)); counted as reachable"
        )?;
    }
    for (from, from_ns, to, ip) in unanswered.iter().take(3) {
        diagnose(tb, from, from_ns, to, *ip, out)?;
    }
    let mut line = |ok: bool, what: String, out: &mut dyn Write| -> Result<()> {
        if !ok {
            failed += 1;
        }
        writeln!(out, "{} {what}", if ok { "  ok  " } else { "  FAIL" })?;
        out.flush()?;
        Ok(())
    };
    // Source addresses across nodes.
    let pods: Vec<(String, String, Ipv4Addr, usize)> = tb
        .pods
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.netns.clone(), p.address?, p.node)))
        .collect();
    let mut port = 20000;
    let mut kept = 0;
    let mut bad = Vec::new();
    for (a, a_ns, a_ip, a_node) in &pods {
        for (b, b_ns, b_ip, b_node) in &pods {
            if a_node == b_node {
                continue;
            }
            port += 1;
            match probe::udp_source(a_ns, b_ns, *b_ip, port) {
                Ok(seen) if seen == *a_ip => kept += 1,
                Ok(seen) => bad.push(format!("{a}->{b} seen as {seen}")),
                Err(e) => bad.push(format!("{a}->{b}: {e}")),
            }
        }
    }
    line(
        bad.is_empty(),
        format!(
            "pod source address kept across nodes ({kept} pairs){}",
            if bad.is_empty() {
                String::new()
            } else {
                format!(": {}", bad.join("; "))
            }
        ),
        out,
    )?;
    // ClusterIP DNAT on the first live node to a pod on another node.
    let client = pods.iter().find(|p| Some(&p.3) == live.first());
    let server = pods.iter().find(|p| Some(&p.3) != live.first());
    match (client, server) {
        (Some((c, c_ns, c_ip, c_node)), Some((s, s_ns, s_ip, _))) => {
            let node_ns = tb.nodes[*c_node].netns.clone();
            install_kube_proxy_rules(tb, &node_ns, *s_ip)?;
            let r = probe::udp_source(c_ns, s_ns, CLUSTER_IP, SERVICE_PORT);
            let ok = matches!(&r, Ok(ip) if ip == c_ip);
            line(
                ok,
                format!("ClusterIP {CLUSTER_IP}:{SERVICE_PORT} from {c} reaches {s} with the client's address ({})", seen(&r)),
                out,
            )?;
            let gateway = tb.gateway(*c_node)?;
            let r = probe::udp_source(&node_ns, s_ns, CLUSTER_IP, SERVICE_PORT);
            let ok = matches!(&r, Ok(ip) if *ip == gateway);
            line(
                ok,
                format!("ClusterIP from node {} reaches {s}, masqueraded once to its gateway {gateway} ({})", tb.nodes[*c_node].name, seen(&r)),
                out,
            )?;
        }
        _ => writeln!(out, "  skip ClusterIP DNAT: needs pods on two nodes")?,
    }
    // Egress masquerade to a host outside the cluster range.
    let ext = format!("{}-ext", tb.prefix);
    if !tb.leftover_namespaces().contains(&ext) {
        tb.add_external("ext", EXTERNAL_IP)?;
    }
    let one_per_node = live.iter().filter_map(|n| pods.iter().find(|p| p.3 == *n));
    for (p, p_ns, _, node) in one_per_node {
        let node_ip = tb.nodes[*node].underlay_ip;
        port += 1;
        let r = probe::udp_source(p_ns, &ext, EXTERNAL_IP, port);
        let ok = matches!(&r, Ok(ip) if *ip == node_ip);
        line(
            ok,
            format!(
                "egress from {p} to {EXTERNAL_IP} is masqueraded to its node {node_ip} ({})",
                seen(&r)
            ),
            out,
        )?;
    }
    writeln!(
        out,
        "{}",
        if failed == 0 {
            "all checks passed".to_string()
        } else {
            format!("{failed} check(s) FAILED")
        }
    )?;
    Ok(failed == 0)
}
