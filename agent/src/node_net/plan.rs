//! The node bridge as a pure function: desired state + what the kernel shows -> the
//! steps that make them equal. The driver (`mod.rs`) only reads netlink and carries the
//! steps out, so every decision here is unit-tested without root.

use std::net::Ipv4Addr;

use crate::ipam::block::Block;
use crate::netlink::Link;

/// Host ends of pod veths are named `vmesh` + 10 hex digits of a hash of
/// (container id, ifname): deterministic, so DEL finds them without any saved state.
pub const HOST_VETH_PREFIX: &str = "vmesh";

pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a over "id/ifname": stable across releases (never change it: DEL and GC of pods
    // attached by an older plugin depend on it).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{HOST_VETH_PREFIX}{:010x}", h >> 24)
}

pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + 10
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

/// A stable, locally administered unicast MAC for the bridge, so pods' ARP caches stay
/// valid across agent restarts and as ports come and go (a bridge otherwise takes the
/// lowest MAC of its ports).
pub fn bridge_mac(peer_id: u64) -> [u8; 6] {
    let b = peer_id.to_be_bytes();
    [0x0a, 0x6d, b[4], b[5], b[6], b[7]]
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The gateway address with the cluster range's prefix (unknown until IPAM has space).
    pub gateway: Option<(Ipv4Addr, u8)>,
    /// Addresses on the bridge inside this range that are not the gateway are stale.
    pub range: Block,
}

/// What netlink showed this round.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub bridge: Option<Link>,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// Host ends of pod veths (by name), wherever they are attached.
    pub pod_veths: Vec<Link>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    CreateBridge,
    SetMtu(u32),
    SetMac([u8; 6]),
    SetUp,
    AddAddress(Ipv4Addr, u8),
    RemoveAddress(Ipv4Addr, u8),
    /// Re-attach a pod veth to the bridge (after the bridge was re-created).
    Attach {
        veth: u32,
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Steps(Vec<Step>),
    /// Something we must not touch holds the name.
    Refuse(String),
}

pub fn plan(spec: &BridgeSpec, seen: &Observed) -> Plan {
    let Some(br) = &seen.bridge else {
        // Everything else follows on the next round, against the new link.
        return Plan::Steps(vec![Step::CreateBridge]);
    };
    if br.kind.as_deref() != Some("bridge") {
        return Plan::Refuse(format!(
            "a {} link named {} exists and is not a bridge; mesh will not adopt it (delete it or pick another name)",
            br.kind.as_deref().unwrap_or("plain"),
            spec.name
        ));
    }
    let mut steps = Vec::new();
    if br.mtu != spec.mtu {
        steps.push(Step::SetMtu(spec.mtu));
    }
    if br.mac != spec.mac {
        steps.push(Step::SetMac(spec.mac));
    }
    for &(ip, prefix) in &seen.addresses {
        let ours = spec.gateway == Some((ip, prefix));
        if !ours && spec.range.contains_addr(u32::from(ip)) {
            steps.push(Step::RemoveAddress(ip, prefix));
        }
    }
    if let Some((ip, prefix)) = spec.gateway {
        if !seen.addresses.contains(&(ip, prefix)) {
            steps.push(Step::AddAddress(ip, prefix));
        }
    }
    for v in &seen.pod_veths {
        if v.controller != Some(br.index) {
            steps.push(Step::Attach {
                veth: v.index,
                name: v.name.clone(),
            });
        }
    }
    if !br.up {
        steps.push(Step::SetUp);
    }
    Plan::Steps(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BridgeSpec {
        BridgeSpec {
            name: "mesh0".into(),
            mtu: 1450,
            mac: bridge_mac(7),
            gateway: Some((Ipv4Addr::new(10, 32, 0, 1), 12)),
            range: "10.32.0.0/12".parse().unwrap(),
        }
    }

    fn bridge(up: bool, mtu: u32) -> Link {
        Link {
            index: 5,
            name: "mesh0".into(),
            up,
            oper_up: up,
            mtu,
            mac: bridge_mac(7).to_vec(),
            kind: Some("bridge".into()),
            controller: None,
            peer_index: None,
        }
    }

    #[test]
    fn missing_bridge_is_created_first() {
        assert_eq!(
            plan(&spec(), &Observed::default()),
            Plan::Steps(vec![Step::CreateBridge])
        );
    }

    #[test]
    fn correct_bridge_needs_nothing() {
        let seen = Observed {
            bridge: Some(bridge(true, 1450)),
            addresses: vec![(Ipv4Addr::new(10, 32, 0, 1), 12)],
            pod_veths: vec![],
        };
        assert_eq!(plan(&spec(), &seen), Plan::Steps(vec![]));
    }

    #[test]
    fn drift_is_repaired_and_stale_range_addresses_go_but_foreign_ones_stay() {
        let seen = Observed {
            bridge: Some(Link {
                mac: vec![2, 0, 0, 0, 0, 1],
                ..bridge(false, 1500)
            }),
            addresses: vec![
                (Ipv4Addr::new(10, 40, 0, 1), 12),
                (Ipv4Addr::new(192, 168, 9, 1), 24),
            ],
            pod_veths: vec![],
        };
        assert_eq!(
            plan(&spec(), &seen),
            Plan::Steps(vec![
                Step::SetMtu(1450),
                Step::SetMac(bridge_mac(7)),
                Step::RemoveAddress(Ipv4Addr::new(10, 40, 0, 1), 12),
                Step::AddAddress(Ipv4Addr::new(10, 32, 0, 1), 12),
                Step::SetUp,
            ])
        );
    }

    #[test]
    fn no_gateway_yet_means_no_address() {
        let mut s = spec();
        s.gateway = None;
        let seen = Observed {
            bridge: Some(bridge(true, 1450)),
            ..Observed::default()
        };
        assert_eq!(plan(&s, &seen), Plan::Steps(vec![]));
    }

    #[test]
    fn detached_pod_veths_are_reattached() {
        let veth = |index, controller| Link {
            index,
            name: format!("vmesh00000000{index:02}"),
            up: true,
            oper_up: true,
            mtu: 1450,
            mac: vec![2; 6],
            kind: Some("veth".into()),
            controller,
            peer_index: None,
        };
        let seen = Observed {
            bridge: Some(bridge(true, 1450)),
            addresses: vec![(Ipv4Addr::new(10, 32, 0, 1), 12)],
            pod_veths: vec![veth(9, Some(5)), veth(10, None)],
        };
        assert_eq!(
            plan(&spec(), &seen),
            Plan::Steps(vec![Step::Attach {
                veth: 10,
                name: "vmesh0000000010".into()
            }])
        );
    }

    #[test]
    fn a_foreign_link_with_our_name_is_refused() {
        let seen = Observed {
            bridge: Some(Link {
                kind: Some("veth".into()),
                ..bridge(true, 1500)
            }),
            ..Observed::default()
        };
        assert!(matches!(plan(&spec(), &seen), Plan::Refuse(m) if m.contains("not a bridge")));
    }

    #[test]
    fn host_veth_names_are_stable_short_and_recognised() {
        let a = host_veth_name("abc123", "eth0");
        assert_eq!(a, host_veth_name("abc123", "eth0"));
        assert_ne!(a, host_veth_name("abc123", "eth1"));
        assert_ne!(a, host_veth_name("abc12", "3/eth0"));
        assert!(a.len() <= 15, "{a}");
        assert!(is_host_veth_name(&a));
        assert!(!is_host_veth_name("mesh0"));
        assert!(!is_host_veth_name("vmeshzzzzzzzzzz"));
    }
}
