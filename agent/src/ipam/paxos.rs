//! Single-decree Paxos for the first split (`--ipalloc-init consensus=N`).
//!
//! Every peer is acceptor and (when it is its turn) proposer. The value is the set of peer
//! ids the range is split among; the ring is a pure function of it, so any two peers that
//! learn the decision build the identical ring. Quorum is a majority of N, the number of
//! initial peers, or of the peers the proposer knows if that is more: two isolated groups
//! can never both reach it. Messages carry N; a peer configured with another N is not
//! counted (the caller reports it). Acceptor state must be stored before the
//! answer leaves (the caller persists `AcceptorState` when `handle` says so).

use std::collections::{BTreeMap, BTreeSet};

use mesh_proto::ipam::{Ballot, PaxosMessage};
use mesh_proto::PeerId;
use serde::{Deserialize, Serialize};

/// What an acceptor promised and accepted; durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptorState {
    pub promised: Option<Ballot>,
    pub accepted: Option<(Ballot, Vec<PeerId>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Preparing {
        promises: BTreeMap<PeerId, Option<(Ballot, Vec<PeerId>)>>,
    },
    Accepting {
        value: Vec<PeerId>,
        accepted: BTreeSet<PeerId>,
    },
}

/// Replies and decisions from one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub send: Vec<(PeerId, PaxosMessage)>,
    /// The acceptor state changed: store it before sending `send`.
    pub persist: Option<AcceptorState>,
    pub decided: Option<Vec<PeerId>>,
    /// The sender runs with another `consensus=N` (theirs); its message was ignored.
    pub mismatched_n: Option<u32>,
}

/// Ballot rounds at or above this are treated as corrupt input.
const MAX_ROUND: u64 = u64::MAX / 2;

pub struct Paxos {
    me: PeerId,
    n: u32,
    /// Majority needed by the round in progress.
    quorum: usize,
    acceptor: AcceptorState,
    ballot: Ballot,
    phase: Phase,
}

impl Paxos {
    pub fn new(me: PeerId, initial_peers: usize, acceptor: AcceptorState) -> Paxos {
        let round = acceptor.promised.map_or(0, |b| b.round);
        let n = u32::try_from(initial_peers.max(1)).unwrap_or(u32::MAX);
        Paxos {
            me,
            n,
            quorum: initial_peers.max(1) / 2 + 1,
            acceptor,
            ballot: Ballot {
                round,
                proposer: me,
            },
            phase: Phase::Idle,
        }
    }

    /// The smallest number of peers a round needs (a majority of N).
    pub fn quorum(&self) -> usize {
        self.n as usize / 2 + 1
    }

    pub fn is_proposing(&self) -> bool {
        self.phase != Phase::Idle
    }

    /// Starts (or restarts) a round with a ballot above anything seen, proposing `value`
    /// unless an earlier accepted value must win. Sends `Prepare` to `peers` (self included).
    pub fn propose(&mut self, peers: &[PeerId]) -> Step {
        let seen = self
            .acceptor
            .promised
            .map_or(0, |b| b.round)
            .max(self.ballot.round);
        self.ballot = Ballot {
            round: seen.saturating_add(1).min(MAX_ROUND),
            proposer: self.me,
        };
        self.phase = Phase::Preparing {
            promises: BTreeMap::new(),
        };
        // A majority of N, or of everyone we can see if more peers turned up than N says.
        self.quorum = (self.n as usize).max(peers.len()) / 2 + 1;
        let mut step = Step::default();
        for p in peers {
            let msg = PaxosMessage::Prepare {
                ballot: self.ballot,
                n: self.n,
            };
            step.send.push((*p, msg));
        }
        step
    }

    /// Handles one message; `value_if_free` is what we propose when no value was accepted.
    pub fn handle(
        &mut self,
        from: PeerId,
        msg: PaxosMessage,
        peers: &[PeerId],
        value_if_free: &[PeerId],
    ) -> Step {
        let mut step = Step::default();
        let (ballot_round, their_n) = match &msg {
            PaxosMessage::Prepare { ballot, n } => (ballot.round, Some(*n)),
            PaxosMessage::Accept { ballot, n, .. } => (ballot.round, Some(*n)),
            PaxosMessage::Promise { ballot, .. }
            | PaxosMessage::Accepted { ballot }
            | PaxosMessage::Reject { ballot, .. } => (ballot.round, None),
        };
        if ballot_round >= MAX_ROUND {
            return step;
        }
        if let Some(n) = their_n.filter(|n| *n != self.n) {
            step.mismatched_n = Some(n);
            return step;
        }
        match msg {
            PaxosMessage::Prepare { ballot, .. } => {
                if self.acceptor.promised.is_none_or(|p| ballot > p) {
                    self.acceptor.promised = Some(ballot);
                    step.persist = Some(self.acceptor.clone());
                    step.send.push((
                        from,
                        PaxosMessage::Promise {
                            ballot,
                            accepted: self.acceptor.accepted.clone(),
                        },
                    ));
                } else if let Some(promised) = self.acceptor.promised {
                    step.send
                        .push((from, PaxosMessage::Reject { ballot, promised }));
                }
            }
            PaxosMessage::Accept { ballot, value, .. } => {
                if self.acceptor.promised.is_none_or(|p| ballot >= p) {
                    self.acceptor.promised = Some(ballot);
                    self.acceptor.accepted = Some((ballot, value));
                    step.persist = Some(self.acceptor.clone());
                    step.send.push((from, PaxosMessage::Accepted { ballot }));
                } else if let Some(promised) = self.acceptor.promised {
                    step.send
                        .push((from, PaxosMessage::Reject { ballot, promised }));
                }
            }
            PaxosMessage::Promise { ballot, accepted } if ballot == self.ballot => {
                if let Phase::Preparing { promises } = &mut self.phase {
                    promises.insert(from, accepted);
                    if promises.len() >= self.quorum {
                        // Paxos' rule: the highest accepted value among the quorum wins.
                        let value = promises
                            .values()
                            .flatten()
                            .max_by_key(|(b, _)| *b)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_else(|| value_if_free.to_vec());
                        self.phase = Phase::Accepting {
                            value: value.clone(),
                            accepted: BTreeSet::new(),
                        };
                        for p in peers {
                            step.send.push((
                                *p,
                                PaxosMessage::Accept {
                                    ballot,
                                    value: value.clone(),
                                    n: self.n,
                                },
                            ));
                        }
                    }
                }
            }
            PaxosMessage::Accepted { ballot } if ballot == self.ballot => {
                if let Phase::Accepting { value, accepted } = &mut self.phase {
                    accepted.insert(from);
                    if accepted.len() >= self.quorum {
                        step.decided = Some(value.clone());
                        self.phase = Phase::Idle;
                    }
                }
            }
            PaxosMessage::Reject { ballot, promised } if ballot == self.ballot => {
                // Someone is ahead: stop, and start above them next time.
                self.ballot.round = self.ballot.round.max(promised.round.min(MAX_ROUND));
                self.phase = Phase::Idle;
            }
            _ => {}
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` peers with ids 1..=n, all configured with `consensus=n`.
    fn cluster(n: u64) -> (Vec<PeerId>, Vec<Paxos>) {
        let ids: Vec<PeerId> = (1..=n).map(PeerId).collect();
        let px = ids
            .iter()
            .map(|id| Paxos::new(*id, n as usize, AcceptorState::default()))
            .collect();
        (ids, px)
    }

    /// Peer `i` proposes, then everything is delivered in FIFO order (messages to `down` are
    /// dropped); `free` is what proposers propose when nothing was accepted yet.
    fn propose_and_run(
        px: &mut [Paxos],
        i: usize,
        down: &[PeerId],
        free: &[PeerId],
    ) -> Vec<Option<Vec<PeerId>>> {
        let ids: Vec<PeerId> = px.iter().map(|p| p.me).collect();
        let step = px[i].propose(&ids);
        let mut queue: std::collections::VecDeque<_> = step
            .send
            .into_iter()
            .map(|(to, m)| (ids[i], to, m))
            .collect();
        let mut decided = vec![None; px.len()];
        while let Some((from, to, msg)) = queue.pop_front() {
            if down.contains(&to) {
                continue;
            }
            let k = ids.iter().position(|x| *x == to).unwrap();
            let step = px[k].handle(from, msg, &ids, free);
            if let Some(v) = step.decided {
                decided[k] = Some(v);
            }
            queue.extend(step.send.into_iter().map(|(dst, m)| (to, dst, m)));
        }
        decided
    }

    #[test]
    fn one_proposer_decides_its_value() {
        let (ids, mut px) = cluster(3);
        let decided = propose_and_run(&mut px, 0, &[], &ids);
        assert_eq!(decided[0], Some(ids.clone()));
    }

    #[test]
    fn a_later_proposer_must_keep_an_accepted_value() {
        let (ids, mut px) = cluster(3);
        // Peer 1 gets value [1, 2] accepted by a quorum, then goes quiet.
        let small = vec![PeerId(1), PeerId(2)];
        let decided = propose_and_run(&mut px, 0, &[], &small);
        assert_eq!(decided[0], Some(small.clone()));
        // Peer 3 proposes everything it knows; it must still decide [1, 2].
        let decided = propose_and_run(&mut px, 2, &[PeerId(1)], &ids);
        assert_eq!(decided[2], Some(small));
    }

    #[test]
    fn no_quorum_no_decision() {
        let (ids, mut px) = cluster(5);
        let decided = propose_and_run(&mut px, 0, &[PeerId(3), PeerId(4), PeerId(5)], &ids);
        assert!(decided.iter().all(Option::is_none));
    }

    #[test]
    fn votes_from_a_peer_with_another_n_and_absurd_ballots_are_ignored() {
        let mut a = Paxos::new(PeerId(1), 3, AcceptorState::default());
        let ids = [PeerId(1), PeerId(2)];
        let prepare = PaxosMessage::Prepare {
            ballot: Ballot {
                round: 1,
                proposer: PeerId(2),
            },
            n: 5,
        };
        let step = a.handle(PeerId(2), prepare, &ids, &ids);
        assert_eq!(step.mismatched_n, Some(5));
        assert!(step.send.is_empty() && step.persist.is_none());
        let absurd = PaxosMessage::Prepare {
            ballot: Ballot {
                round: u64::MAX,
                proposer: PeerId(2),
            },
            n: 3,
        };
        let step = a.handle(PeerId(2), absurd, &ids, &ids);
        assert!(step.send.is_empty() && step.persist.is_none());
        // Proposing still works afterwards.
        assert!(!a.propose(&ids).send.is_empty());
    }
}
