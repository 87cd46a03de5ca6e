//! The `vxlan` backend: the kernel's VXLAN device carries pod traffic; the agent only
//! programs it (device, neighbours, FDB, routes) and keeps it programmed. Everything stays
//! in the kernel when the agent stops, so traffic keeps flowing through restarts.

pub mod plan;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Desired;
use crate::netlink::{errno, format_mac, Netlink, NetlinkError};
use plan::{Observed, OurRoute, Step};

/// Our device name, and the route protocol number that marks routes as ours (so a
/// restart finds and cleans its own leftovers and never touches anyone else's).
pub const DEVICE: &str = "mesh-vxlan";
pub const ROUTE_PROTOCOL: u8 = 0x6d;
/// Default VXLAN network identifier ("our VNI" on the wire).
pub const DEFAULT_VNI: u32 = 6783;

#[derive(Clone, Debug)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    /// Our underlay address (the tunnel's source).
    pub local: Ipv4Addr,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The cluster range (for the egress NAT and forwarding rules).
    pub range: crate::ipam::block::Block,
    /// Whether to install the egress NAT and forwarding rules at all.
    pub masquerade: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Refused(String),
}

/// Creates the device, or brings an existing one back in line; returns its index.
pub async fn ensure_device(nl: &Netlink, cfg: &VxlanConfig) -> Result<u32, VxlanError> {
    match nl.link_by_name(DEVICE).await? {
        None => {
            let underlay = nl.link_with_address(cfg.local).await?.ok_or_else(|| {
                VxlanError::Refused(format!(
                    "no interface holds the advertise address {}: cannot anchor {DEVICE}",
                    cfg.local
                ))
            })?;
            info!(device = DEVICE, vni = cfg.vni, port = cfg.port, underlay = %underlay.name, "creating the VXLAN device");
            let msg = LinkVxlan::new(DEVICE, cfg.vni)
                .dev(underlay.index)
                .local(cfg.local)
                .port(cfg.port)
                .learning(false)
                .mtu(cfg.mtu)
                .address(cfg.mac.to_vec())
                .up()
                .build();
            match nl.handle().link().add(msg).execute().await {
                Err(e) if errno(&e) != Some(libc::EEXIST) => {
                    return Err(NetlinkError::request(format!("create {DEVICE}"))(e).into())
                }
                _ => {}
            }
            let link = nl.link_by_name(DEVICE).await?.ok_or_else(|| {
                VxlanError::Refused(format!("{DEVICE} vanished right after it was created"))
            })?;
            if let Err(e) = nl.quiet_ipv6(DEVICE, link.index).await {
                warn!(device = DEVICE, error = %e, "cannot keep IPv6 off the tunnel (harmless: stray packets counted as drops)");
            }
            Ok(link.index)
        }
        Some(l) if l.kind.as_deref() != Some("vxlan") => Err(VxlanError::Refused(format!(
            "a {} link named {DEVICE} exists and is not VXLAN; mesh will not adopt it",
            l.kind.as_deref().unwrap_or("plain")
        ))),
        Some(l) => {
            if l.mtu != cfg.mtu || l.mac != cfg.mac || !l.up {
                info!(
                    device = DEVICE,
                    "repairing the VXLAN device (MTU, MAC or state)"
                );
                let msg = LinkUnspec::new_with_index(l.index)
                    .mtu(cfg.mtu)
                    .address(cfg.mac.to_vec())
                    .up()
                    .build();
                nl.handle()
                    .link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(NetlinkError::request(format!("repair {DEVICE}")))?;
            }
            Ok(l.index)
        }
    }
}

/// For `--dataplane auto`: creates (or adopts) our device, and says false only when the
/// kernel does not know the `vxlan` link kind (no module): the one reason to go userspace.
pub async fn kernel_has_vxlan(nl: &Netlink, cfg: &VxlanConfig) -> bool {
    match ensure_device(nl, cfg).await {
        Ok(_) => true,
        Err(VxlanError::Netlink(e)) if e.errno() == Some(libc::EOPNOTSUPP) => {
            warn!(error = %e, "the kernel cannot make VXLAN devices");
            false
        }
        Err(e) => {
            warn!(error = %e, "probing kernel VXLAN failed for another reason; staying on the kernel backend");
            true
        }
    }
}

/// Kernel state on our device, plus the raw neighbour messages needed to delete entries.
struct Seen {
    state: Observed,
    neighbour_msgs: BTreeMap<Ipv4Addr, NeighbourMessage>,
    fdb_msgs: BTreeMap<(Vec<u8>, Ipv4Addr), NeighbourMessage>,
}

fn neighbour_parts(m: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<Vec<u8>>) {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            // Bridge-family entries carry NDA_DST as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.clone()),
            _ => {}
        }
    }
    (ip, mac)
}

async fn observe(nl: &Netlink, index: u32) -> Result<Seen, NetlinkError> {
    let h = nl.handle();
    let mut seen = Seen {
        state: Observed::default(),
        neighbour_msgs: BTreeMap::new(),
        fdb_msgs: BTreeMap::new(),
    };
    let neigh: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request("list neighbours"))?;
    for m in neigh.into_iter().filter(|m| m.header.ifindex == index) {
        // Only permanent entries are ours; the kernel's own cache entries come and go.
        if m.header.state != NeighbourState::Permanent {
            continue;
        }
        if let (Some(ip), Some(mac)) = neighbour_parts(&m) {
            seen.state.neighbours.insert(ip, mac);
            seen.neighbour_msgs.insert(ip, m);
        }
    }
    let fdb: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(NetlinkError::request("list FDB entries"))?;
    for m in fdb.into_iter().filter(|m| m.header.ifindex == index) {
        if let (Some(ip), Some(mac)) = neighbour_parts(&m) {
            seen.state.fdb.insert((mac.clone(), ip));
            seen.fdb_msgs.insert((mac, ip), m);
        }
    }
    seen.state.routes = nl
        .routes_v4()
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(index) && r.protocol == ROUTE_PROTOCOL)
        .filter_map(|r| {
            Some(OurRoute {
                dst: r.dst,
                prefix: r.prefix,
                via: r.gateway?,
                src: r.prefsrc,
            })
        })
        .collect();
    Ok(seen)
}

fn route_message(index: u32, r: &OurRoute) -> netlink_packet_route::route::RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst, r.prefix)
        .gateway(r.via)
        .output_interface(index)
        .onlink()
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if let Some(src) = r.src {
        b = b.pref_source(src);
    }
    b.build()
}

async fn apply(nl: &Netlink, index: u32, seen: &Seen, step: &Step) -> Result<(), NetlinkError> {
    let h = nl.handle();
    let gone = |e: &rtnetlink::Error| matches!(errno(e), Some(libc::ENOENT) | Some(libc::ESRCH));
    match step {
        Step::SetNeighbour(ip, mac) => h
            .neighbours()
            .add(index, IpAddr::V4(*ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "neighbour {ip} -> {}",
                format_mac(mac)
            ))),
        Step::SetFdb(mac, dst) => h
            .neighbours()
            .add_bridge(index, mac)
            .destination(IpAddr::V4(*dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "FDB {} -> {dst}",
                format_mac(mac)
            ))),
        Step::SetRoute(r) => {
            info!(route = %format!("{}/{}", r.dst, r.prefix), via = %r.via, "installing a pod route");
            h.route()
                .add(route_message(index, r))
                .replace()
                .execute()
                .await
                .map_err(NetlinkError::request(format!(
                    "route {}/{} via {}",
                    r.dst, r.prefix, r.via
                )))
        }
        Step::DelRoute(r) => {
            info!(route = %format!("{}/{}", r.dst, r.prefix), via = %r.via, "removing a pod route");
            match h.route().del(route_message(index, r)).execute().await {
                Err(e) if !gone(&e) => Err(NetlinkError::request("delete route")(e)),
                _ => Ok(()),
            }
        }
        Step::DelNeighbour(ip) => match seen.neighbour_msgs.get(ip) {
            Some(m) => match h.neighbours().del(m.clone()).execute().await {
                Err(e) if !gone(&e) => Err(NetlinkError::request("delete neighbour")(e)),
                _ => Ok(()),
            },
            None => Ok(()),
        },
        Step::DelFdb(mac, dst) => match seen.fdb_msgs.get(&(mac.clone(), *dst)) {
            Some(m) => match h.neighbours().del(m.clone()).execute().await {
                Err(e) if !gone(&e) => Err(NetlinkError::request("delete FDB entry")(e)),
                _ => Ok(()),
            },
            None => Ok(()),
        },
    }
}

async fn reconcile(nl: &Netlink, cfg: &VxlanConfig, want: &Desired) -> Result<usize, VxlanError> {
    let index = ensure_device(nl, cfg).await?;
    // Our gateway as a /32 on the device: the source MASQUERADE picks for traffic leaving
    // through it (kube-proxy masquerades node-originated Service traffic), routable back.
    if let Some(gw) = want.local_gateway {
        nl.set_only_address(index, gw, 32).await?;
    }
    let seen = observe(nl, index).await?;
    let steps = plan::plan(want, &seen.state);
    let mut errors = Vec::new();
    for s in &steps {
        if let Err(e) = apply(nl, index, &seen, s).await {
            errors.push(e);
        }
    }
    Ok(crate::netlink::all_of(steps.len(), errors)?)
}

/// Keeps the kernel matching `desired` until shutdown. Publishes problems (or `None`)
/// through `status`.
pub async fn run(
    nl: Netlink,
    cfg: VxlanConfig,
    mut desired: watch::Receiver<Desired>,
    status: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rounds = super::Rounds::new(
        DEVICE,
        cfg.range,
        cfg.masquerade,
        cfg.port,
        cfg.local,
        Some(DEVICE),
        status,
    );
    loop {
        let want = desired.borrow_and_update().clone();
        let problem = reconcile(&nl, &cfg, &want)
            .await
            .err()
            .map(|e| e.to_string());
        rounds.finish(problem, &want).await;
        if !super::Rounds::next(&mut desired, &mut shutdown).await {
            return;
        }
    }
}
