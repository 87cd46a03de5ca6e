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

pub mod node;
pub mod pki;
pub mod workloads;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bed::{run, Testbed};
use node::KubeNode;
use pki::{Identity, Pki};

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

/// Where a node's processes find their configuration (its `/etc` overlay).
const NODE_PKI: &str = "/etc/kubernetes/pki";

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
            let n = self.nodes.iter().filter(|n| !n.control_plane).count() + 1;
            let last = self
                .nodes
                .last()
                .map(|n| n.address.octets()[3])
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
        let mut node = KubeNode::start(&name, &netns, address, dir, control_plane)?;
        node.spawn(
            "containerd",
            Path::new("containerd"),
            vec!["--config".into(), "/etc/containerd/config.toml".into()],
        )?;
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
        self.nodes.push(node);
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

    /// The node's `/etc/kubernetes` (credentials, kubeconfigs) and containerd's config,
    /// written into its `/etc` overlay before the node starts.
    fn write_node_config(
        &self,
        etc: &Path,
        name: &str,
        address: Ipv4Addr,
        control_plane: bool,
    ) -> Result<()> {
        let pki_dir = etc.join("kubernetes/pki");
        let server = apiserver_url();
        let mut clients = vec![
            (
                "kubelet.conf",
                Identity::new(
                    "kubelet",
                    &format!("system:node:{name}"),
                    Some("system:nodes"),
                ),
            ),
            (
                "proxy.conf",
                Identity::new("kube-proxy", "system:kube-proxy", None),
            ),
        ];
        if control_plane {
            self.pki
                .write_control_plane(&pki_dir, name, address, KUBERNETES_SERVICE_IP)?;
            clients.push((
                "controller-manager.conf",
                Identity::new("controller-manager", "system:kube-controller-manager", None),
            ));
            clients.push((
                "scheduler.conf",
                Identity::new("scheduler", "system:kube-scheduler", None),
            ));
        }
        for (file, who) in &clients {
            self.pki.write_client(&pki_dir, who)?;
            std::fs::write(
                etc.join("kubernetes").join(file),
                Pki::kubeconfig(&server, NODE_PKI, who),
            )?;
        }
        std::fs::create_dir_all(etc.join("containerd"))?;
        std::fs::write(etc.join("containerd/config.toml"), CONTAINERD_CONFIG)?;
        Ok(())
    }

    fn start_control_plane(&mut self) -> Result<()> {
        let bin = crate::kube::cache_bin();
        let cp = &mut self.nodes[0];
        let addr = cp.address.to_string();
        cp.spawn(
            "etcd",
            Path::new("etcd"),
            [
                "--name=cp",
                "--data-dir=/var/lib/etcd",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=cp=http://127.0.0.1:2380",
            ]
            .map(String::from)
            .to_vec(),
        )?;
        let p = NODE_PKI;
        cp.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            vec![
                "--etcd-servers=http://127.0.0.1:2379".into(),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={APISERVER_PORT}"),
                format!("--advertise-address={addr}"),
                "--insecure-port=0".into(),
                format!("--tls-cert-file={p}/apiserver.crt"),
                format!("--tls-private-key-file={p}/apiserver.key"),
                format!("--client-ca-file={p}/ca.crt"),
                format!("--kubelet-client-certificate={p}/apiserver-kubelet-client.crt"),
                format!("--kubelet-client-key={p}/apiserver-kubelet-client.key"),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={p}/sa.pub"),
                format!("--service-account-signing-key-file={p}/sa.key"),
                format!("--service-cluster-ip-range={SERVICE_RANGE}"),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
            ],
        )?;
        wait_for("kube-apiserver /readyz", Duration::from_secs(120), || {
            if let Some(e) = self.nodes[0].exited() {
                bail!(
                    "{e}; see {}",
                    self.nodes[0].dir.join("kube-apiserver.log").display()
                );
            }
            let out = self.kubectl(&["get", "--raw", "/readyz"])?;
            Ok(out.status.success().then_some(()))
        })?;
        let cp = &mut self.nodes[0];
        cp.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            vec![
                "--kubeconfig=/etc/kubernetes/controller-manager.conf".into(),
                "--authentication-kubeconfig=/etc/kubernetes/controller-manager.conf".into(),
                "--authorization-kubeconfig=/etc/kubernetes/controller-manager.conf".into(),
                "--bind-address=127.0.0.1".into(),
                "--port=0".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={p}/sa.key"),
                format!("--root-ca-file={p}/ca.crt"),
                // mesh is the IPAM: no podCIDR per node, no cloud routes.
                "--allocate-node-cidrs=false".into(),
                "--configure-cloud-routes=false".into(),
                format!("--service-cluster-ip-range={SERVICE_RANGE}"),
                "--controllers=*,bootstrapsigner,tokencleaner".into(),
                "--cluster-name=mesh-testbed".into(),
            ],
        )?;
        cp.spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            vec![
                "--kubeconfig=/etc/kubernetes/scheduler.conf".into(),
                "--authentication-kubeconfig=/etc/kubernetes/scheduler.conf".into(),
                "--authorization-kubeconfig=/etc/kubernetes/scheduler.conf".into(),
                "--bind-address=127.0.0.1".into(),
                "--port=0".into(),
                "--leader-elect=false".into(),
            ],
        )?;
        // The token controller gives the default ServiceAccount its token: pods wait on it.
        self.wait_service_account_token("default")?;
        Ok(())
    }

    /// Waits until namespace `ns`'s default ServiceAccount has its token (pods of that
    /// namespace are refused until then).
    pub fn wait_service_account_token(&self, ns: &str) -> Result<Duration> {
        let ((), took) = wait_for(
            &format!("the default ServiceAccount of {ns} has a token"),
            Duration::from_secs(90),
            || {
                let out = self.kubectl(&[
                    "-n",
                    ns,
                    "get",
                    "serviceaccount",
                    "default",
                    "-o",
                    "jsonpath={.secrets[0].name}",
                ])?;
                Ok((out.status.success() && !out.stdout.is_empty()).then_some(()))
            },
        )?;
        Ok(took)
    }

    /// `meshctl ARGS` in mesh pod `pod` (`kubectl exec`): its stdout.
    pub fn meshctl(&self, pod: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "-n",
            "mesh-system",
            "exec",
            pod,
            "-c",
            "agent",
            "--",
            "meshctl",
        ];
        all.extend_from_slice(args);
        self.kubectl_ok(&all)
    }

    /// kubelet and kube-proxy on node `i` (containerd runs already).
    pub fn start_kubelet_and_proxy(&mut self, i: usize) -> Result<()> {
        let bin = crate::kube::cache_bin();
        let n = &mut self.nodes[i];
        let mut kubelet = vec![
            "--kubeconfig=/etc/kubernetes/kubelet.conf".to_string(),
            format!("--hostname-override={}", n.name),
            format!("--node-ip={}", n.address),
            "--container-runtime=remote".into(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            "--runtime-request-timeout=15m".into(),
            "--containerd=/run/containerd/containerd.sock".into(),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            // Several kubelets on one machine: no QoS cgroup tree of their own (they would
            // all claim /kubepods and remove each other's pods), no node-allocatable
            // enforcement, no eviction or image GC judged on the shared disk.
            "--cgroup-driver=cgroupfs".into(),
            "--cgroups-per-qos=false".into(),
            "--enforce-node-allocatable=".into(),
            "--eviction-hard=".into(),
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--fail-swap-on=false".into(),
            // Reads the kernel defaults it wants from files in its node's mount namespace
            // (node.rs) instead of writing the host's global sysctls.
            "--protect-kernel-defaults=true".into(),
            format!("--client-ca-file={NODE_PKI}/ca.crt"),
            "--anonymous-auth=false".into(),
            "--authentication-token-webhook=true".into(),
            "--authorization-mode=Webhook".into(),
            "--read-only-port=0".into(),
            "--healthz-bind-address=127.0.0.1".into(),
            "--volume-plugin-dir=/var/lib/kubelet/volumeplugins".into(),
            format!("--cluster-dns={CLUSTER_DNS_IP}"),
            "--cluster-domain=cluster.local".into(),
            "--resolv-conf=".into(),
            "--v=1".into(),
        ];
        if n.control_plane {
            kubelet
                .push("--register-with-taints=node-role.kubernetes.io/master=:NoSchedule".into());
        }
        n.spawn("kubelet", &bin.join("kubelet"), kubelet)?;
        n.spawn(
            "kube-proxy",
            &bin.join("kube-proxy"),
            vec![
                "--kubeconfig=/etc/kubernetes/proxy.conf".into(),
                format!("--hostname-override={}", n.name),
                format!("--cluster-cidr={POD_RANGE}"),
                "--proxy-mode=iptables".into(),
                // 1.20 writes nf_conntrack_max, read-only outside the initial network
                // namespace: leave conntrack's global settings alone (as kind does).
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--oom-score-adj=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--v=1".into(),
            ],
        )?;
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

    /// `kubectl` (1.20.2) as cluster admin, run in the control plane's network namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let kubectl = crate::kube::cache_bin().join("kubectl");
        let cp = self.nodes.first().context("no control-plane node")?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &cp.netns])
            .arg(kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--request-timeout", "30s"])
            .args(args);
        cmd.output().context("run kubectl")
    }

    /// `kubectl` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get … -o json`.
    pub fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl_ok(&all)?)?)
    }

    pub fn node_names(&self) -> Result<Vec<String>> {
        let v = self.get_json(&["nodes"])?;
        Ok(items(&v)
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Nodes whose Ready condition is True.
    pub fn ready_nodes(&self) -> Result<Vec<String>> {
        let v = self.get_json(&["nodes"])?;
        Ok(items(&v)
            .iter()
            .filter(|n| condition(n, "Ready") == Some("True"))
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// The DaemonSet's pods.
    pub fn mesh_pods(&self) -> Result<Vec<PodState>> {
        let v = self.get_json(&[
            "-n",
            "mesh-system",
            "pods",
            "-l",
            "app.kubernetes.io/name=mesh",
        ])?;
        Ok(items(&v).iter().map(PodState::from_json).collect())
    }

    /// What to look at when something did not come up: node conditions, pods, the last
    /// lines of each node's kubelet and containerd logs.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"][..],
        ] {
            match self.kubectl(args) {
                Ok(o) => {
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => out.push_str(&format!("kubectl: {e:#}\n")),
            }
        }
        for n in &self.nodes {
            for log in ["kubelet", "containerd"] {
                let text =
                    std::fs::read_to_string(n.dir.join(format!("{log}.log"))).unwrap_or_default();
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with('E') || l.contains("level=error"))
                    .collect();
                out.push_str(&format!("---- {} {log}: last errors\n", n.name));
                for l in &lines[lines.len().saturating_sub(6)..] {
                    out.push_str(&l.chars().take(400).collect::<String>());
                    out.push('\n');
                }
            }
        }
        out
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
        stop_node(&mut n);
        run("ip", &["netns", "del", &n.netns])?;
        Ok(())
    }

    /// Tears everything down: containers first (their shims are not our children), then
    /// every daemon, the namespaces and the work directory. Safe to call twice.
    pub fn down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Workers first, the control plane last (kubelets keep talking to it meanwhile).
        while let Some(mut n) = self.nodes.pop() {
            problems.extend(stop_node(&mut n));
        }
        // containerd's parent cgroups, once empty (rmdir refuses a cgroup still in use).
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(h.path().join("k8s.io"));
            }
        }
        self.tb.down();
        problems
    }
}

/// kubelet first (it would restart what we remove), then every container through
/// containerd, then the remaining daemons and the namespace holder; then checks that no
/// process is left in the node's namespaces (killing any, by PID: they are ours) and that
/// no container cgroup is left (containerd puts them at `/k8s.io/<id>` in every hierarchy).
fn stop_node(n: &mut KubeNode) -> Vec<String> {
    n.stop_one("kubelet");
    let namespaces = n.namespace_ids();
    let mut containers = Vec::new();
    let mut problems = Vec::new();
    if n.daemons
        .iter()
        .any(|d| d.what == "containerd" && d.pid().is_some())
    {
        containers = n.container_ids();
        problems.extend(n.remove_containers());
    }
    n.stop();
    std::thread::sleep(Duration::from_millis(200));
    for pid in processes_in(&namespaces) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        problems.push(format!(
            "{}: process {pid} ({}) was left running; killed",
            n.name,
            cmd.trim()
        ));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
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

/// PIDs of processes in any of `namespaces` (`mnt:[…]`-style names).
fn processes_in(namespaces: &[String]) -> Vec<i32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            ["mnt", "net", "uts"].iter().any(|ns| {
                std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                    .is_ok_and(|l| namespaces.contains(&l.display().to_string()))
            })
        })
        .collect()
}

/// Every cgroup directory of container `id` that still exists.
fn container_cgroups(id: &str) -> Vec<PathBuf> {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    hierarchies
        .flatten()
        .map(|h| h.path().join("k8s.io").join(id))
        .filter(|d| d.is_dir())
        .collect()
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

/// `.items` of a list.
pub fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

/// The status of condition `kind` of an object.
pub fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a str> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?["status"]
        .as_str()
}

/// A pod as the checks need it.
#[derive(Clone, Debug)]
pub struct PodState {
    pub name: String,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub phase: String,
    pub ready: bool,
    pub uid: String,
    pub restarts: u64,
    /// The first container's image.
    pub image: String,
}

impl PodState {
    pub fn from_json(p: &Value) -> PodState {
        PodState {
            name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
            node: p["spec"]["nodeName"].as_str().unwrap_or_default().into(),
            ip: p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()),
            phase: p["status"]["phase"].as_str().unwrap_or_default().into(),
            ready: condition(p, "Ready") == Some("True"),
            uid: p["metadata"]["uid"].as_str().unwrap_or_default().into(),
            image: p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .into(),
            restarts: p["status"]["containerStatuses"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["restartCount"].as_u64()).sum())
                .unwrap_or(0),
        }
    }
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

/// containerd as kubelet's CRI and mesh-cni's runtime, at the standard paths (each node's own
/// through its bind mounts). Two settings this machine needs: `restrict_oom_score_adj`
/// (no CAP_SYS_RESOURCE) and no AppArmor.
const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#;
