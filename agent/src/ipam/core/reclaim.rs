//! Reclaiming a dead peer's space (`meshctl rmpeer`), with exactly one writer.
//!
//! Every reclaim of peer X is decided by X's *coordinator*: the owner of the first of a
//! few fixed anchor addresses (first, last, middle, quarters of the range) that X does not
//! own. Anchor blocks are never donated, so an anchor changes hands only through a
//! reclaim, and at any moment one live peer owns it. The coordinator checks that X is down,
//! writes X's blocks over to the requester (one version up), stores that, and only then
//! answers. A second `rmpeer X` — from any node, at the same moment — reaches the same
//! coordinator, which finds X owning nothing and refuses it. Two owners cannot result.
//!
//! A peer can own every anchor: the only node of a one-node cluster, or the node that made
//! an elected first split (`--kube`), keeps them until it is reclaimed. Nobody can
//! coordinate its reclaim, so a writer that is single by other means decides it itself, on
//! its own ring only (never for a remote request): the Kubernetes Lease holder
//! (`ReclaimMode::SoleWriter`, fenced by its Lease write just before), or an operator with
//! `--force` on one node. With `--kube` every anchor stays with one peer (the splitter,
//! then whoever reclaimed it), so every other peer's reclaim goes through the coordinator.

use std::time::{Duration, Instant};

use mesh_proto::ipam::{IpamMessage, RingEntry, NOBODY};
use mesh_proto::PeerId;

use super::{IpamCore, IpamEvent, IpamOutput, IpamWrite};
use crate::ipam::block::Block;

const RECLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Who asks for a reclaim, which decides what it may do when the coordinator is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReclaimMode {
    /// `meshctl rmpeer`: the anchor coordinator decides.
    Coordinated,
    /// `meshctl rmpeer --force`: anchor owners this node sees down are skipped (the
    /// operator asserts they are gone); for a peer owning every anchor, this node decides.
    Forced,
    /// The Kubernetes Lease holder: like `Coordinated` (it never skips owners it merely
    /// sees down), but for a peer owning every anchor it decides itself.
    SoleWriter,
}

pub(super) struct PendingReclaim {
    pub id: u64,
    pub dead: PeerId,
    pub deadline: Instant,
}

/// How a reclaim started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReclaimStart {
    /// Done here (we are the coordinator): this many addresses moved to us.
    Done { addresses: u64 },
    /// Asked the coordinator; the answer comes as an event with this id.
    Asked { id: u64, coordinator: PeerId },
}

fn total_size(entries: &[RingEntry]) -> u64 {
    entries
        .iter()
        .map(|e| {
            Block {
                start: e.start,
                prefix: e.prefix,
            }
            .size()
        })
        .sum()
}

impl IpamCore {
    /// The fixed anchor addresses of the range, in priority order.
    pub(super) fn anchors(&self) -> [u32; 5] {
        let r = self.ring.range();
        let size = r.size();
        let at =
            |num: u64, den: u64| (u64::from(r.start) + size * num / den).min(r.end() - 1) as u32;
        [r.start, r.last(), at(1, 2), at(1, 4), at(3, 4)]
    }

    pub(super) fn holds_anchor(&self, b: Block) -> bool {
        self.anchors().iter().any(|a| b.contains_addr(*a))
    }

    /// Who decides reclaims of `dead`, as this node sees the ring. With `force`, anchor
    /// owners this node believes down are skipped too: the operator asserts they are gone
    /// (the escape from two dead peers being each other's coordinator).
    pub fn coordinator_for(&self, dead: PeerId, force: bool) -> Option<PeerId> {
        self.anchors()
            .iter()
            .filter_map(|a| self.ring.owner_of(*a).map(|(_, o)| o.owner))
            .find(|o| *o != dead && *o != NOBODY && (!force || *o == self.me || self.is_up(*o)))
    }

    /// `dead` owns every anchor in this node's ring (none unowned, none anyone else's).
    fn owns_every_anchor(&self, dead: PeerId) -> bool {
        self.anchors()
            .iter()
            .all(|a| self.ring.owner_of(*a).is_some_and(|(_, o)| o.owner == dead))
    }

    fn find_peer(&self, name: &str) -> Option<PeerId> {
        self.peers
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(id, _)| *id)
            .or_else(|| {
                name.parse::<PeerId>()
                    .ok()
                    .filter(|id| self.peers.contains_key(id))
            })
    }

    /// `meshctl rmpeer [--force] NAME` on this node (or the Lease holder's reclaim of a
    /// deleted Node): move NAME's blocks here.
    pub fn reclaim(
        &mut self,
        now: Instant,
        name: &str,
        mode: ReclaimMode,
    ) -> (Result<ReclaimStart, String>, Vec<IpamOutput>) {
        let result = self.reclaim_inner(now, name, mode);
        (result, std::mem::take(&mut self.out))
    }

    fn reclaim_inner(
        &mut self,
        now: Instant,
        name: &str,
        mode: ReclaimMode,
    ) -> Result<ReclaimStart, String> {
        let force = mode == ReclaimMode::Forced;
        let dead = self
            .find_peer(name)
            .ok_or_else(|| format!("no peer named {name:?} is known to this node"))?;
        if dead == self.me {
            return Err("a node cannot reclaim its own space".into());
        }
        if self.ring.blocks_of(dead).is_empty() {
            return Err(format!(
                "{name} owns no address space: it was already reclaimed (or never had any)"
            ));
        }
        let coordinator = match self.coordinator_for(dead, force) {
            Some(c) => c,
            None if mode != ReclaimMode::Coordinated && self.owns_every_anchor(dead) => {
                if self.is_up(dead) {
                    return Err(format!("{name} is alive as far as this node can tell; rmpeer is for peers that are gone for good"));
                }
                let entries = self.decide_alone(dead)?;
                return Ok(ReclaimStart::Done {
                    addresses: total_size(&entries),
                });
            }
            None if self.owns_every_anchor(dead) => {
                return Err(format!(
                    "{name} owns every anchor of the range (it made the first split, or was alone), so no peer \
                     coordinates its reclaim: if it is gone for good run 'meshctl rmpeer --force {name}' on one node"
                ))
            }
            None => {
                return Err(format!(
                    "no live peer this node knows owns a reclaim anchor that {name} does not own (this node's ring \
                     may be incomplete); retry once the ring has settled"
                ))
            }
        };
        if coordinator != self.me && !self.is_up(coordinator) {
            let who = self.name_of(coordinator);
            return Err(format!(
                "the reclaim coordinator for {name} is {who}, which is down: reclaim {who} first, or if both are gone \
                 for good run 'meshctl rmpeer --force {name}'"
            ));
        }
        if coordinator == self.me {
            let entries = self.decide(self.me, dead, force)?;
            return Ok(ReclaimStart::Done {
                addresses: total_size(&entries),
            });
        }
        if self.is_up(dead) {
            return Err(format!("{name} is alive as far as this node can tell; rmpeer is for peers that are gone for good"));
        }
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.reclaims.push(PendingReclaim {
            id,
            dead,
            deadline: now + RECLAIM_TIMEOUT,
        });
        self.send(coordinator, IpamMessage::ReclaimRequest { id, dead, force });
        Ok(ReclaimStart::Asked { id, coordinator })
    }

    /// The coordinator's decision: moves `dead`'s blocks to `to`, stores and floods it.
    fn decide(&mut self, to: PeerId, dead: PeerId, force: bool) -> Result<Vec<RingEntry>, String> {
        self.move_blocks(to, dead, Some(force))
    }

    /// A sole writer's decision for a peer that owns every anchor (checked by the caller):
    /// its blocks move here, with no coordinator.
    fn decide_alone(&mut self, dead: PeerId) -> Result<Vec<RingEntry>, String> {
        self.move_blocks(self.me, dead, None)
    }

    /// `as_coordinator`: `Some(force)` checks that this node coordinates `dead`'s reclaim.
    fn move_blocks(
        &mut self,
        to: PeerId,
        dead: PeerId,
        as_coordinator: Option<bool>,
    ) -> Result<Vec<RingEntry>, String> {
        let dead_name = self.name_of(dead);
        // First: a peer that owns nothing was already reclaimed (perhaps a moment ago, which
        // can also have moved the coordinator role along with an anchor block).
        let blocks: Vec<(Block, u64)> = self
            .ring
            .iter()
            .filter(|(_, o)| o.owner == dead)
            .map(|(b, o)| (b, o.version))
            .collect();
        if blocks.is_empty() {
            return Err(format!(
                "{dead_name} owns no address space: it was already reclaimed"
            ));
        }
        if let Some(force) = as_coordinator {
            if self.coordinator_for(dead, force) != Some(self.me) {
                return Err(format!("this node is not the reclaim coordinator for {dead_name}; retry once the ring has settled"));
            }
        }
        if self.is_up(dead) {
            return Err(format!("{dead_name} is alive as far as the coordinator can tell; rmpeer is for peers that are gone for good"));
        }
        if to != self.me && !self.is_up(to) {
            return Err("the requesting node is not reachable from the coordinator".into());
        }
        let entries: Vec<RingEntry> = blocks
            .iter()
            .map(|(b, v)| RingEntry {
                start: b.start,
                prefix: b.prefix,
                owner: to,
                version: v + 1,
            })
            .collect();
        for e in &entries {
            // Entries come from our own ring: valid by construction.
            let _ = self.ring.merge(e);
        }
        // Stored before the answer or any delta leaves.
        self.out
            .push(IpamOutput::Persist(IpamWrite::Ring(self.ring.entries())));
        self.out
            .push(IpamOutput::Event(IpamEvent::Reclaimed { id: 0, dead, to }));
        self.ensure_gateway();
        self.flood(Some(to), entries.clone());
        Ok(entries)
    }

    pub(super) fn on_reclaim_request(&mut self, from: PeerId, id: u64, dead: PeerId, force: bool) {
        match self.decide(from, dead, force) {
            Ok(entries) => self.send(from, IpamMessage::ReclaimGranted { id, entries }),
            Err(reason) => self.send(from, IpamMessage::ReclaimRefused { id, reason }),
        }
    }

    pub(super) fn on_reclaim_answer(
        &mut self,
        now: Instant,
        from: PeerId,
        id: u64,
        result: Result<Vec<RingEntry>, String>,
    ) {
        let Some(pos) = self.reclaims.iter().position(|r| r.id == id) else {
            return;
        };
        let pending = self.reclaims.remove(pos);
        match result {
            Ok(entries) => {
                self.merge_entries(now, from, &entries);
                self.out.push(IpamOutput::Event(IpamEvent::Reclaimed {
                    id,
                    dead: pending.dead,
                    to: self.me,
                }));
            }
            Err(reason) => self
                .out
                .push(IpamOutput::Event(IpamEvent::ReclaimRefused { id, reason })),
        }
    }

    pub(super) fn expire_reclaims(&mut self, now: Instant) {
        let (expired, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reclaims)
            .into_iter()
            .partition(|r| now >= r.deadline);
        self.reclaims = keep;
        for r in expired {
            let reason = "the reclaim coordinator did not answer in time; try again".to_string();
            self.out.push(IpamOutput::Event(IpamEvent::ReclaimRefused {
                id: r.id,
                reason,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{InitMode, IpamConfig, IpamCore, IpamInput, PeerInfo, Restored};
    use super::*;
    use mesh_proto::ipam::IpamMessage;

    fn peers(up: [bool; 3]) -> Vec<PeerInfo> {
        ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| PeerInfo {
                id: PeerId(i as u64 + 1),
                name: n.to_string(),
                up: up[i],
            })
            .collect()
    }

    /// A node outside the seed list owns nothing after the split; with `claim_space` it
    /// asks a peer for space on its next timer, without waiting for a first allocation.
    #[test]
    fn a_joining_node_claims_space_before_its_first_pod() {
        let t0 = Instant::now();
        let range: Block = "10.32.0.0/24".parse().unwrap();
        for claim in [false, true] {
            let mut cfg = IpamConfig::new(
                range,
                InitMode::Seed(vec!["a".into(), "b".into(), "c".into()]),
            );
            cfg.claim_space = claim;
            let mut d = IpamCore::new(cfg, PeerId(4), "d", Restored::default(), t0)
                .expect("a consistent restored state");
            let mut all = peers([true; 3]);
            all.push(PeerInfo {
                id: PeerId(4),
                name: "d".into(),
                up: true,
            });
            d.handle(
                t0,
                IpamInput::Topology {
                    peers: all,
                    neighbours: vec![PeerId(1)],
                },
            );
            assert!(d.ring().is_split() && d.ring().blocks_of(PeerId(4)).is_empty());
            let out = d.handle(t0 + std::time::Duration::from_secs(1), IpamInput::Timer);
            let asked = out.iter().any(|o| {
                matches!(
                    o,
                    IpamOutput::Send {
                        msg: IpamMessage::SpaceRequest { .. },
                        ..
                    }
                )
            });
            assert_eq!(asked, claim, "claim_space = {claim}");
        }
    }

    #[test]
    fn two_dead_coordinators_need_force_and_then_one_node_takes_over() {
        let t0 = Instant::now();
        let range: Block = "10.32.0.0/24".parse().unwrap();
        let mut cfg = IpamConfig::new(
            range,
            InitMode::Seed(vec!["a".into(), "b".into(), "c".into()]),
        );
        cfg.min_prefix = 28;
        let mut b = IpamCore::new(cfg, PeerId(2), "b", Restored::default(), t0)
            .expect("a consistent restored state");
        b.handle(
            t0,
            IpamInput::Topology {
                peers: peers([true; 3]),
                neighbours: vec![PeerId(1), PeerId(3)],
            },
        );
        assert!(b.ring().is_split());
        // a and c hold the first and last anchors; both die.
        b.handle(
            t0,
            IpamInput::Topology {
                peers: peers([false, true, false]),
                neighbours: vec![],
            },
        );
        let (r, _) = b.reclaim(t0, "a", ReclaimMode::Coordinated);
        let err = r.unwrap_err();
        assert!(err.contains("--force"), "{err}");
        // The Lease holder never skips a coordinator it merely sees down.
        let (r, _) = b.reclaim(t0, "a", ReclaimMode::SoleWriter);
        assert!(r.unwrap_err().contains("down"));
        let (r, out) = b.reclaim(t0, "a", ReclaimMode::Forced);
        assert!(matches!(r, Ok(ReclaimStart::Done { .. })), "{r:?}");
        assert!(
            matches!(out.first(), Some(IpamOutput::Persist(_))),
            "the decision is stored first"
        );
        assert!(b.ring().blocks_of(PeerId(1)).is_empty());
        let (r, _) = b.reclaim(t0, "a", ReclaimMode::Forced);
        assert!(r.unwrap_err().contains("already reclaimed"));
    }

    /// The elected first splitter (`--kube`) owns every anchor, so no other peer can
    /// coordinate its reclaim. A plain rmpeer is refused with the way out; the Lease holder
    /// (or `--force`) decides on its own ring, stores first, and a second reclaim finds
    /// nothing left. A remote request never makes a node decide alone.
    #[test]
    fn a_peer_owning_every_anchor_is_reclaimed_by_the_sole_writer() {
        let t0 = Instant::now();
        let range: Block = "10.32.0.0/24".parse().unwrap();
        let mut a = IpamCore::new(
            IpamConfig::new(range, InitMode::Elected),
            PeerId(1),
            "a",
            Restored::default(),
            t0,
        )
        .expect("a consistent restored state");
        let mut b = IpamCore::new(
            IpamConfig::new(range, InitMode::Elected),
            PeerId(2),
            "b",
            Restored::default(),
            t0,
        )
        .expect("a consistent restored state");
        let two = |up_a: bool| {
            vec![
                PeerInfo {
                    id: PeerId(1),
                    name: "a".into(),
                    up: up_a,
                },
                PeerInfo {
                    id: PeerId(2),
                    name: "b".into(),
                    up: true,
                },
            ]
        };
        a.handle(
            t0,
            IpamInput::Topology {
                peers: two(true),
                neighbours: vec![PeerId(2)],
            },
        );
        assert!(a.split_elected(t0).0.is_ok());
        b.handle(
            t0,
            IpamInput::Message {
                from: PeerId(1),
                msg: IpamMessage::Entries {
                    entries: a.ring().entries(),
                },
            },
        );
        assert_eq!(
            b.ring().blocks_of(PeerId(1)).len(),
            a.ring().blocks_of(PeerId(1)).len()
        );
        assert_eq!(b.coordinator_for(PeerId(1), false), None);
        b.handle(
            t0,
            IpamInput::Topology {
                peers: two(false),
                neighbours: vec![],
            },
        );
        let (r, _) = b.reclaim(t0, "a", ReclaimMode::Coordinated);
        let err = r.unwrap_err();
        assert!(
            err.contains("every anchor") && err.contains("--force"),
            "{err}"
        );
        let out = b.handle(
            t0,
            IpamInput::Message {
                from: PeerId(3),
                msg: IpamMessage::ReclaimRequest {
                    id: 1,
                    dead: PeerId(1),
                    force: true,
                },
            },
        );
        assert!(
            out.iter().any(|o| matches!(
                o,
                IpamOutput::Send {
                    msg: IpamMessage::ReclaimRefused { .. },
                    ..
                }
            )),
            "a forced remote request is refused by a node that coordinates nothing: {out:?}"
        );
        assert!(b.ring().blocks_of(PeerId(3)).is_empty());
        let (r, out) = b.reclaim(t0, "a", ReclaimMode::SoleWriter);
        assert_eq!(
            r,
            Ok(ReclaimStart::Done {
                addresses: range.size()
            })
        );
        assert!(
            matches!(out.first(), Some(IpamOutput::Persist(_))),
            "the decision is stored first: {out:?}"
        );
        assert!(b.ring().blocks_of(PeerId(1)).is_empty());
        let (r, _) = b.reclaim(t0, "a", ReclaimMode::Forced);
        assert!(r.unwrap_err().contains("already reclaimed"));
    }
}
