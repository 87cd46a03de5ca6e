//! SWIM failure detection: one direct probe per period, indirect probes through `k` relays
//! when the direct ack is late, suspicion when both fail, dead when the suspicion expires.
//!
//! Probes go round-robin over the partners (neighbours and connected peers). Every up peer
//! is a ring successor of someone, so every peer is probed by somebody.

use std::collections::BTreeMap;
use std::time::Instant;

use mesh_proto::gossip::{GossipMessage, Liveness};
use mesh_proto::PeerId;
use rand::seq::{IndexedRandom, SliceRandom};

use super::core::{MeshCore, MeshEvent, Output};

/// The probe of the current period.
struct Probe {
    target: PeerId,
    seq: u64,
    /// The target's incarnation when probed: a failure suspects that incarnation.
    incarnation: u64,
    indirect_at: Instant,
    indirect_sent: bool,
    acked: bool,
}

/// A probe we run on behalf of another peer (we are its relay).
struct Relay {
    requester: PeerId,
    requester_seq: u64,
    target: PeerId,
    expires: Instant,
}

pub struct ProbeState {
    next_period: Instant,
    order: Vec<PeerId>,
    cursor: usize,
    seq: u64,
    current: Option<Probe>,
    relays: BTreeMap<u64, Relay>,
}

impl ProbeState {
    pub fn new(first_period: Instant) -> Self {
        ProbeState {
            next_period: first_period,
            order: Vec::new(),
            cursor: 0,
            seq: 0,
            current: None,
            relays: BTreeMap::new(),
        }
    }

    pub fn next_deadline(&self) -> Instant {
        let mut t = self.next_period;
        if let Some(p) = &self.current {
            if !p.acked && !p.indirect_sent {
                t = t.min(p.indirect_at);
            }
        }
        if let Some(r) = self.relays.values().map(|r| r.expires).min() {
            t = t.min(r);
        }
        t
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

impl MeshCore {
    pub(super) fn probe_timers(&mut self, now: Instant) {
        self.probe.relays.retain(|_, r| r.expires > now);
        if now >= self.probe.next_period {
            self.probe.next_period = now + self.cfg.probe_interval;
            self.finish_probe(now);
            self.start_probe(now);
        }
        let due = matches!(&self.probe.current, Some(p) if !p.acked && !p.indirect_sent && now >= p.indirect_at);
        if due {
            self.send_indirect_probes();
        }
    }

    fn finish_probe(&mut self, now: Instant) {
        let Some(p) = self.probe.current.take() else {
            return;
        };
        if p.acked {
            return;
        }
        self.out
            .push(Output::Event(MeshEvent::ProbeFailed { peer: p.target }));
        let still_alive = self.view.get(&p.target).is_some_and(|m| {
            m.liveness.state == Liveness::Alive && m.liveness.incarnation == p.incarnation
        });
        if still_alive {
            self.claim(now, p.target, Liveness::Suspect, p.incarnation);
        }
    }

    fn start_probe(&mut self, now: Instant) {
        let Some(target) = self.next_probe_target() else {
            return;
        };
        let Some(incarnation) = self.view.get(&target).map(|m| m.liveness.incarnation) else {
            return;
        };
        let seq = self.probe.next_seq();
        self.probe.current = Some(Probe {
            target,
            seq,
            incarnation,
            indirect_at: now + self.cfg.probe_timeout,
            indirect_sent: false,
            acked: false,
        });
        let updates = self.piggyback(target);
        self.send(target, GossipMessage::Ping { seq, updates });
    }

    /// Round-robin over a shuffled list of partners, reshuffled each pass.
    fn next_probe_target(&mut self) -> Option<PeerId> {
        let partners = self.partners();
        if partners.is_empty() {
            return None;
        }
        for _ in 0..2 {
            while self.probe.cursor < self.probe.order.len() {
                let candidate = self.probe.order[self.probe.cursor];
                self.probe.cursor += 1;
                if partners.binary_search(&candidate).is_ok() {
                    return Some(candidate);
                }
            }
            self.probe.order = partners.clone();
            self.probe.order.shuffle(&mut self.rng);
            self.probe.cursor = 0;
        }
        None
    }

    fn send_indirect_probes(&mut self) {
        let Some(p) = self.probe.current.as_mut() else {
            return;
        };
        p.indirect_sent = true;
        let (target, seq) = (p.target, p.seq);
        // Relays may also be peers linked to us from their side: a rare PingReq over an
        // existing link costs nothing and keeps no link alive (links close by role).
        let mut relays: Vec<PeerId> = self.partners();
        relays.extend(
            self.connected
                .keys()
                .copied()
                .filter(|id| self.view.get(id).is_some_and(|m| m.is_up())),
        );
        relays.sort_unstable();
        relays.dedup();
        relays.retain(|id| *id != target);
        let relays: Vec<PeerId> = relays
            .choose_multiple(&mut self.rng, self.cfg.indirect_probes)
            .copied()
            .collect();
        if !relays.is_empty() {
            self.out
                .push(Output::Event(MeshEvent::IndirectProbe { peer: target }));
        }
        for relay in relays {
            self.send(relay, GossipMessage::PingReq { seq, target });
        }
    }

    pub(super) fn on_ack(&mut self, from: PeerId, seq: u64) {
        if let Some(p) = self.probe.current.as_mut() {
            if p.seq == seq && p.target == from {
                p.acked = true;
                return;
            }
        }
        if let Some(relay) = self.probe.relays.remove(&seq) {
            if relay.target == from {
                let msg = GossipMessage::IndirectAck {
                    seq: relay.requester_seq,
                    target: relay.target,
                };
                self.send(relay.requester, msg);
            }
        }
    }

    pub(super) fn on_indirect_ack(&mut self, seq: u64, target: PeerId) {
        if let Some(p) = self.probe.current.as_mut() {
            if p.seq == seq && p.target == target {
                p.acked = true;
            }
        }
    }

    pub(super) fn on_ping_req(&mut self, now: Instant, from: PeerId, seq: u64, target: PeerId) {
        if target == self.me() {
            // Somebody asks us to probe ourselves: answer directly.
            self.send(from, GossipMessage::IndirectAck { seq, target });
            return;
        }
        let relay_seq = self.probe.next_seq();
        let expires = now + self.cfg.probe_interval;
        self.probe.relays.insert(
            relay_seq,
            Relay {
                requester: from,
                requester_seq: seq,
                target,
                expires,
            },
        );
        let updates = self.piggyback(target);
        self.send(
            target,
            GossipMessage::Ping {
                seq: relay_seq,
                updates,
            },
        );
    }

    pub(super) fn expire_suspicions(&mut self, now: Instant) {
        let expired: Vec<(PeerId, u64)> = self
            .suspicions
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, s)| (*id, s.incarnation))
            .collect();
        for (id, incarnation) in expired {
            self.suspicions.remove(&id);
            let still_suspect = self.view.get(&id).is_some_and(|m| {
                m.liveness.state == Liveness::Suspect && m.liveness.incarnation == incarnation
            });
            if still_suspect {
                self.claim(now, id, Liveness::Dead, incarnation);
            }
        }
    }
}
