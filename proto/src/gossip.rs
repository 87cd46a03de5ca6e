//! Messages of the topology gossip channel: SWIM probes, delta updates and anti-entropy.
//!
//! Liveness claims and record content merge separately (see [`MemberUpdate`]) so that a
//! stale suspicion can never roll a record's content back.

use serde::{Deserialize, Serialize};

use crate::peer::{PeerId, PeerRecord};

/// What one peer believes about another's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
    /// The peer announced it was leaving; treated like dead, but named so in status.
    Left,
}

impl Liveness {
    /// Precedence within one incarnation (SWIM: suspect overrides alive, dead overrides both).
    pub fn rank(self) -> u8 {
        match self {
            Liveness::Alive => 0,
            Liveness::Suspect => 1,
            Liveness::Dead => 2,
            Liveness::Left => 3,
        }
    }

    pub fn is_down(self) -> bool {
        matches!(self, Liveness::Dead | Liveness::Left)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
            Liveness::Left => "left",
        }
    }
}

/// A liveness claim about one incarnation of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessClaim {
    pub state: Liveness,
    /// The incarnation of the peer the claim is about.
    pub incarnation: u64,
}

impl LivenessClaim {
    /// SWIM's override order: higher incarnation first, then suspect > alive, dead > suspect.
    pub fn key(&self) -> (u64, u8) {
        (self.incarnation, self.state.rank())
    }
}

/// One member's full state as gossiped: the owner's record plus the sender's liveness claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberUpdate {
    pub record: PeerRecord,
    pub liveness: LivenessClaim,
}

/// The compact version of a member used by anti-entropy digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    pub id: PeerId,
    pub incarnation: u64,
    pub version: u64,
    pub liveness: LivenessClaim,
}

/// The topology channel. Every variant is small except `Updates`, which carries records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMessage {
    /// Direct probe; piggybacks recent updates.
    Ping {
        seq: u64,
        updates: Vec<MemberUpdate>,
    },
    /// Answer to a `Ping` (also sent by a relay on behalf of a probed target).
    Ack {
        seq: u64,
        updates: Vec<MemberUpdate>,
    },
    /// Ask the receiver to probe `target` for us (SWIM indirect probe).
    PingReq { seq: u64, target: PeerId },
    /// A relay reports that `target` answered the indirect probe numbered `seq`.
    IndirectAck { seq: u64, target: PeerId },
    /// Delta gossip, or the answer to a `Pull`.
    Updates { updates: Vec<MemberUpdate> },
    /// Anti-entropy step 1: a hash of the sender's whole view.
    DigestSummary { hash: u64, members: u32 },
    /// Anti-entropy step 2: the sender's full digest. The receiver pushes what it has newer
    /// and pulls what the sender has newer, so one digest repairs both directions.
    Digest { entries: Vec<DigestEntry> },
    /// Anti-entropy step 3: send me these members' full state.
    Pull { ids: Vec<PeerId> },
}

impl GossipMessage {
    /// Short name for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            GossipMessage::Ping { .. } => "ping",
            GossipMessage::Ack { .. } => "ack",
            GossipMessage::PingReq { .. } => "ping_req",
            GossipMessage::IndirectAck { .. } => "indirect_ack",
            GossipMessage::Updates { .. } => "updates",
            GossipMessage::DigestSummary { .. } => "digest_summary",
            GossipMessage::Digest { .. } => "digest",
            GossipMessage::Pull { .. } => "pull",
        }
    }
}
