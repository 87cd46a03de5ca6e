//! mesh-proto: every byte that crosses a process boundary.
//!
//! - [`wire`]: the framing and version handshake on a QUIC control connection.
//! - [`gossip`]: the topology channel's messages (peer records, SWIM probes, anti-entropy).
//! - [`api`]: the JSON bodies of the agent's local HTTP API (used by `meshctl` and `mesh-cni`).
//!
//! This crate never does I/O. Decoding any byte string returns an error, never panics;
//! the property tests in `tests/` feed it random and mutated input.

pub mod api;
pub mod gossip;
pub mod ipam;
pub mod peer;
pub mod wire;

pub use peer::{PeerId, PeerRecord};
