//! The kernel side of one attachment: a veth pair whose pod end is created directly in
//! the pod's namespace under `CNI_IFNAME` (so a name clash there fails before anything
//! exists), the host end on the node bridge, and the pod end's address and routes.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use mesh_agent::netlink::{errno, Link, Netlink, NetlinkError};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use crate::error::{CniError, CniResult, NETWORK_SETUP_FAILED};

pub fn setup_failed(e: NetlinkError) -> CniError {
    CniError::new(NETWORK_SETUP_FAILED, e.to_string())
}

/// Parses `A.B.C.D/P`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((ip.parse().ok()?, prefix))
}

/// Creates the pair: `host_name` here, `ifname` inside `netns`, both with `mtu`.
pub async fn create_veth(
    host: &Netlink,
    host_name: &str,
    ifname: &str,
    netns: &File,
    mtu: u32,
) -> CniResult<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ifname.to_string())
        .mtu(mtu)
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(host_name, ifname)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.handle().link().add(msg).execute().await.map_err(|e| {
        if errno(&e) == Some(libc::EEXIST) {
            CniError::new(
                NETWORK_SETUP_FAILED,
                format!(
                    "cannot create the veth pair: {ifname} already exists in the pod's namespace"
                ),
            )
        } else {
            setup_failed(NetlinkError::request(format!(
                "create veth {host_name} <-> {ifname}"
            ))(e))
        }
    })
}

/// Attaches the host end to the bridge and brings it up.
pub async fn attach_host_end(host: &Netlink, veth: u32, bridge: u32) -> CniResult<()> {
    let msg = LinkUnspec::new_with_index(veth)
        .controller(bridge)
        .up()
        .build();
    host.handle().link().set(msg).execute().await.map_err(|e| {
        setup_failed(NetlinkError::request("attach the host veth to the bridge")(
            e,
        ))
    })
}

/// Address, link up, and routes on the pod end. Idempotent (a repeated ADD re-runs it).
pub async fn configure_pod_end(
    pod: &Netlink,
    ifname: &str,
    address: (Ipv4Addr, u8),
    routes: &[((Ipv4Addr, u8), Ipv4Addr)],
) -> CniResult<Link> {
    let link = pod
        .link_by_name(ifname)
        .await
        .map_err(setup_failed)?
        .ok_or_else(|| {
            CniError::new(
                NETWORK_SETUP_FAILED,
                format!("{ifname} vanished from the pod's namespace while it was being set up"),
            )
        })?;
    // Before the link comes up: the kernel then announces the address (gratuitous ARP),
    // so a pod or node that cached the MAC of this address's previous holder updates it
    // at once instead of after its entry times out (tens of seconds).
    pod.enable_arp_notify(link.index)
        .await
        .map_err(setup_failed)?;
    pod.add_address(link.index, address.0, address.1)
        .await
        .map_err(setup_failed)?;
    pod.handle()
        .link()
        .set(LinkUnspec::new_with_index(link.index).up().build())
        .execute()
        .await
        .map_err(|e| setup_failed(NetlinkError::request(format!("set {ifname} up"))(e)))?;
    for &((dst, prefix), gw) in routes {
        pod.replace_route(dst, prefix, gw, link.index)
            .await
            .map_err(setup_failed)?;
    }
    Ok(link)
}
