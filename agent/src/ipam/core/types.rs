//! The IPAM core's vocabulary: configuration, inputs, outputs, events and errors.

use std::time::Duration;

use mesh_proto::ipam::{IpamMessage, RingEntry};
use mesh_proto::PeerId;

use crate::ipam::allocations::{Allocation, AttachmentKey};
use crate::ipam::block::Block;
use crate::ipam::paxos::AcceptorState;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMode {
    /// Agreement among a quorum of the first N peers.
    Consensus(usize),
    /// Every peer is given the same list of names.
    Seed(Vec<String>),
    /// Never split on its own: one elected writer (the Kubernetes Lease holder) calls
    /// `split_elected`, and everyone else learns the ring by gossip.
    Elected,
}

#[derive(Clone, Debug)]
pub struct IpamConfig {
    pub range: Block,
    pub min_prefix: u8,
    pub init: InitMode,
    pub anti_entropy_interval: Duration,
    /// How long a space request may stay unanswered before another donor is tried.
    pub request_timeout: Duration,
    /// How long a donor that said no is left alone.
    pub denial_backoff: Duration,
    pub seed: u64,
    /// Ask for space as soon as the range is split instead of at the first allocation: a
    /// node that hosts pods needs its gateway (bridge) address before its first pod, and a
    /// node that joins an established mesh owns nothing until it asks.
    pub claim_space: bool,
}

impl IpamConfig {
    pub fn new(range: Block, init: InitMode) -> IpamConfig {
        IpamConfig {
            range,
            min_prefix: 26,
            init,
            anti_entropy_interval: Duration::from_secs(3),
            request_timeout: Duration::from_secs(2),
            denial_backoff: Duration::from_secs(10),
            seed: 0,
            claim_space: false,
        }
    }
}

/// A peer as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: PeerId,
    pub name: String,
    pub up: bool,
}

#[derive(Clone, Debug)]
pub enum IpamInput {
    Message {
        from: PeerId,
        msg: IpamMessage,
    },
    /// The mesh's current view: every known peer, and our neighbours (delta targets).
    Topology {
        peers: Vec<PeerInfo>,
        neighbours: Vec<PeerId>,
    },
    Timer,
}

/// A durable change; must be committed before anything after it leaves the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamWrite {
    /// The whole ring (canonical entries).
    Ring(Vec<RingEntry>),
    Acceptor(AcceptorState),
    Allocate(Allocation),
    Release(AttachmentKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamEvent {
    /// The ring was split for the first time among these peers.
    Split {
        members: usize,
    },
    /// Space arrived from a donor: pending allocations can be retried.
    SpaceGranted {
        from: PeerId,
        block: String,
    },
    SpaceDenied {
        from: PeerId,
    },
    SpaceRequested {
        to: PeerId,
    },
    /// Two owners claimed one block at one version; resolved the same way everywhere.
    Conflict {
        block: String,
        kept: PeerId,
        dropped: PeerId,
    },
    /// A peer's IPAM state is incompatible with ours (e.g. another seed list); ignored.
    Incompatible {
        peer: PeerId,
        reason: String,
    },
    /// A peer sent ring entries we could not accept.
    BadEntry {
        peer: PeerId,
        reason: String,
    },
    /// A space request went unanswered; the donor is skipped for a while.
    SpaceRequestTimedOut {
        to: PeerId,
    },
    /// A dead peer's space moved to `to` (id 0 when decided here as coordinator).
    Reclaimed {
        id: u64,
        dead: PeerId,
        to: PeerId,
    },
    ReclaimRefused {
        id: u64,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamOutput {
    Send { to: PeerId, msg: IpamMessage },
    Persist(IpamWrite),
    Event(IpamEvent),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocateError {
    /// No ring yet; the text says why (e.g. awaiting consensus).
    #[error("IPAM not ready: {0}")]
    NotReady(String),
    /// Space was requested from a peer; try again shortly.
    #[error("waiting for address space from {0}")]
    Waiting(String),
    #[error("range {0} is exhausted: no free address on this node and no reachable peer with free space")]
    Exhausted(Block),
}

/// What a restarted node read back from its store.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    pub ring: Vec<RingEntry>,
    pub acceptor: AcceptorState,
    pub allocations: Vec<Allocation>,
    /// The address handed out last (the round-robin cursor).
    pub last_allocated: Option<u32>,
}

/// A stored IPAM state that cannot be taken back as it is: the store is damaged or was
/// written by something else. The agent refuses to start rather than guess.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the stored ring holds an entry that is not valid here ({entry}): {source}")]
    RingEntry {
        entry: String,
        source: crate::ipam::ring::RingError,
    },
    #[error("the stored allocations give one address or attachment twice ({0})")]
    DuplicateAllocation(String),
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::ipam::core::IpamCore;

    fn alloc(c: &str, addr: u32) -> Allocation {
        Allocation {
            key: AttachmentKey {
                network: "mesh".into(),
                container_id: c.into(),
                ifname: "eth0".into(),
            },
            addr,
            pod: None,
            netns: None,
        }
    }

    #[test]
    fn a_restored_state_that_contradicts_itself_is_refused() {
        // Before: the second holder of an address, or a ring entry outside the range, was
        // dropped without a word and the node started on what was left.
        let cfg = IpamConfig::new("10.32.0.0/12".parse().unwrap(), InitMode::Elected);
        let twice = Restored {
            allocations: vec![alloc("a", 0x0a20_0005), alloc("b", 0x0a20_0005)],
            ..Restored::default()
        };
        let e = IpamCore::new(cfg.clone(), PeerId(1), "n", twice, Instant::now())
            .err()
            .unwrap();
        assert!(e.to_string().contains("10.32.0.5"), "{e}");
        let outside = Restored {
            ring: vec![RingEntry {
                start: 0x0b00_0000,
                prefix: 24,
                owner: PeerId(1),
                version: 1,
            }],
            ..Restored::default()
        };
        assert!(IpamCore::new(cfg, PeerId(1), "n", outside, Instant::now()).is_err());
    }
}
