//! One Kubernetes node of the testbed cluster: its own network, mount and UTS namespace, with
//! per-node directories bound over the standard paths, so containerd, kubelet, kube-proxy and
//! the unchanged DaemonSet (whose hostPaths are `/var/lib/mesh`, `/run/mesh`, `/opt/cni/bin`,
//! `/etc/cni/net.d`, `/run/xtables.lock`) each see a machine of their own.
//!
//! A holder process (`sleep infinity` after the set-up script) keeps the mount and UTS
//! namespaces; every daemon joins them and the network namespace with `nsenter`. All of them
//! get SIGKILL when the testbed process dies (`PR_SET_PDEATHSIG`); `Cluster::down` stops
//! containers first, because containerd's shims outlive their parent by design.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bed::die_with_parent;

/// The six kernel tunables kubelet insists on. They are global (not per network namespace):
/// kubelet runs with `--protect-kernel-defaults` and reads, in its node's mount namespace
/// only, files holding the values it expects, so it never writes the host's.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The reference plugins a node's `/opt/cni/bin` starts with (what the `kubernetes-cni`
/// package or a kind node image ships; containerd calls `loopback` for every pod).
const SEEDED_PLUGINS: [&str; 4] = ["loopback", "portmap", "bridge", "host-local"];

pub struct Daemon {
    pub what: String,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct KubeNode {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    /// Host-visible: `work/<node>`; its `etc-upper` is the node's `/etc` overlay.
    pub dir: PathBuf,
    pub control_plane: bool,
    holder: Option<Child>,
    pub daemons: Vec<Daemon>,
}

impl KubeNode {
    /// The node's `/etc` as the keeper writes it (the upper layer of its overlay).
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc-upper")
    }

    pub fn holder_pid(&self) -> Result<u32> {
        self.holder
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("node {} has no namespace holder", self.name))
    }

    /// The set-up script: per-node state over the standard paths, the node's hostname, the
    /// sysctl files kubelet reads. `/run` goes last: the node dir lives under the host's /run.
    fn init_script(&self) -> String {
        let d = self.dir.display();
        let mut s = format!(
            "set -eu\nD={d}\n\
             mkdir -p $D/lib/kubelet $D/lib/containerd $D/lib/mesh $D/lib/etcd $D/log $D/opt/cni/bin \
             $D/run/containerd $D/run/mesh $D/etc-upper $D/etc-work $D/sysctl\n\
             for p in {plugins}; do cp /usr/lib/cni/$p $D/opt/cni/bin/; done\n\
             mount --bind $D/lib /var/lib\n\
             mount --bind $D/log /var/log\n\
             mount --bind $D/opt /opt\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir=$D/etc-upper,workdir=$D/etc-work /etc\n\
             mkdir -p /etc/cni/net.d\n\
             hostname {name}\n",
            plugins = SEEDED_PLUGINS.join(" "),
            name = self.name,
        );
        for (path, value) in KUBELET_SYSCTLS {
            let file = path.replace('/', ".");
            s.push_str(&format!(
                "echo {value} > $D/sysctl/{file}\nmount --bind $D/sysctl/{file} /proc/sys/{path}\n"
            ));
        }
        s.push_str(
            "mount --bind $D/run /run\ntouch /run/xtables.lock\necho ready\nexec sleep infinity\n",
        );
        s
    }

    /// Creates the node's namespaces (the network namespace must exist and be wired).
    pub fn start(
        name: &str,
        netns: &str,
        address: Ipv4Addr,
        dir: PathBuf,
        control_plane: bool,
    ) -> Result<KubeNode> {
        std::fs::create_dir_all(&dir)?;
        let mut node = KubeNode {
            name: name.into(),
            netns: netns.into(),
            address,
            dir,
            control_plane,
            holder: None,
            daemons: Vec::new(),
        };
        let log = std::fs::File::create(node.dir.join("node-init.log"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .args([
                "--",
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
            ])
            .args(["sh", "-c", &node.init_script()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("start the node's namespace holder")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "setting up node {name}'s namespaces failed: {}",
                std::fs::read_to_string(node.dir.join("node-init.log")).unwrap_or_default()
            );
        }
        node.holder = Some(child);
        Ok(node)
    }

    /// A command inside the node (mount, UTS and network namespace), with `--wd=/`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.holder_pid()?.to_string()])
            .args(["--mount", "--uts", "--net", "--wd=/", "--"])
            .arg(program);
        Ok(cmd)
    }

    /// Runs a command inside the node; its output, Err when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<std::process::Output> {
        let out = self
            .command(program)?
            .args(args)
            .output()
            .with_context(|| format!("run {program} on {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {} on {} failed: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(out)
    }

    /// Starts a long-running daemon in the node, logging to `dir/<what>.log` (appended, so a
    /// restart keeps the earlier run's lines).
    pub fn spawn(&mut self, what: &str, program: &Path, args: Vec<String>) -> Result<()> {
        let mut d = Daemon {
            what: what.into(),
            program: program.to_path_buf(),
            args,
            child: None,
        };
        self.launch(&mut d)?;
        self.daemons.push(d);
        Ok(())
    }

    fn launch(&self, d: &mut Daemon) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", d.what)))?;
        let mut cmd = self.command(&d.program)?;
        cmd.args(&d.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        d.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {} on {}", d.what, self.name))?,
        );
        Ok(())
    }

    /// A daemon that exited by itself (its name and status), if any.
    pub fn exited(&mut self) -> Option<String> {
        for d in &mut self.daemons {
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    d.child = None;
                    return Some(format!("{} on {} exited ({status})", d.what, self.name));
                }
            }
        }
        None
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop_daemon(d: &mut Daemon, grace: Duration) {
        let Some(mut c) = d.child.take() else { return };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Stops and starts one daemon again with the same arguments (e.g. a kubelet restart).
    pub fn restart(&mut self, what: &str) -> Result<()> {
        let i = self
            .daemons
            .iter()
            .position(|d| d.what == what)
            .with_context(|| format!("no {what} on node {}", self.name))?;
        let mut d = self.daemons.remove(i);
        Self::stop_daemon(&mut d, Duration::from_secs(10));
        let r = self.launch(&mut d);
        self.daemons.insert(i, d);
        r
    }

    /// Stops one daemon (SIGTERM, SIGKILL after 10 s) and forgets it; false if none runs.
    pub fn stop_one(&mut self, what: &str) -> bool {
        match self.daemons.iter().position(|d| d.what == what) {
            Some(i) => {
                let mut d = self.daemons.remove(i);
                Self::stop_daemon(&mut d, Duration::from_secs(10));
                true
            }
            None => false,
        }
    }

    /// Stops every daemon, newest first (kube-proxy and kubelet before containerd, the
    /// apiserver before etcd), then the holder.
    pub fn stop(&mut self) {
        while let Some(mut d) = self.daemons.pop() {
            Self::stop_daemon(&mut d, Duration::from_secs(5));
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
    }

    /// The node's mount namespace as the kernel names it (`mnt:[…]`), to find processes
    /// left in it after a teardown.
    pub fn mount_namespace(&self) -> Option<String> {
        let pid = self.holder_pid().ok()?;
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .map(|l| l.display().to_string())
    }

    /// Ids of the containers containerd knows here (their cgroups are named after them).
    pub fn container_ids(&self) -> Vec<String> {
        self.run("ctr", &["-n", "k8s.io", "containers", "ls", "-q"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes what containerd started here (tasks, containers) while containerd still
    /// runs: its shims were re-parented away from us, so stopping containerd alone would
    /// leave containers running. Deleting a sandbox's task also ends the pod's other tasks,
    /// so single deletions may fail on a task already gone: what counts is whether anything
    /// is still listed after a few rounds. Returns what could not be removed.
    pub fn remove_containers(&self) -> Vec<String> {
        let ctr_list = |what: &str| -> Result<Vec<String>> {
            let out = self.run("ctr", &["-n", "k8s.io", what, "ls", "-q"])?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        };
        let mut problems = Vec::new();
        for (what, delete) in [
            ("tasks", &["delete", "--force"][..]),
            ("containers", &["delete"][..]),
        ] {
            let mut left = Vec::new();
            for _ in 0..3 {
                left = match ctr_list(what) {
                    Ok(l) => l,
                    Err(e) => {
                        left = vec![format!("(cannot list: {e:#})")];
                        break;
                    }
                };
                if left.is_empty() {
                    break;
                }
                for id in &left {
                    let mut args = vec!["-n", "k8s.io", what];
                    args.extend_from_slice(delete);
                    args.push(id);
                    let _ = self.run("ctr", &args);
                }
            }
            // What the last round did not remove (its deletions may have succeeded).
            if !left.is_empty() {
                left = ctr_list(what).unwrap_or(left);
            }
            if !left.is_empty() {
                problems.push(format!(
                    "{}: containerd {what} left: {}",
                    self.name,
                    left.join(" ")
                ));
            }
        }
        problems
    }
}

impl Drop for KubeNode {
    /// A safety net for error paths: `Cluster::down` stops nodes properly (containers
    /// first); a node dropped any other way at least takes its daemons and holder along.
    fn drop(&mut self) {
        self.stop();
    }
}
