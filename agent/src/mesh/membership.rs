//! The membership view: what this peer believes about every peer it knows, itself included.
//!
//! Owns the merge rules and nothing else (no timers, no messages). Record content merges by
//! `(incarnation, version)`; liveness claims merge by SWIM's order `(incarnation, rank)`.
//! The two merge independently so that a stale suspicion cannot roll content back, and a
//! record of incarnation `i` implies the claim `Alive{i}`.

use std::collections::BTreeMap;
use std::time::Instant;

use mesh_proto::gossip::{DigestEntry, Liveness, LivenessClaim, MemberUpdate};
use mesh_proto::{PeerId, PeerRecord};

/// One known peer.
#[derive(Clone, Debug)]
pub struct Member {
    pub record: PeerRecord,
    pub liveness: LivenessClaim,
    /// When this view last changed the member's liveness state.
    pub liveness_since: Instant,
}

impl Member {
    pub fn update(&self) -> MemberUpdate {
        MemberUpdate {
            record: self.record.clone(),
            liveness: self.liveness,
        }
    }

    pub fn digest_entry(&self) -> DigestEntry {
        DigestEntry {
            id: self.record.id,
            incarnation: self.record.incarnation,
            version: self.record.version,
            liveness: self.liveness,
        }
    }

    pub fn is_up(&self) -> bool {
        !self.liveness.state.is_down()
    }
}

/// What a merge changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    pub content: bool,
    /// `Some((old, new))` when the liveness state (not just its incarnation) changed.
    pub state_change: Option<(Option<Liveness>, Liveness)>,
    pub liveness: bool,
}

impl MergeOutcome {
    pub fn changed(&self) -> bool {
        self.content || self.liveness
    }
}

/// How a remote digest entry compares with our view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// We lack it, or it is newer in content or liveness: pull it.
    TheirsNewer,
    /// Ours is newer: push it.
    OursNewer,
    Same,
    /// Newer in one respect and older in the other: exchange both ways.
    Diverged,
    /// Unknown to us and down: not worth learning (see `merge`).
    Ignorable,
}

pub struct Membership {
    me: PeerId,
    members: BTreeMap<PeerId, Member>,
}

/// The claim implied by the update: at least `Alive` at the record's incarnation.
fn effective_claim(update: &MemberUpdate) -> LivenessClaim {
    let implied = LivenessClaim {
        state: Liveness::Alive,
        incarnation: update.record.incarnation,
    };
    if update.liveness.key() >= implied.key() {
        update.liveness
    } else {
        implied
    }
}

impl Membership {
    pub fn new(own: PeerRecord, now: Instant) -> Self {
        let me = own.id;
        let liveness = LivenessClaim {
            state: Liveness::Alive,
            incarnation: own.incarnation,
        };
        let mut members = BTreeMap::new();
        members.insert(
            me,
            Member {
                record: own,
                liveness,
                liveness_since: now,
            },
        );
        Membership { me, members }
    }

    pub fn me(&self) -> PeerId {
        self.me
    }

    pub fn own(&self) -> &Member {
        // The own entry is inserted in `new` and never removed (`forget` skips it).
        &self.members[&self.me]
    }

    /// Replaces our own record (the caller bumped its version or incarnation).
    pub fn set_own(&mut self, record: PeerRecord) {
        let liveness = LivenessClaim {
            state: Liveness::Alive,
            incarnation: record.incarnation,
        };
        if let Some(m) = self.members.get_mut(&self.me) {
            m.record = record;
            m.liveness = liveness;
        }
    }

    pub fn get(&self, id: &PeerId) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Peers (not us) that are alive or suspect, in id order.
    pub fn up_peers(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(move |m| m.record.id != self.me && m.is_up())
    }

    /// Merges an update about another peer. Updates about ourselves must go to the caller's
    /// refutation logic instead; they are ignored here.
    ///
    /// An unknown peer whose claim is dead or left is not learned: remembering it would only
    /// restart its retention clock, and the peers that knew it already keep it as dead.
    pub fn merge(&mut self, update: &MemberUpdate, now: Instant) -> MergeOutcome {
        let id = update.record.id;
        if id == self.me {
            return MergeOutcome::default();
        }
        let claim = effective_claim(update);
        match self.members.get_mut(&id) {
            None => {
                if claim.state.is_down() {
                    return MergeOutcome::default();
                }
                self.members.insert(
                    id,
                    Member {
                        record: update.record.clone(),
                        liveness: claim,
                        liveness_since: now,
                    },
                );
                MergeOutcome {
                    content: true,
                    liveness: true,
                    state_change: Some((None, claim.state)),
                }
            }
            Some(m) => {
                let mut out = MergeOutcome::default();
                if update.record.content_key() > m.record.content_key() {
                    m.record = update.record.clone();
                    out.content = true;
                }
                if claim.key() > m.liveness.key() {
                    if claim.state != m.liveness.state {
                        out.state_change = Some((Some(m.liveness.state), claim.state));
                        m.liveness_since = now;
                    }
                    m.liveness = claim;
                    out.liveness = true;
                }
                out
            }
        }
    }

    /// Sets a liveness claim we made ourselves (probe failure, suspicion timeout).
    /// Returns the previous state when it changed.
    pub fn claim(&mut self, id: PeerId, claim: LivenessClaim, now: Instant) -> Option<Liveness> {
        let m = self.members.get_mut(&id)?;
        if id == self.me || claim.key() <= m.liveness.key() {
            return None;
        }
        let old = m.liveness.state;
        m.liveness = claim;
        if old != claim.state {
            m.liveness_since = now;
        }
        Some(old)
    }

    /// Compares a remote digest entry with our view.
    pub fn compare(&self, entry: &DigestEntry) -> Comparison {
        let Some(m) = self.members.get(&entry.id) else {
            return if entry.liveness.state.is_down() {
                Comparison::Ignorable
            } else {
                Comparison::TheirsNewer
            };
        };
        let theirs = ((entry.incarnation, entry.version), entry.liveness.key());
        let ours = (m.record.content_key(), m.liveness.key());
        let content = theirs.0.cmp(&ours.0);
        let liveness = theirs.1.cmp(&ours.1);
        use std::cmp::Ordering::*;
        match (content, liveness) {
            (Equal, Equal) => Comparison::Same,
            (Greater | Equal, Greater | Equal) => Comparison::TheirsNewer,
            (Less | Equal, Less | Equal) => Comparison::OursNewer,
            _ => Comparison::Diverged,
        }
    }

    pub fn digest(&self) -> Vec<DigestEntry> {
        self.members.values().map(Member::digest_entry).collect()
    }

    /// A hash of the up members' keys. Down members are left out so that a peer that never
    /// knew a long-dead peer does not look out of sync forever. FNV-1a: stable across builds.
    pub fn view_hash(&self) -> (u64, u32) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut n = 0u32;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for m in self.members.values().filter(|m| m.is_up()) {
            n += 1;
            eat(m.record.id.0);
            eat(m.record.incarnation);
            eat(m.record.version);
            eat(m.liveness.incarnation);
            eat(u64::from(m.liveness.state.rank()));
        }
        (h, n)
    }

    /// Forgets down peers whose state has not changed since `cutoff`. Returns their ids.
    pub fn forget_down_before(&mut self, cutoff: Instant) -> Vec<PeerId> {
        let me = self.me;
        let gone: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| m.record.id != me && !m.is_up() && m.liveness_since <= cutoff)
            .map(|m| m.record.id)
            .collect();
        for id in &gone {
            self.members.remove(id);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::peer::Capabilities;

    fn rec(id: u64, inc: u64, ver: u64) -> PeerRecord {
        PeerRecord {
            id: PeerId(id),
            name: format!("n{id}"),
            incarnation: inc,
            version: ver,
            addresses: vec![],
            capabilities: Capabilities::default(),
            connections: vec![],
        }
    }

    fn upd(id: u64, inc: u64, ver: u64, state: Liveness, claim_inc: u64) -> MemberUpdate {
        MemberUpdate {
            record: rec(id, inc, ver),
            liveness: LivenessClaim {
                state,
                incarnation: claim_inc,
            },
        }
    }

    #[test]
    fn swim_override_order() {
        let now = Instant::now();
        let mut m = Membership::new(rec(1, 1, 0), now);
        m.merge(&upd(2, 3, 0, Liveness::Alive, 3), now);
        // Suspect at the same incarnation overrides alive.
        assert!(m.merge(&upd(2, 3, 0, Liveness::Suspect, 3), now).liveness);
        // Alive at the same incarnation does not override suspect.
        assert!(!m.merge(&upd(2, 3, 0, Liveness::Alive, 3), now).changed());
        // Dead overrides suspect; a late alive of the same incarnation cannot resurrect.
        assert!(m.merge(&upd(2, 3, 0, Liveness::Dead, 3), now).liveness);
        assert!(!m.merge(&upd(2, 3, 0, Liveness::Alive, 3), now).changed());
        assert_eq!(m.get(&PeerId(2)).unwrap().liveness.state, Liveness::Dead);
        // A restart (higher incarnation) refutes.
        let out = m.merge(&upd(2, 4, 0, Liveness::Alive, 4), now);
        assert_eq!(
            out.state_change,
            Some((Some(Liveness::Dead), Liveness::Alive))
        );
    }

    #[test]
    fn stale_suspicion_does_not_roll_content_back() {
        let now = Instant::now();
        let mut m = Membership::new(rec(1, 1, 0), now);
        m.merge(&upd(2, 3, 7, Liveness::Alive, 3), now);
        m.merge(&upd(2, 3, 5, Liveness::Suspect, 3), now);
        let got = m.get(&PeerId(2)).unwrap();
        assert_eq!(got.record.version, 7);
        assert_eq!(got.liveness.state, Liveness::Suspect);
    }

    #[test]
    fn newer_record_implies_alive() {
        let now = Instant::now();
        let mut m = Membership::new(rec(1, 1, 0), now);
        m.merge(&upd(2, 3, 0, Liveness::Dead, 3), now); // unknown + dead: ignored
        assert!(m.get(&PeerId(2)).is_none());
        m.merge(&upd(2, 3, 0, Liveness::Alive, 3), now);
        m.merge(&upd(2, 3, 0, Liveness::Dead, 3), now);
        // A record of incarnation 4 carried with an old dead claim still means alive at 4.
        m.merge(&upd(2, 4, 0, Liveness::Dead, 3), now);
        assert_eq!(m.get(&PeerId(2)).unwrap().liveness.state, Liveness::Alive);
    }

    #[test]
    fn merge_is_order_independent() {
        let now = Instant::now();
        let updates = [
            upd(2, 1, 0, Liveness::Alive, 1),
            upd(2, 1, 3, Liveness::Alive, 1),
            upd(2, 1, 2, Liveness::Suspect, 1),
            upd(2, 2, 0, Liveness::Alive, 2),
            upd(2, 1, 1, Liveness::Dead, 1),
        ];
        let mut results = Vec::new();
        for perm in [
            [0, 1, 2, 3, 4],
            [4, 3, 2, 1, 0],
            [2, 0, 4, 1, 3],
            [3, 4, 0, 2, 1],
        ] {
            let mut m = Membership::new(rec(1, 1, 0), now);
            for i in perm {
                m.merge(&updates[i], now);
            }
            let got = m.get(&PeerId(2)).unwrap();
            results.push((got.record.content_key(), got.liveness));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
    }

    #[test]
    fn digest_comparison() {
        let now = Instant::now();
        let mut m = Membership::new(rec(1, 1, 0), now);
        m.merge(&upd(2, 1, 5, Liveness::Alive, 1), now);
        let e = |inc, ver, state, ci| DigestEntry {
            id: PeerId(2),
            incarnation: inc,
            version: ver,
            liveness: LivenessClaim {
                state,
                incarnation: ci,
            },
        };
        assert_eq!(m.compare(&e(1, 5, Liveness::Alive, 1)), Comparison::Same);
        assert_eq!(
            m.compare(&e(1, 6, Liveness::Alive, 1)),
            Comparison::TheirsNewer
        );
        assert_eq!(
            m.compare(&e(1, 4, Liveness::Alive, 1)),
            Comparison::OursNewer
        );
        assert_eq!(
            m.compare(&e(1, 4, Liveness::Suspect, 1)),
            Comparison::Diverged
        );
        let unknown = DigestEntry {
            id: PeerId(9),
            ..e(1, 0, Liveness::Dead, 1)
        };
        assert_eq!(m.compare(&unknown), Comparison::Ignorable);
    }
}
