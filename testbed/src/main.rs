//! mesh-testbed: a multi-node mesh on one Linux machine (network namespaces).
//!
//! The command line arrives with the testbed issue; the library (`mesh_testbed`) is what
//! the end-to-end tests use today (see testbed/README.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("the mesh-testbed command line is not built yet; the end-to-end tests use the mesh_testbed library (see testbed/README.md)");
    ExitCode::FAILURE
}
