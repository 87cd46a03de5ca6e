//! Which peers this node keeps control connections to.
//!
//! A bounded set per node instead of a full mesh: the next `ring` peers after us in id
//! order (so the union over all nodes is a connected ring), plus `random` peers chosen by
//! rendezvous hashing (so the graph has short paths, and a membership change moves few
//! choices). Inbound connections from other nodes' choices come on top; the total degree
//! stays around `2 * (ring + random)` whatever the cluster size.

use std::collections::BTreeSet;

use mesh_proto::PeerId;

/// `candidates` are the up peers other than `me`, in ascending id order.
pub fn choose(me: PeerId, candidates: &[PeerId], ring: usize, random: usize) -> BTreeSet<PeerId> {
    let mut chosen = BTreeSet::new();
    if candidates.len() <= ring + random {
        chosen.extend(candidates.iter().copied());
        return chosen;
    }
    // Successors on the id ring, wrapping around.
    let start = candidates.partition_point(|id| *id < me);
    for i in 0..ring {
        chosen.insert(candidates[(start + i) % candidates.len()]);
    }
    // Rendezvous hashing: the lowest scores for (me, candidate) win.
    let mut scored: Vec<(u64, PeerId)> = candidates
        .iter()
        .filter(|id| !chosen.contains(id))
        .map(|id| (mix(me.0 ^ mix(id.0)), *id))
        .collect();
    scored.sort_unstable();
    chosen.extend(scored.into_iter().take(random).map(|(_, id)| id));
    chosen
}

/// splitmix64's finaliser: a cheap, well-mixed, build-independent hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_clusters_connect_everyone() {
        let c: Vec<PeerId> = (2..6).map(PeerId).collect();
        assert_eq!(choose(PeerId(1), &c, 2, 3).len(), 4);
    }

    #[test]
    fn degree_is_bounded_and_ring_is_included() {
        let c: Vec<PeerId> = (0..1000).filter(|i| *i != 500).map(PeerId).collect();
        let n = choose(PeerId(500), &c, 2, 3);
        assert_eq!(n.len(), 5);
        assert!(n.contains(&PeerId(501)) && n.contains(&PeerId(502)));
        // Wrap-around at the top of the id space.
        let n = choose(PeerId(999), &c[..998], 2, 0);
        assert!(n.contains(&PeerId(0)) && n.contains(&PeerId(1)));
    }

    #[test]
    fn the_union_of_choices_is_connected() {
        let ids: Vec<PeerId> = (0..300).map(|i| PeerId(mix(i))).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        let mut adj = std::collections::BTreeMap::<PeerId, BTreeSet<PeerId>>::new();
        for me in &sorted {
            let others: Vec<PeerId> = sorted.iter().copied().filter(|p| p != me).collect();
            for n in choose(*me, &others, 2, 3) {
                adj.entry(*me).or_default().insert(n);
                adj.entry(n).or_default().insert(*me);
            }
        }
        let mut seen = BTreeSet::from([sorted[0]]);
        let mut stack = vec![sorted[0]];
        while let Some(p) = stack.pop() {
            for n in &adj[&p] {
                if seen.insert(*n) {
                    stack.push(*n);
                }
            }
        }
        assert_eq!(seen.len(), sorted.len());
        let max_degree = adj.values().map(BTreeSet::len).max().unwrap();
        assert!(max_degree < 30, "max degree {max_degree}");
    }
}
