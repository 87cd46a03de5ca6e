//! mesh-agent: the node daemon's library. One folder per concern (see ARCHITECTURE.md):
//! `mesh/` (peers, gossip, failure detection), `transport/` (QUIC + TLS), `store/`
//! (durable state), `api/` (local API, metrics), `config.rs` (flags).

pub mod agent;
pub mod api;
pub mod cli_render;
pub mod config;
pub mod dataplane;
pub mod ipam;
pub mod k8s;
pub mod mesh;
pub mod netlink;
pub mod node_net;
pub mod store;
pub mod transport;
