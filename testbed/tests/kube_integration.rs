//! `mesh-agent --kube` against a real kube-apiserver 1.20.2 (built from Debian's source by
//! `scripts/kube-apiserver.sh build`; `.ci/run` builds it first) on the testbed underlay.
//! Root; skips loudly without it or without the apiserver, fails instead under MESH_E2E=1.
//!
//! One apiserver, one story, in order: `deploy/` is accepted; 3 agents, started with
//! **no `--peers`** and with the rights of `deploy/`'s RBAC only, first fail visibly (no
//! rights yet) and recover when the rights are granted, then find each other only through
//! Node objects, elect one writer that splits the range once, and set NetworkUnavailable;
//! pods on every node reach each other; a 4th Node joins without restarting anyone; a
//! deleted Node's space is reclaimed exactly once although three agents see the deletion,
//! also when it is the leader and first splitter (killed), and a leader stopped gracefully
//! hands the Lease over (those in `kube_integration/leadership.rs`); the data plane outlives
//! the apiserver.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_testbed::kube::{self, ApiServer};
use mesh_testbed::{gate, privns, suite, AgentOptions, Testbed};
use serde_json::{json, Value};

#[path = "kube_integration/leadership.rs"]
mod leadership;

use leadership::{
    deleted_leader_reclaimed_once, deleted_node_reclaimed_once, graceful_leader_hands_over,
};

const SUITE: &str = "kube integration (--kube against kube-apiserver 1.20.2)";
const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 250);

struct Ctx {
    tb: Testbed,
    api: ApiServer,
}

type Case = suite::CaseOn<Ctx>;

fn main() {
    if !gate::e2e_allowed(SUITE) {
        return;
    }
    if let Some(why) = kube::missing() {
        if std::env::var("MESH_E2E").is_ok_and(|v| v == "1") {
            panic!("{SUITE}: MESH_E2E=1 but {why}");
        }
        eprintln!("\n## SKIPPED {SUITE}: {why}\n");
        return;
    }
    if let Err(e) = privns::enter_private_mounts() {
        panic!("{SUITE}: cannot set up a private mount namespace: {e:#}");
    }
    let mut tb = Testbed::new("kb").expect("testbed");
    let api = match ApiServer::start(&mut tb, "kapi", API_ADDRESS) {
        Ok(a) => a,
        Err(e) => {
            tb.down();
            panic!("{SUITE}: cannot start the apiserver: {e:#}");
        }
    };
    let mut ctx = Ctx { tb, api };
    let cases: &[(&str, Case)] = &[
        ("kubectl apply of deploy/ is accepted", apply_deploy),
        (
            "without RBAC rights the agents say so, and recover once granted",
            agents_recover_from_missing_rights,
        ),
        (
            "agents find each other only through Node objects; one elected split",
            discovery_through_nodes,
        ),
        (
            "NetworkUnavailable=False and annotations on every Node",
            node_condition_and_annotations,
        ),
        ("pods on every node reach each other", pods_reach_each_other),
        (
            "a Node added later joins without restarts",
            node_added_later_joins,
        ),
        (
            "a deleted Node's space is reclaimed exactly once",
            deleted_node_reclaimed_once,
        ),
        (
            "the leader's and first splitter's Node deleted: a new leader reclaims it once",
            deleted_leader_reclaimed_once,
        ),
        (
            "a leader stopped gracefully hands the Lease over at once",
            graceful_leader_hands_over,
        ),
        (
            "the data plane outlives the apiserver",
            data_plane_outlives_apiserver,
        ),
    ];
    let mut failed = suite::run_cases(&mut ctx, cases, true);
    if failed > 0 {
        println!("{}", ctx.tb.logs(40));
        let log =
            std::fs::read_to_string(ctx.api.dir.join("kube-apiserver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!(
            "---- kube-apiserver.log (last 15)\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    ctx.api.stop();
    ctx.tb.down();
    let left = ctx.tb.leftover_namespaces();
    if !left.is_empty() {
        println!("leftover namespaces after down: {left:?}");
        failed += 1;
    }
    println!("\n{SUITE}: {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn wait_for<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?} {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn repo_deploy() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kubectl apply -k` on a copy of deploy/ with a generated cluster secret (as the README
/// says), then every object is there as written.
fn apply_deploy(c: &mut Ctx) -> Result<()> {
    let copy = c.tb.work.join("deploy");
    std::fs::create_dir_all(&copy)?;
    for f in ["mesh.yaml", "kustomization.yaml"] {
        std::fs::copy(repo_deploy().join(f), copy.join(f))
            .with_context(|| format!("copy deploy/{f}"))?;
    }
    std::fs::write(
        copy.join("cluster-secret"),
        "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0Cg==\n",
    )?;
    // Server-side validation first: nothing persisted if anything is refused.
    c.api
        .kubectl_ok(
            &c.tb,
            &[
                "apply",
                "--dry-run=server",
                "-f",
                &copy.join("mesh.yaml").display().to_string(),
            ],
        )
        .or_else(|e| {
            // The Namespace does not exist yet for a dry run of namespaced objects.
            if e.to_string()
                .contains("namespaces \"mesh-system\" not found")
            {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
    let out = c
        .api
        .kubectl_ok(&c.tb, &["apply", "-k", &copy.display().to_string()])?;
    for want in [
        "namespace/mesh-system",
        "serviceaccount/mesh",
        "clusterrole.rbac.authorization.k8s.io/mesh",
        "clusterrolebinding.rbac.authorization.k8s.io/mesh",
        "role.rbac.authorization.k8s.io/mesh-leader-election",
        "rolebinding.rbac.authorization.k8s.io/mesh-leader-election",
        "secret/mesh-cluster-secret",
        "daemonset.apps/mesh",
    ] {
        if !out.contains(want) {
            bail!("kubectl apply -k did not create {want}:\n{out}");
        }
    }
    let ds: Value = serde_json::from_str(&c.api.kubectl_ok(
        &c.tb,
        &["-n", "mesh-system", "get", "ds", "mesh", "-o", "json"],
    )?)?;
    let spec = &ds["spec"]["template"]["spec"];
    if spec["hostNetwork"] != true || spec["priorityClassName"] != "system-node-critical" {
        bail!("DaemonSet stored without hostNetwork/priority: {spec}");
    }
    if spec["initContainers"][0]["command"][1] != "install" {
        bail!("no install-cni init container: {}", spec["initContainers"]);
    }
    let secret = c.api.jsonpath(
        &c.tb,
        &["-n", "mesh-system", "secret", "mesh-cluster-secret"],
        "{.data.secret}",
    )?;
    if secret.trim().is_empty() {
        bail!("the cluster secret has no `secret` key");
    }
    // A second apply changes nothing (idempotent, as operators re-run it).
    let again = c
        .api
        .kubectl_ok(&c.tb, &["apply", "-k", &copy.display().to_string()])?;
    if !again.lines().all(|l| l.ends_with("unchanged")) {
        bail!("re-applying deploy/ changed something:\n{again}");
    }
    Ok(())
}

fn kube_status(c: &Ctx, i: usize) -> Result<Value> {
    Ok(c.tb.status(i)?["kube"].clone())
}

/// The agents run as user `mesh-tester` (token auth), which has no rights until bound to
/// deploy/'s ClusterRole and Role: so the rights the manifests grant are exactly the
/// rights under test.
fn agents_recover_from_missing_rights(c: &mut Ctx) -> Result<()> {
    let kubeconfig = c.api.kubeconfig_unprivileged().display().to_string();
    for i in 1..=3u8 {
        let name = format!("n{i}");
        c.api
            .create_node(&c.tb, &name, Ipv4Addr::new(192, 168, 77, i))?;
    }
    for _ in 0..3 {
        c.tb.add_node(&AgentOptions {
            ipalloc_init: None,
            dataplane: "vxlan".into(),
            extra: vec![
                "--kube".into(),
                "--kubeconfig".into(),
                kubeconfig.clone(),
                "--kube-namespace".into(),
                "mesh-system".into(),
            ],
        })?;
    }
    for i in 0..3 {
        c.tb.start_agent(i)?;
    }
    let error = wait_for(
        Duration::from_secs(20),
        "agent reports the RBAC refusal",
        || {
            let k = kube_status(c, 0)?;
            Ok(k["last_error"]
                .as_str()
                .filter(|e| e.contains("forbidden by RBAC"))
                .map(String::from))
        },
    )?;
    println!("  without rights, meshctl status says: {error}");
    for i in 0..3 {
        if c.tb.status(i)?["ipam"]["status"]
            .as_str()
            .unwrap_or_default()
            .contains("ready")
        {
            bail!("IPAM became ready with no Kubernetes access and no --peers");
        }
    }
    let granted = Instant::now();
    c.api.kubectl_ok(
        &c.tb,
        &[
            "create",
            "clusterrolebinding",
            "mesh-tester",
            "--clusterrole=mesh",
            "--user=mesh-tester",
        ],
    )?;
    c.api.kubectl_ok(
        &c.tb,
        &[
            "-n",
            "mesh-system",
            "create",
            "rolebinding",
            "mesh-tester",
            "--role=mesh-leader-election",
            "--user=mesh-tester",
        ],
    )?;
    for i in 0..3 {
        wait_for(
            Duration::from_secs(60),
            "agent watching nodes after the grant",
            || {
                let k = kube_status(c, i)?;
                Ok((k["api"] == "watching nodes" && k["nodes"] == 3).then_some(()))
            },
        )?;
    }
    println!(
        "  rights granted -> all 3 agents watching Nodes after {:.1?} (watch backoff)",
        granted.elapsed()
    );
    Ok(())
}

fn peers_alive(c: &Ctx, i: usize) -> Result<Vec<String>> {
    let p = c.tb.meshctl_json(i, &["status", "peers"])?;
    Ok(p["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["state"] == "alive")
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Addresses owned by anyone in a `meshctl status ipam` answer (the whole /12 when the
/// ring covers the range).
fn owned_total(ipam: &Value) -> u64 {
    ipam["owners"]
        .as_array()
        .map(|o| o.iter().filter_map(|o| o["addresses"].as_u64()).sum())
        .unwrap_or(0)
}

fn log_count(c: &Ctx, needle: &str) -> usize {
    c.tb.nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .matches(needle)
                .count()
        })
        .sum()
}

fn discovery_through_nodes(c: &mut Ctx) -> Result<()> {
    for i in 0..3 {
        wait_for(Duration::from_secs(30), "every peer alive", || {
            Ok((peers_alive(c, i)?.len() == 3).then_some(()))
        })?;
        c.tb.wait_ready(i, Duration::from_secs(30))?;
    }
    let splits = log_count(c, "made the first split of the range");
    if splits != 1 {
        bail!("{splits} agents made a first split; exactly one must");
    }
    let by = c.api.jsonpath(
        &c.tb,
        &["-n", "mesh-system", "lease", "mesh-leader"],
        "{.metadata.annotations.mesh\\.dev/first-split-by}",
    )?;
    let holder = c.api.jsonpath(
        &c.tb,
        &["-n", "mesh-system", "lease", "mesh-leader"],
        "{.spec.holderIdentity}",
    )?;
    println!("  Lease holder {holder}, first split by {by}");
    let leaders: Vec<usize> = (0..3)
        .filter(|i| kube_status(c, *i).is_ok_and(|k| k["is_leader"] == true))
        .collect();
    if leaders.len() != 1 || c.tb.nodes[leaders[0]].name != holder {
        bail!("meshctl shows leaders {leaders:?}, the Lease says {holder}");
    }
    // Every node got space; the owners cover the whole range.
    let ipam = c.tb.meshctl_json(0, &["status", "ipam"])?;
    let total = owned_total(&ipam);
    if total != 1 << 20 {
        bail!("owners hold {total} addresses, not the whole /12: {ipam}");
    }
    Ok(())
}

fn node_condition_and_annotations(c: &mut Ctx) -> Result<()> {
    for i in 0..3 {
        let name = c.tb.nodes[i].name.clone();
        let cond = wait_for(Duration::from_secs(20), "NetworkUnavailable set", || {
            let s = c.api.jsonpath(&c.tb, &["node", &name], "{.status.conditions[?(@.type==\"NetworkUnavailable\")].status}/{.status.conditions[?(@.type==\"NetworkUnavailable\")].reason}")?;
            Ok((s == "False/MeshIsUp").then_some(s))
        })?;
        let address = c.api.jsonpath(
            &c.tb,
            &["node", &name],
            "{.metadata.annotations.mesh\\.dev/address}",
        )?;
        let want = format!("{}:6783", c.tb.nodes[i].underlay_ip);
        if address != want {
            bail!("{name}: mesh.dev/address {address:?}, want {want:?}");
        }
        let k = kube_status(c, i)?;
        if k["network_unavailable"] != "False" {
            bail!(
                "{name}: meshctl status says NetworkUnavailable={}",
                k["network_unavailable"]
            );
        }
        println!("  {name}: NetworkUnavailable {cond}, mesh.dev/address {address}");
    }
    Ok(())
}

fn add_pod(c: &mut Ctx, node: usize) -> Result<Ipv4Addr> {
    let list = c.tb.conflist(node, "1.1.0", &[]);
    let name = format!("{}p1", c.tb.nodes[node].name);
    let p = c.tb.add_pod(node, &name, &list, &json!({}))?;
    c.tb.pods[p].address.context("pod without an address")
}

fn pings_all(c: &Ctx) -> Result<()> {
    let pods: Vec<(String, Ipv4Addr)> =
        c.tb.pods
            .iter()
            .filter_map(|p| Some((p.netns.clone(), p.address?)))
            .collect();
    for (from, _) in &pods {
        for (to_ns, to) in &pods {
            if from == to_ns {
                continue;
            }
            wait_for(Duration::from_secs(10), &format!("{from} -> {to}"), || {
                Ok(c.tb.pings(from, *to)?.then_some(()))
            })?;
        }
    }
    Ok(())
}

fn pods_reach_each_other(c: &mut Ctx) -> Result<()> {
    for n in 0..3 {
        add_pod(c, n)?;
    }
    mesh_testbed::checks::wait_for_routes(&c.tb, Duration::from_secs(20))?;
    pings_all(c)
}

fn node_added_later_joins(c: &mut Ctx) -> Result<()> {
    let pids: Vec<Option<u32>> = c.tb.nodes.iter().map(|n| n.agent_pid()).collect();
    let kubeconfig = c.api.kubeconfig_unprivileged().display().to_string();
    // The userspace data plane, and only the rights deploy/'s DaemonSet grants (NET_ADMIN,
    // NET_RAW, /proc/sys read-only): a mixed cluster, and proof the container needs no more.
    let i = c.tb.add_node(&AgentOptions {
        ipalloc_init: None,
        dataplane: "udp".into(),
        extra: vec!["--kube".into(), "--kubeconfig".into(), kubeconfig],
    })?;
    c.tb.confine_agent(i)?;
    let name = c.tb.nodes[i].name.clone();
    // As on a real node: kubelet registers the Node, then the DaemonSet pod starts.
    let created = Instant::now();
    c.api.create_node(&c.tb, &name, c.tb.nodes[i].underlay_ip)?;
    c.tb.start_agent(i)?;
    wait_for(Duration::from_secs(30), "the new node alive on n1", || {
        Ok(peers_alive(c, 0)?.contains(&name).then_some(()))
    })?;
    let alive = created.elapsed();
    wait_for(Duration::from_secs(30), "every node sees 4 alive", || {
        Ok((0..4)
            .all(|j| peers_alive(c, j).is_ok_and(|p| p.len() == 4))
            .then_some(()))
    })?;
    println!("  Node {name} created -> alive in n1's `meshctl status peers` after {alive:.2?}");
    let now: Vec<Option<u32>> = c.tb.nodes[..3].iter().map(|n| n.agent_pid()).collect();
    if now != pids {
        bail!("agents were restarted: {pids:?} -> {now:?}");
    }
    c.tb.wait_ready(i, Duration::from_secs(30))?;
    let pid = c.tb.nodes[i]
        .agent_pid()
        .context("the new agent has no PID")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or("?");
    // CAP_NET_ADMIN (12) and CAP_NET_RAW (13): nothing else.
    if caps != "0000000000003000" {
        bail!("{name}'s agent runs with capabilities {caps}, not just NET_ADMIN + NET_RAW");
    }
    // What it would have written to /proc/sys, it set through netlink.
    for (path, want) in [
        ("/proc/sys/net/ipv4/conf/mesh0/proxy_arp", "1"),
        ("/proc/sys/net/ipv4/neigh/mesh0/proxy_delay", "0"),
    ] {
        let out = c.tb.ns_output(&c.tb.nodes[i].netns, &["cat", path])?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got != want {
            bail!("{name}: {path} is {got:?}, not {want}");
        }
    }
    // And IPv6 kept off its tunnel device without /proc/sys: no IPv6 address on it.
    let out = c.tb.ns_output(
        &c.tb.nodes[i].netns,
        &["ip", "-6", "-o", "addr", "show", "dev", "mesh-tun"],
    )?;
    let v6 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !v6.is_empty() {
        bail!("{name}: mesh-tun has IPv6 addresses (or none could be listed): {v6:?}");
    }
    println!("  {name}: udp data plane, agent ready with only NET_ADMIN + NET_RAW (CapEff {caps}), /proc/sys read-only; proxy_arp 1 and proxy_delay 0 on mesh0 and no IPv6 on mesh-tun, all through netlink");
    add_pod(c, i)?;
    mesh_testbed::checks::wait_for_routes(&c.tb, Duration::from_secs(20))?;
    pings_all(c)
}

fn data_plane_outlives_apiserver(c: &mut Ctx) -> Result<()> {
    let live: Vec<usize> = (0..c.tb.nodes.len())
        .filter(|j| !c.tb.nodes[*j].removed)
        .collect();
    // Every agent renews or reads the Lease every 2 s: its "unreachable" error appears (and
    // stays, whatever the Node watch reports meanwhile) only once the apiserver is gone.
    let unreachable_error = |c: &Ctx| -> Result<Option<String>> {
        let k = kube_status(c, live[0])?;
        Ok(k["errors"]["lease"]
            .as_str()
            .filter(|e| e.contains("cannot reach the Kubernetes API server"))
            .map(String::from))
    };
    if let Some(e) = unreachable_error(c)? {
        bail!("an unreachable-apiserver error before it stopped: {e}");
    }
    c.api.stop();
    let shown = wait_for(
        Duration::from_secs(30),
        "the outage shown in meshctl status",
        || unreachable_error(c),
    )?;
    println!("  apiserver stopped; meshctl status says: {shown}");
    for j in &live {
        if !c.tb.agent_running(*j) {
            bail!(
                "agent of {} stopped with the apiserver",
                c.tb.nodes[*j].name
            );
        }
    }
    pings_all(c)
}
