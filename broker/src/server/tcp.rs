//! The TCP listener.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sluice_protocol::{ErrorCode, encode_error_response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::BrokerState;
use crate::connection;
use crate::metrics::TRANSPORT_TCP;

/// How long shutdown waits for connections to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until shutdown, then waits for them to drain.
pub async fn accept_loop(listener: TcpListener, state: Arc<BrokerState>) {
    // Shared with the QUIC listener: max_connections counts both transports together.
    let slots = Arc::clone(&state.connection_slots);
    let mut connections = JoinSet::new();
    let mut shutdown = state.shutdown_receiver();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stopping| *stopping) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (mut stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, max_connections = state.config.limits.max_connections, "refusing connection over max_connections");
            let mut answer = BytesMut::new();
            encode_error_response(0, ErrorCode::LimitExceeded, &mut answer);
            let _ = stream.write_all(&answer).await;
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not disable Nagle");
        }
        let open = state.metrics.open_connection(TRANSPORT_TCP);
        let state = Arc::clone(&state);
        let zero_copy = connection::ZeroCopySocket::for_tcp(&stream);
        connections.spawn(async move {
            connection::serve_with(stream, state, peer.to_string(), zero_copy).await;
            drop(open);
            drop(slot);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections did not drain in time; closing them");
        connections.shutdown().await;
    }
}
