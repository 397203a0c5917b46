//! The HTTP admin port (`listeners.http`, default 127.0.0.1:7172), served with axum.
//!
//! ```text
//! GET /livez    200 "ok" while the process runs
//! GET /readyz   200 "ready" once recovery is done and the listeners are up,
//!               503 "starting" before that and "shutting down" once shutdown begins
//! GET /metrics  200, every metric in the OpenMetrics text format (see crate::metrics)
//! ```
//!
//! The admin port outlives the protocol listeners on shutdown: it keeps answering (`/readyz`
//! with 503) while client connections drain, so a load balancer sees the broker leave, and
//! [`HttpServer::stop`] ends it last, with axum's graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::BrokerState;

/// The content type of `/metrics`: what prometheus-client encodes, and what Prometheus asks
/// for first.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long [`HttpServer::stop`] waits for admin requests in progress before cutting them off.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The running admin server.
#[derive(Debug)]
pub struct HttpServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The admin routes.
pub fn router(state: Arc<BrokerState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

impl HttpServer {
    /// Serves the admin routes on `listener` (bound to `local_addr`) until
    /// [`HttpServer::stop`], or until the server is dropped.
    pub fn start(listener: TcpListener, local_addr: SocketAddr, state: Arc<BrokerState>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "HTTP admin server failed");
            }
        });
        tracing::info!(http_addr = %local_addr, "HTTP admin listening");
        HttpServer { stop, task }
    }

    /// Stops accepting, lets requests in progress finish (for at most a few seconds).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
            tracing::warn!("HTTP admin connections did not close in time; closing them");
            task.abort();
        }
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<BrokerState>>) -> (StatusCode, &'static str) {
    if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !state.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(state): State<Arc<BrokerState>>) -> Response {
    match state.metrics.render(&state.topics, &state.fetch_budget) {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
