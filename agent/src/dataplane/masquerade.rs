//! Egress NAT and forwarding rules, in chains of our own. Pod traffic to destinations
//! outside the cluster range is masqueraded to the node's address; pod<->pod and
//! pod<->node traffic never is, and neither is traffic kube-proxy already marked for its
//! own masquerade (0x4000), which would otherwise be NATed twice. The chains are rewritten
//! whole with `iptables-restore --noflush` (atomic, idempotent across restarts) and hooked
//! into POSTROUTING / FORWARD with one jump each; `remove` undoes both.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::ipam::block::Block;

pub const NAT_CHAIN: &str = "MESH-POSTROUTING";
pub const FORWARD_CHAIN: &str = "MESH-FORWARD";
/// kube-proxy's masquerade mark.
const KUBE_MARK_MASQ: &str = "0x4000/0x4000";

/// The `iptables-restore` input for both our chains (pure, so it is tested as text).
pub fn rules(range: Block, nodes: &[Ipv4Addr]) -> String {
    let r = format!("{}/{}", Ipv4Addr::from(range.start), range.prefix);
    let mut s = String::new();
    s.push_str("*nat\n");
    s.push_str(&format!(":{NAT_CHAIN} - [0:0]\n"));
    s.push_str(&format!(
        "-A {NAT_CHAIN} -s {r} -d {r} -m comment --comment \"mesh: pod to pod\" -j RETURN\n"
    ));
    s.push_str(&format!(
        "-A {NAT_CHAIN} -m mark --mark {KUBE_MARK_MASQ} -m comment --comment \"mesh: kube-proxy masquerades these\" -j RETURN\n"
    ));
    for n in nodes {
        s.push_str(&format!(
            "-A {NAT_CHAIN} -s {r} -d {n}/32 -m comment --comment \"mesh: pod to node\" -j RETURN\n"
        ));
    }
    s.push_str(&format!(
        "-A {NAT_CHAIN} -s {r} ! -d 224.0.0.0/4 -m comment --comment \"mesh: pod egress\" -j MASQUERADE --random-fully\n"
    ));
    s.push_str("COMMIT\n*filter\n");
    s.push_str(&format!(":{FORWARD_CHAIN} - [0:0]\n"));
    s.push_str(&format!(
        "-A {FORWARD_CHAIN} -s {r} -m comment --comment \"mesh: from pods\" -j ACCEPT\n"
    ));
    s.push_str(&format!(
        "-A {FORWARD_CHAIN} -d {r} -m comment --comment \"mesh: to pods\" -j ACCEPT\n"
    ));
    s.push_str("COMMIT\n");
    s
}

fn iptables(args: &[&str]) -> std::io::Result<bool> {
    Ok(Command::new("iptables")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success())
}

fn hook(table: &str, from: &str, chain: &str) -> Result<(), String> {
    let spec = ["-t", table, "-C", from, "-j", chain];
    if iptables(&spec).map_err(|e| format!("cannot run iptables: {e}"))? {
        return Ok(());
    }
    let insert = ["-t", table, "-I", from, "1", "-j", chain];
    match iptables(&insert) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("iptables -t {table} -I {from} -j {chain} failed")),
        Err(e) => Err(format!("cannot run iptables: {e}")),
    }
}

/// Writes our chains and makes sure they are hooked in.
pub fn apply(range: Block, nodes: &[Ipv4Addr]) -> Result<(), String> {
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore (is iptables installed?): {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(rules(range, nodes).as_bytes())
            .map_err(|e| format!("iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iptables-restore refused our rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    hook("nat", "POSTROUTING", NAT_CHAIN)?;
    hook("filter", "FORWARD", FORWARD_CHAIN)
}

/// Keeps our rules in place from a backend's reconcile loop: rewrites them when the node
/// list changes, and every 10 s to repair edits made behind our back.
#[derive(Debug, Default)]
pub struct Keeper {
    applied: Option<(Vec<Ipv4Addr>, std::time::Instant)>,
}

impl Keeper {
    pub fn tick(&mut self, range: Block, nodes: &[Ipv4Addr]) -> Result<(), String> {
        let due = self.applied.as_ref().is_none_or(|(n, at)| {
            n.as_slice() != nodes || at.elapsed() >= std::time::Duration::from_secs(10)
        });
        if due {
            apply(range, nodes)?;
            self.applied = Some((nodes.to_vec(), std::time::Instant::now()));
        }
        Ok(())
    }
}

/// Removes the jumps and our chains (uninstall).
pub fn remove() {
    for (table, from, chain) in [
        ("nat", "POSTROUTING", NAT_CHAIN),
        ("filter", "FORWARD", FORWARD_CHAIN),
    ] {
        while iptables(&["-t", table, "-D", from, "-j", chain]).unwrap_or(false) {}
        let _ = iptables(&["-t", table, "-F", chain]);
        let _ = iptables(&["-t", table, "-X", chain]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_to_pods_nodes_and_kube_marked_traffic_are_exempt_before_masquerade() {
        let r = rules(
            "10.32.0.0/12".parse().unwrap(),
            &[Ipv4Addr::new(192, 168, 1, 2)],
        );
        let nat: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A MESH-POSTROUTING"))
            .collect();
        assert!(nat[0].contains("-s 10.32.0.0/12 -d 10.32.0.0/12") && nat[0].ends_with("RETURN"));
        assert!(nat[1].contains("--mark 0x4000/0x4000") && nat[1].ends_with("RETURN"));
        assert!(nat[2].contains("-d 192.168.1.2/32") && nat[2].ends_with("RETURN"));
        assert!(
            nat[3].contains("MASQUERADE"),
            "masquerade comes last: {nat:?}"
        );
        assert_eq!(r.matches("COMMIT").count(), 2);
        assert!(r.contains(":MESH-FORWARD - [0:0]"));
    }
}
