//! What the keeper tells the other commands about a running testbed
//! (`/run/mesh-testbed/<name>/layout.json`): nodes, pods, namespaces, sockets, pids.

use anyhow::{Context, Result};
use serde_json::{json, Value};

use mesh_testbed::Testbed;

pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    pub socket: String,
}

pub struct PodInfo {
    pub name: String,
    pub netns: String,
}

pub struct Layout {
    /// A Kubernetes testbed (`up --kubernetes`).
    pub kubernetes: bool,
    pub kubeconfig: String,
    pub control_plane_netns: String,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub agent_pids: Vec<i32>,
}

const FILE: &str = "layout.json";

/// Writes the layout of `tb` (live nodes only) for testbed `name`.
pub fn save(name: &str, tb: &Testbed) -> Result<()> {
    let nodes: Vec<Value> = tb
        .nodes
        .iter()
        .filter(|n| !n.removed)
        .map(|n| {
            json!({
                "name": n.name, "netns": n.netns, "socket": n.socket.display().to_string(),
                "underlay": n.underlay_ip.to_string(), "dataplane": n.dataplane,
                "log": n.log.display().to_string(), "agent_pid": n.agent_pid(),
            })
        })
        .collect();
    let pods: Vec<Value> = tb
        .pods
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "netns": p.netns, "node": tb.nodes[p.node].name,
                "address": p.address.map(|a| a.to_string()),
            })
        })
        .collect();
    let path = crate::state_dir(name).join(FILE);
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&json!({ "nodes": nodes, "pods": pods }))?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

impl Layout {
    pub fn load(name: &str) -> Result<Layout> {
        let path = crate::state_dir(name).join(FILE);
        let v: Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| {
            format!(
                "no testbed named {name:?} is up ({} is missing)",
                path.display()
            )
        })?)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
        let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
        Ok(Layout {
            kubernetes: v["kind"] == "kubernetes",
            kubeconfig: s(&v, "kubeconfig"),
            control_plane_netns: s(&v, "control_plane_netns"),
            nodes: list("nodes")
                .iter()
                .map(|n| NodeInfo {
                    name: s(n, "name"),
                    netns: s(n, "netns"),
                    socket: s(n, "socket"),
                })
                .collect(),
            pods: list("pods")
                .iter()
                .map(|p| PodInfo {
                    name: s(p, "name"),
                    netns: s(p, "netns"),
                })
                .collect(),
            agent_pids: list("nodes")
                .iter()
                .filter_map(|n| n["agent_pid"].as_i64())
                .filter_map(|p| i32::try_from(p).ok())
                .collect(),
        })
    }

    /// The namespace of a node or pod by name.
    pub fn netns_of(&self, target: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.name == target)
            .map(|n| n.netns.clone())
            .or_else(|| {
                self.pods
                    .iter()
                    .find(|p| p.name == target)
                    .map(|p| p.netns.clone())
            })
    }
}
