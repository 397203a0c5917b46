//! One multiplexed connection to a broker: many requests in flight at once, responses matched
//! to their requests by correlation id, whatever order they come back in.
//!
//! ```no_run
//! use sluice_client::protocol::Response;
//! use sluice_client::protocol::messages::ApiVersionsRequest;
//! use sluice_client::{Connection, ConnectionOptions};
//! use std::time::Duration;
//!
//! # async fn example() -> sluice_client::error::Result<()> {
//! let options = ConnectionOptions::default().request_timeout(Duration::from_secs(5));
//! let connection = Connection::connect_with("tcp://127.0.0.1:7171", options).await?;
//! if let Response::ApiVersions(versions) = connection.send(ApiVersionsRequest {}).await? {
//!     println!("the broker speaks {} apis", versions.apis.len());
//! }
//! connection.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Inside, two tasks own the two halves of the transport; callers only touch a map of pending
//! requests and a bounded queue of encoded frames:
//!
//! ```text
//!  send() ──(correlation id, api key, oneshot)──▶ pending map ◀──complete by id── reader task
//!    │  ▲                                                                          ▲
//!    │  └──────────── Result<Response> over the oneshot ◀──────────────────────────┤
//!    │                                                             FrameDecoder    │
//!    └──encoded frame──▶ bounded mpsc ──▶ writer task ──BufWriter──▶ socket ──▶ broker
//!                                         (drains the queue, then one flush)
//! ```
//!
//! When the reader meets the end of the stream or an error, or the writer fails, the
//! connection is closed for good: every pending request fails with
//! [`Error::ConnectionClosed`] and so does every later call. Reconnecting is the caller's job
//! (the producer and consumer do it with backoff).
//!
//! The tasks are generic over the transport's read and write halves, so TCP is one
//! instantiation and a QUIC stream pair is another.
//!
//! # QUIC
//!
//! `quic://host:port` opens one QUIC connection (TLS 1.3, ALPN `sluice/1`, the URL's host as
//! the server name) and one bidirectional stream on it, and runs the same two tasks over that
//! stream. Every request of a [`Connection`] therefore shares one stream, so produces to a
//! partition arrive in the order they were sent, as over TCP. The broker's certificate is
//! checked against the CA file of [`ConnectionOptions::ca_file`] and nothing else: this client
//! carries no platform root certificates, so `quic://` without a CA file fails at once with
//! [`Error::InvalidUrl`]. A broker without a configured certificate makes its own and writes it
//! to `<data-dir>/tls/cert.pem`, which is the CA file to pass (`--ca-file` or `SLUICE_CA_FILE`
//! on the command line).
//!
//! Closing waits for the broker to acknowledge everything written on the stream (an
//! `acks = none` produce queued just before the close, say) before it closes the QUIC
//! connection, because a QUIC close discards unacknowledged data.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sluice_protocol::frame::{DEFAULT_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES};
use sluice_protocol::{ApiKey, FrameDecoder, Request, Response, decode_response_header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{Instrument, debug, warn};

use crate::error::{Error, Result};

/// Bytes the reader asks the socket for at a time (at least).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Bytes the writer gathers before a write reaches the socket.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Frames the writer takes off the queue before it flushes. Bounds the time a flush can be put
/// off while callers keep the queue full.
const MAX_FRAMES_PER_FLUSH: usize = 256;
/// The ALPN protocol of Sluice over QUIC; the broker refuses a handshake without it.
const QUIC_ALPN_PROTOCOL: &[u8] = b"sluice/1";
/// An idle QUIC connection sends a keep-alive this often, so that waiting on a long-poll fetch
/// does not run into the idle timeout (30 s on both sides).
const QUIC_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long closing waits for the QUIC close to reach the broker before releasing the socket.
const QUIC_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The QUIC application error code of a close on purpose.
const QUIC_CLOSED_CODE: u32 = 0;

/// How a [`Connection`] behaves. Build it with chained setters:
///
/// ```
/// use std::time::Duration;
/// use sluice_client::ConnectionOptions;
///
/// let options = ConnectionOptions::default()
///     .request_timeout(Duration::from_secs(5))
///     .max_in_flight(64);
/// assert_eq!(options.max_in_flight, 64);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// Largest frame accepted from the broker, and largest request frame sent to it.
    pub max_frame_bytes: u32,
    /// How long a request may take, from the call to its response (waiting for an in-flight
    /// slot included). Also bounds how long [`Connection::close`] waits for queued frames.
    pub request_timeout: Duration,
    /// How long resolving the host and opening the connection may take.
    pub connect_timeout: Duration,
    /// Requests awaiting their response at once; further sends wait for a slot.
    pub max_in_flight: usize,
    /// PEM file of the certificates trusted to sign the broker's QUIC certificate. Required for
    /// `quic://`; unused for `tcp://`.
    pub ca_file: Option<PathBuf>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_in_flight: 256,
            ca_file: None,
        }
    }
}

impl ConnectionOptions {
    /// Largest frame accepted from the broker, and largest request frame sent to it. A bigger
    /// response closes the connection (the stream cannot be resynchronised after it); a bigger
    /// request fails with [`Error::RequestTooLarge`] without being sent.
    ///
    /// Default = 8 MiB (the protocol's `DEFAULT_MAX_FRAME_BYTES`, as the broker's).
    pub fn max_frame_bytes(mut self, max_frame_bytes: u32) -> Self {
        self.max_frame_bytes = max_frame_bytes;
        self
    }

    /// How long [`Connection::send`] may take in all, and how long
    /// [`Connection::send_without_response`] may wait for room in the write queue.
    ///
    /// Default = 30 s.
    pub fn request_timeout(mut self, request_timeout: Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }

    /// How long resolving the host name and opening the connection may take.
    ///
    /// Default = 10 s.
    pub fn connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// How many requests may await their response at once; a send beyond it waits for a slot.
    /// It also sizes the queue of frames waiting for the socket. 0 is taken as 1.
    ///
    /// Default = 256.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// PEM file of the certificate authorities trusted for a `quic://` broker: the broker's
    /// certificate must chain to one of them (its name must match the URL's host too). For a
    /// broker that made its own certificate, this is `<data-dir>/tls/cert.pem`. Command line
    /// tools take it from `--ca-file` or `SLUICE_CA_FILE`.
    ///
    /// Default = none: `quic://` then fails with [`Error::InvalidUrl`], since no platform root
    /// certificates are built in.
    pub fn ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    fn in_flight_limit(&self) -> usize {
        self.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)
    }
}

/// A connection to one broker, shared by cloning: clones are cheap handles onto the same
/// socket, and any number of tasks may send through it at once.
///
/// The connection closes when [`close`](Connection::close) is called, when the broker or the
/// network drops it, or when the last handle is dropped.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

/// What the handles own; dropping the last one closes the connection.
struct Inner {
    shared: Arc<Shared>,
    frame_sender: mpsc::Sender<Frame>,
    /// Becomes true when the writer task has finished, so `close` can wait for queued frames.
    writer_done: watch::Receiver<bool>,
    /// Becomes true when the transport is released: at once for TCP (the halves close with
    /// their tasks), after the QUIC connection is closed and its endpoint idle for QUIC.
    transport_closed: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No handle is left to send or to await a response, so nothing is pending: closing
        // only tells the tasks to finish and release the socket.
        self.shared.close();
    }
}

/// What the handles and both tasks share.
struct Shared {
    peer: String,
    options: ConnectionOptions,
    state: Mutex<State>,
    /// One permit per request awaiting its response.
    in_flight_slots: Arc<Semaphore>,
    /// Set to true once, when the connection closes; both tasks watch it.
    closing: watch::Sender<bool>,
}

/// The part of [`Shared`] behind its lock. `closed` lives beside `pending` so that a request
/// is either registered before the connection closes (and failed by the close) or refused.
struct State {
    closed: bool,
    next_correlation_id: u32,
    pending: HashMap<u32, PendingEntry>,
}

/// A request awaiting its response.
struct PendingEntry {
    /// Which body type the response carries.
    api_key: ApiKey,
    response_sender: oneshot::Sender<Result<Response>>,
    /// The in-flight slot of a request queued with [`Connection::enqueue`]: free again as
    /// soon as the answer is in (or the request is given up), not when its caller gets round
    /// to reading it. A caller queueing more before it reads its answers (the producer's
    /// sender) would otherwise wait for slots its own unread answers hold.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Connection {
    /// Connects to the broker at `url` with default options.
    ///
    /// # Errors
    /// See [`connect_with`](Connection::connect_with).
    pub async fn connect(url: &str) -> Result<Connection> {
        Connection::connect_with(url, ConnectionOptions::default()).await
    }

    /// Connects to the broker at `url`: `tcp://host:port` or `quic://host:port`, where host is
    /// a name, an IPv4 address or a bracketed IPv6 address (`tcp://[::1]:7171`). Every address
    /// the name resolves to is tried in turn. `quic://` needs
    /// [`ca_file`](ConnectionOptions::ca_file) (see the [module docs](self#quic)).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL without a scheme, host or port, with an unknown scheme,
    /// or with `quic://` and no usable CA file. [`Error::Connect`] when no address accepts the
    /// connection (a QUIC handshake failing on the certificate included) within
    /// `connect_timeout`.
    pub async fn connect_with(url: &str, options: ConnectionOptions) -> Result<Connection> {
        let endpoint = Endpoint::parse(url)?;
        match endpoint.transport {
            Transport::Tcp => {
                let address = endpoint.address();
                let stream = tokio::time::timeout(options.connect_timeout, connect_tcp(&endpoint))
                    .await
                    .map_err(|_elapsed| Error::Connect {
                        address: address.clone(),
                        source: io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no connection within {} ms",
                                duration_ms(options.connect_timeout)
                            ),
                        ),
                    })??;
                // Requests are small and latency matters more than packet count; the writer
                // already batches whatever is queued into one write.
                stream
                    .set_nodelay(true)
                    .map_err(|source| Error::Connect { address, source })?;
                let low_water = ReceiveLowWater::for_tcp(&stream);
                let (read_half, write_half) = stream.into_split();
                Ok(Connection::from_transport(
                    url.to_owned(),
                    (read_half, low_water),
                    write_half,
                    options,
                    None,
                ))
            }
            Transport::Quic => {
                let client_config = quic_client_config(url, options.ca_file.as_deref()).await?;
                let address = endpoint.address();
                let quic = tokio::time::timeout(
                    options.connect_timeout,
                    connect_quic(&endpoint, client_config),
                )
                .await
                .map_err(|_elapsed| Error::Connect {
                    address: address.clone(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no QUIC connection within {} ms",
                            duration_ms(options.connect_timeout)
                        ),
                    ),
                })??;
                // One stream for every request, so requests keep their order as over TCP. The
                // broker allows at least one stream, so this does not wait.
                let (send_stream, receive_stream) =
                    quic.connection
                        .open_bi()
                        .await
                        .map_err(|error| Error::Connect {
                            address,
                            source: io::Error::other(format!("cannot open a QUIC stream: {error}")),
                        })?;
                Ok(Connection::from_transport(
                    url.to_owned(),
                    (receive_stream, None),
                    AcknowledgedSendStream::new(send_stream),
                    options,
                    Some(quic),
                ))
            }
        }
    }

    /// Starts the reader and writer tasks over an open transport.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    #[cfg(test)]
    pub(crate) fn from_halves<R, W>(
        peer: String,
        read_half: R,
        write_half: W,
        options: ConnectionOptions,
    ) -> Connection
    where
        R: AsyncRead + Send + 'static,
        W: AsyncWrite + Send + 'static,
    {
        Connection::from_transport(peer, (read_half, None), write_half, options, None)
    }

    /// Starts the reader and writer tasks over an open transport: a read half with the TCP
    /// socket's low-water mark when it has one, and the QUIC connection the halves belong to,
    /// which is kept open until the writer is done and then closed.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    fn from_transport<R, W>(
        peer: String,
        (read_half, low_water): (R, Option<ReceiveLowWater>),
        write_half: W,
        options: ConnectionOptions,
        quic: Option<QuicTransport>,
    ) -> Connection
    where
        R: AsyncRead + Send + 'static,
        W: AsyncWrite + Send + 'static,
    {
        let in_flight_limit = options.in_flight_limit();
        let shared = Arc::new(Shared {
            peer: peer.clone(),
            options,
            state: Mutex::new(State {
                closed: false,
                next_correlation_id: 1,
                pending: HashMap::new(),
            }),
            in_flight_slots: Arc::new(Semaphore::new(in_flight_limit)),
            closing: watch::Sender::new(false),
        });
        // The queue is bounded like everything else: a caller that outruns the socket waits.
        let (frame_sender, frame_receiver) = mpsc::channel(in_flight_limit);
        let (writer_done_sender, writer_done) = watch::channel(false);
        let span = tracing::debug_span!("connection", peer = %peer);
        tokio::spawn(
            run_reader(read_half, low_water, Arc::clone(&shared)).instrument(span.clone()),
        );
        tokio::spawn(
            run_writer(
                write_half,
                frame_receiver,
                Arc::clone(&shared),
                writer_done_sender,
            )
            .instrument(span.clone()),
        );
        let (transport_closed_sender, transport_closed) = watch::channel(quic.is_none());
        if let Some(quic) = quic {
            tokio::spawn(
                close_quic_after_writer(quic, writer_done.clone(), transport_closed_sender)
                    .instrument(span),
            );
        }
        Connection {
            inner: Arc::new(Inner {
                shared,
                frame_sender,
                writer_done,
                transport_closed,
            }),
        }
    }

    /// Sends a request and waits for its response.
    ///
    /// Any number of sends may run at once on one connection; at most `max_in_flight` of them
    /// await a response, the others wait for a slot. The whole call is bounded by
    /// `request_timeout`. Dropping the future gives up on the response (a late one is dropped).
    ///
    /// # Errors
    /// - [`Error::Broker`] when the response header carries an error code (the request failed
    ///   as a whole; per-partition errors are inside a successful response).
    /// - [`Error::Protocol`] when the response body does not decode.
    /// - [`Error::Timeout`] when no response arrived within `request_timeout`.
    /// - [`Error::ConnectionClosed`] when the connection is closed or closes before the
    ///   response arrives.
    /// - [`Error::RequestTooLarge`] when the encoded request is over `max_frame_bytes`.
    pub async fn send(&self, request: impl Into<Request>) -> Result<Response> {
        let request = request.into();
        if self.is_closed() {
            return Err(Error::ConnectionClosed);
        }
        let request_timeout = answer_within(&request, self.inner.shared.options.request_timeout);
        match tokio::time::timeout(request_timeout, self.send_and_await(&request)).await {
            Ok(result) => result,
            // The timeout dropped the inner future, whose guard removed the pending entry.
            Err(_elapsed) => Err(Error::Timeout {
                timeout_ms: duration_ms(request_timeout),
            }),
        }
    }

    async fn send_and_await(&self, request: &Request) -> Result<Response> {
        let shared = &self.inner.shared;
        // The semaphore is closed when the connection closes, which wakes every waiter.
        let _in_flight_slot = shared
            .in_flight_slots
            .acquire()
            .await
            .map_err(|_closed| Error::ConnectionClosed)?;
        let (registration, response_receiver) = shared.register(request.api_key(), None)?;
        let frame = encode_frame(
            request,
            registration.correlation_id,
            shared.options.max_frame_bytes,
        )?;
        self.inner
            .frame_sender
            .send(frame)
            .await
            .map_err(|_closed| Error::ConnectionClosed)?;
        // A dropped sender means the entry was removed without an answer, which only a close
        // does (it sends ConnectionClosed first, but a race with the drop is harmless).
        let result = response_receiver
            .await
            .unwrap_or(Err(Error::ConnectionClosed));
        drop(registration);
        result
    }

    /// Sends a request the broker does not answer (a produce with `acks = none`): the frame is
    /// queued for the socket and nothing waits for a response. Returning `Ok` means the frame
    /// was queued, not that the broker received it. Should the broker answer anyway, the
    /// response is logged and dropped.
    ///
    /// # Errors
    /// [`Error::ConnectionClosed`] when the connection is closed, [`Error::Timeout`] when the
    /// write queue stayed full for `request_timeout`, [`Error::RequestTooLarge`] when the
    /// encoded request is over `max_frame_bytes`.
    /// Queues a request and returns once its frame is in the connection's write queue, with a
    /// handle to await the answer. Requests queued one after the other by one caller go out in
    /// that order: the producer relies on this to keep a partition's batches in sequence order.
    pub async fn enqueue(&self, request: impl Into<Request>) -> Result<PendingResponse> {
        let request = request.into();
        let shared = &self.inner.shared;
        if self.is_closed() {
            return Err(Error::ConnectionClosed);
        }
        let request_timeout = answer_within(&request, shared.options.request_timeout);
        let deadline = tokio::time::Instant::now() + request_timeout;
        let timeout_ms = duration_ms(request_timeout);
        let queued = async {
            let slot = Arc::clone(&shared.in_flight_slots)
                .acquire_owned()
                .await
                .map_err(|_closed| Error::ConnectionClosed)?;
            let (registration, receiver) = shared.register(request.api_key(), Some(slot))?;
            let correlation_id = registration.correlation_id;
            // Hand the entry's cleanup to an owned guard that outlives this call.
            std::mem::forget(registration);
            let registration = OwnedRegistration {
                shared: Arc::clone(shared),
                correlation_id,
            };
            let frame = encode_frame(&request, correlation_id, shared.options.max_frame_bytes)?;
            self.inner
                .frame_sender
                .send(frame)
                .await
                .map_err(|_closed| Error::ConnectionClosed)?;
            Ok(PendingResponse {
                receiver,
                deadline,
                timeout_ms,
                _registration: registration,
            })
        };
        match tokio::time::timeout_at(deadline, queued).await {
            Ok(result) => result,
            Err(_elapsed) => Err(Error::Timeout { timeout_ms }),
        }
    }

    pub async fn send_without_response(&self, request: impl Into<Request>) -> Result<()> {
        let request = request.into();
        let shared = &self.inner.shared;
        let correlation_id = shared.unregistered_correlation_id()?;
        let frame = encode_frame(&request, correlation_id, shared.options.max_frame_bytes)?;
        let request_timeout = shared.options.request_timeout;
        match tokio::time::timeout(request_timeout, self.inner.frame_sender.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(Error::ConnectionClosed),
            Err(_elapsed) => Err(Error::Timeout {
                timeout_ms: duration_ms(request_timeout),
            }),
        }
    }

    /// True once the connection is closed; every send then fails with
    /// [`Error::ConnectionClosed`].
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock_state().closed
    }

    /// Tells this connection from others (its clones share it) while it is open.
    pub(crate) fn identity(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// The URL this connection was opened with.
    pub fn peer(&self) -> &str {
        &self.inner.shared.peer
    }

    /// Requests sent with [`send`](Connection::send) that still await their response.
    pub fn in_flight_count(&self) -> usize {
        self.inner.shared.lock_state().pending.len()
    }

    /// Closes the connection for every handle: pending requests fail with
    /// [`Error::ConnectionClosed`], frames already queued (such as `acks = none` produces) are
    /// still written, then the write side is shut down. Waits at most `request_timeout` for
    /// the queued frames. Over QUIC it then closes the QUIC connection, once the broker has
    /// acknowledged them. Closing a closed connection does nothing more.
    pub async fn close(&self) {
        self.inner.shared.close();
        let mut writer_done = self.inner.writer_done.clone();
        // An error means the writer task is gone already, which is just as done.
        let _ = writer_done.wait_for(|done| *done).await;
        let mut transport_closed = self.inner.transport_closed.clone();
        let _ = transport_closed.wait_for(|closed| *closed).await;
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.shared.lock_state();
        f.debug_struct("Connection")
            .field("peer", &self.inner.shared.peer)
            .field("closed", &state.closed)
            .field("in_flight", &state.pending.len())
            .finish()
    }
}

/// Removes its pending entry when the send that registered it ends, however it ends: answered
/// (the entry is gone already), failed, timed out or dropped. This keeps the map bounded.
struct Registration<'a> {
    shared: &'a Shared,
    correlation_id: u32,
}

/// The owned form of [`Registration`], for a request whose answer is awaited after the call
/// that queued it returned.
struct OwnedRegistration {
    shared: Arc<Shared>,
    correlation_id: u32,
}

impl Drop for OwnedRegistration {
    fn drop(&mut self) {
        self.shared
            .lock_state()
            .pending
            .remove(&self.correlation_id);
    }
}

/// The answer to a request already queued on the connection (see [`Connection::enqueue`]).
pub struct PendingResponse {
    receiver: oneshot::Receiver<Result<Response>>,
    deadline: tokio::time::Instant,
    timeout_ms: u64,
    _registration: OwnedRegistration,
}

impl std::fmt::Debug for PendingResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingResponse").finish_non_exhaustive()
    }
}

impl PendingResponse {
    /// Waits for the answer, up to the request timeout counted from when it was queued.
    pub async fn response(self) -> Result<Response> {
        match tokio::time::timeout_at(self.deadline, self.receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_dropped)) => Err(Error::ConnectionClosed),
            Err(_elapsed) => Err(Error::Timeout {
                timeout_ms: self.timeout_ms,
            }),
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared
            .lock_state()
            .pending
            .remove(&self.correlation_id);
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic halfway through an update, so the
        // state behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a request under a fresh correlation id, unless the connection is closed.
    fn register(
        &self,
        api_key: ApiKey,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Registration<'_>, oneshot::Receiver<Result<Response>>)> {
        let (response_sender, response_receiver) = oneshot::channel();
        let mut state = self.lock_state();
        if state.closed {
            return Err(Error::ConnectionClosed);
        }
        // Ids wrap after 2^32 requests; skipping the ones still pending keeps matching exact.
        // The loop ends within `pending.len() + 2` steps, and the semaphore bounds `pending`.
        // Id 0 is never used: it is what a broker answers when it cannot tell which request a
        // frame was (a connection refused over `max_connections`, a frame it could not read),
        // and such an answer, followed by the connection closing, must fail every request
        // alike, as a lost connection, rather than be taken for the first request's answer.
        let correlation_id = loop {
            let candidate = state.next_correlation_id;
            state.next_correlation_id = candidate.wrapping_add(1);
            if candidate == 0 {
                continue;
            }
            if let Entry::Vacant(vacant) = state.pending.entry(candidate) {
                vacant.insert(PendingEntry {
                    api_key,
                    response_sender,
                    _slot: slot,
                });
                break candidate;
            }
        };
        drop(state);
        Ok((
            Registration {
                shared: self,
                correlation_id,
            },
            response_receiver,
        ))
    }

    /// A correlation id for a request nobody waits on, unless the connection is closed.
    fn unregistered_correlation_id(&self) -> Result<u32> {
        let mut state = self.lock_state();
        if state.closed {
            return Err(Error::ConnectionClosed);
        }
        loop {
            let candidate = state.next_correlation_id;
            state.next_correlation_id = candidate.wrapping_add(1);
            if candidate != 0 && !state.pending.contains_key(&candidate) {
                return Ok(candidate);
            }
        }
    }

    /// Hands a response frame to the request it answers.
    fn complete(&self, frame: Bytes) {
        let (header, body) = match decode_response_header(frame) {
            Ok(parts) => parts,
            Err(error) => {
                // The frame decoder guarantees a whole header, so this is a bug, not the peer.
                warn!(%error, "undecodable response header; frame dropped");
                return;
            }
        };
        let Some(entry) = self.lock_state().pending.remove(&header.correlation_id) else {
            warn!(
                correlation_id = header.correlation_id,
                error_code = %header.error_code,
                "response matches no pending request (timed out, cancelled or never asked); dropped"
            );
            return;
        };
        // Decoding happens outside the lock: other requests keep registering meanwhile.
        let outcome = if header.error_code.is_ok() {
            Response::decode(entry.api_key, body).map_err(Error::Protocol)
        } else {
            Err(Error::Broker {
                code: header.error_code,
                message: None,
            })
        };
        // The caller may have given up in between; its answer then has nowhere to go.
        let _ = entry.response_sender.send(outcome);
    }

    /// Fails the pending request `correlation_id`, if there is one, with `error`.
    fn fail(&self, correlation_id: u32, error: Error) {
        if let Some(entry) = self.lock_state().pending.remove(&correlation_id) {
            let _ = entry.response_sender.send(Err(error));
        }
    }

    /// Closes the connection: refuses new requests, fails the pending ones and tells both
    /// tasks to finish. Only the first call does anything.
    fn close(&self) {
        let pending = {
            let mut state = self.lock_state();
            if state.closed {
                return;
            }
            state.closed = true;
            std::mem::take(&mut state.pending)
        };
        self.in_flight_slots.close();
        self.closing.send_replace(true);
        debug!(failed_requests = pending.len(), "connection closed");
        for entry in pending.into_values() {
            let _ = entry.response_sender.send(Err(Error::ConnectionClosed));
        }
    }

    fn is_closed(&self) -> bool {
        self.lock_state().closed
    }
}

/// An encoded request frame, in parts written back to back: a produce request's record
/// batches are parts of their own, the producer's buffers, not copies.
type Frame = Vec<Bytes>;

/// How long `request` may wait for its answer: `request_timeout`, plus the time a fetch asks
/// the broker to hold it when there is nothing to read (a long poll is not a silent broker).
fn answer_within(request: &Request, request_timeout: Duration) -> Duration {
    match request {
        Request::Fetch(fetch) => {
            request_timeout.saturating_add(Duration::from_millis(u64::from(fetch.max_wait_ms)))
        }
        _ => request_timeout,
    }
}

/// Encodes a request frame, refusing one the broker would refuse.
fn encode_frame(request: &Request, correlation_id: u32, max_frame_bytes: u32) -> Result<Frame> {
    let frame = request.encode_frame_parts(correlation_id);
    // Measured like the decoder measures it: the bytes after the length prefix.
    let frame_bytes = frame
        .iter()
        .map(Bytes::len)
        .sum::<usize>()
        .saturating_sub(LENGTH_PREFIX_BYTES);
    if u64::try_from(frame_bytes).unwrap_or(u64::MAX) > u64::from(max_frame_bytes) {
        return Err(Error::RequestTooLarge {
            frame_bytes: u64::try_from(frame_bytes).unwrap_or(u64::MAX),
            max_frame_bytes,
        });
    }
    Ok(frame)
}

/// Writes a frame's parts; a part at least as big as the write buffer goes to the socket
/// directly.
async fn write_frame<W: AsyncWrite>(
    writer: &mut Pin<&mut BufWriter<W>>,
    frame: &Frame,
) -> io::Result<()> {
    for part in frame {
        writer.write_all(part).await?;
    }
    Ok(())
}

/// Returns once the connection is closing.
async fn closing_signalled(closing: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, which the caller keeps alive, so this cannot fail; if it
    // did, there would be nobody left to wait for anyway.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Reads response frames until the stream ends, fails or the connection closes, then closes
/// the connection (which fails whatever is still pending).
async fn run_reader<R>(read_half: R, low_water: Option<ReceiveLowWater>, shared: Arc<Shared>)
where
    R: AsyncRead + Send + 'static,
{
    let mut closing = shared.closing.subscribe();
    tokio::select! {
        reason = read_responses(read_half, low_water, &shared) => {
            if !shared.is_closed() {
                warn!(%reason, "connection lost");
            }
            shared.close();
        }
        () = closing_signalled(&mut closing) => {}
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum ReadEnd {
    EndOfStream,
    EndOfStreamMidFrame,
    Undecodable(sluice_protocol::WireError),
    Failed(io::Error),
}

impl fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadEnd::EndOfStream => write!(f, "the broker closed the connection"),
            ReadEnd::EndOfStreamMidFrame => {
                write!(
                    f,
                    "the broker closed the connection in the middle of a frame"
                )
            }
            ReadEnd::Undecodable(error) => write!(f, "undecodable frame: {error}"),
            ReadEnd::Failed(error) => write!(f, "read failed: {error}"),
        }
    }
}

async fn read_responses<R>(
    read_half: R,
    mut low_water: Option<ReceiveLowWater>,
    shared: &Shared,
) -> ReadEnd
where
    R: AsyncRead,
{
    tokio::pin!(read_half);
    let mut decoder = FrameDecoder::for_responses(shared.options.max_frame_bytes);
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    loop {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => shared.complete(frame.freeze()),
                Ok(None) => break,
                // A bad length prefix leaves no way to find the next frame. The request it
                // answers (its correlation id follows the prefix) fails with the reason, not
                // retriable: asked again, it would be answered the same and close the
                // connection again, failing every other call on it each time.
                Err(error) => {
                    if let Some(&[a, b, c, d]) = buffer.get(4..8) {
                        shared.fail(
                            u32::from_be_bytes([a, b, c, d]),
                            Error::Protocol(error.clone()),
                        );
                    }
                    return ReadEnd::Undecodable(error);
                }
            }
        }
        if buffer.capacity() - buffer.len() < READ_BUFFER_BYTES / 4 {
            buffer.reserve(READ_BUFFER_BYTES);
        }
        if let Some(low_water) = low_water.as_mut() {
            low_water.set(decoder.low_water_bytes(&buffer));
        }
        match read_half.as_mut().read_buf(&mut buffer).await {
            Ok(0) if decoder.is_mid_frame(&buffer) => return ReadEnd::EndOfStreamMidFrame,
            Ok(0) => return ReadEnd::EndOfStream,
            Ok(_) => {}
            Err(error) => return ReadEnd::Failed(error),
        }
    }
}

/// A TCP connection's receive low-water mark (`SO_RCVLOWAT`): the reader is woken only once this
/// many bytes have arrived (or the connection ends), set to what the frame being received still
/// lacks (see [`FrameDecoder::low_water_bytes`]). A read still returns whatever has arrived.
#[derive(Debug)]
struct ReceiveLowWater {
    /// A duplicate of the connection's descriptor, so the mark can be set while the reader owns
    /// the stream's read half.
    socket: std::os::fd::OwnedFd,
    current: usize,
}

impl ReceiveLowWater {
    /// `None` when the descriptor cannot be duplicated, or on a kernel that does not honour
    /// the mark safely (see [`FrameDecoder::low_water_mark_is_safe`]): the reader is then woken
    /// for every arrival, as without a mark.
    fn for_tcp(stream: &TcpStream) -> Option<ReceiveLowWater> {
        use std::os::fd::AsFd;
        static SAFE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let safe = *SAFE.get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .is_ok_and(|release| FrameDecoder::low_water_mark_is_safe(&release))
        });
        if !safe {
            return None;
        }
        let socket = stream.as_fd().try_clone_to_owned().ok()?;
        Some(ReceiveLowWater { socket, current: 1 })
    }

    // The one system call the client makes itself: neither std nor socket2 sets this option.
    #[allow(unsafe_code)]
    fn set(&mut self, bytes: usize) {
        use std::os::fd::AsRawFd;
        if bytes == self.current {
            return;
        }
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `value` is a live c_int and its size goes with it; the descriptor is open
        // for as long as `self.socket` is.
        let set = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            self.current = bytes;
        } else {
            debug!(
                error = %io::Error::last_os_error(),
                bytes, "could not set the receive low-water mark"
            );
        }
    }
}

/// Writes queued frames until the connection closes, then writes what was queued before the
/// close, shuts the write side down and reports itself done. After the close it has
/// `request_timeout` to finish, so a broker that stopped reading cannot hold it forever.
async fn run_writer<W>(
    write_half: W,
    mut frames: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    done: watch::Sender<bool>,
) where
    W: AsyncWrite + Send + 'static,
{
    let writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write_half);
    tokio::pin!(writer);
    let mut closing = shared.closing.subscribe();
    let drain_timeout = shared.options.request_timeout;
    let give_up = async {
        closing_signalled(&mut closing).await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        result = write_frames(writer.as_mut(), &mut frames, &shared) => {
            if let Err(error) = result {
                if shared.is_closed() {
                    debug!(%error, "write failed after the connection closed");
                } else {
                    warn!(%error, "write failed; closing the connection");
                }
            }
        }
        () = give_up => {
            debug!(
                drain_timeout_ms = duration_ms(drain_timeout),
                "gave up writing queued frames after the close"
            );
        }
    }
    shared.close();
    done.send_replace(true);
}

async fn write_frames<W>(
    mut writer: Pin<&mut BufWriter<W>>,
    frames: &mut mpsc::Receiver<Frame>,
    shared: &Shared,
) -> io::Result<()>
where
    W: AsyncWrite,
{
    let mut closing = shared.closing.subscribe();
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            () = closing_signalled(&mut closing) => None,
        };
        let Some(frame) = frame else { break };
        write_frame(&mut writer, &frame).await?;
        // Everything already queued goes out with the same flush: a burst of requests costs
        // one write syscall, not one each.
        for _ in 1..MAX_FRAMES_PER_FLUSH {
            let Ok(frame) = frames.try_recv() else { break };
            write_frame(&mut writer, &frame).await?;
        }
        writer.flush().await?;
    }
    // Frames queued before the close were accepted (an `acks = none` produce has returned Ok
    // for its frame), so they still go out; nothing new is accepted from here on.
    frames.close();
    while let Some(frame) = frames.recv().await {
        write_frame(&mut writer, &frame).await?;
    }
    writer.flush().await?;
    writer.shutdown().await
}

/// The transports a URL can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Quic,
}

/// A parsed broker URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    transport: Transport,
    /// A host name or an IP address; an IPv6 address without its brackets.
    host: String,
    port: u16,
}

impl Endpoint {
    /// Parses `scheme://host:port`, naming the first problem found.
    fn parse(url: &str) -> Result<Endpoint> {
        let invalid = |problem: &str| {
            Error::InvalidUrl(format!(
                "{problem} in \"{url}\" (expected tcp://host:port or quic://host:port)"
            ))
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("missing scheme"));
        };
        let transport = if scheme.eq_ignore_ascii_case("tcp") {
            Transport::Tcp
        } else if scheme.eq_ignore_ascii_case("quic") {
            Transport::Quic
        } else if scheme.is_empty() {
            return Err(invalid("missing scheme"));
        } else {
            return Err(invalid(&format!("unknown scheme \"{scheme}\"")));
        };
        // A trailing slash is harmless; a path, query, fragment or user name means the caller
        // expects something this client does not do.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(position) = authority.find(['/', '?', '#', '@']) {
            return Err(invalid(&format!(
                "unexpected \"{}\" around the address",
                &authority[position..]
            )));
        }
        if authority.is_empty() {
            return Err(invalid("missing host and port"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((host, after_host)) = bracketed.split_once(']') else {
                return Err(invalid("unclosed '[' around the IPv6 address"));
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(invalid(&format!("\"{host}\" is not an IPv6 address")));
            }
            match after_host.strip_prefix(':') {
                Some(port) => (host, port),
                None if after_host.is_empty() => return Err(invalid("missing port")),
                None => {
                    return Err(invalid(&format!(
                        "unexpected \"{after_host}\" after the IPv6 address"
                    )));
                }
            }
        } else {
            let Some((host, port)) = authority.rsplit_once(':') else {
                return Err(invalid("missing port"));
            };
            if host.contains(':') {
                return Err(invalid(
                    "an IPv6 address needs brackets, as in tcp://[::1]:7171,",
                ));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        if port.is_empty() {
            return Err(invalid("missing port"));
        }
        let port = port
            .bytes()
            .all(|byte| byte.is_ascii_digit())
            .then(|| port.parse::<u16>().ok())
            .flatten()
            .filter(|port| *port != 0)
            .ok_or_else(|| invalid(&format!("port \"{port}\" is not a number from 1 to 65535")))?;
        Ok(Endpoint {
            transport,
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port`, with brackets around an IPv6 address.
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Resolves the host and tries each of its addresses in turn.
async fn connect_tcp(endpoint: &Endpoint) -> Result<TcpStream> {
    let address = endpoint.address();
    let candidates = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|source| Error::Connect {
            address: address.clone(),
            source,
        })?;
    let mut last_error = None;
    for candidate in candidates {
        match TcpStream::connect(candidate).await {
            Ok(stream) => return Ok(stream),
            Err(error) => {
                debug!(%candidate, %error, "connect failed; trying the next address");
                last_error = Some(error);
            }
        }
    }
    Err(Error::Connect {
        address,
        source: last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the host resolved to no address")
        }),
    })
}

/// The QUIC connection under a `quic://` [`Connection`], and the endpoint (UDP socket) it
/// runs on. Both stay open until [`close_quic_after_writer`] closes them.
struct QuicTransport {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

/// The QUIC client configuration for `url`: TLS 1.3 with the ring provider named explicitly
/// (no process-wide default to race over), the CA file as the only roots, ALPN `sluice/1`.
async fn quic_client_config(url: &str, ca_file: Option<&Path>) -> Result<quinn::ClientConfig> {
    let Some(ca_file) = ca_file else {
        return Err(Error::InvalidUrl(format!(
            "{url} needs a CA file to verify the broker's certificate: pass --ca-file PATH or set \
             SLUICE_CA_FILE (ConnectionOptions::ca_file); a broker without a configured \
             certificate writes its own to <data-dir>/tls/cert.pem"
        )));
    };
    let invalid_ca_file = |problem: String| {
        Error::InvalidUrl(format!(
            "{url}: CA file {} (--ca-file or SLUICE_CA_FILE): {problem}",
            ca_file.display()
        ))
    };
    let pem = tokio::fs::read(ca_file)
        .await
        .map_err(|error| invalid_ca_file(format!("cannot read it: {error}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate =
            certificate.map_err(|error| invalid_ca_file(format!("not PEM: {error}")))?;
        roots
            .add(certificate)
            .map_err(|error| invalid_ca_file(format!("unusable certificate: {error}")))?;
    }
    if roots.is_empty() {
        return Err(invalid_ca_file("no PEM CERTIFICATE in it".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| invalid_ca_file(format!("TLS configuration: {error}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![QUIC_ALPN_PROTOCOL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|error| invalid_ca_file(format!("TLS configuration: {error}")))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(QUIC_KEEP_ALIVE_INTERVAL))
        // The broker never opens streams towards a client.
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The UDP receive buffer a client's QUIC socket asks for, as the broker's does. Linux's
/// default (208 KiB, counted with the kernel's bookkeeping) overflows under one fetch answer of
/// a few MiB arriving at loopback speed: every datagram dropped there is resent and cuts the
/// broker's congestion window. Without privileges the kernel grants at most
/// `net.core.rmem_max`.
const QUIC_RECEIVE_BUFFER_BYTES: usize = 8 << 20;

/// A client endpoint on `local` whose socket asks for [`QUIC_RECEIVE_BUFFER_BYTES`] of receive
/// buffer (`quinn::Endpoint::client` leaves the system default).
fn quic_client_endpoint(local: SocketAddr) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        quic_client_socket(local)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A UDP socket on `local` with its receive buffer raised as far as the kernel allows.
fn quic_client_socket(local: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(local)?;
    if let Err(error) =
        socket2::SockRef::from(&socket).set_recv_buffer_size(QUIC_RECEIVE_BUFFER_BYTES)
    {
        // The connection still works, only with drops under bursts.
        debug!(%error, "could not raise the QUIC socket's receive buffer");
    }
    Ok(socket)
}

/// How long a QUIC handshake to one address of a name has before the next address is tried
/// alongside it (Happy Eyeballs, RFC 8305). QUIC hears nothing back from an address nobody
/// serves, so trying them one after another would let the first (`localhost` as `::1`, with
/// the broker on 127.0.0.1 only) take the whole connect timeout.
const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// Resolves the host and races a handshake to each of its addresses, started
/// [`NEXT_ADDRESS_AFTER`] apart, each from a fresh endpoint of the address's family. The first
/// to connect wins; the others are dropped.
async fn connect_quic(
    endpoint: &Endpoint,
    client_config: quinn::ClientConfig,
) -> Result<QuicTransport> {
    let address = endpoint.address();
    let candidates: Vec<SocketAddr> =
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| Error::Connect {
                address: address.clone(),
                source,
            })?
            .collect();
    connect_quic_any(&candidates, &endpoint.host, &address, client_config).await
}

async fn connect_quic_any(
    candidates: &[SocketAddr],
    server_name: &str,
    address: &str,
    client_config: quinn::ClientConfig,
) -> Result<QuicTransport> {
    let connect_error = |source: io::Error| Error::Connect {
        address: address.to_owned(),
        source,
    };
    if candidates.is_empty() {
        return Err(connect_error(io::Error::new(
            io::ErrorKind::NotFound,
            "the host resolved to no address",
        )));
    }
    let attempts = candidates.iter().enumerate().map(|(index, &candidate)| {
        let client_config = client_config.clone();
        Box::pin(async move {
            tokio::time::sleep(NEXT_ADDRESS_AFTER * index as u32).await;
            let local: SocketAddr = if candidate.is_ipv6() {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let quic_endpoint = quic_client_endpoint(local).map_err(connect_error)?;
            // The URL's host is the name the certificate must carry (an IP address works too).
            let connecting = quic_endpoint
                .connect_with(client_config, candidate, server_name)
                .map_err(|error| match error {
                    quinn::ConnectError::InvalidServerName(name) => Error::InvalidUrl(format!(
                        "\"{name}\" cannot be checked against a certificate"
                    )),
                    other => connect_error(io::Error::other(other.to_string())),
                })?;
            match connecting.await {
                Ok(connection) => Ok(QuicTransport {
                    endpoint: quic_endpoint,
                    connection,
                }),
                Err(error) => {
                    debug!(%candidate, %error, "QUIC connect failed");
                    Err(connect_error(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("QUIC handshake failed: {error}"),
                    )))
                }
            }
        })
    });
    // Every attempt failed: the last failure says why.
    futures::future::select_ok(attempts)
        .await
        .map(|(transport, _others)| transport)
}

/// Closes the QUIC connection once the writer is done: by then the connection is closing and
/// the broker has acknowledged every queued frame (or the writer gave up), so nothing still
/// owed to the broker is discarded by the close.
async fn close_quic_after_writer(
    quic: QuicTransport,
    mut writer_done: watch::Receiver<bool>,
    transport_closed: watch::Sender<bool>,
) {
    // An error means the writer task is gone, which is just as done.
    let _ = writer_done.wait_for(|done| *done).await;
    quic.connection
        .close(quinn::VarInt::from_u32(QUIC_CLOSED_CODE), b"closed");
    // Lets the close reach the broker before the socket goes away, so the broker frees the
    // connection at once instead of after its idle timeout.
    let _ = tokio::time::timeout(QUIC_CLOSE_TIMEOUT, quic.endpoint.wait_idle()).await;
    transport_closed.send_replace(true);
}

/// How a QUIC stream reports that the broker has received everything written to it.
type Acknowledgement = Pin<
    Box<
        dyn Future<Output = std::result::Result<Option<quinn::VarInt>, quinn::StoppedError>>
            + Send
            + Sync,
    >,
>;

/// The write half of a QUIC stream whose shutdown completes once the broker has acknowledged
/// every byte. quinn's own shutdown only queues the end of the stream, and the connection
/// close that follows would discard whatever the broker has not acknowledged yet.
struct AcknowledgedSendStream {
    stream: quinn::SendStream,
    acknowledgement: Option<Acknowledgement>,
}

impl AcknowledgedSendStream {
    fn new(stream: quinn::SendStream) -> Self {
        AcknowledgedSendStream {
            stream,
            acknowledgement: None,
        }
    }
}

impl AsyncWrite for AcknowledgedSendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.stream), context, buffer)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let acknowledgement = this.acknowledgement.get_or_insert_with(|| {
            // An error only says the stream was finished or reset already; either way there is
            // nothing left to send, and `stopped` reports how it ended.
            let _ = this.stream.finish();
            Box::pin(this.stream.stopped())
        });
        match acknowledgement.as_mut().poll(context) {
            Poll::Pending => Poll::Pending,
            // None: everything was acknowledged. Some: the broker stopped reading the stream,
            // so nothing more would be delivered anyway.
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => Poll::Ready(Err(io::Error::other(error))),
        }
    }
}

/// Whole milliseconds of `duration`, as error messages and the wire carry them.
pub(crate) fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Endpoint {
        Endpoint::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    #[test]
    fn quic_sockets_ask_for_as_much_receive_buffer_as_the_system_allows() {
        let local: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let receive_buffer = |socket: &std::net::UdpSocket| {
            socket2::SockRef::from(socket)
                .recv_buffer_size()
                .expect("SO_RCVBUF")
        };
        let raised = receive_buffer(&quic_client_socket(local).expect("bind"));
        // Linux grants up to `net.core.rmem_max` and reports twice what it granted.
        let limit: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("net.core.rmem_max")
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(raised, 2 * QUIC_RECEIVE_BUFFER_BYTES.min(limit));
    }

    #[test]
    fn parses_host_names_and_addresses() {
        let endpoint = parse("tcp://localhost:7171");
        assert_eq!(endpoint.transport, Transport::Tcp);
        assert_eq!(endpoint.host, "localhost");
        assert_eq!(endpoint.port, 7171);
        assert_eq!(endpoint.address(), "localhost:7171");

        let endpoint = parse("tcp://127.0.0.1:1/");
        assert_eq!((endpoint.host.as_str(), endpoint.port), ("127.0.0.1", 1));

        let endpoint = parse("TCP://[::1]:65535");
        assert_eq!(endpoint.transport, Transport::Tcp);
        assert_eq!((endpoint.host.as_str(), endpoint.port), ("::1", 65535));
        assert_eq!(endpoint.address(), "[::1]:65535");

        assert_eq!(parse("quic://broker:7171").transport, Transport::Quic);
    }

    #[test]
    fn names_the_problem() {
        let cases = [
            ("", "missing scheme"),
            ("localhost:7171", "missing scheme"),
            ("://localhost:7171", "missing scheme"),
            ("http://localhost:7171", "unknown scheme \"http\""),
            ("tcp://", "missing host and port"),
            ("tcp://localhost", "missing port"),
            ("tcp://localhost:", "missing port"),
            ("tcp://:7171", "missing host"),
            ("tcp://localhost:port", "port \"port\""),
            ("tcp://localhost:+80", "port \"+80\""),
            ("tcp://localhost:0", "port \"0\""),
            ("tcp://localhost:65536", "port \"65536\""),
            ("tcp://::1:7171", "needs brackets"),
            ("tcp://[::1", "unclosed '['"),
            ("tcp://[::1]", "missing port"),
            ("tcp://[::1]x:7171", "unexpected \"x:7171\""),
            ("tcp://[nope]:7171", "not an IPv6 address"),
            ("tcp://localhost:7171/topics", "unexpected \"/topics\""),
            (
                "tcp://user@localhost:7171",
                "unexpected \"@localhost:7171\"",
            ),
        ];
        for (url, expected) in cases {
            match Endpoint::parse(url) {
                Err(Error::InvalidUrl(message)) => assert!(
                    message.contains(expected),
                    "{url:?}: {message:?} does not mention {expected:?}"
                ),
                other => panic!("{url:?}: expected InvalidUrl, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn works_over_any_transport_halves() {
        // An in-memory pipe stands in for a socket: the tasks only need AsyncRead/AsyncWrite.
        let (client_side, server_side) = tokio::io::duplex(1024);
        let (read_half, write_half) = tokio::io::split(client_side);
        let connection = Connection::from_halves(
            "memory://".to_owned(),
            read_half,
            write_half,
            ConnectionOptions::default(),
        );
        let server = tokio::spawn(async move {
            let (mut server_read, mut server_write) = tokio::io::split(server_side);
            let mut decoder = FrameDecoder::for_requests(DEFAULT_MAX_FRAME_BYTES);
            let mut buffer = BytesMut::new();
            let frame = loop {
                if let Some(frame) = decoder.decode(&mut buffer).expect("valid frame") {
                    break frame;
                }
                let read = server_read.read_buf(&mut buffer).await.expect("read");
                assert_ne!(read, 0, "client closed before sending");
            };
            let (header, request) = sluice_protocol::decode_request(frame.freeze()).unwrap();
            assert_eq!(request.api_key(), ApiKey::ListTopics);
            let mut out = BytesMut::new();
            Response::from(sluice_protocol::messages::ListTopicsResponse::default())
                .encode_frame(header.correlation_id, &mut out);
            server_write.write_all(&out).await.expect("write");
            server_write
        });
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            connection.send(sluice_protocol::messages::ListTopicsRequest {}),
        )
        .await
        .expect("answered in time")
        .expect("successful response");
        assert_eq!(
            response,
            Response::ListTopics(sluice_protocol::messages::ListTopicsResponse::default())
        );
        assert_eq!(connection.in_flight_count(), 0);
        drop(server.await.expect("server task"));
    }

    #[tokio::test]
    async fn quic_needs_a_usable_ca_file() {
        let url = "quic://127.0.0.1:7171";
        match Connection::connect(url).await {
            Err(Error::InvalidUrl(message)) => assert!(
                message.contains("--ca-file") && message.contains("SLUICE_CA_FILE"),
                "{message}"
            ),
            other => panic!("expected InvalidUrl naming --ca-file, got {other:?}"),
        }
        let missing = "/nonexistent/sluice-ca.pem";
        let options = ConnectionOptions::default().ca_file(missing);
        match Connection::connect_with(url, options).await {
            Err(Error::InvalidUrl(message)) => {
                assert!(message.contains(missing), "{message}");
                assert!(message.contains("cannot read it"), "{message}");
            }
            other => panic!("expected InvalidUrl naming the file, got {other:?}"),
        }
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let options = ConnectionOptions::default().ca_file(not_pem);
        match Connection::connect_with(url, options).await {
            Err(Error::InvalidUrl(message)) => {
                assert!(message.contains("no PEM CERTIFICATE"), "{message}");
            }
            other => panic!("expected InvalidUrl for a file without certificates, got {other:?}"),
        }
    }

    /// A name's first address that never answers (`localhost` as `::1` with the broker on
    /// 127.0.0.1 only) holds the handshake to the next one back by a moment, not by the whole
    /// connect timeout.
    #[tokio::test]
    async fn a_quic_address_that_never_answers_does_not_hold_back_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
            .await
            .unwrap();
        // Takes datagrams and answers none. A host without an IPv6 loopback says so
        // explicitly; the test is never skipped quietly.
        let silent = match tokio::net::UdpSocket::bind("[::1]:0").await {
            Ok(silent) => silent,
            Err(_) if std::env::var_os("SLUICE_NO_IPV6").is_some() => return,
            Err(error) => panic!("no IPv6 loopback ({error}); set SLUICE_NO_IPV6=1 to skip"),
        };
        let candidates = [
            silent.local_addr().unwrap(),
            broker.quic_addr.expect("quic listener"),
        ];
        let ca_file = dir.path().join("tls/cert.pem");
        let config = quic_client_config("quic://localhost:1", Some(&ca_file))
            .await
            .unwrap();
        let transport = tokio::time::timeout(
            Duration::from_secs(5),
            connect_quic_any(&candidates, "localhost", "localhost", config),
        )
        .await
        .expect("connected well within the 10 s connect timeout")
        .unwrap();
        assert_eq!(transport.connection.remote_address(), candidates[1]);
        drop(transport);
        broker.shutdown().await;
    }

    #[test]
    fn connection_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Connection>();
    }
}
