//! Shared by the benchmark programs: a cluster of real `mesh-agent` processes on loopback.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Proc {
    pub child: Child,
    pub socket: PathBuf,
    pub metrics: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct free ports: every probe socket stays bound until all are chosen, so the
/// kernel cannot hand the same port out twice.
pub fn free_ports(n: usize, udp: bool) -> anyhow::Result<Vec<u16>> {
    let mut udp_socks = Vec::new();
    let mut tcp_socks = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n {
        let port = if udp {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let p = s.local_addr()?.port();
            udp_socks.push(s);
            p
        } else {
            let s = std::net::TcpListener::bind("127.0.0.1:0")?;
            let p = s.local_addr()?.port();
            tcp_socks.push(s);
            p
        };
        ports.push(port);
    }
    Ok(ports)
}

/// Starts `n` agents named `{prefix}-{i}` in `dir`, all pointing at the first three.
pub fn spawn_cluster(
    agent_bin: &str,
    dir: &Path,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<Proc>> {
    let secret = dir.join("secret");
    std::fs::write(&secret, "benchmark secret 0123456789abcdef")?;
    let ports = free_ports(n, true)?;
    let metrics_ports = free_ports(n, false)?;
    let seeds: Vec<String> = ports
        .iter()
        .take(3)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let mut procs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let socket = dir.join(format!("{prefix}{i}.sock"));
        let metrics = format!("127.0.0.1:{}", metrics_ports[i]);
        let child = Command::new(agent_bin)
            .args([
                "--node-name",
                &format!("{prefix}-{i}"),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--peers", &seeds.join(","), "--secret-file"])
            .arg(&secret)
            .arg("--state-dir")
            .arg(dir.join(format!("{prefix}-state-{i}")))
            .arg("--socket")
            .arg(&socket)
            .args([
                "--metrics-addr",
                &metrics,
                "--dataplane",
                "none",
                "--log",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.push(Proc {
            child,
            socket,
            metrics,
        });
    }
    Ok(procs)
}
