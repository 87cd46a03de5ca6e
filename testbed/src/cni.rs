//! A small libcni: runs a conflist the way containerd does (each plugin gets the
//! list's `name` and `cniVersion`, the previous plugin's result as `prevResult`, and
//! `runtimeConfig` for the capabilities it declares; DEL runs in reverse with the final
//! ADD result), executing the real plugin binaries inside the node's namespace.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// One attachment as the runtime describes it.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    /// Empty for a DEL after the sandbox is gone.
    pub netns: String,
    pub ifname: String,
    pub cni_args: String,
}

/// What one plugin execution printed.
#[derive(Clone, Debug)]
pub struct CniCall {
    pub plugin: String,
    pub command: String,
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
    pub took: std::time::Duration,
}

impl CniCall {
    pub fn ok(&self) -> bool {
        self.exit == 0
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(self.stdout.trim()).ok()
    }

    /// The spec error code, when the plugin failed with one.
    pub fn code(&self) -> Option<u64> {
        self.json()?.get("code")?.as_u64()
    }
}

impl std::fmt::Display for CniCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} exit {} in {:?}: stdout {} stderr {}",
            self.plugin,
            self.command,
            self.exit,
            self.took,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

#[derive(Clone, Debug)]
pub struct Conflist(pub Value);

impl Conflist {
    /// mesh-cni first, then the given reference plugins (e.g. portmap, bandwidth).
    pub fn mesh(version: &str, agent_socket: &str, then: &[Value]) -> Conflist {
        let mut plugins = vec![json!({"type": "mesh-cni", "agentSocket": agent_socket})];
        plugins.extend(then.iter().cloned());
        Conflist(json!({"cniVersion": version, "name": "mesh", "plugins": plugins}))
    }

    fn plugins(&self) -> Vec<Value> {
        self.0["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// The stdin one plugin receives.
    fn plugin_config(&self, plugin: &Value, prev: Option<&Value>, runtime: &Value) -> Value {
        let mut c: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
        c.insert("name".into(), self.0["name"].clone());
        c.insert("cniVersion".into(), self.0["cniVersion"].clone());
        if let Some(p) = prev {
            c.insert("prevResult".into(), p.clone());
        }
        let mut rc = Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            for (k, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = runtime.get(k) {
                        rc.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            c.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(c)
    }
}

/// Executes plugins inside one node namespace.
#[derive(Clone, Debug)]
pub struct Runner {
    pub node_netns: String,
    /// Searched in order, like `CNI_PATH`.
    pub bin_dirs: Vec<PathBuf>,
}

impl Runner {
    fn find(&self, plugin: &str) -> Result<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {plugin} not found in {:?}", self.bin_dirs))
    }

    /// Runs one plugin binary with the CNI environment and `stdin`.
    pub fn exec(
        &self,
        plugin: &str,
        command: &str,
        att: Option<&Attachment>,
        stdin: &[u8],
    ) -> Result<CniCall> {
        let bin = self.find(plugin)?;
        let cni_path = std::env::join_paths(&self.bin_dirs)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_netns])
            .arg(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for k in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
            cmd.env_remove(k);
        }
        if let Some(a) = att {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", &a.cni_args);
        }
        let started = std::time::Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        if let Some(mut i) = child.stdin.take() {
            // A plugin that exits before reading (bad env) closes the pipe: not our error.
            let _ = i.write_all(stdin);
        }
        let out = child.wait_with_output()?;
        Ok(CniCall {
            plugin: plugin.to_string(),
            command: command.to_string(),
            exit: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        })
    }

    /// ADD through the whole list; the final result, or the failing call.
    pub fn add(
        &self,
        list: &Conflist,
        att: &Attachment,
        runtime: &Value,
    ) -> Result<std::result::Result<Value, CniCall>> {
        let mut prev: Option<Value> = None;
        for p in list.plugins() {
            let ty = p["type"].as_str().unwrap_or_default().to_string();
            let conf = list.plugin_config(&p, prev.as_ref(), runtime);
            let call = self.exec(&ty, "ADD", Some(att), conf.to_string().as_bytes())?;
            match call.json() {
                Some(v) if call.ok() => prev = Some(v),
                _ => return Ok(Err(call)),
            }
        }
        Ok(Ok(prev.unwrap_or(Value::Null)))
    }

    /// DEL in reverse order, each with the cached final result; every plugin runs even
    /// after one fails (as libcni does), and the failures are returned.
    pub fn del(
        &self,
        list: &Conflist,
        att: &Attachment,
        cached: Option<&Value>,
        runtime: &Value,
    ) -> Result<Vec<CniCall>> {
        let mut failed = Vec::new();
        for p in list.plugins().iter().rev() {
            let ty = p["type"].as_str().unwrap_or_default().to_string();
            let conf = list.plugin_config(p, cached, runtime);
            let call = self.exec(&ty, "DEL", Some(att), conf.to_string().as_bytes())?;
            if !call.ok() {
                failed.push(call);
            }
        }
        Ok(failed)
    }

    /// CHECK in order with the cached result.
    pub fn check(
        &self,
        list: &Conflist,
        att: &Attachment,
        cached: &Value,
        runtime: &Value,
    ) -> Result<std::result::Result<(), CniCall>> {
        for p in list.plugins() {
            let ty = p["type"].as_str().unwrap_or_default().to_string();
            let conf = list.plugin_config(&p, Some(cached), runtime);
            let call = self.exec(&ty, "CHECK", Some(att), conf.to_string().as_bytes())?;
            if !call.ok() {
                return Ok(Err(call));
            }
        }
        Ok(Ok(()))
    }
}
