//! The monitoring listener (`[monitoring] listen`): an HTTP server on the
//! agent's runtime serving
//! - `/metrics`: Prometheus/OpenMetrics text ([`render::render`]);
//! - `/`: the live status page (`page.html`, embedded), which polls
//! - `/status.json`: the same [`Status`](crate::wire::Status) as
//!   `lb status --json`.
//!
//! A request never blocks the agent's loop: the status is asked of the loop
//! through the control server's channel (a `Request::Status` call, answered
//! in microseconds, one at a time with the other calls), and the flows are
//! counted by walking the flow table on a blocking thread, off the loop
//! ([`server::status`]). At most [`MAX_SNAPSHOTS`] such walks run at once;
//! more requests are answered 503 at once rather than queued.
//!
//! The listener never starves the agent of file descriptors: it serves at
//! most [`MAX_CONNECTIONS`] connections at once (more are answered 503 and
//! closed), one request each, whose header must arrive within
//! [`HEADER_TIMEOUT`] (a client trickling a header line every few seconds
//! is cut off), each connection living at most [`CONNECTION_LIFETIME`].

mod db;
pub mod render;
mod sync;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
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

    async fn status(&self) -> Result<crate::wire::Status, Response> {
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

/// Monitoring connections served at once. More are answered 503 and
/// closed at once: whoever opens connections (and trickles a header line
/// now and then) holds at most this many of the agent's descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send a request's whole header within this time, or its
/// connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, whatever it does (one request each:
/// no keep-alive), so a client that never reads its answer lets go too.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What a connection past [`MAX_CONNECTIONS`] gets before it is closed.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n";

/// Serves until the runtime stops: at most [`MAX_CONNECTIONS`] at once,
/// each within [`HEADER_TIMEOUT`] per request header and
/// [`CONNECTION_LIFETIME`] in all.
pub async fn serve(listener: TcpListener, monitor: Monitor) {
    serve_router(listener, router(monitor)).await;
}

/// [`serve`] of any routes (tests use their own).
async fn serve_router(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: wait rather than spin.
                warn!("monitoring listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Best effort, without waiting: the socket's buffer is empty.
            let _ = stream.try_write(BUSY_RESPONSE);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // Closed by the client, cut by a timeout, or over its lifetime:
            // nothing the agent needs to hear about.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
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

#[cfg(test)]
mod listener_tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    async fn listening() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new().route("/", get(|| async { "hello" }));
        tokio::spawn(serve_router(listener, app));
        address
    }

    async fn answer(stream: &mut TcpStream) -> String {
        let mut text = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
            .await
            .expect("closed in time");
        text
    }

    /// Issue 21: a client trickling a header line every second is cut off
    /// once `HEADER_TIMEOUT` is over, however often it sends.
    #[tokio::test]
    async fn a_trickled_header_is_cut_off() {
        let address = listening().await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let started = Instant::now();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.expect("line");
        let mut closed = false;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if stream
                .write_all(format!("X-{i}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            let mut byte = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(10), stream.read(&mut byte)).await
            {
                closed = true;
                break;
            }
        }
        let took = started.elapsed();
        assert!(closed, "still open after {took:?}");
        assert!(
            took >= HEADER_TIMEOUT && took < HEADER_TIMEOUT + Duration::from_secs(3),
            "closed after {took:?}"
        );
    }

    /// Past `MAX_CONNECTIONS` held open, the next is answered 503 and
    /// closed; a slot that frees serves again.
    #[tokio::test]
    async fn connections_past_the_cap_get_503() {
        let address = listening().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(TcpStream::connect(address).await.expect("connect"));
        }
        // Let the listener take every one of them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut extra = TcpStream::connect(address).await.expect("connect");
        let text = answer(&mut extra).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        held.clear();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut fresh = TcpStream::connect(address).await.expect("connect");
        fresh
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let text = answer(&mut fresh).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "{text:?}"
        );
    }
}
