//! The forwarding table the userspace workers consult per packet: which remote node owns
//! the destination pod address, and whether a datagram's source is a node of the mesh at
//! all. Built from the same `Desired` the kernel backend programs, so both backends send
//! a pod's traffic to the same node. Lookups are a binary search over non-overlapping
//! ranges (the IPAM ring never hands one block to two owners).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::super::Desired;

/// Where to send frames for one remote node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub mac: [u8; 6],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// (first address, last address, index into `endpoints`), sorted, non-overlapping.
    ranges: Vec<(u32, u32, usize)>,
    endpoints: Vec<Endpoint>,
    /// Underlay addresses of the nodes we accept VXLAN from, sorted.
    nodes: Vec<Ipv4Addr>,
}

impl Table {
    pub fn new(want: &Desired) -> Table {
        let mut t = Table::default();
        for r in &want.remotes {
            let index = t.endpoints.len();
            t.endpoints.push(Endpoint {
                addr: SocketAddr::V4(SocketAddrV4::new(r.underlay, r.port)),
                mac: r.mac,
            });
            for b in &r.blocks {
                t.ranges.push((b.start, b.last(), index));
            }
            t.nodes.push(r.underlay);
        }
        t.ranges.sort_unstable();
        t.nodes.sort_unstable();
        t.nodes.dedup();
        t
    }

    /// The node that owns `dst`, if any remote node does.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<&Endpoint> {
        let d = u32::from(dst);
        let i = self.ranges.partition_point(|(start, _, _)| *start <= d);
        let (_, last, e) = *self.ranges.get(i.checked_sub(1)?)?;
        (d <= last).then(|| &self.endpoints[e])
    }

    /// Whether a packet with inner source `inner` may arrive in a datagram from `outer`:
    /// only from the node that owns the address's block, or from a node's own address
    /// (its host traffic). `None` (not an IPv4 packet) never may.
    pub fn source_allowed(&self, outer: &SocketAddr, inner: Option<Ipv4Addr>) -> bool {
        let outer = match outer {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        };
        let (Some(outer), Some(inner)) = (outer, inner) else {
            return false;
        };
        if inner == outer {
            return true;
        }
        self.lookup(inner)
            .is_some_and(|e| e.addr.ip() == std::net::IpAddr::V4(outer))
    }

    /// Whether `src` is the underlay address of a node with pod routes: VXLAN from
    /// anywhere else is dropped (it could only be spoofed pod traffic).
    pub fn accepts_from(&self, src: &SocketAddr) -> bool {
        match src {
            SocketAddr::V4(a) => self.nodes.binary_search(a.ip()).is_ok(),
            SocketAddr::V6(a) => a
                .ip()
                .to_ipv4_mapped()
                .is_some_and(|ip| self.nodes.binary_search(&ip).is_ok()),
        }
    }

    pub fn routes(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Remote;
    use proptest::prelude::*;

    fn remote(n: u8, blocks: &[&str]) -> Remote {
        crate::dataplane::test_remote(n, blocks)
    }

    fn table(remotes: Vec<Remote>) -> Table {
        Table::new(&Desired {
            local_gateway: None,
            remotes,
            nodes: Vec::new(),
            prune: true,
        })
    }

    #[test]
    fn finds_the_owner_at_block_edges_and_nothing_between() {
        let t = table(vec![
            remote(2, &["10.36.0.0/14", "10.41.0.0/16"]),
            remote(3, &["10.40.0.0/16"]),
        ]);
        let owner = |ip: &str| t.lookup(ip.parse().unwrap()).map(|e| e.mac[5]);
        assert_eq!(owner("10.36.0.0"), Some(2));
        assert_eq!(owner("10.39.255.255"), Some(2));
        assert_eq!(owner("10.40.0.0"), Some(3));
        assert_eq!(owner("10.40.255.255"), Some(3));
        assert_eq!(owner("10.41.7.9"), Some(2));
        assert_eq!(owner("10.42.0.0"), None);
        assert_eq!(owner("10.35.255.255"), None);
        assert_eq!(owner("0.0.0.0"), None);
        assert_eq!(owner("255.255.255.255"), None);
        assert_eq!(t.routes(), 3);
        assert_eq!(
            t.lookup("10.40.0.1".parse().unwrap()).unwrap().addr,
            "192.168.1.3:8472".parse().unwrap()
        );
    }

    #[test]
    fn accepts_only_known_nodes() {
        let t = table(vec![remote(2, &["10.36.0.0/14"])]);
        assert!(t.accepts_from(&"192.168.1.2:40000".parse().unwrap()));
        assert!(t.accepts_from(&"[::ffff:192.168.1.2]:8472".parse().unwrap()));
        assert!(!t.accepts_from(&"192.168.1.9:8472".parse().unwrap()));
        assert!(!t.accepts_from(&"[::1]:8472".parse().unwrap()));
        assert!(table(Vec::new())
            .lookup("10.32.0.1".parse().unwrap())
            .is_none());
    }

    #[test]
    fn inner_sources_must_belong_to_the_sending_node() {
        let t = table(vec![
            remote(2, &["10.36.0.0/14"]),
            remote(3, &["10.40.0.0/14"]),
        ]);
        let from2: SocketAddr = "192.168.1.2:8472".parse().unwrap();
        let mapped2: SocketAddr = "[::ffff:192.168.1.2]:8472".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert!(t.source_allowed(&from2, ip("10.36.1.2")));
        assert!(t.source_allowed(&mapped2, ip("10.36.1.2")));
        assert!(
            t.source_allowed(&from2, ip("192.168.1.2")),
            "its own address"
        );
        assert!(
            !t.source_allowed(&from2, ip("10.40.0.5")),
            "node 3's pod, forged by 2"
        );
        assert!(
            !t.source_allowed(&from2, ip("10.32.0.5")),
            "nobody's address"
        );
        assert!(
            !t.source_allowed(&from2, ip("192.168.1.3")),
            "another node's address"
        );
        assert!(!t.source_allowed(&from2, None));
    }

    proptest! {
        /// Against a linear scan, for random disjoint /24 blocks and random addresses.
        #[test]
        fn lookup_matches_a_linear_scan(
            picks in proptest::collection::btree_set(0u32..4096, 0..40),
            probes in proptest::collection::vec(any::<u32>(), 64),
        ) {
            let base = u32::from(Ipv4Addr::new(10, 32, 0, 0));
            let blocks: Vec<(u32, u8)> = picks.iter().enumerate()
                .map(|(i, p)| (base + (p << 8), (i % 3) as u8 + 2))
                .collect();
            let remotes = (2u8..5).map(|n| {
                let mut r = remote(n, &[]);
                r.blocks = blocks.iter().filter(|(_, o)| *o == n)
                    .map(|(s, _)| format!("{}/24", Ipv4Addr::from(*s)).parse().unwrap())
                    .collect();
                r
            }).collect();
            let t = table(remotes);
            for p in probes.iter().map(|p| base + (p % (4096 << 8))) {
                let want = blocks.iter().find(|(s, _)| p >= *s && p <= s + 255).map(|(_, o)| *o);
                prop_assert_eq!(t.lookup(Ipv4Addr::from(p)).map(|e| e.mac[5]), want);
            }
        }
    }
}
