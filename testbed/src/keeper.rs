//! The keeper: the long-lived process behind `mesh-testbed up`. It enters a private mount
//! namespace (its own `/run/netns`), builds the testbed, reports progress on stdout until
//! it prints `READY`, then serves one request at a time on a root-only unix socket
//! (`check`, `chaos`, `bench SECONDS`, `down`), writing the output back and ending with an
//! exit-code line. Its agents die with it; its namespaces vanish with its mount namespace.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use mesh_testbed::chaos::{self, ChaosConfig};
use mesh_testbed::checks::{self, live_nodes};
use mesh_testbed::measure::{self, with_cpu};
use mesh_testbed::{privns, AgentOptions, Testbed};

use crate::{layout, state_dir, Backend};

/// The line that tells `up` the testbed is ready.
pub const READY: &str = "mesh-testbed: ready";
/// Prefix of the last line of every answer: the exit code.
pub const EXIT: &str = "mesh-testbed: exit ";
pub const SOCKET: &str = "control.sock";

/// One progress line for `up`. If `up` is gone (interrupted), the set-up is abandoned: the
/// error ends the keeper, and everything it built goes with it.
fn progress(step: usize, of: usize, what: &str, started: Instant) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "[{step}/{of}] {what} ({:.1?})", started.elapsed())
        .and_then(|()| out.flush())
        .context("`mesh-testbed up` went away (interrupted?); abandoning the set-up")
}

pub fn run(name: &str, nodes: usize, pods: usize, backend: Backend) -> Result<()> {
    // First, while single-threaded.
    privns::enter_private_mounts()?;
    let dir = state_dir(name);
    std::fs::write(dir.join("keeper.pid"), std::process::id().to_string())?;
    let started = Instant::now();
    let mut tb = Testbed::with_prefix(name, Some(dir.join("work")))?;
    progress(1, 5, "underlay bridge ready", started)?;
    let peers: Vec<String> = (1..=nodes).map(|i| format!("192.168.77.{i}")).collect();
    for i in 0..nodes {
        tb.add_node(&AgentOptions {
            ipalloc_init: Some(format!("consensus={nodes}")),
            dataplane: backend.dataplane(i).into(),
            extra: vec!["--peers".into(), peers.join(",")],
        })?;
    }
    progress(
        2,
        5,
        &format!("{nodes} node namespaces on the underlay"),
        started,
    )?;
    for i in 0..nodes {
        tb.start_agent(i)?;
    }
    for i in 0..nodes {
        tb.wait_ready(i, Duration::from_secs(120))?;
    }
    progress(
        3,
        5,
        &format!("{nodes} agents ready (IPAM agreed, pod network up)"),
        started,
    )?;
    for n in 0..nodes {
        let list = tb.conflist(n, "1.1.0", &[]);
        for p in 0..pods {
            tb.add_pod(n, &format!("n{}p{}", n + 1, p + 1), &list, &json!({}))?;
        }
    }
    progress(
        4,
        5,
        &format!("{} pods attached through mesh-cni", nodes * pods),
        started,
    )?;
    checks::wait_for_routes(&tb, Duration::from_secs(120))?;
    progress(5, 5, "every node routes every other node's pods", started)?;
    layout::save(name, &tb)?;
    let listener = announce_ready(name)?;
    serve(name, &mut tb, listener, pods, backend);
    tb.down();
    Ok(())
}

fn serve(name: &str, tb: &mut Testbed, listener: UnixListener, pods: usize, backend: Backend) {
    serve_requests(listener, |words, stream| {
        Some(match words.first().copied() {
            Some("check") => checks::connectivity(tb, stream),
            Some("chaos") => {
                let cfg = ChaosConfig {
                    new_node_dataplane: backend.dataplane(tb.nodes.len()).into(),
                    pods_per_node: pods,
                };
                let r = chaos::run_all(tb, &cfg, stream);
                if let Err(e) = layout::save(name, tb) {
                    eprintln!("cannot save the layout: {e:#}");
                }
                r
            }
            Some("bench") => {
                let secs = words.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
                bench(tb, secs, stream)
            }
            Some("down") => {
                let _ = writeln!(stream, "tearing down testbed {name:?}");
                let _ = writeln!(stream, "{EXIT}0");
                return None;
            }
            other => Err(anyhow::anyhow!("unknown request {other:?}")),
        })
    });
}

/// Binds the root-only control socket, then tells `up` the testbed is ready; from then on
/// stdout goes to the log like stderr (`up` stops reading).
pub fn announce_ready(name: &str) -> Result<UnixListener> {
    let socket = state_dir(name).join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut out = std::io::stdout();
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .context("`mesh-testbed up` went away before the testbed was ready")?;
    nix::unistd::dup2_stdout(std::io::stderr()).context("redirect stdout")?;
    Ok(listener)
}

/// Serves one request at a time: `handle` gets the request's words and the connection, and
/// answers Some(outcome) — written back as an exit-code line (0 true, 1 false, 2 error) — or
/// None to stop serving (it wrote its own last line).
pub fn serve_requests(
    listener: UnixListener,
    mut handle: impl FnMut(&[&str], &mut UnixStream) -> Option<Result<bool>>,
) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        eprintln!("request: {}", line.trim());
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(outcome) = handle(&words, &mut stream) else {
            return;
        };
        let code = match outcome {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                let _ = writeln!(stream, "error: {e:#}");
                2
            }
        };
        let _ = writeln!(stream, "{EXIT}{code}");
    }
}

/// iperf3 and ping between pods on two different nodes (and, for reference, two pods on
/// one node), with the CPU the two nodes' agents used (the udp backend forwards in them).
fn bench(tb: &mut Testbed, secs: u32, out: &mut dyn Write) -> Result<bool> {
    anyhow::ensure!(
        mesh_testbed::gate::on_path("iperf3"),
        "iperf3 is missing (apt-get install iperf3)"
    );
    let live = live_nodes(tb);
    anyhow::ensure!(live.len() >= 2, "needs two nodes");
    let on = |n: usize| tb.pods.iter().filter(move |p| p.node == n);
    let client = on(live[0]).next().context("a pod on the first node")?;
    let remote = on(live[1]).next().context("a pod on the second node")?;
    let local = on(live[0]).nth(1);
    let mut paths = vec![(
        format!(
            "{} -> {} (across nodes, {} -> {})",
            client.name, remote.name, tb.nodes[live[0]].dataplane, tb.nodes[live[1]].dataplane
        ),
        remote.netns.clone(),
        remote.address.context("address")?,
    )];
    if let Some(l) = local {
        paths.push((
            format!("{} -> {} (same node, bridge only)", client.name, l.name),
            l.netns.clone(),
            l.address.context("address")?,
        ));
    }
    let client_ns = client.netns.clone();
    let agents: Vec<u32> = [live[0], live[1]]
        .iter()
        .filter_map(|i| tb.nodes[*i].agent_pid())
        .collect();
    writeln!(
        out,
        "| path | TCP 1 stream Gbit/s | TCP 4 streams Gbit/s | ping avg µs | agents' CPU, 1 / 4 streams |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (label, server_ns, ip) in &paths {
        let pidfile = tb.work.join("iperf3.pid");
        tb.ns(
            server_ns,
            &[
                "iperf3",
                "-s",
                "-D",
                "--pidfile",
                &pidfile.display().to_string(),
            ],
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let server = ip.to_string();
        let result = (|| -> Result<()> {
            let (one, cpu1) =
                with_cpu(&agents, || measure::iperf(tb, &client_ns, &server, 1, secs))?;
            let (four, cpu4) =
                with_cpu(&agents, || measure::iperf(tb, &client_ns, &server, 4, secs))?;
            let rtt = measure::ping_us(tb, &client_ns, &server)?;
            writeln!(
                out,
                "| {label} | {one:.2} | {four:.2} | {rtt:.0} | {cpu1:.0} % / {cpu4:.0} % |"
            )?;
            out.flush()?;
            Ok(())
        })();
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        result?;
    }
    writeln!(
        out,
        "\n({secs} s per run; the kernel backend's forwarding is not in the agents' CPU; for \
         the full comparison with by-hand VXLAN and a naive forwarder: sudo scripts/bench-dataplane.sh)"
    )?;
    Ok(true)
}
