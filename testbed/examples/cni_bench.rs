//! CNI ADD/DEL latency: mesh-cni (through a real mesh-agent) against the reference
//! `bridge` + `host-local` plugins, both executed the same way in the same node namespace
//! (N x: netns add, ADD, DEL, netns del), plus the bare process start (`VERSION`).
//!
//!   cargo build --workspace --bins --release
//!   MESH_BIN_DIR=target/release cargo run --release -p mesh-testbed --example cni_bench -- 50
//!
//! Root only (namespaces). Prints medians and the mesh/reference ratio.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use mesh_testbed::cni::{Attachment, Conflist};
use mesh_testbed::{privns, AgentOptions, Testbed};
use serde_json::json;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn p90(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)].as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    privns::enter_private_mounts()?;
    let mut tb = Testbed::new("cb")?;
    tb.add_node(&AgentOptions {
        ipalloc_init: Some("consensus=1".into()),
        ..AgentOptions::default()
    })?;
    tb.start_agent(0)?;
    tb.wait_ready(0, Duration::from_secs(20))?;
    let ipam_dir = tb.work.join("host-local");
    let mesh = tb.conflist(0, "1.0.0", &[]);
    let reference = Conflist(json!({
        "cniVersion": "1.0.0", "name": "ref", "plugins": [{
            "type": "bridge", "bridge": "refbr0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/16"}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam_dir.display().to_string()}
        }]
    }));
    let runner = tb.runner(0);
    let mut report = Vec::new();
    for (label, list) in [("mesh-cni", &mesh), ("bridge+host-local", &reference)] {
        let (mut adds, mut dels) = (Vec::new(), Vec::new());
        for i in 0..n {
            let ns = format!("{}-b{i}", tb.prefix);
            mesh_testbed::bed::run("ip", &["netns", "add", &ns])?;
            let att = Attachment {
                container_id: format!("bench{i}"),
                netns: format!("/run/netns/{ns}"),
                ifname: "eth0".into(),
                cni_args: String::new(),
            };
            let t = Instant::now();
            let result = runner.add(list, &att, &json!({}))?;
            adds.push(t.elapsed());
            let result = result.map_err(|c| anyhow::anyhow!("{label} ADD: {c}"))?;
            let t = Instant::now();
            let failed = runner.del(list, &att, Some(&result), &json!({}))?;
            dels.push(t.elapsed());
            ensure!(failed.is_empty(), "{label} DEL: {failed:?}");
            mesh_testbed::bed::run("ip", &["netns", "del", &ns])?;
        }
        report.push((
            label,
            median(adds.clone()),
            p90(adds),
            median(dels.clone()),
            p90(dels),
        ));
    }
    let mut starts = Vec::new();
    for (label, plugin) in [("mesh-cni", "mesh-cni"), ("bridge", "bridge")] {
        let mut v = Vec::new();
        for _ in 0..n {
            let call = runner.exec(plugin, "VERSION", None, b"{\"cniVersion\":\"1.0.0\"}")?;
            ensure!(call.ok(), "{call}");
            v.push(call.took);
        }
        starts.push((label, median(v)));
    }
    println!("CNI latency, {n} runs each (median / p90, ms; includes `ip netns exec`):");
    for (label, a, a90, d, d90) in &report {
        println!("  {label:<18} ADD {a:6.1} / {a90:6.1}   DEL {d:6.1} / {d90:6.1}");
    }
    let (m, r) = (&report[0], &report[1]);
    println!(
        "  ratio mesh/reference: ADD {:.2}x, DEL {:.2}x",
        m.1 / r.1,
        m.3 / r.3
    );
    for (label, s) in &starts {
        println!("  VERSION (process start) {label:<10} {s:5.1} ms");
    }
    tb.down();
    Ok(())
}
