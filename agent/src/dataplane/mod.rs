//! Carrying pod traffic between nodes. What each node must reach is a pure function of the
//! mesh's view and the IPAM ring (`remotes`); the backends (`vxlan/`, `udp/`) make the
//! kernel (and the userspace forwarder) match it. Only peers that own address blocks get
//! routes, and they keep them while they own the blocks — a peer that is merely suspected
//! (a gossip flap) keeps its routes; a peer that is reclaimed or removed loses them.

pub mod guard;
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

/// How long a round waits for `nft`/`iptables` before reporting them stuck.
const FIREWALL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The keepers back, and the guard's and the egress rules' errors.
type FirewallUpdate = tokio::task::JoinHandle<(
    (guard::Keeper, masquerade::Keeper),
    Option<String>,
    Option<String>,
)>;

/// What the two backends' reconcile loops share: keeping the egress rules, telling the
/// driver what is wrong (and the log, once per change), waiting for the next round.
pub(crate) struct Rounds {
    device: &'static str,
    range: Block,
    masquerade: bool,
    port: u16,
    local: Ipv4Addr,
    decap_device: Option<&'static str>,
    /// The guard's last error (logged when it changes; not a data-plane problem: traffic
    /// flows, only the protection is missing — it must not take the node out of service).
    guard_problem: Option<String>,
    /// The guard's and the egress rules' keepers, away while a firewall update runs.
    keepers: Option<(guard::Keeper, masquerade::Keeper)>,
    /// A firewall update that outlived `FIREWALL_WAIT`, and since when.
    firewall: Option<(std::time::Instant, FirewallUpdate)>,
    last: Option<String>,
    status: tokio::sync::watch::Sender<Option<String>>,
}

impl Rounds {
    /// `port`: the VXLAN port the guard admits members to; `decap_device`: the kernel
    /// device whose decapsulated packets the guard checks (none for userspace).
    pub fn new(
        device: &'static str,
        range: Block,
        masquerade: bool,
        port: u16,
        local: Ipv4Addr,
        decap_device: Option<&'static str>,
        status: tokio::sync::watch::Sender<Option<String>>,
    ) -> Rounds {
        Rounds {
            device,
            range,
            masquerade,
            port,
            local,
            decap_device,
            guard_problem: None,
            keepers: Some(Default::default()),
            firewall: None,
            last: None,
            status,
        }
    }

    /// Ends a round: the overlay guard and the egress rules (both run `nft`/`iptables`:
    /// on a blocking thread, never on the runtime's two workers, waited for at most
    /// `FIREWALL_WAIT`; one that hangs is reported and not started again until it
    /// returns), then `problem` (or none) published.
    pub async fn finish(&mut self, mut problem: Option<String>, want: &Desired) {
        let mut add = |e: String| {
            problem = Some(match problem.take() {
                Some(p) => format!("{p}; {e}"),
                None => e,
            })
        };
        let running = match self.firewall.take() {
            Some((since, handle)) if !handle.is_finished() => {
                add(format!(
                    "the firewall update (nft/iptables) has not returned for {:.0?}",
                    since.elapsed()
                ));
                self.firewall = Some((since, handle));
                None
            }
            Some((_, handle)) => Some(handle),
            None => {
                let spec = guard::GuardSpec::new(self.port, self.local, self.decap_device, want);
                let (range, masquerade, nodes) = (self.range, self.masquerade, want.nodes.clone());
                let mut keepers = self.keepers.take().unwrap_or_default();
                Some(tokio::task::spawn_blocking(move || {
                    let guarded = keepers.0.tick(&spec).err();
                    let egress = if masquerade {
                        keepers.1.tick(range, &nodes).err()
                    } else {
                        None
                    };
                    (keepers, guarded, egress)
                }))
            }
        };
        if let Some(mut handle) = running {
            match tokio::time::timeout(FIREWALL_WAIT, &mut handle).await {
                Ok(Ok((keepers, guarded, egress))) => {
                    self.keepers = Some(keepers);
                    egress.into_iter().for_each(&mut add);
                    if guarded != self.guard_problem {
                        match &guarded {
                            Some(e) => {
                                tracing::warn!(problem = %e, "the overlay guard is not in place: VXLAN from anyone is accepted")
                            }
                            None => tracing::info!("overlay guard in place"),
                        }
                        self.guard_problem = guarded;
                    }
                }
                Ok(Err(e)) => add(format!("the firewall update failed: {e}")),
                Err(_) => {
                    add(format!(
                        "the firewall update (nft/iptables) has not returned within {FIREWALL_WAIT:?}"
                    ));
                    self.firewall = Some((std::time::Instant::now(), handle));
                }
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

/// Where a remote node's tunnel ends: what the data plane needs of its record. The driver
/// keeps these in the store, so a restarted agent programs every block owner at once —
/// before (and whether or not) the owner is heard from again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub underlay: Ipv4Addr,
    pub port: u16,
    pub mac: [u8; 6],
}

/// The endpoints the records of remote nodes name (those on the VXLAN wire that told us
/// their VTEP MAC and an IPv4 address).
pub fn endpoints<'a>(
    me: PeerId,
    records: impl Iterator<Item = &'a PeerRecord>,
) -> std::collections::BTreeMap<PeerId, Endpoint> {
    records
        .filter(|r| r.id != me)
        .filter(|r| speaks_vxlan(&r.capabilities))
        .filter_map(|r| {
            let mac = r.capabilities.vtep_mac?;
            let underlay = r.addresses.iter().find_map(|a| match a.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })?;
            Some((
                r.id,
                Endpoint {
                    name: r.name.clone(),
                    underlay,
                    port: r.capabilities.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT),
                    mac,
                },
            ))
        })
        .collect()
}

/// What to remember after a change of the mesh's view: every live endpoint, plus the
/// remembered ones of peers that still own blocks but are not in the view at all — not heard
/// of yet after a restart, or forgotten after a long outage: such a peer keeps its routes
/// while it owns blocks. A remembered entry is dropped when its peer is in the view (the
/// view knows better, e.g. it left the VXLAN wire), when it owns nothing, and when a live
/// peer now has its underlay address (a node rebuilt under a new identity): two entries for
/// one address would fight over its neighbour entry.
pub fn remembered_endpoints(
    remembered: &std::collections::BTreeMap<PeerId, Endpoint>,
    live: std::collections::BTreeMap<PeerId, Endpoint>,
    in_view: &std::collections::BTreeSet<PeerId>,
    ring: &RangeRing,
) -> std::collections::BTreeMap<PeerId, Endpoint> {
    let owners: std::collections::BTreeSet<PeerId> = ring.iter().map(|(_, o)| o.owner).collect();
    let live_addresses: std::collections::BTreeSet<Ipv4Addr> =
        live.values().map(|e| e.underlay).collect();
    let mut out = live;
    for (id, e) in remembered {
        if owners.contains(id) && !in_view.contains(id) && !live_addresses.contains(&e.underlay) {
            out.insert(*id, e.clone());
        }
    }
    out
}

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
    /// Whether entries not in `remotes` may be removed. False after a start until the node
    /// has heard the mesh (`mesh::driver`): until then the backends adopt what the kernel
    /// has and only add, so a restart never cuts traffic that was flowing.
    pub prune: bool,
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

/// Remote nodes with a known endpoint that own blocks.
///
/// A remote that owns the whole range (the first splitter, until it hands space out) is
/// routed as the range's two halves: a route for the range itself would have the same key
/// as the node bridge's on-link route for the range — it would shadow it (the node's own
/// pods routed into the tunnel) or, written with `replace`, take its place.
pub fn remotes(
    endpoints: &std::collections::BTreeMap<PeerId, Endpoint>,
    ring: &RangeRing,
) -> Vec<Remote> {
    let range = ring.range();
    let mut owned: std::collections::BTreeMap<PeerId, Vec<Block>> = Default::default();
    for (block, o) in ring.iter() {
        let blocks = owned.entry(o.owner).or_default();
        match block.halves() {
            Some((low, high)) if block == range => blocks.extend([low, high]),
            _ => blocks.push(block),
        }
    }
    endpoints
        .iter()
        .filter_map(|(id, e)| {
            Some(Remote {
                peer: *id,
                name: e.name.clone(),
                underlay: e.underlay,
                port: e.port,
                mac: e.mac,
                blocks: owned.get(id)?.clone(),
            })
        })
        .collect()
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

    fn ep(n: u8, underlay: u8) -> Endpoint {
        Endpoint {
            name: format!("n{n}"),
            underlay: Ipv4Addr::new(192, 168, 1, underlay),
            port: DEFAULT_VXLAN_PORT,
            mac: [0x0a, 0x76, 0, 0, 0, n],
        }
    }

    #[test]
    fn remembered_endpoints_keep_unheard_owners_only() {
        use std::collections::{BTreeMap, BTreeSet};
        let range: Block = "10.32.0.0/12".parse().unwrap();
        // Owners 2, 3, 4 and 5; 6 owns nothing.
        let ring =
            RangeRing::initial_split(range, 24, &[PeerId(2), PeerId(3), PeerId(4), PeerId(5)]);
        let remembered: BTreeMap<PeerId, Endpoint> =
            (2..=6).map(|n| (PeerId(u64::from(n)), ep(n, n))).collect();
        // 2 is live; 3 is in the view but has no endpoint (left the VXLAN wire); 5's
        // address now belongs to live peer 7; 4 is not heard of yet.
        let live: BTreeMap<PeerId, Endpoint> = [(PeerId(2), ep(2, 2)), (PeerId(7), ep(7, 5))]
            .into_iter()
            .collect();
        let in_view: BTreeSet<PeerId> = [2, 3, 7].into_iter().map(PeerId).collect();
        let out = remembered_endpoints(&remembered, live, &in_view, &ring);
        let ids: Vec<u64> = out.keys().map(|p| p.0).collect();
        assert_eq!(ids, vec![2, 4, 7], "{out:?}");
        // The unheard owner is programmed with its blocks.
        let r = remotes(&out, &ring);
        assert!(r
            .iter()
            .any(|r| r.peer == PeerId(4) && !r.blocks.is_empty()));
        assert!(
            !r.iter().any(|r| r.peer == PeerId(7)),
            "7 owns nothing: no routes"
        );
    }

    #[test]
    fn a_remote_owning_the_whole_range_is_routed_as_two_halves() {
        let range: Block = "10.32.0.0/12".parse().unwrap();
        let ring = RangeRing::initial_split(range, 24, &[PeerId(2)]);
        let endpoints = [(PeerId(2), ep(2, 2))].into_iter().collect();
        let r = remotes(&endpoints, &ring);
        let blocks: Vec<String> = r[0].blocks.iter().map(|b| b.to_string()).collect();
        assert_eq!(blocks, vec!["10.32.0.0/13", "10.40.0.0/13"]);
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
