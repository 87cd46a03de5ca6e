//! Forged VXLAN: nobody but a mesh member may put packets into the overlay, only to the
//! node's own underlay address, and a member only with its own addresses as inner sources.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_testbed::{forge, Testbed};

const PORT: u16 = 19990;
const VXLAN_PORT: u16 = 8472;

fn pod_on(tb: &Testbed, node: usize, nth: usize) -> Result<(String, Ipv4Addr)> {
    let p = tb
        .pods
        .iter()
        .filter(|p| p.node == node && p.address.is_some())
        .nth(nth)
        .with_context(|| format!("pod {nth} on node {node}"))?;
    Ok((p.netns.clone(), p.address.context("address")?))
}

fn mac_of(tb: &Testbed, node: usize) -> Result<[u8; 6]> {
    let status = tb.meshctl_json(node, &["status"])?;
    forge::vtep_mac(status["node"]["id"].as_str().context("status has no id")?)
}

/// A VXLAN payload to node 0's VTEP carrying UDP to `to`:PORT from `from`, saying `what`.
fn datagram(mac0: [u8; 6], src_mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr, what: &str) -> Vec<u8> {
    let inner = forge::ipv4_udp(from, to, 4000, PORT, what.as_bytes());
    forge::vxlan(forge::VNI, mac0, src_mac, &inner)
}

pub(super) fn forged_vxlan_reaches_no_pod(tb: &mut Testbed) -> Result<()> {
    let (target_ns, target) = pod_on(tb, 0, 0)?;
    let (attacker_ns, _) = pod_on(tb, 0, 1)?;
    let (_, pod1) = pod_on(tb, 1, 0)?;
    let (_, pod2) = pod_on(tb, 2, 0)?;
    let gateway: Ipv4Addr = tb
        .pods
        .iter()
        .find(|p| p.netns == target_ns)
        .and_then(|p| p.result.as_ref())
        .and_then(|r| r["ips"][0]["gateway"].as_str())
        .and_then(|g| g.parse().ok())
        .context("the target pod's gateway")?;
    let (mac0, mac1) = (mac_of(tb, 0)?, mac_of(tb, 1)?);
    let node0 = tb.nodes[0].underlay_ip;
    let node1 = tb.nodes[1].underlay_ip;
    let stranger_ip = Ipv4Addr::new(192, 168, 77, 250);
    let stranger = tb.external_host("ext", stranger_ip)?;
    let own_mac = [0x02, 0, 0, 0, 0, 0x66];
    let arrived = forge::udp_collect(&target_ns, PORT, Duration::from_millis(2500))?;

    // 1. A pod sends VXLAN to its own gateway, claiming a remote pod's address.
    // 2. A host on the underlay that is no member sends VXLAN to the node.
    for (from, to, what) in [
        (&attacker_ns, gateway, "forged: from a pod to its gateway"),
        (&stranger, node0, "forged: from a non-member host"),
    ] {
        forge::send_udp(
            from,
            to,
            VXLAN_PORT,
            datagram(mac0, own_mac, pod1, target, what),
        )?;
    }
    // 5. A pod on node 2 sends VXLAN to another address of node 1: its own node
    //    masquerades it to node 2's (member) address, and the inner frame carries node 2's
    //    VTEP MAC and the pod's own address — only "VXLAN to our underlay address" stops it.
    let (remote_ns, _) = pod_on(tb, 1, 0)?;
    let second = Ipv4Addr::new(192, 168, 77, 201);
    let node0_ns = tb.nodes[0].netns.clone();
    tb.ns(
        &node0_ns,
        &["ip", "addr", "add", &format!("{second}/24"), "dev", "eth0"],
    )?;
    let sent = forge::send_udp(
        &remote_ns,
        second,
        VXLAN_PORT,
        datagram(
            mac0,
            mac1,
            pod1,
            target,
            "forged: masqueraded by its own node",
        ),
    );
    tb.ns(
        &node0_ns,
        &["ip", "addr", "del", &format!("{second}/24"), "dev", "eth0"],
    )?;
    sent?;
    // 3. A stranger spoofs member 1's underlay address and VTEP MAC, but claims a pod
    //    address of node 2: the inner source is not the sending node's.
    let outer = |inner: Vec<u8>| forge::ipv4_udp(node1, node0, 40000, VXLAN_PORT, &inner);
    forge::send_raw_ipv4(
        &stranger,
        outer(datagram(
            mac0,
            mac1,
            pod2,
            target,
            "forged: another node's pod address",
        )),
    )?;
    // 4. Control: the same spoof with node 1's own pod address is the documented limit
    //    (underlay address *and* VTEP MAC forged) — and proves the frames are well made,
    //    so the refusals above are the guard's, not a malformed packet's.
    forge::send_raw_ipv4(
        &stranger,
        outer(datagram(
            mac0,
            mac1,
            pod1,
            target,
            "control: the sending node's own pod",
        )),
    )?;

    let got = arrived
        .recv_timeout(Duration::from_secs(10))
        .context("the listener never reported")?;
    let texts: Vec<String> = got
        .iter()
        .map(|(from, p)| format!("{from}: {}", String::from_utf8_lossy(p)))
        .collect();
    println!("  arrived at {target}: {texts:?}");
    ensure!(
        texts.iter().any(|t| t.contains("control")),
        "the control datagram never arrived, so the test proves nothing: {texts:?}"
    );
    let forged: Vec<&String> = texts.iter().filter(|t| t.contains("forged")).collect();
    ensure!(
        forged.is_empty(),
        "forged packets reached a pod: {forged:?}"
    );
    Ok(())
}
