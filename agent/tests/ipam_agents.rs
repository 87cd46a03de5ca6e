//! IPAM through real agents on loopback: 5 `mesh-agent` processes split the range, 2,000
//! allocations arrive concurrently over their local APIs, one agent is `kill -9`'d and
//! restarted half-way. Afterwards: no address twice across all nodes, every acknowledged
//! allocation still present with the same address, all inside the range.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{wait_for, write_secret, Agent};
use mesh_agent::api::client;

const SECRET: &str = "Vb3nQ8rT1xKp6mZs9LwC2dFh5jYg7uEa";

fn post(socket: &std::path::Path, body: String) -> Option<(u16, serde_json::Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let (status, bytes) = rt
        .block_on(client::request(
            socket,
            "POST",
            "/v1/allocations",
            Some(body.into_bytes()),
        ))
        .ok()?;
    Some((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

fn addr_of(v: &serde_json::Value) -> Option<Ipv4Addr> {
    v["address"].as_str()?.split('/').next()?.parse().ok()
}

#[test]
fn two_thousand_concurrent_allocations_survive_a_kill_with_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let mut agents: Vec<Agent> = (0..5)
        .map(|i| {
            Agent::new(
                dir.path(),
                &format!("ipam-{i}"),
                &["--secret-file".to_string(), secret.display().to_string()],
            )
        })
        .collect();
    let seeds = format!("{},{}", agents[0].listen, agents[1].listen);
    for a in agents.iter_mut() {
        a.args.extend(["--peers".to_string(), seeds.clone()]);
        a.start();
    }
    let ready = wait_for(Duration::from_secs(30), || {
        agents.iter().all(|a| {
            a.json(&["status", "ipam", "-o", "json"])
                .is_some_and(|v| v["status"] == "ready")
        })
    });
    assert!(
        ready.is_some(),
        "IPAM not ready on all agents: {:?}",
        agents
            .iter()
            .map(|a| a.json(&["status", "ipam", "-o", "json"]))
            .collect::<Vec<_>>()
    );

    let sockets: Vec<PathBuf> = agents.iter().map(|a| a.socket.clone()).collect();
    let acked: Mutex<Vec<(usize, String, Ipv4Addr)>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let agents = Mutex::new(agents);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 2000 {
                    break;
                }
                if i == 1000 {
                    // Half-way: kill one agent without warning, bring it back a second later.
                    let mut a = agents.lock().unwrap();
                    a[3].kill9();
                    std::thread::sleep(Duration::from_secs(1));
                    a[3].start();
                }
                let node = i % 5;
                let cid = format!("pod-{i}");
                let body = format!(r#"{{"container_id":"{cid}","ifname":"eth0","pod":{{"namespace":"t","name":"p{i}"}}}}"#);
                // Retry through the restart: the same key must get the same answer.
                let mut answer = None;
                for _ in 0..100 {
                    match post(&sockets[node], body.clone()) {
                        Some((200 | 201, v)) => {
                            answer = addr_of(&v);
                            break;
                        }
                        Some((status, v)) if status != 503 => panic!("allocation {cid} on node {node}: {status} {v}"),
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
                let addr = answer.unwrap_or_else(|| panic!("allocation {cid} on node {node} never succeeded"));
                acked.lock().unwrap().push((node, cid, addr));
            });
        }
    });
    let agents = agents.into_inner().unwrap();
    let acked = acked.into_inner().unwrap();
    assert_eq!(acked.len(), 2000);

    // Every node's view of its allocations, after the dust settled.
    let mut holder: BTreeMap<Ipv4Addr, (usize, String)> = BTreeMap::new();
    let mut by_node: Vec<BTreeMap<String, Ipv4Addr>> = vec![BTreeMap::new(); 5];
    for (n, a) in agents.iter().enumerate() {
        let out = a.meshctl(&["report"]);
        assert!(
            out.status.success(),
            "agent {n} not answering: {}",
            a.log_text()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let list: mesh_proto::api::AllocationsResponse = rt
            .block_on(client::get_json(&a.socket, "/v1/allocations"))
            .unwrap();
        for v in list.allocations {
            let addr: Ipv4Addr = v.address.split('/').next().unwrap().parse().unwrap();
            if let Some(prev) = holder.insert(addr, (n, v.container_id.clone())) {
                panic!(
                    "address {addr} held twice: {prev:?} and ({n}, {})",
                    v.container_id
                );
            }
            by_node[n].insert(v.container_id, addr);
        }
    }
    let range = (
        u32::from(Ipv4Addr::new(10, 32, 0, 0)),
        u32::from(Ipv4Addr::new(10, 47, 255, 255)),
    );
    for (node, cid, addr) in &acked {
        assert_eq!(
            by_node[*node].get(cid),
            Some(addr),
            "acknowledged {cid} -> {addr} on node {node} is gone"
        );
        let a = u32::from(*addr);
        assert!(a > range.0 && a < range.1, "{addr} outside 10.32.0.0/12");
    }
    // DEL is idempotent and frees the address.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..2 {
        let (status, _) = rt
            .block_on(client::request(
                &agents[0].socket,
                "DELETE",
                "/v1/allocations/pod-0/eth0",
                None,
            ))
            .unwrap();
        assert_eq!(status, 204);
    }
    let (status, _) = rt
        .block_on(client::request(
            &agents[0].socket,
            "DELETE",
            "/v1/allocations/never-existed/eth0",
            None,
        ))
        .unwrap();
    assert_eq!(status, 204);
    let table = String::from_utf8_lossy(&agents[0].meshctl(&["status", "ipam"]).stdout).to_string();
    assert!(
        table.contains("Status: ready") && table.contains("ipam-0"),
        "{table}"
    );
}

#[test]
fn bad_allocation_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let mut a = Agent::new(
        dir.path(),
        "solo",
        &["--secret-file".to_string(), secret.display().to_string()],
    );
    a.start();
    assert!(
        wait_for(Duration::from_secs(15), || a
            .json(&["status", "ipam", "-o", "json"])
            .is_some_and(|v| v["status"] == "ready"))
        .is_some(),
        "{}",
        a.log_text()
    );
    let (status, v) = post(&a.socket, "{not json".into()).unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap_or_default()
        .contains("invalid JSON"));
    let (status, _) = post(&a.socket, r#"{"container_id":"","ifname":"eth0"}"#.into()).unwrap();
    assert_eq!(status, 400);
    let (status, v) = post(&a.socket, r#"{"container_id":"c1","ifname":"eth0"}"#.into()).unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, v2) = post(&a.socket, r#"{"container_id":"c1","ifname":"eth0"}"#.into()).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        v["address"], v2["address"],
        "a repeated ADD must get the same address"
    );
    assert_ne!(
        v["address"].as_str().unwrap().split('/').next(),
        v["gateway"].as_str(),
        "the gateway is never handed to a pod"
    );
}

#[test]
fn a_full_range_fails_fast_with_507_and_recovers_when_freed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let extra = [
        "--secret-file".to_string(),
        secret.display().to_string(),
        "--ipalloc-range".into(),
        "10.32.0.0/28".into(),
    ];
    let mut a = Agent::new(dir.path(), "tiny", &extra);
    a.start();
    assert!(
        wait_for(Duration::from_secs(15), || a
            .json(&["status", "ipam", "-o", "json"])
            .is_some_and(|v| v["status"] == "ready"))
        .is_some(),
        "{}",
        a.log_text()
    );
    // 16 addresses: network, broadcast and the gateway are never handed out.
    for i in 0..13 {
        let (status, v) = post(
            &a.socket,
            format!(r#"{{"container_id":"c{i}","ifname":"eth0"}}"#),
        )
        .unwrap();
        assert_eq!(status, 201, "allocation {i}: {v}");
    }
    let started = std::time::Instant::now();
    let (status, v) = post(
        &a.socket,
        r#"{"container_id":"one-too-many","ifname":"eth0"}"#.into(),
    )
    .unwrap();
    assert_eq!(status, 507, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("10.32.0.0/28"),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exhaustion must fail fast"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, _) = rt
        .block_on(client::request(
            &a.socket,
            "DELETE",
            "/v1/allocations/c5/eth0",
            None,
        ))
        .unwrap();
    assert_eq!(status, 204);
    let (status, v) = post(
        &a.socket,
        r#"{"container_id":"one-too-many","ifname":"eth0"}"#.into(),
    )
    .unwrap();
    assert_eq!(status, 201, "{v}");
}

#[test]
fn rmpeer_for_one_dead_peer_on_two_nodes_at_once_leaves_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let names: Vec<String> = (0..4).map(|i| format!("rm-{i}")).collect();
    let init = format!("seed={}", names.join(","));
    let mut agents: Vec<Agent> = names
        .iter()
        .map(|n| {
            let extra = [
                "--secret-file".to_string(),
                secret.display().to_string(),
                "--ipalloc-init".into(),
                init.clone(),
            ];
            Agent::new(dir.path(), n, &extra)
        })
        .collect();
    let seeds = format!("{},{}", agents[0].listen, agents[1].listen);
    for a in agents.iter_mut() {
        a.args.extend(["--peers".to_string(), seeds.clone()]);
        a.start();
    }
    let owners = |a: &Agent| -> Vec<(String, u64)> {
        a.json(&["status", "ipam", "-o", "json"])
            .map(|v| {
                let mut o: Vec<(String, u64)> = v["owners"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|o| {
                        (
                            o["name"].as_str().unwrap_or_default().to_string(),
                            o["addresses"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                o.sort();
                o
            })
            .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(30), || agents
            .iter()
            .all(|a| owners(a).len() == 4))
        .is_some(),
        "seeded split did not happen"
    );

    agents[2].kill9();
    let dead = wait_for(Duration::from_secs(20), || {
        [0usize, 1, 3].iter().all(|i| {
            agents[*i]
                .peer_states()
                .iter()
                .any(|(n, _, s)| n == "rm-2" && s == "dead")
        })
    });
    assert!(dead.is_some(), "rm-2 not seen dead");

    let (a, b) = (&agents[1], &agents[3]);
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| a.meshctl(&["rmpeer", "rm-2"]));
        let hb = s.spawn(|| b.meshctl(&["rmpeer", "rm-2"]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let ok = [&ra, &rb].iter().filter(|o| o.status.success()).count();
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert_eq!(
        ok,
        1,
        "exactly one rmpeer must win:\n1: {}\n3: {}",
        text(&ra),
        text(&rb)
    );
    let loser = if ra.status.success() { &rb } else { &ra };
    assert!(text(loser).contains("already reclaimed"), "{}", text(loser));

    // Every live node ends with the same owners, rm-2 owning nothing, the range fully owned.
    let settled = wait_for(Duration::from_secs(20), || {
        let views: Vec<Vec<(String, u64)>> =
            [0usize, 1, 3].iter().map(|i| owners(&agents[*i])).collect();
        views.windows(2).all(|w| w[0] == w[1])
            && views[0].iter().all(|(n, _)| n != "rm-2")
            && views[0].iter().map(|(_, n)| n).sum::<u64>() == 1 << 20
    });
    assert!(
        settled.is_some(),
        "views: {:?}",
        [0usize, 1, 3]
            .iter()
            .map(|i| owners(&agents[*i]))
            .collect::<Vec<_>>()
    );
}
