//! The kernel state the userspace backend needs is small: one route per remote block
//! `block dev mesh-tun src <our gateway> proto 109`, so the kernel hands pod traffic for
//! other nodes to our TUN device (which node it goes to is the forwarding table's job, not
//! the route's). A pure diff against what a dump shows, like the kernel backend's.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::super::Desired;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TunRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub src: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Del(TunRoute),
    Set(TunRoute),
}

pub fn wanted(want: &Desired) -> BTreeSet<TunRoute> {
    want.remotes
        .iter()
        .flat_map(|r| r.blocks.iter())
        .map(|b| TunRoute {
            dst: Ipv4Addr::from(b.start),
            prefix: b.prefix,
            src: want.local_gateway,
        })
        .collect()
}

/// Removals first (a block that moved owner keeps its route: only the table changes; none
/// before the first sync, see `Desired::prune`), then additions and repairs.
pub fn plan(want: &Desired, seen: &[TunRoute]) -> Vec<Step> {
    let seen: BTreeSet<&TunRoute> = seen.iter().collect();
    let prune = want.prune;
    let want = wanted(want);
    let mut steps: Vec<Step> = seen
        .iter()
        .filter(|_| prune)
        .filter(|r| {
            !want.contains(r) && !want.iter().any(|w| (w.dst, w.prefix) == (r.dst, r.prefix))
        })
        .map(|r| Step::Del((*r).clone()))
        .collect();
    steps.extend(
        want.iter()
            .filter(|w| !seen.contains(w))
            .map(|w| Step::Set(w.clone())),
    );
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Remote;
    use mesh_proto::PeerId;

    fn desired(blocks: &[(u8, &str)]) -> Desired {
        let mut remotes: Vec<Remote> = Vec::new();
        for (n, b) in blocks {
            if !remotes.iter().any(|r| r.peer == PeerId(u64::from(*n))) {
                remotes.push(Remote {
                    peer: PeerId(u64::from(*n)),
                    name: format!("n{n}"),
                    underlay: Ipv4Addr::new(192, 168, 1, *n),
                    port: 8472,
                    mac: [0x0a, 0x76, 0, 0, 0, *n],
                    blocks: Vec::new(),
                });
            }
            let r = remotes
                .iter_mut()
                .find(|r| r.peer == PeerId(u64::from(*n)))
                .unwrap();
            r.blocks.push(b.parse().unwrap());
        }
        Desired {
            local_gateway: Some(Ipv4Addr::new(10, 32, 0, 1)),
            remotes,
            nodes: Vec::new(),
            prune: true,
        }
    }

    fn route(dst: &str, prefix: u8) -> TunRoute {
        TunRoute {
            dst: dst.parse().unwrap(),
            prefix,
            src: Some(Ipv4Addr::new(10, 32, 0, 1)),
        }
    }

    #[test]
    fn before_the_first_sync_stale_routes_stay() {
        let mut want = desired(&[(2, "10.36.0.0/14")]);
        want.prune = false;
        let seen = vec![route("10.36.0.0", 14), route("10.40.0.0", 16)];
        assert!(plan(&want, &seen).is_empty());
        want.prune = true;
        assert_eq!(plan(&want, &seen), vec![Step::Del(route("10.40.0.0", 16))]);
    }

    #[test]
    fn adds_missing_and_removes_stale_routes() {
        let want = desired(&[(2, "10.36.0.0/14"), (3, "10.40.0.0/16")]);
        let seen = vec![route("10.36.0.0", 14), route("10.50.0.0", 16)];
        assert_eq!(
            plan(&want, &seen),
            vec![
                Step::Del(route("10.50.0.0", 16)),
                Step::Set(route("10.40.0.0", 16))
            ]
        );
    }

    #[test]
    fn a_block_changing_owner_needs_no_route_change() {
        let before = desired(&[(2, "10.36.0.0/14")]);
        let after = desired(&[(3, "10.36.0.0/14")]);
        let seen: Vec<TunRoute> = wanted(&before).into_iter().collect();
        assert!(plan(&after, &seen).is_empty());
    }

    #[test]
    fn a_wrong_source_is_replaced_in_place_not_deleted_first() {
        let want = desired(&[(2, "10.36.0.0/14")]);
        let mut stale = route("10.36.0.0", 14);
        stale.src = None;
        assert_eq!(
            plan(&want, &[stale]),
            vec![Step::Set(route("10.36.0.0", 14))]
        );
    }

    #[test]
    fn converges_in_one_round() {
        let want = desired(&[
            (2, "10.36.0.0/14"),
            (2, "10.33.0.0/16"),
            (4, "10.40.0.0/13"),
        ]);
        let mut seen = vec![route("10.60.0.0", 16), route("10.33.0.0", 16)];
        for s in plan(&want, &seen) {
            match s {
                Step::Del(r) => seen.retain(|x| x != &r),
                Step::Set(r) => {
                    seen.retain(|x| (x.dst, x.prefix) != (r.dst, r.prefix));
                    seen.push(r)
                }
            }
        }
        assert!(plan(&want, &seen).is_empty());
        assert_eq!(seen.len(), 3);
    }
}
