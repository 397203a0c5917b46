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
//!
//! At most [`MAX_ADMIN_CONNECTIONS`] admin connections are served at once; more wait in the
//! listen backlog until one closes. A connection that moves no byte either way for
//! [`ADMIN_IDLE_TIMEOUT`] is closed (axum sets no timer, so hyper's own header timeout is off):
//! silent or idle keep-alive connections would otherwise hold every slot, and the probes
//! would wait in the backlog for ever.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;

use crate::BrokerState;

/// The content type of `/metrics`: what prometheus-client encodes, and what Prometheus asks
/// for first.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Admin connections open at once; more wait in the listen backlog. Scrapers and probes need
/// a handful, and each connection costs a task and its buffers.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// An admin connection moving no byte in either direction for this long is closed.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

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
            let listener = LimitedListener {
                listener,
                slots: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
            };
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
    let lags = state.groups.lags(&state.topics);
    match state
        .metrics
        .render(&state.topics, &state.fetch_budget, lags)
    {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A TCP listener that accepts at most [`MAX_ADMIN_CONNECTIONS`] connections at once.
struct LimitedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

/// An admin connection, holding its slot until it closes, and closed after
/// [`ADMIN_IDLE_TIMEOUT`] without a byte read or written.
struct LimitedStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl LimitedStream {
    fn moved(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + ADMIN_IDLE_TIMEOUT);
    }

    /// Whether the connection has been idle too long; registers for the moment it will be.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "admin connection idle")
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("admin connection slots are never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    return (
                        LimitedStream {
                            stream,
                            _slot: slot,
                            idle: Box::pin(tokio::time::sleep(ADMIN_IDLE_TIMEOUT)),
                        },
                        peer,
                    );
                }
                Err(error) => {
                    // Out of file descriptors, say: back off briefly instead of spinning.
                    tracing::warn!(%error, "HTTP admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.moved();
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl LimitedStream {
    /// A write that moved bytes keeps the connection alive; one blocked past the idle
    /// timeout (a peer that stopped reading) ends it.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(count)) if count > 0 => {
                self.moved();
                Poll::Ready(Ok(count))
            }
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
