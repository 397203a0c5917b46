//! One client connection: frames in, responses out. Generic over `AsyncRead + AsyncWrite`, so
//! TCP and (later) each QUIC stream are served by the same code.
//!
//! ```text
//! socket ─read─▶ FrameDecoder ─▶ decode_request ─▶ handlers::handle ─┬─ Ready  ─────────────┐
//!                   ▲ (frame_read_timeout_ms while                    ├─ Later  ─ task ─────┤
//!                   │  mid-frame; max_frame_bytes)                    └─ Silent             ▼
//!                   └──── in-flight permit (max_in_flight_requests) ◀────────── writer task ─▶ socket
//! ```
//!
//! Requests are read continuously and handled in arrival order; waiting work runs in its own
//! task, so responses go out as they complete, matched by correlation id. At most
//! `max_in_flight_requests` are pending per connection: beyond that the reader stops reading,
//! which pushes back on the client through TCP instead of growing memory. A frame over
//! `max_frame_bytes`, or one whose bytes take longer than `frame_read_timeout_ms` to arrive
//! from the first (stalled half-way, or trickled a byte at a time), gets an error answer and
//! the connection is closed; nobody else is affected.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use sluice_protocol::frame::{LENGTH_PREFIX_BYTES, REQUEST_HEADER_BYTES};
use sluice_protocol::{
    ApiKey, ErrorCode, FrameDecoder, Response, decode_request, encode_error_response,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Semaphore, mpsc};

use crate::BrokerState;
use crate::fetch_budget::FetchBudgetPermit;
use crate::handlers::{self, Outcome};

/// Bytes the reader asks the socket for at a time (the buffer grows for larger frames).
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Serves one connection until the peer closes it, it breaks a limit, or the broker stops.
pub async fn serve<S>(stream: S, state: Arc<BrokerState>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    serve_with(stream, state, peer, None).await;
}

/// [`serve`], sending record batches read from the page cache with `sendfile` through
/// `zero_copy` (the same socket), when given.
pub async fn serve_with<S>(
    stream: S,
    state: Arc<BrokerState>,
    peer: String,
    zero_copy: Option<ZeroCopySocket>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let limits = &state.config.limits;
    let max_in_flight = limits.max_in_flight_requests.max(1);
    let (responses, outgoing) = mpsc::channel::<OutgoingFrame>(max_in_flight);
    // Resolves when the writer stops (a peer that does not read its answers): the reader
    // then stops too, so the connection closes instead of idling with its slot.
    let (writer_alive, mut writer_gone) = tokio::sync::oneshot::channel::<()>();
    // Shared with the reader, which sets the socket's receive low-water mark through it.
    let zero_copy = zero_copy.map(Arc::new);
    let writer_task = tokio::spawn(write_responses(
        writer,
        outgoing,
        state.metrics.sent_bytes().clone(),
        zero_copy.clone(),
        Duration::from_millis(limits.response_write_timeout_ms),
        writer_alive,
        peer.clone(),
    ));
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let read_ahead = Arc::new(handlers::ReadAhead::default());
    let max_frame_bytes = limits.max_frame_bytes;
    let mut decoder = FrameDecoder::for_requests(max_frame_bytes);
    let frame_read_timeout = Duration::from_millis(limits.frame_read_timeout_ms);
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // The socket's receive low-water mark, as last set (1 is the system's default), when the
    // kernel honours one safely.
    let mut low_water = 1;
    let low_water_socket = zero_copy.as_ref().filter(|_| low_water_mark_is_safe());
    // When the frame being received must be complete: set when its first bytes arrive, so a
    // peer that trickles a byte at a time is cut off as surely as one that stops.
    let mut frame_deadline: Option<tokio::time::Instant> = None;
    let mut shutdown = state.shutdown_receiver();
    tracing::debug!(%peer, "connection opened");

    'connection: loop {
        loop {
            let frame = match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    frame_deadline = None;
                    frame
                }
                Ok(None) => break,
                Err(error) => {
                    // The stream cannot be resynchronised: answer and close.
                    tracing::warn!(%peer, %error, "closing connection after a bad frame");
                    state
                        .metrics
                        .count_undecoded_request(None, error.error_code());
                    let mut answer = BytesMut::new();
                    encode_error_response(
                        peeked_correlation_id(&buffer),
                        error.error_code(),
                        &mut answer,
                    );
                    let _ = responses.send(answer.freeze().into()).await;
                    break 'connection;
                }
            };
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                break 'connection;
            };
            let (correlation_id, timer, outcome) = match decode_request(frame.freeze()) {
                Ok((header, request)) => (
                    header.correlation_id,
                    state.metrics.start_request(request.api_key()),
                    handlers::handle(&state, &header, request, &read_ahead),
                ),
                Err(error) => {
                    tracing::debug!(%peer, %error, "request did not decode");
                    let api = error
                        .header
                        .and_then(|header| ApiKey::from_code(header.api_key));
                    state
                        .metrics
                        .count_undecoded_request(api, error.error_code());
                    let mut answer = BytesMut::new();
                    error.encode_response(&mut answer);
                    if responses.send(answer.freeze().into()).await.is_err() {
                        break 'connection;
                    }
                    continue;
                }
            };
            match outcome {
                Outcome::Silent => {
                    timer.finish(ErrorCode::None);
                    drop(permit);
                }
                // Each request is counted as its answer is handed over, so a client that has
                // its answer finds it counted.
                Outcome::Ready(response) => {
                    let (answer, code) = encode(correlation_id, &response, max_frame_bytes);
                    timer.finish(code);
                    if responses.send(answer).await.is_err() {
                        break 'connection;
                    }
                    drop(permit);
                    // Let the writer send the answer now. Woken from this task, it waits in
                    // this worker's next-task slot, which the other workers cannot take; this
                    // loop does not yield while the socket has data, so without this the
                    // answers of a burst would wait for the whole burst to be appended, and
                    // a producer at its in-flight limit would wait with them, its core idle.
                    tokio::task::yield_now().await;
                }
                Outcome::Failed(code) => {
                    let mut answer = BytesMut::new();
                    encode_error_response(correlation_id, code, &mut answer);
                    timer.finish(code);
                    if responses.send(answer.freeze().into()).await.is_err() {
                        break 'connection;
                    }
                    drop(permit);
                }
                Outcome::Later(pending) => {
                    let responses = responses.clone();
                    tokio::spawn(async move {
                        let response = pending.await;
                        let (answer, code) = encode(correlation_id, &response, max_frame_bytes);
                        timer.finish(code);
                        let _ = responses.send(answer).await;
                        drop(permit);
                    });
                }
                Outcome::LaterHolding(pending) => {
                    let responses = responses.clone();
                    tokio::spawn(async move {
                        let (response, budget) = pending.await;
                        let (mut frame, code) = encode(correlation_id, &response, max_frame_bytes);
                        drop(response);
                        // The budget goes back when the writer has written and dropped the frame.
                        frame._budget = budget;
                        timer.finish(code);
                        let _ = responses.send(frame).await;
                        drop(permit);
                    });
                }
            }
        }

        buffer.reserve(READ_CHUNK_BYTES);
        // A big request is woken for once it is whole, not for every piece of it.
        if let Some(socket) = low_water_socket {
            let wanted = decoder.low_water_bytes(&buffer);
            if wanted != low_water {
                match socket.set_receive_low_water(wanted) {
                    Ok(()) => low_water = wanted,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "could not set the receive low-water mark");
                    }
                }
            }
        }
        let read = if decoder.is_mid_frame(&buffer) {
            // A peer that takes longer than the deadline to send a whole frame, by stopping
            // half-way or by sending slowly, is cut off.
            let deadline = *frame_deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + frame_read_timeout);
            // Shutdown does not wait for the rest of a frame: nothing of it was acknowledged.
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, reader.read_buf(&mut buffer)) => read,
                _ = shutdown.wait_for(|stopping| *stopping) => break,
                _ = &mut writer_gone => break,
            };
            match read {
                Ok(read) => read,
                Err(_) => {
                    tracing::warn!(%peer, timeout_ms = limits.frame_read_timeout_ms, "closing connection stalled mid-frame");
                    state
                        .metrics
                        .count_undecoded_request(None, ErrorCode::RequestTimedOut);
                    let mut answer = BytesMut::new();
                    encode_error_response(
                        stalled_correlation_id(&buffer),
                        ErrorCode::RequestTimedOut,
                        &mut answer,
                    );
                    let _ = responses.send(answer.freeze().into()).await;
                    break;
                }
            }
        } else {
            tokio::select! {
                read = reader.read_buf(&mut buffer) => read,
                _ = shutdown.wait_for(|stopping| *stopping) => break,
                _ = &mut writer_gone => break,
            }
        };
        match read {
            Ok(0) => break,
            Ok(read) => {
                state.metrics.received_bytes().inc_by(read as u64);
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "connection read failed");
                break;
            }
        }
    }

    // Let in-flight requests finish and their answers go out before closing.
    let _ = in_flight.acquire_many(max_in_flight as u32).await;
    drop(responses);
    let _ = writer_task.await;
    tracing::debug!(%peer, "connection closed");
}

/// A response frame in parts written back to back (a fetch response's record batches are
/// parts of their own, as read from the log, not copied into the frame), holding the fetch
/// budget of those records for as long as it exists.
struct OutgoingFrame {
    parts: Vec<Bytes>,
    _budget: Option<FetchBudgetPermit>,
}

impl From<Bytes> for OutgoingFrame {
    fn from(frame: Bytes) -> Self {
        OutgoingFrame {
            parts: vec![frame],
            _budget: None,
        }
    }
}

impl OutgoingFrame {
    /// Writes the parts; a part at least as big as the write buffer goes to the socket
    /// directly, and a record-batch part mapped from the page cache goes from its file with
    /// `sendfile` when `zero_copy` is given. Returns the bytes written.
    async fn write_to<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut BufWriter<W>,
        zero_copy: Option<&ZeroCopySocket>,
    ) -> std::io::Result<u64> {
        let mut written = 0;
        for part in &self.parts {
            let source = zero_copy
                .filter(|_| part.len() >= SEND_FILE_AT_LEAST)
                .zip(crate::storage::fs::file_source(part));
            match source {
                Some((socket, (file, position))) => {
                    // What is buffered goes first: the frame's bytes stay in order.
                    writer.flush().await?;
                    socket.send_file(&file, position, part.len()).await?;
                }
                None => writer.write_all(part).await?,
            }
            written += part.len() as u64;
        }
        Ok(written)
    }
}

/// Whether this kernel honours a receive low-water mark safely (read once).
fn low_water_mark_is_safe() -> bool {
    static SAFE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SAFE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .is_ok_and(|release| FrameDecoder::low_water_mark_is_safe(&release))
    })
}

/// Whether this process ignores SIGPIPE (Rust's runtime sets that up before `main`).
fn sigpipe_ignored() -> bool {
    // SAFETY: a null new action only reads the current one into `current`.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Mapped parts at least this long go with `sendfile`; a shorter one is cheaper copied.
const SEND_FILE_AT_LEAST: usize = 64 * 1024;

/// A TCP connection's socket, for sending record batches straight from the page cache: the
/// fetch path maps what it reads (see `StorageFile::map`) and checks it there, and
/// `sendfile` hands the same file region to the socket, so the broker copies none of it (on
/// loopback the reader's receive is the one copy). A duplicate of the connection's descriptor,
/// registered with the runtime for writability. The connection's reader sets the socket's
/// receive low-water mark through it too.
#[derive(Debug)]
pub struct ZeroCopySocket {
    socket: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl ZeroCopySocket {
    /// For `stream`, which stays the connection's stream; `None` when the descriptor cannot be
    /// duplicated or registered (its batches are then written as bytes).
    pub fn for_tcp(stream: &tokio::net::TcpStream) -> Option<ZeroCopySocket> {
        use std::os::fd::AsFd;
        if !sigpipe_ignored() {
            // `sendfile` to a connection the peer closed raises SIGPIPE (a plain send is told
            // not to); Rust programs ignore it, a host process embedding the broker may not.
            return None;
        }
        let duplicate = stream.as_fd().try_clone_to_owned().ok()?;
        // SAFETY: `duplicate` is an open descriptor this value owns until it is dropped with
        // the `AsyncFd`, and an `OwnedFd` always returns that same descriptor.
        let socket = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                duplicate,
                tokio::io::Interest::WRITABLE,
            )
        }
        .ok()?;
        Some(ZeroCopySocket { socket })
    }

    /// Sets the socket's receive low-water mark (`SO_RCVLOWAT`): its reader is woken only once
    /// this many bytes have arrived, or the connection ends. A read still returns whatever has
    /// arrived.
    fn set_receive_low_water(&self, bytes: usize) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `value` is a live c_int and its size goes with it; the descriptor is open
        // for as long as `self` is.
        let set = unsafe {
            libc::setsockopt(
                self.socket.get_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Sends `len` bytes of `file` from `position`, waiting for room in the socket as needed.
    async fn send_file(
        &self,
        file: &std::fs::File,
        mut position: u64,
        mut len: usize,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        while len > 0 {
            let mut ready = self.socket.writable().await?;
            let sent = ready.try_io(|socket| {
                let mut offset = libc::off_t::try_from(position).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset too large")
                })?;
                // SAFETY: both descriptors are open for the call (the socket is owned by
                // `self`, the file by the caller's `Arc`), and `offset` is a valid out-pointer.
                let sent = unsafe {
                    libc::sendfile(
                        socket.get_ref().as_raw_fd(),
                        file.as_raw_fd(),
                        &mut offset,
                        len,
                    )
                };
                usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())
            });
            match sent {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(sent)) => {
                    position += sent as u64;
                    len -= sent;
                }
                Ok(Err(error)) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Err(error),
                // The socket is full: its readiness was cleared; wait for room.
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// The answer's frame, and the code it is counted under. An answer over `max_frame_bytes`
/// (metadata for thousands of partitions, say) becomes a `MessageTooLarge` error instead: a
/// client holding that limit would otherwise drop the connection on reading it. Fetch answers
/// are sized to fit before they are read.
fn encode(
    correlation_id: u32,
    response: &Response,
    max_frame_bytes: u32,
) -> (OutgoingFrame, ErrorCode) {
    let parts = response.encode_frame_parts(correlation_id);
    let length = parts.iter().map(Bytes::len).sum::<usize>() - LENGTH_PREFIX_BYTES;
    if length > max_frame_bytes as usize {
        tracing::warn!(
            api = ?response.api_key(),
            length,
            max_frame_bytes,
            "answer over max_frame_bytes; sending MessageTooLarge instead"
        );
        let mut answer = BytesMut::new();
        encode_error_response(correlation_id, ErrorCode::MessageTooLarge, &mut answer);
        return (answer.freeze().into(), ErrorCode::MessageTooLarge);
    }
    let frame = OutgoingFrame {
        parts,
        _budget: None,
    };
    (frame, ErrorCode::None)
}

/// The correlation id of a frame still in the buffer (with its length prefix), so even a
/// refused frame's answer can be matched by the client; 0 when not enough arrived.
fn peeked_correlation_id(buffer: &BytesMut) -> u32 {
    let at = LENGTH_PREFIX_BYTES + 4;
    match buffer.get(at..at + 4) {
        Some(bytes) if buffer.len() >= LENGTH_PREFIX_BYTES + REQUEST_HEADER_BYTES => {
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
        }
        _ => 0,
    }
}

/// The correlation id of the frame a stalled peer left half-sent. The decoder has taken that
/// frame's length prefix off the buffer (it only waits inside a prefix of fewer than four
/// bytes, which holds no id), so the buffer starts with the request header: `api_key u16`,
/// `api_version u16`, then the id. 0 when not enough of it arrived.
fn stalled_correlation_id(buffer: &BytesMut) -> u32 {
    match buffer.get(4..8) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// Writes answers as they come until the reader is done, or the peer stops reading: a frame
/// (or a flush) not written within `write_timeout` ends it, and the frames still queued go
/// with their fetch budget. `_alive` is dropped on return, which tells the reader.
async fn write_responses<W>(
    writer: W,
    mut outgoing: mpsc::Receiver<OutgoingFrame>,
    sent_bytes: Counter,
    zero_copy: Option<Arc<ZeroCopySocket>>,
    write_timeout: Duration,
    _alive: tokio::sync::oneshot::Sender<()>,
    peer: String,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut writer = BufWriter::with_capacity(READ_CHUNK_BYTES, writer);
    let zero_copy = zero_copy.as_deref();
    let stalled = || {
        tracing::warn!(%peer, timeout_ms = write_timeout.as_millis() as u64, "closing connection that does not read its answers");
    };
    while let Some(frame) = outgoing.recv().await {
        match tokio::time::timeout(write_timeout, frame.write_to(&mut writer, zero_copy)).await {
            Ok(Ok(written)) => sent_bytes.inc_by(written),
            Ok(Err(_)) => return,
            Err(_) => return stalled(),
        };
        // Batch whatever else is ready into the same flush.
        while let Ok(frame) = outgoing.try_recv() {
            match tokio::time::timeout(write_timeout, frame.write_to(&mut writer, zero_copy)).await
            {
                Ok(Ok(written)) => sent_bytes.inc_by(written),
                Ok(Err(_)) => return,
                Err(_) => return stalled(),
            };
        }
        match tokio::time::timeout(write_timeout, writer.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => return stalled(),
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use sluice_protocol::messages::{MetadataResponse, PartitionMetadata, TopicMetadata};
    use sluice_protocol::{ResponseHeader, decode_response_header};

    use super::*;

    fn metadata_of(partitions: u32) -> Response {
        Response::Metadata(MetadataResponse {
            brokers: Vec::new(),
            topics: vec![TopicMetadata {
                error_code: ErrorCode::None,
                name: "t".into(),
                internal: false,
                partitions: (0..partitions)
                    .map(|partition| PartitionMetadata {
                        partition,
                        error_code: ErrorCode::None,
                        leader_id: 0,
                    })
                    .collect(),
            }],
        })
    }

    fn header(frame: &OutgoingFrame) -> (ResponseHeader, usize) {
        let bytes: Vec<u8> = frame
            .parts
            .iter()
            .flat_map(|part| part.iter().copied())
            .collect();
        let length = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(length, bytes.len() - LENGTH_PREFIX_BYTES);
        let (header, _) = decode_response_header(Bytes::from(bytes[4..].to_vec())).unwrap();
        (header, length)
    }

    #[test]
    fn an_answer_over_max_frame_bytes_becomes_message_too_large() {
        let (frame, code) = encode(7, &metadata_of(10), 1024);
        assert_eq!(code, ErrorCode::None);
        assert_eq!(header(&frame).0.error_code, ErrorCode::None);
        // 12 bytes a partition: 1,000 of them are over a 1 KiB limit.
        let (frame, code) = encode(7, &metadata_of(1_000), 1024);
        assert_eq!(code, ErrorCode::MessageTooLarge);
        let (header, length) = header(&frame);
        assert_eq!(
            (header.correlation_id, header.error_code),
            (7, ErrorCode::MessageTooLarge)
        );
        assert!(length <= 1024);
    }
}
