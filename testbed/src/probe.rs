//! Traffic probes that run on threads inside namespaces (setns moves only the calling
//! thread): a UDP datagram whose receiver reports the source address it saw (proves there
//! is no NAT), and a TCP listener for port-mapping checks.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Moves the calling thread into the named network namespace (`/run/netns/<netns>`).
pub fn enter(netns: &str) -> Result<()> {
    let f = std::fs::File::open(PathBuf::from("/run/netns").join(netns))
        .with_context(|| format!("open netns {netns}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {netns}"))?;
    Ok(())
}

/// Sends one UDP datagram from namespace `from` to `to`:`port` in namespace `to_ns` and
/// returns the source address the receiver saw.
pub fn udp_source(from: &str, to_ns: &str, to: Ipv4Addr, port: u16) -> Result<Ipv4Addr> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let to_ns = to_ns.to_string();
    let receiver = std::thread::spawn(move || -> Result<Ipv4Addr> {
        enter(&to_ns)?;
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        let (_, src) = sock
            .recv_from(&mut buf)
            .context("no datagram arrived within 3 s")?;
        match src {
            SocketAddr::V4(a) => Ok(*a.ip()),
            SocketAddr::V6(a) => Err(anyhow!("IPv6 source {a}")),
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| anyhow!("receiver did not start"))?;
    let from = from.to_string();
    let sender = std::thread::spawn(move || -> Result<()> {
        enter(&from)?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        // A few tries: the first may wait on ARP.
        for _ in 0..3 {
            sock.send_to(b"mesh-probe", SocketAddrV4::new(to, port))?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
    sender.join().map_err(|_| anyhow!("sender panicked"))??;
    receiver.join().map_err(|_| anyhow!("receiver panicked"))?
}

/// Listens on TCP `port` in `netns`; the returned receiver yields the first client's
/// source address.
pub fn tcp_accept_once(netns: &str, port: u16) -> Result<mpsc::Receiver<Ipv4Addr>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<()> {
        enter(&netns)?;
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let _ = ready_tx.send(());
        let (_, peer) = l.accept()?;
        if let SocketAddr::V4(a) = peer {
            let _ = tx.send(*a.ip());
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| anyhow!("listener did not start"))?;
    Ok(rx)
}

/// Connects from `netns` to `to` (true when the handshake completes within 3 s).
pub fn tcp_connects(netns: &str, to: SocketAddrV4) -> Result<bool> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<bool> {
        enter(&netns)?;
        Ok(TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(3)).is_ok())
    })
    .join()
    .map_err(|_| anyhow!("connect thread panicked"))?
}

/// Streams `bytes` of a known pattern over TCP from namespace `from` to `to`:`port` in
/// `to_ns`; the receiver checks every byte. Returns the throughput in Gbit/s. Exercises
/// what single packets do not: segmentation offload, GRO and TCP checksums end to end.
pub fn tcp_transfer(from: &str, to_ns: &str, to: Ipv4Addr, port: u16, bytes: usize) -> Result<f64> {
    use std::io::{Read, Write};
    let pattern = |i: usize| (i % 251) as u8;
    let (ready_tx, ready_rx) = mpsc::channel();
    let to_ns = to_ns.to_string();
    let receiver = std::thread::spawn(move || -> Result<()> {
        enter(&to_ns)?;
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0usize;
        loop {
            let n = s.read(&mut buf).context("reading the stream")?;
            if n == 0 {
                break;
            }
            if let Some(bad) = (0..n).find(|k| buf[*k] != pattern(at + k)) {
                return Err(anyhow!("byte {} of the stream is corrupt", at + bad));
            }
            at += n;
        }
        if at != bytes {
            return Err(anyhow!("received {at} of {bytes} bytes"));
        }
        s.write_all(b"ok")?;
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| anyhow!("receiver did not start"))?;
    let from = from.to_string();
    let sender = std::thread::spawn(move || -> Result<f64> {
        enter(&from)?;
        let started = std::time::Instant::now();
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(to, port)),
            Duration::from_secs(3),
        )
        .context("connect")?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let chunk: Vec<u8> = (0..251 * 256).map(pattern).collect();
        let mut sent = 0usize;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).context("sending the stream")?;
            sent += n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut ack = [0u8; 2];
        s.read_exact(&mut ack).context("no acknowledgement")?;
        Ok(bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
    });
    let gbps = sender.join().map_err(|_| anyhow!("sender panicked"))?;
    receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))??;
    gbps
}

/// The agent's Prometheus text from `127.0.0.1:6782/metrics` inside `netns`, as
/// (series with labels, value) pairs.
pub fn metrics(netns: &str) -> Result<Vec<(String, f64)>> {
    use std::io::{Read, Write};
    let netns = netns.to_string();
    let text = std::thread::spawn(move || -> Result<String> {
        enter(&netns)?;
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, 6782)),
            Duration::from_secs(3),
        )
        .context("connect to the metrics port")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow!("metrics thread panicked"))??;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// One HTTP GET on a unix socket (the agent's local API), returning the JSON body.
pub fn agent_get(socket: &std::path::Path, path: &str) -> Result<serde_json::Value> {
    agent_request(socket, "GET", path, None)
}

/// One HTTP request with an optional JSON body on the agent's local API; the JSON answer
/// (`null` for an empty one) of a 2xx, an error naming the status otherwise.
pub fn agent_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 2") {
        return Err(anyhow!(
            "{method} {path}: {} {}",
            head.lines().next().unwrap_or_default(),
            body.trim()
        ));
    }
    // The agent answers with a fixed length; chunked bodies would need decoding.
    if body.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_str(body.trim())?)
}
