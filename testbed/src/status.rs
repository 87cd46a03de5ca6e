//! `mesh-testbed status`: every node's `meshctl status` side by side (or one node's in
//! full); on a Kubernetes testbed the keeper's view (nodes, mesh pods, meshctl via kubectl).

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::{layout, request};

pub fn status(name: &str, node: Option<&str>) -> Result<ExitCode> {
    let l = layout::Layout::load(name)?;
    if l.kubernetes {
        return request(name, "status");
    }
    let meshctl = mesh_testbed::bed::bin_dir()?.join("meshctl");
    if let Some(node) = node {
        let n = l
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {node:?} in testbed {name:?}"))?;
        let out = std::process::Command::new(&meshctl)
            .args(["--socket", &n.socket, "status"])
            .status()?;
        return Ok(if out.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    // Side by side: one column per node, rows from `meshctl status -o json`.
    let rows = [
        "ready",
        "data plane",
        "peers",
        "connections",
        "ipam",
        "pod network",
        "problem",
    ];
    let mut cols: Vec<Vec<String>> = Vec::new();
    let mut all_ready = true;
    for n in &l.nodes {
        let out = std::process::Command::new(&meshctl)
            .args(["--socket", &n.socket, "status", "-o", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v.is_null() {
            all_ready = false;
            cols.push(vec![
                "agent unreachable".into(),
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(40)
                    .collect(),
            ]);
            continue;
        }
        let nn = &v["node_network"];
        let ready = v["ready"] == true && nn["ready"] == true;
        all_ready &= ready;
        let conns = v["connections"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, c)| format!("{c} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let problem = nn["problem"]
            .as_str()
            .or(nn["tunnel_problem"].as_str())
            .unwrap_or("-");
        cols.push(vec![
            ready.to_string(),
            v["dataplane"].as_str().unwrap_or("?").to_string(),
            v["peers"].to_string(),
            conns,
            v["ipam"]["status"].as_str().unwrap_or("?").to_string(),
            format!(
                "{} mtu {}",
                nn["address"].as_str().unwrap_or("-"),
                nn["mtu"]
            ),
            problem.chars().take(40).collect(),
        ]);
    }
    let colw: Vec<usize> = (0..cols.len())
        .map(|i| {
            cols[i]
                .iter()
                .map(String::len)
                .chain(std::iter::once(l.nodes[i].name.len()))
                .max()
                .unwrap_or(4)
                + 2
        })
        .collect();
    print!("{:14}", "");
    for (i, n) in l.nodes.iter().enumerate() {
        print!("{:w$}", n.name, w = colw[i]);
    }
    println!();
    for (r, label) in rows.iter().enumerate() {
        print!("{label:14}");
        for (i, c) in cols.iter().enumerate() {
            print!(
                "{:w$}",
                c.get(r).map(String::as_str).unwrap_or(""),
                w = colw[i]
            );
        }
        println!();
    }
    println!("\n(one node in full: mesh-testbed --name {name} status --node n1)");
    Ok(if all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
