//! `RangeRing`: the cluster range as a tiling of aligned blocks, each with an owner and a
//! version — a CRDT whose merge can never give one address two owners.
//!
//! Rules that make it safe:
//! - the entries always tile the range exactly (before the first split, one entry owned by
//!   [`NOBODY`] at version 0 covers everything);
//! - only a block's owner writes a newer version of it (hand-over, or the first split);
//! - merge is per address: the higher version wins. Two different owners at the same
//!   version can only come from a protocol bug or lost state; merge still resolves them the
//!   same way everywhere (lower peer id wins) and reports the conflict, never a teardown.
//!
//! Entries are kept in canonical form (buddies with equal owner and version are joined), so
//! equal rings have equal hashes.

use std::collections::BTreeMap;

use mesh_proto::ipam::{RingEntry, NOBODY};
use mesh_proto::PeerId;

use super::block::Block;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owned {
    pub owner: PeerId,
    pub version: u64,
}

/// Two owners claimed the same block at the same version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub block: Block,
    pub version: u64,
    pub kept: PeerId,
    pub dropped: PeerId,
}

/// Versions at or above this are corrupt input: no honest peer gets there, and refusing
/// them keeps every `+ 1` below from overflowing.
pub const MAX_VERSION: u64 = u64::MAX / 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("entry version {0} is beyond any real history")]
    AbsurdVersion(u64),
    #[error("entry {0} lies outside the cluster range {1}")]
    OutsideRange(String, Block),
    #[error("entry {block} is smaller than the minimum block /{min}")]
    TooSmall { block: String, min: u8 },
    #[error("entry start {0:#x} is not aligned to /{1}")]
    Unaligned(u32, u8),
    #[error("{block} is not wholly owned by {me}")]
    NotOwner { block: Block, me: PeerId },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    pub changed: bool,
    pub conflicts: Vec<Conflict>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRing {
    range: Block,
    min_prefix: u8,
    entries: BTreeMap<u32, (u8, Owned)>,
}

impl RangeRing {
    /// An unsplit ring: the whole range belongs to nobody yet.
    pub fn new(range: Block, min_prefix: u8) -> RangeRing {
        let mut entries = BTreeMap::new();
        entries.insert(
            range.start,
            (
                range.prefix,
                Owned {
                    owner: NOBODY,
                    version: 0,
                },
            ),
        );
        RangeRing {
            range,
            min_prefix: min_prefix.max(range.prefix),
            entries,
        }
    }

    pub fn range(&self) -> Block {
        self.range
    }

    pub fn min_prefix(&self) -> u8 {
        self.min_prefix
    }

    /// True once any part of the range has an owner.
    pub fn is_split(&self) -> bool {
        self.entries.values().any(|(_, o)| o.owner != NOBODY)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Block, Owned)> + '_ {
        self.entries.iter().map(|(s, (p, o))| {
            (
                Block {
                    start: *s,
                    prefix: *p,
                },
                *o,
            )
        })
    }

    pub fn entries(&self) -> Vec<RingEntry> {
        self.iter()
            .map(|(b, o)| RingEntry {
                start: b.start,
                prefix: b.prefix,
                owner: o.owner,
                version: o.version,
            })
            .collect()
    }

    pub fn owner_of(&self, addr: u32) -> Option<(Block, Owned)> {
        let (start, (prefix, owned)) = self.entries.range(..=addr).next_back()?;
        let b = Block {
            start: *start,
            prefix: *prefix,
        };
        b.contains_addr(addr).then_some((b, *owned))
    }

    /// Blocks owned by `peer`, in address order.
    pub fn blocks_of(&self, peer: PeerId) -> Vec<Block> {
        self.iter()
            .filter(|(_, o)| o.owner == peer)
            .map(|(b, _)| b)
            .collect()
    }

    /// Addresses owned per peer (nobody included while unsplit parts remain).
    pub fn shares(&self) -> BTreeMap<PeerId, u64> {
        let mut out = BTreeMap::new();
        for (b, o) in self.iter() {
            *out.entry(o.owner).or_insert(0) += b.size();
        }
        out
    }

    /// FNV-1a over the canonical entries: equal rings, equal hashes, on every build.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (b, o) in self.iter() {
            for v in [
                u64::from(b.start),
                u64::from(b.prefix),
                o.owner.0,
                o.version,
            ] {
                for byte in v.to_le_bytes() {
                    h ^= u64::from(byte);
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        h
    }

    /// Checks an entry from outside before it touches the ring.
    pub fn validate(&self, e: &RingEntry) -> Result<Block, RingError> {
        let b =
            Block::new(e.start, e.prefix).map_err(|_| RingError::Unaligned(e.start, e.prefix))?;
        if !self.range.contains(&b) {
            return Err(RingError::OutsideRange(b.to_string(), self.range));
        }
        if b.prefix > self.min_prefix {
            return Err(RingError::TooSmall {
                block: b.to_string(),
                min: self.min_prefix,
            });
        }
        if e.version >= MAX_VERSION {
            return Err(RingError::AbsurdVersion(e.version));
        }
        Ok(b)
    }

    /// Makes `addr` (aligned to `prefix` inside the range) an entry boundary by halving the
    /// entry that straddles it.
    fn split_at(&mut self, addr: u32) {
        loop {
            let Some((start, (prefix, owned))) = self
                .entries
                .range(..=addr)
                .next_back()
                .map(|(s, v)| (*s, *v))
            else {
                return;
            };
            if start == addr {
                return;
            }
            let b = Block { start, prefix };
            if !b.contains_addr(addr) {
                return;
            }
            let Some((lo, hi)) = b.halves() else { return };
            self.entries.insert(lo.start, (lo.prefix, owned));
            self.entries.insert(hi.start, (hi.prefix, owned));
        }
    }

    /// Makes `b` a union of whole entries.
    fn isolate(&mut self, b: Block) {
        self.split_at(b.start);
        if b.end() < self.range.end() {
            self.split_at(b.end() as u32);
        }
    }

    fn entries_in(&self, b: Block) -> Vec<(u32, u8, Owned)> {
        let end = b.end();
        self.entries
            .range(b.start..)
            .take_while(|(s, _)| u64::from(**s) < end)
            .map(|(s, (p, o))| (*s, *p, *o))
            .collect()
    }

    /// Joins buddies with equal owner and version, around `b`, as far up as they go.
    fn compress(&mut self, b: Block) {
        let mut pending: Vec<Block> = self
            .entries_in(b)
            .into_iter()
            .map(|(s, p, _)| Block {
                start: s,
                prefix: p,
            })
            .collect();
        while let Some(blk) = pending.pop() {
            let (Some(buddy), Some(parent)) = (blk.buddy(), blk.parent()) else {
                continue;
            };
            if !self.range.contains(&parent) {
                continue;
            }
            let (Some(a), Some(c)) = (self.entries.get(&blk.start), self.entries.get(&buddy.start))
            else {
                continue;
            };
            if a.0 != blk.prefix || c.0 != buddy.prefix || a.1 != c.1 {
                continue;
            }
            let owned = a.1;
            self.entries.remove(&blk.start);
            self.entries.remove(&buddy.start);
            self.entries.insert(parent.start, (parent.prefix, owned));
            pending.push(parent);
        }
    }

    /// Merges one entry (already validated). Higher version wins per address.
    pub fn merge(&mut self, e: &RingEntry) -> Result<MergeOutcome, RingError> {
        let b = self.validate(e)?;
        let incoming = Owned {
            owner: e.owner,
            version: e.version,
        };
        self.isolate(b);
        let mut out = MergeOutcome::default();
        for (start, prefix, local) in self.entries_in(b) {
            let replace = match incoming.version.cmp(&local.version) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal if incoming.owner == local.owner => false,
                std::cmp::Ordering::Equal => {
                    let kept = incoming.owner.min(local.owner);
                    let dropped = incoming.owner.max(local.owner);
                    out.conflicts.push(Conflict {
                        block: Block { start, prefix },
                        version: local.version,
                        kept,
                        dropped,
                    });
                    kept == incoming.owner
                }
            };
            if replace {
                self.entries.insert(start, (prefix, incoming));
                out.changed = true;
            }
        }
        self.compress(b);
        Ok(out)
    }

    /// Gives `block` (wholly owned by `me`) to `to` at a version above anything in it.
    /// Returns the entries to store and gossip.
    pub fn hand_over(
        &mut self,
        me: PeerId,
        block: Block,
        to: PeerId,
    ) -> Result<Vec<RingEntry>, RingError> {
        let b = self.validate(&RingEntry {
            start: block.start,
            prefix: block.prefix,
            owner: me,
            version: 0,
        })?;
        self.isolate(b);
        let inside = self.entries_in(b);
        if inside.iter().any(|(_, _, o)| o.owner != me) {
            self.compress(b);
            return Err(RingError::NotOwner { block: b, me });
        }
        let version = inside.iter().map(|(_, _, o)| o.version).max().unwrap_or(0) + 1;
        for (s, _, _) in &inside {
            self.entries.remove(s);
        }
        self.entries
            .insert(b.start, (b.prefix, Owned { owner: to, version }));
        self.compress(b);
        Ok(vec![RingEntry {
            start: b.start,
            prefix: b.prefix,
            owner: to,
            version,
        }])
    }

    /// The first split: the range in equal contiguous shares among `members` (sorted by
    /// id, so every peer computes the same ring), each share cut into aligned blocks no
    /// smaller than the minimum. Entries get version 1; nobody else writes version 1 of
    /// unsplit space, so peers that split the same member list agree exactly.
    pub fn initial_split(range: Block, min_prefix: u8, members: &[PeerId]) -> RangeRing {
        let mut ring = RangeRing::new(range, min_prefix);
        let mut members = members.to_vec();
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            return ring;
        }
        let unit = 1u64 << (32 - u32::from(ring.min_prefix));
        let units = range.size() / unit;
        let n = members.len() as u64;
        for (i, m) in members.iter().enumerate() {
            let i = i as u64;
            let from = u64::from(range.start) + (units * i / n) * unit;
            let to = u64::from(range.start) + (units * (i + 1) / n) * unit;
            for b in Block::cover(from, to) {
                let e = RingEntry {
                    start: b.start,
                    prefix: b.prefix,
                    owner: *m,
                    version: 1,
                };
                // Blocks from `cover` are aligned and inside the range by construction.
                let _ = ring.merge(&e);
            }
        }
        ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Block {
        "10.32.0.0/12".parse().unwrap()
    }

    fn tiles(ring: &RangeRing) -> bool {
        let mut at = u64::from(ring.range().start);
        for (b, _) in ring.iter() {
            if u64::from(b.start) != at {
                return false;
            }
            at = b.end();
        }
        at == ring.range().end()
    }

    #[test]
    fn initial_split_is_equal_deterministic_and_tiles() {
        let ids = [PeerId(9), PeerId(3), PeerId(5)];
        let a = RangeRing::initial_split(range(), 26, &ids);
        let b = RangeRing::initial_split(range(), 26, &[PeerId(5), PeerId(9), PeerId(3)]);
        assert_eq!(a, b);
        assert!(tiles(&a));
        let shares = a.shares();
        assert_eq!(shares.len(), 3);
        let (min, max) = (
            shares.values().min().unwrap(),
            shares.values().max().unwrap(),
        );
        assert!(max - min <= 64, "{shares:?}");
    }

    #[test]
    fn hand_over_and_merge_converge_without_overlap() {
        let mut a = RangeRing::initial_split(range(), 26, &[PeerId(1), PeerId(2)]);
        let mut b = a.clone();
        let give = a.blocks_of(PeerId(1))[0].halves().unwrap().1;
        let delta = a.hand_over(PeerId(1), give, PeerId(2)).unwrap();
        assert!(tiles(&a));
        for e in &delta {
            assert!(b.merge(e).unwrap().changed);
        }
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a, b);
        // Replaying an old entry changes nothing.
        for e in RangeRing::initial_split(range(), 26, &[PeerId(1), PeerId(2)]).entries() {
            assert!(!b.merge(&e).unwrap().changed);
        }
        assert_eq!(a, b);
    }

    #[test]
    fn only_the_owner_can_hand_over() {
        let mut a = RangeRing::initial_split(range(), 26, &[PeerId(1), PeerId(2)]);
        let theirs = a.blocks_of(PeerId(2))[0];
        assert!(matches!(
            a.hand_over(PeerId(1), theirs, PeerId(1)),
            Err(RingError::NotOwner { .. })
        ));
        assert!(tiles(&a));
    }

    #[test]
    fn conflicting_claims_resolve_the_same_everywhere() {
        let base = RangeRing::initial_split(range(), 26, &[PeerId(1)]);
        let blk = base.blocks_of(PeerId(1))[0];
        let e1 = RingEntry {
            start: blk.start,
            prefix: blk.prefix,
            owner: PeerId(7),
            version: 2,
        };
        let e2 = RingEntry {
            owner: PeerId(4),
            ..e1
        };
        let (mut x, mut y) = (base.clone(), base.clone());
        x.merge(&e1).unwrap();
        let cx = x.merge(&e2).unwrap();
        y.merge(&e2).unwrap();
        let cy = y.merge(&e1).unwrap();
        assert_eq!(x, y);
        assert_eq!(x.owner_of(blk.start).unwrap().1.owner, PeerId(4));
        assert_eq!(cx.conflicts.len() + cy.conflicts.len(), 2);
    }

    #[test]
    fn garbage_entries_are_rejected() {
        let mut r = RangeRing::new(range(), 26);
        let bad = [
            RingEntry {
                start: 0,
                prefix: 8,
                owner: PeerId(1),
                version: 1,
            },
            RingEntry {
                start: u32::from(std::net::Ipv4Addr::new(10, 32, 0, 1)),
                prefix: 26,
                owner: PeerId(1),
                version: 1,
            },
            RingEntry {
                start: u32::from(std::net::Ipv4Addr::new(10, 32, 0, 0)),
                prefix: 30,
                owner: PeerId(1),
                version: 1,
            },
            RingEntry {
                start: 7,
                prefix: 40,
                owner: PeerId(1),
                version: 1,
            },
        ];
        for e in bad {
            assert!(r.merge(&e).is_err(), "{e:?}");
        }
        assert!(!r.is_split());
    }
}
