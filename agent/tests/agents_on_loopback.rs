//! Real `mesh-agent` processes on 127.0.0.1 (`--dataplane none`, no root), observed only
//! through `meshctl`: join, crash detection, restart with the same identity, refusal of a
//! peer with another secret or protocol version, and the local API's contract.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{wait_for, write_secret, Agent};

const SECRET: &str = "qZ7vKm3xT9pL2wYc8RfN4hJd6bGs1aUe";

fn secured(dir: &std::path::Path, name: &str, secret: &std::path::Path, peers: &str) -> Agent {
    let mut extra = vec!["--secret-file".to_string(), secret.display().to_string()];
    if !peers.is_empty() {
        extra.push("--peers".into());
        extra.push(peers.into());
    }
    Agent::new(dir, name, &extra)
}

/// Starts `a` and waits (up to 10 s) until its local API answers.
fn start_and_wait(a: &mut Agent) {
    a.start();
    let answered = wait_for(Duration::from_secs(10), || {
        a.json(&["status", "-o", "json"]).is_some()
    });
    assert!(answered.is_some(), "{}", a.log_text());
}

fn dump_logs(agents: &[&Agent]) -> String {
    agents
        .iter()
        .map(|a| format!("--- {} ---\n{}", a.name, a.log_text()))
        .collect()
}

#[test]
fn five_agents_converge_detect_a_kill_and_welcome_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    // Everyone knows the first two agents, like a real --peers list.
    let mut agents: Vec<Agent> = (0..5)
        .map(|i| secured(dir.path(), &format!("node-{i}"), &secret, ""))
        .collect();
    let seeds = format!("{},{}", agents[0].listen, agents[1].listen);
    for a in agents.iter_mut() {
        a.args.extend(["--peers".to_string(), seeds.clone()]);
        a.start();
    }
    let all_alive = |agents: &[Agent], n: usize| {
        agents.iter().all(|a| {
            let states = a.peer_states();
            states.len() == n && states.iter().all(|(_, _, s)| s == "alive")
        })
    };
    let joined = wait_for(Duration::from_secs(20), || all_alive(&agents, 5));
    assert!(
        joined.is_some(),
        "5 agents did not all see 5 alive peers\n{}",
        dump_logs(&agents.iter().collect::<Vec<_>>())
    );
    println!("5 agents converged in {:?}", joined.unwrap());

    let victim_states = agents[3].peer_states();
    let victim_id = victim_states
        .iter()
        .find(|(n, _, _)| n == "node-3")
        .unwrap()
        .1
        .clone();
    let incarnation = |a: &Agent| -> u64 {
        a.json(&["status", "-o", "json"])
            .and_then(|v| v["node"]["incarnation"].as_u64())
            .unwrap_or(0)
    };
    let old_incarnation = incarnation(&agents[3]);
    agents[3].kill9();
    let others = [0usize, 1, 2, 4];
    let dead = wait_for(Duration::from_secs(15), || {
        others.iter().all(|i| {
            agents[*i]
                .peer_states()
                .iter()
                .any(|(n, _, s)| n == "node-3" && s == "dead")
        })
    });
    assert!(
        dead.is_some(),
        "not every agent reported node-3 dead within 15 s\n{}",
        dump_logs(&agents.iter().collect::<Vec<_>>())
    );
    println!("kill -9 detected by all 4 survivors in {:?}", dead.unwrap());

    agents[3].start();
    let back = wait_for(Duration::from_secs(20), || all_alive(&agents, 5));
    assert!(
        back.is_some(),
        "restarted node-3 did not come back alive everywhere\n{}",
        dump_logs(&agents.iter().collect::<Vec<_>>())
    );
    let states = agents[0].peer_states();
    let (_, id, _) = states.iter().find(|(n, _, _)| n == "node-3").unwrap();
    assert_eq!(*id, victim_id, "restart changed the peer id");
    assert!(
        incarnation(&agents[3]) > old_incarnation,
        "restart did not bump the incarnation"
    );
}

#[test]
fn a_peer_with_another_secret_never_joins_and_both_ends_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_secret(dir.path(), "good", SECRET);
    let bad = write_secret(dir.path(), "bad", "Xy4TqW9eRz2mNb7vLk5sHj8cPd3fGa6U");
    let mut a = secured(dir.path(), "good-a", &good, "");
    a.start();
    let mut b = secured(dir.path(), "good-b", &good, &a.listen.to_string());
    b.start();
    let mut intruder = secured(
        dir.path(),
        "intruder",
        &bad,
        &format!("{},{}", a.listen, b.listen),
    );
    intruder.start();
    assert!(
        wait_for(Duration::from_secs(15), || a.peer_states().len() == 2).is_some(),
        "good agents did not join"
    );

    // Watch for a while: the intruder must never appear in anyone's view.
    for _ in 0..15 {
        for agent in [&a, &b] {
            let names: Vec<String> = agent.peer_states().into_iter().map(|(n, _, _)| n).collect();
            assert!(
                !names.contains(&"intruder".to_string()),
                "{} lists the intruder: {names:?}",
                agent.name
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let intruder_view: Vec<String> = intruder
        .peer_states()
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(
        intruder_view,
        vec!["intruder".to_string()],
        "the intruder learned about the mesh"
    );

    let rows = |agent: &Agent| {
        agent
            .json(&["status", "connections", "-o", "json"])
            .unwrap()["connections"]
            .as_array()
            .cloned()
            .unwrap()
    };
    let auth_failure = |r: &serde_json::Value| {
        r["state"]
            .as_str()
            .unwrap_or_default()
            .contains("authentication failed")
            && r["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("authentication failed")
    };
    let seen = wait_for(Duration::from_secs(10), || {
        rows(&intruder)
            .iter()
            .any(|r| r["direction"] == "out" && auth_failure(r))
            && rows(&a)
                .iter()
                .any(|r| r["direction"] == "in" && auth_failure(r))
    });
    assert!(
        seen.is_some(),
        "both ends must name the authentication failure\nintruder: {:#?}\ngood-a: {:#?}",
        rows(&intruder),
        rows(&a)
    );
    let table =
        String::from_utf8_lossy(&intruder.meshctl(&["status", "connections"]).stdout).to_string();
    assert!(table.contains("authentication failed"), "{table}");
}

#[test]
fn a_peer_speaking_another_protocol_version_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let mut a = secured(dir.path(), "v1", &secret, "");
    a.start();
    let mut future = secured(dir.path(), "v2", &secret, &a.listen.to_string());
    future
        .args
        .extend(["--protocol-range".to_string(), "2..3".to_string()]);
    future.start();
    let rows = |agent: &Agent| {
        agent
            .json(&["status", "connections", "-o", "json"])
            .map(|v| v["connections"].to_string())
            .unwrap_or_default()
    };
    let seen = wait_for(Duration::from_secs(10), || {
        rows(&future).contains("protocol version mismatch")
            && rows(&a).contains("protocol version mismatch")
    });
    assert!(seen.is_some(), "v2: {}\nv1: {}", rows(&future), rows(&a));
    assert_eq!(a.peer_states().len(), 1);
}

#[test]
fn refuses_to_start_without_a_secret_unless_told_and_then_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Agent::new(dir.path(), "nosecret", &[]);
    a.start();
    assert!(
        wait_for(Duration::from_secs(10), || a.exited().is_some()).is_some(),
        "agent started without a secret"
    );
    assert!(
        a.log_text().contains("--insecure-no-auth"),
        "{}",
        a.log_text()
    );

    let mut b = Agent::new(dir.path(), "open", &["--insecure-no-auth".to_string()]);
    b.start();
    let status = wait_for(Duration::from_secs(10), || {
        b.json(&["status", "-o", "json"]).is_some()
    });
    assert!(status.is_some(), "{}", b.log_text());
    let v = b.json(&["status", "-o", "json"]).unwrap();
    assert_eq!(v["auth"], "insecure-no-auth");
    let human = String::from_utf8_lossy(&b.meshctl(&["status"]).stdout).to_string();
    assert!(
        human.contains("WARNING") && human.contains("--insecure-no-auth"),
        "{human}"
    );
}

#[test]
fn local_api_contract_and_socket_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", SECRET);
    let mut a = secured(dir.path(), "api", &secret, "");
    start_and_wait(&mut a);
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "local API socket must be owner-only");

    let st = a.json(&["status", "-o", "json"]).unwrap();
    for key in ["node", "ready", "peers", "connections", "ipam"] {
        assert!(st.get(key).is_some(), "status lacks {key}: {st}");
    }
    assert_eq!(st["node"]["name"], "api");
    assert!(
        st["ready"].as_bool().unwrap(),
        "a lone agent with no --peers is ready"
    );
    assert_eq!(st["ipam"]["range"], "10.32.0.0/12");
    let peers = a.json(&["status", "peers", "-o", "json"]).unwrap();
    let me = &peers["peers"][0];
    for key in ["name", "id", "state", "addresses", "connections"] {
        assert!(me.get(key).is_some(), "peer lacks {key}: {me}");
    }
    let conns = a.json(&["status", "connections", "-o", "json"]).unwrap();
    assert!(conns["connections"].is_array());
    let dot = String::from_utf8_lossy(&a.meshctl(&["status", "peers", "--dot"]).stdout).to_string();
    assert!(
        dot.starts_with("digraph mesh {") && dot.contains("\"api\\n"),
        "{dot}"
    );
    // A second agent on the same socket must refuse rather than steal it.
    let mut clash = secured(dir.path(), "clash", &secret, "");
    let pos = clash.args.iter().position(|x| x == "--socket").unwrap();
    clash.args[pos + 1] = a.socket.display().to_string();
    clash.start();
    assert!(wait_for(Duration::from_secs(10), || clash.exited().is_some()).is_some());
    assert!(
        clash.log_text().contains("in use by a running agent"),
        "{}",
        clash.log_text()
    );
    assert!(
        a.json(&["status", "-o", "json"]).is_some(),
        "the first agent lost its socket"
    );
}

#[test]
fn meshctl_without_an_agent_says_so_in_one_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::new(dir.path(), "absent", &[]);
    let out = a.meshctl(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is mesh-agent running"), "{err}");
}

#[test]
fn a_damaged_store_stops_the_agent_with_the_way_out_and_repair_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "s", SECRET);
    let mut a = secured(dir.path(), "damaged", &secret, "");
    start_and_wait(&mut a);
    a.kill9();
    // Damage: the allocations table replaced by one of another layout (what a foreign
    // tool or a botched downgrade leaves). Before schema checks this loaded as "no
    // allocations" and the agent started, ready to hand every address out again.
    {
        let db = redb::Database::create(a.state_dir.join("mesh.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let ours: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("allocations");
        tx.delete_table(ours).unwrap();
        let other: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("allocations");
        tx.open_table(other).unwrap().insert(1, 1).unwrap();
        tx.commit().unwrap();
    }
    a.start();
    let exited = wait_for(Duration::from_secs(10), || a.exited().is_some());
    assert!(exited.is_some(), "the agent started on a damaged store");
    let log = a.log_text();
    assert!(
        log.contains("mesh.redb") && log.contains("mesh-agent store inspect --state-dir"),
        "the refusal must name the file and the way out: {log}"
    );

    let store = |args: &[&str]| {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.push("--state-dir");
        let dir = a.state_dir.display().to_string();
        let out = std::process::Command::new(common::AGENT)
            .args(&all)
            .arg(&dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, text) = store(&["inspect"]);
    assert!(!ok, "inspect must fail on a damaged store: {text}");
    assert!(
        text.contains("PROBLEM in allocations") && text.contains("--discard allocations"),
        "{text}"
    );
    let (ok, text) = store(&["repair"]);
    assert!(
        !ok,
        "repair without --discard must not drop allocations: {text}"
    );
    let (ok, text) = store(&["repair", "--discard", "allocations"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("before-repair") && text.contains("no problems found"),
        "{text}"
    );

    start_and_wait(&mut a);
}
