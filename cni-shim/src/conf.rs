//! The network configuration on stdin: spec keys, our keys (documented in
//! `deploy/README.md`), and version negotiation. Decode errors are code 6, bad values
//! code 7 naming the key, an unsupported version code 1.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::{CniError, CniResult, DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG};

/// Every version we read configs of and answer in.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";
pub const DEFAULT_SOCKET: &str = "/run/mesh/mesh.sock";
pub const DEFAULT_BRIDGE: &str = "mesh0";

#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// The negotiated version: results and errors are printed in it.
    pub cni_version: String,
    pub name: String,
    pub agent_socket: PathBuf,
    pub bridge: String,
    /// Overrides the agent's pod MTU (only ever lower it).
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    /// Passed through into the result's `dns`.
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    /// GC: attachments the runtime still uses.
    /// The attachments a GC must keep; `None` when the runtime sent no list (then a GC
    /// refuses instead of releasing everything).
    pub valid_attachments: Option<Vec<(String, String)>>,
}

/// `(major, minor, patch)` of a version string, if it is one.
pub fn version_triplet(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

pub fn at_least(version: &str, min: &str) -> bool {
    match (version_triplet(version), version_triplet(min)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

/// The version to answer VERSION, and errors of any command, in: the `cniVersion` the
/// request names if we speak it, else the latest (a bare `{"cniVersion": …}` is a normal
/// VERSION request; an unreadable one still gets an answer).
pub fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string())
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(INVALID_CONFIG, msg)
}

fn decode(stdin: &[u8]) -> CniResult<Map<String, Value>> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::new(
            DECODE_FAILURE,
            "no network configuration on stdin",
        ));
    }
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CniError::new(
            DECODE_FAILURE,
            "the network configuration on stdin is not a JSON object",
        )),
        Err(e) => Err(CniError::new(
            DECODE_FAILURE,
            format!("cannot decode the network configuration on stdin: {e}"),
        )),
    }
}

/// The version this request speaks: `cniVersion`, which the runtime sets to the version
/// it selected. `cniVersions` (1.1) is the runtime's input for that choice, not ours: an
/// older runtime passes it through untouched and expects answers in `cniVersion`.
fn negotiate(m: &Map<String, Value>) -> CniResult<String> {
    let v = match m.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(invalid("cniVersion must be a string")),
        None => {
            return Err(invalid(
                "cniVersion is missing from the network configuration",
            ))
        }
    };
    if !SUPPORTED_VERSIONS.contains(&v.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI version {v:?}: mesh-cni supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(v)
}

fn opt_str(m: &Map<String, Value>, key: &str) -> CniResult<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
    let m = decode(stdin)?;
    let cni_version = negotiate(&m)?;
    let name = opt_str(&m, "name")?
        .ok_or_else(|| invalid("name is missing from the network configuration"))?;
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        return Err(invalid(format!(
            "name {name:?} is invalid: letters, digits, '_', '.' and '-', starting with a letter or digit"
        )));
    }
    let agent_socket =
        PathBuf::from(opt_str(&m, "agentSocket")?.unwrap_or_else(|| DEFAULT_SOCKET.into()));
    if !agent_socket.is_absolute() {
        return Err(invalid(format!(
            "agentSocket {:?} must be an absolute path",
            agent_socket.display()
        )));
    }
    let bridge = opt_str(&m, "bridge")?.unwrap_or_else(|| DEFAULT_BRIDGE.into());
    crate::env::validate_ifname(&bridge)
        .map_err(|_| invalid(format!("bridge {bridge:?} is not a valid interface name")))?;
    let mtu = match m.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n @ 576..=65535) => Some(n as u32),
            _ => {
                return Err(invalid(format!(
                    "mtu {v} must be a number from 576 to 65535"
                )))
            }
        },
    };
    let log_file = opt_str(&m, "logFile")?.map(PathBuf::from);
    let dns = match m.get("dns") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(invalid("dns must be an object")),
    };
    let prev_result = match m.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(invalid("prevResult must be an object")),
    };
    // libcni sends both names (spec 1.1.0 said cni.dev/attachments; the text says
    // cni.dev/valid-attachments).
    let mut valid_attachments: Option<Vec<(String, String)>> = None;
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let Some(v) = m.get(key) else { continue };
        let valid_attachments = valid_attachments.get_or_insert_with(Vec::new);
        let list = v
            .as_array()
            .ok_or_else(|| invalid(format!("{key} must be a list")))?;
        for a in list {
            let id = a.get("containerID").and_then(Value::as_str);
            let ifname = a.get("ifname").and_then(Value::as_str);
            match (id, ifname) {
                (Some(id), Some(ifname)) => {
                    valid_attachments.push((id.to_string(), ifname.to_string()))
                }
                _ => {
                    return Err(invalid(format!(
                        "{key}: every entry needs containerID and ifname strings, got {a}"
                    )))
                }
            }
        }
    }
    if let Some(v) = valid_attachments.as_mut() {
        v.sort();
        v.dedup();
    }
    Ok(NetConf {
        cni_version,
        name,
        agent_socket,
        bridge,
        mtu,
        log_file,
        dns,
        prev_result,
        valid_attachments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_our_keys() {
        let c =
            parse(br#"{"cniVersion":"1.1.0","name":"mesh","type":"mesh-cni","mtu":1400}"#).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.bridge, "mesh0");
        assert_eq!(c.mtu, Some(1400));
    }

    #[test]
    fn codes_for_bad_input() {
        assert_eq!(parse(b"{not json").unwrap_err().code, DECODE_FAILURE);
        assert_eq!(parse(b"").unwrap_err().code, DECODE_FAILURE);
        assert_eq!(parse(b"[1]").unwrap_err().code, DECODE_FAILURE);
        assert_eq!(
            parse(br#"{"cniVersion":"9.9.9","name":"m"}"#)
                .unwrap_err()
                .code,
            INCOMPATIBLE_VERSION
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0"}"#).unwrap_err().code,
            INVALID_CONFIG
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"m","mtu":"big"}"#)
                .unwrap_err()
                .code,
            INVALID_CONFIG
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"m","agentSocket":"rel/x"}"#)
                .unwrap_err()
                .code,
            INVALID_CONFIG
        );
    }

    #[test]
    fn cni_version_set_by_the_runtime_wins_over_cni_versions() {
        let c =
            parse(br#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"m"}"#).unwrap();
        assert_eq!(c.cni_version, "1.0.0");
    }

    #[test]
    fn gc_attachments_from_both_keys() {
        let c = parse(
            br#"{"cniVersion":"1.1.0","name":"m",
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
                "cni.dev/attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.valid_attachments.map(|v| v.len()), Some(2));
    }

    #[test]
    fn version_order() {
        assert!(at_least("1.1.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(at_least("0.10.0", "0.4.0"));
    }
}
