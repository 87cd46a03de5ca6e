//! Pod-to-pod throughput and latency, one run, same machine, same namespace shape
//! (pod -veth- bridge in node ns -veth- underlay bridge -veth- node ns - bridge -veth- pod):
//!
//! - `direct`: plain routes between the nodes (no tunnel): the limit;
//! - `kernel-vxlan-by-hand`: Flannel's layout programmed with `ip` (VNI 1, nolearning,
//!   /32 on the device, static neighbour + FDB, onlink route), MTU 1450;
//! - `kernel-vxlan-by-hand + masq`: the same plus Flannel's `--ip-masq` MASQUERADE rule
//!   (like for like with mesh's default egress rules);
//! - `mesh-vxlan`: two real mesh-agents (`--dataplane vxlan`), pods via mesh-cni, with
//!   and without the masquerade rules;
//! - `mesh-udp`: the same with the userspace backend (`--dataplane udp`);
//! - `naive-tun-forwarder`: `naive_forwarder` (one syscall per packet, IP in UDP, MTU
//!   1472), the baseline the udp backend must beat by 3x.
//!
//! Variants are interleaved per iteration. iperf3 TCP with 1 and 4 streams, ping RTT, and
//! for userspace paths the CPU the forwarding processes used (both nodes, % of one core).
//!
//!   sudo scripts/bench-dataplane.sh [ITERATIONS] [SECONDS]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_testbed::bed::run;
use mesh_testbed::measure::{self, median, with_cpu};
use mesh_testbed::{privns, AgentOptions, Testbed};
use serde_json::json;

struct Path {
    name: &'static str,
    /// Userspace forwarding processes whose CPU time is reported.
    procs: Vec<u32>,
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
    measure::iperf(tb, &p.client_ns, &p.server_ip, streams, secs)
}

fn ping_us(tb: &Testbed, p: &Path) -> Result<f64> {
    measure::ping_us(tb, &p.client_ns, &p.server_ip)
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
        ("vxlan", "true", "192.168.77.1,192.168.77.2"),
        ("vxlan", "false", "192.168.77.3,192.168.77.4"),
        ("udp", "true", "192.168.77.5,192.168.77.6"),
        ("udp", "false", "192.168.77.7,192.168.77.8"),
    ];
    for (dataplane, masq, peers) in pairs {
        for _ in 0..2 {
            tb.add_node(&AgentOptions {
                ipalloc_init: Some("consensus=2".into()),
                dataplane: dataplane.into(),
                extra: vec![
                    "--peers".into(),
                    peers.into(),
                    "--masquerade".into(),
                    masq.into(),
                ],
            })?;
        }
    }
    let agents = tb.nodes.len();
    for i in 0..agents {
        tb.start_agent(i)?;
    }
    for i in 0..agents {
        tb.wait_ready(i, Duration::from_secs(30))?;
    }
    for i in 0..agents {
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
    // The same by hand plus Flannel's --ip-masq rule: like for like with mesh's default
    // (any nat rule turns on connection tracking for every packet of the namespace).
    let (ma, mpa, _) = manual_node(&tb, "ma", "192.168.77.23", "10.204.1", 1450)?;
    let (mb, mpb, mip) = manual_node(&tb, "mb", "192.168.77.24", "10.204.2", 1450)?;
    hand_vxlan(&tb, &ma, "192.168.77.23", "0a:58:0a:cc:01:00", "10.204.1")?;
    hand_vxlan(&tb, &mb, "192.168.77.24", "0a:58:0a:cc:02:00", "10.204.2")?;
    hand_vxlan_peer(&tb, &ma, "192.168.77.24", "0a:58:0a:cc:02:00", "10.204.2")?;
    hand_vxlan_peer(&tb, &mb, "192.168.77.23", "0a:58:0a:cc:01:00", "10.204.1")?;
    for node in [&ma, &mb] {
        ns(
            &tb,
            node,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "10.204.0.0/16",
                "!",
                "-d",
                "10.204.0.0/16",
                "-j",
                "MASQUERADE",
                "--random-fully",
            ],
        )?;
    }
    // The naive forwarder pair: plain IP in UDP over TUN devices, MTU 1472.
    let (na, npa, _) = manual_node(&tb, "na", "192.168.77.31", "10.203.1", 1472)?;
    let (nb, npb, nip) = manual_node(&tb, "nb", "192.168.77.32", "10.203.2", 1472)?;
    let naive_bin = std::env::current_exe()?.with_file_name("naive_forwarder");
    let mut naive = Vec::new();
    for (node, peer, own, other) in [
        (&na, "192.168.77.32", "10.203.1", "10.203.2"),
        (&nb, "192.168.77.31", "10.203.2", "10.203.1"),
    ] {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", node])
            .arg(&naive_bin)
            .args(["ntun", "5555", peer, "5555"]);
        mesh_testbed::bed::die_with_parent(&mut cmd);
        naive.push(
            cmd.spawn()
                .with_context(|| format!("{}", naive_bin.display()))?,
        );
        std::thread::sleep(Duration::from_millis(200));
        ns(
            &tb,
            node,
            &["ip", "link", "set", "ntun", "mtu", "1472", "up"],
        )?;
        ns(
            &tb,
            node,
            &["ip", "addr", "add", &format!("{own}.0/32"), "dev", "ntun"],
        )?;
        ns(
            &tb,
            node,
            &[
                "ip",
                "route",
                "add",
                &format!("{other}.0/24"),
                "dev",
                "ntun",
            ],
        )?;
    }
    let pids = |nodes: &[usize]| -> Vec<u32> {
        nodes
            .iter()
            .filter_map(|i| tb.nodes[*i].agent_pid())
            .collect()
    };
    let mesh_path = |name: &'static str, a: usize, b: usize, procs: Vec<u32>| -> Result<Path> {
        Ok(Path {
            name,
            procs,
            client_ns: tb.pods[a].netns.clone(),
            server_ns: tb.pods[b].netns.clone(),
            server_ip: tb.pods[b].address.context("mesh pod address")?.to_string(),
        })
    };
    let paths = vec![
        Path {
            name: "direct",
            procs: Vec::new(),
            client_ns: dpa,
            server_ns: dpb,
            server_ip: dip,
        },
        Path {
            name: "kernel-vxlan-by-hand",
            procs: Vec::new(),
            client_ns: vpa,
            server_ns: vpb,
            server_ip: vip,
        },
        Path {
            name: "kernel-vxlan-by-hand + masq",
            procs: Vec::new(),
            client_ns: mpa,
            server_ns: mpb,
            server_ip: mip,
        },
        mesh_path("mesh-vxlan", 0, 1, Vec::new())?,
        mesh_path("mesh-vxlan (no masq)", 2, 3, Vec::new())?,
        mesh_path("mesh-udp", 4, 5, pids(&[4, 5]))?,
        mesh_path("mesh-udp (no masq)", 6, 7, pids(&[6, 7]))?,
        Path {
            name: "naive-tun-forwarder",
            procs: naive.iter().map(|c| c.id()).collect(),
            client_ns: npa,
            server_ns: npb,
            server_ip: nip,
        },
    ];
    // MESH_BENCH_ONLY=a,b keeps the paths whose names contain one of them (for profiling
    // one path); ratios need the first two and the last, so those always stay.
    let only = std::env::var("MESH_BENCH_ONLY").unwrap_or_default();
    let last = paths.len() - 1;
    let paths: Vec<Path> = paths
        .into_iter()
        .enumerate()
        .filter(|(i, p)| {
            only.is_empty() || *i < 2 || *i == last || only.split(',').any(|o| p.name.contains(o))
        })
        .map(|(_, p)| p)
        .collect();
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
    type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut results: Vec<Samples> = paths.iter().map(|_| Default::default()).collect();
    for it in 0..iterations {
        for (i, p) in paths.iter().enumerate() {
            let (one, cpu1) = with_cpu(&p.procs, || iperf(&tb, p, 1, secs))?;
            let (four, cpu4) = with_cpu(&p.procs, || iperf(&tb, p, 4, secs))?;
            let rtt = ping_us(&tb, p)?;
            eprintln!("iteration {} {:<22} 1 stream {one:6.2} Gbit/s  4 streams {four:6.2} Gbit/s  ping {rtt:6.0} us  cpu {cpu1:4.0}% / {cpu4:4.0}%", it + 1, p.name);
            results[i].0.push(one);
            results[i].1.push(four);
            results[i].2.push(rtt);
            results[i].3.push(cpu1);
            results[i].4.push(cpu4);
        }
    }
    let med: Vec<(f64, f64, f64, f64, f64)> = results
        .into_iter()
        .map(|(a, b, c, d, e)| (median(a), median(b), median(c), median(d), median(e)))
        .collect();
    let (d1, d4, ..) = med[0];
    let (h1, h4, ..) = med[1];
    let (n1, n4, ..) = med[paths.len() - 1];
    println!("\n| path | TCP 1 stream Gbit/s | x direct | x by-hand VXLAN | x naive | TCP 4 streams Gbit/s | x direct | x by-hand VXLAN | x naive | ping avg us | forwarder CPU 1 / 4 streams |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (p, (one, four, rtt, cpu1, cpu4)) in paths.iter().zip(&med) {
        let cpu = if p.procs.is_empty() {
            "kernel".to_string()
        } else {
            format!("{cpu1:.0}% / {cpu4:.0}%")
        };
        println!(
            "| {} | {one:.2} | {:.2} | {:.2} | {:.2} | {four:.2} | {:.2} | {:.2} | {:.2} | {rtt:.0} | {cpu} |",
            p.name,
            one / d1,
            one / h1,
            one / n1,
            four / d4,
            four / h4,
            four / n4
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
    for mut c in naive {
        let _ = c.kill();
        let _ = c.wait();
    }
    tb.down();
    Ok(())
}
