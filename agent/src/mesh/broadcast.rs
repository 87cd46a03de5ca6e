//! Which members' latest state still needs spreading, and how many more times.
//!
//! Holds only ids and counters: the state sent is always the member's current one, so a
//! newer change replaces an older one in flight. Least-sent entries go first (SWIM §4.1).

use std::collections::BTreeMap;

use mesh_proto::PeerId;

#[derive(Debug, Default)]
pub struct BroadcastQueue {
    /// Transmissions left per member.
    pending: BTreeMap<PeerId, u32>,
}

impl BroadcastQueue {
    /// (Re)schedules a member's state for `transmits` more transmissions.
    pub fn enqueue(&mut self, id: PeerId, transmits: u32) {
        self.pending.insert(id, transmits.max(1));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn remove(&mut self, id: &PeerId) {
        self.pending.remove(id);
    }

    /// Takes up to `max` members for one message, spending one transmission of each.
    pub fn take(&mut self, max: usize) -> Vec<PeerId> {
        let mut order: Vec<(u32, PeerId)> = self.pending.iter().map(|(id, n)| (*n, *id)).collect();
        // Most transmissions left first = least sent first; id breaks ties deterministically.
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        order.truncate(max);
        let ids: Vec<PeerId> = order.into_iter().map(|(_, id)| id).collect();
        for id in &ids {
            if let Some(n) = self.pending.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(id);
                }
            }
        }
        ids
    }
}

/// SWIM's retransmit budget: `mult * ceil(log10(n + 1))`.
pub fn retransmit_limit(mult: u32, members: usize) -> u32 {
    let log = ((members as f64) + 1.0).log10().ceil().max(1.0) as u32;
    mult * log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_sent_first_and_expiry() {
        let mut q = BroadcastQueue::default();
        q.enqueue(PeerId(1), 2);
        q.enqueue(PeerId(2), 1);
        assert_eq!(q.take(1), vec![PeerId(1)]);
        // Both now have one left; id order breaks the tie.
        assert_eq!(q.take(5), vec![PeerId(1), PeerId(2)]);
        assert!(q.is_empty());
    }

    #[test]
    fn limit_grows_with_log_n() {
        assert_eq!(retransmit_limit(4, 5), 4);
        assert_eq!(retransmit_limit(4, 50), 8);
        assert_eq!(retransmit_limit(4, 1000), 16);
    }
}
