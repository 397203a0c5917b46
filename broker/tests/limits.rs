//! Every limit of DESIGN.md "Limits" crossed once against a real broker on ephemeral ports: the
//! client that crosses it gets an error answer (or a closed connection), and everyone else keeps
//! being served.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::Connection;
use sluice_protocol::batch::split_batches;
use sluice_protocol::messages::*;
use sluice_protocol::{ApiKey, ErrorCode, RecordBatchBuilder, Request, Response, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in these tests is for a condition, bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start(config: Config) -> (BrokerHandle, Connection) {
    let broker = Broker::start(config).await.expect("broker starts");
    let connection = connect(&broker).await;
    (broker, connection)
}

async fn connect(broker: &BrokerHandle) -> Connection {
    Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect")
}

/// A batch of `count` records whose values are `value_bytes` long.
fn batch(count: usize, value_bytes: usize) -> Bytes {
    let mut builder = RecordBatchBuilder::new();
    let value = vec![b'v'; value_bytes];
    for index in 0..count {
        builder.append(1_700_000_000_000 + index as i64, None, &value, &[]);
    }
    builder.build().into_bytes()
}

async fn create(
    connection: &Connection,
    name: &str,
    partitions: u32,
    configs: Vec<(String, String)>,
) -> CreateTopicResult {
    let response = connection
        .send(CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: name.into(),
                partitions,
                configs,
            }],
            validate_only: false,
        })
        .await
        .expect("create topics");
    let Response::CreateTopics(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.results.remove(0)
}

fn produce_request(topic: &str, records: Bytes, acks: Acks) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition {
                partition: 0,
                records,
            }],
        }],
    }
}

async fn produce(connection: &Connection, topic: &str, records: Bytes) -> ProducePartitionResponse {
    let response = connection
        .send(produce_request(topic, records, Acks::Leader))
        .await
        .expect("produce");
    let Response::Produce(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.topics.remove(0).partitions.remove(0)
}

fn fetch_request(topic: &str, offset: u64, max_wait_ms: u32, max_bytes: u32) -> FetchRequest {
    FetchRequest {
        max_wait_ms,
        min_bytes: 1,
        max_bytes,
        topics: vec![FetchTopic {
            name: topic.into(),
            partitions: vec![FetchPartition {
                partition: 0,
                fetch_offset: offset,
                partition_max_bytes: max_bytes,
            }],
        }],
    }
}

async fn fetch(
    connection: &Connection,
    topic: &str,
    max_wait_ms: u32,
    max_bytes: u32,
) -> FetchPartitionResponse {
    let response = connection
        .send(fetch_request(topic, 0, max_wait_ms, max_bytes))
        .await
        .expect("fetch");
    let Response::Fetch(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.topics.remove(0).partitions.remove(0)
}

/// A batch as large as the limits allow is fetched whole, in a fetch of many partitions too:
/// beside their entries it would not fit in a frame, so the answer carries its partition
/// alone (it was `MessageTooLarge`, to the same fetch every time: the consumer was stuck).
#[tokio::test]
async fn the_largest_batch_is_fetched_even_among_many_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_frame_bytes = 1 << 20;
    config.limits.max_batch_bytes = (1 << 20) - sluice_broker::config::BATCH_FRAMING_BYTES;
    config.log.max_message_bytes = u64::from(config.limits.max_batch_bytes);
    let max_batch = config.limits.max_batch_bytes as usize;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "t", 12, vec![]).await.error_code,
        ErrorCode::None
    );
    // One record, its value sized so the batch is exactly the largest accepted.
    let mut value_bytes = max_batch - 100;
    let largest = loop {
        let built = batch(1, value_bytes);
        match max_batch.cmp(&built.len()) {
            std::cmp::Ordering::Equal => break built,
            std::cmp::Ordering::Greater => value_bytes += max_batch - built.len(),
            std::cmp::Ordering::Less => value_bytes -= built.len() - max_batch,
        }
    };
    assert_eq!(
        produce(&connection, "t", largest.clone()).await.error_code,
        ErrorCode::None
    );
    let mut request = fetch_request("t", 0, 0, 1 << 20);
    request.topics[0].partitions = (0..12)
        .map(|partition| FetchPartition {
            partition,
            fetch_offset: 0,
            partition_max_bytes: 1 << 20,
        })
        .collect();
    let Response::Fetch(answer) = connection.send(request).await.expect("fetch answered") else {
        panic!("wrong response")
    };
    let served: Vec<_> = answer
        .topics
        .iter()
        .flat_map(|topic| &topic.partitions)
        .filter(|partition| !partition.records.is_empty())
        .collect();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].partition, 0);
    assert_eq!(served[0].records, largest);
    broker.shutdown().await;
}

/// The client that did nothing wrong is still served: a produce and a fetch of it.
async fn still_served(connection: &Connection, topic: &str) {
    let produced = produce(connection, topic, batch(1, 10)).await;
    assert_eq!(produced.error_code, ErrorCode::None);
    let fetched = fetch(connection, topic, 0, 1 << 20).await;
    assert_eq!(fetched.error_code, ErrorCode::None);
    assert!(!fetched.records.is_empty());
}

fn frame(correlation_id: u32, request: impl Into<Request>) -> BytesMut {
    let mut out = BytesMut::new();
    request.into().encode_frame(correlation_id, &mut out);
    out
}

/// Reads one response frame from a raw connection.
async fn read_response(stream: &mut TcpStream) -> (ResponseHeader, Bytes) {
    let mut length = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut length))
        .await
        .expect("a response in time")
        .expect("a response");
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut body).await.expect("the whole frame");
    sluice_protocol::decode_response_header(Bytes::from(body)).expect("a response header")
}

/// Reads until the broker closes the connection; returns what came before.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the broker closes the connection")
        .expect("read");
    answer
}

/// The single error response frame `answer` holds.
fn error_answer(answer: &[u8]) -> ResponseHeader {
    let (length, frame) = answer.split_at(4);
    assert_eq!(
        u32::from_be_bytes(length.try_into().unwrap()) as usize,
        frame.len(),
        "one whole frame: {answer:?}"
    );
    let (header, body) =
        sluice_protocol::decode_response_header(Bytes::copy_from_slice(frame)).unwrap();
    assert!(body.is_empty());
    header
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_allocation_and_closes_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_frame_bytes = 64 * 1024;
    config.limits.max_batch_bytes = 32 * 1024;
    config.log.max_message_bytes = 32 * 1024;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    let mut raw = TcpStream::connect(broker.tcp_addr).await.unwrap();
    // One byte over the limit, with a request header after it so the answer carries its id.
    let mut oversized = (64u32 * 1024 + 1).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0, 6, 0, 0, 0, 0, 0, 42, 0, 0]);
    raw.write_all(&oversized).await.unwrap();
    let header = error_answer(&read_until_closed(&mut raw).await);
    assert_eq!(header.correlation_id, 42);
    assert_eq!(header.error_code, ErrorCode::MessageTooLarge);
    still_served(&connection, "t").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn an_oversized_batch_and_a_batch_over_the_topic_max_message_bytes_are_message_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_frame_bytes = 256 * 1024;
    config.limits.max_batch_bytes = 64 * 1024;
    config.log.max_message_bytes = 64 * 1024;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "wide", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    assert_eq!(
        create(
            &connection,
            "narrow",
            1,
            vec![("max_message_bytes".into(), "8192".into())]
        )
        .await
        .error_code,
        ErrorCode::None
    );

    // Over limits.max_batch_bytes, though it fits in a frame.
    let over_batch = produce(&connection, "wide", batch(1, 100 * 1024)).await;
    assert_eq!(over_batch.error_code, ErrorCode::MessageTooLarge);
    assert!(
        over_batch
            .error_message
            .as_deref()
            .unwrap_or_default()
            .contains("max_batch_bytes")
    );

    // Within max_batch_bytes but over the topic's own max_message_bytes: storage refuses it.
    let medium = batch(1, 20 * 1024);
    let over_topic = produce(&connection, "narrow", medium.clone()).await;
    assert_eq!(over_topic.error_code, ErrorCode::MessageTooLarge);
    assert!(
        over_topic
            .error_message
            .as_deref()
            .unwrap_or_default()
            .contains("max_message_bytes")
    );
    // The same batch is fine for the topic with the broker default, and a small one for both.
    assert_eq!(
        produce(&connection, "wide", medium).await.error_code,
        ErrorCode::None
    );
    assert_eq!(
        produce(&connection, "narrow", batch(1, 1024))
            .await
            .error_code,
        ErrorCode::None
    );
    // Nothing of the refused batches was written.
    let narrow = fetch(&connection, "narrow", 0, 1 << 20).await;
    assert_eq!(split_batches(&narrow.records).count(), 1);
    assert_eq!(narrow.high_watermark, 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_connection_over_max_connections_gets_limit_exceeded_and_the_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_connections = 2;
    let (broker, first) = start(config).await;
    assert_eq!(
        create(&first, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    let second = connect(&broker).await;
    // An answer proves the broker accepted (and counted) the second connection.
    second.send(ApiVersionsRequest {}).await.unwrap();

    let mut third = TcpStream::connect(broker.tcp_addr).await.unwrap();
    let header = error_answer(&read_until_closed(&mut third).await);
    assert_eq!(header.error_code, ErrorCode::LimitExceeded);

    still_served(&first, "t").await;
    still_served(&second, "t").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn max_topics_and_max_partitions_per_topic_refuse_creation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_topics = 2;
    config.limits.max_partitions_per_topic = 4;
    let (broker, connection) = start(config).await;
    let internal_topics = broker.state().topics.len();
    // Internal topics (consumer offsets) count too: fill what is left.
    for index in internal_topics..2 {
        let result = create(&connection, &format!("topic-{index}"), 4, vec![]).await;
        assert_eq!(result.error_code, ErrorCode::None, "{result:?}");
    }
    let over = create(&connection, "one-too-many", 1, vec![]).await;
    assert_eq!(over.error_code, ErrorCode::LimitExceeded);
    assert!(
        over.error_message
            .as_deref()
            .unwrap_or_default()
            .contains("max_topics")
    );
    assert_eq!(broker.state().topics.len(), 2);
    broker.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_partitions_per_topic = 4;
    let (broker, connection) = start(config).await;
    let over = create(&connection, "five", 5, vec![]).await;
    assert_eq!(over.error_code, ErrorCode::InvalidPartitions);
    assert!(
        over.error_message
            .as_deref()
            .unwrap_or_default()
            .contains("max_partitions_per_topic")
    );
    assert_eq!(
        create(&connection, "four", 4, vec![]).await.error_code,
        ErrorCode::None
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_frame_stalled_half_way_is_cut_off_after_frame_read_timeout_ms() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.frame_read_timeout_ms = 200;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    let mut slow = TcpStream::connect(broker.tcp_addr).await.unwrap();
    // A 100-byte frame of which only the header arrives; then nothing.
    slow.write_all(&[0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0])
        .await
        .unwrap();
    let header = error_answer(&read_until_closed(&mut slow).await);
    assert_eq!(header.correlation_id, 7);
    assert_eq!(header.error_code, ErrorCode::RequestTimedOut);
    still_served(&connection, "t").await;
    broker.shutdown().await;
}

#[tokio::test]
async fn requests_beyond_max_in_flight_wait_for_a_slot_and_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_in_flight_requests = 2;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "empty", 1, vec![]).await.error_code,
        ErrorCode::None
    );

    // Two long polls on an empty topic take both slots; the third request is not even read
    // until one of them answers, so its answer comes after a fetch's, however quick it is.
    let mut raw = TcpStream::connect(broker.tcp_addr).await.unwrap();
    let mut requests = frame(1, fetch_request("empty", 0, 300, 1024));
    requests.extend_from_slice(&frame(2, fetch_request("empty", 0, 300, 1024)));
    requests.extend_from_slice(&frame(3, ApiVersionsRequest {}));
    raw.write_all(&requests).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let (header, _) = read_response(&mut raw).await;
        assert_eq!(header.error_code, ErrorCode::None);
        order.push(header.correlation_id);
    }
    assert!(
        order[0] == 1 || order[0] == 2,
        "a fetch answers before the request waiting for its slot: {order:?}"
    );
    assert_eq!(BTreeSet::from_iter(order), BTreeSet::from([1, 2, 3]));

    // Thousands pipelined at once: the broker reads them two at a time, and answers every one.
    const PIPELINED: u32 = 3000;
    let (mut reader, mut writer) = raw.into_split();
    let send = tokio::spawn(async move {
        let mut requests = BytesMut::new();
        for correlation_id in 0..PIPELINED {
            requests.extend_from_slice(&frame(100 + correlation_id, ApiVersionsRequest {}));
        }
        writer.write_all(&requests).await.unwrap();
        writer
    });
    let mut seen = BTreeSet::new();
    let mut buffer = BytesMut::new();
    let mut decoder = sluice_protocol::FrameDecoder::for_responses(1 << 20);
    while seen.len() < PIPELINED as usize {
        while let Some(frame) = decoder.decode(&mut buffer).unwrap() {
            let (header, body) = sluice_protocol::decode_response_header(frame.freeze()).unwrap();
            assert_eq!(header.error_code, ErrorCode::None);
            Response::decode(ApiKey::ApiVersions, body).expect("an ApiVersions answer");
            assert!(seen.insert(header.correlation_id), "answered twice");
        }
        if seen.len() == PIPELINED as usize {
            break;
        }
        let read = tokio::time::timeout(DEADLINE, reader.read_buf(&mut buffer))
            .await
            .expect("answers keep coming")
            .unwrap();
        assert!(read > 0, "the broker closed the connection");
    }
    assert_eq!(seen, (100..100 + PIPELINED).collect::<BTreeSet<_>>());
    send.await.unwrap();
    broker.shutdown().await;
}

/// Config for the fetch budget tests: 128 KiB batches, a 256 KiB budget.
fn budget_config(data_dir: &Path) -> Config {
    let mut config = Config::on_loopback(data_dir);
    config.limits.max_frame_bytes = 256 * 1024;
    config.limits.max_batch_bytes = 128 * 1024;
    config.log.max_message_bytes = 128 * 1024;
    config.limits.fetch_response_budget_bytes = 256 * 1024;
    config
}

/// 16 batches of about 100 KiB: 1.6 MB, six times the budget.
async fn fill(connection: &Connection, topic: &str) {
    assert_eq!(
        create(connection, topic, 1, vec![]).await.error_code,
        ErrorCode::None
    );
    for _ in 0..16 {
        let produced = produce(connection, topic, batch(10, 10 * 1024)).await;
        assert_eq!(produced.error_code, ErrorCode::None);
    }
}

async fn wait_for_budget_to_return(broker: &BrokerHandle) {
    let budget = &broker.state().fetch_budget;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while budget.available_bytes() != budget.total_bytes() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fetch budget not returned: {} of {} bytes free",
            budget.available_bytes(),
            budget.total_bytes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn concurrent_fetches_larger_than_the_fetch_budget_all_complete_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(budget_config(dir.path())).await;
    fill(&connection, "big").await;
    let budget_bytes = broker.state().fetch_budget.total_bytes();

    // Each asks for 1 MiB, four times the whole budget, and they all run at once.
    let mut fetches = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let consumer = connect(&broker).await;
        fetches.spawn(async move { fetch(&consumer, "big", 10_000, 1 << 20).await });
    }
    while let Some(fetched) = fetches.join_next().await {
        let fetched = fetched.unwrap();
        assert_eq!(fetched.error_code, ErrorCode::None);
        let batches = split_batches(&fetched.records).count();
        assert!(batches >= 1, "every fetch gets data");
        assert!(
            fetched.records.len() <= budget_bytes,
            "a response stays within the budget: {} bytes",
            fetched.records.len()
        );
    }
    wait_for_budget_to_return(&broker).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn an_unread_response_holds_its_budget_and_other_fetches_are_throttled_until_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = budget_config(dir.path());
    config.limits.fetch_max_wait_ms = 0;
    let (broker, connection) = start(config).await;
    fill(&connection, "big").await;

    // A consumer pipelines many fetches and reads none of the answers: once the socket buffers
    // are full, the response being written holds the budget.
    let mut greedy = TcpStream::connect(broker.tcp_addr).await.unwrap();
    const GREEDY_FETCHES: u32 = 200;
    let mut requests = BytesMut::new();
    for correlation_id in 0..GREEDY_FETCHES {
        requests.extend_from_slice(&frame(correlation_id, fetch_request("big", 0, 0, 1 << 20)));
    }
    greedy.write_all(&requests).await.unwrap();

    // Everyone else is then turned away with Throttled, not made to wait without end.
    let other = connect(&broker).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let fetched = fetch(&other, "big", 0, 1 << 20).await;
        if fetched.error_code == ErrorCode::Throttled {
            assert!(fetched.records.is_empty());
            assert_eq!(fetched.high_watermark, 160);
            break;
        }
        assert_eq!(fetched.error_code, ErrorCode::None);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unread responses never held the budget"
        );
    }

    // Reading the answers releases the budget, and fetching works again. The greedy consumer's
    // own later fetches were throttled too, while its first answers sat unread.
    let mut with_records = 0;
    for _ in 0..GREEDY_FETCHES {
        let (header, body) = read_response(&mut greedy).await;
        assert_eq!(header.error_code, ErrorCode::None);
        let Response::Fetch(response) = Response::decode(ApiKey::Fetch, body).unwrap() else {
            panic!("not a fetch response")
        };
        let partition = &response.topics[0].partitions[0];
        match partition.error_code {
            ErrorCode::None => {
                assert!(!partition.records.is_empty());
                with_records += 1;
            }
            ErrorCode::Throttled => assert!(partition.records.is_empty()),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(with_records > 0);
    wait_for_budget_to_return(&broker).await;
    let fetched = fetch(&other, "big", 0, 1 << 20).await;
    assert_eq!(fetched.error_code, ErrorCode::None);
    assert!(!fetched.records.is_empty());
    broker.shutdown().await;
}

#[tokio::test]
async fn fetch_max_wait_ms_caps_a_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.fetch_max_wait_ms = 100;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "empty", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    // Asks to wait an hour; the broker answers, empty, after its own cap. (The test's own
    // deadline is far below an hour, so an uncapped wait fails it.)
    let fetched = tokio::time::timeout(DEADLINE, fetch(&connection, "empty", 3_600_000, 1024))
        .await
        .expect("the long poll is capped");
    assert_eq!(fetched.error_code, ErrorCode::None);
    assert!(fetched.records.is_empty());
    broker.shutdown().await;
}

#[tokio::test]
async fn garbage_on_the_tcp_port_closes_that_connection_and_harms_no_other_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.frame_read_timeout_ms = 200;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );

    // Random bytes (a fixed seed, so the run is repeatable).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut noisy = TcpStream::connect(broker.tcp_addr).await.unwrap();
    noisy.write_all(&random).await.unwrap();
    read_until_closed(&mut noisy).await;
    still_served(&connection, "t").await;

    // A length too short to hold a request header: answered InvalidRequest, then closed.
    let mut short = TcpStream::connect(broker.tcp_addr).await.unwrap();
    short.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
    let header = error_answer(&read_until_closed(&mut short).await);
    assert_eq!(header.error_code, ErrorCode::InvalidRequest);
    still_served(&connection, "t").await;

    // A truncated frame, then silence: cut off at the frame deadline.
    let mut truncated = TcpStream::connect(broker.tcp_addr).await.unwrap();
    let whole = frame(9, produce_request("t", batch(1, 100), Acks::Leader));
    truncated
        .write_all(&whole[..whole.len() / 2])
        .await
        .unwrap();
    let header = error_answer(&read_until_closed(&mut truncated).await);
    assert_eq!(header.error_code, ErrorCode::RequestTimedOut);
    assert_eq!(header.correlation_id, 9);

    // A whole frame whose body is nonsense is answered, and the connection stays usable.
    let mut nonsense = TcpStream::connect(broker.tcp_addr).await.unwrap();
    nonsense
        .write_all(&[
            0, 0, 0, 14, 0, 6, 0, 0, 0, 0, 0, 5, 0, 0, 0xde, 0xad, 0xbe, 0xef,
        ])
        .await
        .unwrap();
    let (header, _) = read_response(&mut nonsense).await;
    assert_eq!(header.correlation_id, 5);
    assert_eq!(header.error_code, ErrorCode::InvalidRequest);
    nonsense
        .write_all(&frame(6, ApiVersionsRequest {}))
        .await
        .unwrap();
    let (header, _) = read_response(&mut nonsense).await;
    assert_eq!(
        (header.correlation_id, header.error_code),
        (6, ErrorCode::None)
    );

    still_served(&connection, "t").await;
    broker.shutdown().await;
}

/// A fetch asking for more than a frame holds is answered within `limits.max_frame_bytes`,
/// records, headers and all: a client that holds the broker's limit never gets a frame it
/// must refuse (and close its connection over).
#[tokio::test]
async fn a_fetch_answer_fits_in_a_frame_whatever_max_bytes_asks() {
    const FRAME: u32 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_frame_bytes = FRAME;
    config.limits.max_batch_bytes = FRAME / 2;
    config.log.max_message_bytes = u64::from(FRAME / 2);
    let broker = Broker::start(config).await.expect("broker starts");
    let connection = Connection::connect_with(
        &format!("tcp://{}", broker.tcp_addr),
        sluice_client::ConnectionOptions::default().max_frame_bytes(FRAME),
    )
    .await
    .expect("connect");
    assert_eq!(
        create(&connection, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    // Batches of exactly half a frame: two of them are a whole frame of records, with no
    // room left for the answer's headers.
    let half = batch(33, 982);
    assert_eq!(half.len(), FRAME as usize / 2);
    for _ in 0..4 {
        assert_eq!(
            produce(&connection, "t", half.clone()).await.error_code,
            ErrorCode::None
        );
    }
    let fetched = fetch(&connection, "t", 0, u32::MAX).await;
    assert_eq!(fetched.error_code, ErrorCode::None);
    assert_eq!(fetched.records.len(), FRAME as usize / 2, "one whole batch");
    still_served(&connection, "t").await;
    broker.shutdown().await;
}

/// A consumer that asks for answers and never reads them holds fetch budget only until
/// `response_write_timeout_ms`: its connection is then closed, and the others' fetches, which
/// found the budget taken (`Throttled`), are served again.
#[tokio::test]
async fn a_connection_that_does_not_read_its_answers_is_closed_and_gives_the_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.fetch_response_budget_bytes = u64::from(config.limits.max_frame_bytes);
    // Well over the second a fetch waits for budget before it is answered Throttled (many
    // times over, for a loaded machine), so the others' fetches are turned away while the
    // stalled connection holds the budget.
    config.limits.response_write_timeout_ms = 20_000;
    config.limits.fetch_max_wait_ms = 100;
    let (broker, connection) = start(config).await;
    assert_eq!(
        create(&connection, "t", 1, vec![]).await.error_code,
        ErrorCode::None
    );
    // 24 batches of about 1 MB.
    for _ in 0..24 {
        assert_eq!(
            produce(&connection, "t", batch(1_000, 1_000))
                .await
                .error_code,
            ErrorCode::None
        );
    }
    // A raw client with a small receive buffer asks for all of it and reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut stalled = socket.connect(broker.tcp_addr).await.unwrap();
    for index in 0..24u32 {
        let mut request = fetch_request("t", u64::from(index) * 1_000, 0, 1 << 20);
        request.topics[0].partitions[0].partition_max_bytes = 1 << 20;
        stalled
            .write_all(&frame(index, request))
            .await
            .expect("the requests go out");
    }
    // Once the broker has read the stalled requests, the answers it cannot write hold the
    // budget: the others' fetches are turned away with Throttled.
    let budget = &broker.state().fetch_budget;
    let deadline = std::time::Instant::now() + DEADLINE;
    while budget.available_bytes() >= 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unread answers never held the fetch budget"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fetched = fetch(&connection, "t", 0, 1 << 20).await;
    assert_eq!(fetched.error_code, ErrorCode::Throttled);
    assert!(fetched.records.is_empty());
    // Within the write timeout and a bit, their fetches are served again.
    let deadline = std::time::Instant::now() + DEADLINE + Duration::from_secs(20);
    loop {
        let fetched = fetch(&connection, "t", 0, 1 << 20).await;
        if fetched.error_code == ErrorCode::None && !fetched.records.is_empty() {
            break;
        }
        assert_eq!(fetched.error_code, ErrorCode::Throttled);
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled connection kept the fetch budget"
        );
    }
    // And the stalled connection was closed: reading it finds the end (after what the
    // socket buffers held), and every byte of the budget came back.
    read_until_closed(&mut stalled).await;
    wait_for_budget_to_return(&broker).await;
    broker.shutdown().await;
}
