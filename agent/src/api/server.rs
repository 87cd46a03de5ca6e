//! The local HTTP/1.1 + JSON API on a root-only unix socket, and the metrics listener.
//!
//! Handlers only ask the driver for a snapshot over a channel and serialise it; they never
//! touch mesh state themselves.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::Path as UrlPath;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use mesh_proto::api::{
    AllocationRequest, AllocationsResponse, ErrorBody, GcRequest, GcResponse, Report,
};

use crate::ipam::allocations::AttachmentKey;
use crate::ipam::core::ReclaimMode;
use crate::ipam::service::ApiFailure;
use tokio::sync::{mpsc, oneshot, watch};

use super::metrics::Metrics;
use crate::mesh::driver::{ApiRequest, Health};

const DRIVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than IPAM's own bounded wait for space, so IPAM's answer (503/507) wins.
const ALLOCATION_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct ApiState {
    driver: mpsc::Sender<ApiRequest>,
    health: watch::Receiver<Health>,
}

/// A driver that has not been round its loop for this long is stuck (it ticks every
/// 500 ms): liveness fails, and kubelet restarts the agent.
const STALLED: Duration = Duration::from_secs(10);

fn error(status: StatusCode, code: &str, msg: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: msg.into(),
            code: code.into(),
        }),
    )
        .into_response()
}

async fn report(state: &ApiState) -> Result<Report, Response> {
    let (tx, rx) = oneshot::channel();
    // One deadline for both steps: a stalled driver must not hang API callers.
    let exchange = async {
        state.driver.send(ApiRequest::Report(tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(DRIVER_TIMEOUT, exchange).await {
        Ok(Some(r)) => Ok(r),
        _ => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "driver_unavailable",
            "the mesh driver is not answering",
        )),
    }
}

async fn get_status(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) => Json(r.status).into_response(),
        Err(e) => e,
    }
}

async fn get_peers(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) => Json(r.peers).into_response(),
        Err(e) => e,
    }
}

async fn get_connections(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) => Json(r.connections).into_response(),
        Err(e) => e,
    }
}

/// Sends a request to the driver and waits (bounded) for its answer.
async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
    wait: Duration,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    let exchange = async {
        state.driver.send(make(tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(wait, exchange).await {
        Ok(Some(r)) => Ok(r),
        _ => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "driver_unavailable",
            "the mesh driver is not answering",
        )),
    }
}

fn failure(f: ApiFailure) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, f.code, f.message)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid JSON body: {e}"),
        ))
    })
}

async fn get_ipam(State(s): State<ApiState>) -> Response {
    match ask(&s, ApiRequest::IpamStatus, DRIVER_TIMEOUT).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e,
    }
}

async fn post_allocation(State(s): State<ApiState>, body: Bytes) -> Response {
    let request: AllocationRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    // Allocation may wait for the first split or for space from a peer (bounded in IPAM).
    match ask(
        &s,
        |reply| ApiRequest::Allocate { request, reply },
        ALLOCATION_TIMEOUT,
    )
    .await
    {
        Ok(Ok((answer, fresh))) => {
            let status = if fresh {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(answer)).into_response()
        }
        Ok(Err(f)) => failure(f),
        Err(e) => e,
    }
}

#[derive(serde::Deserialize)]
struct NetworkQuery {
    network: Option<String>,
}

async fn delete_allocation(
    State(s): State<ApiState>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
    Query(q): Query<NetworkQuery>,
) -> Response {
    let key = AttachmentKey {
        network: q.network.unwrap_or_default(),
        container_id,
        ifname,
    };
    match ask(
        &s,
        |reply| ApiRequest::Release { key, reply },
        DRIVER_TIMEOUT,
    )
    .await
    {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(f)) => failure(f),
        Err(e) => e,
    }
}

#[derive(serde::Deserialize)]
struct ReclaimQuery {
    force: Option<bool>,
}

/// `meshctl rmpeer [--force] NAME`: moves a dead peer's address space to this node.
async fn reclaim_peer(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ReclaimQuery>,
) -> Response {
    let mode = if q.force.unwrap_or(false) {
        ReclaimMode::Forced
    } else {
        ReclaimMode::Coordinated
    };
    match ask(
        &s,
        |reply| ApiRequest::Reclaim { name, mode, reply },
        ALLOCATION_TIMEOUT,
    )
    .await
    {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err(f)) => failure(f),
        Err(e) => e,
    }
}

async fn list_allocations(State(s): State<ApiState>) -> Response {
    match ask(&s, ApiRequest::ListAllocations, DRIVER_TIMEOUT).await {
        Ok(allocations) => Json(AllocationsResponse { allocations }).into_response(),
        Err(e) => e,
    }
}

async fn gc_allocations(State(s): State<ApiState>, body: Bytes) -> Response {
    let req: GcRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match ask(
        &s,
        |reply| ApiRequest::Gc {
            network: req.network,
            valid: req.valid,
            reply,
        },
        DRIVER_TIMEOUT,
    )
    .await
    {
        Ok(Ok(released)) => Json(GcResponse { released }).into_response(),
        Ok(Err(f)) => failure(f),
        Err(e) => e,
    }
}

async fn get_report(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e,
    }
}

/// Liveness: the driver's heartbeat is fresh. Read from a watch, never through the request
/// channel, so a probe does not wait behind CNI calls.
async fn healthz(State(s): State<ApiState>) -> Response {
    match stalled(&s) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(e) => e,
    }
}

async fn readyz(State(s): State<ApiState>) -> Response {
    if let Some(e) = stalled(&s) {
        return e;
    }
    if s.health.borrow().ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no control connection to any peer yet",
        )
    }
}

fn stalled(s: &ApiState) -> Option<Response> {
    let since = s.health.borrow().beat.elapsed();
    (since > STALLED).then(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "driver_stalled",
            format!("the mesh driver has not run for {since:.0?}"),
        )
    })
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see ARCHITECTURE.md, Interfaces",
    )
}

pub fn router(driver: mpsc::Sender<ApiRequest>, health: watch::Receiver<Health>) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/status/peers", get(get_peers))
        .route("/v1/status/connections", get(get_connections))
        .route("/v1/status/ipam", get(get_ipam))
        .route("/v1/report", get(get_report))
        .route(
            "/v1/allocations",
            get(list_allocations).post(post_allocation),
        )
        .route("/v1/allocations/gc", post(gc_allocations))
        .route(
            "/v1/allocations/{container_id}/{ifname}",
            delete(delete_allocation),
        )
        .route("/v1/peers/{name}", delete(reclaim_peer))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(ApiState { driver, health })
}

/// Binds the unix socket with mode 0600, replacing a stale socket file but never one that
/// a running agent still answers on.
pub async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is in use by a running agent; stop it or pass another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is restored right
    // after the bind, so the socket never exists with looser permissions than 0600.
    let old_mask = unsafe { libc::umask(0o077) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener =
        bound.with_context(|| format!("cannot bind local API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to mode 0600", path.display()))?;
    Ok(listener)
}

pub async fn serve_api(
    listener: tokio::net::UnixListener,
    driver: mpsc::Sender<ApiRequest>,
    health: watch::Receiver<Health>,
    socket: PathBuf,
) {
    if let Err(e) = axum::serve(listener, router(driver, health)).await {
        tracing::error!(socket = %socket.display(), error = %e, "local API stopped");
    }
}

/// Prometheus metrics, plus `/healthz` and `/readyz` for kubelet's probes (a DaemonSet's
/// httpGet probe cannot reach the root-only unix socket).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    driver: mpsc::Sender<ApiRequest>,
    health: watch::Receiver<Health>,
) {
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ApiState { driver, health });
    let app = Router::new().merge(probes).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A driver that never reads its queue (stuck, or busy with a long line of CNI calls):
    /// the probes still answer at once from the heartbeat. Before the heartbeat they asked
    /// the driver through that queue and waited out its 5 s deadline.
    #[tokio::test]
    async fn probes_answer_from_the_heartbeat_without_the_driver_queue() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let (driver, _queue) = mpsc::channel(1);
        let (beat, health) = watch::channel(Health {
            beat: Instant::now(),
            ready: true,
        });
        let listener = bind_socket(&socket).await.unwrap();
        tokio::spawn(serve_api(listener, driver, health, socket.clone()));
        let started = Instant::now();
        let (status, _) = crate::api::client::request(&socket, "GET", "/healthz", None)
            .await
            .unwrap();
        assert_eq!(status, 200);
        let (status, _) = crate::api::client::request(&socket, "GET", "/readyz", None)
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < DRIVER_TIMEOUT,
            "the probes waited on the driver queue"
        );
        // An old heartbeat means a stuck driver: liveness fails, and says so.
        beat.send_replace(Health {
            beat: Instant::now() - STALLED - Duration::from_secs(1),
            ready: true,
        });
        let (status, body) = crate::api::client::request(&socket, "GET", "/healthz", None)
            .await
            .unwrap();
        assert_eq!(status, 503);
        assert!(String::from_utf8_lossy(&body).contains("driver_stalled"));
    }
}
