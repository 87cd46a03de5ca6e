//! Control-plane benchmark: N real `mesh-agent` processes on loopback (`--dataplane none`).
//!
//! Measures time for all N to see each other alive, RSS per agent, steady-state gossip
//! bytes per node per second (from each agent's /metrics), and time for every survivor to
//! mark a `kill -9`'d agent dead. Prints a Markdown table for docs/benchmarks.md.
//!
//! Run: `scripts/bench-control-plane.sh [AGENTS]` (builds release binaries first).

use std::path::Path;
use std::time::{Duration, Instant};

use mesh_agent::api::client;
use mesh_proto::api::PeersResponse;

mod bench_support;
use bench_support::spawn_cluster;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn alive_count(socket: &Path) -> usize {
    match client::get_json::<PeersResponse>(socket, "/v1/status/peers").await {
        Ok(p) => p.peers.iter().filter(|p| p.state == "alive").count(),
        Err(_) => 0,
    }
}

async fn sees_dead(socket: &Path, name: &str) -> bool {
    match client::get_json::<PeersResponse>(socket, "/v1/status/peers").await {
        Ok(p) => p.peers.iter().any(|p| p.name == name && p.state == "dead"),
        Err(_) => false,
    }
}

/// Sum of mesh_gossip_bytes_total over both directions, via a raw HTTP/1.0 GET.
fn gossip_bytes(metrics: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(metrics) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with("mesh_gossip_bytes_total{direction=\"out\"}"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let agent_bin = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/mesh-agent".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let dir = tempfile::tempdir()?;
    let start = Instant::now();
    let mut procs = spawn_cluster(&agent_bin, dir.path(), "bench", n)?;
    let spawned = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut converged = None;
    while Instant::now() < deadline {
        let mut all = true;
        for p in &procs {
            if alive_count(&p.socket).await < n {
                all = false;
                break;
            }
        }
        if all {
            converged = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(converged) = converged else {
        let exited: Vec<usize> = procs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| matches!(p.child.try_wait(), Ok(Some(_))).then_some(i))
            .collect();
        anyhow::bail!("{n} agents did not converge within 120 s (agents that exited: {exited:?})")
    };

    // Steady state: joining reshapes the neighbour graph, and links to former neighbours
    // close 30 s after they stop being needed; measure 30 s of gossip after that settles.
    let churn_b0: u64 = procs.iter().map(|p| gossip_bytes(&p.metrics)).sum();
    let churn_t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(45)).await;
    let churn_b1: u64 = procs.iter().map(|p| gossip_bytes(&p.metrics)).sum();
    let settling_per_node_s =
        (churn_b1.saturating_sub(churn_b0)) as f64 / n as f64 / churn_t0.elapsed().as_secs_f64();
    let b0: u64 = procs.iter().map(|p| gossip_bytes(&p.metrics)).sum();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let b1: u64 = procs.iter().map(|p| gossip_bytes(&p.metrics)).sum();
    let bytes_per_node_s = (b1.saturating_sub(b0)) as f64 / n as f64 / t0.elapsed().as_secs_f64();
    let rss: Vec<u64> = procs.iter().map(|p| rss_kib(p.child.id())).collect();
    let rss_mean = rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1024.0;
    let rss_max = *rss.iter().max().unwrap_or(&0) as f64 / 1024.0;

    let victim = n / 2;
    let mut gone = procs.remove(victim);
    let _ = gone.child.kill();
    let killed = Instant::now();
    let mut detected = None;
    while killed.elapsed() < Duration::from_secs(60) {
        let mut all = true;
        for p in &procs {
            if !sees_dead(&p.socket, &format!("bench-{victim}")).await {
                all = false;
                break;
            }
        }
        if all {
            detected = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("| agents | spawn all | all see all alive | RSS mean / max | gossip out per node: settling (45 s) / steady (30 s) | kill -9 seen dead by all |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.2} s | {:.2} s | {:.1} / {:.1} MiB | {:.0} / {:.0} B/s | {} |",
        spawned.as_secs_f64(),
        converged.as_secs_f64(),
        rss_mean,
        rss_max,
        settling_per_node_s,
        bytes_per_node_s,
        detected.map_or("not within 60 s".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        ))
    );
    Ok(())
}
