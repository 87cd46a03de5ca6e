//! The local HTTP/1.1 + JSON API on a root-only unix socket, and the metrics listener.
//!
//! Handlers only ask the driver for a snapshot over a channel and serialise it; they never
//! touch mesh state themselves.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use mesh_proto::api::{ErrorBody, Report};
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::mesh::driver::ApiRequest;

const DRIVER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct ApiState {
    driver: mpsc::Sender<ApiRequest>,
}

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

async fn get_ipam() -> Response {
    error(
        StatusCode::NOT_IMPLEMENTED,
        "ipam_unavailable",
        "IPAM is not built into this agent yet",
    )
}

async fn get_report(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e,
    }
}

async fn healthz(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => e,
    }
}

async fn readyz(State(s): State<ApiState>) -> Response {
    match report(&s).await {
        Ok(r) if r.status.ready => (StatusCode::OK, "ready\n").into_response(),
        Ok(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no control connection to any peer yet",
        ),
        Err(e) => e,
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see ARCHITECTURE.md, Interfaces",
    )
}

pub fn router(driver: mpsc::Sender<ApiRequest>) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/status/peers", get(get_peers))
        .route("/v1/status/connections", get(get_connections))
        .route("/v1/status/ipam", get(get_ipam))
        .route("/v1/report", get(get_report))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(ApiState { driver })
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
    socket: PathBuf,
) {
    if let Err(e) = axum::serve(listener, router(driver)).await {
        tracing::error!(socket = %socket.display(), error = %e, "local API stopped");
    }
}

pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new().route(
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
