//! Carrying pod traffic between nodes. What each node must reach is a pure function of the
//! mesh's view and the IPAM ring (`remotes`); the backends (`vxlan/`, `udp/`) make the
//! kernel (and the userspace forwarder) match it. Only peers that own address blocks get
//! routes, and they keep them while they own the blocks — a peer that is merely suspected
//! (a gossip flap) keeps its routes; a peer that is reclaimed or removed loses them.

pub mod masquerade;
pub mod udp;
pub mod vxlan;

use std::net::{IpAddr, Ipv4Addr};

use mesh_proto::{PeerId, PeerRecord};

use crate::ipam::block::Block;
use crate::ipam::ring::RangeRing;

/// The names of the backends in peer records and `meshctl`. Both put the same VXLAN
/// frames on the wire; a peer record lists the one the node runs.
pub const VXLAN: &str = "vxlan";
pub const UDP: &str = "udp";

/// How often both backends reconcile even when nothing changed (repairs edits made
/// behind our back).
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the two backends' reconcile loops share: keeping the egress rules, telling the
/// driver what is wrong (and the log, once per change), waiting for the next round.
pub(crate) struct Rounds {
    device: &'static str,
    range: Block,
    masquerade: bool,
    egress: masquerade::Keeper,
    last: Option<String>,
    status: tokio::sync::watch::Sender<Option<String>>,
}

impl Rounds {
    pub fn new(
        device: &'static str,
        range: Block,
        masquerade: bool,
        status: tokio::sync::watch::Sender<Option<String>>,
    ) -> Rounds {
        Rounds {
            device,
            range,
            masquerade,
            egress: masquerade::Keeper::default(),
            last: None,
            status,
        }
    }

    /// Ends a round: egress rules, then `problem` (or none) published.
    pub fn finish(&mut self, mut problem: Option<String>, want: &Desired) {
        if self.masquerade {
            if let Err(e) = self.egress.tick(self.range, &want.nodes) {
                problem = Some(problem.map_or(e.clone(), |p| format!("{p}; {e}")));
            }
        }
        if problem != self.last {
            match &problem {
                Some(p) => {
                    tracing::warn!(device = self.device, problem = %p, "the data plane is not right")
                }
                None => tracing::info!(
                    device = self.device,
                    remotes = want.remotes.len(),
                    "data plane programmed"
                ),
            }
            self.last = problem.clone();
        }
        self.status.send_replace(problem);
    }

    /// Waits until a second has passed or the desired state changed; false at shutdown.
    pub async fn next(
        desired: &mut tokio::sync::watch::Receiver<Desired>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => true,
            r = desired.changed() => r.is_ok(),
            _ = shutdown.changed() => false,
        }
    }
}

/// Which backend carries this node's pod traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernel => VXLAN,
            Backend::Userspace => UDP,
        }
    }
}

/// The backend for `--dataplane`; for `auto`, `kernel_vxlan` says whether the kernel
/// could make a VXLAN device (any other failure is the kernel backend's to report, not a
/// reason to switch).
pub fn choose(requested: crate::config::Dataplane, kernel_vxlan: Option<bool>) -> Option<Backend> {
    use crate::config::Dataplane;
    match requested {
        Dataplane::None => None,
        Dataplane::Vxlan => Some(Backend::Kernel),
        Dataplane::Udp => Some(Backend::Userspace),
        Dataplane::Auto if kernel_vxlan == Some(false) => Some(Backend::Userspace),
        Dataplane::Auto => Some(Backend::Kernel),
    }
}

/// Whether a peer's record says it carries pod traffic on the VXLAN wire.
pub fn speaks_vxlan(c: &mesh_proto::peer::Capabilities) -> bool {
    c.dataplanes.iter().any(|d| d == VXLAN || d == UDP)
}

/// The backend a record names (`vxlan` or `udp`), if it runs one.
pub fn backend_of(c: &mesh_proto::peer::Capabilities) -> Option<&str> {
    c.dataplanes
        .iter()
        .map(String::as_str)
        .find(|d| *d == VXLAN || *d == UDP)
}

/// A stable, locally administered MAC for this node's VXLAN endpoint, derived from the
/// persisted peer id (so it survives restarts and never churns neighbour caches).
pub fn vtep_mac(peer_id: u64) -> [u8; 6] {
    let b = peer_id.to_be_bytes();
    [0x0a, 0x76, b[4], b[5], b[6], b[7]]
}

/// Linux's (and Flannel's) historical VXLAN port, our default (IANA's is 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// One remote node as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub peer: PeerId,
    pub name: String,
    pub underlay: Ipv4Addr,
    /// Its VXLAN UDP port (the kernel backend sends every peer to its own device's port;
    /// the userspace backend honours each peer's).
    pub port: u16,
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
        .filter(|r| speaks_vxlan(&r.capabilities))
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
                port: r.capabilities.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT),
                mac,
                blocks,
            })
        })
        .collect();
    out.sort_by_key(|r| r.peer);
    out
}

/// A remote node `n` (underlay 192.168.1.n, MAC ..:n) owning `blocks`, for tests.
#[cfg(test)]
pub(crate) fn test_remote(n: u8, blocks: &[&str]) -> Remote {
    Remote {
        peer: PeerId(u64::from(n)),
        name: format!("n{n}"),
        underlay: Ipv4Addr::new(192, 168, 1, n),
        port: DEFAULT_VXLAN_PORT,
        mac: [0x0a, 0x76, 0, 0, 0, n],
        blocks: blocks.iter().map(|b| b.parse().expect("block")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dataplane;

    #[test]
    fn auto_falls_back_to_userspace_only_when_the_kernel_lacks_vxlan() {
        assert_eq!(choose(Dataplane::Auto, Some(true)), Some(Backend::Kernel));
        assert_eq!(
            choose(Dataplane::Auto, Some(false)),
            Some(Backend::Userspace)
        );
        assert_eq!(choose(Dataplane::Auto, None), Some(Backend::Kernel));
        assert_eq!(choose(Dataplane::Vxlan, Some(false)), Some(Backend::Kernel));
        assert_eq!(choose(Dataplane::Udp, Some(true)), Some(Backend::Userspace));
        assert_eq!(choose(Dataplane::None, Some(true)), None);
    }

    #[test]
    fn both_backends_are_on_the_vxlan_wire() {
        let caps = |d: &str| mesh_proto::peer::Capabilities {
            dataplanes: vec![d.to_string()],
            ..Default::default()
        };
        assert!(speaks_vxlan(&caps(VXLAN)) && speaks_vxlan(&caps(UDP)));
        assert!(!speaks_vxlan(&caps("wireguard")));
        assert_eq!(backend_of(&caps(UDP)), Some(UDP));
    }
}
