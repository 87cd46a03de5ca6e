//! Running code inside another network namespace. `setns` moves only the calling thread,
//! so the work runs on a fresh OS thread that enters the namespace and then ends: no
//! runtime worker ever changes namespace. Sockets created there stay in that namespace.

use std::fs::File;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use super::NetlinkError;

/// Opens a network namespace file (`/run/netns/x`, `/proc/PID/ns/net`), checking that it
/// really is one: the error names the path.
pub fn open(path: &Path) -> Result<File, NetlinkError> {
    let err = |source: std::io::Error| NetlinkError::Netns {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    // NS_GET_NSTYPE would be exact; entering on a throwaway thread is equally exact and
    // needs no ioctl number: setns refuses anything that is not a network namespace.
    let probe = file.try_clone().map_err(err)?;
    std::thread::spawn(move || setns(&probe, CloneFlags::CLONE_NEWNET))
        .join()
        .map_err(|_| err(std::io::Error::other("namespace probe thread panicked")))?
        .map_err(|e| err(std::io::Error::from(e)))?;
    Ok(file)
}

/// Runs `f` on a new thread inside the network namespace at `path` and returns its result.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // No probe here: the worker's own setns refuses a file that is not a network
    // namespace, with the same error.
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| NetlinkError::Netns {
        path: shown.clone(),
        source,
    })?;
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetlinkError::Netns {
            path: shown.clone(),
            source: e.into(),
        })?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetlinkError::Netns {
        path: path.display().to_string(),
        source: std::io::Error::other("namespace worker thread panicked"),
    })?
}
