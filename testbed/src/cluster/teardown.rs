//! Taking a node apart so that nothing is left: kubelet first, containers through containerd
//! (their shims are not our children), daemons, then checks for stray processes and cgroups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::node::KubeNode;

/// kubelet first (it would restart what we remove), then every container through
/// containerd, then the remaining daemons and the namespace holder. Then it checks — and
/// kills, by PID, what it finds: all of it was started by this node — for processes left in
/// the node's mount namespace (daemons, shims) or in a container's cgroup (pods have
/// namespaces of their own), and removes container cgroups (`k8s.io/<id>`). Returns what
/// was wrong.
pub(super) fn stop_node(n: &mut KubeNode) -> Vec<String> {
    n.stop_one("kubelet");
    let mount_ns: Vec<String> = n.mount_namespace().into_iter().collect();
    // Every container containerd knows, and every one it has a task directory for (also
    // when containerd itself is dead or does not answer).
    let mut containers = n.container_ids();
    containers.extend(task_dirs(
        &n.dir
            .join("run/containerd/io.containerd.runtime.v2.task/k8s.io"),
    ));
    containers.sort();
    containers.dedup();
    let mut problems = Vec::new();
    if n.daemons
        .iter()
        .any(|d| d.what == "containerd" && d.pid().is_some())
    {
        problems.extend(n.remove_containers());
    } else if !containers.is_empty() {
        problems.push(format!(
            "{}: containerd was not running to remove {} containers",
            n.name,
            containers.len()
        ));
    }
    n.stop();
    std::thread::sleep(Duration::from_millis(200));
    for pid in strays(&mount_ns, &containers) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        problems.push(format!(
            "{}: process {pid} ({}) was left running; killed",
            n.name,
            cmd.trim()
        ));
    }
    std::thread::sleep(Duration::from_millis(100));
    for id in &containers {
        for dir in container_cgroups(id) {
            // Empty once the container's processes are gone: rmdir is all a cgroup needs.
            if std::fs::remove_dir(&dir).is_err() && dir.exists() {
                problems.push(format!(
                    "{}: cgroup {} could not be removed",
                    n.name,
                    dir.display()
                ));
            }
        }
    }
    problems
}

/// Container ids containerd keeps a task (shim) directory for.
fn task_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// PIDs of processes in one of the mount namespaces `mount_ns` (`mnt:[…]`) or in the cgroup
/// of one of `containers`. (Not the node's network namespace alone: a user's
/// `mesh-testbed exec` shell is not ours to kill.)
fn strays(mount_ns: &[String], containers: &[String]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let in_mount_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|l| mount_ns.contains(&l.display().to_string()));
            in_mount_ns
                || std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cg| {
                    containers
                        .iter()
                        .any(|id| cg.contains(&format!("/k8s.io/{id}")))
                })
        })
        .collect()
}

/// Every cgroup directory of container `id` that still exists: `k8s.io/<id>` under each v1
/// hierarchy, or under the root of a unified (v2-only) mount.
fn container_cgroups(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join("k8s.io").join(id)];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        candidates.extend(
            hierarchies
                .flatten()
                .map(|h| h.path().join("k8s.io").join(id)),
        );
    }
    candidates.into_iter().filter(|d| d.is_dir()).collect()
}

/// What a keeper that died without tearing down left behind: containers and their shims
/// (shims outlive containerd by design; PR_SET_PDEATHSIG stopped every daemon). Found from
/// the task directories containerd keeps in each node's `/run` under `work`; killed by PID
/// (their cgroup or command line names the container) and their cgroups removed. Returns
/// what it did.
pub fn reap_orphans(work: &Path) -> Vec<String> {
    let Ok(nodes) = std::fs::read_dir(work) else {
        return Vec::new();
    };
    let mut containers = Vec::new();
    for n in nodes.flatten() {
        containers.extend(task_dirs(
            &n.path()
                .join("run/containerd/io.containerd.runtime.v2.task/k8s.io"),
        ));
    }
    if containers.is_empty() {
        return Vec::new();
    }
    let mut done = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return done;
    };
    for pid in procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let ours = containers.iter().any(|id| {
            cgroup.contains(&format!("/k8s.io/{id}"))
                || (cmdline.contains("containerd-shim") && cmdline.contains(id.as_str()))
        });
        if ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            done.push(format!(
                "killed left-over process {pid} ({})",
                cmdline.trim()
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for id in &containers {
        for dir in container_cgroups(id) {
            if std::fs::remove_dir(&dir).is_ok() {
                done.push(format!("removed cgroup {}", dir.display()));
            }
        }
    }
    done
}
