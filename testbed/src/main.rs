//! mesh-testbed: a whole mesh on one Linux machine, in network namespaces.
//!
//! `up` starts a keeper process (`mesh-testbed keep`, detached) that owns everything: a
//! private mount namespace with its own `/run/netns`, the underlay, the node namespaces
//! with their agents (which die with it) and the pods. The other commands talk to it over
//! a root-only unix socket in `/run/mesh-testbed/<name>/`, where the agents' sockets and
//! logs also live (so `meshctl --socket …` works from the host); `exec` enters its mount
//! namespace to run a command in a node or pod. `down` asks it to tear everything down and
//! checks that nothing is left; killing the keeper leaves nothing either (the namespaces
//! live in its private mount namespace).

mod keeper;
mod keeper_kube;
mod layout;
mod status;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "mesh-testbed",
    version,
    about = "A whole mesh on one Linux machine: node namespaces running mesh-agent, pods attached through mesh-cni (root)"
)]
struct Cli {
    /// Testbed name: prefix of every namespace and link (1-8 of a-z, 0-9).
    #[arg(long, global = true, default_value = "mt")]
    name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Vxlan,
    Udp,
    Auto,
    /// Odd nodes on `vxlan`, even nodes on `udp`.
    Mixed,
}

impl Backend {
    /// The `--dataplane` of node `i` (0-based).
    pub fn dataplane(self, i: usize) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::Udp => "udp",
            Backend::Auto => "auto",
            Backend::Mixed if i.is_multiple_of(2) => "vxlan",
            Backend::Mixed => "udp",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the underlay, start N nodes with M pods each, wait until the mesh is ready.
    /// With --kubernetes: a control-plane node and N worker nodes running Kubernetes 1.20.2,
    /// mesh installed with `kubectl apply -k deploy/`.
    Up {
        /// Nodes (default 3); with --kubernetes, worker nodes besides the control plane
        /// (default 2).
        #[arg(long)]
        nodes: Option<usize>,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        #[arg(long, value_enum, default_value = "vxlan")]
        backend: Backend,
        /// A real Kubernetes cluster (kubelet, containerd, kube-proxy per node) with mesh as
        /// its DaemonSet; needs `scripts/kube-apiserver.sh build` and `scripts/build-image.sh`.
        #[arg(long)]
        kubernetes: bool,
    },
    /// kubectl with the Kubernetes testbed's admin kubeconfig: `kubectl -- get pods -A`.
    Kubectl {
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// `meshctl status` of every node side by side, or one node's in full.
    Status {
        #[arg(long)]
        node: Option<String>,
    },
    /// Run a command inside a node or pod namespace: `exec n1 -- ip route`.
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The connectivity matrix and service/egress checks; exit 0 only if all pass.
    Check,
    /// Scripted faults (agent kill, partition, node delete, node add), each then checked.
    Chaos,
    /// Pod-to-pod TCP throughput and latency across nodes on the running testbed.
    Bench {
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// Remove everything the testbed created (safe to run twice).
    Down,
    /// The keeper process `up` starts (internal).
    #[command(hide = true)]
    Keep {
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        pods: usize,
        #[arg(long, value_enum)]
        backend: Backend,
        #[arg(long)]
        kubernetes: bool,
    },
}

/// Where a testbed keeps its control socket, layout, logs and agent sockets.
pub fn state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/mesh-testbed").join(name)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let name = cli.name.clone();
    if name.is_empty()
        || name.len() > 8
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("--name {name:?}: use 1 to 8 characters of a-z and 0-9 (it prefixes interface names, which are limited to 15)");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("mesh-testbed needs root (network namespaces, veth, bridges, iptables): run it with sudo");
    }
    match cli.cmd {
        Cmd::Keep {
            nodes,
            pods,
            backend,
            kubernetes: false,
        } => keeper::run(&name, nodes, pods, backend).map(|()| ExitCode::SUCCESS),
        Cmd::Keep {
            nodes,
            backend,
            kubernetes: true,
            ..
        } => keeper_kube::run(&name, nodes, kube_dataplane(backend)?).map(|()| ExitCode::SUCCESS),
        Cmd::Up {
            nodes,
            pods,
            backend,
            kubernetes,
        } => {
            let nodes = nodes.unwrap_or(if kubernetes { 2 } else { 3 });
            if kubernetes {
                kube_dataplane(backend)?;
            }
            up(&name, nodes, pods, backend, kubernetes)
        }
        Cmd::Kubectl { args } => kubectl(&name, &args),
        Cmd::Exec { target, command } => exec(&name, &target, &command),
        Cmd::Status { node } => status::status(&name, node.as_deref()),
        Cmd::Check => request(&name, "check"),
        Cmd::Chaos => request(&name, "chaos"),
        Cmd::Bench { seconds } => request(&name, &format!("bench {seconds}")),
        Cmd::Down => down(&name),
    }
}

fn keeper_pid(name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state_dir(name).join("keeper.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Alive and really our keeper (a recycled pid would run something else).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("mesh-testbed") && cmdline.contains("keep")).then_some(pid)
}

/// The DaemonSet's `MESH_DATAPLANE` for `--backend` (None: deploy/ as it is, `auto`).
fn kube_dataplane(backend: Backend) -> Result<Option<String>> {
    match backend {
        Backend::Auto => Ok(None),
        Backend::Vxlan | Backend::Udp => Ok(Some(backend_arg(backend).into())),
        Backend::Mixed => bail!(
            "--backend mixed is not available with --kubernetes yet (the DaemonSet sets one MESH_DATAPLANE for every node)"
        ),
    }
}

fn up(
    name: &str,
    nodes: usize,
    pods: usize,
    backend: Backend,
    kubernetes: bool,
) -> Result<ExitCode> {
    if kubernetes && !(1..=10).contains(&nodes) {
        bail!("--nodes (workers) must be 1 to 10 with --kubernetes: each node runs containerd, kubelet and kube-proxy");
    }
    if !(1..=100).contains(&nodes) || pods > 50 {
        bail!("--nodes must be 1 to 100 and --pods at most 50");
    }
    if kubernetes {
        let opts = mesh_testbed::cluster::ClusterOptions::from_repo(nodes, None)?;
        if let Some(why) = mesh_testbed::cluster::missing(&opts) {
            bail!("{why}");
        }
    }
    let missing: Vec<&str> = ["ip", "iptables", "iptables-restore", "ping"]
        .into_iter()
        .filter(|t| !mesh_testbed::gate::on_path(t))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (sudo scripts/install-deps.sh, or apt-get install iproute2 iptables iputils-ping)",
            missing.join(", ")
        );
    }
    mesh_testbed::bed::bin_dir()?;
    if !kubernetes {
        warn_about_neighbour_table(nodes, pods);
    }
    let dir = state_dir(name);
    if let Some(pid) = keeper_pid(name) {
        bail!("testbed {name:?} is already up (keeper pid {pid}); `mesh-testbed --name {name} down` first, or pick another --name");
    }
    for what in reap_kubernetes_leftovers(name) {
        eprintln!("{what}");
    }
    if dir.exists() {
        eprintln!(
            "cleaning up what an interrupted run of testbed {name:?} left in {}",
            dir.display()
        );
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let log = std::fs::File::create(dir.join("keeper.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--name", name, "keep"])
        .args(["--nodes", &nodes.to_string(), "--pods", &pods.to_string()])
        .args(["--backend", backend_arg(backend)])
        .args(kubernetes.then_some("--kubernetes"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    // Its own session: a Ctrl-C in this terminal after `up` returns must not reach it.
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("start the keeper process")?;
    let stdout = child.stdout.take().context("keeper stdout")?;
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line == keeper::READY {
            ready = true;
            break;
        }
        println!("{line}");
    }
    if !ready {
        let status = child.wait()?;
        let log = std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let kept = std::env::temp_dir().join(format!("mesh-testbed-{name}-failed.log"));
        let _ = std::fs::write(&kept, &log);
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "the testbed did not come up ({status}); the keeper's last words:\n{}\n(the whole log: {})",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            kept.display()
        );
    }
    let l = layout::Layout::load(name)?;
    if l.kubernetes {
        println!(
            "\nKubernetes testbed {name:?} is up in {:.1?}: {} nodes ({}), mesh installed by kubectl apply -k deploy/",
            started.elapsed(),
            l.nodes.len(),
            l.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(" ")
        );
        println!(
            "  logs:         {}/<node>/{{kubelet,containerd,kube-proxy,kube-apiserver,…}}.log",
            mesh_testbed::cluster::work_dir(name).display()
        );
        println!("  kubectl:      mesh-testbed --name {name} kubectl -- get pods -A -o wide");
        println!("  next:         mesh-testbed --name {name} status | check | exec cp -- ip route | down");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "\ntestbed {name:?} is up in {:.1?}: {} nodes ({}), {} pods",
        started.elapsed(),
        l.nodes.len(),
        backend_arg(backend),
        l.pods.len()
    );
    println!("  keeper log:   {}", dir.join("keeper.log").display());
    if let Some(n) = l.nodes.first() {
        println!(
            "  agent logs:   {}/<node>/agent.log",
            dir.join("work").display()
        );
        println!("  meshctl:      meshctl --socket {} status", n.socket);
    }
    println!("  next:         mesh-testbed --name {name} status | check | chaos | bench | exec n1 -- ip route | down");
    Ok(ExitCode::SUCCESS)
}

/// All namespaces share the kernel's one ARP table (`gc_thresh3` entries, 1024 by default).
/// A big testbed needs more: each node holds a permanent entry per other node, and pods hold
/// one per address they talk to (the range is on-link); past the limit the kernel logs
/// "neighbor table overflow" and drops packets. Say so instead of failing mysteriously.
fn warn_about_neighbour_table(nodes: usize, pods: usize) {
    let limit: usize = std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1024);
    let all_pods = nodes * pods;
    let needed = nodes * nodes + all_pods * (all_pods + nodes);
    if needed > limit {
        eprintln!(
            "warning: this testbed may need ~{needed} ARP entries, and the kernel's table holds \
             {limit} across all namespaces (net.ipv4.neigh.default.gc_thresh3); past it packets \
             are dropped (dmesg: \"neighbor table overflow\"). Raise it host-wide if checks \
             fail: sysctl -w net.ipv4.neigh.default.gc_thresh3={} \
             net.ipv4.neigh.default.gc_thresh2={}",
            (needed * 2).next_power_of_two(),
            needed.next_power_of_two()
        );
    }
}

fn backend_arg(b: Backend) -> &'static str {
    match b {
        Backend::Vxlan => "vxlan",
        Backend::Udp => "udp",
        Backend::Auto => "auto",
        Backend::Mixed => "mixed",
    }
}

/// Sends one request to the keeper and copies its output; the exit code is the keeper's.
fn request(name: &str, what: &str) -> Result<ExitCode> {
    request_code(name, what).map(ExitCode::from)
}

fn request_code(name: &str, what: &str) -> Result<u8> {
    let path = state_dir(name).join(keeper::SOCKET);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!("no testbed named {name:?} is up (cannot reach {}); start one with `mesh-testbed --name {name} up`", path.display())
    })?;
    writeln!(s, "{what}")?;
    let mut code: u8 = 1;
    let stdout = std::io::stdout();
    for line in BufReader::new(s).lines() {
        let line = line?;
        if let Some(c) = line.strip_prefix(keeper::EXIT) {
            code = c.trim().parse().unwrap_or(1);
            break;
        }
        let mut o = stdout.lock();
        writeln!(o, "{line}")?;
        o.flush()?;
    }
    Ok(code)
}

fn exec(name: &str, target: &str, command: &[String]) -> Result<ExitCode> {
    let l = layout::Layout::load(name)?;
    let netns = l.netns_of(target).with_context(|| {
        format!(
            "no node or pod named {target:?} in testbed {name:?} (nodes: {}; pods: {})",
            l.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            l.pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    })?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &netns]).args(command);
    exec_in_testbed(name, cmd)
}

/// kubectl with the cluster's admin kubeconfig, in the control plane's network namespace
/// (the apiserver listens on the underlay, which only the testbed's namespaces reach).
fn kubectl(name: &str, args: &[String]) -> Result<ExitCode> {
    let l = layout::Layout::load(name)?;
    if !l.kubernetes {
        bail!("testbed {name:?} is not a Kubernetes testbed (start one with `mesh-testbed --name {name} up --kubernetes`)");
    }
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &l.control_plane_netns])
        .arg(mesh_testbed::kube::cache_bin().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&l.kubeconfig)
        .args(args);
    exec_in_testbed(name, cmd)
}

/// Replaces this process with `cmd`, run in testbed `name`'s mount namespace (its network
/// namespaces are mounts there): joins the keeper's — this process is still
/// single-threaded — then execs.
fn exec_in_testbed(name: &str, mut cmd: std::process::Command) -> Result<ExitCode> {
    let pid = keeper_pid(name).with_context(|| format!("testbed {name:?} is not up"))?;
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    nix::sched::setns(&mnt, nix::sched::CloneFlags::CLONE_NEWNS)
        .context("join the testbed's mount namespace")?;
    let err = std::os::unix::process::CommandExt::exec(&mut cmd);
    Err(err).with_context(|| format!("exec {:?}", cmd.get_program()))
}

/// A Kubernetes testbed whose keeper died without tearing down (killed) leaves containers
/// and their shims running and its nodes' files on disk: kill the former, remove the latter.
fn reap_kubernetes_leftovers(name: &str) -> Vec<String> {
    let work = mesh_testbed::cluster::work_dir(name);
    if !work.exists() {
        return Vec::new();
    }
    let mut done = mesh_testbed::cluster::reap_orphans(&work);
    match std::fs::remove_dir_all(&work) {
        Ok(()) => done.push(format!("removed {}", work.display())),
        Err(e) => done.push(format!("cannot remove {}: {e}", work.display())),
    }
    done
}

fn down(name: &str) -> Result<ExitCode> {
    let dir = state_dir(name);
    let Some(pid) = keeper_pid(name) else {
        for what in reap_kubernetes_leftovers(name) {
            println!("{what}");
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
            println!(
                "testbed {name:?} was not running; removed what an interrupted run left in {}",
                dir.display()
            );
        } else {
            println!("no testbed named {name:?}: nothing to do");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let agents = layout::Layout::load(name)
        .map(|l| l.agent_pids.clone())
        .unwrap_or_default();
    // Ask the keeper to tear down; it exits when done (non-zero if it found leftovers).
    let keeper_code = request_code(name, "down").unwrap_or(1);
    let started = Instant::now();
    let gone = |p: i32| !std::path::Path::new(&format!("/proc/{p}")).exists();
    // A Kubernetes testbed stops kubelets and containers node by node: allow it longer.
    while !gone(pid) && started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !gone(pid) {
        eprintln!("the keeper (pid {pid}) did not stop within 300 s; killing it");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Agents die with their keeper (PR_SET_PDEATHSIG); give them a moment, then make sure.
    let deadline = Instant::now() + Duration::from_secs(5);
    while agents.iter().any(|p| !gone(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in agents.iter().filter(|p| !gone(**p)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let reaped = reap_kubernetes_leftovers(name);
    for what in &reaped {
        println!("{what}");
    }
    let left: Vec<i32> = agents.into_iter().filter(|p| !gone(*p)).collect();
    std::fs::remove_dir_all(&dir).ok();
    if !left.is_empty() || !gone(pid) {
        bail!("processes still running after down: keeper {pid}, agents {left:?}");
    }
    if keeper_code != 0 || !reaped.is_empty() {
        bail!("the keeper reported problems tearing down, or left containers behind (above)");
    }
    println!(
        "testbed {name:?} is down ({:.1?}): no namespace, link or process of it is left",
        started.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}
