//! Leadership and reclaims: deleted Nodes (an ordinary one, then the Lease holder that made
//! the first split, killed) reclaimed exactly once, and a graceful Lease handover.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{kube_status, log_count, owned_total, pings_all, wait_for, Ctx};

fn lease_field(c: &Ctx, field: &str) -> Result<String> {
    c.api
        .jsonpath(&c.tb, &["-n", "mesh-system", "lease", "mesh-leader"], field)
}

fn lease_holder(c: &Ctx) -> Result<String> {
    lease_field(c, "{.spec.holderIdentity}")
}

fn first_splitter(c: &Ctx) -> Result<String> {
    lease_field(c, "{.metadata.annotations.mesh\\.dev/first-split-by}")
}

fn node_index(c: &Ctx, name: &str) -> Option<usize> {
    (0..c.tb.nodes.len()).find(|i| c.tb.nodes[*i].name == name && !c.tb.nodes[*i].removed)
}

pub(super) fn deleted_node_reclaimed_once(c: &mut Ctx) -> Result<()> {
    // Neither the Lease holder nor the first splitter: reclaimed without a leadership
    // change, through the anchor coordinator. The next case deletes those.
    let (holder, splitter) = (lease_holder(c)?, first_splitter(c)?);
    let gone = (0..c.tb.nodes.len())
        .find(|i| c.tb.nodes[*i].name != holder && c.tb.nodes[*i].name != splitter)
        .context("no node is neither Lease holder nor first splitter")?;
    delete_node_and_check_reclaim(c, gone, Duration::from_secs(40))
}

pub(super) fn deleted_leader_reclaimed_once(c: &mut Ctx) -> Result<()> {
    // The first splitter owns every reclaim anchor of the range, so no peer coordinates its
    // reclaim; it usually holds the Lease too, so its deletion also needs a new leader
    // (after the 15 s Lease duration) before anything can be reclaimed.
    let (holder, splitter) = (lease_holder(c)?, first_splitter(c)?);
    let gone = node_index(c, &splitter)
        .or_else(|| node_index(c, &holder))
        .context("neither the first splitter nor the Lease holder is a live node")?;
    let name = c.tb.nodes[gone].name.clone();
    println!(
        "  deleting {name}: Lease holder {}, first splitter {}",
        name == holder,
        name == splitter
    );
    // A crash, not a goodbye: the Lease is left to expire and the mesh must notice.
    c.tb.kill_agent(gone)?;
    delete_node_and_check_reclaim(c, gone, Duration::from_secs(60))?;
    let new_holder = lease_holder(c)?;
    if new_holder == name || node_index(c, &new_holder).is_none() {
        bail!("the Lease is held by {new_holder:?}, not by a live node");
    }
    let fence = lease_field(c, "{.metadata.annotations.mesh\\.dev/last-reclaim}")?;
    if !fence.starts_with(&format!("{name} by {new_holder}")) {
        bail!("the Lease does not record the reclaim of {name} by {new_holder}: {fence:?}");
    }
    println!("  Lease now held by {new_holder}; it records: {fence}");
    Ok(())
}

pub(super) fn graceful_leader_hands_over(c: &mut Ctx) -> Result<()> {
    // A rolling update restarts the leader's pod: SIGTERM, and the Lease is handed back
    // (client-go's ReleaseOnCancel) instead of expiring after its 15 s.
    let holder = lease_holder(c)?;
    let i = node_index(c, &holder).context("the Lease holder is not a live node")?;
    let stopped = Instant::now();
    c.tb.stop_agent(i)?;
    let stop_took = stopped.elapsed();
    let next = wait_for(
        Duration::from_secs(8),
        "another node holding the Lease",
        || {
            let h = lease_holder(c)?;
            Ok((h != holder && node_index(c, &h).is_some()).then_some(h))
        },
    )?;
    println!(
        "  {holder} stopped (SIGTERM, exited in {stop_took:.1?}) -> {next} holds the Lease {:.1?} after the signal",
        stopped.elapsed()
    );
    if !log_has(c, i, "handed the mesh Lease back on shutdown") {
        bail!("{holder}'s log does not say it handed the Lease back");
    }
    c.tb.start_agent(i)?;
    c.tb.wait_ready(i, Duration::from_secs(30))?;
    mesh_testbed::checks::wait_for_routes(&c.tb, Duration::from_secs(20))?;
    pings_all(c)
}

fn log_has(c: &Ctx, i: usize, needle: &str) -> bool {
    std::fs::read_to_string(&c.tb.nodes[i].log).is_ok_and(|l| l.contains(needle))
}

/// Stops node `gone`'s agent, deletes its Node, and checks that its space is reclaimed in
/// every live node's view within `within`, by exactly one reclaim, and nothing is lost.
fn delete_node_and_check_reclaim(c: &mut Ctx, gone: usize, within: Duration) -> Result<()> {
    let name = c.tb.nodes[gone].name.clone();
    let before = log_count(c, "reclaimed the address space of a deleted Node");
    c.tb.remove_node(gone)?;
    let deleted = Instant::now();
    c.api.kubectl_ok(&c.tb, &["delete", "node", &name])?;
    let live: Vec<usize> = (0..c.tb.nodes.len())
        .filter(|j| !c.tb.nodes[*j].removed)
        .collect();
    for j in &live {
        wait_for(
            within,
            &format!("{name}'s space gone in node {}'s view", j + 1),
            || {
                let ipam = c.tb.meshctl_json(*j, &["status", "ipam"])?;
                let owns = ipam["owners"]
                    .as_array()
                    .map(|o| {
                        o.iter().any(|o| {
                            o["name"] == name.as_str() && o["addresses"].as_u64().unwrap_or(0) > 0
                        })
                    })
                    .unwrap_or(true);
                Ok((!owns).then_some(()))
            },
        )?;
    }
    println!(
        "  Node {name} deleted -> its space reclaimed on every node after {:.1?}",
        deleted.elapsed()
    );
    let reclaims = log_count(c, "reclaimed the address space of a deleted Node") - before;
    if reclaims != 1 {
        bail!("{reclaims} reclaims logged across the agents; exactly one must happen");
    }
    // A second reclaim from anywhere is refused: nothing is left to move.
    for j in &live {
        let out = c.tb.ns_output(
            &c.tb.nodes[*j].netns,
            &[
                &c.tb.bin("meshctl").display().to_string(),
                "--socket",
                &c.tb.nodes[*j].socket.display().to_string(),
                "rmpeer",
                &name,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let refused = text.contains("already reclaimed") || text.contains("no peer named");
        if out.status.success() || !refused {
            bail!(
                "a second rmpeer {name} on node {} was not refused: {text}",
                j + 1
            );
        }
    }
    let ipam = c.tb.meshctl_json(live[0], &["status", "ipam"])?;
    let total = owned_total(&ipam);
    if total != 1 << 20 {
        bail!("after the reclaim the owners hold {total} addresses: {ipam}");
    }
    let k = kube_status(
        c,
        live.iter()
            .copied()
            .find(|j| kube_status(c, *j).is_ok_and(|k| k["is_leader"] == true))
            .unwrap_or(0),
    )?;
    println!("  leader's meshctl status: last reclaim {}", k["reclaims"]);
    pings_all(c)
}
