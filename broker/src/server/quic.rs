//! The QUIC listener: one quinn endpoint on UDP, TLS 1.3 with ALPN `sluice/1`.
//!
//! ```text
//! endpoint.accept() ─▶ connection slot? ─no──▶ refused (max_connections, shared with TCP)
//!                            │yes
//!                            ▼
//!                        handshake ─▶ accept_bi() ─┬─▶ stream ─▶ connection::serve
//!                                     (at most      ├─▶ stream ─▶ connection::serve
//!                                   max_quic_streams└─▶ ...
//!                                    open at once)
//! ```
//!
//! Each bidirectional stream is an independent request/response channel carrying the same
//! frames as a TCP connection, so [`connection::serve`] serves it unchanged: frame limits,
//! in-flight limits and the mid-frame deadline apply per stream. A bad frame ends only its
//! stream; the connection's other streams, and other clients, carry on.
//!
//! QUIC itself bounds what a client can open: at most `limits.max_quic_streams` bidirectional
//! streams at once (a client asking for more waits until one closes), no unidirectional
//! streams, and a connection-wide receive window.
//!
//! Shutdown: the endpoint stops taking connections, each connection stops taking streams, the
//! streams drain through `serve` (which watches the same signal), then each connection is held
//! until the peer closes it or [`PEER_CLOSE_GRACE`] passes. Closing at once would be abrupt: a
//! QUIC close discards stream data the peer has not acknowledged yet, so the last answers
//! could be lost (DEPENDENCIES.md, pitfall 3). Last, the endpoint closes and waits until idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::connection;
use crate::metrics::TRANSPORT_QUIC;
use crate::tls::{self, TlsError};
use crate::{BrokerState, StartError};

/// How long shutdown waits for connections to finish their in-flight requests (as TCP).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection whose streams have all finished is held open at shutdown for the peer
/// to read the last answers and close it.
const PEER_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long closing the endpoint may wait for its connections' close to reach their peers.
const ENDPOINT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection sends a keep-alive this often, so a long-poll fetch waiting for data is
/// not mistaken for a dead peer (quinn's idle timeout is 30 s, as `fetch_max_wait_ms`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes a client may have in flight towards the broker across all its streams, held by quinn
/// until read. What the streams have read is bounded by their slots: every stream after a
/// connection's first takes a connection slot of its own (see `serve_connection`).
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Application error code of a stream refused because every connection slot is taken.
const NO_SLOT_CODE: u32 = 1;
/// Application error code of a connection the broker closes because it is shutting down.
const SHUTTING_DOWN_CODE: u32 = 0;

/// Loads or creates the certificate and binds the endpoint on `listeners.quic`. Returns the
/// endpoint and the address it is bound to (port 0 picks a free port).
///
/// # Errors
/// [`StartError::Tls`] without a usable certificate, [`StartError::Bind`] when the UDP address
/// cannot be bound.
pub async fn bind(config: &Config) -> Result<(quinn::Endpoint, SocketAddr), StartError> {
    let listeners = config.listeners.clone();
    let data_dir = config.data_dir.clone();
    // Reading, generating and fsyncing certificate and key files blocks.
    let (tls_config, keys) = tokio::task::spawn_blocking(move || {
        Ok::<_, TlsError>((
            tls::server_config(&listeners, &data_dir)?,
            tls::quic_endpoint_keys(&data_dir)?,
        ))
    })
    .await
    .map_err(|error| TlsError::Generate(format!("the certificate task failed: {error}")))??;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls_config)
        .map_err(|error| TlsError::Config(format!("not usable for QUIC: {error}")))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(config)));

    let address = config.listeners.quic;
    let bind_error = |source| StartError::Bind {
        what: "quic",
        address,
        source,
    };
    let socket = std::net::UdpSocket::bind(address).map_err(bind_error)?;
    let receive_buffer = raise_receive_buffer(&socket, UDP_RECEIVE_BUFFER_BYTES);
    // Kept across restarts, so a restarted broker tells its old connections' clients at once
    // that they are gone (see `tls::quic_endpoint_keys`).
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(keys.reset));
    let connection_ids = keys.connection_ids;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(
            connection_ids,
        ))
    });
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    let quic_addr = endpoint.local_addr().map_err(bind_error)?;
    tracing::info!(%quic_addr, receive_buffer, "QUIC listening (UDP, ALPN sluice/1)");
    if receive_buffer < UDP_RECEIVE_BUFFER_BYTES {
        tracing::warn!(
            receive_buffer,
            wanted = UDP_RECEIVE_BUFFER_BYTES,
            "the UDP receive buffer is small: bursts from fast QUIC producers may be dropped \
             and resent; raise net.core.rmem_max (sysctl) to at least the wanted size"
        );
    }
    Ok((endpoint, quic_addr))
}

/// The UDP receive buffer the QUIC socket asks for. Linux's default (208 KiB) holds about 150
/// full-size datagrams: a producer's burst of 256 KiB batches overflows it, and every dropped
/// datagram costs a retransmission and a congestion-window cut.
const UDP_RECEIVE_BUFFER_BYTES: usize = 8 << 20;

/// Asks for a receive buffer of `bytes`: past `net.core.rmem_max` when the broker may
/// (SO_RCVBUFFORCE, with CAP_NET_ADMIN), else up to that limit. Returns the size the kernel
/// reports (which counts its bookkeeping too, so up to twice what was asked).
fn raise_receive_buffer(socket: &std::net::UdpSocket, bytes: usize) -> usize {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option| {
        // SAFETY: `value` is a live c_int and its size is passed with it; `fd` is the socket's.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) {
        set(libc::SO_RCVBUF);
    }
    let mut actual: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `actual` and `length` are live and sized as getsockopt expects.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_mut(&mut actual).cast(),
            &mut length,
        )
    };
    if read == 0 {
        usize::try_from(actual).unwrap_or(0)
    } else {
        0
    }
}

fn transport_config(config: &Config) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(config.limits.max_quic_streams))
        // Sluice uses request/response streams only.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    transport
}

/// Longest a QUIC handshake may take before its connection slot is given back.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until shutdown, then lets them drain and closes the endpoint.
pub async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<BrokerState>) {
    let mut connections = JoinSet::new();
    let mut shutdown = state.shutdown_receiver();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stopping| *stopping) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        // None: the endpoint was closed, which only this function does.
        let Some(incoming) = incoming else { break };
        // A first Initial from an address not yet shown to be the sender's gets a stateless
        // Retry (no state, no slot): a flood of Initials from spoofed addresses then costs
        // nothing, instead of holding every connection slot (TCP's too) in half-open
        // handshakes. A real client answers the Retry and comes back validated.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = Arc::clone(&state.connection_slots).try_acquire_owned() else {
            // Refused before the handshake: an over-limit client costs no TLS work or state.
            tracing::warn!(
                peer = %incoming.remote_address(),
                max_connections = state.config.limits.max_connections,
                "refusing QUIC connection over max_connections"
            );
            incoming.refuse();
            continue;
        };
        connections.spawn(serve_connection(incoming, Arc::clone(&state), slot));
    }
    // Newcomers are refused from here on; the connections below wind down.
    endpoint.set_server_config(None);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("QUIC connections did not drain in time; closing them");
        connections.shutdown().await;
    }
    endpoint.close(
        VarInt::from_u32(SHUTTING_DOWN_CODE),
        b"broker shutting down",
    );
    let _ = tokio::time::timeout(ENDPOINT_IDLE_TIMEOUT, endpoint.wait_idle()).await;
}

/// Completes the handshake, then serves every bidirectional stream the peer opens until the
/// peer closes the connection or the broker shuts down. Holds one connection slot throughout,
/// which covers one stream; each stream open beside another takes a slot of its own while it
/// lasts, or is reset when none is free. A stream is served as a TCP connection is (its own
/// buffers, writer and in-flight requests), so without this one slot could hold
/// `max_quic_streams` connections' worth of memory.
async fn serve_connection(
    incoming: quinn::Incoming,
    state: Arc<BrokerState>,
    slot: OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    // A peer that starts a handshake and never finishes it holds its slot this long at most.
    let quic_connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(quic_connection)) => quic_connection,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "QUIC handshake not finished in time");
            return;
        }
    };
    tracing::debug!(%remote, "QUIC connection opened");
    let _open = state.metrics.open_connection(TRANSPORT_QUIC);
    let mut streams = JoinSet::new();
    // The stream the connection's slot covers: held by whichever stream took it, while it lasts.
    let first_stream = Arc::new(tokio::sync::Semaphore::new(1));
    let mut refused_streams: u64 = 0;
    let mut shutdown = state.shutdown_receiver();
    let shutting_down = loop {
        tokio::select! {
            accepted = quic_connection.accept_bi() => match accepted {
                Ok((mut send_stream, mut receive_stream)) => {
                    let peer = format!("quic://{remote} stream {}", send_stream.id().index());
                    // The connection's own slot if no stream holds it, else one of the broker's.
                    let stream_slot = match Arc::clone(&first_stream).try_acquire_owned() {
                        Ok(slot) => slot,
                        Err(_) => match Arc::clone(&state.connection_slots).try_acquire_owned() {
                            Ok(slot) => slot,
                            Err(_) => {
                                // A peer can open and be refused streams in a loop, with no
                                // handshake each as TCP needs: one warning per connection.
                                if refused_streams == 0 {
                                    tracing::warn!(
                                        %peer,
                                        max_connections = state.config.limits.max_connections,
                                        "refusing a QUIC stream: every connection slot is taken (further refusals on this connection are logged at debug level)"
                                    );
                                } else {
                                    tracing::debug!(%peer, refused_streams, "refusing a QUIC stream: every connection slot is taken");
                                }
                                refused_streams += 1;
                                let code = VarInt::from_u32(NO_SLOT_CODE);
                                let _ = send_stream.reset(code);
                                let _ = receive_stream.stop(code);
                                continue;
                            }
                        },
                    };
                    // One duplex stream out of the two halves, as `serve` takes a TCP socket.
                    let stream = tokio::io::join(receive_stream, send_stream);
                    let state = Arc::clone(&state);
                    streams.spawn(async move {
                        connection::serve(stream, state, peer).await;
                        drop(stream_slot);
                    });
                }
                Err(error) => {
                    tracing::debug!(%remote, %error, "QUIC connection ended");
                    break false;
                }
            },
            // `wait_for`, not `changed`: shutdown may have started before this task subscribed.
            _ = shutdown.wait_for(|stopping| *stopping) => break true,
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    };
    // Each stream's `serve` sees the same signal (or the lost connection) and finishes its
    // in-flight requests first.
    while streams.join_next().await.is_some() {}
    if shutting_down {
        // Every answer has been handed to quinn, but a close now would drop what the peer has
        // not acknowledged. The peer closes once it has read its streams to the end.
        let _ = tokio::time::timeout(PEER_CLOSE_GRACE, quic_connection.closed()).await;
        quic_connection.close(
            VarInt::from_u32(SHUTTING_DOWN_CODE),
            b"broker shutting down",
        );
    }
    tracing::debug!(%remote, "QUIC connection closed");
    drop(slot);
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    /// The QUIC socket's receive buffer is raised: to what was asked where the broker may go
    /// past `net.core.rmem_max` (as root), else at least to that limit.
    #[test]
    fn the_udp_receive_buffer_is_raised() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let got = raise_receive_buffer(&socket, UDP_RECEIVE_BUFFER_BYTES);
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let floor = if root {
            UDP_RECEIVE_BUFFER_BYTES
        } else {
            UDP_RECEIVE_BUFFER_BYTES.min(rmem_max)
        };
        assert!(
            got >= floor,
            "receive buffer {got} bytes, expected at least {floor}"
        );
    }
}
