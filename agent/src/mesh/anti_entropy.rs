//! Anti-entropy: the backstop for deltas that gossip lost.
//!
//! Each round sends one peer a 12-byte summary of our view. Only when the summaries differ
//! does the receiver send its full digest; the digest's receiver then pushes what it has
//! newer and pulls what the other has newer. At steady state a round costs one small message.
//!
//! Now and then the round goes to a peer we believe down ("gossip to the dead"): that is how
//! two halves of a healed partition find each other again.

use mesh_proto::gossip::{DigestEntry, GossipMessage};
use mesh_proto::PeerId;
use rand::seq::IndexedRandom;
use rand::Rng;

use super::core::MeshCore;
use super::membership::Comparison;

/// One round in this many goes to a down peer, when there is one.
const TO_THE_DEAD_ONE_IN: u32 = 4;

impl MeshCore {
    pub(super) fn anti_entropy_round(&mut self) {
        let down: Vec<PeerId> = self
            .view
            .iter()
            .filter(|m| !m.is_up())
            .map(|m| m.record.id)
            .collect();
        let target = if !down.is_empty() && self.rng.random_ratio(1, TO_THE_DEAD_ONE_IN) {
            down.choose(&mut self.rng).copied()
        } else {
            self.partners().choose(&mut self.rng).copied()
        };
        if let Some(to) = target {
            let (hash, members) = self.view.view_hash();
            self.send(to, GossipMessage::DigestSummary { hash, members });
        }
    }

    pub(super) fn send_digest(&mut self, to: PeerId) {
        let entries = self.view.digest();
        self.send(to, GossipMessage::Digest { entries });
    }

    pub(super) fn on_digest_summary(&mut self, from: PeerId, hash: u64, members: u32) {
        if self.view.view_hash() != (hash, members) {
            self.send_digest(from);
        }
    }

    pub(super) fn on_digest(&mut self, from: PeerId, entries: &[DigestEntry]) {
        let mut pull = Vec::new();
        let mut push = Vec::new();
        for e in entries {
            match self.view.compare(e) {
                Comparison::TheirsNewer => pull.push(e.id),
                Comparison::OursNewer => push.push(e.id),
                Comparison::Diverged => {
                    pull.push(e.id);
                    push.push(e.id);
                }
                Comparison::Same | Comparison::Ignorable => {}
            }
        }
        // Up members the sender does not know at all.
        let mut theirs: Vec<PeerId> = entries.iter().map(|e| e.id).collect();
        theirs.sort_unstable();
        push.extend(
            self.view
                .iter()
                .filter(|m| m.is_up() && theirs.binary_search(&m.record.id).is_err())
                .map(|m| m.record.id),
        );
        let chunk = self.cfg.max_updates_per_message.max(1);
        for ids in push.chunks(chunk) {
            let updates = self.updates_for(ids);
            self.send(from, GossipMessage::Updates { updates });
        }
        for ids in pull.chunks(chunk * 8) {
            self.send(from, GossipMessage::Pull { ids: ids.to_vec() });
        }
    }

    pub(super) fn on_pull(&mut self, from: PeerId, ids: &[PeerId]) {
        let chunk = self.cfg.max_updates_per_message.max(1);
        for ids in ids.chunks(chunk) {
            let updates = self.updates_for(ids);
            if !updates.is_empty() {
                self.send(from, GossipMessage::Updates { updates });
            }
        }
    }
}
