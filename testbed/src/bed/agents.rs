//! Each node's agent: its process (start, confined start, stop, crash) and its API
//! (`meshctl -o json`, readiness).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{die_with_parent, Testbed};

impl Testbed {
    /// Starts (or restarts) node `i`'s agent. It dies with this process.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        if node.removed {
            bail!("{} was removed from the testbed", node.name);
        }
        if node.agent.is_some() {
            bail!("agent of {} already running", node.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns]);
        if node.confined {
            // In `ip netns exec`'s own mount namespace: /proc/sys read-only, then the agent
            // as root holding only CAP_NET_ADMIN and CAP_NET_RAW (exec keeps the PID).
            cmd.args([
                "sh",
                "-c",
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
                 exec setpriv --inh-caps=-all --ambient-caps=-all \
                 --bounding-set=-all,+net_admin,+net_raw \"$0\" \"$@\"",
            ]);
        }
        cmd.arg(self.bin_dir.join("mesh-agent"))
            .args(&node.args)
            .env("MESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        node.agent = Some(cmd.spawn().context("spawn mesh-agent")?);
        Ok(())
    }

    /// From its next start, node `i`'s agent runs as deploy/'s DaemonSet runs it: root with
    /// only CAP_NET_ADMIN and CAP_NET_RAW, and /proc/sys read-only (what container runtimes
    /// give an unprivileged container). The node gets `net.ipv4.ip_forward=1` beforehand,
    /// as a Kubernetes node has it (kubeadm's preflight requires it).
    pub fn confine_agent(&mut self, i: usize) -> Result<()> {
        self.ns(
            &self.nodes[i].netns,
            &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        )?;
        self.nodes[i].confined = true;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        let Some(mut child) = self.nodes[i].agent.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()?;
        Ok(())
    }

    /// True while node `i`'s agent process has not exited.
    pub fn agent_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: the agent dies as in a crash or a power cut, saying goodbye to nobody.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].agent.take() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// `meshctl <args> -o json` against node `i`'s agent, parsed.
    pub fn meshctl_json(&self, i: usize, args: &[&str]) -> Result<Value> {
        let node = &self.nodes[i];
        let meshctl = self.bin("meshctl").display().to_string();
        let socket = node.socket.display().to_string();
        let mut all = vec![meshctl.as_str(), "--socket", socket.as_str()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.ns(&node.netns, &all)?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `meshctl status -o json` on node `i`.
    pub fn status(&self, i: usize) -> Result<Value> {
        self.meshctl_json(i, &["status"])
    }

    /// Node `i`'s gateway (the bridge address), from `meshctl status`.
    pub fn gateway(&self, i: usize) -> Result<Ipv4Addr> {
        let s = self.status(i)?;
        let a = s["node_network"]["address"]
            .as_str()
            .context("no gateway address in meshctl status")?;
        a.split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("gateway {a:?} is not an IPv4 address"))
    }

    /// Waits until node `i`'s pod network is ready (IPAM has space, bridge set up).
    pub fn wait_ready(&self, i: usize, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match self.status(i) {
                Ok(s)
                    if s["node_network"]["ready"] == Value::Bool(true)
                        && s["ipam"]["status"] == "ready" =>
                {
                    return Ok(s)
                }
                Ok(s) => {
                    last = format!(
                        "ipam {} / node network {}",
                        s["ipam"]["status"], s["node_network"]
                    )
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "node {} not ready within {within:?}: {last}",
            self.nodes[i].name
        )
    }
}
