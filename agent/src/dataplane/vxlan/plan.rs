//! Kernel VXLAN state as a pure diff, Flannel-style but keyed on the remote's underlay
//! address: per remote node one neighbour entry (underlay IP -> its VTEP MAC) and one FDB
//! entry (VTEP MAC -> underlay IP) on our VXLAN device, and per block it owns one route
//! `block via <underlay IP> dev mesh-vxlan onlink src <our gateway>`. Routes go last when
//! adding and first when removing, so the kernel never has a route without its neighbour.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::super::Desired;

/// A route this module owns (tagged with our protocol number, on our device).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OurRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub via: Ipv4Addr,
    pub src: Option<Ipv4Addr>,
}

/// What the dumps of our device showed.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub neighbours: BTreeMap<Ipv4Addr, Vec<u8>>,
    pub fdb: BTreeSet<(Vec<u8>, Ipv4Addr)>,
    pub routes: Vec<OurRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    DelRoute(OurRoute),
    DelNeighbour(Ipv4Addr),
    DelFdb(Vec<u8>, Ipv4Addr),
    SetNeighbour(Ipv4Addr, [u8; 6]),
    SetFdb([u8; 6], Ipv4Addr),
    SetRoute(OurRoute),
}

pub fn plan(want: &Desired, seen: &Observed) -> Vec<Step> {
    let mut neighbours: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
    let mut fdb: BTreeSet<([u8; 6], Ipv4Addr)> = BTreeSet::new();
    let mut routes: BTreeSet<OurRoute> = BTreeSet::new();
    for r in &want.remotes {
        neighbours.insert(r.underlay, r.mac);
        fdb.insert((r.mac, r.underlay));
        for b in &r.blocks {
            routes.insert(OurRoute {
                dst: Ipv4Addr::from(b.start),
                prefix: b.prefix,
                via: r.underlay,
                src: want.local_gateway,
            });
        }
    }
    let mut steps = Vec::new();
    let seen_routes: BTreeSet<&OurRoute> = seen.routes.iter().collect();
    if want.prune {
        removals(&mut steps, seen, &neighbours, &fdb, &routes);
    }
    // Additions and repairs, routes last.
    for (ip, mac) in &neighbours {
        if seen.neighbours.get(ip).map(Vec::as_slice) != Some(mac.as_slice()) {
            steps.push(Step::SetNeighbour(*ip, *mac));
        }
    }
    for (mac, dst) in &fdb {
        if !seen.fdb.contains(&(mac.to_vec(), *dst)) {
            steps.push(Step::SetFdb(*mac, *dst));
        }
    }
    for r in &routes {
        if !seen_routes.contains(r) {
            steps.push(Step::SetRoute(r.clone()));
        }
    }
    steps
}

/// What the kernel has that is not wanted, routes first (a route whose destination is
/// wanted through another node is replaced, not removed).
fn removals(
    steps: &mut Vec<Step>,
    seen: &Observed,
    neighbours: &BTreeMap<Ipv4Addr, [u8; 6]>,
    fdb: &BTreeSet<([u8; 6], Ipv4Addr)>,
    routes: &BTreeSet<OurRoute>,
) {
    for r in &seen.routes {
        let replaced = routes
            .iter()
            .any(|w| w.dst == r.dst && w.prefix == r.prefix);
        if !routes.contains(r) && !replaced {
            steps.push(Step::DelRoute(r.clone()));
        }
    }
    for ip in seen.neighbours.keys() {
        if !neighbours.contains_key(ip) {
            steps.push(Step::DelNeighbour(*ip));
        }
    }
    for (mac, dst) in &seen.fdb {
        let wanted = fdb
            .iter()
            .any(|(m, d)| m.as_slice() == mac.as_slice() && d == dst);
        if !wanted {
            steps.push(Step::DelFdb(mac.clone(), *dst));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Remote;

    fn remote(n: u8, blocks: &[&str]) -> Remote {
        crate::dataplane::test_remote(n, blocks)
    }

    fn desired(remotes: Vec<Remote>) -> Desired {
        Desired {
            local_gateway: Some(Ipv4Addr::new(10, 32, 0, 1)),
            remotes,
            nodes: Vec::new(),
            prune: true,
        }
    }

    fn apply(seen: &mut Observed, steps: &[Step]) {
        for s in steps {
            match s {
                Step::DelRoute(r) => seen.routes.retain(|x| x != r),
                Step::DelNeighbour(ip) => {
                    seen.neighbours.remove(ip);
                }
                Step::DelFdb(m, d) => {
                    seen.fdb.remove(&(m.clone(), *d));
                }
                Step::SetNeighbour(ip, m) => {
                    seen.neighbours.insert(*ip, m.to_vec());
                }
                Step::SetFdb(m, d) => {
                    seen.fdb.retain(|(x, _)| x.as_slice() != m.as_slice());
                    seen.fdb.insert((m.to_vec(), *d));
                }
                Step::SetRoute(r) => {
                    seen.routes
                        .retain(|x| !(x.dst == r.dst && x.prefix == r.prefix));
                    seen.routes.push(r.clone());
                }
            }
        }
    }

    #[test]
    fn empty_kernel_gets_neighbours_and_fdb_before_routes() {
        let want = desired(vec![remote(2, &["10.36.0.0/14", "10.40.0.0/16"])]);
        let steps = plan(&want, &Observed::default());
        assert_eq!(steps.len(), 4);
        assert!(matches!(steps[0], Step::SetNeighbour(..)));
        assert!(matches!(steps[1], Step::SetFdb(..)));
        assert!(matches!(steps[2], Step::SetRoute(_)) && matches!(steps[3], Step::SetRoute(_)));
        let mut seen = Observed::default();
        apply(&mut seen, &steps);
        assert!(plan(&want, &seen).is_empty(), "converges in one round");
    }

    #[test]
    fn a_deleted_route_is_restored_and_nothing_else_moves() {
        let want = desired(vec![
            remote(2, &["10.36.0.0/14"]),
            remote(3, &["10.44.0.0/14"]),
        ]);
        let mut seen = Observed::default();
        apply(&mut seen, &plan(&want, &Observed::default()));
        seen.routes.retain(|r| r.dst != Ipv4Addr::new(10, 44, 0, 0));
        let steps = plan(&want, &seen);
        assert_eq!(steps.len(), 1);
        assert!(matches!(&steps[0], Step::SetRoute(r) if r.dst == Ipv4Addr::new(10, 44, 0, 0)));
    }

    #[test]
    fn a_gone_peer_and_stale_leftovers_are_removed_routes_first() {
        let mut seen = Observed::default();
        apply(
            &mut seen,
            &plan(
                &desired(vec![
                    remote(2, &["10.36.0.0/14"]),
                    remote(3, &["10.44.0.0/14"]),
                ]),
                &Observed::default(),
            ),
        );
        // A leftover from an earlier run with another address plan.
        seen.routes.push(OurRoute {
            dst: Ipv4Addr::new(10, 99, 0, 0),
            prefix: 16,
            via: Ipv4Addr::new(192, 168, 1, 9),
            src: None,
        });
        let want = desired(vec![remote(2, &["10.36.0.0/14"])]);
        let steps = plan(&want, &seen);
        let first_non_route = steps
            .iter()
            .position(|s| !matches!(s, Step::DelRoute(_)))
            .unwrap();
        assert_eq!(first_non_route, 2, "{steps:?}");
        assert!(steps.contains(&Step::DelNeighbour(Ipv4Addr::new(192, 168, 1, 3))));
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::DelFdb(_, d) if *d == Ipv4Addr::new(192, 168, 1, 3))));
        apply(&mut seen, &steps);
        assert!(plan(&want, &seen).is_empty());
    }

    #[test]
    fn before_the_first_sync_nothing_is_removed_but_everything_wanted_is_added() {
        // A restarted agent: the kernel still carries two peers; the view knows one so far.
        let mut seen = Observed::default();
        apply(
            &mut seen,
            &plan(
                &desired(vec![
                    remote(2, &["10.36.0.0/14"]),
                    remote(3, &["10.44.0.0/14"]),
                ]),
                &Observed::default(),
            ),
        );
        let mut want = desired(vec![
            remote(2, &["10.36.0.0/14"]),
            remote(4, &["10.48.0.0/14"]),
        ]);
        want.prune = false;
        let steps = plan(&want, &seen);
        assert!(
            steps.iter().all(|s| matches!(
                s,
                Step::SetNeighbour(..) | Step::SetFdb(..) | Step::SetRoute(_)
            )),
            "{steps:?}"
        );
        assert_eq!(steps.len(), 3, "only node 4 is added: {steps:?}");
        apply(&mut seen, &steps);
        assert_eq!(seen.routes.len(), 3, "node 3's route is kept");
        want.prune = true;
        let steps = plan(&want, &seen);
        assert!(steps.contains(&Step::DelNeighbour(Ipv4Addr::new(192, 168, 1, 3))));
    }

    #[test]
    fn a_block_that_moves_to_another_node_is_replaced_not_dropped() {
        let mut seen = Observed::default();
        apply(
            &mut seen,
            &plan(
                &desired(vec![remote(2, &["10.36.0.0/14"]), remote(3, &[])]),
                &Observed::default(),
            ),
        );
        let want = desired(vec![remote(2, &[]), remote(3, &["10.36.0.0/14"])]);
        let steps = plan(&want, &seen);
        assert!(
            !steps.iter().any(|s| matches!(s, Step::DelRoute(_))),
            "{steps:?}"
        );
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::SetRoute(r) if r.via == Ipv4Addr::new(192, 168, 1, 3))));
    }

    #[test]
    fn a_changed_vtep_mac_is_rewritten() {
        let mut seen = Observed::default();
        apply(
            &mut seen,
            &plan(
                &desired(vec![remote(2, &["10.36.0.0/14"])]),
                &Observed::default(),
            ),
        );
        let mut r = remote(2, &["10.36.0.0/14"]);
        r.mac = [0x0a, 0x76, 9, 9, 9, 9];
        let steps = plan(&desired(vec![r]), &seen);
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::SetNeighbour(_, m) if m[2] == 9)));
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::SetFdb(m, _) if m[2] == 9)));
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::DelFdb(m, _) if m[2] == 0)));
    }
}
