//! The CNI environment (`CNI_COMMAND`, `CNI_CONTAINERID`, …), validated the way the spec
//! and the reference plugins' skel do: a bad value is error code 4 naming the variable.

use crate::error::{CniError, CniResult, INVALID_ENVIRONMENT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty when not given (allowed on DEL: kubelet's later DELs carry none).
    pub netns: String,
    pub ifname: String,
    pub pod: PodArgs,
}

fn bad(msg: impl Into<String>) -> CniError {
    CniError::new(INVALID_ENVIRONMENT, msg)
}

/// Reads the environment through `get` (the process environment in `main`, a map in tests).
pub fn parse(get: impl Fn(&str) -> Option<String>) -> CniResult<CniEnv> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("GC") => Command::Gc,
        Some("STATUS") => Command::Status,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(bad(format!(
                "CNI_COMMAND={other:?} is not a CNI command (ADD, DEL, CHECK, GC, STATUS, VERSION)"
            )))
        }
        None => {
            return Err(bad(
                "CNI_COMMAND is not set: mesh-cni is a CNI plugin, run by a container runtime",
            ))
        }
    };
    let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = get("CNI_CONTAINERID").unwrap_or_default();
    let ifname = get("CNI_IFNAME").unwrap_or_default();
    let netns = get("CNI_NETNS").unwrap_or_default();
    if per_container {
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
        if netns.is_empty() && command != Command::Del {
            return Err(bad("CNI_NETNS is not set (required for ADD and CHECK)"));
        }
    }
    Ok(CniEnv {
        command,
        container_id,
        netns,
        ifname,
        pod: pod_args(&get("CNI_ARGS").unwrap_or_default()),
    })
}

fn validate_container_id(id: &str) -> CniResult<()> {
    if id.is_empty() {
        return Err(bad("CNI_CONTAINERID is not set"));
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return Err(bad(format!(
            "CNI_CONTAINERID={id:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
        )));
    }
    Ok(())
}

/// Linux interface names: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> CniResult<()> {
    if name.is_empty() {
        return Err(bad("CNI_IFNAME is not set"));
    }
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(bad(format!(
            "CNI_IFNAME={name:?} is not a valid interface name (1-15 bytes, not '.' or '..', no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`); others are ignored.
fn pod_args(args: &str) -> PodArgs {
    let mut pod = PodArgs::default();
    for pair in args.split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => pod.namespace = Some(v.to_string()),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => pod.name = Some(v.to_string()),
            _ => {}
        }
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> CniResult<CniEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|k| m.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u",
        ),
    ];

    #[test]
    fn a_kubelet_add_parses_with_the_pod() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.pod.namespace.as_deref(), Some("default"));
        assert_eq!(e.pod.name.as_deref(), Some("web-0"));
    }

    #[test]
    fn each_missing_or_bad_variable_is_code_4_and_named() {
        let without = |key: &str| {
            let v: Vec<(&str, &str)> = ADD.iter().copied().filter(|(k, _)| *k != key).collect();
            env(&v).unwrap_err()
        };
        for key in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            let e = without(key);
            assert_eq!(e.code, INVALID_ENVIRONMENT);
            assert!(e.msg.contains(key), "{key}: {}", e.msg);
        }
        let with = |key: &str, value: &str| {
            let mut v: Vec<(&str, &str)> = ADD.iter().copied().filter(|(k, _)| *k != key).collect();
            v.push((key, value));
            env(&v)
        };
        assert_eq!(with("CNI_COMMAND", "FROB").unwrap_err().code, 4);
        assert_eq!(
            with("CNI_IFNAME", "a-very-long-ifname").unwrap_err().code,
            4
        );
        assert_eq!(with("CNI_IFNAME", "eth/0").unwrap_err().code, 4);
        assert_eq!(with("CNI_CONTAINERID", "-x").unwrap_err().code, 4);
        assert_eq!(with("CNI_CONTAINERID", "a b").unwrap_err().code, 4);
    }

    #[test]
    fn del_without_netns_is_fine_and_version_needs_nothing() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ])
        .unwrap();
        assert_eq!(e.netns, "");
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }
}
