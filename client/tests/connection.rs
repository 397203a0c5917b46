//! `Connection` against a scripted server: a `TcpListener` on `127.0.0.1:0` that speaks the
//! wire format through `sluice-protocol` and answers exactly what each test tells it to, when
//! it tells it to (and, for a long poll's timing, against a real broker). Every wait has a
//! deadline; nothing synchronises by sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use sluice_client::protocol::messages::{
    Acks, ApiVersionsRequest, ApiVersionsResponse, DeleteTopicResult, DeleteTopicsRequest,
    DeleteTopicsResponse, FetchPartition, FetchPartitionResponse, FetchRequest, FetchResponse,
    FetchTopic, FetchTopicResponse, ProducePartition, ProduceRequest, ProduceTopic,
};
use sluice_client::protocol::{
    ApiKey, ErrorCode, FrameDecoder, Request, RequestHeader, Response, decode_request,
    encode_error_response,
};
use sluice_client::{Connection, ConnectionOptions, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest any single step may take before the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test if it takes longer than [`DEADLINE`].
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("step did not finish before its deadline")
}

/// The server side of one accepted connection.
struct Peer {
    stream: TcpStream,
    decoder: FrameDecoder,
    buffer: BytesMut,
}

impl Peer {
    /// The next request, or `None` when the client closed its side.
    ///
    /// Cancel-safe: bytes read before a cancellation stay in the buffer.
    async fn read_request(&mut self) -> Option<(RequestHeader, Request)> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer).expect("valid frame") {
                return Some(decode_request(frame.freeze()).expect("decodable request"));
            }
            let read = self.stream.read_buf(&mut self.buffer).await.expect("read");
            if read == 0 {
                assert!(self.buffer.is_empty(), "client closed mid-frame");
                return None;
            }
        }
    }

    async fn read_requests(&mut self, count: usize) -> Vec<(RequestHeader, Request)> {
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            requests.push(within(self.read_request()).await.expect("a request"));
        }
        requests
    }

    async fn respond(&mut self, correlation_id: u32, response: impl Into<Response>) {
        let mut frame = BytesMut::new();
        response.into().encode_frame(correlation_id, &mut frame);
        self.write(&frame).await;
    }

    async fn respond_error(&mut self, correlation_id: u32, error_code: ErrorCode) {
        let mut frame = BytesMut::new();
        encode_error_response(correlation_id, error_code, &mut frame);
        self.write(&frame).await;
    }

    async fn write(&mut self, bytes: &[u8]) {
        within(self.stream.write_all(bytes)).await.expect("write");
    }
}

/// A listening scripted server.
struct TestServer {
    listener: TcpListener,
    url: String,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("tcp://{}", listener.local_addr().expect("local address"));
        TestServer { listener, url }
    }

    async fn accept(&self) -> Peer {
        let (stream, _) = within(self.listener.accept()).await.expect("accept");
        Peer {
            stream,
            decoder: FrameDecoder::for_requests(1 << 20),
            buffer: BytesMut::new(),
        }
    }
}

/// A server, a client connected to it, and the server's side of that connection.
async fn connected(options: ConnectionOptions) -> (TestServer, Connection, Peer) {
    let server = TestServer::start().await;
    // The kernel completes the handshake from its backlog, so connecting before accepting is
    // fine.
    let connection = within(Connection::connect_with(&server.url, options))
        .await
        .expect("connect");
    let peer = server.accept().await;
    (server, connection, peer)
}

fn delete_topic(name: &str) -> DeleteTopicsRequest {
    DeleteTopicsRequest {
        names: vec![name.to_owned()],
    }
}

fn topic_name(request: &Request) -> String {
    match request {
        Request::DeleteTopics(request) => request.names.first().expect("one name").clone(),
        other => panic!("expected DeleteTopics, got {other:?}"),
    }
}

fn deleted(name: String) -> DeleteTopicsResponse {
    DeleteTopicsResponse {
        results: vec![DeleteTopicResult {
            name,
            error_code: ErrorCode::None,
        }],
    }
}

fn produce_without_acks(records_bytes: usize) -> ProduceRequest {
    ProduceRequest {
        acks: Acks::None,
        timeout_ms: 1000,
        topics: vec![ProduceTopic {
            name: "orders".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                records: vec![7u8; records_bytes].into(),
            }],
        }],
    }
}

/// Asks for ApiVersions and answers it, proving the connection still works end to end.
async fn assert_round_trip(connection: &Connection, peer: &mut Peer) {
    let server = async {
        let (header, request) = within(peer.read_request()).await.expect("a request");
        assert_eq!(request, Request::ApiVersions(ApiVersionsRequest {}));
        peer.respond(header.correlation_id, ApiVersionsResponse::supported())
            .await;
    };
    let (response, ()) =
        within(async { tokio::join!(connection.send(ApiVersionsRequest {}), server) }).await;
    assert_eq!(
        response.expect("ApiVersions answered"),
        Response::ApiVersions(ApiVersionsResponse::supported())
    );
}

/// A big answer is read whole however it arrives, and a small one after it is read at once:
/// the reader waits for the rest of a big frame (its socket's receive low-water mark), then for
/// any byte again. A mark left high would hold the small answer back until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_answer_arriving_in_pieces_then_small_answers_are_all_read() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;
    let records: bytes::Bytes = (0..3u32 << 20)
        .map(|index| (index % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let big = FetchResponse {
        topics: vec![FetchTopicResponse {
            name: "t".into(),
            partitions: vec![FetchPartitionResponse {
                partition: 0,
                error_code: ErrorCode::None,
                high_watermark: 1,
                log_start_offset: 0,
                records: records.clone(),
            }],
        }],
    };
    let fetch = FetchRequest {
        max_wait_ms: 0,
        min_bytes: 1,
        max_bytes: 4 << 20,
        topics: vec![FetchTopic {
            name: "t".into(),
            partitions: vec![FetchPartition {
                partition: 0,
                fetch_offset: 0,
                partition_max_bytes: 4 << 20,
            }],
        }],
    };
    for _ in 0..3 {
        let server = async {
            let (header, _) = within(peer.read_request()).await.expect("the fetch");
            let mut frame = BytesMut::new();
            Response::Fetch(big.clone()).encode_frame(header.correlation_id, &mut frame);
            // The length prefix and a little, then the rest in pieces of every size.
            let mut at = 0;
            for piece in [10, 100_000, 1, 300_000, 64 * 1024].into_iter().cycle() {
                let end = (at + piece).min(frame.len());
                peer.write(&frame[at..end]).await;
                at = end;
                if at == frame.len() {
                    break;
                }
            }
        };
        let (answer, ()) =
            within(async { tokio::join!(connection.send(fetch.clone()), server) }).await;
        match answer.expect("the fetch answered") {
            Response::Fetch(answer) => assert_eq!(answer, big),
            other => panic!("expected a fetch answer, got {other:?}"),
        }
        assert_round_trip(&connection, &mut peer).await;
        assert_round_trip(&connection, &mut peer).await;
    }
}

#[tokio::test]
async fn api_versions_round_trip() {
    let (server, connection, mut peer) = connected(ConnectionOptions::default()).await;
    assert_eq!(connection.peer(), server.url);
    assert!(!connection.is_closed());

    let server_side = async {
        let (header, request) = within(peer.read_request()).await.expect("a request");
        assert_eq!(header.api_key, ApiKey::ApiVersions.code());
        assert_eq!(header.api_version, ApiKey::ApiVersions.current_version());
        assert_eq!(request, Request::ApiVersions(ApiVersionsRequest {}));
        peer.respond(header.correlation_id, ApiVersionsResponse::supported())
            .await;
    };
    let (response, ()) =
        within(async { tokio::join!(connection.send(ApiVersionsRequest {}), server_side) }).await;

    assert_eq!(
        response.expect("answered"),
        Response::ApiVersions(ApiVersionsResponse::supported())
    );
    assert_eq!(connection.in_flight_count(), 0);
}

// Several worker threads, so the reader, the writer and the callers really race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_answered_in_reverse_order_are_matched_by_correlation_id() {
    const REQUESTS: usize = 100;
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    let mut clients = Vec::with_capacity(REQUESTS);
    for index in 0..REQUESTS {
        let connection = connection.clone();
        clients.push(tokio::spawn(async move {
            let name = format!("topic-{index}");
            let response = connection.send(delete_topic(&name)).await;
            (name, response)
        }));
    }

    // Every request arrives before any answer leaves, so all 100 are in flight at once.
    let requests = peer.read_requests(REQUESTS).await;
    let mut correlation_ids: Vec<u32> = requests
        .iter()
        .map(|(header, _)| header.correlation_id)
        .collect();
    correlation_ids.sort_unstable();
    correlation_ids.dedup();
    assert_eq!(correlation_ids.len(), REQUESTS, "correlation ids repeat");
    assert_eq!(connection.in_flight_count(), REQUESTS);

    for (header, request) in requests.iter().rev() {
        peer.respond(header.correlation_id, deleted(topic_name(request)))
            .await;
    }

    for client in clients {
        let (name, response) = within(client).await.expect("client task");
        assert_eq!(
            response.expect("answered"),
            Response::DeleteTopics(deleted(name))
        );
    }
    assert_eq!(connection.in_flight_count(), 0);
}

#[tokio::test]
async fn error_code_in_response_header_is_a_broker_error() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    let server_side = async {
        let (header, _) = within(peer.read_request()).await.expect("a request");
        peer.respond_error(header.correlation_id, ErrorCode::UnknownTopic)
            .await;
    };
    let (response, ()) =
        within(async { tokio::join!(connection.send(delete_topic("missing")), server_side) }).await;

    match response {
        Err(Error::Broker {
            code: ErrorCode::UnknownTopic,
            message: None,
        }) => {}
        other => panic!("expected Broker(UnknownTopic), got {other:?}"),
    }
    // One failed request does not cost the connection.
    assert!(!connection.is_closed());
    assert_round_trip(&connection, &mut peer).await;
}

#[tokio::test]
async fn undecodable_response_body_fails_only_its_request() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    let server_side = async {
        let (header, _) = within(peer.read_request()).await.expect("a request");
        // A well-formed frame and header around a body that is one byte of nonsense.
        let mut frame = BytesMut::new();
        frame.put_u32(7);
        frame.put_u32(header.correlation_id);
        frame.put_u16(ErrorCode::None.code());
        frame.put_u8(0xff);
        peer.write(&frame).await;
    };
    let (response, ()) =
        within(async { tokio::join!(connection.send(ApiVersionsRequest {}), server_side) }).await;

    assert!(
        matches!(response, Err(Error::Protocol(_))),
        "expected Protocol, got {response:?}"
    );
    assert!(!connection.is_closed());
    assert_round_trip(&connection, &mut peer).await;
}

// Several worker threads, so the reader, the writer and the callers really race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closing_fails_every_in_flight_request_and_every_later_send() {
    const REQUESTS: usize = 10;
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    let mut clients = Vec::with_capacity(REQUESTS);
    for index in 0..REQUESTS {
        let connection = connection.clone();
        clients.push(tokio::spawn(async move {
            connection
                .send(delete_topic(&format!("topic-{index}")))
                .await
        }));
    }
    peer.read_requests(REQUESTS).await;
    drop(peer);

    // The default request timeout is 30 s; failing well inside the deadline shows the close,
    // not the timeout, ended these requests.
    for client in clients {
        let response = within(client).await.expect("client task");
        assert!(
            matches!(response, Err(Error::ConnectionClosed)),
            "expected ConnectionClosed, got {response:?}"
        );
    }
    assert!(connection.is_closed());
    assert_eq!(connection.in_flight_count(), 0);

    let later = tokio::time::timeout(
        Duration::from_secs(1),
        connection.send(ApiVersionsRequest {}),
    )
    .await
    .expect("a send on a closed connection fails at once");
    assert!(matches!(later, Err(Error::ConnectionClosed)), "{later:?}");
    let later = connection
        .send_without_response(produce_without_acks(1))
        .await;
    assert!(matches!(later, Err(Error::ConnectionClosed)), "{later:?}");
    assert!(Error::ConnectionClosed.is_retriable());
}

#[tokio::test]
async fn oversized_response_frame_closes_the_connection() {
    let options = ConnectionOptions::default().max_frame_bytes(1024);
    let (_server, connection, mut peer) = connected(options).await;

    let server_side = async {
        let (first, _) = within(peer.read_request()).await.expect("a request");
        let (second, _) = within(peer.read_request()).await.expect("a request");
        let mut frame = BytesMut::new();
        frame.put_u32(1025);
        frame.put_u32(second.correlation_id);
        peer.write(&frame).await;
        (first, peer)
    };
    let (first, second, _server) = within(async {
        tokio::join!(
            connection.send(ApiVersionsRequest {}),
            connection.send(ApiVersionsRequest {}),
            server_side
        )
    })
    .await;

    // The request the oversized frame answers fails with the reason, which retrying would not
    // change; the others on the connection with a closed connection, which a retry may mend.
    let (too_large, closed) = match (&first, &second) {
        (Err(Error::Protocol(_)), other) | (other, Err(Error::Protocol(_))) => {
            (true, matches!(other, Err(Error::ConnectionClosed)))
        }
        _ => (false, false),
    };
    assert!(too_large && closed, "got {first:?} and {second:?}");
    let reason = [first, second]
        .into_iter()
        .find_map(|result| match result {
            Err(Error::Protocol(reason)) => Some(reason),
            _ => None,
        })
        .unwrap();
    assert!(
        matches!(
            reason,
            sluice_client::protocol::WireError::FrameTooLarge { .. }
        ),
        "{reason:?}"
    );
    assert!(!Error::Protocol(reason).is_retriable());
    assert!(connection.is_closed());
}

#[tokio::test]
async fn request_without_answer_times_out_and_its_late_response_is_dropped() {
    let request_timeout = Duration::from_millis(200);
    let options = ConnectionOptions::default().request_timeout(request_timeout);
    let (_server, connection, mut peer) = connected(options).await;

    let started = Instant::now();
    let server_side = async {
        let (header, _) = within(peer.read_request()).await.expect("a request");
        header
    };
    let (response, unanswered) =
        within(async { tokio::join!(connection.send(delete_topic("slow")), server_side) }).await;

    match response {
        Err(Error::Timeout { timeout_ms: 200 }) => {}
        other => panic!("expected Timeout after 200 ms, got {other:?}"),
    }
    assert!(started.elapsed() >= request_timeout);
    assert_eq!(
        connection.in_flight_count(),
        0,
        "timed-out entry left behind"
    );

    // The answer arrives after the caller gave up: it matches nothing and is dropped, and a
    // response with a correlation id never issued is dropped the same way.
    peer.respond(unanswered.correlation_id, deleted("slow".into()))
        .await;
    peer.respond(u32::MAX - 7, deleted("stray".into())).await;
    assert!(!connection.is_closed());
    assert_round_trip(&connection, &mut peer).await;
}

#[tokio::test]
async fn produce_without_acks_registers_nothing() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    within(connection.send_without_response(produce_without_acks(16)))
        .await
        .expect("queued");
    assert_eq!(connection.in_flight_count(), 0);

    let (_, request) = within(peer.read_request()).await.expect("the produce");
    match request {
        Request::Produce(produce) => assert_eq!(produce, produce_without_acks(16)),
        other => panic!("expected Produce, got {other:?}"),
    }
    // The next request gets the next response: nothing was waiting for the produce.
    assert_round_trip(&connection, &mut peer).await;
    assert_eq!(connection.in_flight_count(), 0);
}

#[tokio::test]
async fn close_still_writes_frames_queued_before_it() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    within(connection.send_without_response(produce_without_acks(16)))
        .await
        .expect("queued");
    within(connection.close()).await;
    assert!(connection.is_closed());

    let (_, request) = within(peer.read_request()).await.expect("the produce");
    assert_eq!(request.api_key(), ApiKey::Produce);
    assert!(
        within(peer.read_request()).await.is_none(),
        "the client shuts its side down after the queued frames"
    );
    let later = connection.send(ApiVersionsRequest {}).await;
    assert!(matches!(later, Err(Error::ConnectionClosed)), "{later:?}");
    // A second close returns at once.
    within(connection.close()).await;
}

#[tokio::test]
async fn close_fails_pending_requests() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;

    let client = tokio::spawn({
        let connection = connection.clone();
        async move { connection.send(ApiVersionsRequest {}).await }
    });
    within(peer.read_request()).await.expect("a request");
    within(connection.close()).await;

    let response = within(client).await.expect("client task");
    assert!(
        matches!(response, Err(Error::ConnectionClosed)),
        "{response:?}"
    );
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_socket() {
    let (_server, connection, mut peer) = connected(ConnectionOptions::default()).await;
    let clone = connection.clone();
    drop(connection);
    // One handle is left: the connection stays up.
    assert_round_trip(&clone, &mut peer).await;
    drop(clone);
    assert!(within(peer.read_request()).await.is_none());
}

// Several worker threads, so the reader, the writer and the callers really race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_max_in_flight_wait_for_a_slot() {
    const REQUESTS: usize = 5;
    const MAX_IN_FLIGHT: usize = 2;
    let options = ConnectionOptions::default().max_in_flight(MAX_IN_FLIGHT);
    let (_server, connection, mut peer) = connected(options).await;

    let mut clients = Vec::with_capacity(REQUESTS);
    for index in 0..REQUESTS {
        let connection = connection.clone();
        clients.push(tokio::spawn(async move {
            let name = format!("topic-{index}");
            let response = connection.send(delete_topic(&name)).await;
            (name, response)
        }));
    }

    let mut answered = 0;
    while answered < REQUESTS {
        let batch = MAX_IN_FLIGHT.min(REQUESTS - answered);
        let requests = peer.read_requests(batch).await;
        // A freed slot lets the next request out as soon as its owner has its answer, while the
        // reader may not have taken the other answer of the batch yet: up to the limit, never over.
        assert!(connection.in_flight_count() <= MAX_IN_FLIGHT);
        if batch == MAX_IN_FLIGHT && answered + batch < REQUESTS {
            // The limit is reached: no further request may reach the server until a slot frees.
            let extra = tokio::time::timeout(Duration::from_millis(100), peer.read_request()).await;
            assert!(
                extra.is_err(),
                "a request beyond max_in_flight was sent: {extra:?}"
            );
        }
        for (header, request) in requests {
            peer.respond(header.correlation_id, deleted(topic_name(&request)))
                .await;
        }
        answered += batch;
    }

    for client in clients {
        let (name, response) = within(client).await.expect("client task");
        assert_eq!(
            response.expect("waited for a slot, then answered"),
            Response::DeleteTopics(deleted(name))
        );
    }
}

/// A request queued with `enqueue` frees its slot when its answer arrives, not when its
/// caller reads the answer: a caller that queues more before it reads (as the producer's
/// sender does) never waits for slots only its own unread answers hold.
#[tokio::test]
async fn an_answered_enqueued_request_frees_its_slot_before_it_is_read() {
    const MAX_IN_FLIGHT: usize = 2;
    let options = ConnectionOptions::default().max_in_flight(MAX_IN_FLIGHT);
    let (_server, connection, mut peer) = connected(options).await;
    let mut unread = Vec::new();
    for index in 0..MAX_IN_FLIGHT {
        unread.push(
            within(connection.enqueue(delete_topic(&format!("topic-{index}"))))
                .await
                .expect("queued"),
        );
    }
    for (header, request) in peer.read_requests(MAX_IN_FLIGHT).await {
        peer.respond(header.correlation_id, deleted(topic_name(&request)))
            .await;
    }
    // The answers are in (nothing is pending), none read: a third request goes out.
    within(async {
        while connection.in_flight_count() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let third = within(connection.enqueue(delete_topic("topic-2")))
        .await
        .expect("a slot was free");
    let (header, request) = within(peer.read_request())
        .await
        .expect("the third request");
    peer.respond(header.correlation_id, deleted(topic_name(&request)))
        .await;
    unread.push(third);
    for (index, pending) in unread.into_iter().enumerate() {
        assert_eq!(
            within(pending.response()).await.expect("answered"),
            Response::DeleteTopics(deleted(format!("topic-{index}")))
        );
    }
}

#[tokio::test]
async fn request_over_max_frame_bytes_is_refused_without_sending() {
    // Room for the ApiVersions response below, not for 200 bytes of records.
    let options = ConnectionOptions::default().max_frame_bytes(128);
    let (_server, connection, mut peer) = connected(options).await;

    let response = connection.send(produce_without_acks(200)).await;
    match response {
        Err(Error::RequestTooLarge {
            frame_bytes,
            max_frame_bytes: 128,
        }) => assert!(frame_bytes > 128),
        other => panic!("expected RequestTooLarge, got {other:?}"),
    }
    let response = connection
        .send_without_response(produce_without_acks(200))
        .await;
    assert!(
        matches!(response, Err(Error::RequestTooLarge { .. })),
        "{response:?}"
    );
    assert_eq!(connection.in_flight_count(), 0);
    // The next thing the server sees is the next request, not the refused ones.
    assert_round_trip(&connection, &mut peer).await;
}

#[tokio::test]
async fn bad_urls_are_refused_with_the_problem_named() {
    let cases = [
        ("127.0.0.1:7171", "missing scheme"),
        ("http://127.0.0.1:7171", "unknown scheme"),
        ("tcp://127.0.0.1", "missing port"),
        ("tcp://:7171", "missing host"),
        ("tcp://127.0.0.1:99999", "port"),
        ("tcp://::1:7171", "brackets"),
        ("tcp://127.0.0.1:7171/path", "unexpected"),
        // quic:// works, but only with a CA file to check the broker against.
        ("quic://127.0.0.1:7171", "--ca-file"),
    ];
    for (url, expected) in cases {
        match within(Connection::connect(url)).await {
            Err(error @ Error::InvalidUrl(_)) => {
                let message = error.to_string();
                assert!(
                    message.contains(expected),
                    "{url}: {message:?} does not mention {expected:?}"
                );
                assert!(!error.is_retriable());
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    // Bind to learn a free port, then free it so nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    drop(listener);

    match within(Connection::connect(&format!("tcp://{address}"))).await {
        Err(error @ Error::Connect { .. }) => {
            let Error::Connect {
                address: tried,
                source,
            } = &error
            else {
                unreachable!()
            };
            assert_eq!(tried, &address.to_string());
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
            assert!(error.is_retriable());
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[tokio::test]
async fn connects_by_host_name_and_by_ipv6_address() {
    let server = TestServer::start().await;
    let port = server.listener.local_addr().expect("local address").port();
    // `localhost` may resolve to ::1 first, where nothing listens: the next address is tried.
    let connection = within(Connection::connect(&format!("tcp://localhost:{port}")))
        .await
        .expect("connect by name");
    let mut peer = server.accept().await;
    assert_round_trip(&connection, &mut peer).await;

    // A host without an IPv6 loopback says so explicitly; the half is never skipped quietly.
    let listener = match TcpListener::bind("[::1]:0").await {
        Ok(listener) => listener,
        Err(_) if std::env::var_os("SLUICE_NO_IPV6").is_some() => return,
        Err(error) => panic!("no IPv6 loopback ({error}); set SLUICE_NO_IPV6=1 to skip"),
    };
    let port = listener.local_addr().expect("local address").port();
    let url = format!("tcp://[::1]:{port}");
    let server = TestServer { listener, url };
    let connection = within(Connection::connect(&server.url))
        .await
        .expect("connect over IPv6");
    let mut peer = server.accept().await;
    assert_round_trip(&connection, &mut peer).await;
}

/// A long-poll fetch may take its `max_wait_ms` on top of `request_timeout` before it is
/// answered: the broker holding it is not the broker being silent.
#[tokio::test]
async fn a_long_poll_fetch_is_not_timed_out_by_the_request_timeout() {
    use sluice_client::protocol::messages::{FetchPartition, FetchRequest, FetchTopic};
    let dir = tempfile::tempdir().unwrap();
    let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let url = format!("tcp://{}", broker.tcp_addr);
    let admin = sluice_client::Client::connect(&url).await.unwrap();
    admin.admin().create_topic("idle", 1, &[]).await.unwrap();
    let options = ConnectionOptions::default().request_timeout(Duration::from_millis(300));
    let connection = Connection::connect_with(&url, options).await.unwrap();
    let started = Instant::now();
    let answer = within(connection.send(FetchRequest {
        max_wait_ms: 1_000,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            name: "idle".into(),
            partitions: vec![FetchPartition {
                partition: 0,
                fetch_offset: 0,
                partition_max_bytes: 1 << 20,
            }],
        }],
    }))
    .await;
    assert!(matches!(answer, Ok(Response::Fetch(_))), "{answer:?}");
    // It was a long poll indeed: answered when the broker's wait ran out.
    assert!(started.elapsed() >= Duration::from_millis(900));
    connection.close().await;
    broker.shutdown().await;
}
