//! Hostile clients over live sockets, TCP and QUIC, against a real broker on ephemeral ports:
//! random frames (a property test), a megabyte of random bytes on each of 100 connections,
//! length prefixes of 0xFFFFFFFF, senders that stall or trickle inside a frame, and thousands
//! of connect/disconnect cycles. After each, a well-behaved client is served normally and the
//! process's open file descriptors are back where they started; RSS is reported (allocator
//! noise makes a tight bound on it meaningless).
//!
//! Short versions run in CI; `SLUICE_RELIABILITY_LONG=1` runs the long ones (`.ci/long`).
//! Single cases of `limits.rs` and `broker.rs` (one oversized frame, one stalled frame) are not
//! repeated here; these tests are about volume, concurrency and what is left behind.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use sluice_broker::{BrokerHandle, Config};
use sluice_client::Connection;
use sluice_protocol::ErrorCode;
use sluice_protocol::messages::ApiVersionsRequest;
use sluice_testkit::scale;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The frame deadline of these tests: short, so stalled senders are cut off quickly.
const FRAME_READ_TIMEOUT_MS: u64 = 200;
/// File descriptors the process may hold above its starting count once the hostile clients
/// are gone (the runtime may keep a few, such as blocking-pool threads' files).
const FD_MARGIN: usize = 8;
/// Bound on every wait for a condition.
const DEADLINE: Duration = Duration::from_secs(60);

/// A broker with one healthy client per transport, and the resources before the hostility.
struct Harness {
    broker: BrokerHandle,
    dir: tempfile::TempDir,
    tcp: Connection,
    quic: Connection,
    before: Resources,
    started: Instant,
}

impl Harness {
    async fn start(tune: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::on_loopback(dir.path());
        config.limits.frame_read_timeout_ms = FRAME_READ_TIMEOUT_MS;
        tune(&mut config);
        let broker = start(config).await;
        let tcp = Connection::connect(&tcp_url(&broker))
            .await
            .expect("connect");
        let quic = Connection::connect_with(&quic_url(&broker), quic_options(dir.path()))
            .await
            .expect("connect over QUIC");
        create_topic(&tcp, "healthy", 1).await;
        served_normally(&tcp, "healthy").await;
        served_normally(&quic, "healthy").await;
        let before = Resources::now();
        Harness {
            broker,
            dir,
            tcp,
            quic,
            before,
            started: Instant::now(),
        }
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The hostile clients are gone: the broker closes their connections, the process's file
    /// descriptors come back, and the healthy clients are served as before.
    async fn finish(self, name: &str) {
        wait_for_connections(&self.broker, 2, DEADLINE).await;
        let fds = wait_for_fds(self.before.fds, FD_MARGIN, DEADLINE).await;
        served_normally(&self.tcp, "healthy").await;
        served_normally(&self.quic, "healthy").await;
        let after = Resources::now();
        eprintln!(
            "[hostile] {name}: {:.1} s; before: {}; after: {} ({fds} fds once settled); \
             RSS {:+.1} MiB",
            self.started.elapsed().as_secs_f64(),
            self.before,
            after,
            (after.rss_kib as f64 - self.before.rss_kib as f64) / 1024.0,
        );
        self.tcp.close().await;
        self.quic.close().await;
        self.broker.shutdown().await;
    }
}

/// Writes `bytes` then reads until the broker closes the connection (or `DEADLINE`), reading
/// and writing at once so that answers never block the broker's writer. Write errors are
/// expected: the broker closes the connection at the first frame it cannot recover from.
async fn blast_tcp(broker: &BrokerHandle, bytes: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(broker.tcp_addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        let _ = writer.shutdown().await;
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the broker neither answered nor closed in time"
    );
    writing.await.unwrap();
    answer
}

/// As [`blast_tcp`], on a new stream of `connection`. The stream must open and the broker must
/// end its side cleanly: a reset stream or a lost connection fails the test, as it would also
/// leave an empty answer that [`RandomFrames::check`] accepts. Write errors are expected: the
/// broker stops reading a stream at the first frame it cannot recover from.
async fn blast_quic(connection: &quinn::Connection, bytes: Vec<u8>) -> Vec<u8> {
    let (mut send, mut receive) = connection
        .open_bi()
        .await
        .unwrap_or_else(|error| panic!("a new stream on the QUIC connection: {error}"));
    let writing = tokio::spawn(async move {
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
    });
    let answer = tokio::time::timeout(DEADLINE, receive.read_to_end(64 << 20))
        .await
        .expect("the broker neither answered nor ended the stream in time")
        .unwrap_or_else(|error| panic!("the broker did not end the stream cleanly: {error}"));
    writing.await.unwrap();
    answer
}

/// An ApiVersions round trip on a fresh stream of `connection`: the connection a hostile
/// stream was sent on still serves well-formed requests.
async fn api_versions_on_a_new_stream(connection: &quinn::Connection, correlation_id: u32) {
    let (mut send, mut receive) = connection
        .open_bi()
        .await
        .unwrap_or_else(|error| panic!("a new stream on the QUIC connection: {error}"));
    send.write_all(&frame(correlation_id, ApiVersionsRequest {}))
        .await
        .expect("write the request");
    send.finish().expect("finish the request stream");
    let answer = tokio::time::timeout(DEADLINE, receive.read_to_end(1 << 20))
        .await
        .expect("ApiVersions answered in time")
        .unwrap_or_else(|error| panic!("the ApiVersions stream failed: {error}"));
    assert_eq!(
        parse_responses(&answer),
        [(correlation_id, ErrorCode::None)],
        "one ApiVersions answer, without error"
    );
}

/// One property-test case: well-framed requests with random api keys, versions and bodies,
/// then trailing garbage. Whatever the broker sends back is whole response frames, each
/// answering a request that was sent (or 0, for a frame it could not read an id from).
#[derive(Debug, Clone)]
struct RandomFrames {
    frames: Vec<(u16, u16, u32, Vec<u8>)>,
    trailing: Vec<u8>,
}

impl RandomFrames {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (api_key, version, correlation_id, body) in &self.frames {
            out.extend_from_slice(&(10 + body.len() as u32).to_be_bytes());
            out.extend_from_slice(&api_key.to_be_bytes());
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&correlation_id.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(body);
        }
        out.extend_from_slice(&self.trailing);
        out
    }

    fn check(&self, answer: &[u8]) {
        // The frames' ids, and any id the trailing garbage may hold (the broker answers a
        // frame it refuses with the id it finds where the id would be).
        let mut sent: Vec<u32> = self.frames.iter().map(|frame| frame.2).collect();
        sent.extend(
            self.trailing
                .windows(4)
                .map(|id| u32::from_be_bytes(id.try_into().unwrap())),
        );
        let responses = parse_responses(answer);
        assert!(
            responses.len() <= self.frames.len() + 2,
            "{} answers to {} frames",
            responses.len(),
            self.frames.len()
        );
        for (correlation_id, _) in responses {
            assert!(
                correlation_id == 0 || sent.contains(&correlation_id),
                "an answer to {correlation_id}, which was never sent"
            );
        }
    }
}

fn random_frames() -> impl Strategy<Value = RandomFrames> {
    let frame = (
        // Known api keys are 0 to 20 or so; some beyond.
        prop_oneof![0u16..24, any::<u16>()],
        prop_oneof![Just(0u16), any::<u16>()],
        1u32..1_000_000,
        proptest::collection::vec(any::<u8>(), 0..300),
    );
    (
        proptest::collection::vec(frame, 0..8),
        proptest::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(frames, trailing)| RandomFrames { frames, trailing })
}

#[test]
fn random_frames_over_tcp_and_quic_get_only_well_formed_answers() {
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let harness = runtime.block_on(Harness::start(|config| {
        config.limits.max_frame_bytes = 64 * 1024;
        config.limits.max_batch_bytes = 32 * 1024;
        config.log.max_message_bytes = 32 * 1024;
    }));
    let quic = {
        let _runtime = runtime.enter();
        RawQuic::new(&harness.broker, harness.data_dir())
    };
    let quic_connection = runtime.block_on(quic.connect()).expect("QUIC handshake");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: scale(256, 10_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let cases = std::sync::atomic::AtomicU64::new(0);
    let outcome = runner.run(&random_frames(), |case| {
        cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(async {
            let (tcp, quic) = tokio::join!(
                blast_tcp(&harness.broker, case.bytes()),
                blast_quic(&quic_connection, case.bytes()),
            );
            case.check(&tcp);
            case.check(&quic);
            // Bad frames end their own stream, never the connection: it is still open and a
            // well-formed request on a fresh stream of it is answered.
            assert!(
                quic_connection.close_reason().is_none(),
                "the hostile stream closed its connection: {:?}",
                quic_connection.close_reason()
            );
            api_versions_on_a_new_stream(&quic_connection, 7).await;
            // The healthy client, on a connection of its own, is not harmed either.
            harness
                .quic
                .send(ApiVersionsRequest {})
                .await
                .expect("the healthy client is answered");
        });
        Ok(())
    });
    if let Err(error) = outcome {
        panic!("{error}");
    }
    runtime.block_on(async {
        quic_connection.close(0u32.into(), b"done");
        quic.close_after(&harness.broker).await;
        harness
            .finish(&format!(
                "random frames (property test), {} cases",
                cases.into_inner()
            ))
            .await;
    });
}

/// 1 MB for connection `index`: half pure noise (whose first four bytes are nearly always an
/// oversized length), half believable frames with random contents, which the broker must read
/// through and answer one by one.
fn megabyte(index: u64) -> Vec<u8> {
    let mut random = sluice_testkit::Rng::new(0x5eed + index);
    if index.is_multiple_of(2) {
        noise_bytes(&mut random, 1 << 20)
    } else {
        noise_frames(&mut random, 1 << 20)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_connections_sending_a_megabyte_of_random_bytes_each() {
    let _serial = SERIAL.lock().await;
    let harness = Harness::start(|_| {}).await;
    const CONNECTIONS: u64 = 100;
    // The long run repeats the whole thing: memory that grows round after round is a leak,
    // memory that stays at the first round's level is the allocator keeping what it got.
    for round in 0..scale(1, 5) {
        let started = Instant::now();
        let mut blasts = JoinSet::new();
        for index in 0..CONNECTIONS {
            let tcp_addr = harness.broker.tcp_addr;
            blasts.spawn(async move {
                let stream = TcpStream::connect(tcp_addr).await.expect("connect");
                let (mut reader, mut writer) = stream.into_split();
                let writing = tokio::spawn(async move {
                    let _ = writer.write_all(&megabyte(index)).await;
                    let _ = writer.shutdown().await;
                });
                let mut answer = Vec::new();
                tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer))
                    .await
                    .expect("the broker answers or closes in time")
                    .ok();
                writing.await.unwrap();
                answer.len()
            });
        }
        let mut tcp_answers = 0;
        while let Some(blast) = blasts.join_next().await {
            tcp_answers += blast.unwrap();
        }
        let tcp_seconds = started.elapsed().as_secs_f64();

        // QUIC: 100 connections, one stream each.
        let started = Instant::now();
        let quic = std::sync::Arc::new(RawQuic::new(&harness.broker, harness.data_dir()));
        let mut blasts = JoinSet::new();
        for index in 0..CONNECTIONS {
            let quic = std::sync::Arc::clone(&quic);
            blasts.spawn(async move {
                let connection = quic.connect().await.expect("QUIC handshake");
                let answer = blast_quic(&connection, megabyte(index)).await;
                (connection, answer.len())
            });
        }
        let mut quic_answers = 0;
        let mut connections = Vec::new();
        while let Some(blast) = blasts.join_next().await {
            let (connection, answer) = blast.unwrap();
            quic_answers += answer;
            connections.push(connection);
        }
        // Closed once the traffic is over, when closing packets are least likely to be lost
        // to a full UDP buffer (see `RawQuic::close_after`).
        for connection in connections {
            connection.close(0u32.into(), b"done");
        }
        std::sync::Arc::into_inner(quic)
            .unwrap()
            .close_after(&harness.broker)
            .await;
        eprintln!(
            "[hostile] random megabytes: TCP {tcp_seconds:.1} s ({tcp_answers} bytes of answers), \
             QUIC {:.1} s ({quic_answers} bytes of answers)",
            started.elapsed().as_secs_f64()
        );
        eprintln!(
            "[hostile] random megabytes, round {round}: {}",
            Resources::now()
        );
    }
    harness
        .finish("100 connections x 1 MB of random bytes, TCP and QUIC")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_prefixes_of_0xffffffff_are_refused_on_every_connection() {
    let _serial = SERIAL.lock().await;
    let harness = Harness::start(|_| {}).await;
    const CONNECTIONS: u32 = 100;
    let quic = RawQuic::new(&harness.broker, harness.data_dir());
    let quic_connection = quic.connect().await.expect("QUIC handshake");
    let mut refusals = JoinSet::new();
    for index in 0..CONNECTIONS {
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0, 6, 0, 0];
        bytes.extend_from_slice(&index.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]);
        // Whatever follows is never read: the length alone is refused.
        bytes.extend_from_slice(&[0xab; 4096]);
        let tcp_addr = harness.broker.tcp_addr;
        let quic_connection = quic_connection.clone();
        refusals.spawn(async move {
            let stream = TcpStream::connect(tcp_addr).await.expect("connect");
            let (mut reader, mut writer) = stream.into_split();
            let _ = writer.write_all(&bytes).await;
            let mut answer = Vec::new();
            tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer))
                .await
                .expect("closed in time")
                .ok();
            let quic_answer = blast_quic(&quic_connection, bytes).await;
            (index, answer, quic_answer)
        });
    }
    while let Some(refusal) = refusals.join_next().await {
        let (index, tcp, quic) = refusal.unwrap();
        for answer in [tcp, quic] {
            assert_eq!(
                parse_responses(&answer),
                [(index, ErrorCode::MessageTooLarge)],
                "one MessageTooLarge answer, then the end"
            );
        }
    }
    quic_connection.close(0u32.into(), b"done");
    quic.close_after(&harness.broker).await;
    harness
        .finish("0xFFFFFFFF length prefixes, 100 TCP + 100 QUIC")
        .await;
}

/// How a slow sender behaves inside its frame.
#[derive(Clone, Copy, Debug)]
enum Slowness {
    /// Sends part of the frame, then nothing.
    Stall,
    /// Keeps sending one byte at a time, each well within the deadline, never finishing:
    /// the deadline is for the whole frame, not for each read.
    Trickle,
}

/// Sends the start of a 100 KB produce frame with correlation id `id`, then `slowness`, until
/// the broker closes the connection. Returns the answer and how long the frame was open.
async fn slow_sender<W, R>(
    mut writer: W,
    mut reader: R,
    id: u32,
    slowness: Slowness,
) -> (Vec<u8>, Duration)
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    R: tokio::io::AsyncRead + Unpin,
{
    let frame = frame(
        id,
        produce_request(
            "healthy",
            0,
            batch(100, 1000),
            sluice_protocol::messages::Acks::Leader,
        ),
    );
    let started = Instant::now();
    writer
        .write_all(&frame[..frame.len() / 3])
        .await
        .expect("write");
    let dripping = tokio::spawn(async move {
        if let Slowness::Trickle = slowness {
            for byte in &frame[frame.len() / 3..] {
                tokio::time::sleep(Duration::from_millis(FRAME_READ_TIMEOUT_MS / 4)).await;
                if writer.write_all(std::slice::from_ref(byte)).await.is_err() {
                    break;
                }
            }
        }
        writer
    });
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer))
        .await
        .expect("the broker cut the slow sender off in time")
        .ok();
    let open = started.elapsed();
    dripping.abort();
    (answer, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_holding_partial_frames_are_cut_off_at_the_frame_deadline() {
    let _serial = SERIAL.lock().await;
    let harness = Harness::start(|_| {}).await;
    const SENDERS: u32 = 40;
    let quic = RawQuic::new(&harness.broker, harness.data_dir());
    let quic_connection = quic.connect().await.expect("QUIC handshake");
    let mut senders = JoinSet::new();
    for index in 0..SENDERS {
        let slowness = if index.is_multiple_of(2) {
            Slowness::Stall
        } else {
            Slowness::Trickle
        };
        let tcp_addr = harness.broker.tcp_addr;
        let quic_connection = quic_connection.clone();
        senders.spawn(async move {
            let (reader, writer) = TcpStream::connect(tcp_addr).await.unwrap().into_split();
            let tcp = slow_sender(writer, reader, index + 1, slowness).await;
            let (send, receive) = quic_connection.open_bi().await.unwrap();
            let quic = slow_sender(send, receive, index + 1, slowness).await;
            (index + 1, slowness, [tcp, quic])
        });
    }
    // The deadline, plus generous scheduling slack on a busy machine: an uncut trickle would
    // take the better part of an hour, so this still tells cut from not cut.
    let cut_off_within = Duration::from_millis(FRAME_READ_TIMEOUT_MS) + Duration::from_secs(30);
    // Meanwhile the healthy clients are served without waiting for the slow ones.
    let mut slowest = Duration::ZERO;
    while !senders.is_empty() {
        let started = Instant::now();
        served_normally(&harness.tcp, "healthy").await;
        slowest = slowest.max(started.elapsed());
        tokio::select! {
            Some(sender) = senders.join_next() => {
                let (id, slowness, answers) = sender.unwrap();
                for (answer, open) in answers {
                    assert_eq!(
                        parse_responses(&answer),
                        [(id, ErrorCode::RequestTimedOut)],
                        "{slowness:?}: one RequestTimedOut answer, then the end"
                    );
                    assert!(
                        open < cut_off_within,
                        "{slowness:?}: held its frame open for {open:?}"
                    );
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    eprintln!("[hostile] slow senders: slowest healthy round trip meanwhile {slowest:?}");
    quic_connection.close(0u32.into(), b"done");
    quic.close_after(&harness.broker).await;
    harness
        .finish("40 slow senders (stall, trickle), TCP and QUIC")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connect_disconnect_cycles_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let harness = Harness::start(|_| {}).await;
    let cycles: u32 = scale(1_000, 10_000);
    const AT_ONCE: u32 = 50;
    let request = frame(1, ApiVersionsRequest {});

    // TCP, four ways of leaving: at once; after a request, unread; half-way through a frame;
    // after a whole round trip.
    let started = Instant::now();
    for round in 0..cycles / AT_ONCE {
        let mut cycles = JoinSet::new();
        for index in 0..AT_ONCE {
            let cycle = round * AT_ONCE + index;
            let tcp_addr = harness.broker.tcp_addr;
            let request = request.clone();
            cycles.spawn(async move {
                let mut stream = TcpStream::connect(tcp_addr).await.expect("connect");
                match cycle % 4 {
                    0 => {}
                    1 => stream.write_all(&request).await.unwrap(),
                    2 => stream.write_all(&request[..7]).await.unwrap(),
                    _ => {
                        stream.write_all(&request).await.unwrap();
                        let mut header = [0u8; 10];
                        stream.read_exact(&mut header).await.unwrap();
                    }
                }
            });
        }
        while let Some(cycle) = cycles.join_next().await {
            cycle.unwrap();
        }
    }
    let tcp_seconds = started.elapsed().as_secs_f64();

    // QUIC: a handshake, then closed at once or after a request on a stream. Fewer at once:
    // bursts of handshakes overflow the UDP receive buffers, and a client whose closing packet
    // was dropped holds its connection until the broker's idle timeout (30 s) ends it.
    let started = Instant::now();
    let quic = std::sync::Arc::new(RawQuic::new(&harness.broker, harness.data_dir()));
    const QUIC_AT_ONCE: u32 = 10;
    for round in 0..cycles / QUIC_AT_ONCE {
        let mut cycles = JoinSet::new();
        for index in 0..QUIC_AT_ONCE {
            let cycle = round * QUIC_AT_ONCE + index;
            let quic = std::sync::Arc::clone(&quic);
            let request = request.clone();
            cycles.spawn(async move {
                let connection = quic.connect().await.expect("QUIC handshake");
                if cycle % 2 == 1
                    && let Ok((mut send, _receive)) = connection.open_bi().await
                {
                    let _ = send.write_all(&request).await;
                }
                connection.close(0u32.into(), b"bye");
            });
        }
        while let Some(cycle) = cycles.join_next().await {
            cycle.unwrap();
        }
    }
    std::sync::Arc::into_inner(quic)
        .unwrap()
        .close_after(&harness.broker)
        .await;
    eprintln!(
        "[hostile] connect/disconnect: {cycles} TCP cycles in {tcp_seconds:.1} s, {cycles} QUIC \
         cycles in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    harness
        .finish(&format!(
            "{cycles} connect/disconnect cycles, TCP and QUIC each"
        ))
        .await;
}

/// Opens a stream, sends an ApiVersions request on it and reads one answer, leaving the stream
/// open; an error when the broker refused the stream.
async fn open_stream_with_an_answer(
    connection: &quinn::Connection,
    correlation_id: u32,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut receive) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    send.write_all(&frame(correlation_id, ApiVersionsRequest {}))
        .await
        .map_err(|error| error.to_string())?;
    let mut length = [0u8; 4];
    tokio::time::timeout(DEADLINE, receive.read_exact(&mut length))
        .await
        .expect("answered or refused in time")
        .map_err(|error| error.to_string())?;
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    receive
        .read_exact(&mut body)
        .await
        .map_err(|error| error.to_string())?;
    let mut whole = length.to_vec();
    whole.extend_from_slice(&body);
    assert_eq!(parse_responses(&whole), [(correlation_id, ErrorCode::None)]);
    Ok((send, receive))
}

/// Every QUIC stream open beside a connection's first takes a connection slot of its own:
/// a stream is served as a TCP connection is, so otherwise one slot held `max_quic_streams`
/// connections' worth of buffers. A stream over the limit is reset; one that ends gives its
/// slot back, the connection's own included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_beside_the_first_take_connection_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_connections = 3;
    let broker = start(config).await;
    let quic = RawQuic::new(&broker, dir.path());
    let connection = quic.connect().await.expect("a connection");
    let mut open = Vec::new();
    for correlation_id in 1..=3 {
        open.push(
            open_stream_with_an_answer(&connection, correlation_id)
                .await
                .unwrap_or_else(|error| panic!("stream {correlation_id}: {error}")),
        );
    }
    let refused = open_stream_with_an_answer(&connection, 4).await;
    assert!(refused.is_err(), "a fourth stream took a slot of three");

    // The first stream, which the connection's own slot covers, ends: that slot covers the
    // next stream, though two others are still open.
    let (mut send, mut receive) = open.remove(0);
    send.finish().unwrap();
    tokio::time::timeout(DEADLINE, receive.read_to_end(1 << 20))
        .await
        .expect("the stream ends")
        .expect("cleanly");
    // Its slot comes back when the broker has finished serving it.
    let deadline = Instant::now() + DEADLINE;
    let mut correlation_id = 5;
    while let Err(error) = open_stream_with_an_answer(&connection, correlation_id).await {
        assert!(
            Instant::now() < deadline,
            "no slot came back after a stream ended: {error}"
        );
        correlation_id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(open);
    connection.close(0u32.into(), b"done");
    quic.endpoint.wait_idle().await;
    broker.shutdown().await;
}
