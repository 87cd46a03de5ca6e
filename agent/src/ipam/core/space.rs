//! Space on demand: a node out of addresses asks the peer with the most free space; the
//! donor gives a fully free aligned block of at most half its free space (never one holding
//! an allocation, the gateway, a reserved address or a reclaim anchor), stores the hand-over,
//! then answers and floods it.

use std::time::Instant;

use mesh_proto::ipam::IpamMessage;
use mesh_proto::PeerId;

use super::{AllocateError, IpamCore, IpamEvent, IpamOutput, IpamWrite, SpaceRequest};
use crate::ipam::allocations::Allocation;
use crate::ipam::block::Block;

impl IpamCore {
    pub(super) fn ask_for_space(&mut self, now: Instant) -> Result<Allocation, AllocateError> {
        if let Some(r) = &self.request {
            return Err(AllocateError::Waiting(self.name_of(r.to)));
        }
        let shares = self.ring.shares();
        let donor = self
            .up_peers()
            .into_iter()
            .filter(|p| *p != self.me && !self.denied.contains_key(p))
            .map(|p| {
                let owned = shares.get(&p).copied().unwrap_or(0);
                // What it told us, else what it owns (an upper bound).
                let free = self
                    .peers
                    .get(&p)
                    .and_then(|s| s.free)
                    .unwrap_or(owned)
                    .min(owned);
                (free, p)
            })
            .filter(|(free, _)| *free > 0)
            .max();
        let Some((_, to)) = donor else {
            return Err(AllocateError::Exhausted(self.cfg.range));
        };
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.request = Some(SpaceRequest {
            id,
            to,
            deadline: now + self.cfg.request_timeout,
        });
        self.out
            .push(IpamOutput::Event(IpamEvent::SpaceRequested { to }));
        self.send(to, IpamMessage::SpaceRequest { id });
        Err(AllocateError::Waiting(self.name_of(to)))
    }

    pub(super) fn on_space_request(&mut self, from: PeerId, id: u64) {
        let Some(block) = self.donation() else {
            self.send(from, IpamMessage::SpaceDenied { id });
            return;
        };
        match self.ring.hand_over(self.me, block, from) {
            Ok(entries) => {
                // Committed before the grant (or any delta) leaves.
                self.out
                    .push(IpamOutput::Persist(IpamWrite::Ring(self.ring.entries())));
                self.send(
                    from,
                    IpamMessage::SpaceGrant {
                        id,
                        entries: entries.clone(),
                    },
                );
                self.flood(Some(from), entries);
            }
            Err(_) => self.send(from, IpamMessage::SpaceDenied { id }),
        }
    }

    /// The block to give away: the largest fully free aligned block of ours that is at
    /// most half our free space (and not below the minimum block size).
    pub(super) fn donation(&self) -> Option<Block> {
        let free = self.free();
        let reserved = self.reserved();
        let min_prefix = self.ring.min_prefix();
        let mut best: Option<Block> = None;
        let mut stack = self.ring.blocks_of(self.me);
        while let Some(b) = stack.pop() {
            // Anchor blocks stay put: they locate the reclaim coordinator (reclaim.rs).
            let untouched = self.allocs.used_in(b) == 0
                && !reserved.iter().any(|a| b.contains_addr(*a))
                && !self.holds_anchor(b);
            if untouched && b.size() * 2 <= free {
                if best.is_none_or(|x| {
                    b.size() > x.size() || (b.size() == x.size() && b.start > x.start)
                }) {
                    best = Some(b);
                }
            } else if b.prefix < min_prefix {
                if let Some((lo, hi)) = b.halves() {
                    stack.push(lo);
                    stack.push(hi);
                }
            }
        }
        best
    }
}
