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

/// A connection silent this long gets TCP keep-alive probes, [`KEEPALIVE_INTERVAL`] apart, and
/// is closed after [`KEEPALIVE_PROBES`] go unanswered: a peer whose host lost power or network
/// sends no FIN, and without probes its connection would hold a `max_connections` slot (and a
/// group member's or producer's resources) for as long as the broker runs. A live client,
/// idle or not, answers them in its kernel and is never disturbed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// Turns on keep-alive probes for an accepted connection (see [`KEEPALIVE_IDLE`]).
fn probe_when_idle(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

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
        if let Err(error) = probe_when_idle(&stream) {
            tracing::debug!(%peer, %error, "could not turn on TCP keep-alive");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_connection_probes_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        let (stream, _) = accepted.unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap(), "off until turned on");
        probe_when_idle(&stream).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }
}
