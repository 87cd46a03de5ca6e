//! Peer identity and the record each peer owns and gossips about itself.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A stable peer identity: 64 random bits chosen on first start and kept in the state store.
///
/// Random rather than derived from the hostname so that a cloned VM image with a copied
/// state directory is the only way to collide, and a collision shows up as two names for one id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Weave-like colon separated form, easy to read and to grep.
        let b = self.0.to_be_bytes();
        write!(
            f,
            "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a peer id string that is not 16 hex digits (colons allowed).
#[derive(Debug, thiserror::Error)]
#[error("invalid peer id {0:?}: expected 16 hex digits such as 0a1b:2c3d:4e5f:6071")]
pub struct ParsePeerIdError(String);

impl FromStr for PeerId {
    type Err = ParsePeerIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        if hex.len() != 16 {
            return Err(ParsePeerIdError(s.to_string()));
        }
        u64::from_str_radix(&hex, 16)
            .map(PeerId)
            .map_err(|_| ParsePeerIdError(s.to_string()))
    }
}

/// What a peer can do on the data plane, announced so others can pick a compatible path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Data-plane backends this peer runs (`vxlan`, `udp`) or none for a control-plane-only peer.
    pub dataplanes: Vec<String>,
    /// The MAC of this peer's VXLAN tunnel endpoint, stable across restarts.
    pub vtep_mac: Option<[u8; 6]>,
    /// UDP port of the VXLAN endpoint.
    pub vxlan_port: Option<u16>,
    /// Whether this peer authenticates its connections (false only with `--insecure-no-auth`).
    pub authenticated: bool,
}

/// One entry of a peer's own connection list, as it gossips it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkSummary {
    pub peer: PeerId,
    /// True when this peer dialed the connection.
    pub outbound: bool,
}

/// The record a peer owns about itself. Only the owner changes it; everybody else merges
/// copies by `(incarnation, version)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub id: PeerId,
    pub name: String,
    /// Bumped on every restart and whenever the peer refutes a suspicion about itself.
    pub incarnation: u64,
    /// Bumped on every content change within one incarnation.
    pub version: u64,
    /// Control-plane addresses (QUIC) where the peer can be reached.
    pub addresses: Vec<SocketAddr>,
    pub capabilities: Capabilities,
    /// The peer's established control connections, sorted by peer id.
    pub connections: Vec<LinkSummary>,
}

impl PeerRecord {
    /// The key records merge by: a higher key replaces a lower one.
    pub fn content_key(&self) -> (u64, u64) {
        (self.incarnation, self.version)
    }
}
