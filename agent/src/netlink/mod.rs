//! Thin helpers over rtnetlink shared by the agent (node bridge) and `mesh-cni` (veth pairs):
//! a connection bound to one network namespace, link/address/route look-ups decoded into
//! plain structs, and errno extraction so callers can tell "already gone" from failure.

pub mod netns;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    AfSpecInet, AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InetDevConf,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::neighbour_table::{
    NeighbourTableAttribute, NeighbourTableMessage, NeighbourTableParameter,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: rtnetlink::Error,
    },
    /// Several changes of one round failed; the others were still made.
    #[error("{failed} of {total} changes failed: {}", first)]
    Some {
        failed: usize,
        total: usize,
        first: Box<NetlinkError>,
    },
}

/// Collects the outcomes of a round's independent changes: every change is tried, and a
/// failed one (a route the kernel refuses) does not keep the others from being made.
pub fn all_of(total: usize, errors: Vec<NetlinkError>) -> Result<usize, NetlinkError> {
    let failed = errors.len();
    match errors.into_iter().next() {
        None => Ok(total),
        Some(first) if failed == 1 && total == 1 => Err(first),
        Some(first) => Err(NetlinkError::Some {
            failed,
            total,
            first: Box::new(first),
        }),
    }
}

impl NetlinkError {
    pub fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The kernel's errno for a refused request (positive, e.g. `libc::EEXIST`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. } => errno(source),
            NetlinkError::Netns { source, .. } | NetlinkError::Socket(source) => {
                source.raw_os_error()
            }
            NetlinkError::Some { first, .. } => first.errno(),
        }
    }
}

/// The positive errno of a netlink NACK.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// One link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// RFC 2863 operational state is up: the kernel has seen the carrier (for a bridge
    /// port, it has been enabled).
    pub oper_up: bool,
    pub mtu: u32,
    pub mac: Vec<u8>,
    /// `bridge`, `veth`, … (None for plain devices such as `lo`).
    pub kind: Option<String>,
    /// The bridge this link is attached to.
    pub controller: Option<u32>,
    /// IFLA_LINK: for a veth, the other end's index (in the other end's namespace).
    pub peer_index: Option<u32>,
}

impl Link {
    pub fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            up: m.header.flags.contains(LinkFlags::Up),
            oper_up: false,
            mtu: 0,
            mac: Vec::new(),
            kind: None,
            controller: None,
            peer_index: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::OperState(s) => {
                    link.oper_up = *s == netlink_packet_route::link::State::Up
                }
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Link(i) => link.peer_index = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(kind_name(k));
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Tun => "tun".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IPv4 route in the main table, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    pub prefsrc: Option<Ipv4Addr>,
}

/// A netlink connection bound to the network namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Opens a connection inside the network namespace at `path` (e.g. a pod's
    /// `CNI_NETNS`). The socket is created on a short-lived thread that entered the
    /// namespace, so no runtime thread ever changes namespace; a socket stays in the
    /// namespace it was created in.
    pub fn connect_in(path: &Path) -> Result<Netlink, NetlinkError> {
        let runtime = tokio::runtime::Handle::current();
        let (conn, handle) = netns::run_in(path, move || {
            let _guard = runtime.enter();
            rtnetlink::new_connection()
                .map(|(conn, handle, _)| (conn, handle))
                .map_err(NetlinkError::Socket)
        })??;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::request(format!("look up link {name}"))(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::request(format!("look up link #{index}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Deletes a link by name; Ok(false) when there was none.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(NetlinkError::request(format!("delete link {name}"))(e)),
        }
    }

    /// The address messages of one family on a link.
    async fn addresses(
        &self,
        index: u32,
        family: AddressFamily,
    ) -> Result<Vec<AddressMessage>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list addresses"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.family == family && m.header.index == index)
            .collect())
    }

    /// IPv4 addresses on a link, with their prefix lengths.
    pub async fn addresses_v4(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let msgs = self.addresses(index, AddressFamily::Inet).await?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// The link holding `ip`, if any (used to find the underlay device and its MTU).
    pub async fn link_with_address(&self, ip: Ipv4Addr) -> Result<Option<Link>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list addresses"))?;
        let index = msgs.iter().find_map(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(x)) if *x == ip))
                .then_some(m.header.index)
        });
        match index {
            Some(i) => self.link_by_index(i).await,
            None => Ok(None),
        }
    }

    pub async fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(NetlinkError::request(format!("add address {ip}/{prefix}"))(
                e,
            )),
        }
    }

    pub async fn delete_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(ip))
            .set_prefix_length_filter(prefix)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list addresses"))?;
        for m in msgs {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(NetlinkError::request(format!(
                        "delete address {ip}/{prefix}"
                    ))(e))
                }
            }
        }
        Ok(())
    }

    /// Makes `ip/prefix` the link's only IPv4 address (our tunnel devices hold exactly the
    /// gateway as a /32: the source the kernel and MASQUERADE pick for traffic through them).
    pub async fn set_only_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let present = self.addresses_v4(index).await?;
        for (other, len) in &present {
            if (*other, *len) != (ip, prefix) {
                self.delete_address(index, *other, *len).await?;
            }
        }
        if !present.contains(&(ip, prefix)) {
            self.add_address(index, ip, prefix).await?;
        }
        Ok(())
    }

    /// IPv4 routes of the main table.
    pub async fn routes_v4(&self) -> Result<Vec<Route4>, NetlinkError> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("list routes"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.table == libc::RT_TABLE_MAIN)
            .map(|m| {
                let mut r = Route4 {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: m.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    protocol: u8::from(m.header.protocol),
                    prefsrc: None,
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                        RouteAttribute::Oif(i) => r.oif = Some(*i),
                        RouteAttribute::PrefSource(RouteAddress::Inet(p)) => r.prefsrc = Some(*p),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    /// `ip route replace DST/PREFIX via GW dev INDEX`.
    pub async fn replace_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<(), NetlinkError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .gateway(gateway)
            .output_interface(oif)
            .build();
        self.handle
            .route()
            .add(r)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "add route {dst}/{prefix} via {gateway}"
            )))
    }

    /// Turns on `net.ipv4.conf.DEV.proxy_arp` through netlink (RTM_SETLINK, IFLA_INET_CONF).
    /// Unlike writing /proc/sys — mounted read-only in unprivileged containers — this needs
    /// only CAP_NET_ADMIN.
    pub async fn enable_proxy_arp(&self, index: u32) -> Result<(), NetlinkError> {
        let mut conf = InetDevConf::default();
        conf.proxy_arp = 1;
        let spec = AfSpecUnspec::Inet(vec![AfSpecInet::DevConfRequest(conf)]);
        self.set_af_spec(index, spec, "enable proxy_arp").await
    }

    /// Turns on `net.ipv4.conf.DEV.arp_notify` through netlink: the kernel then sends a
    /// gratuitous ARP when the link comes up (or its address changes), so neighbours that
    /// cached another MAC for this address learn the new one at once.
    pub async fn enable_arp_notify(&self, index: u32) -> Result<(), NetlinkError> {
        let mut conf = InetDevConf::default();
        conf.arp_notify = 1;
        let spec = AfSpecUnspec::Inet(vec![AfSpecInet::DevConfRequest(conf)]);
        self.set_af_spec(index, spec, "enable arp_notify").await
    }

    /// Drops the neighbour entry for `ip` on link `index`, if any, so the next packet to
    /// `ip` asks afresh. Returns whether there was one.
    pub async fn forget_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<bool, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => Ok(false),
            Err(e) => Err(NetlinkError::request(format!(
                "forget the neighbour entry of {ip} on link {index}"
            ))(e)),
        }
    }

    /// RTM_SETLINK with one IFLA_AF_SPEC entry (per-family device settings).
    async fn set_af_spec(
        &self,
        index: u32,
        spec: AfSpecUnspec,
        what: &str,
    ) -> Result<(), NetlinkError> {
        let mut msg = rtnetlink::LinkUnspec::new_with_index(index).build();
        msg.attributes.push(LinkAttribute::AfSpecUnspec(vec![spec]));
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(NetlinkError::request(format!("{what} on link {index}")))
    }

    /// Keeps the kernel from sending IPv6 (router solicitations, MLD reports) on a tunnel
    /// device: pods are IPv4 and no FDB entry matches those packets (they show as TX drops).
    /// `disable_ipv6` through /proc/sys where it is writable; in a container, where it is
    /// not, no IPv6 address at all: addr_gen_mode `none` through netlink (needs only
    /// CAP_NET_ADMIN), and any IPv6 address already made removed.
    pub async fn quiet_ipv6(&self, name: &str, index: u32) -> Result<(), NetlinkError> {
        let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if std::fs::write(&sysctl, "1").is_ok() {
            return Ok(());
        }
        let spec = AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)]);
        self.set_af_spec(index, spec, "set addr_gen_mode none")
            .await?;
        for a in self.addresses(index, AddressFamily::Inet6).await? {
            self.handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(NetlinkError::request(format!(
                    "remove an IPv6 address of {name}"
                )))?;
        }
        Ok(())
    }

    /// Sets `net.ipv4.neigh.DEV.proxy_delay` (milliseconds) through netlink
    /// (RTM_SETNEIGHTBL on `arp_cache`), for the same reason as `enable_proxy_arp`.
    pub async fn set_arp_proxy_delay(&self, index: u32, millis: u64) -> Result<(), NetlinkError> {
        let mut table = NeighbourTableMessage::default();
        table.header.family = AddressFamily::Inet;
        table.attributes = vec![
            NeighbourTableAttribute::Name("arp_cache".into()),
            NeighbourTableAttribute::Parms(vec![
                NeighbourTableParameter::Ifindex(index),
                NeighbourTableParameter::ProxyDelay(millis),
            ]),
        ];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::SetNeighbourTable(table));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let what = || format!("set proxy_delay on link {index}");
        let mut answers = self
            .handle
            .clone()
            .request(req)
            .map_err(NetlinkError::request(what()))?;
        while let Some(m) = answers.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(NetlinkError::request(what())(
                        rtnetlink::Error::NetlinkError(e),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod all_of_tests {
    use super::*;

    fn refused(what: &str) -> NetlinkError {
        NetlinkError::Socket(std::io::Error::other(what.to_string()))
    }

    #[test]
    fn every_failure_is_counted_and_the_first_is_named() {
        assert_eq!(all_of(3, vec![]).unwrap(), 3);
        let e = all_of(3, vec![refused("route a"), refused("route b")]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("2 of 3 changes failed") && text.contains("route a"),
            "{text}"
        );
        assert!(all_of(1, vec![refused("only")])
            .unwrap_err()
            .to_string()
            .contains("only"));
    }
}
