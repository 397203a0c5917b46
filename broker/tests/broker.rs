//! A real broker on ephemeral ports, driven through the client connection over both
//! transports: every test body that goes through [`Connection`] runs once over TCP and once over
//! QUIC (as `<test>::tcp` and `<test>::quic`, see [`over_both_transports!`]). QUIC is real QUIC
//! with TLS: the client trusts the certificate the broker wrote to its data directory.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::{Connection, ConnectionOptions};
use sluice_protocol::batch::split_batches;
use sluice_protocol::messages::*;
use sluice_protocol::{ErrorCode, RecordBatchBuilder, Response};

/// The transports a client reaches the broker by.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    /// The broker's URL over this transport.
    fn url(self, broker: &BrokerHandle) -> String {
        match self {
            Transport::Tcp => format!("tcp://{}", broker.tcp_addr),
            Transport::Quic => format!("quic://{}", broker.quic_addr.expect("QUIC is served")),
        }
    }

    /// Over QUIC, the client trusts the self-signed certificate in the broker's data directory,
    /// as a user passes `--ca-file <data-dir>/tls/cert.pem`.
    fn options(self, data_dir: &Path) -> ConnectionOptions {
        let options = ConnectionOptions::default();
        match self {
            Transport::Tcp => options,
            Transport::Quic => {
                options.ca_file(sluice_broker::tls::self_signed_certificate_path(data_dir))
            }
        }
    }
}

/// Runs each named `async fn(Transport)` test body once per transport, as the tests
/// `<name>::tcp` and `<name>::quic`.
macro_rules! over_both_transports {
    ($($body:ident),+ $(,)?) => {
        $(
            mod $body {
                #[tokio::test]
                async fn tcp() {
                    super::$body(super::Transport::Tcp).await;
                }

                #[tokio::test]
                async fn quic() {
                    super::$body(super::Transport::Quic).await;
                }
            }
        )+
    };
}

async fn connect(broker: &BrokerHandle, data_dir: &Path, transport: Transport) -> Connection {
    Connection::connect_with(&transport.url(broker), transport.options(data_dir))
        .await
        .unwrap_or_else(|error| panic!("connect over {transport:?}: {error}"))
}

async fn start(data_dir: &Path, transport: Transport) -> (BrokerHandle, Connection) {
    let broker = Broker::start(Config::on_loopback(data_dir))
        .await
        .expect("broker starts");
    let connection = connect(&broker, data_dir, transport).await;
    (broker, connection)
}

fn batch(values: &[&str]) -> bytes::Bytes {
    let mut builder = RecordBatchBuilder::new();
    for (index, value) in values.iter().enumerate() {
        builder.append(
            1_700_000_000_000 + index as i64,
            Some(b"key"),
            value.as_bytes(),
            &[("h", b"v")],
        );
    }
    builder.build().into_bytes()
}

async fn create(connection: &Connection, name: &str, partitions: u32) -> CreateTopicResult {
    let response = connection
        .send(CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: name.into(),
                partitions,
                configs: vec![],
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

fn produce_request(topic: &str, partition: u32, values: &[&str], acks: Acks) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition {
                partition,
                records: batch(values),
            }],
        }],
    }
}

async fn produce(
    connection: &Connection,
    topic: &str,
    partition: u32,
    values: &[&str],
    acks: Acks,
) -> ProducePartitionResponse {
    let response = connection
        .send(produce_request(topic, partition, values, acks))
        .await
        .expect("produce");
    let Response::Produce(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.topics.remove(0).partitions.remove(0)
}

fn fetch_request(topic: &str, partition: u32, offset: u64, max_wait_ms: u32) -> FetchRequest {
    FetchRequest {
        max_wait_ms,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            name: topic.into(),
            partitions: vec![FetchPartition {
                partition,
                fetch_offset: offset,
                partition_max_bytes: 1 << 20,
            }],
        }],
    }
}

async fn fetch(
    connection: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    max_wait_ms: u32,
) -> FetchPartitionResponse {
    let response = connection
        .send(fetch_request(topic, partition, offset, max_wait_ms))
        .await
        .expect("fetch");
    let Response::Fetch(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.topics.remove(0).partitions.remove(0)
}

/// The log of a partition of the broker's topic.
fn partition_log(
    broker: &BrokerHandle,
    topic: &str,
    partition: u32,
) -> std::sync::Arc<sluice_broker::storage::PartitionLog> {
    let topic = broker.state().topics.get(topic).expect("the topic exists");
    std::sync::Arc::clone(topic.partition(partition).expect("the partition exists"))
}

/// Values of every record in a fetch response, with offsets.
fn values(records: &[u8]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for batch in split_batches(records) {
        let batch = batch.expect("whole batch");
        batch.validate().expect("valid batch");
        for record in batch.records() {
            let record = record.unwrap();
            out.push((
                record.offset(batch.base_offset()),
                String::from_utf8(record.value.to_vec()).unwrap(),
            ));
        }
    }
    out
}

over_both_transports!(
    api_versions_metadata_and_topic_admin,
    produce_with_every_acks_and_per_partition_results,
    fetch_long_poll_answers_as_soon_as_a_produce_lands,
    many_concurrent_requests_on_one_connection,
    list_offsets_earliest_latest_and_by_timestamp,
    restart_keeps_topics_and_records,
    hundred_topics_of_eight_partitions,
    fetches_read_ahead_answer_as_plain_reads_and_follow_seeks,
    a_read_ahead_of_a_deleted_topic_is_not_served_for_the_topic_created_again,
    large_fetches_arrive_whole_and_in_order_among_other_answers,
    names_too_long_for_an_error_message_still_get_their_answers,
);

/// A name of 40,000 bytes fits a request's `string` field, but not an error message's
/// `nullable string` (32,767 bytes) once the broker names it there: each request is still
/// answered, with its error, and the connection goes on serving.
async fn names_too_long_for_an_error_message_still_get_their_answers(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    let long = "a".repeat(40_000);
    let answer = |request: sluice_protocol::Request| {
        let connection = &connection;
        async move {
            tokio::time::timeout(Duration::from_secs(20), connection.send(request))
                .await
                .expect("an answer, not silence")
                .expect("an answer, not a closed connection")
        }
    };

    let Response::Produce(produced) =
        answer(produce_request(&long, 0, &["x"], Acks::Leader).into()).await
    else {
        panic!("wrong response")
    };
    let partition = &produced.topics[0].partitions[0];
    assert_eq!(partition.error_code, ErrorCode::UnknownTopic);
    assert!(
        partition
            .error_message
            .as_ref()
            .is_some_and(|m| m.len() <= 32_767)
    );

    let Response::CreateTopics(created) = answer(
        CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: long.clone(),
                partitions: 1,
                configs: vec![],
            }],
            validate_only: false,
        }
        .into(),
    )
    .await
    else {
        panic!("wrong response")
    };
    assert_eq!(created.results[0].error_code, ErrorCode::InvalidTopicName);

    let Response::ConsumerGroupHeartbeat(heartbeat) = answer(
        ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            member_id: long.clone(),
            member_epoch: 3,
            session_timeout_ms: 10_000,
            assignor: None,
            topics: None,
            owned: None,
        }
        .into(),
    )
    .await
    else {
        panic!("wrong response")
    };
    assert_eq!(heartbeat.error_code, ErrorCode::UnknownMember);

    assert_eq!(
        create(&connection, "after", 1).await.error_code,
        ErrorCode::None
    );
    connection.close().await;
    broker.shutdown().await;
}

async fn api_versions_metadata_and_topic_admin(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    let Response::ApiVersions(versions) = connection.send(ApiVersionsRequest {}).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(versions.error_code, ErrorCode::None);
    assert!(
        versions
            .apis
            .iter()
            .any(|api| api.api_key == sluice_protocol::ApiKey::Fetch.code())
    );

    assert_eq!(
        create(&connection, "orders", 3).await.error_code,
        ErrorCode::None
    );
    assert_eq!(
        create(&connection, "orders", 3).await.error_code,
        ErrorCode::TopicAlreadyExists
    );
    assert_eq!(
        create(&connection, "bad name", 1).await.error_code,
        ErrorCode::InvalidTopicName
    );
    assert_eq!(
        create(&connection, "__internal", 1).await.error_code,
        ErrorCode::InvalidTopicName
    );
    assert_eq!(
        create(&connection, "zero", 0).await.error_code,
        ErrorCode::InvalidPartitions
    );

    let Response::Metadata(metadata) = connection
        .send(MetadataRequest { topics: None })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(metadata.brokers[0].port, broker.tcp_addr.port());
    assert_eq!(metadata.topics.len(), 1);
    assert_eq!(metadata.topics[0].partitions.len(), 3);
    let Response::Metadata(metadata) = connection
        .send(MetadataRequest {
            topics: Some(vec!["nope".into()]),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(metadata.topics[0].error_code, ErrorCode::UnknownTopic);
    // A name asked for again and again is answered once (the answer does not grow with the
    // repeats: 100,000 of them would be over 3.6 MB of partitions).
    let mut names: Vec<String> = vec!["orders".into(); 100_000];
    names.insert(1, "nope".into());
    let Response::Metadata(metadata) = connection
        .send(MetadataRequest {
            topics: Some(names),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let answered: Vec<_> = metadata
        .topics
        .iter()
        .map(|topic| {
            (
                topic.name.as_str(),
                topic.error_code,
                topic.partitions.len(),
            )
        })
        .collect();
    assert_eq!(
        answered,
        [
            ("orders", ErrorCode::None, 3),
            ("nope", ErrorCode::UnknownTopic, 0)
        ]
    );

    let Response::ListTopics(list) = connection.send(ListTopicsRequest {}).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        list.topics,
        [TopicListing {
            name: "orders".into(),
            partitions: 3,
            internal: false
        }]
    );

    produce(&connection, "orders", 1, &["a", "b"], Acks::Durable).await;
    let Response::DescribeTopic(described) = connection
        .send(DescribeTopicRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(described.error_code, ErrorCode::None);
    assert_eq!(described.partitions[1].high_watermark, 2);
    assert!(described.partitions[1].size_bytes > 0);
    assert!(
        described
            .configs
            .iter()
            .any(|(key, _)| key == "retention_ms")
    );

    let Response::DeleteTopics(deleted) = connection
        .send(DeleteTopicsRequest {
            names: vec!["orders".into(), "ghost".into()],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(deleted.results[0].error_code, ErrorCode::None);
    assert_eq!(deleted.results[1].error_code, ErrorCode::UnknownTopic);
    assert!(!dir.path().join("topics/orders").exists());
    let Response::DescribeTopic(described) = connection
        .send(DescribeTopicRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(described.error_code, ErrorCode::UnknownTopic);
    broker.shutdown().await;
}

async fn produce_with_every_acks_and_per_partition_results(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 2).await;
    let durable = produce(&connection, "t", 0, &["one", "two"], Acks::Durable).await;
    assert_eq!(
        (durable.error_code, durable.base_offset),
        (ErrorCode::None, 0)
    );
    let leader = produce(&connection, "t", 0, &["three"], Acks::Leader).await;
    assert_eq!(
        (leader.error_code, leader.base_offset),
        (ErrorCode::None, 2)
    );
    connection
        .send_without_response(produce_request("t", 0, &["four"], Acks::None))
        .await
        .unwrap();
    // acks=none has no answer; the record shows up in a fetch.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = values(&fetch(&connection, "t", 0, 0, 100).await.records);
        if got.len() == 4 {
            assert_eq!(got[3], (3, "four".to_owned()));
            break;
        }
        assert!(Instant::now() < deadline, "acks=none record never arrived");
    }

    // One request, several partitions, each with its own result.
    let mut corrupt = batch(&["x"]).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let response = connection
        .send(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![
                ProduceTopic {
                    name: "t".into(),
                    partitions: vec![
                        ProducePartition {
                            partition: 1,
                            records: batch(&["ok"]),
                        },
                        ProducePartition {
                            partition: 7,
                            records: batch(&["no partition"]),
                        },
                        ProducePartition {
                            partition: 0,
                            records: corrupt.into(),
                        },
                    ],
                },
                ProduceTopic {
                    name: "missing".into(),
                    partitions: vec![ProducePartition {
                        partition: 0,
                        records: batch(&["no topic"]),
                    }],
                },
            ],
        })
        .await
        .unwrap();
    let Response::Produce(response) = response else {
        panic!()
    };
    let codes: Vec<ErrorCode> = response
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
        .collect();
    assert_eq!(
        codes,
        [
            ErrorCode::None,
            ErrorCode::UnknownPartition,
            ErrorCode::CorruptMessage,
            ErrorCode::UnknownTopic
        ]
    );
    // Nothing of the corrupt batch was written.
    assert_eq!(
        values(&fetch(&connection, "t", 0, 0, 0).await.records).len(),
        4
    );
    broker.shutdown().await;
}

async fn fetch_long_poll_answers_as_soon_as_a_produce_lands(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 1).await;
    let waiting = {
        let connection = connection.clone();
        tokio::spawn(async move { fetch(&connection, "t", 0, 0, 60_000).await })
    };
    // The same connection keeps serving while the fetch waits (responses overtake it).
    for _ in 0..5 {
        connection.send(ApiVersionsRequest {}).await.unwrap();
    }
    assert!(
        !waiting.is_finished(),
        "the fetch answered before any data existed"
    );
    produce(&connection, "t", 0, &["wake"], Acks::Leader).await;
    // Woken by the produce, not by its wait running out (at fetch_max_wait_ms, 30 s).
    let fetched = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("fetch woke")
        .unwrap();
    assert_eq!(values(&fetched.records), [(0, "wake".to_owned())]);

    // With nothing to read, max_wait_ms bounds the wait and the answer is empty.
    let empty = fetch(&connection, "t", 0, 1, 50).await;
    assert_eq!(empty.error_code, ErrorCode::None);
    assert!(empty.records.is_empty());
    assert_eq!(empty.high_watermark, 1);
    // Outside the log: a clear error.
    assert_eq!(
        fetch(&connection, "t", 0, 5, 0).await.error_code,
        ErrorCode::OffsetOutOfRange
    );
    broker.shutdown().await;
}

/// A producer cannot store a batch claiming its timestamps were set by the broker.
#[tokio::test]
async fn a_batch_claiming_log_append_time_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 1).await;
    let mut claimed = batch(&["x"]).to_vec();
    claimed[22] |= sluice_protocol::batch::ATTRIBUTE_LOG_APPEND_TIME as u8;
    let crc = sluice_protocol::checksum::crc32c(&claimed[21..]);
    claimed[17..21].copy_from_slice(&crc.to_be_bytes());
    let response = connection
        .send(ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: claimed.into(),
                }],
            }],
        })
        .await
        .unwrap();
    let Response::Produce(response) = response else {
        panic!("wrong response")
    };
    assert_eq!(
        response.topics[0].partitions[0].error_code,
        ErrorCode::InvalidRequest
    );
    assert!(fetch(&connection, "t", 0, 0, 0).await.records.is_empty());
    connection.close().await;
    broker.shutdown().await;
}

/// Empty partitions cost a produce request 8 bytes each: the answer to thousands of them, of
/// a topic with a 60,000-byte name that does not exist or of one that does, must not carry a
/// message per partition (let alone the name in each: gigabytes from one 8 MiB request).
#[tokio::test]
async fn errors_for_many_empty_partitions_are_not_amplified() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 2).await;
    for (name, partitions, code) in [
        ("n".repeat(60_000), 1_000u32, ErrorCode::UnknownTopic),
        ("t".to_owned(), 2_000, ErrorCode::InvalidRequest),
        ("t".to_owned(), 1_000, ErrorCode::UnknownPartition),
    ] {
        let response = connection
            .send(ProduceRequest {
                acks: Acks::Leader,
                timeout_ms: 10_000,
                topics: vec![ProduceTopic {
                    name,
                    partitions: (2..2 + partitions)
                        .map(|partition| ProducePartition {
                            partition,
                            records: bytes::Bytes::new(),
                        })
                        .collect(),
                }],
            })
            .await
            .unwrap();
        let Response::Produce(response) = response else {
            panic!("wrong response")
        };
        let results = &response.topics[0].partitions;
        assert_eq!(results.len(), partitions as usize);
        assert!(
            results.iter().all(|result| result.error_code == code),
            "{code:?}"
        );
        let message_bytes: usize = results
            .iter()
            .filter_map(|result| result.error_message.as_ref())
            .map(String::len)
            .sum();
        assert!(
            message_bytes <= 64 * partitions as usize,
            "{code:?}: {message_bytes} bytes of messages for {partitions} partitions"
        );
    }
    connection.close().await;
    broker.shutdown().await;
}

/// A fetch naming hundreds of thousands of topics, and one topic with a hundred thousand
/// partitions, is answered at once: counting each topic's partitions for the answer's size
/// scanned every partition once per topic (about 5·10^10 steps: a worker busy for minutes
/// on one request, and the broker with it).
#[tokio::test]
async fn a_fetch_of_many_topics_and_partitions_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 1).await;
    let mut topics: Vec<FetchTopic> = (0..400_000)
        .map(|_| FetchTopic {
            name: String::new(),
            partitions: Vec::new(),
        })
        .collect();
    topics.push(FetchTopic {
        name: "t".into(),
        partitions: (0..120_000)
            .map(|partition| FetchPartition {
                partition,
                fetch_offset: 0,
                partition_max_bytes: 1024,
            })
            .collect(),
    });
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        connection.send(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 1,
            max_bytes: 1 << 20,
            topics,
        }),
    )
    .await
    .expect("answered within 20 s")
    .unwrap();
    let Response::Fetch(answer) = answer else {
        panic!("wrong response: {answer:?}")
    };
    assert_eq!(answer.topics.len(), 400_001);
    let t = answer.topics.last().unwrap();
    assert_eq!(t.partitions.len(), 120_000);
    assert_eq!(t.partitions[0].error_code, ErrorCode::None);
    assert!(
        t.partitions[1..]
            .iter()
            .all(|partition| partition.error_code == ErrorCode::UnknownPartition)
    );
    connection.close().await;
    broker.shutdown().await;
}

/// A big request is read whole however it arrives, and a small one after it is answered at
/// once: the reader waits for the rest of a big frame (its socket's receive low-water mark),
/// then for any byte again. A mark left high would hold the small request back until the
/// deadline.
#[tokio::test]
async fn a_big_request_arriving_in_pieces_then_small_requests_are_all_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 4).await;
    let value = "v".repeat(900);
    let thousand = vec![value.as_str(); 1000];
    // Four partitions' batches of about 0.9 MB each: a frame of about 3.6 MB.
    let mut big = produce_request("t", 0, &thousand, Acks::Leader);
    for partition in 1..4 {
        big.topics[0].partitions.push(ProducePartition {
            partition,
            records: batch(&thousand),
        });
    }
    let mut raw = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Reads until one whole answer is in, and returns its code.
    async fn answer(
        raw: &mut tokio::net::TcpStream,
        deadline: Instant,
        correlation_id: u32,
    ) -> ErrorCode {
        let mut received = Vec::new();
        loop {
            if received.len() >= 4 {
                let length = u32::from_be_bytes(received[..4].try_into().unwrap()) as usize;
                if received.len() >= 4 + length {
                    let answers = support::parse_responses(&received);
                    assert_eq!(answers.len(), 1, "{answers:?}");
                    assert_eq!(answers[0].0, correlation_id);
                    return answers[0].1;
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline.into(), raw.read(&mut chunk))
                .await
                .expect("the answer within 30 s")
                .unwrap();
            assert!(read > 0, "the broker closed the connection");
            received.extend_from_slice(&chunk[..read]);
        }
    }
    let mut correlation_id = 0;
    for _ in 0..3 {
        correlation_id += 1;
        let frame = support::frame(correlation_id, big.clone());
        // The length prefix and a little, then the rest in pieces of every size.
        let mut at = 0;
        for piece in [10, 100_000, 1, 300_000, 64 * 1024].into_iter().cycle() {
            let end = (at + piece).min(frame.len());
            raw.write_all(&frame[at..end]).await.unwrap();
            at = end;
            if at == frame.len() {
                break;
            }
        }
        assert_eq!(
            answer(&mut raw, deadline, correlation_id).await,
            ErrorCode::None
        );
        for _ in 0..2 {
            correlation_id += 1;
            let small = produce_request("t", 0, &["small"], Acks::Leader);
            raw.write_all(&support::frame(correlation_id, small))
                .await
                .unwrap();
            assert_eq!(
                answer(&mut raw, deadline, correlation_id).await,
                ErrorCode::None
            );
        }
    }
    // Every record landed: 3 x 1,000 plus 6 small ones on partition 0, 3 x 1,000 on the others.
    for (partition, expected) in [(0, 3_006), (1, 3_000), (2, 3_000), (3, 3_000)] {
        let mut landed = 0;
        while landed < expected {
            let fetched = fetch(&connection, "t", partition, landed, 0).await;
            assert_eq!(fetched.error_code, ErrorCode::None);
            let read = values(&fetched.records);
            assert!(!read.is_empty(), "partition {partition}: {landed} landed");
            landed = read.last().unwrap().0 + 1;
        }
        assert_eq!(landed, expected, "partition {partition}");
    }
    connection.close().await;
    broker.shutdown().await;
}

/// A connection's pipelined produce requests land in the order sent whatever their size and
/// acks. (A version that appended large batches on a thread of their own while the reader read
/// on, and small ones on the reader when that thread was idle, was measured and dropped; this
/// test caught it reordering when it let small ones pass the queued large ones.)
#[tokio::test]
async fn pipelined_produce_requests_of_every_size_land_in_the_order_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 1).await;
    // Every third request about 100 KiB (50 records of 2 KiB), the others a record or two;
    // every fourth with acks=none (the last is answered). Each value names its request.
    let mut wire = Vec::new();
    let mut expected: Vec<String> = Vec::new();
    let mut answers = 0;
    for request in 0..60u32 {
        let (count, padding) = match request % 3 {
            0 => (50, 2_000),
            _ => (1 + request as usize % 2, 0),
        };
        let values: Vec<String> = (0..count)
            .map(|index| format!("{request:03}-{index:02}-{}", "x".repeat(padding)))
            .collect();
        let acks = if request % 4 == 2 {
            Acks::None
        } else {
            answers += 1;
            Acks::Leader
        };
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        wire.extend_from_slice(&support::frame(
            request + 1,
            produce_request("t", 0, &refs, acks),
        ));
        expected.extend(values);
    }
    let mut raw = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    raw.write_all(&wire).await.unwrap();
    // The answers, whole frames each (the last answered request is the last sent).
    let whole_frames = |bytes: &[u8]| {
        let mut rest = bytes;
        let mut whole = 0;
        while rest.len() >= 4 {
            let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            if rest.len() < 4 + length {
                break;
            }
            whole += 4 + length;
            rest = &rest[4 + length..];
        }
        whole
    };
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let responses = support::parse_responses(&received[..whole_frames(&received)]);
        if responses.len() == answers {
            assert!(
                responses.iter().all(|(_, code)| *code == ErrorCode::None),
                "{responses:?}"
            );
            break;
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline.into(), raw.read(&mut chunk))
            .await
            .expect("every answer within 30 s")
            .unwrap();
        assert!(read > 0, "the broker closed the connection");
        received.extend_from_slice(&chunk[..read]);
    }
    let mut landed: Vec<String> = Vec::new();
    while landed.len() < expected.len() {
        let from = landed.len() as u64;
        let fetched = fetch(&connection, "t", 0, from, 0).await;
        assert_eq!(fetched.error_code, ErrorCode::None);
        let read = values(&fetched.records);
        assert!(!read.is_empty(), "{from} of {} landed", expected.len());
        landed.extend(
            read.into_iter()
                .filter(|(offset, _)| *offset >= from)
                .map(|(_, value)| value),
        );
    }
    assert!(
        landed == expected,
        "the records landed out of the order sent"
    );
    connection.close().await;
    broker.shutdown().await;
}

/// Shutdown does not wait for a peer to finish a frame it started: the half-sent request was
/// never acknowledged, and `frame_read_timeout_ms` (here two minutes) may be long.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_half_sent_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.frame_read_timeout_ms = 120_000;
    let broker = Broker::start(config).await.expect("broker starts");
    let received = || broker.state().metrics.received_bytes().get();
    let before = received();
    let mut stream = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    // A length prefix of 100 bytes, then 2 of them.
    tokio::io::AsyncWriteExt::write_all(&mut stream, &[0, 0, 0, 100, 0, 1])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received() < before + 6 {
        assert!(
            Instant::now() < deadline,
            "the broker never read the half frame"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(20), broker.shutdown())
        .await
        .expect("shutdown waited for the rest of the frame");
}

/// A partition named twice in one fetch is read once; the repeat is refused, not read again.
#[tokio::test]
async fn a_partition_named_twice_in_a_fetch_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 1).await;
    produce(&connection, "t", 0, &["a", "b"], Acks::Leader).await;
    let mut request = fetch_request("t", 0, 0, 0);
    let again = request.topics[0].partitions[0].clone();
    request.topics[0].partitions.push(again.clone());
    request.topics.push(FetchTopic {
        name: "t".into(),
        partitions: vec![again],
    });
    let Response::Fetch(response) = connection.send(request).await.unwrap() else {
        panic!("wrong response")
    };
    let answered: Vec<(ErrorCode, usize)> = response
        .topics
        .iter()
        .flat_map(|topic| &topic.partitions)
        .map(|partition| (partition.error_code, values(&partition.records).len()))
        .collect();
    assert_eq!(
        answered,
        [
            (ErrorCode::None, 2),
            (ErrorCode::InvalidRequest, 0),
            (ErrorCode::InvalidRequest, 0)
        ]
    );
    connection.close().await;
    broker.shutdown().await;
}

/// A fetch that finds some data, but less than its `min_bytes`, waits for more instead of reading
/// again and again until `max_wait` (the watermark is already past its fetch offset).
#[tokio::test]
async fn a_fetch_short_of_min_bytes_waits_for_more_records() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    assert_eq!(
        create(&connection, "t", 1).await.error_code,
        ErrorCode::None
    );
    produce(&connection, "t", 0, &["small"], Acks::Leader).await;
    let log = partition_log(&broker, "t", 0);
    let waiting = |log: &sluice_broker::storage::PartitionLog| log.high_watermark().waiter_count();

    let mut request = fetch_request("t", 0, 0, 20_000);
    request.min_bytes = 64 * 1024;
    let fetcher = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.send(request).await })
    };
    let registered = |expected: usize| {
        let log = &log;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while waiting(log) != expected {
                assert!(
                    Instant::now() < deadline,
                    "the fetch never waited on the partition"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    registered(1).await;
    // More, still short of min_bytes: it reads and waits again.
    produce(&connection, "t", 0, &["still small"], Acks::Leader).await;
    registered(1).await;
    let big = "x".repeat(70 * 1024);
    produce(&connection, "t", 0, &[big.as_str()], Acks::Leader).await;
    let Response::Fetch(mut answer) = fetcher.await.unwrap().expect("fetch answered") else {
        panic!("wrong response")
    };
    let got = values(&answer.topics.remove(0).partitions.remove(0).records);
    assert_eq!(
        got.len(),
        3,
        "every record up to the one that filled min_bytes"
    );
    assert_eq!(got[1], (1, "still small".to_owned()));
    connection.close().await;
    broker.shutdown().await;
}

/// A fetch whose `min_bytes` is more than it may be answered with (its `max_bytes`, or its
/// partitions' limits together) is answered with what there is, not held until `max_wait`
/// while every append to its partitions has it read everything again.
#[tokio::test]
async fn a_fetch_wanting_more_than_it_may_be_answered_with_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    assert_eq!(
        create(&connection, "t", 1).await.error_code,
        ErrorCode::None
    );
    // More than either limit below, far less than min_bytes.
    let value = "x".repeat(1_000);
    produce(&connection, "t", 0, &[value.as_str()], Acks::Leader).await;
    for (max_bytes, partition_max_bytes) in [(100, 1 << 20), (1 << 20, 100)] {
        let mut request = fetch_request("t", 0, 0, 25_000);
        request.min_bytes = 1 << 20;
        request.max_bytes = max_bytes;
        request.topics[0].partitions[0].partition_max_bytes = partition_max_bytes;
        let answer = tokio::time::timeout(Duration::from_secs(15), connection.send(request))
            .await
            .expect("answered well before its 25 s max_wait")
            .expect("fetch");
        let Response::Fetch(mut answer) = answer else {
            panic!("wrong response")
        };
        let got = values(&answer.topics.remove(0).partitions.remove(0).records);
        assert_eq!(got, [(0, value.clone())]);
    }
    connection.close().await;
    broker.shutdown().await;
}

/// A long-poll fetch waiting on a topic that is deleted answers at once that the topic is
/// gone: it neither waits out `max_wait` nor spins on the closed log until then.
#[tokio::test]
async fn a_fetch_waiting_on_a_deleted_topic_answers_that_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    create(&connection, "t", 1).await;
    let log = partition_log(&broker, "t", 0);
    let fetcher = {
        let connection = connection.clone();
        tokio::spawn(async move { connection.send(fetch_request("t", 0, 0, 600_000)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.high_watermark().waiter_count() == 0 {
        assert!(Instant::now() < deadline, "the fetch never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Response::DeleteTopics(deleted) = connection
        .send(DeleteTopicsRequest {
            names: vec!["t".into()],
        })
        .await
        .unwrap()
    else {
        panic!("wrong response")
    };
    assert_eq!(deleted.results[0].error_code, ErrorCode::None);
    let answer = tokio::time::timeout(Duration::from_secs(60), fetcher)
        .await
        .expect("the fetch answered long before its ten minutes")
        .unwrap()
        .expect("fetch");
    let Response::Fetch(answer) = answer else {
        panic!("wrong response")
    };
    let partition = &answer.topics[0].partitions[0];
    assert_eq!(partition.error_code, ErrorCode::UnknownTopic);
    assert!(partition.records.is_empty());
    connection.close().await;
    broker.shutdown().await;
}

/// The first batch at or after `from` of topic `t`'s partition 0: a partition limit of one
/// byte returns one whole batch per fetch.
async fn one_batch_of_t(connection: &Connection, from: u64) -> FetchPartitionResponse {
    let mut request = fetch_request("t", 0, from, 0);
    request.topics[0].partitions[0].partition_max_bytes = 1;
    let Response::Fetch(mut response) = connection.send(request).await.expect("fetch") else {
        panic!("wrong response")
    };
    response.topics.remove(0).partitions.remove(0)
}

/// A fetch that returns records starts reading the connection's likely next fetch (the same
/// request from where it ended). Whatever the consumer asks next, the answer is what a plain
/// read gives: the read ahead when it asks exactly that, its own read when it sought elsewhere.
async fn fetches_read_ahead_answer_as_plain_reads_and_follow_seeks(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 1).await;
    let all: Vec<String> = (0..30).map(|index| format!("v{index}")).collect();
    for chunk in all.chunks(10) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        produce(&connection, "t", 0, &chunk, Acks::Leader).await;
    }
    // A partition limit of one byte returns one whole batch (ten records) per fetch.
    let one_batch = |from: u64| one_batch_of_t(&connection, from);
    let expected = |from: u64| -> Vec<(u64, String)> {
        (from..from + 10)
            .map(|offset| (offset, all[offset as usize].clone()))
            .collect()
    };
    // Reading on: each fetch is the one read ahead after the one before.
    for from in [0, 10, 20] {
        assert_eq!(values(&one_batch(from).await.records), expected(from));
    }
    // A seek back, then past what was read ahead, then back to it.
    for from in [0, 20, 10, 10] {
        assert_eq!(
            values(&one_batch(from).await.records),
            expected(from),
            "from {from}"
        );
    }
    // Records produced after a read ahead: read ahead from 20 still says where the log ends
    // now, and a fetch from the end gets the new batch.
    assert_eq!(values(&one_batch(10).await.records), expected(10));
    produce(&connection, "t", 0, &["late"], Acks::Leader).await;
    let from_20 = one_batch(20).await;
    assert_eq!(values(&from_20.records), expected(20));
    assert_eq!(from_20.high_watermark, 31);
    assert_eq!(
        values(&one_batch(30).await.records),
        [(30, "late".to_owned())]
    );
    // Other limits are another request: a whole-log fetch from 0 reads for itself.
    assert_eq!(values(&one_batch(0).await.records), expected(0));
    assert_eq!(
        values(&fetch(&connection, "t", 0, 10, 0).await.records).len(),
        21
    );
    broker.shutdown().await;
}

/// A read ahead done before its topic was deleted is not the answer to the same fetch of a
/// topic created again under that name: the consumer gets the new topic's records.
async fn a_read_ahead_of_a_deleted_topic_is_not_served_for_the_topic_created_again(
    transport: Transport,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    // Held for as long as the test could take: it must not expire on its own.
    config.limits.fetch_read_ahead_ms = 600_000;
    let broker = Broker::start(config).await.expect("broker starts");
    let connection = connect(&broker, dir.path(), transport).await;
    let one_batch = |from: u64| {
        let connection = connection.clone();
        async move { values(&one_batch_of_t(&connection, from).await.records) }
    };
    create(&connection, "t", 1).await;
    produce(&connection, "t", 0, &["old0", "old1"], Acks::Leader).await;
    produce(&connection, "t", 0, &["old2", "old3"], Acks::Leader).await;
    // Answered, this starts reading the next batch (from offset 2) ahead.
    assert_eq!(one_batch(0).await[0].1, "old0");
    support::delete_topic(&connection, "t").await;
    create(&connection, "t", 1).await;
    produce(&connection, "t", 0, &["new0", "new1"], Acks::Leader).await;
    produce(&connection, "t", 0, &["new2", "new3"], Acks::Leader).await;
    assert_eq!(
        one_batch(2).await,
        [(2, "new2".to_owned()), (3, "new3".to_owned())]
    );
    broker.shutdown().await;
}

/// Fetches large enough to be mapped from the page cache (and over TCP sent from the file with
/// `sendfile`) arrive whole, in their frames, among other answers on the same connection.
async fn large_fetches_arrive_whole_and_in_order_among_other_answers(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 1).await;
    // Six batches of about 130 kB.
    let all: Vec<String> = (0..1_200)
        .map(|index| format!("{index:06}-{}", "x".repeat(600)))
        .collect();
    for chunk in all.chunks(200) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        produce(&connection, "t", 0, &chunk, Acks::Leader).await;
    }
    let fetch_from = |from: u64| {
        let connection = connection.clone();
        async move { (from, fetch(&connection, "t", 0, from, 0).await) }
    };
    let metadata = || {
        let connection = connection.clone();
        async move {
            let Response::Metadata(metadata) = connection
                .send(MetadataRequest {
                    topics: Some(vec!["t".into()]),
                })
                .await
                .expect("metadata")
            else {
                panic!("wrong response")
            };
            assert_eq!(metadata.topics[0].partitions.len(), 1);
        }
    };
    for _ in 0..3 {
        let fetches =
            futures::future::join_all([0, 1, 199, 200, 650, 1_000, 1_199].map(fetch_from));
        let others = futures::future::join_all((0..10).map(|_| metadata()));
        let (fetched, _) = tokio::join!(fetches, others);
        for (from, answer) in fetched {
            assert_eq!(answer.error_code, ErrorCode::None);
            // Everything from the batch that holds `from` to the end: under 1 MiB.
            let first = from / 200 * 200;
            let expected: Vec<(u64, String)> = (first..1_200)
                .map(|offset| (offset, all[offset as usize].clone()))
                .collect();
            assert_eq!(values(&answer.records), expected, "from {from}");
        }
    }
    broker.shutdown().await;
}

async fn many_concurrent_requests_on_one_connection(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 4).await;
    let mut tasks = Vec::new();
    for index in 0..200u32 {
        let connection = connection.clone();
        tasks.push(tokio::spawn(async move {
            match index % 3 {
                0 => {
                    let value = format!("v{index}");
                    let result =
                        produce(&connection, "t", index % 4, &[&value], Acks::Durable).await;
                    assert_eq!(result.error_code, ErrorCode::None);
                }
                1 => {
                    connection
                        .send(MetadataRequest { topics: None })
                        .await
                        .unwrap();
                }
                _ => {
                    let fetched = fetch(&connection, "t", index % 4, 0, 10).await;
                    assert_eq!(fetched.error_code, ErrorCode::None);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Every produced record is there exactly once.
    let mut seen = BTreeSet::new();
    for partition in 0..4 {
        for (_, value) in values(&fetch(&connection, "t", partition, 0, 0).await.records) {
            assert!(seen.insert(value), "duplicate");
        }
    }
    assert_eq!(seen.len(), (0..200).filter(|index| index % 3 == 0).count());
    broker.shutdown().await;
}

async fn list_offsets_earliest_latest_and_by_timestamp(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "t", 1).await;
    produce(&connection, "t", 0, &["a", "b", "c"], Acks::Leader).await;
    let specs = [
        OffsetSpec::Earliest,
        OffsetSpec::Latest,
        OffsetSpec::Timestamp(1_700_000_000_001),
        OffsetSpec::Timestamp(1_800_000_000_000),
    ];
    let lookup = |partitions: Vec<ListOffsetsPartition>| {
        let connection = &connection;
        async move {
            let response = connection
                .send(ListOffsetsRequest {
                    topics: vec![ListOffsetsTopic {
                        name: "t".into(),
                        partitions,
                    }],
                })
                .await
                .unwrap();
            let Response::ListOffsets(mut response) = response else {
                panic!()
            };
            response.topics.remove(0).partitions
        }
    };
    let mut offsets = Vec::new();
    for spec in specs {
        let answer = lookup(vec![ListOffsetsPartition { partition: 0, spec }]).await;
        assert_eq!(answer[0].error_code, ErrorCode::None);
        offsets.push((answer[0].offset, answer[0].timestamp));
    }
    assert_eq!(offsets, [(0, -1), (3, -1), (1, 1_700_000_000_001), (3, -1)]);
    // A partition named twice in one request is looked up once; the repeat is refused.
    let answer = lookup(
        specs
            .iter()
            .map(|spec| ListOffsetsPartition {
                partition: 0,
                spec: *spec,
            })
            .collect(),
    )
    .await;
    let codes: Vec<ErrorCode> = answer.iter().map(|p| p.error_code).collect();
    assert_eq!(
        codes,
        [
            ErrorCode::None,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidRequest
        ]
    );
    assert_eq!(answer[0].offset, 0);
    broker.shutdown().await;
}

async fn restart_keeps_topics_and_records(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    create(&connection, "kept", 2).await;
    for index in 0..50 {
        let value = format!("r{index}");
        produce(&connection, "kept", index % 2, &[&value], Acks::Leader).await;
    }
    drop(connection);
    broker.shutdown().await;

    let (broker, connection) = start(dir.path(), transport).await;
    let Response::ListTopics(list) = connection.send(ListTopicsRequest {}).await.unwrap() else {
        panic!()
    };
    assert_eq!(list.topics[0].name, "kept");
    let mut all = Vec::new();
    for partition in 0..2 {
        all.extend(
            values(&fetch(&connection, "kept", partition, 0, 0).await.records)
                .into_iter()
                .map(|(_, v)| v),
        );
    }
    all.sort();
    let mut expected: Vec<String> = (0..50).map(|index| format!("r{index}")).collect();
    expected.sort();
    assert_eq!(all, expected);
    assert_eq!(
        produce(&connection, "kept", 0, &["after"], Acks::Durable)
            .await
            .base_offset,
        25
    );
    broker.shutdown().await;
}

async fn hundred_topics_of_eight_partitions(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), transport).await;
    let response = connection
        .send(CreateTopicsRequest {
            topics: (0..100)
                .map(|index| CreateTopic {
                    name: format!("topic-{index:03}"),
                    partitions: 8,
                    configs: vec![],
                })
                .collect(),
            validate_only: false,
        })
        .await
        .unwrap();
    let Response::CreateTopics(response) = response else {
        panic!()
    };
    assert!(
        response
            .results
            .iter()
            .all(|result| result.error_code == ErrorCode::None)
    );
    let Response::ListTopics(list) = connection.send(ListTopicsRequest {}).await.unwrap() else {
        panic!()
    };
    assert_eq!(list.topics.len(), 100);
    assert!(list.topics.iter().all(|topic| topic.partitions == 8));
    assert_eq!(list.topics[42].name, "topic-042");
    broker.shutdown().await;
}

#[tokio::test]
async fn bad_frames_get_an_error_and_do_not_harm_other_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Tcp).await;
    // A frame claiming 4 GiB: refused before anything is allocated, answered, closed.
    let mut raw = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 6, 0, 0, 0, 0, 0, 9, 0, 0])
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answer,
        [
            0,
            0,
            0,
            6,
            0,
            0,
            0,
            9,
            0,
            ErrorCode::MessageTooLarge.code() as u8
        ]
    );
    // An unknown api key: an error response, and the connection stays usable.
    let mut raw = tokio::net::TcpStream::connect(broker.tcp_addr)
        .await
        .unwrap();
    raw.write_all(&[0, 0, 0, 10, 0x03, 0xe7, 0, 0, 0, 0, 0, 5, 0, 0])
        .await
        .unwrap();
    let mut answer = [0u8; 10];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(
        answer,
        [
            0,
            0,
            0,
            6,
            0,
            0,
            0,
            5,
            0,
            ErrorCode::UnknownApiKey.code() as u8
        ]
    );
    raw.write_all(&[0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0])
        .await
        .unwrap();
    let mut header = [0u8; 10];
    raw.read_exact(&mut header).await.unwrap();
    assert_eq!(&header[4..10], &[0, 0, 0, 6, 0, 0]);
    // The well-behaved client never noticed.
    connection.send(ApiVersionsRequest {}).await.unwrap();
    broker.shutdown().await;
}

/// A bare QUIC connection to the broker, trusting its self-signed certificate, for sending
/// what no client would send.
struct RawQuic {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl RawQuic {
    async fn connect(broker: &BrokerHandle, data_dir: &Path) -> RawQuic {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(sluice_broker::tls::self_signed_certificate_path(data_dir))
            .expect("the broker wrote its certificate");
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"sluice/1".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client_config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connection = endpoint
            .connect_with(client_config, broker.quic_addr.unwrap(), "127.0.0.1")
            .unwrap()
            .await
            .expect("QUIC handshake");
        RawQuic {
            endpoint,
            connection,
        }
    }

    async fn open(&self) -> (quinn::SendStream, quinn::RecvStream) {
        self.connection.open_bi().await.expect("open a stream")
    }

    /// Closes like a client does, so the broker's shutdown need not wait for it.
    async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}

/// Sends an ApiVersions request on a raw stream and checks its answer.
async fn raw_round_trip(
    (send, receive): &mut (quinn::SendStream, quinn::RecvStream),
    correlation_id: u32,
) {
    let mut frame = bytes::BytesMut::new();
    sluice_protocol::Request::from(ApiVersionsRequest {}).encode_frame(correlation_id, &mut frame);
    send.write_all(&frame).await.expect("write the request");
    let mut header = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), receive.read_exact(&mut header))
        .await
        .expect("answered in time")
        .expect("read the response header");
    assert_eq!(
        &header[4..10],
        [&correlation_id.to_be_bytes()[..], &[0, 0]].concat(),
        "an ApiVersions answer without error"
    );
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0; length - 6];
    receive.read_exact(&mut body).await.expect("read the body");
}

/// Reads a stream to its end, as the broker closes it after a frame it cannot recover from.
async fn read_until_closed(receive: &mut quinn::RecvStream) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), receive.read_to_end(1024))
        .await
        .expect("the broker ends the stream in time")
        .expect("the stream ends cleanly")
}

#[tokio::test]
async fn bad_frames_on_a_quic_stream_end_that_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path(), Transport::Quic).await;
    let raw = RawQuic::connect(&broker, dir.path()).await;
    let mut healthy = raw.open().await;
    raw_round_trip(&mut healthy, 1).await;

    // A frame claiming 4 GiB: refused before anything is allocated, answered, stream ended.
    let (mut send, mut receive) = raw.open().await;
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 6, 0, 0, 0, 0, 0, 9, 0, 0])
        .await
        .unwrap();
    let code = ErrorCode::MessageTooLarge.code().to_be_bytes();
    assert_eq!(
        read_until_closed(&mut receive).await,
        [0, 0, 0, 6, 0, 0, 0, 9, code[0], code[1]]
    );

    // Garbage: a length too short for any request header. Answered (no correlation id could
    // be read, so 0), stream ended.
    let (mut send, mut receive) = raw.open().await;
    send.write_all(&[0, 0, 0, 2, 0xde, 0xad]).await.unwrap();
    let code = ErrorCode::InvalidRequest.code().to_be_bytes();
    assert_eq!(
        read_until_closed(&mut receive).await,
        [0, 0, 0, 6, 0, 0, 0, 0, code[0], code[1]]
    );

    // An unknown api key: an error answer, and that stream stays usable.
    let mut unknown = raw.open().await;
    unknown
        .0
        .write_all(&[0, 0, 0, 10, 0x03, 0xe7, 0, 0, 0, 0, 0, 5, 0, 0])
        .await
        .unwrap();
    let mut answer = [0u8; 10];
    unknown.1.read_exact(&mut answer).await.unwrap();
    let code = ErrorCode::UnknownApiKey.code().to_be_bytes();
    assert_eq!(answer, [0, 0, 0, 6, 0, 0, 0, 5, code[0], code[1]]);
    raw_round_trip(&mut unknown, 6).await;

    // The connection's other stream, and the other client, never noticed.
    raw_round_trip(&mut healthy, 2).await;
    connection.send(ApiVersionsRequest {}).await.unwrap();
    raw.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn streams_over_max_quic_streams_wait_for_a_free_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_quic_streams = 2;
    let broker = Broker::start(config).await.expect("broker starts");
    let raw = RawQuic::connect(&broker, dir.path()).await;
    let mut first = raw.open().await;
    let mut second = raw.open().await;
    raw_round_trip(&mut first, 1).await;
    raw_round_trip(&mut second, 2).await;

    // A third stream is not granted while two are open...
    let mut opening = Box::pin(raw.connection.open_bi());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut opening)
            .await
            .is_err(),
        "a third stream opened while max_quic_streams = 2 were open"
    );
    // ...and the open ones keep working meanwhile.
    raw_round_trip(&mut second, 3).await;

    // Ending the first stream frees its place, and the waiting stream gets it.
    first.0.finish().unwrap();
    assert!(read_until_closed(&mut first.1).await.is_empty());
    let mut third = tokio::time::timeout(Duration::from_secs(10), opening)
        .await
        .expect("the third stream opens once the first is done")
        .expect("open the third stream");
    raw_round_trip(&mut third, 4).await;
    raw_round_trip(&mut second, 5).await;
    raw.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn max_connections_counts_tcp_and_quic_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_connections = 1;
    let broker = Broker::start(config).await.expect("broker starts");
    let tcp = connect(&broker, dir.path(), Transport::Tcp).await;
    tcp.send(ApiVersionsRequest {}).await.unwrap();
    let refused = Connection::connect_with(
        &Transport::Quic.url(&broker),
        Transport::Quic.options(dir.path()),
    )
    .await;
    assert!(
        matches!(refused, Err(sluice_client::Error::Connect { .. })),
        "QUIC over the limit: {refused:?}"
    );

    // Once the TCP connection is gone, its slot serves QUIC.
    tcp.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let quic = loop {
        match Connection::connect_with(
            &Transport::Quic.url(&broker),
            Transport::Quic.options(dir.path()),
        )
        .await
        {
            Ok(quic) => break quic,
            Err(error) => assert!(Instant::now() < deadline, "still refused: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    quic.send(ApiVersionsRequest {}).await.unwrap();
    // And now TCP is the one over the limit.
    let tcp = connect(&broker, dir.path(), Transport::Tcp).await;
    assert!(tcp.send(ApiVersionsRequest {}).await.is_err());
    quic.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_client_refuses_a_broker_its_ca_file_does_not_vouch_for() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .expect("broker starts");
    // Another broker's self-signed certificate: a valid CA file, but not this broker's.
    let other = tempfile::tempdir().unwrap();
    sluice_broker::tls::server_config(&Default::default(), other.path()).unwrap();
    let options = Transport::Quic.options(other.path());
    match Connection::connect_with(&Transport::Quic.url(&broker), options).await {
        Err(error @ sluice_client::Error::Connect { .. }) => {
            assert!(error.to_string().contains("handshake"), "{error}");
        }
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    // The broker's own certificate also names localhost.
    let url = format!("quic://localhost:{}", broker.quic_addr.unwrap().port());
    let connection = Connection::connect_with(&url, Transport::Quic.options(dir.path()))
        .await
        .expect("localhost is in the certificate");
    connection.send(ApiVersionsRequest {}).await.unwrap();
    connection.close().await;
    broker.shutdown().await;
}
