//! The `mesh-testbed` command end to end, as a user runs it (root; skips loudly without it,
//! fails under MESH_E2E=1): for each backend (`vxlan`, `udp`, `mixed`) `up` 3 nodes × 2
//! pods, `status`, `exec`, `check`, every `chaos` scenario, `down` — then nothing of the
//! testbed may be left (state directory, keeper, agents), and a second `down` is a no-op.
//! Then the same for a Kubernetes testbed (`up --kubernetes`, on the `udp` data plane, which
//! the kube_cluster suite does not cover): `kubectl`, `status`, `check`, `exec`, `down`.

use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use mesh_testbed::{bed, gate};

fn testbed(args: &[&str]) -> Result<Output> {
    let bin = bed::bin_dir()?.join("mesh-testbed");
    let out = Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    Ok(out)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> Result<String> {
    let started = Instant::now();
    let o = testbed(args)?;
    let t = text(&o);
    ensure!(
        o.status.success(),
        "mesh-testbed {} failed ({}):\n{t}",
        args.join(" "),
        o.status
    );
    println!(
        "  mesh-testbed {} ... ok ({:.1?})",
        args.join(" "),
        started.elapsed()
    );
    Ok(t)
}

fn keeper_running(name: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .any(|c| c.contains("mesh-testbed") && c.contains(&format!("--name {name} keep")))
}

fn one_backend(backend: &str, name: &str) -> Result<()> {
    let n = ["--name", name];
    let _ = testbed(&[n[0], n[1], "down"]);
    let up = ok(&[
        n[0],
        n[1],
        "up",
        "--nodes",
        "3",
        "--pods",
        "2",
        "--backend",
        backend,
    ])?;
    ensure!(up.contains("is up"), "up did not say it is up:\n{up}");
    let result = (|| -> Result<()> {
        let again = testbed(&[n[0], n[1], "up"])?;
        ensure!(
            !again.status.success() && text(&again).contains("already up"),
            "a second up must refuse: {}",
            text(&again)
        );
        let status = ok(&[n[0], n[1], "status"])?;
        ensure!(
            status.contains("n1") && status.contains("n3") && !status.contains("false"),
            "status:\n{status}"
        );
        let addr = ok(&[
            n[0], n[1], "exec", "n2p1", "--", "ip", "-4", "-o", "addr", "show", "eth0",
        ])?;
        ensure!(
            addr.contains("inet 10."),
            "pod n2p1 has no cluster address: {addr}"
        );
        let bad = testbed(&[n[0], n[1], "exec", "nope", "--", "true"])?;
        ensure!(
            !bad.status.success() && text(&bad).contains("no node or pod named"),
            "exec on an unknown target: {}",
            text(&bad)
        );
        let check = ok(&[n[0], n[1], "check"])?;
        ensure!(check.contains("all checks passed"), "check:\n{check}");
        println!("{check}");
        let chaos = ok(&[n[0], n[1], "chaos"])?;
        ensure!(
            chaos.contains("all chaos scenarios passed"),
            "chaos:\n{chaos}"
        );
        for l in chaos
            .lines()
            .filter(|l| l.starts_with("===") || l.starts_with("  "))
        {
            if !l.starts_with("  ok") {
                println!("    {l}");
            }
        }
        Ok(())
    })();
    let down = ok(&[n[0], n[1], "down"]);
    result?;
    let down = down?;
    ensure!(down.contains("is down"), "down:\n{down}");
    ensure!(
        !std::path::Path::new("/run/mesh-testbed")
            .join(name)
            .exists(),
        "the state directory is still there after down"
    );
    ensure!(!keeper_running(name), "the keeper still runs after down");
    let again = ok(&[n[0], n[1], "down"])?;
    ensure!(again.contains("nothing to do"), "second down: {again}");
    Ok(())
}

fn kubernetes(name: &str) -> Result<()> {
    let n = ["--name", name];
    let _ = testbed(&[n[0], n[1], "down"]);
    let up = ok(&[
        n[0],
        n[1],
        "up",
        "--kubernetes",
        "--nodes",
        "2",
        "--backend",
        "udp",
    ])?;
    ensure!(up.contains("Kubernetes testbed"), "up:\n{up}");
    let result = (|| -> Result<()> {
        let nodes = ok(&[n[0], n[1], "kubectl", "--", "get", "nodes", "--no-headers"])?;
        let ready = nodes
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count();
        ensure!(
            ready == 3,
            "kubectl get nodes: {ready} of 3 Ready:\n{nodes}"
        );
        let status = ok(&[n[0], n[1], "status"])?;
        ensure!(
            status.matches("meshctl status").count() == 3 && status.contains("udp"),
            "status should show meshctl status of 3 agents on udp:\n{status}"
        );
        let check = ok(&[n[0], n[1], "check"])?;
        ensure!(
            check.contains("all workload checks passed"),
            "check:\n{check}"
        );
        println!("{check}");
        let links = ok(&[
            n[0], n[1], "exec", "w1", "--", "ip", "-o", "link", "show", "mesh0",
        ])?;
        ensure!(links.contains("mesh0"), "no mesh0 on w1: {links}");
        let chaos = testbed(&[n[0], n[1], "chaos"])?;
        ensure!(
            !chaos.status.success()
                && text(&chaos).contains("not available on a Kubernetes testbed"),
            "chaos on a Kubernetes testbed: {}",
            text(&chaos)
        );
        Ok(())
    })();
    let down = ok(&[n[0], n[1], "down"]);
    result?;
    ensure!(down?.contains("is down"), "down did not finish");
    ensure!(
        !std::path::Path::new("/run/mesh-testbed")
            .join(name)
            .exists(),
        "the state directory is still there after down"
    );
    ensure!(!keeper_running(name), "the keeper still runs after down");
    Ok(())
}

fn main() {
    if !gate::e2e_allowed("mesh-testbed CLI") {
        return;
    }
    let mut failed = 0;
    for (backend, name) in [("vxlan", "ctv"), ("udp", "ctu"), ("mixed", "ctm")] {
        let started = Instant::now();
        match one_backend(backend, name) {
            Ok(()) => println!(
                "test mesh-testbed up/status/exec/check/chaos/down with {backend} ... ok ({:.1?})",
                started.elapsed()
            ),
            Err(e) => {
                failed += 1;
                println!("test mesh-testbed with {backend} ... FAILED\n  {e:#}");
            }
        }
    }
    let opts = mesh_testbed::cluster::ClusterOptions::from_repo(2, None).expect("options");
    match mesh_testbed::cluster::missing(&opts) {
        Some(why) if std::env::var("MESH_E2E").is_ok_and(|v| v == "1") => {
            failed += 1;
            println!("test mesh-testbed up --kubernetes ... FAILED\n  MESH_E2E=1 but {why}");
        }
        Some(why) => eprintln!("\n## SKIPPED mesh-testbed up --kubernetes: {why}\n"),
        None => {
            let started = Instant::now();
            match kubernetes("ctk") {
                Ok(()) => println!(
                    "test mesh-testbed up --kubernetes/kubectl/status/check/exec/down (udp) ... ok ({:.1?})",
                    started.elapsed()
                ),
                Err(e) => {
                    failed += 1;
                    println!("test mesh-testbed up --kubernetes ... FAILED\n  {e:#}");
                }
            }
        }
    }
    println!("\nmesh-testbed CLI: {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
