//! IPAM: the cluster range split among peers by gossip.
//!
//! `block` is CIDR arithmetic; `ring` the range ring CRDT (who owns which block). Space
//! requests, per-pod allocations and reclaim build on these (IPAM issue, in progress).

pub mod allocations;
pub mod block;
pub mod core;
pub mod paxos;
pub mod ring;
pub mod service;
