//! mesh-agent: the node daemon's library. One folder per concern (see ARCHITECTURE.md).

pub mod mesh;
