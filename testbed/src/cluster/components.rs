//! What runs on the nodes: each node's `/etc/kubernetes` and containerd configuration, the
//! control plane's processes, kubelet and kube-proxy — with the flags several kubelets on one
//! machine need (testbed/README.md, "Several kubelets on one machine").

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::pki::{Identity, Pki};
use super::{
    apiserver_url, wait_for, Cluster, APISERVER_PORT, CLUSTER_DNS_IP, KUBERNETES_SERVICE_IP,
    PAUSE_IMAGE, POD_RANGE, SERVICE_RANGE,
};

/// Where a node's processes find their credentials (its `/etc` overlay).
pub(super) const NODE_PKI: &str = "/etc/kubernetes/pki";

impl Cluster {
    /// The node's `/etc/kubernetes` (credentials, kubeconfigs) and containerd's config,
    /// written into its `/etc` overlay before the node starts.
    pub(super) fn write_node_config(
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

    pub(super) fn start_control_plane(&mut self) -> Result<()> {
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
