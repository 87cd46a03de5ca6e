//! Helpers for tests that run real `mesh-agent` processes on loopback (`--dataplane none`,
//! no root needed): free ports, temporary state dirs and sockets, `meshctl` calls, polling.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
pub const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

/// Ports handed out by this test process: the kernel may offer a just-released port again,
/// so without this two agents of one test could be given the same port.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn unique_port(probe: impl Fn() -> Option<u16>) -> u16 {
    for _ in 0..1000 {
        let Some(port) = probe() else { continue };
        if HANDED_OUT
            .lock()
            .map(|mut s| s.insert(port))
            .unwrap_or(false)
        {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1");
}

/// A UDP port on 127.0.0.1 that is free right now (the agent binds it moments later).
pub fn free_udp_port() -> u16 {
    unique_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .ok()
    })
}

pub fn free_tcp_port() -> u16 {
    unique_port(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .ok()
    })
}

pub fn write_secret(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write secret");
    p
}

/// One agent process; killed when dropped.
pub struct Agent {
    pub name: String,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    pub fn new(dir: &Path, name: &str, extra: &[String]) -> Agent {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let state_dir = dir.join(format!("{name}-state"));
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let mut args = vec![
            "--node-name".to_string(),
            name.to_string(),
            "--listen".into(),
            listen.to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--dataplane".into(),
            "none".into(),
            "--log".into(),
            "mesh_agent=debug,info".into(),
        ];
        args.extend_from_slice(extra);
        Agent {
            name: name.to_string(),
            listen,
            state_dir,
            socket,
            log,
            metrics,
            args,
            child: None,
        }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(AGENT)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mesh-agent");
        self.child = Some(child);
    }

    /// The Prometheus text from the agent's metrics listener (empty if unreachable).
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_secs(3))
        else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// `kill -9`: no goodbye, state left as it was.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn meshctl(&self, args: &[&str]) -> Output {
        Command::new(MESHCTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run meshctl")
    }

    pub fn json(&self, args: &[&str]) -> Option<Value> {
        let out = self.meshctl(args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// name -> state, from `meshctl status peers -o json`.
    pub fn peer_states(&self) -> Vec<(String, String, String)> {
        let Some(v) = self.json(&["status", "peers", "-o", "json"]) else {
            return Vec::new();
        };
        v["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                        (s("name"), s("id"), s("state"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `pred` every 200 ms until it holds or `limit` passes; returns the time it took.
pub fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if pred() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
