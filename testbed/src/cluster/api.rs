//! Talking to the cluster as its admin: kubectl (1.20.2, in the control plane's network
//! namespace — the apiserver is on the testbed underlay), JSON views of nodes and pods,
//! `meshctl` in mesh's pods, and what to print when something did not come up.

use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{wait_for, Cluster};

impl Cluster {
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

    /// The agent container's log of mesh pod `pod` (the last `tail` lines, or all).
    pub fn mesh_logs(&self, pod: &str, tail: Option<usize>) -> Result<String> {
        let tail = tail.map(|n| format!("--tail={n}"));
        let mut args = vec!["-n", "mesh-system", "logs", pod, "-c", "agent"];
        args.extend(tail.as_deref());
        self.kubectl_ok(&args)
    }

    /// Waits until the DaemonSet's rollout is complete (`kubectl rollout status`) and every
    /// mesh pod is ready; how long that took.
    pub fn wait_mesh_rollout(&self) -> Result<Duration> {
        let started = std::time::Instant::now();
        self.kubectl_ok(&[
            "-n",
            "mesh-system",
            "rollout",
            "status",
            "ds/mesh",
            "--timeout=240s",
        ])?;
        self.wait_mesh_rolled_out(Duration::from_secs(60))?;
        Ok(started.elapsed())
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
            // The node's routes and its agent's last words: where pod traffic goes.
            if let Ok(o) = n.run("ip", &["-4", "route", "show"]) {
                out.push_str(&format!(
                    "---- {} ip route\n{}",
                    n.name,
                    String::from_utf8_lossy(&o.stdout)
                ));
            }
        }
        if let Ok(pods) = self.mesh_pods() {
            for p in pods {
                if let Ok(log) = self.mesh_logs(&p.name, Some(15)) {
                    out.push_str(&format!(
                        "---- {} ({}) agent log, last 15\n{}",
                        p.name, p.node, log
                    ));
                }
            }
        }
        out
    }
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
