//! The testbed as a library: a private mount namespace with its own `/run/netns`, an
//! underlay namespace with a bridge, node namespaces each running a real `mesh-agent`,
//! and pod namespaces attached by executing the real `mesh-cni` (through a small
//! libcni-style conflist runner, so chained reference plugins see what a runtime sends).
//!
//! Cleanup is layered so an interrupted test leaves nothing: `Drop` stops agents and
//! deletes namespaces; agents also die with the test process (`PR_SET_PDEATHSIG`); and
//! the namespaces are mounts inside a private mount namespace, gone with its last process.

pub mod bed;
pub mod chaos;
pub mod checks;
pub mod cluster;
pub mod cni;
pub mod forge;
pub mod gate;
pub mod kube;
pub mod measure;
pub mod privns;
pub mod probe;
pub mod suite;

pub use bed::{AgentOptions, Node, Pod, Testbed};
pub use cni::{CniCall, Conflist};
