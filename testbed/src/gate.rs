//! Whether privileged end-to-end tests may run here: they need root. Without it they
//! skip loudly, unless `MESH_E2E=1` (CI), where a skip would hide a failure.

/// Returns true when the caller should run; prints a loud banner and returns false when
/// it should skip; panics (fails the test) when skipping is not allowed.
pub fn e2e_allowed(suite: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let required = std::env::var("MESH_E2E").is_ok_and(|v| v == "1");
    let missing: Vec<&str> = ["ip", "ping"].into_iter().filter(|t| !on_path(t)).collect();
    let problem = if !root {
        Some("needs root (network namespaces, veth, bridges)".to_string())
    } else if !missing.is_empty() {
        Some(format!(
            "missing tools: {} (apt-get install iproute2 iputils-ping)",
            missing.join(", ")
        ))
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if required => {
            panic!("{suite}: MESH_E2E=1 but this end-to-end suite cannot run: {p}")
        }
        Some(p) => {
            eprintln!();
            eprintln!("################################################################");
            eprintln!("## SKIPPED {suite}: {p}");
            eprintln!("## run as root (CI sets MESH_E2E=1 and fails instead of skipping)");
            eprintln!("################################################################");
            eprintln!();
            false
        }
    }
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}
