//! Human output of `meshctl`: aligned tables and a Graphviz view. Pure string building.

use std::fmt::Write;

use mesh_proto::api::{ConnectionsResponse, IpamStatusResponse, PeersResponse, StatusResponse};

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn counts(map: &std::collections::BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn summary(s: &StatusResponse) -> String {
    let rows = [
        (
            "Version",
            format!(
                "{} (protocol {}..={})",
                s.agent_version, s.protocol.min, s.protocol.max
            ),
        ),
        (
            "Node",
            format!(
                "{} ({}), incarnation {}",
                s.node.name, s.node.id, s.node.incarnation
            ),
        ),
        ("Listen", s.listen.clone()),
        ("Authentication", s.auth.clone()),
        ("Data plane", s.dataplane.clone()),
        ("Ready", if s.ready { "yes".into() } else { "no".into() }),
        ("Peers", format!("{} ({})", s.peers, counts(&s.peer_states))),
        (
            "Connections",
            format!(
                "{} ({})",
                s.connections.values().sum::<usize>(),
                counts(&s.connections)
            ),
        ),
        ("IPAM", format!("{}: {}", s.ipam.range, s.ipam.status)),
        ("Pod network", pod_network(s.node_network.as_ref())),
        ("Kubernetes", kube(s.kube.as_ref())),
        ("Uptime", format!("{} s", s.uptime_seconds)),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:>15}: {v}");
    }
    if s.auth.contains("insecure") {
        out.push_str("\nWARNING: this agent runs without authentication (--insecure-no-auth): anyone who can reach it can join.\n");
    }
    out
}

fn kube(k: Option<&mesh_proto::api::KubeStatus>) -> String {
    let Some(k) = k else {
        return "off (no --kube)".into();
    };
    let leader = match (&k.leader, k.is_leader) {
        (_, true) => "this node leads".to_string(),
        (Some(l), false) => format!("leader {l}"),
        (None, false) => "no leader yet".to_string(),
    };
    let mut out = format!(
        "{}: {} nodes, {} peer targets, {leader}, NetworkUnavailable={}",
        k.api,
        k.nodes,
        k.peer_targets,
        k.network_unavailable.as_deref().unwrap_or("not set yet")
    );
    if let Some(r) = k.reclaims.last() {
        out.push_str(&format!("; last reclaim: {r}"));
    }
    if !k.errors.is_empty() {
        let all: Vec<String> = k.errors.values().cloned().collect();
        out.push_str(&format!("; API ERROR: {}", all.join("; ")));
    } else if let Some(e) = &k.last_error {
        out.push_str(&format!("; API ERROR: {e}"));
    }
    out
}

fn pod_network(n: Option<&mesh_proto::api::NodeNetworkStatus>) -> String {
    match n {
        None => "none (--dataplane none: pods cannot be attached on this node)".into(),
        Some(n) => {
            let address = n.address.as_deref().unwrap_or("no address yet");
            let state = match (&n.problem, n.ready) {
                (_, true) => "ready".to_string(),
                (Some(p), false) => format!("NOT READY: {p}"),
                (None, false) => "not ready".to_string(),
            };
            let tunnel = match &n.tunnel_problem {
                Some(p) => format!("; tunnel NOT RIGHT: {p}"),
                None => String::new(),
            };
            format!(
                "bridge {} {address}, mtu {}: {state}{tunnel}",
                n.bridge, n.mtu
            )
        }
    }
}

pub fn peers(p: &PeersResponse) -> String {
    let rows: Vec<Vec<String>> = p
        .peers
        .iter()
        .map(|v| {
            let links = v
                .connections
                .iter()
                .map(|c| {
                    format!(
                        "{}{}",
                        if c.direction == "out" { "->" } else { "<-" },
                        c.peer
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                if v.is_self {
                    format!("{} (self)", v.name)
                } else {
                    v.name.clone()
                },
                v.id.clone(),
                v.state.clone(),
                v.incarnation.to_string(),
                v.addresses.join(","),
                links,
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "STATE", "INC", "ADDRESS", "CONNECTIONS"],
        &rows,
    )
}

pub fn peers_dot(p: &PeersResponse) -> String {
    let mut out = String::from("digraph mesh {\n  node [shape=box, style=rounded];\n");
    for v in &p.peers {
        let color = match v.state.as_str() {
            "alive" => "black",
            "suspect" => "orange",
            _ => "gray",
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\\n{}\\n{}\", color={color}];",
            v.id, v.name, v.id, v.state
        );
    }
    for v in &p.peers {
        for c in v.connections.iter().filter(|c| c.direction == "out") {
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", v.id, c.peer_id);
        }
    }
    out.push_str("}\n");
    out
}

pub fn connections(c: &ConnectionsResponse) -> String {
    if c.connections.is_empty() {
        return "no connections (no --peers given and nobody has connected yet)\n".into();
    }
    let rows: Vec<Vec<String>> = c
        .connections
        .iter()
        .map(|v| {
            let peer = match (v.peer.is_empty(), v.peer_id.is_empty()) {
                (false, _) => format!("{} ({})", v.peer, v.peer_id),
                (true, false) => v.peer_id.clone(),
                (true, true) => "-".into(),
            };
            vec![
                if v.direction == "out" {
                    "->".into()
                } else {
                    "<-".into()
                },
                v.address.clone(),
                peer,
                v.dataplane.clone(),
                format!("{}s", v.since_seconds),
                v.state.clone(),
            ]
        })
        .collect();
    table(
        &["DIR", "ADDRESS", "PEER", "DATAPLANE", "SINCE", "STATE"],
        &rows,
    )
}

/// Like `weave status ipam`: every owner's share, unreachable ones marked.
pub fn ipam(v: &IpamStatusResponse) -> String {
    let mut out = format!("Range: {}\nStatus: {}\n\n", v.range, v.status);
    let rows: Vec<Vec<String>> = v
        .owners
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                o.peer.clone(),
                o.addresses.to_string(),
                format!("{:.1}%", o.share * 100.0),
                if o.reachable {
                    String::new()
                } else {
                    "unreachable!".into()
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no owners yet: the range has not been split\n");
    } else {
        out.push_str(&table(&["NAME", "ID", "ADDRESSES", "SHARE", ""], &rows));
    }
    if v.unreachable_share > 0.0 {
        let _ = writeln!(out, "\n{:.1}% of the range is owned by unreachable peers: 'meshctl rmpeer NAME' reclaims a peer that is gone", v.unreachable_share * 100.0);
    }
    for r in &v.refused_peers {
        let _ = writeln!(out, "refused: {r}");
    }
    let l = &v.local;
    let _ = writeln!(
        out,
        "\nThis node: {} allocated, {} free, gateway {}, blocks {}",
        l.allocated,
        l.free,
        l.gateway.as_deref().unwrap_or("-"),
        if l.blocks.is_empty() {
            "none".to_string()
        } else {
            l.blocks.join(" ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
