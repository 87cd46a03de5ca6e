//! Namespaces, agents and pods of one testbed. Names carry a per-process prefix so two
//! testbeds (or a leftover) never collide; everything is removed on drop.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cni::{Attachment, Conflist, Runner};

mod agents;

/// The underlay subnet the node namespaces share (inside our own namespaces only).
const UNDERLAY_NET: [u8; 3] = [192, 168, 77];

/// Where the reference plugins live on Debian (`containernetworking-plugins`).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `--ipalloc-init` (default: consensus over the nodes started together).
    pub ipalloc_init: Option<String>,
    pub dataplane: String,
    pub extra: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            ipalloc_init: None,
            dataplane: "vxlan".into(),
            extra: Vec::new(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    agent: Option<Child>,
    /// Taken out of the testbed by `remove_node`.
    pub removed: bool,
    /// Its `--dataplane`.
    pub dataplane: String,
    /// Runs with only the rights deploy/'s DaemonSet gives it (see `confine_agent`).
    confined: bool,
}

impl Node {
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }
}

pub struct Pod {
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub attachment: Attachment,
    /// The conflist's final ADD result (what a runtime caches for DEL and CHECK).
    pub result: Option<Value>,
    pub address: Option<Ipv4Addr>,
}

pub struct Testbed {
    pub prefix: String,
    pub work: PathBuf,
    pub bin_dir: PathBuf,
    pub underlay: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    secret: PathBuf,
}

/// Makes the child get SIGKILL when this process dies, however it dies (so an
/// interrupted test leaves no agent or containerd running).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a command; Err with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// The directory holding `mesh-agent`, `mesh-cni` and `meshctl`: `MESH_BIN_DIR`, else
/// the directory of the running program (the `mesh-testbed` command sits next to them),
/// else its parent (a test binary lives in `target/<profile>/deps/`).
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("MESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let own = exe.parent().context("cannot locate the target directory")?;
            if own.join("mesh-agent").is_file() {
                own.to_path_buf()
            } else {
                own.parent()
                    .map(Path::to_path_buf)
                    .context("cannot locate the target directory")?
            }
        }
    };
    for b in ["mesh-agent", "mesh-cni", "meshctl"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} is missing: build the binaries first (`cargo build --workspace --bins --profile test`, as scripts/test-all.sh does) or set MESH_BIN_DIR",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

impl Testbed {
    /// A new, empty testbed: the underlay namespace with its bridge. Call only inside
    /// `privns::enter_private_mounts`.
    pub fn new(tag: &str) -> Result<Testbed> {
        Testbed::with_prefix(&format!("{tag}{:05x}", std::process::id() & 0xfffff), None)
    }

    /// Like `new` with the exact name prefix and work directory (the `mesh-testbed`
    /// command keeps sockets and logs where the host can see them).
    pub fn with_prefix(prefix: &str, work: Option<PathBuf>) -> Result<Testbed> {
        let prefix = prefix.to_string();
        let work = work.unwrap_or_else(|| crate::privns::scratch_dir().join(&prefix));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let secret = work.join("cluster-secret");
        let mut random = [0u8; 32];
        {
            use std::io::Read;
            std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        }
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex)?;
        let underlay = format!("{prefix}-ul");
        let tb = Testbed {
            prefix,
            work,
            bin_dir: bin_dir()?,
            underlay: underlay.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            secret,
        };
        run("ip", &["netns", "add", &underlay])?;
        tb.ns(&underlay, &["ip", "link", "set", "lo", "up"])?;
        tb.ns(&underlay, &["ip", "link", "add", "ul0", "type", "bridge"])?;
        tb.ns(&underlay, &["ip", "link", "set", "ul0", "up"])?;
        Ok(tb)
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Runs `args` inside namespace `ns`; Err when it fails.
    pub fn ns(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `args` inside `ns` and returns the output whatever the exit status.
    pub fn ns_output(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()?)
    }

    /// A namespace `netns` whose `eth0` (address `ip`/24) is plugged into the underlay
    /// bridge through the veth end `ul_end`.
    fn host_on_underlay(&self, netns: &str, ul_end: &str, ip: Ipv4Addr) -> Result<()> {
        run("ip", &["netns", "add", netns])?;
        self.ns(netns, &["ip", "link", "set", "lo", "up"])?;
        let ul = self.underlay.as_str();
        self.ns(
            ul,
            &[
                "ip", "link", "add", ul_end, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        self.ns(ul, &["ip", "link", "set", ul_end, "master", "ul0", "up"])?;
        self.ns(
            netns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        self.ns(netns, &["ip", "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// `ping -c 1` from namespace `from_ns`; true when answered within 2 s.
    pub fn pings(&self, from_ns: &str, to: Ipv4Addr) -> Result<bool> {
        Ok(self
            .ns_output(from_ns, &["ping", "-c", "1", "-W", "2", &to.to_string()])?
            .status
            .success())
    }

    /// Host ends of pod veths (`vmesh…`) in node `i`'s namespace.
    pub fn host_veths(&self, i: usize) -> Result<Vec<String>> {
        let out = self.ns(&self.nodes[i].netns, &["ip", "-o", "link", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("vmesh"))
            .collect())
    }

    /// (container id, address) of every allocation node `i`'s agent holds.
    pub fn allocations(&self, i: usize) -> Result<Vec<(String, String)>> {
        let v = crate::probe::agent_get(&self.nodes[i].socket, "/v1/allocations")?;
        let field = |a: &Value, k: &str| a[k].as_str().unwrap_or_default().to_string();
        Ok(v["allocations"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|a| (field(a, "container_id"), field(a, "address")))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Adds a node namespace on the underlay (its agent is started separately).
    pub fn add_node(&mut self, opts: &AgentOptions) -> Result<usize> {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let netns = format!("{}-{name}", self.prefix);
        let ip = Ipv4Addr::new(
            UNDERLAY_NET[0],
            UNDERLAY_NET[1],
            UNDERLAY_NET[2],
            i as u8 + 1,
        );
        let ul_end = format!("{}{name}", self.prefix);
        self.host_on_underlay(&netns, &ul_end, ip)?;
        // Like a real node: a default route to the underlay's router (.254; see
        // `add_external` for a host there).
        let router = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], 254);
        self.ns(
            &netns,
            &["ip", "route", "add", "default", "via", &router.to_string()],
        )?;
        let dir = self.work.join(&name);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("mesh.sock");
        let mut args: Vec<String> = vec![
            "--node-name".into(),
            name.clone(),
            "--listen".into(),
            "0.0.0.0:6783".into(),
            "--advertise-addr".into(),
            ip.to_string(),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:6782".into(),
            "--dataplane".into(),
            opts.dataplane.clone(),
        ];
        if let Some(init) = &opts.ipalloc_init {
            args.push("--ipalloc-init".into());
            args.push(init.clone());
        }
        args.extend(opts.extra.iter().cloned());
        self.nodes.push(Node {
            name,
            netns,
            underlay_ip: ip,
            log: dir.join("agent.log"),
            dir,
            socket,
            args,
            agent: None,
            removed: false,
            dataplane: opts.dataplane.clone(),
            confined: false,
        });
        Ok(i)
    }

    /// A host outside the cluster range on the underlay (an "external" server), as a
    /// namespace named `<prefix>-<name>`; returns the namespace.
    pub fn add_external(&mut self, name: &str, ip: Ipv4Addr) -> Result<String> {
        let netns = format!("{}-{name}", self.prefix);
        let ul_end = format!("{}{name}", self.prefix);
        self.host_on_underlay(&netns, &ul_end, ip)?;
        Ok(netns)
    }

    /// The external host `name` at `ip`, made on first use (cases share it).
    pub fn external_host(&mut self, name: &str, ip: Ipv4Addr) -> Result<String> {
        let suffix = format!("-{name}");
        match self
            .leftover_namespaces()
            .into_iter()
            .find(|n| n.ends_with(&suffix))
        {
            Some(ns) => Ok(ns),
            None => self.add_external(name, ip),
        }
    }

    /// Takes node `i`'s link to the underlay down (a partition) or back up.
    pub fn set_underlay_link(&self, i: usize, up: bool) -> Result<()> {
        let ul_end = format!("{}{}", self.prefix, self.nodes[i].name);
        let state = if up { "up" } else { "down" };
        self.ns(&self.underlay, &["ip", "link", "set", &ul_end, state])?;
        Ok(())
    }

    /// Removes node `i` for good: its agent, its pods and its namespace (the node keeps
    /// its index, marked `removed`, so other indices stay valid).
    pub fn remove_node(&mut self, i: usize) -> Result<()> {
        self.stop_agent(i)?;
        let pods: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.node == i)
            .map(|p| p.netns.clone())
            .collect();
        for ns in pods.iter().chain(std::iter::once(&self.nodes[i].netns)) {
            run("ip", &["netns", "del", ns])?;
        }
        self.pods.retain(|p| p.node != i);
        self.nodes[i].removed = true;
        Ok(())
    }

    /// The plugin runner for node `i` (our binaries first, then the reference plugins).
    pub fn runner(&self, i: usize) -> Runner {
        Runner {
            node_netns: self.nodes[i].netns.clone(),
            bin_dirs: vec![self.bin_dir.clone(), PathBuf::from(REFERENCE_PLUGINS)],
        }
    }

    pub fn conflist(&self, i: usize, version: &str, then: &[Value]) -> Conflist {
        Conflist::mesh(version, &self.nodes[i].socket.display().to_string(), then)
    }

    /// A pod namespace on node `i`, not attached yet.
    pub fn new_pod(&mut self, node: usize, name: &str) -> Result<usize> {
        let netns = format!("{}-{name}", self.prefix);
        run("ip", &["netns", "add", &netns])?;
        self.ns(&netns, &["ip", "link", "set", "lo", "up"])?;
        let container_id = format!("{}{name}", self.prefix).replace('-', "");
        self.pods.push(Pod {
            name: name.to_string(),
            node,
            attachment: Attachment {
                container_id,
                netns: format!("/run/netns/{netns}"),
                ifname: "eth0".into(),
                cni_args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
            },
            netns,
            result: None,
            address: None,
        });
        Ok(self.pods.len() - 1)
    }

    /// A pod attached through `list` (ADD through the whole chain).
    pub fn add_pod(
        &mut self,
        node: usize,
        name: &str,
        list: &Conflist,
        runtime: &Value,
    ) -> Result<usize> {
        let p = self.new_pod(node, name)?;
        let att = self.pods[p].attachment.clone();
        match self.runner(node).add(list, &att, runtime)? {
            Ok(result) => {
                let address = result["ips"]
                    .as_array()
                    .and_then(|ips| ips.iter().find_map(|ip| ip["address"].as_str()))
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok());
                self.pods[p].result = Some(result);
                self.pods[p].address = address;
                Ok(p)
            }
            Err(call) => bail!("ADD of pod {name} failed: {call}"),
        }
    }

    /// Tail of each agent log (for failure reports).
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "---- {} ({}) last {lines} lines\n",
                n.name,
                n.log.display()
            ));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Namespaces of this testbed that still exist.
    pub fn leftover_namespaces(&self) -> Vec<String> {
        run("ip", &["netns", "list"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| n.starts_with(&self.prefix))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn down(&mut self) {
        // All agents at once (SIGTERM, then SIGKILL after 5 s): one after the other, a big
        // testbed would take seconds per node.
        let mut running: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take())
            .collect();
        for c in &running {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !running.is_empty() && Instant::now() < deadline {
            running.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut c in running {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.leftover_namespaces() {
            let _ = run("ip", &["netns", "del", &ns]);
        }
        self.pods.clear();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.down();
    }
}
