//! The consumer against a real broker: group streams, standalone assignment and seeking,
//! commits and resumption.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::protocol::messages::*;
use sluice_client::protocol::{ErrorCode, RecordBatchBuilder, Response};
use sluice_client::{Client, CommitMode, Consumer, ResetPolicy, Seek};

async fn start(data_dir: &Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(Config::on_loopback(data_dir))
        .await
        .expect("broker starts");
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    (broker, client)
}

async fn create_topic(client: &Client, name: &str, partitions: u32) {
    client
        .admin()
        .create_topic(name, partitions, &[])
        .await
        .expect("create topic");
}

/// Produces `values` to a partition, a batch of `per_batch` at a time.
async fn produce(
    client: &Client,
    topic: &str,
    partition: u32,
    values: &[String],
    per_batch: usize,
) {
    for chunk in values.chunks(per_batch) {
        let mut builder = RecordBatchBuilder::new();
        for value in chunk {
            builder.append(
                1_700_000_000_000,
                Some(b"k"),
                value.as_bytes(),
                &[("h", b"1")],
            );
        }
        let Response::Produce(response) = client
            .send(ProduceRequest {
                acks: Acks::Leader,
                timeout_ms: 10_000,
                topics: vec![ProduceTopic {
                    name: topic.into(),
                    partitions: vec![ProducePartition {
                        partition,
                        records: builder.build().into_bytes(),
                    }],
                }],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(response.topics[0].partitions[0].error_code, ErrorCode::None);
    }
}

/// Takes `count` records from the stream, failing after a deadline.
async fn take(consumer: &mut Consumer, count: usize) -> Vec<(u32, u64, String)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < count {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let record = tokio::time::timeout(remaining, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records arrived", out.len()))
            .expect("stream open")
            .expect("record");
        out.push((
            record.partition,
            record.offset,
            String::from_utf8(record.value.to_vec()).unwrap(),
        ));
    }
    out
}

/// The same client over QUIC, trusting the certificate the broker wrote.
async fn start_quic(data_dir: &Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(Config::on_loopback(data_dir))
        .await
        .expect("broker starts");
    let quic = broker.quic_addr.expect("quic listener");
    let options = sluice_client::ClientOptions::default().connection(
        sluice_client::ConnectionOptions::default().ca_file(data_dir.join("tls/cert.pem")),
    );
    let client = Client::connect_with(&format!("quic://localhost:{}", quic.port()), options)
        .await
        .expect("connect over quic");
    (broker, client)
}

#[tokio::test]
async fn a_group_member_sees_every_record_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    group_member_exactly_once(start(dir.path()).await).await;
}

#[tokio::test]
async fn a_group_member_sees_every_record_exactly_once_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    group_member_exactly_once(start_quic(dir.path()).await).await;
}

async fn group_member_exactly_once((broker, client): (BrokerHandle, Client)) {
    create_topic(&client, "orders", 3).await;
    let mut expected = BTreeSet::new();
    for partition in 0..3u32 {
        let values: Vec<String> = (0..500)
            .map(|index| format!("p{partition}-{index}"))
            .collect();
        expected.extend(values.iter().cloned());
        produce(&client, "orders", partition, &values, 37).await;
    }
    let mut consumer = client
        .consumer()
        .group("billing")
        .topics(["orders"])
        .build()
        .await
        .unwrap();
    let records = take(&mut consumer, 1500).await;
    let seen: BTreeSet<String> = records.iter().map(|(_, _, value)| value.clone()).collect();
    assert_eq!(seen.len(), 1500, "a duplicate or a gap");
    assert_eq!(seen, expected);
    // Offsets run in order within each partition.
    for partition in 0..3u32 {
        let offsets: Vec<u64> = records
            .iter()
            .filter(|r| r.0 == partition)
            .map(|r| r.1)
            .collect();
        assert_eq!(offsets, (0..500).collect::<Vec<u64>>());
    }
    // Nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err()
    );
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn commits_on_close_and_a_new_member_resumes_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    let values: Vec<String> = (0..100).map(|index| format!("v{index}")).collect();
    produce(&client, "t", 0, &values, 10).await;
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .commit_mode(CommitMode::Manual)
        .build()
        .await
        .unwrap();
    let first = take(&mut consumer, 40).await;
    assert_eq!(first.last().unwrap().1, 39);
    consumer.close().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "t", 0).await, 40);
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .build()
        .await
        .unwrap();
    let rest = take(&mut consumer, 60).await;
    assert_eq!(
        rest.first().unwrap().1,
        40,
        "resumes at the committed offset"
    );
    assert_eq!(rest.last().unwrap().2, "v99");
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn two_members_share_the_partitions_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 4).await;
    let mut first = client
        .consumer()
        .group("g")
        .topics(["t"])
        .build()
        .await
        .unwrap();
    let mut second = client
        .consumer()
        .group("g")
        .topics(["t"])
        .build()
        .await
        .unwrap();
    // Wait until the group has settled: both members hold two partitions.
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.assignment().len() != 2 || second.assignment().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "group did not settle: {:?} {:?}",
            first.assignment(),
            second.assignment()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.assignment().is_disjoint(&second.assignment()));
    for partition in 0..4u32 {
        let values: Vec<String> = (0..50)
            .map(|index| format!("p{partition}-{index}"))
            .collect();
        produce(&client, "t", partition, &values, 10).await;
    }
    let a = take(&mut first, 100).await;
    let b = take(&mut second, 100).await;
    let all: BTreeSet<String> = a.iter().chain(b.iter()).map(|r| r.2.clone()).collect();
    assert_eq!(all.len(), 200);
    first.close().await.unwrap();
    second.close().await.unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn standalone_assign_and_seek() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 2).await;
    let values: Vec<String> = (0..30).map(|index| format!("v{index}")).collect();
    produce(&client, "t", 1, &values, 7).await;
    let mut consumer = client.consumer().build().await.unwrap();
    consumer
        .assign(&[("t".into(), 1)], Seek::Offset(25))
        .await
        .unwrap();
    let tail = take(&mut consumer, 5).await;
    assert_eq!(
        tail.iter().map(|r| r.1).collect::<Vec<_>>(),
        [25, 26, 27, 28, 29]
    );
    consumer.seek("t", 1, Seek::Earliest).await.unwrap();
    let head = take(&mut consumer, 3).await;
    assert_eq!(head.iter().map(|r| r.1).collect::<Vec<_>>(), [0, 1, 2]);
    let mut latest = client
        .consumer()
        .reset_policy(ResetPolicy::Latest)
        .build()
        .await
        .unwrap();
    latest
        .assign(&[("t".into(), 1)], Seek::Latest)
        .await
        .unwrap();
    produce(&client, "t", 1, &["new".to_owned()], 1).await;
    let new = take(&mut latest, 1).await;
    assert_eq!(new[0], (1, 30, "new".to_owned()));
    broker.shutdown().await;
}

#[tokio::test]
async fn producer_and_group_consumer_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start_quic(dir.path()).await;
    create_topic(&client, "q", 2).await;
    let producer = client.producer().build().await.unwrap();
    let mut deliveries = Vec::new();
    for index in 0..1000u32 {
        let record = sluice_client::producer::Record::new("q", format!("v{index}"))
            .key(format!("k{}", index % 7));
        deliveries.push(producer.enqueue(record).await.unwrap());
    }
    for delivery in deliveries {
        assert!(delivery.await.unwrap().offset.is_some());
    }
    producer.close().await.unwrap();
    let mut consumer = client
        .consumer()
        .group("quic")
        .topics(["q"])
        .build()
        .await
        .unwrap();
    let records = take(&mut consumer, 1000).await;
    let values: BTreeSet<String> = records.into_iter().map(|(_, _, value)| value).collect();
    assert_eq!(values.len(), 1000);
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

/// `next_batch` hands out the fetched batches undecoded, starting right after what the stream
/// yielded, with every record's offset, key, value and headers; closing commits all of it.
#[tokio::test]
async fn batches_continue_where_the_stream_stopped_and_are_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "b", 1).await;
    let values: Vec<String> = (0..100).map(|index| format!("v{index}")).collect();
    produce(&client, "b", 0, &values, 10).await;
    let mut consumer = client
        .consumer()
        .group("gb")
        .topics(["b"])
        .commit_mode(CommitMode::Manual)
        .build()
        .await
        .unwrap();
    let streamed = take(&mut consumer, 15).await;
    assert_eq!(streamed.last().unwrap().1, 14);
    let mut seen: Vec<(u64, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 85 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(remaining, consumer.next_batch())
            .await
            .unwrap_or_else(|_| panic!("only {} of 85 records arrived", seen.len()))
            .expect("consumer open")
            .expect("batch");
        assert_eq!((&**batch.topic(), batch.partition()), ("b", 0));
        let before = seen.len();
        for record in batch.records() {
            assert_eq!(record.key(), Some(&b"k"[..]));
            assert_eq!(record.headers().collect::<Vec<_>>(), [("h", &b"1"[..])]);
            assert_eq!(record.timestamp_ms(), 1_700_000_000_000);
            seen.push((
                record.offset(),
                String::from_utf8(record.value().to_vec()).unwrap(),
            ));
        }
        assert_eq!(batch.len(), seen.len() - before);
        assert_eq!(batch.next_offset(), seen.last().unwrap().0 + 1);
    }
    let expected: Vec<(u64, String)> = (15..100)
        .map(|offset| (offset, format!("v{offset}")))
        .collect();
    assert_eq!(seen, expected, "no record skipped or repeated");
    consumer.close().await.unwrap();
    assert_eq!(committed_offset(&client, "gb", "b", 0).await, 100);
    broker.shutdown().await;
}

/// The fetch task queues the next fetch before it has checked the last answer: a batch that
/// cannot be served (the broker checks each batch's CRC as it leaves the disk) must hold the
/// partition where it is, never be skipped, be reported to the application, and once the bytes
/// are whole again the partition goes on from there, nothing lost.
#[tokio::test]
async fn a_damaged_batch_is_reported_not_skipped_and_read_once_mended() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    let values: Vec<String> = (0..30).map(|index| format!("value-{index:02}")).collect();
    produce(&client, "t", 0, &values, 10).await;

    // Damage a value of the second batch (offsets 10..20) in the segment, under the broker.
    let segment = dir.path().join("topics/t/0").join(format!("{:020}.log", 0));
    let bytes = std::fs::read(&segment).expect("segment");
    let at = bytes
        .windows(8)
        .position(|window| window == b"value-15")
        .expect("the record is in the segment") as u64;
    let patch = |byte: &[u8]| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        file.write_all_at(byte, at).unwrap();
    };
    patch(b"V");

    let mut consumer = client.consumer().build().await.unwrap();
    consumer
        .assign(&[("t".into(), 0)], Seek::Earliest)
        .await
        .unwrap();
    let head = take(&mut consumer, 10).await;
    assert_eq!(
        head.iter().map(|record| record.1).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u64>>()
    );
    // Fetches from offset 10 fail: the application hears of it, again at each retry (the
    // partition is held at the damage and fetched again after a backoff, not skipped), and
    // nothing past the damage is handed out. How often it is retried in a given time is left
    // to the consumer's own tests: a count per second on a busy machine proves nothing.
    const REPORTS: usize = 3;
    let mut errors = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while errors < REPORTS {
        let item = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            consumer.next(),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("the damaged batch was reported {errors} times, expected {REPORTS}")
        })
        .expect("stream open");
        match item {
            Ok(record) => panic!("offset {} handed out past a damaged batch", record.offset),
            Err(sluice_client::Error::Broker { code, .. }) => {
                assert_eq!(code, ErrorCode::StorageError);
                errors += 1;
            }
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    patch(b"v");
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rest.len() < 20 {
        let item = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            consumer.next(),
        )
        .await
        .unwrap_or_else(|_| panic!("only {} records arrived once mended", rest.len()))
        .expect("stream open");
        // A report sent before the mend may still be on its way.
        if let Ok(record) = item {
            rest.push((
                record.offset,
                String::from_utf8(record.value.to_vec()).unwrap(),
            ));
        }
    }
    let expected: Vec<(u64, String)> = (10..30)
        .map(|offset| (offset, values[offset as usize].clone()))
        .collect();
    assert_eq!(rest, expected);
    broker.shutdown().await;
}

/// A consumer whose connection takes smaller frames than its fetch limits asks for no more
/// than a frame holds: an answer over the limit would close the connection, and the same fetch
/// would be asked again and again.
#[tokio::test]
async fn fetches_fit_in_the_frames_the_connection_takes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .expect("broker starts");
    let options = sluice_client::ClientOptions::default()
        .connection(sluice_client::ConnectionOptions::default().max_frame_bytes(64 * 1024));
    let client = Client::connect_with(&format!("tcp://{}", broker.tcp_addr), options)
        .await
        .expect("connect");
    create_topic(&client, "t", 2).await;
    // 80 kB a partition, in batches of 4 kB: a whole fetch of both is over 64 KiB.
    let values: Vec<String> = (0..800)
        .map(|index| format!("{index:04}{}", "x".repeat(96)))
        .collect();
    for partition in 0..2 {
        produce(&client, "t", partition, &values, 40).await;
    }
    let mut consumer = client.consumer().build().await.unwrap();
    consumer
        .assign(&[("t".into(), 0), ("t".into(), 1)], Seek::Earliest)
        .await
        .unwrap();
    let records = take(&mut consumer, 1_600).await;
    for partition in 0..2 {
        let offsets: Vec<u64> = records
            .iter()
            .filter(|record| record.0 == partition)
            .map(|record| record.1)
            .collect();
        assert_eq!(
            offsets,
            (0..800).collect::<Vec<u64>>(),
            "partition {partition}"
        );
    }
    broker.shutdown().await;
}

async fn committed_offset(client: &Client, group: &str, topic: &str, partition: u32) -> i64 {
    let Response::FetchOffsets(offsets) = client
        .send(FetchOffsetsRequest {
            group_id: group.into(),
            topics: Some(vec![TopicPartitions {
                topic: topic.into(),
                partitions: vec![partition],
            }]),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    offsets.topics[0].partitions[0].committed_offset
}

/// After a seek back, what is committed follows the new position, as in Kafka: records read
/// again are committed as they are read, not hidden behind the position before the seek.
#[tokio::test]
async fn commits_follow_a_seek_back() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    let values: Vec<String> = (0..30).map(|index| format!("v{index}")).collect();
    produce(&client, "t", 0, &values, 10).await;
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .commit_mode(CommitMode::Manual)
        .build()
        .await
        .unwrap();
    assert_eq!(take(&mut consumer, 30).await.last().unwrap().1, 29);
    consumer.commit().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "t", 0).await, 30);
    consumer.seek("t", 0, Seek::Offset(10)).await.unwrap();
    let again = take(&mut consumer, 5).await;
    assert_eq!(
        again.iter().map(|record| record.1).collect::<Vec<_>>(),
        [10, 11, 12, 13, 14]
    );
    consumer.commit().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "t", 0).await, 15);
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

/// With `ResetPolicy::Error`, an assigned partition with no committed offset is reported once
/// and waits for the application to seek it, while the partitions assigned with it that do
/// have a committed offset are read (before, one such partition held back all of them, and
/// the error came again at every heartbeat).
#[tokio::test]
async fn with_reset_policy_error_a_partition_without_a_commit_waits_for_a_seek_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "a", 1).await;
    create_topic(&client, "b", 1).await;
    let first: Vec<String> = (0..5).map(|index| format!("a{index}")).collect();
    produce(&client, "a", 0, &first, 5).await;
    // A first member of the group reads "a" and commits where it got to.
    let mut reader = client
        .consumer()
        .group("g")
        .topics(["a"])
        .build()
        .await
        .unwrap();
    assert_eq!(take(&mut reader, 5).await.len(), 5);
    reader.close().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "a", 0).await, 5);

    let later: Vec<String> = (5..8).map(|index| format!("a{index}")).collect();
    produce(&client, "a", 0, &later, 1).await;
    let b_values: Vec<String> = (0..5).map(|index| format!("b{index}")).collect();
    produce(&client, "b", 0, &b_values, 5).await;
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["a", "b"])
        .reset_policy(ResetPolicy::Error)
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut records, mut errors) = (Vec::new(), Vec::new());
    let mut sought = false;
    while records.len() < 8 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, consumer.next()).await {
            Ok(Some(Ok(record))) => records.push(String::from_utf8(record.value.to_vec()).unwrap()),
            Ok(Some(Err(error))) => errors.push(error.to_string()),
            other => panic!("records {records:?}, errors {errors:?}, then {other:?}"),
        }
        // "a" goes on from its commit while "b" waits; then a seek starts "b".
        if !sought && records.len() == 3 && !errors.is_empty() {
            consumer.seek("b", 0, Seek::Offset(0)).await.unwrap();
            sought = true;
        }
    }
    assert_eq!(records[..3], later[..], "a, from its committed offset");
    assert_eq!(records[3..], b_values[..], "b, from where it was sought");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("no committed offset for b/0"),
        "{errors:?}"
    );
    consumer.close().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "b", 0).await, 5);
    broker.shutdown().await;
}

/// A position the log no longer has (the topic was deleted and created again, or truncated)
/// is reset by the reset policy as a seek is: what was read before does not count, and nothing
/// of it is committed over the new position.
#[tokio::test]
async fn a_reset_out_of_range_position_is_committed_from_where_it_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    let first: Vec<String> = (0..10).map(|index| format!("old{index}")).collect();
    produce(&client, "t", 0, &first, 10).await;
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .commit_mode(CommitMode::Manual)
        .reset_policy(ResetPolicy::Earliest)
        .build()
        .await
        .unwrap();
    assert_eq!(take(&mut consumer, 10).await.last().unwrap().1, 9);
    consumer.commit().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "t", 0).await, 10);
    client.admin().delete_topic("t").await.unwrap();
    create_topic(&client, "t", 1).await;
    let second: Vec<String> = (0..3).map(|index| format!("new{index}")).collect();
    produce(&client, "t", 0, &second, 3).await;
    let again = take(&mut consumer, 3).await;
    assert_eq!(
        again
            .iter()
            .map(|(_, offset, value)| (*offset, value.as_str()))
            .collect::<Vec<_>>(),
        [(0, "new0"), (1, "new1"), (2, "new2")]
    );
    consumer.commit().await.unwrap();
    assert_eq!(committed_offset(&client, "g", "t", 0).await, 3);
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

/// With `ResetPolicy::Error`, a committed offset outside the log reaches the stream as an
/// error, again while nothing moves it, instead of being asked for again and again unseen.
#[tokio::test]
async fn a_committed_offset_out_of_range_with_reset_policy_error_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    produce(&client, "t", 0, &["only".to_owned()], 1).await;
    // A member commits an offset past the log's end, then leaves.
    let Response::ConsumerGroupHeartbeat(joined) = client
        .send(ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            topics: Some(vec!["t".into()]),
            ..Default::default()
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let Response::CommitOffsets(committed) = client
        .send(CommitOffsetsRequest {
            group_id: "g".into(),
            member_id: joined.member_id.clone(),
            member_epoch: joined.member_epoch,
            topics: vec![CommitTopic {
                name: "t".into(),
                partitions: vec![CommitPartition {
                    partition: 0,
                    offset: 1_000,
                    metadata: None,
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        committed.topics[0].partitions[0].error_code,
        ErrorCode::None
    );
    let Response::LeaveGroup(_) = client
        .send(LeaveGroupRequest {
            group_id: "g".into(),
            member_id: joined.member_id,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .reset_policy(ResetPolicy::Error)
        .build()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0..2 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, consumer.next()).await {
            Ok(Some(Err(sluice_client::Error::Broker {
                code: ErrorCode::OffsetOutOfRange,
                ..
            }))) => {}
            other => panic!("attempt {attempt}: expected OffsetOutOfRange, got {other:?}"),
        }
    }
    // A seek moves it on.
    consumer.seek("t", 0, Seek::Earliest).await.unwrap();
    assert_eq!(take(&mut consumer, 1).await[0].2, "only");
    consumer.close().await.unwrap();
    broker.shutdown().await;
}

/// A member whose heartbeats go unanswered for a whole session timeout (its broker gone) stops
/// handing out the records it had fetched: the broker has expired it by then, and its
/// partitions are another member's to read from the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_unheard_for_a_session_stops_handing_out_what_it_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    create_topic(&client, "t", 1).await;
    let values: Vec<String> = (0..200).map(|index| format!("v{index}")).collect();
    produce(&client, "t", 0, &values, 200).await;
    let mut consumer = client
        .consumer()
        .group("g")
        .topics(["t"])
        .session_timeout(Duration::from_secs(6))
        .commit_mode(CommitMode::Manual)
        .build()
        .await
        .unwrap();
    assert_eq!(take(&mut consumer, 1).await[0].1, 0);
    assert_eq!(consumer.assignment().len(), 1);
    // The rest of the batch is in the consumer, handed out without waiting for the broker.
    match futures::FutureExt::now_or_never(consumer.next()) {
        Some(Some(Ok(record))) => assert_eq!(record.offset, 1),
        other => panic!("expected a buffered record, got {other:?}"),
    }
    broker.shutdown().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !consumer.assignment().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the member kept its partitions with no heartbeat answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other 198 records were fetched in the same batch; none is handed out now.
    match futures::FutureExt::now_or_never(consumer.next()) {
        None | Some(Some(Err(_))) => {}
        Some(other) => panic!("expected nothing, got {other:?}"),
    }
    consumer.close_without_commit().await;
}

#[tokio::test]
async fn a_zero_session_timeout_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, client) = start(dir.path()).await;
    let refused = client
        .consumer()
        .group("g")
        .topics(["t"])
        .session_timeout(Duration::ZERO)
        .build()
        .await;
    assert!(
        matches!(refused, Err(sluice_client::Error::Usage(_))),
        "{:?}",
        refused.err()
    );
    broker.shutdown().await;
}
