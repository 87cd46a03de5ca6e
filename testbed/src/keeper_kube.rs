//! The keeper of a Kubernetes testbed (`mesh-testbed up --kubernetes`): builds the cluster
//! (`mesh_testbed::cluster`), installs mesh with `kubectl apply -k deploy/`, then serves
//! `status`, `check` and `down` on the control socket like the plain keeper.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use mesh_testbed::cluster::{self, workloads, Cluster, ClusterOptions};
use mesh_testbed::privns;

use crate::keeper::{announce_ready, serve_requests, EXIT};
use crate::state_dir;

/// Replicas of the check Deployment: two per worker, at least 6.
fn replicas(workers: usize) -> usize {
    (workers * 2).max(6)
}

pub fn run(name: &str, workers: usize, dataplane: Option<String>) -> Result<()> {
    privns::enter_private_mounts()?;
    let dir = state_dir(name);
    std::fs::write(dir.join("keeper.pid"), std::process::id().to_string())?;
    let started = Instant::now();
    let opts = ClusterOptions::from_repo(workers, dataplane)?;
    let mut step = 0;
    let mut progress = |what: &str| {
        step += 1;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "[{step}/5] {what} ({:.1?})", started.elapsed());
        let _ = out.flush();
    };
    let mut c = Cluster::up(name, Some(cluster::work_dir(name)), opts, &mut progress)?;
    save_layout(name, &c)?;
    let took = workloads::deploy(&c, replicas(workers))?;
    progress(&format!(
        "check workloads deployed (Deployment {} x{}, Services, hostPort pod) in {took:.1?}",
        workloads::DEPLOYMENT,
        replicas(workers)
    ));
    let listener = announce_ready(name)?;
    serve_requests(listener, |words, stream| {
        Some(match words.first().copied() {
            Some("status") => status(&c, stream),
            Some("check") => workloads::check(&c, stream),
            Some("down") => {
                let _ = writeln!(stream, "tearing down cluster {name:?}");
                let problems = c.down();
                for p in &problems {
                    let _ = writeln!(stream, "problem: {p}");
                }
                let _ = writeln!(stream, "{EXIT}{}", u8::from(!problems.is_empty()));
                return None;
            }
            Some("chaos" | "bench") => Err(anyhow::anyhow!(
                "not available on a Kubernetes testbed (use kubectl: mesh-testbed --name {name} kubectl -- …)"
            )),
            other => Err(anyhow::anyhow!("unknown request {other:?}")),
        })
    });
    Ok(())
}

/// Nodes, pods, then `meshctl status` of each mesh pod through `kubectl exec`.
fn status(c: &Cluster, out: &mut dyn Write) -> Result<bool> {
    let mut ok = true;
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["-n", "mesh-system", "get", "pods", "-o", "wide"][..],
    ] {
        writeln!(out, "$ kubectl {}", args.join(" "))?;
        write!(out, "{}", c.kubectl_ok(args)?)?;
        writeln!(out)?;
    }
    for p in c.mesh_pods()? {
        writeln!(
            out,
            "$ kubectl -n mesh-system exec {} -c agent -- meshctl status   # node {}",
            p.name, p.node
        )?;
        match c.kubectl_ok(&[
            "-n",
            "mesh-system",
            "exec",
            &p.name,
            "-c",
            "agent",
            "--",
            "meshctl",
            "status",
        ]) {
            Ok(s) => write!(out, "{s}")?,
            Err(e) => {
                ok = false;
                writeln!(out, "error: {e:#}")?;
            }
        }
        writeln!(out)?;
    }
    Ok(ok)
}

/// What the other commands need: node namespaces (`exec`), and that this is a cluster
/// (`kubectl`, `status`).
fn save_layout(name: &str, c: &Cluster) -> Result<()> {
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            json!({"name": n.name, "netns": n.netns, "underlay": n.address.to_string(),
                   "control_plane": n.control_plane, "socket": ""})
        })
        .collect();
    let v = json!({
        "kind": "kubernetes",
        "nodes": nodes,
        "pods": [],
        "kubeconfig": c.kubeconfig.display().to_string(),
        "control_plane_netns": c.nodes[0].netns,
    });
    let path = state_dir(name).join("layout.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}
