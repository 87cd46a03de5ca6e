//! The mesh: peers, gossip, topology and failure detection.
//!
//! The pure core (`MeshCore` and its parts: membership, broadcast queue, probes,
//! anti-entropy, neighbour choice) never touches a socket or a clock. The async driver
//! (`driver.rs`) wires it to the QUIC transport and to timers.

pub mod anti_entropy;
pub mod broadcast;
pub mod config;
pub mod core;
pub mod membership;
pub mod neighbours;
pub mod probe;

pub use self::config::CoreConfig;
pub use self::core::{Input, MeshCore, MeshEvent, Output};
pub use self::membership::Member;
pub mod driver;
pub mod links;
pub mod status;

#[cfg(test)]
mod core_tests;
