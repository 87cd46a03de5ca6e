//! `mesh-cni install`: what the DaemonSet's init container runs to put the plugin and its
//! conflist on the node. Both land atomically (written to a temporary name in the same
//! directory, synced, renamed), so a runtime reading the directories at that moment sees
//! the old file or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The conflist shipped in `deploy/` (one source of truth for the repo and the image).
pub const SHIPPED_CONFLIST: &str = include_str!("../../deploy/10-mesh.conflist");
const CONFLIST_NAME: &str = "10-mesh.conflist";

#[derive(Debug, PartialEq, Eq)]
pub struct InstallArgs {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// A conflist to install instead of the shipped one (e.g. from a ConfigMap).
    pub conflist: Option<PathBuf>,
}

pub const USAGE: &str = "usage: mesh-cni install [--bin-dir DIR (default /opt/cni/bin)] [--conf-dir DIR (default /etc/cni/net.d)] [--conflist FILE]";

pub fn parse_args(args: &[String]) -> Result<InstallArgs, String> {
    let mut out = InstallArgs {
        bin_dir: "/opt/cni/bin".into(),
        conf_dir: "/etc/cni/net.d".into(),
        conflist: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))
        };
        match flag.as_str() {
            "--bin-dir" => out.bin_dir = value()?.into(),
            "--conf-dir" => out.conf_dir = value()?.into(),
            "--conflist" => out.conflist = Some(value()?.into()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(out)
}

/// Installs the running binary as `mesh-cni` and the conflist; returns what it wrote.
pub fn install(args: &InstallArgs, self_exe: &Path) -> Result<Vec<PathBuf>, String> {
    let conflist = match &args.conflist {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read --conflist {}: {e}", p.display()))?,
        None => SHIPPED_CONFLIST.to_string(),
    };
    let parsed: serde_json::Value = serde_json::from_str(&conflist)
        .map_err(|e| format!("the conflist is not valid JSON: {e}"))?;
    let has_mesh = parsed["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "mesh-cni"));
    if !has_mesh {
        return Err("the conflist has no plugin of type mesh-cni".into());
    }
    let binary = std::fs::read(self_exe)
        .map_err(|e| format!("cannot read this binary ({}): {e}", self_exe.display()))?;
    let bin = args.bin_dir.join("mesh-cni");
    let conf = args.conf_dir.join(CONFLIST_NAME);
    write_atomically(&bin, &binary, 0o755)?;
    write_atomically(&conf, conflist.as_bytes(), 0o644)?;
    Ok(vec![bin, conf])
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_and_defaults() {
        let a = parse_args(&[]).unwrap();
        assert_eq!(a.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(a.conf_dir, PathBuf::from("/etc/cni/net.d"));
        let a = parse_args(&args(&[
            "--bin-dir",
            "/b",
            "--conf-dir",
            "/c",
            "--conflist",
            "/x",
        ]))
        .unwrap();
        assert_eq!(a.conflist, Some(PathBuf::from("/x")));
        assert!(parse_args(&args(&["--bin-dir"]))
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse_args(&args(&["--force"]))
            .unwrap_err()
            .contains("unknown argument"));
    }

    #[test]
    fn installs_binary_and_conflist_and_replaces_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let fake_exe = dir.path().join("exe");
        std::fs::write(&fake_exe, b"\x7fELF new").unwrap();
        let a = InstallArgs {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            conflist: None,
        };
        std::fs::create_dir_all(&a.bin_dir).unwrap();
        std::fs::write(a.bin_dir.join("mesh-cni"), b"old").unwrap();
        let written = install(&a, &fake_exe).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            std::fs::read(a.bin_dir.join("mesh-cni")).unwrap(),
            b"\x7fELF new"
        );
        let mode = std::fs::metadata(a.bin_dir.join("mesh-cni"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_to_string(a.conf_dir.join("10-mesh.conflist")).unwrap(),
            SHIPPED_CONFLIST
        );
        let leftovers: Vec<_> = std::fs::read_dir(&a.bin_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files left");
    }

    #[test]
    fn a_bad_conflist_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fake_exe = dir.path().join("exe");
        std::fs::write(&fake_exe, b"exe").unwrap();
        for (text, why) in [
            ("{not json", "not valid JSON"),
            (
                r#"{"plugins":[{"type":"bridge"}]}"#,
                "no plugin of type mesh-cni",
            ),
        ] {
            let conflist = dir.path().join("c.conflist");
            std::fs::write(&conflist, text).unwrap();
            let a = InstallArgs {
                bin_dir: dir.path().join("bin"),
                conf_dir: dir.path().join("net.d"),
                conflist: Some(conflist),
            };
            let e = install(&a, &fake_exe).unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(!a.bin_dir.join("mesh-cni").exists());
        }
    }
}
