//! `mesh-agent --kube` against a real kube-apiserver 1.20.2 (built from Debian's source by
//! `scripts/kube-apiserver.sh build`; `.ci/run` builds it first) on the testbed underlay.
//! Root; skips loudly without it or without the apiserver, fails instead under MESH_E2E=1.
//!
//! One apiserver, one story, in order: `deploy/` is accepted; 3 agents, started with
//! **no `--peers`** and with the rights of `deploy/`'s RBAC only, first fail visibly (no
//! rights yet) and recover when the rights are granted, then find each other only through
//! Node objects, elect one writer that splits the range once, and set NetworkUnavailable;
//! pods on every node reach each other; a 4th Node joins without restarting anyone; a
//! deleted Node's space is reclaimed exactly once although three agents see the deletion;
//! the data plane outlives the apiserver.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_testbed::kube::{self, ApiServer};
use mesh_testbed::{gate, privns, suite, AgentOptions, Testbed};
use serde_json::{json, Value};

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

fn lease_field(c: &Ctx, field: &str) -> Result<String> {
    c.api
        .jsonpath(&c.tb, &["-n", "mesh-system", "lease", "mesh-leader"], field)
}

fn lease_holder(c: &Ctx) -> Result<String> {
    lease_field(c, "{.spec.holderIdentity}")
}

fn first_splitter(c: &Ctx) -> Result<String> {
    lease_field(c, "{.metadata.annotations.mesh\\.dev/first-split-by}")
}

fn node_index(c: &Ctx, name: &str) -> Option<usize> {
    (0..c.tb.nodes.len()).find(|i| c.tb.nodes[*i].name == name && !c.tb.nodes[*i].removed)
}

fn deleted_node_reclaimed_once(c: &mut Ctx) -> Result<()> {
    // Neither the Lease holder nor the first splitter: reclaimed without a leadership
    // change, through the anchor coordinator. The next case deletes those.
    let (holder, splitter) = (lease_holder(c)?, first_splitter(c)?);
    let gone = (0..c.tb.nodes.len())
        .find(|i| c.tb.nodes[*i].name != holder && c.tb.nodes[*i].name != splitter)
        .context("no node is neither Lease holder nor first splitter")?;
    delete_node_and_check_reclaim(c, gone, Duration::from_secs(40))
}

fn deleted_leader_reclaimed_once(c: &mut Ctx) -> Result<()> {
    // The first splitter owns every reclaim anchor of the range, so no peer coordinates its
    // reclaim; it usually holds the Lease too, so its deletion also needs a new leader
    // (after the 15 s Lease duration) before anything can be reclaimed.
    let (holder, splitter) = (lease_holder(c)?, first_splitter(c)?);
    let gone = node_index(c, &splitter)
        .or_else(|| node_index(c, &holder))
        .context("neither the first splitter nor the Lease holder is a live node")?;
    let name = c.tb.nodes[gone].name.clone();
    println!(
        "  deleting {name}: Lease holder {}, first splitter {}",
        name == holder,
        name == splitter
    );
    // A crash, not a goodbye: the Lease is left to expire and the mesh must notice.
    c.tb.kill_agent(gone)?;
    delete_node_and_check_reclaim(c, gone, Duration::from_secs(60))?;
    let new_holder = lease_holder(c)?;
    if new_holder == name || node_index(c, &new_holder).is_none() {
        bail!("the Lease is held by {new_holder:?}, not by a live node");
    }
    let fence = lease_field(c, "{.metadata.annotations.mesh\\.dev/last-reclaim}")?;
    if !fence.starts_with(&format!("{name} by {new_holder}")) {
        bail!("the Lease does not record the reclaim of {name} by {new_holder}: {fence:?}");
    }
    println!("  Lease now held by {new_holder}; it records: {fence}");
    Ok(())
}

fn graceful_leader_hands_over(c: &mut Ctx) -> Result<()> {
    // A rolling update restarts the leader's pod: SIGTERM, and the Lease is handed back
    // (client-go's ReleaseOnCancel) instead of expiring after its 15 s.
    let holder = lease_holder(c)?;
    let i = node_index(c, &holder).context("the Lease holder is not a live node")?;
    let stopped = Instant::now();
    c.tb.stop_agent(i)?;
    let stop_took = stopped.elapsed();
    let next = wait_for(
        Duration::from_secs(8),
        "another node holding the Lease",
        || {
            let h = lease_holder(c)?;
            Ok((h != holder && node_index(c, &h).is_some()).then_some(h))
        },
    )?;
    println!(
        "  {holder} stopped (SIGTERM, exited in {stop_took:.1?}) -> {next} holds the Lease {:.1?} after the signal",
        stopped.elapsed()
    );
    if !log_has(c, i, "handed the mesh Lease back on shutdown") {
        bail!("{holder}'s log does not say it handed the Lease back");
    }
    c.tb.start_agent(i)?;
    c.tb.wait_ready(i, Duration::from_secs(30))?;
    mesh_testbed::checks::wait_for_routes(&c.tb, Duration::from_secs(20))?;
    pings_all(c)
}

fn log_has(c: &Ctx, i: usize, needle: &str) -> bool {
    std::fs::read_to_string(&c.tb.nodes[i].log).is_ok_and(|l| l.contains(needle))
}

/// Stops node `gone`'s agent, deletes its Node, and checks that its space is reclaimed in
/// every live node's view within `within`, by exactly one reclaim, and nothing is lost.
fn delete_node_and_check_reclaim(c: &mut Ctx, gone: usize, within: Duration) -> Result<()> {
    let name = c.tb.nodes[gone].name.clone();
    let before = log_count(c, "reclaimed the address space of a deleted Node");
    c.tb.remove_node(gone)?;
    let deleted = Instant::now();
    c.api.kubectl_ok(&c.tb, &["delete", "node", &name])?;
    let live: Vec<usize> = (0..c.tb.nodes.len())
        .filter(|j| !c.tb.nodes[*j].removed)
        .collect();
    for j in &live {
        wait_for(
            within,
            &format!("{name}'s space gone in node {}'s view", j + 1),
            || {
                let ipam = c.tb.meshctl_json(*j, &["status", "ipam"])?;
                let owns = ipam["owners"]
                    .as_array()
                    .map(|o| {
                        o.iter().any(|o| {
                            o["name"] == name.as_str() && o["addresses"].as_u64().unwrap_or(0) > 0
                        })
                    })
                    .unwrap_or(true);
                Ok((!owns).then_some(()))
            },
        )?;
    }
    println!(
        "  Node {name} deleted -> its space reclaimed on every node after {:.1?}",
        deleted.elapsed()
    );
    let reclaims = log_count(c, "reclaimed the address space of a deleted Node") - before;
    if reclaims != 1 {
        bail!("{reclaims} reclaims logged across the agents; exactly one must happen");
    }
    // A second reclaim from anywhere is refused: nothing is left to move.
    for j in &live {
        let out = c.tb.ns_output(
            &c.tb.nodes[*j].netns,
            &[
                &c.tb.bin("meshctl").display().to_string(),
                "--socket",
                &c.tb.nodes[*j].socket.display().to_string(),
                "rmpeer",
                &name,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let refused = text.contains("already reclaimed") || text.contains("no peer named");
        if out.status.success() || !refused {
            bail!(
                "a second rmpeer {name} on node {} was not refused: {text}",
                j + 1
            );
        }
    }
    let ipam = c.tb.meshctl_json(live[0], &["status", "ipam"])?;
    let total = owned_total(&ipam);
    if total != 1 << 20 {
        bail!("after the reclaim the owners hold {total} addresses: {ipam}");
    }
    let k = kube_status(
        c,
        live.iter()
            .copied()
            .find(|j| kube_status(c, *j).is_ok_and(|k| k["is_leader"] == true))
            .unwrap_or(0),
    )?;
    println!("  leader's meshctl status: last reclaim {}", k["reclaims"]);
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
