//! CNI errors exactly as the spec prints them: `{"cniVersion", "code", "msg", "details"}`
//! on stdout with a non-zero exit. Codes below 100 are the spec's; ours start at 100 and
//! are listed in `deploy/README.md`.

use serde::Serialize;

/// Spec codes (CNI 1.1.0 "Error" section).
pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const INVALID_ENVIRONMENT: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const STATUS_UNAVAILABLE: u32 = 50;
pub const STATUS_DEGRADED: u32 = 51;
/// Ours: a netlink or namespace operation failed.
pub const NETWORK_SETUP_FAILED: u32 = 100;
/// Ours: the agent refused the request (its message is passed on).
pub const AGENT_REFUSED: u32 = 101;
/// Ours: the cluster range has no free address for this node.
pub const RANGE_EXHAUSTED: u32 = 102;
/// Ours: CHECK found the attachment differs from what was set up.
pub const CHECK_FAILED: u32 = 110;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"unprintable error\"}}", self.code))
    }
}

pub type CniResult<T> = Result<T, CniError>;
