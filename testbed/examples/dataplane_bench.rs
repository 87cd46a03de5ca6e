//! Pod-to-pod throughput and latency, one run, same machine, same namespace shape
//! (pod -veth- bridge in node ns -veth- underlay bridge -veth- node ns - bridge -veth- pod):
//!
//! - `direct`: plain routes between the nodes (no tunnel): the limit;
//! - `kernel-vxlan-by-hand`: Flannel's layout programmed with `ip` (VNI 1, nolearning,
//!   /32 on the device, static neighbour + FDB, onlink route), MTU 1450;
//! - `mesh-vxlan`: two real mesh-agents (`--dataplane vxlan`), pods via mesh-cni.
//!
//! Variants are interleaved per iteration. iperf3 TCP with 1 and 4 streams, ping RTT.
//!
//!   sudo scripts/bench-dataplane.sh [ITERATIONS] [SECONDS]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_testbed::bed::run;
use mesh_testbed::{privns, AgentOptions, Testbed};
use serde_json::{json, Value};

struct Path {
    name: &'static str,
    client_ns: String,
    server_ns: String,
    server_ip: String,
}

fn ns(tb: &Testbed, netns: &str, args: &[&str]) -> Result<std::process::Output> {
    tb.ns(netns, args)
}

/// A node namespace on the underlay with a bridge and one pod behind it.
fn manual_node(
    tb: &Testbed,
    tag: &str,
    ul_ip: &str,
    pod_net: &str,
    mtu: u32,
) -> Result<(String, String, String)> {
    let node = format!("{}-{tag}", tb.prefix);
    let pod = format!("{}-{tag}p", tb.prefix);
    let ul_end = format!("{}{tag}", tb.prefix);
    run("ip", &["netns", "add", &node])?;
    run("ip", &["netns", "add", &pod])?;
    for n in [&node, &pod] {
        ns(tb, n, &["ip", "link", "set", "lo", "up"])?;
    }
    ns(
        tb,
        &tb.underlay,
        &[
            "ip", "link", "add", &ul_end, "type", "veth", "peer", "name", "eth0", "netns", &node,
        ],
    )?;
    ns(
        tb,
        &tb.underlay,
        &["ip", "link", "set", &ul_end, "master", "ul0", "up"],
    )?;
    ns(
        tb,
        &node,
        &["ip", "addr", "add", &format!("{ul_ip}/24"), "dev", "eth0"],
    )?;
    ns(tb, &node, &["ip", "link", "set", "eth0", "up"])?;
    ns(tb, &node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    ns(tb, &node, &["ip", "link", "add", "br0", "type", "bridge"])?;
    ns(
        tb,
        &node,
        &[
            "ip",
            "addr",
            "add",
            &format!("{pod_net}.1/24"),
            "dev",
            "br0",
        ],
    )?;
    ns(
        tb,
        &node,
        &["ip", "link", "set", "br0", "mtu", &mtu.to_string(), "up"],
    )?;
    ns(
        tb,
        &node,
        &[
            "ip",
            "link",
            "add",
            "vpod",
            "mtu",
            &mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu.to_string(),
            "netns",
            &pod,
        ],
    )?;
    ns(
        tb,
        &node,
        &["ip", "link", "set", "vpod", "master", "br0", "up"],
    )?;
    ns(
        tb,
        &pod,
        &[
            "ip",
            "addr",
            "add",
            &format!("{pod_net}.2/24"),
            "dev",
            "eth0",
        ],
    )?;
    ns(tb, &pod, &["ip", "link", "set", "eth0", "up"])?;
    ns(
        tb,
        &pod,
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{pod_net}.1"),
        ],
    )?;
    Ok((node, pod, format!("{pod_net}.2")))
}

fn hand_vxlan(tb: &Testbed, node: &str, local: &str, mac: &str, own_net: &str) -> Result<()> {
    ns(
        tb,
        node,
        &[
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    )?;
    ns(
        tb,
        node,
        &[
            "ip", "link", "set", "vx0", "address", mac, "mtu", "1450", "up",
        ],
    )?;
    ns(
        tb,
        node,
        &[
            "ip",
            "addr",
            "add",
            &format!("{own_net}.0/32"),
            "dev",
            "vx0",
        ],
    )?;
    Ok(())
}

fn hand_vxlan_peer(
    tb: &Testbed,
    node: &str,
    peer_ul: &str,
    peer_mac: &str,
    peer_net: &str,
) -> Result<()> {
    ns(
        tb,
        node,
        &[
            "ip",
            "neigh",
            "add",
            &format!("{peer_net}.0"),
            "lladdr",
            peer_mac,
            "dev",
            "vx0",
            "nud",
            "permanent",
        ],
    )?;
    ns(
        tb,
        node,
        &[
            "bridge",
            "fdb",
            "append",
            peer_mac,
            "dev",
            "vx0",
            "dst",
            peer_ul,
            "self",
            "permanent",
        ],
    )?;
    ns(
        tb,
        node,
        &[
            "ip",
            "route",
            "add",
            &format!("{peer_net}.0/24"),
            "via",
            &format!("{peer_net}.0"),
            "dev",
            "vx0",
            "onlink",
        ],
    )?;
    Ok(())
}

fn iperf(tb: &Testbed, p: &Path, streams: u32, secs: u32) -> Result<f64> {
    let out = ns(
        tb,
        &p.client_ns,
        &[
            "iperf3",
            "-c",
            &p.server_ip,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no throughput in iperf3 output")
}

fn ping_us(tb: &Testbed, p: &Path) -> Result<f64> {
    let out = ns(
        tb,
        &p.client_ns,
        &["ping", "-c", "30", "-i", "0.02", "-q", &p.server_ip],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.030/0.045/0.090/0.010 ms
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no ping summary")?;
    Ok(avg * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let secs: u32 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    privns::enter_private_mounts()?;
    let mut tb = Testbed::new("db")?;
    // mesh-vxlan: two agents, one pod each; a second pair without masquerade rules (so
    // without connection tracking), like Flannel without --ip-masq.
    let pairs = [
        ("true", "192.168.77.1,192.168.77.2"),
        ("false", "192.168.77.3,192.168.77.4"),
    ];
    for (masq, peers) in pairs {
        for _ in 0..2 {
            tb.add_node(&AgentOptions {
                ipalloc_init: Some("consensus=2".into()),
                dataplane: "vxlan".into(),
                extra: vec![
                    "--peers".into(),
                    peers.into(),
                    "--masquerade".into(),
                    masq.into(),
                ],
            })?;
        }
    }
    for i in 0..4 {
        tb.start_agent(i)?;
    }
    for i in 0..4 {
        tb.wait_ready(i, Duration::from_secs(30))?;
    }
    for i in 0..4 {
        let list = tb.conflist(i, "1.1.0", &[]);
        tb.add_pod(i, &format!("m{i}"), &list, &json!({}))?;
    }
    // direct and by-hand VXLAN pairs on the same underlay bridge.
    let (da, dpa, _) = manual_node(&tb, "da", "192.168.77.11", "10.201.1", 1500)?;
    let (db, dpb, dip) = manual_node(&tb, "db", "192.168.77.12", "10.201.2", 1500)?;
    ns(
        &tb,
        &da,
        &[
            "ip",
            "route",
            "add",
            "10.201.2.0/24",
            "via",
            "192.168.77.12",
        ],
    )?;
    ns(
        &tb,
        &db,
        &[
            "ip",
            "route",
            "add",
            "10.201.1.0/24",
            "via",
            "192.168.77.11",
        ],
    )?;
    let (va, vpa, _) = manual_node(&tb, "va", "192.168.77.21", "10.202.1", 1450)?;
    let (vb, vpb, vip) = manual_node(&tb, "vb", "192.168.77.22", "10.202.2", 1450)?;
    hand_vxlan(&tb, &va, "192.168.77.21", "0a:58:0a:ca:01:00", "10.202.1")?;
    hand_vxlan(&tb, &vb, "192.168.77.22", "0a:58:0a:ca:02:00", "10.202.2")?;
    hand_vxlan_peer(&tb, &va, "192.168.77.22", "0a:58:0a:ca:02:00", "10.202.2")?;
    hand_vxlan_peer(&tb, &vb, "192.168.77.21", "0a:58:0a:ca:01:00", "10.202.1")?;
    let paths = vec![
        Path {
            name: "direct",
            client_ns: dpa,
            server_ns: dpb,
            server_ip: dip,
        },
        Path {
            name: "kernel-vxlan-by-hand",
            client_ns: vpa,
            server_ns: vpb,
            server_ip: vip,
        },
        Path {
            name: "mesh-vxlan",
            client_ns: tb.pods[0].netns.clone(),
            server_ns: tb.pods[1].netns.clone(),
            server_ip: tb.pods[1].address.context("mesh pod address")?.to_string(),
        },
        Path {
            name: "mesh-vxlan (no masq)",
            client_ns: tb.pods[2].netns.clone(),
            server_ns: tb.pods[3].netns.clone(),
            server_ip: tb.pods[3].address.context("mesh pod address")?.to_string(),
        },
    ];
    // Wait until the mesh routes are in, then start the servers.
    for p in &paths {
        let mut ok = false;
        for _ in 0..100 {
            if tb
                .ns_output(&p.client_ns, &["ping", "-c", "1", "-W", "1", &p.server_ip])?
                .status
                .success()
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !ok {
            bail!("{}: {} unreachable", p.name, p.server_ip);
        }
        ns(
            &tb,
            &p.server_ns,
            &[
                "iperf3",
                "-s",
                "-D",
                "--pidfile",
                &tb.work
                    .join(format!("{}.pid", p.name.replace([' ', '(', ')'], "")))
                    .display()
                    .to_string(),
            ],
        )?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        paths.iter().map(|_| Default::default()).collect();
    for it in 0..iterations {
        for (i, p) in paths.iter().enumerate() {
            let one = iperf(&tb, p, 1, secs)?;
            let four = iperf(&tb, p, 4, secs)?;
            let rtt = ping_us(&tb, p)?;
            eprintln!("iteration {} {:<22} 1 stream {one:6.2} Gbit/s  4 streams {four:6.2} Gbit/s  ping {rtt:6.0} us", it + 1, p.name);
            results[i].0.push(one);
            results[i].1.push(four);
            results[i].2.push(rtt);
        }
    }
    let med: Vec<(f64, f64, f64)> = results
        .into_iter()
        .map(|(a, b, c)| (median(a), median(b), median(c)))
        .collect();
    let (d1, d4, _) = med[0];
    let (h1, h4, _) = med[1];
    println!("\n| path | TCP 1 stream Gbit/s | x direct | x by-hand VXLAN | TCP 4 streams Gbit/s | x direct | x by-hand VXLAN | ping avg us |");
    println!("|---|---|---|---|---|---|---|---|");
    for (p, (one, four, rtt)) in paths.iter().zip(&med) {
        println!(
            "| {} | {one:.2} | {:.2} | {:.2} | {four:.2} | {:.2} | {:.2} | {rtt:.0} |",
            p.name,
            one / d1,
            one / h1,
            four / d4,
            four / h4
        );
    }
    println!("\n({iterations} iterations x {secs} s, medians; variants interleaved)");
    for p in &paths {
        let pidfile = tb
            .work
            .join(format!("{}.pid", p.name.replace([' ', '(', ')'], "")));
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
    tb.down();
    Ok(())
}
