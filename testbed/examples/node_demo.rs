//! One node, a few pods, attached through the real mesh-cni: prints `meshctl status` of
//! the node and a pod-to-pod / node-to-pod connectivity matrix, then removes everything.
//! (The multi-node `mesh-testbed up` arrives with the data-plane and testbed issues.)
//!
//!   sudo scripts/quickstart-node.sh [PODS]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_testbed::{privns, AgentOptions, Testbed};
use serde_json::json;

fn main() -> Result<()> {
    let pods: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    privns::enter_private_mounts()?;
    let mut tb = Testbed::new("demo")?;
    let started = Instant::now();
    tb.add_node(&AgentOptions {
        ipalloc_init: Some("consensus=1".into()),
        ..AgentOptions::default()
    })?;
    tb.start_agent(0)?;
    tb.wait_ready(0, Duration::from_secs(30))?;
    println!(
        "node {} ready in {:.1?} (agent log: {})",
        tb.nodes[0].name,
        started.elapsed(),
        tb.nodes[0].log.display()
    );
    let list = tb.conflist(0, "1.1.0", &[]);
    for i in 0..pods {
        let p = tb.add_pod(0, &format!("pod{}", i + 1), &list, &json!({}))?;
        println!(
            "  attached {} -> {}",
            tb.pods[p].name,
            tb.pods[p]
                .address
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
    }
    let status = tb.ns(
        &tb.nodes[0].netns,
        &[
            &tb.bin("meshctl").display().to_string(),
            "--socket",
            &tb.nodes[0].socket.display().to_string(),
            "status",
        ],
    )?;
    println!(
        "\n$ meshctl status\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let node_ns = tb.nodes[0].netns.clone();
    let mut rows: Vec<(String, String)> = vec![("node".into(), node_ns)];
    rows.extend(tb.pods.iter().map(|p| (p.name.clone(), p.netns.clone())));
    let targets: Vec<(String, Ipv4Addr)> = tb
        .pods
        .iter()
        .filter_map(|p| p.address.map(|a| (p.name.clone(), a)))
        .collect();
    print!("{:>8}", "from\\to");
    for (name, _) in &targets {
        print!("{name:>8}");
    }
    println!();
    let mut failures = 0;
    for (from, ns) in &rows {
        print!("{from:>8}");
        for (to, ip) in &targets {
            if from == to {
                print!("{:>8}", "-");
                continue;
            }
            let ok = tb
                .ns_output(ns, &["ping", "-c", "1", "-W", "2", &ip.to_string()])?
                .status
                .success();
            failures += usize::from(!ok);
            print!("{:>8}", if ok { "ok" } else { "FAIL" });
        }
        println!();
    }
    tb.down();
    if failures > 0 {
        anyhow::bail!("{failures} pairs cannot reach each other");
    }
    println!("\nall pairs reach each other; everything removed");
    Ok(())
}
