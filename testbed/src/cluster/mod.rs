//! A real Kubernetes 1.20.2 cluster on one machine, with mesh installed as users install it:
//! `kubectl apply -k deploy/`. A control-plane node (etcd, kube-apiserver,
//! kube-controller-manager with node CIDR allocation off, kube-scheduler) and N workers;
//! every node — the control plane too, so it reaches pod addresses — runs its own containerd,
//! kubelet and kube-proxy (iptables mode) in its own network, mount and UTS namespace
//! (`node.rs`). The binaries come from `scripts/kube-apiserver.sh build`, the images from
//! `scripts/build-image.sh`, imported into every node's containerd.
//!
//! Nothing of mesh is started by hand: the DaemonSet's pods are the agents, its init
//! container installs mesh-cni and the conflist, and nodes turn Ready only then.

mod api;
mod components;
pub mod node;
pub mod pki;
mod teardown;
pub mod workloads;

pub use api::{condition, items, PodState};
pub use teardown::reap_orphans;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bed::{run, Testbed};
use node::KubeNode;
use pki::{Identity, Pki};

/// Where the `mesh-testbed` command keeps a Kubernetes testbed's nodes (containerd's images
/// and snapshots, etcd, logs): on disk, not in `/run` (a small tmpfs on most hosts).
pub fn work_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/tmp/mesh-testbed").join(name)
}

/// The underlay address of the control-plane node; workers follow it.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
/// A host on the underlay outside the cluster (NodePort clients).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 250);
pub const APISERVER_PORT: u16 = 6443;
pub const SERVICE_RANGE: &str = "10.96.0.0/16";
/// The `kubernetes` Service (first address of the range): pods and agents reach the
/// apiserver there, through kube-proxy.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// mesh's pod range (kube-proxy's `--cluster-cidr`: what it does not masquerade).
pub const POD_RANGE: &str = "10.32.0.0/12";
pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub workers: usize,
    /// `MESH_DATAPLANE` of the DaemonSet (`auto`, `vxlan`, `udp`); None: deploy/ unchanged.
    pub dataplane: Option<String>,
    /// The image tag deploy/kustomization.yaml names.
    pub tag: String,
    /// Where `scripts/build-image.sh` put the archives.
    pub images: PathBuf,
    /// The repository's deploy/ directory.
    pub deploy: PathBuf,
}

impl ClusterOptions {
    /// Defaults from the checkout this testbed was built from.
    pub fn from_repo(workers: usize, dataplane: Option<String>) -> Result<ClusterOptions> {
        let repo = repo_root();
        let deploy = repo.join("deploy");
        let kustomization = std::fs::read_to_string(deploy.join("kustomization.yaml"))
            .with_context(|| format!("read {}", deploy.join("kustomization.yaml").display()))?;
        let tag = kustomization
            .lines()
            .find_map(|l| l.trim().strip_prefix("newTag:"))
            .map(|t| t.trim().to_string())
            .context("deploy/kustomization.yaml names no image tag (newTag)")?;
        Ok(ClusterOptions {
            workers,
            dataplane,
            tag,
            images: std::env::var_os("MESH_IMAGE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join("target").join("images")),
            deploy,
        })
    }

    pub fn image_archives(&self) -> Vec<PathBuf> {
        vec![
            self.images.join("pause-3.2.oci.tar"),
            self.images.join(format!("mesh-{}.oci.tar", self.tag)),
            self.images.join(format!("mesh-probe-{}.oci.tar", self.tag)),
        ]
    }
}

/// The checkout (testbed/..), where deploy/ and scripts/ are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why a cluster cannot be built here, if it cannot: binaries, images or tools missing.
pub fn missing(opts: &ClusterOptions) -> Option<String> {
    let bin = crate::kube::cache_bin();
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
    ] {
        if !bin.join(b).is_file() {
            return Some(format!(
                "no {b} in {}: run `sudo scripts/kube-apiserver.sh build` (~6-7 min once)",
                bin.display()
            ));
        }
    }
    for a in opts.image_archives() {
        if !a.is_file() {
            return Some(format!(
                "no image archive {}: run `sudo scripts/build-image.sh`",
                a.display()
            ));
        }
    }
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "etcd",
        "nsenter",
        "unshare",
        "conntrack",
    ] {
        if !crate::gate::on_path(tool) {
            return Some(format!(
                "{tool} is missing: sudo scripts/install-deps.sh (containerd, runc, etcd-server, util-linux, conntrack)"
            ));
        }
    }
    None
}

/// Polls `f` every 250 ms until it returns Some, for at most `within`; the value and how
/// long it took. The error names `what` and the last reason `f` gave.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<(T, Duration)> {
    let started = Instant::now();
    let mut last = String::from("not checked yet");
    loop {
        match f() {
            Ok(Some(v)) => return Ok((v, started.elapsed())),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > within {
            bail!("{what}: not within {within:?} (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub struct Cluster {
    /// The underlay (bridge namespace) and the outside host; its nodes list stays empty.
    pub tb: Testbed,
    pub nodes: Vec<KubeNode>,
    pub opts: ClusterOptions,
    pki: Pki,
    /// Admin kubeconfig (host-visible path; kubectl runs in the control plane's netns).
    pub kubeconfig: PathBuf,
    /// The outside host's network namespace.
    pub outside: String,
    /// Times of the set-up steps, for `up`'s report and the benchmark.
    pub timings: Vec<(String, Duration)>,
    /// Every node reported NotReady for want of a pod network before mesh was applied.
    pub not_ready_before_mesh: bool,
    /// Extra names given to imported images (`tag_image`), repeated on nodes added later.
    extra_tags: Vec<(String, String)>,
    /// containerd's `k8s.io` cgroups existed before this cluster (not ours to remove).
    cgroup_parent_existed: bool,
}

/// containerd's parent cgroups for the `k8s.io` namespace, as they exist now.
fn cgroup_parents() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut all = vec![root.join("k8s.io")];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        all.extend(hierarchies.flatten().map(|h| h.path().join("k8s.io")));
    }
    all.into_iter().filter(|d| d.is_dir()).collect()
}

impl Cluster {
    /// Builds the whole cluster and installs mesh; returns once every node is Ready and
    /// every mesh pod is ready. Call inside `privns::enter_private_mounts`.
    pub fn up(
        prefix: &str,
        work: Option<PathBuf>,
        opts: ClusterOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Cluster> {
        if let Some(why) = missing(&opts) {
            bail!("{why}");
        }
        let started = Instant::now();
        let tb = Testbed::with_prefix(prefix, work)?;
        let kubeconfig = tb.work.join("admin.conf");
        let mut c = Cluster {
            outside: String::new(),
            tb,
            nodes: Vec::new(),
            opts,
            pki: Pki::new()?,
            kubeconfig,
            timings: Vec::new(),
            not_ready_before_mesh: false,
            extra_tags: Vec::new(),
            cgroup_parent_existed: !cgroup_parents().is_empty(),
        };
        let admin = Identity::new("admin", "kubernetes-admin", Some("system:masters"));
        let admin_dir = c.tb.work.join("admin-pki");
        c.pki.write_client(&admin_dir, &admin)?;
        std::fs::write(
            &c.kubeconfig,
            Pki::kubeconfig(&apiserver_url(), &admin_dir.display().to_string(), &admin),
        )?;
        c.outside = c.tb.add_external("out", OUTSIDE_IP)?;
        c.add_node(true)?;
        for _ in 0..c.opts.workers {
            c.add_node(false)?;
        }
        c.mark("node namespaces, containerd and images", started);
        progress(&format!(
            "{} nodes: namespaces, containerd, images imported",
            c.nodes.len()
        ));
        c.start_control_plane()?;
        c.mark("control plane ready", started);
        progress("control plane ready (etcd, apiserver, controller-manager, scheduler)");
        for i in 0..c.nodes.len() {
            c.start_kubelet_and_proxy(i)?;
        }
        let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
        wait_for(
            "every kubelet registered its Node",
            Duration::from_secs(120),
            || {
                let got = c.node_names()?;
                Ok(names.iter().all(|n| got.contains(n)).then_some(()))
            },
        )?;
        c.kubectl_ok(&[
            "label",
            "node",
            &c.nodes[0].name,
            "node-role.kubernetes.io/master=",
            "node-role.kubernetes.io/control-plane=",
            "--overwrite",
        ])?;
        // kubelet holds a node NotReady while the runtime reports no CNI configuration.
        c.not_ready_before_mesh = wait_for(
            "every node NotReady for want of a pod network",
            Duration::from_secs(60),
            || {
                let v = c.get_json(&["nodes"])?;
                let waiting = items(&v).iter().all(|n| {
                    let ready = n["status"]["conditions"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
                    ready.is_some_and(|r| {
                        r["status"] == "False"
                            && r["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("cni") || m.contains("network"))
                    })
                });
                Ok(waiting.then_some(true))
            },
        )?
        .0;
        c.mark(
            "kubelets registered (nodes NotReady: no pod network yet)",
            started,
        );
        progress("kubelets registered; nodes NotReady until mesh installs its CNI config");
        let (applied, ready) = c.install_mesh()?;
        c.timings.push(("kubectl apply -k deploy/".into(), applied));
        c.timings.push(("apply -> every node Ready".into(), ready));
        progress(&format!(
            "mesh installed: kubectl apply -k -> every node Ready in {ready:.1?}"
        ));
        Ok(c)
    }

    fn mark(&mut self, what: &str, since: Instant) {
        self.timings.push((what.into(), since.elapsed()));
    }

    /// The next node: its namespaces on the underlay, credentials, containerd, images.
    pub fn add_node(&mut self, control_plane: bool) -> Result<usize> {
        let i = self.nodes.len();
        let (name, address) = if control_plane {
            ("cp".to_string(), CONTROL_PLANE_IP)
        } else {
            // Never a name or address a removed node had while it could still be known.
            let n = self
                .nodes
                .iter()
                .filter_map(|n| n.name.strip_prefix('w')?.parse::<usize>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let last = self
                .nodes
                .iter()
                .map(|n| n.address.octets()[3])
                .max()
                .unwrap_or(10);
            (format!("w{n}"), Ipv4Addr::new(192, 168, 77, last + 1))
        };
        if self.nodes.iter().any(|n| n.name == name) {
            bail!("node {name} exists already");
        }
        let netns = self.tb.add_external(&name, address)?;
        self.tb.ns(
            &netns,
            &["ip", "route", "add", "default", "via", "192.168.77.254"],
        )?;
        self.tb
            .ns(&netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let dir = self.tb.work.join(&name);
        self.write_node_config(&dir.join("etc-upper"), &name, address, control_plane)?;
        // In the list from here on, so a failure below is torn down with the rest.
        self.nodes
            .push(KubeNode::start(&name, &netns, address, dir, control_plane)?);
        let node = &mut self.nodes[i];
        node.spawn(
            "containerd",
            Path::new("containerd"),
            vec!["--config".into(), "/etc/containerd/config.toml".into()],
        )?;
        let node = &self.nodes[i];
        wait_for(
            &format!("containerd on {name} answers"),
            Duration::from_secs(30),
            || Ok(node.run("ctr", &["version"]).ok().map(|_| ())),
        )?;
        for archive in self.opts.image_archives() {
            node.run(
                "ctr",
                &[
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    &archive.display().to_string(),
                ],
            )
            .with_context(|| format!("import {} on {name}", archive.display()))?;
        }
        for (from, to) in &self.extra_tags {
            node.run(
                "ctr",
                &["-n", "k8s.io", "images", "tag", "--force", from, to],
            )?;
        }
        Ok(i)
    }

    /// Gives image `from` the name `to` on every node, now and on nodes added later (what
    /// pushing a new tag to a registry does for a real cluster).
    pub fn tag_image(&mut self, from: &str, to: &str) -> Result<()> {
        for n in &self.nodes {
            n.run(
                "ctr",
                &["-n", "k8s.io", "images", "tag", "--force", from, to],
            )?;
        }
        self.extra_tags.push((from.into(), to.into()));
        Ok(())
    }

    /// `kubectl apply -k` of a copy of deploy/ (plus the generated cluster secret; with a
    /// data plane chosen, through an overlay that sets only `MESH_DATAPLANE`), then waits for
    /// every node Ready and every mesh pod ready. Returns (apply took, apply -> all Ready).
    fn install_mesh(&mut self) -> Result<(Duration, Duration)> {
        let copy = self.tb.work.join("deploy");
        copy_dir(&self.opts.deploy, &copy)?;
        let secret = pki_random_secret()?;
        std::fs::write(copy.join("cluster-secret"), secret)?;
        let target = match &self.opts.dataplane {
            None => copy.clone(),
            Some(dp) => {
                let overlay = self.tb.work.join("deploy-overlay");
                std::fs::create_dir_all(&overlay)?;
                std::fs::write(
                    overlay.join("kustomization.yaml"),
                    format!(
                        // kubectl 1.20's kustomize wants relative bases.
                        "# mesh-testbed: deploy/ with MESH_DATAPLANE={dp}\nbases:\n  - ../deploy\npatchesStrategicMerge:\n  - dataplane.yaml\n"
                    ),
                )?;
                std::fs::write(
                    overlay.join("dataplane.yaml"),
                    format!(
                        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: mesh, namespace: mesh-system}}\nspec:\n  template:\n    spec:\n      containers:\n        - name: agent\n          env:\n            - {{name: MESH_DATAPLANE, value: {dp}}}\n"
                    ),
                )?;
                overlay
            }
        };
        let started = Instant::now();
        self.kubectl_ok(&["apply", "-k", &target.display().to_string()])?;
        let applied = started.elapsed();
        let want = self.nodes.len();
        wait_for("every node Ready", Duration::from_secs(240), || {
            Ok((self.ready_nodes()?.len() == want).then_some(()))
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.diagnose()))?;
        let ready = started.elapsed();
        self.wait_mesh_rolled_out(Duration::from_secs(120))?;
        // kubelet marks a node Ready once the conflist exists; the agent sets
        // NetworkUnavailable=False once its bridge and tunnel are programmed, moments later.
        let ((), took) = wait_for(
            "NetworkUnavailable=False (MeshIsUp) on every node",
            Duration::from_secs(30),
            || {
                let v = self.get_json(&["nodes"])?;
                let all = items(&v).iter().all(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c["type"] == "NetworkUnavailable"
                                && c["status"] == "False"
                                && c["reason"] == "MeshIsUp"
                        })
                    })
                });
                Ok(all.then_some(()))
            },
        )?;
        self.timings.push((
            "every node Ready -> NetworkUnavailable=False on all".into(),
            took,
        ));
        Ok((applied, ready))
    }

    /// Every mesh pod ready, one per node.
    pub fn wait_mesh_rolled_out(&self, within: Duration) -> Result<Duration> {
        let want = self.nodes.len();
        wait_for("every mesh pod ready", within, || {
            let pods = self.mesh_pods()?;
            let ready = pods.iter().filter(|p| p.ready).count();
            Ok((ready == want && pods.len() == want).then_some(()))
        })
        .map(|((), d)| d)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.diagnose()))
    }

    pub fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Takes node `i` out for good (after it was drained and its Node deleted): its
    /// containers, daemons and namespaces.
    pub fn remove_node(&mut self, i: usize) -> Result<()> {
        let mut n = self.nodes.remove(i);
        let problems = teardown::stop_node(&mut n);
        run("ip", &["netns", "del", &n.netns])?;
        if !problems.is_empty() {
            bail!("removing node {}: {}", n.name, problems.join("; "));
        }
        Ok(())
    }

    /// Tears everything down: containers first (their shims are not our children), then
    /// every daemon, the namespaces and the work directory. Safe to call twice.
    pub fn down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Workers first, the control plane last (kubelets keep talking to it meanwhile).
        while let Some(mut n) = self.nodes.pop() {
            problems.extend(teardown::stop_node(&mut n));
        }
        // containerd's parent cgroups, if our nodes made them (another containerd on this
        // host may use them) and once empty (rmdir refuses a cgroup still in use).
        if !self.cgroup_parent_existed {
            for dir in cgroup_parents() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        self.tb.down();
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.down() {
            eprintln!("cluster teardown: {p}");
        }
    }
}

pub fn apiserver_url() -> String {
    format!("https://{CONTROL_PLANE_IP}:{APISERVER_PORT}")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() && e.file_name() != "cluster-secret" {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// 32 random bytes, hex: the cluster secret deploy/README.md tells users to make.
fn pki_random_secret() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
