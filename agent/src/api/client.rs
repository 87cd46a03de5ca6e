//! A minimal HTTP/1.1 client for the agent's unix socket (used by `meshctl`, and by tests).

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach mesh-agent at {socket}: {source} (is mesh-agent running on this node? pass --socket if it uses another path)")]
    Unreachable {
        socket: String,
        source: std::io::Error,
    },
    #[error("mesh-agent at {socket} did not answer within {secs} s")]
    Timeout { socket: String, secs: u64 },
    #[error("HTTP exchange with mesh-agent failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("mesh-agent answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected answer from mesh-agent: {0}")]
    Decode(#[from] serde_json::Error),
}

const TIMEOUT: Duration = Duration::from_secs(10);

pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes), ClientError> {
    request_within(socket, method, path, body, TIMEOUT).await
}

/// `request` with the caller's deadline (the CNI plugin waits longer for an allocation
/// than for a status read).
pub async fn request_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    let socket_s = socket.display().to_string();
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: socket_s.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mesh-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Status {
                status: 0,
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout {
            socket: socket_s.clone(),
            secs: timeout.as_secs(),
        })?
}

/// GETs `path` and decodes a JSON answer; a non-2xx answer becomes an error with the
/// agent's own message.
pub async fn get_json<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    send_json(socket, "GET", path).await
}

/// Percent-encodes one path segment (peer names are usually plain, but need not be).
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends a bodiless request and decodes the JSON answer like `get_json`.
pub async fn send_json<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
) -> Result<T, ClientError> {
    let (status, bytes) = request(socket, method, path, None).await?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<mesh_proto::api::ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
        return Err(ClientError::Status { status, message });
    }
    Ok(serde_json::from_slice(&bytes)?)
}
