//! mesh-cni: the CNI plugin executed by the container runtime.
//!
//! Not implemented yet (see cni-shim/README.md). Until it is, the binary answers every
//! invocation with a CNI error instead of pretending to attach a pod.

use std::process::ExitCode;

fn main() -> ExitCode {
    // CNI error code 999-range is plugin-specific; 100 is generic in our docs.
    println!(
        "{{\"cniVersion\":\"1.1.0\",\"code\":100,\"msg\":\"mesh-cni is not implemented in this build\",\"details\":\"see cni-shim/README.md\"}}"
    );
    ExitCode::FAILURE
}
