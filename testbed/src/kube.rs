//! A real Kubernetes API server (1.20.2, built from Debian's source package by
//! `scripts/kube-apiserver.sh build`) on the testbed's underlay, for the `--kube` tests:
//! etcd and kube-apiserver run in their own namespace there, so agents in node namespaces
//! reach it over the underlay like on a real cluster.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bed::{die_with_parent, Testbed};

pub const PORT: u16 = 16443;

/// The repository's `scripts/kube-apiserver.sh`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("kube-apiserver.sh")
}

/// The cache the build script fills (`$MESH_KUBE_CACHE`, default /var/cache/mesh-kube).
pub fn cache_bin() -> PathBuf {
    PathBuf::from(
        std::env::var("MESH_KUBE_CACHE").unwrap_or_else(|_| "/var/cache/mesh-kube".into()),
    )
    .join("bin")
}

/// Why the API server cannot run here, if it cannot (not built yet, no etcd).
pub fn missing() -> Option<String> {
    let bin = cache_bin();
    if !bin.join("kube-apiserver").is_file() || !bin.join("kubectl").is_file() {
        return Some(format!(
            "no kube-apiserver/kubectl in {}: run `scripts/kube-apiserver.sh build` (as root, ~5-7 min once)",
            bin.display()
        ));
    }
    if !crate::gate::on_path("etcd") || !crate::gate::on_path("etcdctl") {
        return Some(
            "etcd missing: `scripts/kube-apiserver.sh build` installs etcd-server and etcd-client"
                .into(),
        );
    }
    None
}

pub struct ApiServer {
    /// The namespace etcd and the apiserver run in.
    pub netns: String,
    pub address: Ipv4Addr,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl ApiServer {
    /// Starts etcd + kube-apiserver in a new host `name` on the underlay at `address`;
    /// returns once `/readyz` answers.
    pub fn start(tb: &mut Testbed, name: &str, address: Ipv4Addr) -> Result<ApiServer> {
        let netns = tb.add_external(name, address)?;
        let dir = tb.work.join(name);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("run.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .arg(script())
            .args(["run", &dir.display().to_string(), &PORT.to_string()])
            .arg(address.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawn scripts/kube-apiserver.sh run")?;
        let started = Instant::now();
        while !dir.join("ready").exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "kube-apiserver.sh run exited ({status}) before ready:\n{}",
                    std::fs::read_to_string(dir.join("run.log")).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(90) {
                let _ = child.kill();
                bail!(
                    "kube-apiserver not ready within 90 s: see {} and {}",
                    dir.join("kube-apiserver.log").display(),
                    dir.join("etcd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "kube-apiserver v1.20.2 ready on https://{address}:{PORT} in {:.1?}",
            started.elapsed()
        );
        Ok(ApiServer {
            netns,
            address,
            dir,
            child: Some(child),
        })
    }

    /// Admin (system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// User `mesh-tester`: no rights until a test binds some.
    pub fn kubeconfig_unprivileged(&self) -> PathBuf {
        self.dir.join("kubeconfig-unprivileged")
    }

    /// `kubectl` (1.20.2, matching the server) as admin, from the server's namespace.
    pub fn kubectl(&self, tb: &Testbed, args: &[&str]) -> Result<Output> {
        let kubectl = cache_bin().join("kubectl").display().to_string();
        let kubeconfig = self.kubeconfig().display().to_string();
        let mut all = vec![kubectl.as_str(), "--kubeconfig", kubeconfig.as_str()];
        all.extend_from_slice(args);
        tb.ns_output(&self.netns, &all)
    }

    /// `kubectl` that must succeed; its stdout.
    pub fn kubectl_ok(&self, tb: &Testbed, args: &[&str]) -> Result<String> {
        let out = self.kubectl(tb, args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl create` of a Node with this InternalIP (what kubelet registers).
    pub fn create_node(&self, tb: &Testbed, name: &str, internal_ip: Ipv4Addr) -> Result<()> {
        let manifest = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        });
        let path = self.dir.join(format!("node-{name}.json"));
        std::fs::write(&path, manifest.to_string())?;
        self.kubectl_ok(tb, &["create", "-f", &path.display().to_string()])?;
        // Status is kubelet's to write, through the status subresource.
        let status = serde_json::json!({"status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip.to_string()},
            {"type": "Hostname", "address": name},
        ]}});
        self.patch_node_status(tb, name, &status.to_string())
    }

    fn patch_node_status(&self, tb: &Testbed, name: &str, patch: &str) -> Result<()> {
        // kubectl 1.20 has no --subresource: PATCH the status endpoint directly.
        let path = format!("/api/v1/nodes/{name}/status");
        let body = self.dir.join(format!("patch-{name}.json"));
        std::fs::write(&body, patch)?;
        let token = std::fs::read_to_string(self.kubeconfig())?
            .split("token: ")
            .nth(1)
            .and_then(|t| t.split('}').next())
            .map(|t| t.trim().to_string())
            .context("no token in the admin kubeconfig")?;
        let url = format!("https://{}:{PORT}{path}", self.address);
        let out = tb.ns_output(
            &self.netns,
            &[
                "curl",
                "-sfk",
                "-X",
                "PATCH",
                "-H",
                &format!("Authorization: Bearer {token}"),
                "-H",
                "Content-Type: application/merge-patch+json",
                "--data-binary",
                &format!("@{}", body.display()),
                &url,
            ],
        )?;
        if !out.status.success() {
            bail!(
                "PATCH {path} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A jsonpath query on one object.
    pub fn jsonpath(&self, tb: &Testbed, kind_name: &[&str], path: &str) -> Result<String> {
        let mut args: Vec<&str> = vec!["get"];
        args.extend_from_slice(kind_name);
        let expr = format!("jsonpath={path}");
        args.extend_from_slice(&["-o", &expr]);
        self.kubectl_ok(tb, &args)
    }

    /// Stops etcd and the apiserver (TERM to the script, which stops both).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
