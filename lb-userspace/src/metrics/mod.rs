//! The monitoring listener (`[monitoring] listen`): an HTTP server on the
//! agent's runtime serving
//! - `/metrics`: Prometheus/OpenMetrics text ([`render::render`]);
//! - `/`: the live status page (`page.html`, embedded), which polls
//! - `/status.json`: the same [`Status`](crate::control::Status) as
//!   `lb status --json`.
//!
//! A request never blocks the agent's loop: the status is asked of the loop
//! through the control server's channel (a `Request::Status` call, answered
//! in microseconds, one at a time with the other calls), and the flows are
//! counted by walking the flow table on a blocking thread, off the loop
//! ([`server::status`]). At most [`MAX_SNAPSHOTS`] such walks run at once;
//! more requests are answered 503 at once rather than queued.

mod db;
pub mod render;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc},
};
use tracing::warn;

pub use render::ProbeLatency;

use crate::{
    dataplane::FlowTable,
    health::ProbeObserver,
    server::{self, Call},
};

/// Status snapshots (each a walk of the flow table) taken at once.
pub const MAX_SNAPSHOTS: usize = 4;

/// The status page: HTML, CSS and JavaScript in one file, no external
/// assets.
const PAGE: &str = include_str!("page.html");

/// What the listener needs from the agent.
#[derive(Clone)]
pub struct Monitor {
    /// The agent loop's call channel (the control server's).
    pub calls: mpsc::Sender<Call>,
    /// A second handle on the flow table, for counting flows off the loop.
    pub flows: Arc<FlowTable>,
    pub probes: ProbeLatency,
    snapshots: Arc<Semaphore>,
}

impl Monitor {
    pub fn new(calls: mpsc::Sender<Call>, flows: Arc<FlowTable>, probes: ProbeLatency) -> Self {
        Monitor {
            calls,
            flows,
            probes,
            snapshots: Arc::new(Semaphore::new(MAX_SNAPSHOTS)),
        }
    }

    async fn status(&self) -> Result<crate::control::Status, Response> {
        let Ok(_permit) = self.snapshots.try_acquire() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("busy: {MAX_SNAPSHOTS} status snapshots are being taken; retry"),
            )
                .into_response());
        };
        server::status(&self.calls, &self.flows)
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e).into_response())
    }
}

/// The health checks' hook that feeds [`ProbeLatency`].
pub fn probe_observer(probes: &ProbeLatency) -> ProbeObserver {
    let probes = probes.clone();
    Arc::new(move |target, backend, took: Duration| {
        probes.observe(&target.service, backend, took);
    })
}

/// Binds the listener (in the agent's network namespace).
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("monitoring: listening on {address} ([monitoring] listen)"))
}

/// The routes, for [`serve`] and for tests.
pub fn router(monitor: Monitor) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status_json))
        .with_state(monitor)
}

/// Serves until the runtime stops.
pub async fn serve(listener: TcpListener, monitor: Monitor) {
    if let Err(e) = axum::serve(listener, router(monitor)).await {
        warn!("monitoring listener stopped: {e}");
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics(State(monitor): State<Monitor>) -> Response {
    match monitor.status().await {
        Ok(status) => {
            monitor.probes.prune(&status);
            (
                [(header::CONTENT_TYPE, render::CONTENT_TYPE)],
                render::render(&status, &monitor.probes),
            )
                .into_response()
        }
        Err(response) => response,
    }
}

async fn status_json(State(monitor): State<Monitor>) -> Response {
    match monitor.status().await {
        Ok(status) => ([(header::CACHE_CONTROL, "no-store")], Json(status)).into_response(),
        Err(response) => response,
    }
}
