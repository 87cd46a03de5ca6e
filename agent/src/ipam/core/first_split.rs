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
            // Only `split_elected` splits.
            InitMode::Elected => {}
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

    /// The elected writer's first split (`InitMode::Elected`): the whole range to this
    /// node, stored before anyone hears of it; the others ask it for space. Refused once a
    /// ring exists (ours, or one learnt by gossip), so a repeated call is harmless.
    pub fn split_elected(&mut self, now: Instant) -> (Result<u64, String>, Vec<IpamOutput>) {
        let result = if self.cfg.init != InitMode::Elected {
            Err("this node's first split is not by election (--ipalloc-init was given)".into())
        } else if self.ring.is_split() {
            Err("the range is already split".into())
        } else {
            let ring = RangeRing::initial_split(self.cfg.range, self.cfg.min_prefix, &[self.me]);
            self.merge_entries(now, self.me, &ring.entries());
            Ok(self.cfg.range.size())
        };
        (result, std::mem::take(&mut self.out))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use mesh_proto::PeerId;

    use crate::ipam::block::Block;
    use crate::ipam::core::{
        InitMode, IpamConfig, IpamCore, IpamInput, IpamOutput, PeerInfo, Restored,
    };

    fn peers(n: u64) -> Vec<PeerInfo> {
        (1..=n)
            .map(|i| PeerInfo {
                id: PeerId(i),
                name: format!("n{i}"),
                up: true,
            })
            .collect()
    }

    /// `InitMode::Elected` (Kubernetes): no split however long the timers run, until the
    /// elected writer calls `split_elected`; then the whole range is its own, the ring is
    /// stored (a write comes out before anything else), and a second call is refused.
    #[test]
    fn elected_mode_splits_only_when_told_and_only_once() {
        let t0 = Instant::now();
        let range: Block = "10.32.0.0/16".parse().unwrap();
        let mut a = IpamCore::new(
            IpamConfig::new(range, InitMode::Elected),
            PeerId(1),
            "n1",
            Restored::default(),
            t0,
        )
        .expect("a consistent restored state");
        a.handle(
            t0,
            IpamInput::Topology {
                peers: peers(3),
                neighbours: vec![PeerId(2), PeerId(3)],
            },
        );
        for s in 1..60 {
            a.handle(t0 + Duration::from_secs(s), IpamInput::Timer);
        }
        assert!(
            !a.ring().is_split(),
            "an elected-mode node never splits on its own"
        );
        assert!(a.status().contains("elected leader"), "{}", a.status());

        let (result, out) = a.split_elected(t0 + Duration::from_secs(61));
        assert_eq!(result, Ok(range.size()));
        assert!(a.ring().is_split());
        assert_eq!(
            a.ring()
                .blocks_of(PeerId(1))
                .iter()
                .map(|b| b.size())
                .sum::<u64>(),
            range.size()
        );
        let first_persist = out.iter().position(|o| matches!(o, IpamOutput::Persist(_)));
        let first_send = out
            .iter()
            .position(|o| matches!(o, IpamOutput::Send { .. }));
        assert!(first_persist.is_some(), "the new ring is stored: {out:?}");
        assert!(
            first_send.is_none_or(|s| Some(s) > first_persist),
            "stored before it is sent: {out:?}"
        );
        let (again, _) = a.split_elected(t0 + Duration::from_secs(62));
        assert!(again.is_err());

        // A node not configured for election refuses.
        let mut b = IpamCore::new(
            IpamConfig::new(range, InitMode::Consensus(3)),
            PeerId(2),
            "n2",
            Restored::default(),
            t0,
        )
        .expect("a consistent restored state");
        assert!(b.split_elected(t0).0.is_err());
    }
}
