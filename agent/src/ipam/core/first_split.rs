//! The first split: `seed=` (every peer computes the same ring once it knows every seed
//! name) or `consensus=N` (Paxos on the member set; lowest id proposes first, the others
//! wait their turn and retry if a round stalls).

use std::time::{Duration, Instant};

use mesh_proto::ipam::IpamMessage;

use super::{InitMode, IpamCore, IpamOutput, IpamWrite};
use crate::ipam::paxos::Step;
use crate::ipam::ring::RangeRing;

pub(super) fn seed_hash(names: &[String]) -> u64 {
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for n in sorted {
        for b in n.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl IpamCore {
    pub(super) fn try_first_split(&mut self, now: Instant) {
        if self.ring.is_split() {
            return;
        }
        match self.cfg.init.clone() {
            InitMode::Seed(names) => {
                let mut ids = Vec::new();
                for n in &names {
                    match self.peers.iter().find(|(_, p)| &p.name == n) {
                        Some((id, _)) => ids.push(*id),
                        None => {
                            self.next_proposal = now + Duration::from_secs(1);
                            return;
                        }
                    }
                }
                let ring = RangeRing::initial_split(self.cfg.range, self.cfg.min_prefix, &ids);
                self.merge_entries(now, self.me, &ring.entries());
            }
            InitMode::Consensus(_) => {
                let up = self.up_peers();
                let Some(paxos) = self.paxos.as_ref() else {
                    return;
                };
                if up.len() < paxos.quorum() {
                    self.proposal_armed = false;
                    self.next_proposal = now + Duration::from_secs(1);
                    return;
                }
                // Lowest id first; the others wait their turn so proposers rarely duel.
                let rank = up.iter().position(|p| *p == self.me).unwrap_or(0) as u32;
                let jitter =
                    Duration::from_millis(rand::Rng::random_range(&mut self.rng, 0..500u64));
                if !self.proposal_armed {
                    self.proposal_armed = true;
                    self.next_proposal = now + Duration::from_secs(2) * rank + jitter;
                }
                if now < self.next_proposal {
                    return;
                }
                // If this round stalls (lost messages, a duel), try again later.
                self.next_proposal = now + Duration::from_secs(2) * (rank + 1) + jitter;
                if let Some(paxos) = self.paxos.as_mut() {
                    let step = paxos.propose(&up);
                    self.apply_paxos(now, step);
                }
            }
        }
    }

    pub(super) fn apply_paxos(&mut self, now: Instant, step: Step) {
        if let Some(state) = step.persist {
            self.out
                .push(IpamOutput::Persist(IpamWrite::Acceptor(state)));
        }
        for (to, m) in step.send {
            if to == self.me {
                let peers = self.up_peers();
                if let Some(paxos) = self.paxos.as_mut() {
                    let inner = paxos.handle(self.me, m, &peers, &peers);
                    self.apply_paxos(now, inner);
                }
            } else {
                self.send(to, IpamMessage::Paxos(m));
            }
        }
        if let Some(members) = step.decided {
            let ring = RangeRing::initial_split(self.cfg.range, self.cfg.min_prefix, &members);
            self.merge_entries(now, self.me, &ring.entries());
        }
    }
}
