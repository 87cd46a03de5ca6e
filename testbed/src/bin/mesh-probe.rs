//! mesh-probe: the workload of the testbed's Kubernetes cluster (the `localhost/mesh-probe`
//! image, beside busybox). A pod runs `mesh-probe serve`; checks talk to it through the
//! Kubernetes API (`kubectl exec … mesh-probe get …`) or from a host on the underlay.
//!
//! - `serve`: HTTP on 8080 answers `client=<ip>:<port> host=<hostname>` (the source address
//!   the pod saw: proves there is no NAT where there must be none), `/stream` answers the
//!   stream sink's statistics as JSON; UDP 8081 echoes the same `client=` line; TCP 9000 is
//!   a stream sink measuring the longest gap between frames.
//! - `stream ADDR`: sends a 16-byte frame (sequence, send time) every `--interval-ms` over one
//!   TCP connection and never reconnects: if the connection breaks, the sink sees it end.
//! - `get URL`: a plain HTTP/1.0 GET with a timeout (the answer on stdout, exit 1 on error).
//!
//! Only the standard library, so the binary links statically and runs in any image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
const STREAM_PORT: u16 = 9000;
const FRAME: usize = 16;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(),
        Some("stream") => match args.get(1) {
            Some(addr) => stream(addr, flag(&args, "--interval-ms").unwrap_or(10)),
            None => Err("usage: mesh-probe stream HOST:PORT [--interval-ms N]".into()),
        },
        Some("get") => match args.get(1) {
            Some(url) => get(url, flag(&args, "--timeout-ms").unwrap_or(3000)),
            None => Err("usage: mesh-probe get http://HOST:PORT/PATH [--timeout-ms N]".into()),
        },
        _ => Err("usage: mesh-probe serve | stream HOST:PORT [--interval-ms N] | get URL [--timeout-ms N]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn flag(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// What the stream sink has seen, over every connection it accepted.
#[derive(Default)]
struct StreamStats {
    connections: u64,
    /// Open right now.
    open: u64,
    frames: u64,
    /// Longest time between two consecutive frames of one connection.
    max_gap_ms: f64,
    /// Frames whose sequence number was not the previous one + 1 (must stay 0 on TCP).
    out_of_order: u64,
    /// How the last connection ended ("" while open).
    last_end: String,
    last_frame: Option<Instant>,
}

fn serve() -> Result<()> {
    let stats = Arc::new(Mutex::new(StreamStats::default()));
    let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).map_err(|e| format!("udp {UDP_PORT}: {e}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let host = hostname();
        loop {
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("client={from} host={host}\n").as_bytes(), from);
            }
        }
    });
    let sink = TcpListener::bind(("0.0.0.0", STREAM_PORT))
        .map_err(|e| format!("tcp {STREAM_PORT}: {e}"))?;
    let sink_stats = stats.clone();
    std::thread::spawn(move || {
        for conn in sink.incoming().flatten() {
            let stats = sink_stats.clone();
            std::thread::spawn(move || stream_sink(conn, &stats));
        }
    });
    let http =
        TcpListener::bind(("0.0.0.0", HTTP_PORT)).map_err(|e| format!("tcp {HTTP_PORT}: {e}"))?;
    eprintln!("mesh-probe: http :{HTTP_PORT}, udp echo :{UDP_PORT}, stream sink :{STREAM_PORT}");
    for conn in http.incoming().flatten() {
        let stats = stats.clone();
        std::thread::spawn(move || {
            let _ = http_answer(conn, &stats);
        });
    }
    Ok(())
}

fn http_answer(mut conn: TcpStream, stats: &Mutex<StreamStats>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let peer = conn.peer_addr()?;
    // The whole request (line and headers): closing a socket with unread input sends a
    // reset, which makes the client lose the answer.
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && !header.trim().is_empty() {
        header.clear();
    }
    let body = if path == "/stream" {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        let since = s
            .last_frame
            .map(|t| format!("{:.1}", t.elapsed().as_secs_f64() * 1e3))
            .unwrap_or_else(|| "null".into());
        format!(
            "{{\"connections\":{},\"open\":{},\"frames\":{},\"max_gap_ms\":{:.1},\"out_of_order\":{},\"last_end\":\"{}\",\"since_last_frame_ms\":{}}}\n",
            s.connections, s.open, s.frames, s.max_gap_ms, s.out_of_order, s.last_end, since
        )
    } else {
        format!("client={peer} host={}\n", hostname())
    };
    write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.shutdown(std::net::Shutdown::Write)
}

fn stream_sink(mut conn: TcpStream, stats: &Mutex<StreamStats>) {
    {
        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
        s.connections += 1;
        s.open += 1;
        s.last_end.clear();
    }
    let mut frame = [0u8; FRAME];
    let mut last: Option<(u64, Instant)> = None;
    let end = loop {
        match conn.read_exact(&mut frame) {
            Ok(()) => {
                let seq = u64::from_be_bytes(frame[..8].try_into().unwrap_or_default());
                let now = Instant::now();
                let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                s.frames += 1;
                s.last_frame = Some(now);
                if let Some((prev, at)) = last {
                    if seq != prev + 1 {
                        s.out_of_order += 1;
                    }
                    let gap = now.duration_since(at).as_secs_f64() * 1e3;
                    if gap > s.max_gap_ms {
                        s.max_gap_ms = gap;
                    }
                }
                last = Some((seq, now));
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break "closed".to_string(),
            Err(e) => break format!("error: {e}"),
        }
    };
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.open -= 1;
    s.last_end = end;
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

fn stream(addr: &str, interval_ms: u64) -> Result<()> {
    let to = resolve(addr)?;
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    eprintln!("mesh-probe: streaming to {to} every {interval_ms} ms");
    let mut seq: u64 = 0;
    loop {
        let mut frame = [0u8; FRAME];
        frame[..8].copy_from_slice(&seq.to_be_bytes());
        frame[8..].copy_from_slice(&now_ns().to_be_bytes());
        conn.write_all(&frame)
            .map_err(|e| format!("stream to {to} broke after {seq} frames: {e}"))?;
        seq += 1;
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}

fn get(url: &str, timeout_ms: u64) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let to = resolve(&hostport)?;
    let timeout = Duration::from_millis(timeout_ms);
    let mut conn =
        TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("read from {to}: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{to}: not an HTTP answer: {answer:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{to}: {}", head.lines().next().unwrap_or_default()));
    }
    print!("{body}");
    Ok(())
}
