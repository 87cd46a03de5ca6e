//! Carrying pod traffic between nodes. What each node must reach is a pure function of the
//! mesh's view and the IPAM ring (`remotes`); the backends (`vxlan/`) make the kernel match
//! it. Only peers that own address blocks get routes, and they keep them while they own
//! the blocks — a peer that is merely suspected (a gossip flap) keeps its routes; a peer
//! that is reclaimed or removed loses them.

pub mod masquerade;
pub mod udp;
pub mod vxlan;

use std::net::{IpAddr, Ipv4Addr};

use mesh_proto::{PeerId, PeerRecord};

use crate::ipam::block::Block;
use crate::ipam::ring::RangeRing;

/// The name of the backend in peer records and `meshctl`.
pub const VXLAN: &str = "vxlan";

/// A stable, locally administered MAC for this node's VXLAN endpoint, derived from the
/// persisted peer id (so it survives restarts and never churns neighbour caches).
pub fn vtep_mac(peer_id: u64) -> [u8; 6] {
    let b = peer_id.to_be_bytes();
    [0x0a, 0x76, b[4], b[5], b[6], b[7]]
}

/// One remote node as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub peer: PeerId,
    pub name: String,
    pub underlay: Ipv4Addr,
    pub mac: [u8; 6],
    pub blocks: Vec<Block>,
}

/// Everything the data plane should program, published by the driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// This node's gateway: the source for traffic the node itself sends to remote pods.
    pub local_gateway: Option<Ipv4Addr>,
    pub remotes: Vec<Remote>,
    /// Every node's underlay address (ours included): pod traffic to them is not NATed.
    pub nodes: Vec<Ipv4Addr>,
}

/// The IPv4 underlay addresses of all known nodes.
pub fn node_addresses<'a>(records: impl Iterator<Item = &'a PeerRecord>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = records
        .flat_map(|r| r.addresses.iter())
        .filter_map(|a| match a.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Remote nodes that run the VXLAN wire, have told us their endpoint, and own blocks.
pub fn remotes<'a>(
    me: PeerId,
    records: impl Iterator<Item = &'a PeerRecord>,
    ring: &RangeRing,
) -> Vec<Remote> {
    let mut owned: std::collections::BTreeMap<PeerId, Vec<Block>> = Default::default();
    for (block, o) in ring.iter() {
        owned.entry(o.owner).or_default().push(block);
    }
    let mut out: Vec<Remote> = records
        .filter(|r| r.id != me)
        .filter(|r| r.capabilities.dataplanes.iter().any(|d| d == VXLAN))
        .filter_map(|r| {
            let mac = r.capabilities.vtep_mac?;
            let underlay = r.addresses.iter().find_map(|a| match a.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })?;
            let blocks = owned.get(&r.id)?.clone();
            Some(Remote {
                peer: r.id,
                name: r.name.clone(),
                underlay,
                mac,
                blocks,
            })
        })
        .collect();
    out.sort_by_key(|r| r.peer);
    out
}
