//! Calls to mesh-agent over its unix socket. An agent that is down is reported at once as
//! "try again later" (code 11): connecting to a socket nobody listens on fails
//! immediately, and every call has a deadline.

use std::path::PathBuf;
use std::time::Duration;

use mesh_agent::api::client::{self, ClientError};
use mesh_proto::api::{
    AllocationRequest, AllocationResponse, AllocationView, AllocationsResponse, AttachmentRef,
    ErrorBody, GcRequest, GcResponse, StatusResponse,
};
use serde::de::DeserializeOwned;

use crate::error::{CniError, CniResult, AGENT_REFUSED, RANGE_EXHAUSTED, TRY_AGAIN_LATER};

/// The agent parks an allocation for up to 15 s while it asks a peer for space.
const ALLOCATE_DEADLINE: Duration = Duration::from_secs(20);
const DEADLINE: Duration = Duration::from_secs(5);

pub struct Agent {
    pub socket: PathBuf,
    /// The CNI network name: allocations are kept per (network, container, ifname).
    pub network: String,
}

fn from_client(e: ClientError) -> CniError {
    match e {
        ClientError::Unreachable { socket, source } => CniError::new(
            TRY_AGAIN_LATER,
            format!(
                "mesh-agent is not reachable at {socket} ({source}): is it running on this node? (the path is the network configuration's agentSocket)"
            ),
        ),
        ClientError::Timeout { .. } | ClientError::Http(_) => {
            CniError::new(
                TRY_AGAIN_LATER,
                format!("mesh-agent is not available on this node: {e}"),
            )
        }
        other => CniError::new(AGENT_REFUSED, other.to_string()),
    }
}

impl Agent {
    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> CniResult<(u16, Option<T>)> {
        let (status, bytes) = client::request_within(&self.socket, method, path, body, deadline)
            .await
            .map_err(from_client)?;
        if !(200..300).contains(&status) {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.code, e.error),
                Err(_) => (
                    String::new(),
                    String::from_utf8_lossy(&bytes).trim().to_string(),
                ),
            };
            let cni_code = match status {
                503 => TRY_AGAIN_LATER,
                507 => RANGE_EXHAUSTED,
                _ => AGENT_REFUSED,
            };
            return Err(CniError::new(cni_code, format!("mesh-agent: {message}"))
                .with_details(format!("HTTP {status} {code} for {method} {path}")));
        }
        if bytes.is_empty() {
            return Ok((status, None));
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            CniError::new(
                AGENT_REFUSED,
                format!("unexpected answer from mesh-agent: {e}"),
            )
        })?;
        Ok((status, Some(value)))
    }

    /// The address for (container, ifname), and whether this call created it (so a failed
    /// ADD releases only what it took).
    pub async fn allocate(&self, req: &AllocationRequest) -> CniResult<(AllocationResponse, bool)> {
        let body =
            serde_json::to_vec(req).map_err(|e| CniError::new(AGENT_REFUSED, e.to_string()))?;
        let (status, answer) = self
            .call("POST", "/v1/allocations", Some(body), ALLOCATE_DEADLINE)
            .await?;
        let answer = answer
            .ok_or_else(|| CniError::new(AGENT_REFUSED, "mesh-agent sent an empty allocation"))?;
        Ok((answer, status == 201))
    }

    pub async fn release(&self, container_id: &str, ifname: &str) -> CniResult<()> {
        let path = format!(
            "/v1/allocations/{}/{}?network={}",
            client::path_segment(container_id),
            client::path_segment(ifname),
            client::path_segment(&self.network)
        );
        self.call::<serde_json::Value>("DELETE", &path, None, DEADLINE)
            .await
            .map(|_| ())
    }

    /// Every allocation the agent holds, of every network.
    pub async fn allocations(&self) -> CniResult<Vec<AllocationView>> {
        let (_, list) = self
            .call::<AllocationsResponse>("GET", "/v1/allocations", None, DEADLINE)
            .await?;
        Ok(list.map(|l| l.allocations).unwrap_or_default())
    }

    pub async fn allocation(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> CniResult<Option<AllocationView>> {
        Ok(self.allocations().await?.into_iter().find(|a| {
            a.container_id == container_id
                && a.ifname == ifname
                && (a.network == self.network || a.network.is_empty())
        }))
    }

    pub async fn gc(&self, valid: &[(String, String)]) -> CniResult<GcResponse> {
        let req = GcRequest {
            network: self.network.clone(),
            valid: valid
                .iter()
                .map(|(c, i)| AttachmentRef {
                    container_id: c.clone(),
                    ifname: i.clone(),
                })
                .collect(),
        };
        let body =
            serde_json::to_vec(&req).map_err(|e| CniError::new(AGENT_REFUSED, e.to_string()))?;
        let (_, answer) = self
            .call("POST", "/v1/allocations/gc", Some(body), DEADLINE)
            .await?;
        Ok(answer.unwrap_or(GcResponse { released: vec![] }))
    }

    pub async fn status(&self) -> CniResult<StatusResponse> {
        let (_, answer) = self.call("GET", "/v1/status", None, DEADLINE).await?;
        answer.ok_or_else(|| CniError::new(AGENT_REFUSED, "mesh-agent sent an empty status"))
    }
}
