//! Benchmark of mesh as a DaemonSet on the testbed's Kubernetes cluster (root):
//!
//!   sudo scripts/bench-kube.sh [--pods 30] [--workers 2] [--backend vxlan]
//!
//! (it builds the binaries and images, then runs this example). It measures, on one cluster:
//! `kubectl apply -k deploy/` -> every node Ready; pod created -> Running and Ready, p50/p99 over
//! `--pods` pods (created in rounds of 10), first with mesh, then with the reference `bridge` +
//! `host-local` conflist swapped in on the workers (same cluster, same images: the ratio is
//! the CNI's share); each mesh agent's RSS; the longest gap of a TCP stream between pods on
//! two nodes across `kubectl rollout restart ds/mesh`. Prints markdown rows for
//! docs/benchmarks.md.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_testbed::cluster::{workloads, Cluster, ClusterOptions, PodState};
use mesh_testbed::privns;
use serde_json::json;

const ROUND: usize = 10;
const REFERENCE_CONFLIST: &str = "00-reference-bridge.conflist";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn main() -> Result<()> {
    privns::enter_private_mounts()?;
    let pods: usize = arg("--pods").and_then(|v| v.parse().ok()).unwrap_or(30);
    let workers: usize = arg("--workers").and_then(|v| v.parse().ok()).unwrap_or(2);
    let backend = arg("--backend").unwrap_or_else(|| "vxlan".into());
    let opts = ClusterOptions::from_repo(workers, Some(backend.clone()))?;
    let started = Instant::now();
    let mut c = Cluster::up(
        &format!("kb{:05x}", std::process::id() & 0xfffff),
        None,
        opts,
        &mut |what| eprintln!("  [{:.1?}] {what}", started.elapsed()),
    )?;
    let result = bench(&mut c, pods, &backend);
    for p in c.down() {
        eprintln!("teardown: {p}");
    }
    result
}

fn bench(c: &mut Cluster, pods: usize, backend: &str) -> Result<()> {
    let mut rows = Vec::new();
    for (what, took) in &c.timings {
        let since = if what.starts_with("kubectl") || what.starts_with("apply") {
            ""
        } else {
            " (since the start)"
        };
        rows.push(format!(
            "| cluster up: {what}{since} | {:.1} s |",
            took.as_secs_f64()
        ));
    }
    workloads::deploy(c, 2 * workloads::schedulable_nodes(c).len())?;
    let mesh = startup_latencies(c, "mesh", pods)?;
    swap_in_reference(c, true)?;
    let reference = startup_latencies(c, "ref", pods);
    swap_in_reference(c, false)?;
    let reference = reference?;
    let (m50, m99) = (percentile(&mesh, 50.0), percentile(&mesh, 99.0));
    let (r50, r99) = (percentile(&reference, 50.0), percentile(&reference, 99.0));
    rows.push(format!(
        "| pod created -> Running+Ready, mesh ({backend}), {pods} pods | p50 {m50:.2} s, p99 {m99:.2} s |"
    ));
    rows.push(format!(
        "| same, reference bridge + host-local, {pods} pods | p50 {r50:.2} s, p99 {r99:.2} s |"
    ));
    rows.push(format!(
        "| ratio mesh / reference | p50 {:.2}, p99 {:.2} |",
        m50 / r50,
        m99 / r99
    ));
    for (node, kib) in agent_rss(c)? {
        rows.push(format!(
            "| mesh-agent RSS on {node} | {:.1} MiB |",
            kib as f64 / 1024.0
        ));
    }
    let gap = rollout_gap(c)?;
    rows.push(format!(
        "| longest gap of a pod-to-pod TCP stream (frame every 10 ms) across `rollout restart ds/mesh` ({backend}) | {gap:.0} ms |"
    ));
    println!("| measure | value |\n|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// Seconds from `kubectl apply` to Running+Ready for `n` pods, created `ROUND` at a time
/// (polled every 100 ms), then deleted.
fn startup_latencies(c: &Cluster, tag: &str, n: usize) -> Result<Vec<f64>> {
    let mut all = Vec::new();
    let mut round = 0;
    while all.len() < n {
        let count = ROUND.min(n - all.len());
        let names: Vec<String> = (0..count)
            .map(|i| format!("lat-{tag}-{round}-{i}"))
            .collect();
        let list = json!({
            "apiVersion": "v1", "kind": "List",
            "items": names.iter().map(|name| json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": workloads::NAMESPACE, "labels": {"bench": tag}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 0,
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "node-role.kubernetes.io/master", "operator": "DoesNotExist"}]}]}}},
                    "containers": [{"name": "probe", "image": format!("localhost/mesh-probe:{}", c.opts.tag),
                                    "imagePullPolicy": "IfNotPresent",
                                    "command": ["/usr/local/bin/mesh-probe", "serve"]}],
                },
            })).collect::<Vec<_>>(),
        });
        let path = c.tb.work.join(format!("lat-{tag}-{round}.json"));
        std::fs::write(&path, list.to_string())?;
        let created = Instant::now();
        c.kubectl_ok(&["create", "-f", &path.display().to_string()])?;
        let mut done: Vec<Option<f64>> = vec![None; count];
        while done.iter().any(Option::is_none) {
            if created.elapsed() > Duration::from_secs(180) {
                bail!("{tag} round {round}: pods not Running within 180 s");
            }
            let v = c.get_json(&[
                "-n",
                workloads::NAMESPACE,
                "pods",
                "-l",
                &format!("bench={tag}"),
            ])?;
            let t = created.elapsed().as_secs_f64();
            for p in mesh_testbed::cluster::items(&v)
                .iter()
                .map(PodState::from_json)
            {
                if let Some(i) = names.iter().position(|n| *n == p.name) {
                    if done[i].is_none() && p.phase == "Running" && p.ready {
                        // Which plugin attached it: the reference's range, or mesh's.
                        let reference = p.ip.is_some_and(|ip| ip.octets()[..2] == [10, 250]);
                        if reference != (tag == "ref") {
                            bail!(
                                "{} got {:?}: not from the {tag} CNI configuration",
                                p.name,
                                p.ip
                            );
                        }
                        done[i] = Some(t);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        all.extend(done.into_iter().flatten());
        c.kubectl_ok(&[
            "-n",
            workloads::NAMESPACE,
            "delete",
            "pods",
            "-l",
            &format!("bench={tag}"),
            "--wait=true",
        ])?;
        round += 1;
    }
    Ok(all)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Puts (or removes) the reference bridge + host-local conflist ahead of mesh's on every
/// worker: containerd reads the first file in name order.
fn swap_in_reference(c: &Cluster, on: bool) -> Result<()> {
    for (i, n) in c.nodes.iter().enumerate().filter(|(_, n)| !n.control_plane) {
        let path = format!("/etc/cni/net.d/{REFERENCE_CONFLIST}");
        if on {
            let conf = json!({
                "cniVersion": "1.0.0", "name": "reference",
                "plugins": [{"type": "bridge", "bridge": "refbr0", "isGateway": true, "ipMasq": true,
                             "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.250.{i}.0/24")}]],
                                      "routes": [{"dst": "0.0.0.0/0"}]}},
                            {"type": "portmap", "capabilities": {"portMappings": true}}],
            });
            let tmp = format!("/etc/cni/net.d/.{REFERENCE_CONFLIST}.tmp");
            n.run(
                "sh",
                &[
                    "-c",
                    &format!("cat > {tmp} <<'EOF'\n{conf}\nEOF\nmv {tmp} {path}"),
                ],
            )?;
        } else {
            n.run("rm", &["-f", &path])?;
        }
    }
    // containerd reloads the directory within ~100 ms.
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

/// (node, VmRSS KiB) of every mesh-agent process in the cluster's nodes.
fn agent_rss(c: &Cluster) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for n in &c.nodes {
        let netns_id = std::fs::metadata(format!("/run/netns/{}", n.netns))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .context("node netns")?;
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "mesh-agent" {
                continue;
            }
            let in_node = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == netns_id);
            if !in_node {
                continue;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            out.push((n.name.clone(), kib));
        }
    }
    Ok(out)
}

/// The stream between probe pods on two workers across a rollout restart: its longest gap.
fn rollout_gap(c: &Cluster) -> Result<f64> {
    let nodes = workloads::schedulable_nodes(c);
    if nodes.len() < 2 {
        bail!("the stream needs two workers");
    }
    let probes = workloads::pods(c, &format!("app={}", workloads::DEPLOYMENT))?;
    let server = probes
        .iter()
        .find(|p| p.node == nodes[0])
        .context("no probe pod on the first worker")?;
    workloads::start_stream(c, server, &nodes[1])?;
    c.kubectl_ok(&["-n", "mesh-system", "rollout", "restart", "ds/mesh"])?;
    c.wait_mesh_rollout()?;
    std::thread::sleep(Duration::from_secs(2));
    let s = workloads::stream_stats(c, &server.name)?;
    if s["open"] != 1 || s["connections"] != 1 {
        bail!("the stream broke during the rollout: {s}");
    }
    s["max_gap_ms"].as_f64().context("max_gap_ms")
}
