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
