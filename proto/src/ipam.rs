//! Messages of the IPAM gossip channel: ring entries (who owns which aligned block).

use serde::{Deserialize, Serialize};

use crate::peer::PeerId;

/// The owner of space nobody has been given yet (before the first split).
pub const NOBODY: PeerId = PeerId(0);

/// One aligned block of the cluster range: `start/prefix` is owned by `owner` at `version`.
/// Only the owner may write a newer version; a higher version replaces a lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingEntry {
    pub start: u32,
    pub prefix: u8,
    pub owner: PeerId,
    pub version: u64,
}

/// A Paxos ballot: higher round wins, proposer id breaks ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: PeerId,
}

/// Single-decree Paxos deciding the first split (`--ipalloc-init consensus=N`). The value
/// is the set of peers the range is split among.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaxosMessage {
    /// `n` is the proposer's `consensus=N`: peers that disagree on N must not vote together.
    Prepare {
        ballot: Ballot,
        n: u32,
    },
    Promise {
        ballot: Ballot,
        accepted: Option<(Ballot, Vec<PeerId>)>,
    },
    Accept {
        ballot: Ballot,
        value: Vec<PeerId>,
        n: u32,
    },
    Accepted {
        ballot: Ballot,
    },
    /// The acceptor promised a higher ballot.
    Reject {
        ballot: Ballot,
        promised: Ballot,
    },
}

/// The IPAM channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpamMessage {
    /// Ring entries: a delta, or the whole ring answering `Pull`.
    Entries {
        entries: Vec<RingEntry>,
    },
    /// Anti-entropy: the sender's ring hash, its free addresses and its seed-list hash.
    Summary {
        hash: u64,
        free: u64,
        seed: Option<u64>,
    },
    /// Send me your whole ring.
    Pull,
    SpaceRequest {
        id: u64,
    },
    SpaceGrant {
        id: u64,
        entries: Vec<RingEntry>,
    },
    SpaceDenied {
        id: u64,
    },
    Paxos(PaxosMessage),
    /// Ask the reclaim coordinator to move a dead peer's blocks to the sender.
    /// `force`: the operator asserts that down anchor owners are gone for good.
    ReclaimRequest {
        id: u64,
        dead: PeerId,
        force: bool,
    },
    ReclaimGranted {
        id: u64,
        entries: Vec<RingEntry>,
    },
    ReclaimRefused {
        id: u64,
        reason: String,
    },
}
