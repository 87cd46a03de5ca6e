//! When the leader reclaims a deleted Node's address space: a pure decision over what the
//! Node list, the mesh and IPAM say, level-triggered so a leader change or a missed watch
//! event cannot lose a reclaim.
//!
//! A peer's space is reclaimed when (1) the Node list is complete and has no Node of that
//! name, (2) the mesh sees the peer `dead` or `left` (or no longer knows it), (3) it still
//! owns space, and (4) all of that has held for `GRACE`. Exactly one reclaim results even
//! if two nodes act at once: only the Lease holder asks, one peer per round, right after a
//! resourceVersion-checked write that renews the Lease (a holder that lost it cannot act:
//! its write fails); IPAM's reclaim coordinator refuses a second reclaim of a peer that owns
//! nothing, and the holder decides alone only for a peer that owns every reclaim anchor
//! (`ipam/core/reclaim.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a peer must stay Node-less and down before its space moves.
pub const GRACE: Duration = Duration::from_secs(3);
/// After a refusal (e.g. the coordinator is unreachable), try again this much later.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// One peer as the mesh and IPAM see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpace {
    pub name: String,
    /// Addresses it owns in the ring.
    pub addresses: u64,
    /// Mesh liveness (`alive`, `suspect`, `dead`, `left`), `None` if the mesh forgot it.
    pub state: Option<String>,
}

#[derive(Debug, Default)]
pub struct Reclaimer {
    gone_since: BTreeMap<String, Instant>,
    retry_at: BTreeMap<String, Instant>,
}

impl Reclaimer {
    /// Peers whose space should be reclaimed now. `has_node` is consulted only when the
    /// Node list is `synced`.
    pub fn due(
        &mut self,
        now: Instant,
        me: &str,
        synced: bool,
        has_node: impl Fn(&str) -> bool,
        peers: &[PeerSpace],
    ) -> Vec<String> {
        let candidates: Vec<&PeerSpace> = peers
            .iter()
            .filter(|p| synced && p.name != me && p.addresses > 0 && !has_node(&p.name))
            .filter(|p| matches!(p.state.as_deref(), None | Some("dead") | Some("left")))
            .collect();
        self.gone_since
            .retain(|n, _| candidates.iter().any(|p| &p.name == n));
        self.retry_at
            .retain(|n, _| candidates.iter().any(|p| &p.name == n));
        let mut due = Vec::new();
        for p in candidates {
            let since = *self.gone_since.entry(p.name.clone()).or_insert(now);
            let retry_ok = self.retry_at.get(&p.name).is_none_or(|t| now >= *t);
            if now.duration_since(since) >= GRACE && retry_ok {
                due.push(p.name.clone());
            }
        }
        due
    }

    /// The reclaim of `name` was asked (answered or refused): not again before `RETRY_AFTER`.
    pub fn asked(&mut self, name: &str, now: Instant) {
        self.retry_at.insert(name.to_string(), now + RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, addresses: u64, state: Option<&str>) -> PeerSpace {
        PeerSpace {
            name: name.into(),
            addresses,
            state: state.map(String::from),
        }
    }

    #[test]
    fn a_deleted_down_node_with_space_is_due_after_the_grace_period() {
        let mut r = Reclaimer::default();
        let t = Instant::now();
        let peers = [
            peer("a", 100, Some("alive")),
            peer("b", 100, Some("dead")),
            peer("c", 100, Some("alive")),
        ];
        let nodes = |n: &str| n != "b";
        assert!(r.due(t, "a", true, nodes, &peers).is_empty());
        assert!(r.due(t + GRACE / 2, "a", true, nodes, &peers).is_empty());
        assert_eq!(r.due(t + GRACE, "a", true, nodes, &peers), vec!["b"]);
        r.asked("b", t + GRACE);
        assert!(
            r.due(t + GRACE * 2, "a", true, nodes, &peers).is_empty(),
            "not asked twice at once"
        );
        assert_eq!(
            r.due(t + GRACE + RETRY_AFTER, "a", true, nodes, &peers),
            vec!["b"]
        );
    }

    #[test]
    fn nothing_is_due_before_the_node_list_is_complete() {
        let mut r = Reclaimer::default();
        let t = Instant::now();
        let peers = [peer("b", 100, Some("dead"))];
        assert!(r.due(t, "a", false, |_| false, &peers).is_empty());
        assert!(r
            .due(t + GRACE * 10, "a", false, |_| false, &peers)
            .is_empty());
    }

    #[test]
    fn alive_or_suspect_peers_ourselves_and_empty_owners_are_never_due() {
        let mut r = Reclaimer::default();
        let t = Instant::now();
        let peers = [
            peer("a", 100, Some("dead")),
            peer("b", 100, Some("alive")),
            peer("c", 100, Some("suspect")),
            peer("d", 0, Some("dead")),
            peer("e", 100, None),
            peer("f", 100, Some("left")),
        ];
        r.due(t, "a", true, |_| false, &peers);
        assert_eq!(
            r.due(t + GRACE, "a", true, |_| false, &peers),
            vec!["e", "f"]
        );
    }

    #[test]
    fn a_node_that_comes_back_restarts_the_grace_period() {
        let mut r = Reclaimer::default();
        let t = Instant::now();
        let peers = [peer("b", 100, Some("dead"))];
        r.due(t, "a", true, |_| false, &peers);
        // The Node reappears (re-registered) for a moment.
        assert!(r.due(t + GRACE / 2, "a", true, |_| true, &peers).is_empty());
        assert!(r.due(t + GRACE, "a", true, |_| false, &peers).is_empty());
        assert_eq!(
            r.due(t + GRACE * 2, "a", true, |_| false, &peers),
            vec!["b"]
        );
    }
}
