//! Throughput, latency and CPU measurements shared by the data-plane benchmark and
//! `mesh-testbed bench`: iperf3 (TCP, JSON output), ping averages, and the CPU time
//! processes used meanwhile.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::Testbed;

/// iperf3 TCP from namespace `client_ns` to `server` (an `iperf3 -s` must run there), in
/// Gbit/s as the receiver counted.
pub fn iperf(tb: &Testbed, client_ns: &str, server: &str, streams: u32, secs: u32) -> Result<f64> {
    let out = tb.ns(
        client_ns,
        &[
            "iperf3",
            "-c",
            server,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no throughput in iperf3 output")
}

/// Average RTT of 30 pings 20 ms apart, in µs.
pub fn ping_us(tb: &Testbed, client_ns: &str, server: &str) -> Result<f64> {
    let out = tb.ns(client_ns, &["ping", "-c", "30", "-i", "0.02", "-q", server])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.030/0.045/0.090/0.010 ms
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no ping summary")?;
    Ok(avg * 1000.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Runs `f` and returns its result with the CPU the processes used meanwhile, as % of
/// one core.
pub fn with_cpu<T>(procs: &[u32], f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let ticks = || procs.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (before, started) = (ticks(), std::time::Instant::now());
    let out = f()?;
    let used = ticks().saturating_sub(before) as f64 / hz;
    Ok((out, 100.0 * used / started.elapsed().as_secs_f64()))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
