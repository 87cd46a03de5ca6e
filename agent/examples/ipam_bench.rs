//! IPAM benchmark on real agents (loopback, `--dataplane none`):
//! - time from starting a fresh 3-node and 10-node cluster until every node has handed out
//!   its first address (first split by consensus, space on demand for the rest);
//! - local API allocation latency (p50/p99) for sequential `POST /v1/allocations` on one
//!   node, each committed to the store before the answer.
//!
//! Run: `scripts/bench-ipam.sh` (builds release binaries first). Prints Markdown rows.

use std::path::Path;
use std::time::{Duration, Instant};

use mesh_agent::api::client;

mod bench_support;
use bench_support::spawn_cluster;

async fn allocate(socket: &Path, cid: &str) -> Option<u16> {
    let body = format!(r#"{{"container_id":"{cid}","ifname":"eth0"}}"#).into_bytes();
    client::request(socket, "POST", "/v1/allocations", Some(body))
        .await
        .ok()
        .map(|(s, _)| s)
}

/// Seconds from spawn until every node answered its first allocation with 201.
async fn time_to_first_allocation(agent_bin: &str, n: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let start = Instant::now();
    let procs = spawn_cluster(agent_bin, dir.path(), &format!("c{n}"), n)?;
    let mut done = vec![false; n];
    while done.iter().any(|d| !d) {
        if start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("{n}-node cluster: not every node allocated within 60 s ({done:?})");
        }
        for (i, p) in procs.iter().enumerate() {
            if !done[i] && allocate(&p.socket, "first").await == Some(201) {
                done[i] = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let agent_bin = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/mesh-agent".into());
    let count: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);

    let t3 = time_to_first_allocation(&agent_bin, 3).await?;
    let t10 = time_to_first_allocation(&agent_bin, 10).await?;

    let dir = tempfile::tempdir()?;
    let procs = spawn_cluster(&agent_bin, dir.path(), "lat", 3)?;
    let socket = procs[0].socket.clone();
    let ready = Instant::now();
    while allocate(&socket, "warm-up").await != Some(201) {
        if ready.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("latency cluster never became ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        let status = allocate(&socket, &format!("pod-{i}")).await;
        lat.push(t.elapsed());
        if status != Some(201) {
            anyhow::bail!("allocation {i} answered {status:?}");
        }
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    println!("| time to first allocation on every node, 3 nodes | 10 nodes | allocation latency p50 / p99 ({count} sequential) |");
    println!("|---|---|---|");
    println!(
        "| {t3:.2} s | {t10:.2} s | {:.2} / {:.2} ms |",
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}
