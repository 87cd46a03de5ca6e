//! The data plane end to end, shared by the `vxlan`, `udp` and mixed suites (root; skips
//! loudly without it, fails under MESH_E2E=1): 3 node namespaces on one underlay bridge,
//! each with a real mesh-agent on the backend its layout names, 2 pods per node attached
//! through the real mesh-cni. Cases that only make sense for one backend (the kernel keeps
//! forwarding while its agent is stopped) are picked by the layout of the node they touch.

mod forgery;
mod lifecycle;
mod traffic;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mesh_testbed::{suite, AgentOptions, Testbed};
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
            lifecycle::agent_stop_keeps_traffic,
        )
    } else {
        (
            "traffic through a userspace node resumes after its agent restarts",
            lifecycle::agent_restart_resumes_traffic,
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
        traffic::full_matrix,
    ),
    (
        "bulk TCP crosses intact between every pair of nodes",
        traffic::bulk_tcp_between_nodes,
    ),
    (
        "userspace nodes count their traffic, batched, with nothing dropped",
        traffic::forwarder_metrics,
    ),
    (
        "the underlay carries VXLAN with our VNI",
        traffic::underlay_is_vxlan,
    ),
    (
        "a route deleted by hand comes back",
        lifecycle::route_is_restored,
    ),
    (
        "egress is masqueraded, pod to node is not",
        traffic::egress_masquerade,
    ),
    (
        "a kube-proxy style ClusterIP DNAT to a remote pod works",
        traffic::cluster_ip_dnat,
    ),
    (
        "a full-size packet crosses without fragmentation",
        traffic::full_size_packet,
    ),
    (
        "forged VXLAN (from a pod to its gateway, from a non-member host, with another node's pod source) reaches no pod",
        forgery::forged_vxlan_reaches_no_pod,
    ),
    (RESTART, lifecycle::agent_stop_keeps_traffic),
    (
        "an agent restarted (SIGTERM or kill -9) on either end loses no ping (kernel; userspace: gap reported)",
        lifecycle::agent_restart_loses_no_ping,
    ),
    (
        "meshctl status connections names each peer's data plane",
        lifecycle::connections_name_the_data_plane,
    ),
    (
        "--uninstall removes chains, devices and routes",
        lifecycle::uninstall_cleans_the_node,
    ),
    (
        "a removed node's routes go once rmpeer reclaims its blocks",
        lifecycle::rmpeer_removes_routes,
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
