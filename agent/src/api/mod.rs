//! The agent's local surfaces: the HTTP API on the unix socket (`server`), its client for
//! `meshctl` (`client`), and Prometheus metrics (`metrics`).

pub mod client;
pub mod metrics;
pub mod server;
