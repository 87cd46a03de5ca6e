//! Single-decree Paxos for the first split (`--ipalloc-init consensus=N`).
//!
//! Every peer is acceptor and (when it is its turn) proposer. The value is the set of peer
//! ids the range is split among; the ring is a pure function of it, so any two peers that
//! learn the decision build the identical ring. Quorum is `N/2 + 1` of the N initial peers:
//! two isolated groups can never both reach it. Acceptor state must be stored before the
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
}

pub struct Paxos {
    me: PeerId,
    quorum: usize,
    acceptor: AcceptorState,
    ballot: Ballot,
    phase: Phase,
}

impl Paxos {
    pub fn new(me: PeerId, initial_peers: usize, acceptor: AcceptorState) -> Paxos {
        let round = acceptor.promised.map_or(0, |b| b.round);
        Paxos {
            me,
            quorum: initial_peers / 2 + 1,
            acceptor,
            ballot: Ballot {
                round,
                proposer: me,
            },
            phase: Phase::Idle,
        }
    }

    pub fn quorum(&self) -> usize {
        self.quorum
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
            round: seen + 1,
            proposer: self.me,
        };
        self.phase = Phase::Preparing {
            promises: BTreeMap::new(),
        };
        let mut step = Step::default();
        for p in peers {
            step.send.push((
                *p,
                PaxosMessage::Prepare {
                    ballot: self.ballot,
                },
            ));
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
        match msg {
            PaxosMessage::Prepare { ballot } => {
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
            PaxosMessage::Accept { ballot, value } => {
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
                self.ballot.round = self.ballot.round.max(promised.round);
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

    /// Delivers everything in FIFO order among `n` peers, dropping messages to `down`.
    fn run(
        paxos: &mut [Paxos],
        first: Vec<(PeerId, PeerId, PaxosMessage)>,
        down: &[PeerId],
    ) -> Vec<Option<Vec<PeerId>>> {
        let ids: Vec<PeerId> = paxos.iter().map(|p| p.me).collect();
        let mut decided = vec![None; paxos.len()];
        let mut queue: std::collections::VecDeque<_> = first.into();
        while let Some((from, to, msg)) = queue.pop_front() {
            if down.contains(&to) {
                continue;
            }
            let i = ids.iter().position(|x| *x == to).unwrap();
            let step = paxos[i].handle(from, msg, &ids, &ids);
            if let Some(v) = step.decided {
                decided[i] = Some(v);
            }
            queue.extend(step.send.into_iter().map(|(dst, m)| (to, dst, m)));
        }
        decided
    }

    #[test]
    fn one_proposer_decides_its_value() {
        let ids: Vec<PeerId> = (1..=3).map(PeerId).collect();
        let mut px: Vec<Paxos> = ids
            .iter()
            .map(|id| Paxos::new(*id, 3, AcceptorState::default()))
            .collect();
        let step = px[0].propose(&ids);
        let first = step
            .send
            .into_iter()
            .map(|(to, m)| (ids[0], to, m))
            .collect();
        let decided = run(&mut px, first, &[]);
        assert_eq!(decided[0], Some(ids.clone()));
    }

    #[test]
    fn a_later_proposer_must_keep_an_accepted_value() {
        let ids: Vec<PeerId> = (1..=3).map(PeerId).collect();
        let mut px: Vec<Paxos> = ids
            .iter()
            .map(|id| Paxos::new(*id, 3, AcceptorState::default()))
            .collect();
        // Peer 1 gets value [1, 2] accepted by a quorum, then goes quiet.
        let step = px[0].propose(&ids);
        let first = step
            .send
            .into_iter()
            .map(|(to, m)| (ids[0], to, m))
            .collect();
        let ids_small = vec![PeerId(1), PeerId(2)];
        let mut queue: std::collections::VecDeque<(PeerId, PeerId, PaxosMessage)> = first;
        let mut decided_first = None;
        while let Some((from, to, msg)) = queue.pop_front() {
            let i = ids.iter().position(|x| *x == to).unwrap();
            let step = px[i].handle(from, msg, &ids, &ids_small);
            if step.decided.is_some() {
                decided_first = step.decided;
            }
            queue.extend(step.send.into_iter().map(|(dst, m)| (to, dst, m)));
        }
        assert_eq!(decided_first, Some(ids_small.clone()));
        // Peer 3 proposes everything it knows; it must still decide [1, 2].
        let step = px[2].propose(&ids);
        let first = step
            .send
            .into_iter()
            .map(|(to, m)| (ids[2], to, m))
            .collect();
        let decided = run(&mut px, first, &[PeerId(1)]);
        assert_eq!(decided[2], Some(ids_small));
    }

    #[test]
    fn no_quorum_no_decision() {
        let ids: Vec<PeerId> = (1..=5).map(PeerId).collect();
        let mut px: Vec<Paxos> = ids
            .iter()
            .map(|id| Paxos::new(*id, 5, AcceptorState::default()))
            .collect();
        let step = px[0].propose(&ids);
        let first = step
            .send
            .into_iter()
            .map(|(to, m)| (ids[0], to, m))
            .collect();
        let decided = run(&mut px, first, &[PeerId(3), PeerId(4), PeerId(5)]);
        assert!(decided.iter().all(Option::is_none));
    }
}
