//! A flood of QUIC handshakes from many source addresses (200 loopback addresses, 4
//! attempts each at a time, none with the cluster secret) against a real `mesh-agent`
//! (`--dataplane none`, no root), while the agent's local API serves allocations — the
//! call a CNI ADD makes. The agent must keep serving them within its normal latency
//! (judged against the same run's baseline without the flood), turn the excess away
//! before authentication (counted in `mesh_handshakes_turned_away_total`), and say so in
//! a bounded number of log lines.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, write_secret, Agent};
use mesh_agent::api::client;
use mesh_agent::transport::tls::AcceptAnyCert;

const SECRET: &str = "Kd8vTq2mZx5LbN7wR3cYh9sJf4gPa6Ue";
const SOURCES: u8 = 200;
const PER_SOURCE: usize = 4;
const FLOOD: Duration = Duration::from_secs(8);
const CALLS: usize = 60;

fn flood_client() -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        // Any server certificate will do: the flood wants the server to do its half of
        // every handshake, not to succeed.
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![mesh_proto::wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    // Give up fast on an ignored attempt and start the next: maximum pressure.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(300)).unwrap(),
    ));
    cfg.transport_config(Arc::new(t));
    cfg
}

/// Latencies (sorted) of `CALLS` allocate + release round trips on the local API.
async fn allocation_latencies(socket: &std::path::Path, tag: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..CALLS {
        let body = format!(r#"{{"network":"mesh","container_id":"{tag}{i}","ifname":"eth0"}}"#);
        let started = Instant::now();
        let (status, _) =
            client::request(socket, "POST", "/v1/allocations", Some(body.into_bytes()))
                .await
                .expect("allocation call");
        assert_eq!(status, 201, "allocation {tag}{i}");
        out.push(started.elapsed());
        let path = format!("/v1/allocations/{tag}{i}/eth0?network=mesh");
        client::request(socket, "DELETE", &path, None)
            .await
            .expect("release call");
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn a_handshake_flood_from_many_addresses_leaves_cni_calls_at_their_normal_latency() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let mut a = Agent::new(
        dir.path(),
        "flooded",
        &["--secret-file".into(), secret.display().to_string()],
    );
    a.start();
    let ready = wait_for(Duration::from_secs(20), || {
        a.json(&["status", "ipam", "-o", "json"])
            .is_some_and(|v| v["status"] == "ready")
    });
    assert!(ready.is_some(), "IPAM never ready: {}", a.log_text());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = a.socket.clone();
    let baseline = rt.block_on(allocation_latencies(&socket, "base"));

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let target: SocketAddr = a.listen;
    let cfg = flood_client();
    let mut flooders = Vec::new();
    rt.block_on(async {
        for n in 1..=SOURCES {
            let source = IpAddr::V4(Ipv4Addr::new(127, 1, 0, n));
            let mut ep =
                quinn::Endpoint::client(SocketAddr::new(source, 0)).expect("bind a flood source");
            ep.set_default_client_config(cfg.clone());
            for _ in 0..PER_SOURCE {
                let (ep, stop, attempts) = (ep.clone(), stop.clone(), attempts.clone());
                flooders.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        if let Ok(c) = ep.connect(target, "mesh.peer") {
                            let _ = c.await;
                        }
                    }
                }));
            }
        }
    });
    // Let the flood build up, then measure while it runs.
    std::thread::sleep(Duration::from_secs(2));
    let flood_started = Instant::now();
    let flooded = rt.block_on(allocation_latencies(&socket, "flood"));
    let measured_for = flood_started.elapsed();
    std::thread::sleep(FLOOD.saturating_sub(measured_for));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for f in flooders {
            let _ = f.await;
        }
    });
    let attempts = attempts.load(Ordering::Relaxed);

    let metrics = a.metrics_text();
    let turned_away: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_handshakes_turned_away_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let log = a.log_text();
    let log_lines = log
        .lines()
        .filter(|l| l.contains(" WARN "))
        .filter(|l| {
            l.contains("refused an inbound connection")
                || l.contains("turned incoming handshakes away")
        })
        .count();
    let (b50, b99) = (pct(&baseline, 50), pct(&baseline, 99));
    let (f50, f99) = (pct(&flooded, 50), pct(&flooded, 99));
    println!(
        "flood: {attempts} handshake attempts from {SOURCES} addresses in {:.0?}; turned away {turned_away}; \
         {log_lines} log lines\nallocation latency: baseline p50 {b50:.1?} p99 {b99:.1?}; under flood p50 {f50:.1?} p99 {f99:.1?}",
        FLOOD + Duration::from_secs(2)
    );
    assert!(
        turned_away > 0.0,
        "nothing was turned away: no limits?\n{metrics}"
    );
    // Normal latency: within 3x the baseline's p99 plus 20 ms of scheduling noise on a
    // 2-core machine that also runs the flood.
    let bound = b99 * 3 + Duration::from_millis(20);
    assert!(
        f99 <= bound,
        "allocations slowed down under the flood: p99 {f99:?} > {bound:?} (baseline p99 {b99:?})"
    );
    assert!(
        log_lines <= 6,
        "{log_lines} log lines about the flood: logging is not bounded\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    // Still itself afterwards.
    assert!(
        a.json(&["status", "-o", "json"]).is_some(),
        "{}",
        a.log_text()
    );
}
