//! A private mount namespace for the whole test process, with its own `/run/netns` and
//! scratch dir, so our namespaces and files never appear in (or collide with) the host's and
//! vanish with us, however the process ends.

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Must run while the process is still single-threaded (first thing in `main`): a mount
/// namespace entered later would hold only the calling thread.
pub fn enter_private_mounts() -> Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads > 1 {
        bail!("enter_private_mounts must run before any thread starts ({threads} threads)");
    }
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    std::fs::create_dir_all("/run/netns").context("mkdir /run/netns")?;
    mount(
        Some("tmpfs"),
        "/run/netns",
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mount a private tmpfs on /run/netns")?;
    // Work directories (agent state, sockets, logs, containerd's root) go under a scratch
    // dir with a tmpfs private to us, so even a killed test leaves no files behind (only
    // the empty mount point). Not the whole temp dir: the checkout and its binaries may
    // live there.
    let scratch = scratch_dir();
    std::fs::create_dir_all(&scratch).with_context(|| format!("mkdir {}", scratch.display()))?;
    mount(
        Some("tmpfs"),
        &scratch,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mount a private tmpfs on {}", scratch.display()))?;
    Ok(())
}

/// Where testbeds keep their files (a private tmpfs once `enter_private_mounts` ran).
pub fn scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("mesh-testbed")
}
