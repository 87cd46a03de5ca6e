//! `MeshCore`: the pure state machine for membership, gossip and failure detection.
//!
//! `handle(now, input) -> Vec<Output>` and `poll_timeout()`; no sockets, no tokio, no clock
//! reads. The agent's driver feeds it connection events and frames and carries out its
//! outputs; the simulator in `tests/` runs hundreds of them in one thread.
//!
//! The probe cycle lives in `probe.rs`, anti-entropy in `anti_entropy.rs`; this file owns
//! the dispatch, delta gossip, own-record changes and the neighbour set.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mesh_proto::gossip::{GossipMessage, Liveness, LivenessClaim, MemberUpdate};
use mesh_proto::peer::{Capabilities, LinkSummary};
use mesh_proto::{PeerId, PeerRecord};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

use super::broadcast::{retransmit_limit, BroadcastQueue};
use super::config::CoreConfig;
use super::membership::{Member, Membership, MergeOutcome};
use super::neighbours;
use super::probe::ProbeState;

/// What the driver tells the core.
#[derive(Clone, Debug)]
pub enum Input {
    /// A frame of the topology channel from an authenticated peer.
    Message {
        from: PeerId,
        msg: GossipMessage,
    },
    /// A control connection finished its handshake; `record` is what the peer sent in it.
    PeerConnected {
        record: PeerRecord,
        outbound: bool,
    },
    PeerDisconnected {
        peer: PeerId,
    },
    /// `poll_timeout()` was reached.
    Timer,
    /// New data-plane capabilities for our own record.
    SetCapabilities(Capabilities),
    /// Graceful shutdown: announce that we leave.
    Leave,
}

/// What the core asks the driver to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Best effort: the driver may drop it (the protocol tolerates loss).
    Send {
        to: PeerId,
        msg: GossipMessage,
    },
    /// The peers we want persistent control connections to.
    SetNeighbours(BTreeSet<PeerId>),
    /// Our incarnation grew (refutation): store it before sending anything else.
    PersistIncarnation(u64),
    Event(MeshEvent),
}

/// Things worth a log line or a metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    StateChanged {
        peer: PeerId,
        name: String,
        from: Option<Liveness>,
        to: Liveness,
    },
    /// We were suspected or declared dead and answered with a higher incarnation.
    Refuted {
        incarnation: u64,
    },
    ProbeFailed {
        peer: PeerId,
    },
    IndirectProbe {
        peer: PeerId,
    },
    Forgotten {
        peer: PeerId,
    },
    /// Another node gossips a record with our peer id but another name.
    IdCollision {
        name: String,
        addresses: Vec<std::net::SocketAddr>,
    },
}

/// Incarnations at or above this are treated as corrupt input and never refuted.
pub const MAX_INCARNATION: u64 = u64::MAX / 2;

pub(super) struct Suspicion {
    pub incarnation: u64,
    pub deadline: Instant,
}

pub struct MeshCore {
    pub(super) cfg: CoreConfig,
    pub(super) view: Membership,
    pub(super) broadcasts: BroadcastQueue,
    /// Established control connections: peer -> we dialed it.
    pub(super) connected: BTreeMap<PeerId, bool>,
    pub(super) neighbours: BTreeSet<PeerId>,
    pub(super) rng: StdRng,
    pub(super) probe: ProbeState,
    pub(super) suspicions: BTreeMap<PeerId, Suspicion>,
    pub(super) next_gossip: Instant,
    pub(super) next_anti_entropy: Instant,
    next_sweep: Instant,
    pub(super) left: bool,
    pub(super) out: Vec<Output>,
}

impl MeshCore {
    pub fn new(cfg: CoreConfig, own: PeerRecord, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ own.id.0);
        // Spread the timers of peers started together.
        let jitter = |rng: &mut StdRng, d: Duration| d.mul_f64(rand::Rng::random::<f64>(rng));
        let next_probe = now + jitter(&mut rng, cfg.probe_interval);
        let next_gossip = now + jitter(&mut rng, cfg.gossip_interval);
        let next_anti_entropy = now + jitter(&mut rng, cfg.anti_entropy_interval);
        let mut core = MeshCore {
            probe: ProbeState::new(next_probe),
            view: Membership::new(own, now),
            broadcasts: BroadcastQueue::default(),
            connected: BTreeMap::new(),
            neighbours: BTreeSet::new(),
            rng,
            suspicions: BTreeMap::new(),
            next_gossip,
            next_anti_entropy,
            next_sweep: now + cfg.dead_retention.min(Duration::from_secs(10)),
            left: false,
            out: Vec::new(),
            cfg,
        };
        core.enqueue(core.view.me());
        core
    }

    pub fn me(&self) -> PeerId {
        self.view.me()
    }

    pub fn own_record(&self) -> &PeerRecord {
        &self.view.own().record
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.view.iter()
    }

    pub fn member(&self, id: &PeerId) -> Option<&Member> {
        self.view.get(id)
    }

    pub fn neighbours(&self) -> &BTreeSet<PeerId> {
        &self.neighbours
    }

    pub fn connected(&self) -> &BTreeMap<PeerId, bool> {
        &self.connected
    }

    /// (hash, count) of the up members' keys; equal views have equal hashes.
    pub fn view_hash(&self) -> (u64, u32) {
        self.view.view_hash()
    }

    pub fn pending_broadcasts(&self) -> usize {
        self.broadcasts.len()
    }

    /// The earliest time `handle(_, Input::Timer)` has work to do.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self
            .probe
            .next_deadline()
            .min(self.next_gossip)
            .min(self.next_anti_entropy);
        t = t.min(self.next_sweep);
        if let Some(s) = self.suspicions.values().map(|s| s.deadline).min() {
            t = t.min(s);
        }
        t
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        match input {
            Input::Message { from, msg } => self.on_message(now, from, msg),
            Input::PeerConnected { record, outbound } => self.on_connected(now, record, outbound),
            Input::PeerDisconnected { peer } => {
                if self.connected.remove(&peer).is_some() {
                    self.update_own_connections();
                }
            }
            Input::Timer => self.on_timer(now),
            Input::SetCapabilities(caps) => {
                let mut own = self.own_record().clone();
                if own.capabilities != caps {
                    own.capabilities = caps;
                    self.bump_own(own);
                }
            }
            Input::Leave => self.leave(),
        }
        std::mem::take(&mut self.out)
    }

    fn on_message(&mut self, now: Instant, from: PeerId, msg: GossipMessage) {
        match msg {
            GossipMessage::Ping { seq, updates } => {
                self.apply(now, &updates);
                let updates = self.piggyback(from);
                self.send(from, GossipMessage::Ack { seq, updates });
            }
            GossipMessage::Ack { seq, updates } => {
                self.apply(now, &updates);
                self.on_ack(from, seq);
            }
            GossipMessage::PingReq { seq, target } => self.on_ping_req(now, from, seq, target),
            GossipMessage::IndirectAck { seq, target } => self.on_indirect_ack(seq, target),
            GossipMessage::Updates { updates } => self.apply(now, &updates),
            GossipMessage::DigestSummary { hash, members } => {
                self.on_digest_summary(from, hash, members)
            }
            GossipMessage::Digest { entries } => self.on_digest(from, &entries),
            GossipMessage::Pull { ids } => self.on_pull(from, &ids),
        }
    }

    fn on_connected(&mut self, now: Instant, record: PeerRecord, outbound: bool) {
        let peer = record.id;
        if peer == self.me() {
            return;
        }
        let claim = LivenessClaim {
            state: Liveness::Alive,
            incarnation: record.incarnation,
        };
        self.apply(
            now,
            &[MemberUpdate {
                record,
                liveness: claim,
            }],
        );
        if self.connected.insert(peer, outbound) != Some(outbound) {
            self.update_own_connections();
        }
        // A fresh connection is the moment to reconcile both views in full.
        self.send_digest(peer);
    }

    fn on_timer(&mut self, now: Instant) {
        self.probe_timers(now);
        self.expire_suspicions(now);
        if now >= self.next_gossip {
            self.next_gossip = now + self.cfg.gossip_interval;
            self.gossip_deltas();
        }
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + self.cfg.anti_entropy_interval;
            self.anti_entropy_round();
        }
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_secs(10);
            if let Some(cutoff) = now.checked_sub(self.cfg.dead_retention) {
                for peer in self.view.forget_down_before(cutoff) {
                    self.broadcasts.remove(&peer);
                    self.out.push(Output::Event(MeshEvent::Forgotten { peer }));
                }
            }
        }
    }

    /// Merges gossiped updates, refutes claims about ourselves, and spreads what changed.
    pub(super) fn apply(&mut self, now: Instant, updates: &[MemberUpdate]) {
        let mut topology_changed = false;
        for u in updates {
            if u.record.id == self.me() {
                self.maybe_refute(u);
                continue;
            }
            let outcome = self.view.merge(u, now);
            if outcome.changed() {
                self.enqueue(u.record.id);
            }
            topology_changed |= self.after_state_change(now, u.record.id, outcome);
        }
        if topology_changed {
            self.recompute_neighbours();
        }
    }

    /// Keeps the suspicion timer in step with the stored claim: armed while the peer is
    /// suspect (re-armed when the suspicion moves to a newer incarnation), gone otherwise.
    fn sync_suspicion(&mut self, now: Instant, id: PeerId) {
        let suspect_at = self
            .view
            .get(&id)
            .filter(|m| m.liveness.state == Liveness::Suspect)
            .map(|m| m.liveness.incarnation);
        match suspect_at {
            None => {
                self.suspicions.remove(&id);
            }
            Some(incarnation) => {
                if self
                    .suspicions
                    .get(&id)
                    .is_none_or(|s| s.incarnation != incarnation)
                {
                    let deadline = now + self.cfg.suspicion_timeout(self.view.len());
                    self.suspicions.insert(
                        id,
                        Suspicion {
                            incarnation,
                            deadline,
                        },
                    );
                }
            }
        }
    }

    /// Reports state changes and keeps timers in step. True when the set of up peers changed.
    fn after_state_change(&mut self, now: Instant, id: PeerId, outcome: MergeOutcome) -> bool {
        if outcome.liveness {
            self.sync_suspicion(now, id);
        }
        let Some((from, to)) = outcome.state_change else {
            return false;
        };
        let Some(m) = self.view.get(&id) else {
            return false;
        };
        let name = m.record.name.clone();
        self.out.push(Output::Event(MeshEvent::StateChanged {
            peer: id,
            name,
            from,
            to,
        }));
        let was_up = from.is_some_and(|s| !s.is_down());
        let is_up = !to.is_down();
        was_up != is_up
    }

    /// Records our own claim about a peer (probe failure or suspicion timeout).
    pub(super) fn claim(&mut self, now: Instant, id: PeerId, state: Liveness, incarnation: u64) {
        let claim = LivenessClaim { state, incarnation };
        let Some(old) = self.view.claim(id, claim, now) else {
            return;
        };
        self.enqueue(id);
        let outcome = MergeOutcome {
            content: false,
            liveness: true,
            state_change: (old != state).then_some((Some(old), state)),
        };
        if self.after_state_change(now, id, outcome) {
            self.recompute_neighbours();
        }
    }

    fn maybe_refute(&mut self, u: &MemberUpdate) {
        if self.left {
            return;
        }
        let own = self.own_record();
        let accused =
            u.liveness.state != Liveness::Alive && u.liveness.incarnation >= own.incarnation;
        // A record of ourselves newer than ours comes from an earlier life whose state was lost.
        let outdated = u.record.content_key() > own.content_key();
        if !(accused || outdated) {
            return;
        }
        if u.record.name != own.name {
            // Another node runs with our id (a cloned state dir). Refuting would start an
            // endless incarnation race; say what is going on instead.
            let (name, addresses) = (u.record.name.clone(), u.record.addresses.clone());
            self.out
                .push(Output::Event(MeshEvent::IdCollision { name, addresses }));
            return;
        }
        let claimed = u.liveness.incarnation.max(u.record.incarnation);
        if claimed >= MAX_INCARNATION {
            // No honest peer gets here (one restart per second for 10^11 years); refuting
            // would wrap. Ignore the claim rather than die forever.
            return;
        }
        let incarnation = claimed + 1;
        let mut own = own.clone();
        own.incarnation = incarnation;
        own.version = 0;
        self.out.push(Output::PersistIncarnation(incarnation));
        self.out
            .push(Output::Event(MeshEvent::Refuted { incarnation }));
        self.view.set_own(own);
        self.enqueue(self.me());
    }

    fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        let own = self.view.own().record.clone();
        let update = MemberUpdate {
            liveness: LivenessClaim {
                state: Liveness::Left,
                incarnation: own.incarnation,
            },
            record: own,
        };
        let targets: Vec<PeerId> = self.connected.keys().copied().collect();
        for to in targets {
            self.send(
                to,
                GossipMessage::Updates {
                    updates: vec![update.clone()],
                },
            );
        }
    }

    fn update_own_connections(&mut self) {
        let mut own = self.own_record().clone();
        own.connections = self
            .connected
            .iter()
            .map(|(peer, outbound)| LinkSummary {
                peer: *peer,
                outbound: *outbound,
            })
            .collect();
        self.bump_own(own);
    }

    fn bump_own(&mut self, mut own: PeerRecord) {
        own.version += 1;
        self.view.set_own(own);
        self.enqueue(self.me());
    }

    pub(super) fn enqueue(&mut self, id: PeerId) {
        let limit = retransmit_limit(self.cfg.retransmit_mult, self.view.len());
        self.broadcasts.enqueue(id, limit);
    }

    fn recompute_neighbours(&mut self) {
        let candidates: Vec<PeerId> = self.view.up_peers().map(|m| m.record.id).collect();
        let chosen = neighbours::choose(
            self.me(),
            &candidates,
            self.cfg.ring_neighbours,
            self.cfg.random_neighbours,
        );
        if chosen != self.neighbours {
            self.neighbours = chosen.clone();
            self.out.push(Output::SetNeighbours(chosen));
        }
    }

    /// Peers we probe and gossip with: our chosen neighbours that are up. Links that other
    /// peers dialed to us, and on-demand links, are not partners: using them would make the
    /// far end's unneeded link look busy, and it would be closed and re-dialed forever. The
    /// neighbour choice alone is strongly connected (every peer has ring successors), and
    /// every peer is probed by its ring predecessors.
    pub(super) fn partners(&self) -> Vec<PeerId> {
        self.neighbours
            .iter()
            .copied()
            .filter(|id| self.view.get(id).is_some_and(Member::is_up))
            .collect()
    }

    fn gossip_deltas(&mut self) {
        if self.broadcasts.is_empty() {
            return;
        }
        let partners = self.partners();
        let fanout = self.cfg.fanout(self.view.len()).min(partners.len());
        let targets: Vec<PeerId> = partners
            .choose_multiple(&mut self.rng, fanout)
            .copied()
            .collect();
        for to in targets {
            let ids = self.broadcasts.take(self.cfg.max_updates_per_message);
            if ids.is_empty() {
                break;
            }
            let updates = self.updates_for(&ids);
            self.send(to, GossipMessage::Updates { updates });
        }
    }

    /// Updates to piggyback on a probe or ack to `to`. A suspected target hears about its
    /// own suspicion first, so it can refute at once (Lifeguard's buddy system).
    pub(super) fn piggyback(&mut self, to: PeerId) -> Vec<MemberUpdate> {
        let mut ids = Vec::new();
        if self
            .view
            .get(&to)
            .is_some_and(|m| m.liveness.state == Liveness::Suspect)
        {
            ids.push(to);
        }
        ids.extend(self.broadcasts.take(self.cfg.piggyback_updates));
        ids.dedup();
        self.updates_for(&ids)
    }

    pub(super) fn updates_for(&self, ids: &[PeerId]) -> Vec<MemberUpdate> {
        ids.iter()
            .filter_map(|id| self.view.get(id))
            .map(Member::update)
            .collect()
    }

    pub(super) fn send(&mut self, to: PeerId, msg: GossipMessage) {
        if to != self.me() {
            self.out.push(Output::Send { to, msg });
        }
    }
}
