//! mesh-testbed: a multi-node mesh on one Linux machine (network namespaces).
//!
//! Not implemented yet (see testbed/README.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("mesh-testbed is not implemented in this build; see testbed/README.md");
    ExitCode::FAILURE
}
