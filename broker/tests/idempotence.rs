//! Idempotent producers: a real broker on ephemeral ports driven over TCP (the rules are the
//! same over QUIC; the transports share the handlers), and a partition log's producer state
//! rebuilt from snapshot + log after a crash.

mod support;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_broker::producers::{BatchMetadata, ProducerEntry};
use sluice_broker::storage::faultfs::FaultFs;
use sluice_broker::storage::fs::{FileSystem, write_file_durably};
use sluice_broker::storage::{
    FsyncPolicy, LogConfig, PartitionLog, Storage, StorageError, StorageOptions,
};
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::Connection;
use sluice_protocol::batch::split_batches;
use sluice_protocol::messages::*;
use sluice_protocol::{ErrorCode, RecordBatch, RecordBatchBuilder, Response};
use support::create_topic;

async fn start_with(config: Config) -> (BrokerHandle, Connection) {
    let broker = Broker::start(config).await.expect("broker starts");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    (broker, connection)
}

async fn start(data_dir: &Path) -> (BrokerHandle, Connection) {
    start_with(Config::on_loopback(data_dir)).await
}

async fn restart(
    broker: BrokerHandle,
    connection: Connection,
    data_dir: &Path,
) -> (BrokerHandle, Connection) {
    drop(connection);
    broker.shutdown().await;
    start(data_dir).await
}

fn record_batch(producer: (u64, u16), sequence: u64, values: &[&str]) -> RecordBatch {
    let mut builder = RecordBatchBuilder::new().producer(producer.0, producer.1, sequence);
    for (index, value) in values.iter().enumerate() {
        builder.append(
            1_700_000_000_000 + index as i64,
            None,
            value.as_bytes(),
            &[],
        );
    }
    builder.build()
}

async fn init(connection: &Connection, name: Option<&str>) -> InitProducerIdResponse {
    let response = connection
        .send(InitProducerIdRequest {
            producer_name: name.map(str::to_owned),
            current: None,
        })
        .await
        .expect("init producer id");
    let Response::InitProducerId(response) = response else {
        panic!("wrong response {response:?}")
    };
    response
}

/// Inits and returns (id, epoch), checking it succeeded.
async fn producer(connection: &Connection, name: Option<&str>) -> (u64, u16) {
    let response = init(connection, name).await;
    assert_eq!(response.error_code, ErrorCode::None, "{response:?}");
    (response.producer_id, response.producer_epoch)
}

async fn produce(
    connection: &Connection,
    topic: &str,
    partition: u32,
    batch: &RecordBatch,
) -> ProducePartitionResponse {
    let response = connection
        .send(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition,
                    records: batch.as_bytes().clone(),
                }],
            }],
        })
        .await
        .expect("produce");
    let Response::Produce(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    response.topics.remove(0).partitions.remove(0)
}

/// Produces and returns the base offset, checking it succeeded.
async fn produce_ok(
    connection: &Connection,
    topic: &str,
    partition: u32,
    batch: &RecordBatch,
) -> u64 {
    let response = produce(connection, topic, partition, batch).await;
    assert_eq!(response.error_code, ErrorCode::None, "{response:?}");
    response.base_offset
}

/// Every record of a partition as (offset, value).
async fn stored(connection: &Connection, topic: &str, partition: u32) -> Vec<(u64, String)> {
    let response = connection
        .send(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 1 << 20,
            topics: vec![FetchTopic {
                name: topic.into(),
                partitions: vec![FetchPartition {
                    partition,
                    fetch_offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }],
        })
        .await
        .expect("fetch");
    let Response::Fetch(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    let partition = response.topics.remove(0).partitions.remove(0);
    assert_eq!(partition.error_code, ErrorCode::None);
    let mut out = Vec::new();
    for batch in split_batches(&partition.records) {
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

fn owned(records: &[(u64, &str)]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|(offset, value)| (*offset, (*value).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_retried_batch_is_stored_once_and_answered_with_its_original_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "orders", 1).await;
    let mut plain = RecordBatchBuilder::new();
    plain.append(1, None, b"plain", &[]);
    let plain = plain.build();
    assert_eq!(produce_ok(&connection, "orders", 0, &plain).await, 0);

    let id = producer(&connection, None).await;
    let first = record_batch(id, 0, &["a", "b"]);
    let second = record_batch(id, 2, &["c"]);
    assert_eq!(produce_ok(&connection, "orders", 0, &first).await, 1);
    assert_eq!(produce_ok(&connection, "orders", 0, &second).await, 3);
    // Retries, as after a lost response: success with the original offsets.
    assert_eq!(produce_ok(&connection, "orders", 0, &first).await, 1);
    assert_eq!(produce_ok(&connection, "orders", 0, &second).await, 3);
    let expected = owned(&[(0, "plain"), (1, "a"), (2, "b"), (3, "c")]);
    assert_eq!(stored(&connection, "orders", 0).await, expected);

    // Across a restart, the state comes back from the snapshot written at shutdown.
    let (broker, connection) = restart(broker, connection, dir.path()).await;
    assert_eq!(produce_ok(&connection, "orders", 0, &second).await, 3);
    assert_eq!(produce_ok(&connection, "orders", 0, &first).await, 1);
    assert_eq!(stored(&connection, "orders", 0).await, expected);
    // And the producer continues where it was.
    let third = record_batch(id, 3, &["d"]);
    assert_eq!(produce_ok(&connection, "orders", 0, &third).await, 4);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_gap_or_an_unknown_producer_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "orders", 2).await;
    let id = producer(&connection, None).await;
    assert_eq!(
        produce_ok(&connection, "orders", 0, &record_batch(id, 0, &["a"])).await,
        0
    );
    let gap = produce(&connection, "orders", 0, &record_batch(id, 2, &["c"])).await;
    assert_eq!(gap.error_code, ErrorCode::OutOfOrderSequence);
    assert!(gap.error_message.unwrap().contains("1 is next"));
    // On a partition where the producer has no state yet, it must start at 0.
    let unknown = produce(&connection, "orders", 1, &record_batch(id, 5, &["x"])).await;
    assert_eq!(unknown.error_code, ErrorCode::UnknownProducerId);
    // An id this broker never handed out.
    let forged = produce(
        &connection,
        "orders",
        1,
        &record_batch((id.0 + 5000, 0), 0, &["x"]),
    )
    .await;
    assert_eq!(forged.error_code, ErrorCode::UnknownProducerId);
    assert_eq!(stored(&connection, "orders", 0).await, owned(&[(0, "a")]));
    assert_eq!(stored(&connection, "orders", 1).await, owned(&[]));
    // The producer fills the gap and goes on.
    assert_eq!(
        produce_ok(&connection, "orders", 0, &record_batch(id, 1, &["b"])).await,
        1
    );
    assert_eq!(
        produce_ok(&connection, "orders", 0, &record_batch(id, 2, &["c"])).await,
        2
    );
    broker.shutdown().await;
}

/// A producer without a name that takes a new id (a batch's outcome was unknown to it) has
/// its old id fenced: a copy of its old batch still on its way is refused, not appended after
/// the new id's batches. Other producers are left alone, named ones too.
#[tokio::test]
async fn an_unnamed_producers_old_id_is_fenced_when_it_takes_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "orders", 1).await;
    let old = producer(&connection, None).await;
    let bystander = producer(&connection, None).await;
    let named = producer(&connection, Some("relay")).await;
    produce_ok(&connection, "orders", 0, &record_batch(old, 0, &["a"])).await;
    produce_ok(
        &connection,
        "orders",
        0,
        &record_batch(bystander, 0, &["b"]),
    )
    .await;
    produce_ok(&connection, "orders", 0, &record_batch(named, 0, &["c"])).await;

    let asked = |current: (u64, u16)| InitProducerIdRequest {
        producer_name: None,
        current: Some(ProducerIdAndEpoch {
            producer_id: current.0,
            producer_epoch: current.1,
        }),
    };
    let Response::InitProducerId(renewed) = connection.send(asked(old)).await.unwrap() else {
        panic!("wrong response")
    };
    assert_eq!(renewed.error_code, ErrorCode::None);
    let new = (renewed.producer_id, renewed.producer_epoch);
    assert_ne!(new.0, old.0, "a fresh id");
    produce_ok(&connection, "orders", 0, &record_batch(new, 0, &["d"])).await;
    let late = produce(&connection, "orders", 0, &record_batch(old, 1, &["stale"])).await;
    assert_eq!(late.error_code, ErrorCode::ProducerFenced, "{late:?}");

    // Naming another producer's id fences nobody but an unnamed one: a named producer's id,
    // or one never issued, is left alone.
    for current in [named, (new.0 + 1_000, 0)] {
        let Response::InitProducerId(answer) = connection.send(asked(current)).await.unwrap()
        else {
            panic!("wrong response")
        };
        assert_eq!(answer.error_code, ErrorCode::None);
    }
    produce_ok(&connection, "orders", 0, &record_batch(named, 1, &["e"])).await;
    produce_ok(
        &connection,
        "orders",
        0,
        &record_batch(bystander, 1, &["f"]),
    )
    .await;
    assert_eq!(
        stored(&connection, "orders", 0).await,
        owned(&[(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e"), (5, "f")])
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_named_producer_restarts_with_its_id_a_higher_epoch_and_its_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "orders", 3).await;
    create_topic(&connection, "audit", 1).await;
    let old = init(&connection, Some("outbox-relay")).await;
    assert_eq!(old.error_code, ErrorCode::None);
    assert_eq!(old.producer_epoch, 0);
    assert!(old.sequences.is_empty());
    let old_id = (old.producer_id, old.producer_epoch);
    produce_ok(
        &connection,
        "orders",
        0,
        &record_batch(old_id, 0, &["a", "b", "c"]),
    )
    .await;
    produce_ok(&connection, "orders", 2, &record_batch(old_id, 0, &["x"])).await;
    produce_ok(&connection, "orders", 2, &record_batch(old_id, 1, &["y"])).await;
    produce_ok(&connection, "audit", 0, &record_batch(old_id, 0, &["z"])).await;

    // The new instance: same id, next epoch, and where every partition continues.
    let new = init(&connection, Some("outbox-relay")).await;
    assert_eq!(new.error_code, ErrorCode::None);
    assert_eq!(new.producer_id, old.producer_id);
    assert_eq!(new.producer_epoch, 1);
    let mut sequences = new.sequences.clone();
    sequences.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(
        sequences,
        vec![
            TopicSequences {
                topic: "audit".into(),
                partitions: vec![PartitionSequence {
                    partition: 0,
                    next_sequence: 1
                }],
            },
            TopicSequences {
                topic: "orders".into(),
                partitions: vec![
                    PartitionSequence {
                        partition: 0,
                        next_sequence: 3
                    },
                    PartitionSequence {
                        partition: 2,
                        next_sequence: 2
                    },
                ],
            },
        ]
    );
    let new_id = (new.producer_id, new.producer_epoch);

    // The old instance is fenced everywhere, even where it never produced.
    for (topic, partition, sequence) in [("orders", 0, 3), ("orders", 1, 0), ("audit", 0, 1)] {
        let response = produce(
            &connection,
            topic,
            partition,
            &record_batch(old_id, sequence, &["zombie"]),
        )
        .await;
        assert_eq!(
            response.error_code,
            ErrorCode::ProducerFenced,
            "{topic}/{partition}"
        );
    }
    // An epoch never issued is refused too.
    let ahead = produce(
        &connection,
        "orders",
        0,
        &record_batch((new_id.0, 2), 3, &["?"]),
    )
    .await;
    assert_eq!(ahead.error_code, ErrorCode::UnknownProducerId);

    // The new instance continues without a gap or a duplicate.
    assert_eq!(
        produce_ok(&connection, "orders", 0, &record_batch(new_id, 3, &["d"])).await,
        3
    );
    assert_eq!(
        produce_ok(&connection, "orders", 1, &record_batch(new_id, 0, &["e"])).await,
        0
    );
    assert_eq!(
        stored(&connection, "orders", 0).await,
        owned(&[(0, "a"), (1, "b"), (2, "c"), (3, "d")])
    );

    // After a restart the name still maps to the id, the fence holds, and the epoch goes on.
    let (broker, connection) = restart(broker, connection, dir.path()).await;
    let zombie = produce(
        &connection,
        "orders",
        0,
        &record_batch(old_id, 4, &["zombie"]),
    )
    .await;
    assert_eq!(zombie.error_code, ErrorCode::ProducerFenced);
    let third = init(&connection, Some("outbox-relay")).await;
    assert_eq!(
        (third.producer_id, third.producer_epoch),
        (old.producer_id, 2)
    );
    let orders = third
        .sequences
        .iter()
        .find(|topic| topic.topic == "orders")
        .unwrap();
    assert_eq!(
        orders.partitions,
        vec![
            PartitionSequence {
                partition: 0,
                next_sequence: 4
            },
            PartitionSequence {
                partition: 1,
                next_sequence: 1
            },
            PartitionSequence {
                partition: 2,
                next_sequence: 2
            },
        ]
    );
    let fenced = produce(
        &connection,
        "orders",
        0,
        &record_batch(new_id, 4, &["late"]),
    )
    .await;
    assert_eq!(fenced.error_code, ErrorCode::ProducerFenced);
    // A different name is a different producer.
    let other = producer(&connection, Some("billing")).await;
    assert_ne!(other.0, old.producer_id);
    assert_eq!(other.1, 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn producer_ids_are_never_handed_out_twice_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5 {
        assert!(seen.insert(producer(&connection, None).await.0));
    }
    let named = producer(&connection, Some("relay")).await;
    assert!(seen.insert(named.0));
    let highest_before = *seen.last().unwrap();
    let (broker, connection) = restart(broker, connection, dir.path()).await;
    for _ in 0..5 {
        let (id, epoch) = producer(&connection, None).await;
        assert_eq!(epoch, 0);
        assert!(
            id > highest_before,
            "id {id} may have been handed out before"
        );
        assert!(seen.insert(id), "id {id} handed out again");
    }
    assert_eq!(producer(&connection, Some("relay")).await, (named.0, 1));
    broker.shutdown().await;
}

#[tokio::test]
async fn the_producer_table_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.max_producers = 2;
    let (broker, connection) = start_with(config).await;
    create_topic(&connection, "orders", 1).await;
    let first = producer(&connection, None).await;
    let second = producer(&connection, None).await;
    let third = producer(&connection, None).await;
    produce_ok(&connection, "orders", 0, &record_batch(first, 0, &["1"])).await;
    produce_ok(&connection, "orders", 0, &record_batch(second, 0, &["2"])).await;
    let refused = produce(&connection, "orders", 0, &record_batch(third, 0, &["3"])).await;
    assert_eq!(refused.error_code, ErrorCode::LimitExceeded);
    assert!(refused.error_message.unwrap().contains("max_producers"));
    // Producers already known keep going; nothing of the refused batch was written.
    produce_ok(&connection, "orders", 0, &record_batch(first, 1, &["1b"])).await;
    assert_eq!(
        stored(&connection, "orders", 0).await,
        owned(&[(0, "1"), (1, "2"), (2, "1b")])
    );
    assert_eq!(broker.state().storage.producer_count(), 2);
    // Names are bounded by the same limit.
    producer(&connection, Some("a")).await;
    producer(&connection, Some("b")).await;
    assert_eq!(
        init(&connection, Some("c")).await.error_code,
        ErrorCode::LimitExceeded
    );
    broker.shutdown().await;
}

// Storage level: the state a partition log rebuilds on open.

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 256,
        max_message_bytes: 2048,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn storage(fs: &FaultFs) -> Storage {
    Storage::new(
        Arc::new(fs.clone()),
        StorageOptions {
            fsync: FsyncPolicy::Never,
            ..StorageOptions::default()
        },
    )
}

/// A partition's producer state without the broker-clock idle times, which recovery sets
/// anew for what it reads from the log.
fn comparable(log: &PartitionLog) -> Vec<(u64, u16, Vec<BatchMetadata>)> {
    log.producer_state()
        .into_iter()
        .map(|(id, entry): (u64, ProducerEntry)| {
            (id, entry.producer_epoch, entry.batches().copied().collect())
        })
        .collect()
}

fn never_fenced(_producer_id: u64) -> u16 {
    0
}

fn snapshots(fs: &FaultFs, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs
        .read_dir(dir)
        .unwrap()
        .into_iter()
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "snapshot")
        })
        .collect();
    out.sort();
    out
}

/// Appends interleaved batches of three producers and plain batches over many segment rolls.
fn fill(log: &Arc<PartitionLog>, producers: Range<u64>, rounds: Range<u64>) {
    for round in rounds {
        for producer in producers.clone() {
            let batch = record_batch((producer, 0), round * 2, &["0123456789", "abcdefghij"]);
            let appended = log.append_idempotent(batch, &never_fenced).unwrap();
            assert!(!appended.duplicate);
        }
        let mut plain = RecordBatchBuilder::new();
        plain.append(1, None, b"plain", &[]);
        log.append(plain.build()).unwrap();
    }
}

#[tokio::test]
async fn rebuilding_from_snapshot_and_log_gives_the_state_before_the_crash() {
    let fs = FaultFs::new();
    let dir = PathBuf::from("/data/topics/t/0");
    let storage_before = storage(&fs);
    let log = storage_before.open_log(&dir, small_segments()).unwrap();
    const ROUNDS: u64 = 50;
    fill(&log, 0..3, 0..ROUNDS);
    assert!(log.segment_count() >= 4, "the test needs rolls");
    // InitProducerId fences producer 0 at epoch 3. Only snapshots taken after that know it (its
    // batches in the log say epoch 0), which tells a rebuild from a snapshot apart from one
    // from the log alone.
    assert_eq!(log.fence_producer(0, 3), Some(ROUNDS * 2));
    let segments = log.segment_count();
    fill(&log, 1..3, ROUNDS..ROUNDS + 20);
    assert!(
        log.segment_count() >= segments + 2,
        "both kept snapshots are after the fence"
    );
    let before = comparable(&log);
    assert_eq!(before.len(), 3);
    assert_eq!(before[0].1, 3);
    log.wait_durable(log.latest_offset()).await.unwrap();
    // Stopping the flusher runs the snapshot writes it has queued; the log is not closed, so
    // no snapshot at its end: recovery must read the batches after the last roll.
    storage_before.shutdown();
    let end = log.latest_offset();
    let newest = snapshots(&fs, &dir);
    assert_eq!(newest.len(), 2, "the newest two are kept: {newest:?}");
    fs.crash();
    drop(log);

    let storage_after = storage(&fs);
    let log = storage_after.open_log(&dir, small_segments()).unwrap();
    assert_eq!(log.latest_offset(), end);
    assert_eq!(comparable(&log), before, "from the newest snapshot + log");
    drop(log);

    // Damage the newest snapshot: recovery falls back to the older one and reads more.
    let newest_path = newest.last().unwrap().clone();
    let mut bytes = fs.read_durable(&newest_path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    write_file_durably(&fs, &newest_path, &bytes).unwrap();
    let log = storage_after.open_log(&dir, small_segments()).unwrap();
    assert_eq!(comparable(&log), before, "from the older snapshot + log");
    drop(log);

    // Without any snapshot, from the whole log.
    for path in snapshots(&fs, &dir) {
        fs.remove_file(&path).unwrap();
    }
    let log = storage_after.open_log(&dir, small_segments()).unwrap();
    let mut from_log = before.clone();
    from_log[0].1 = 0;
    assert_eq!(comparable(&log), from_log, "from the log alone");

    // The rebuilt state answers retries and continues the sequences.
    let retry = record_batch((1, 0), (ROUNDS + 19) * 2, &["0123456789", "abcdefghij"]);
    let appended = log.append_idempotent(retry, &never_fenced).unwrap();
    assert!(appended.duplicate);
    let next = record_batch((1, 0), (ROUNDS + 20) * 2, &["next"]);
    assert!(
        !log.append_idempotent(next, &never_fenced)
            .unwrap()
            .duplicate
    );
    storage_after.shutdown();
}

#[tokio::test]
async fn batches_lost_in_a_crash_are_accepted_again_not_taken_for_retries() {
    let fs = FaultFs::new();
    let dir = PathBuf::from("/data/topics/t/0");
    let storage = storage(&fs);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    let durable = log
        .append_idempotent(record_batch((7, 0), 0, &["kept"]), &never_fenced)
        .unwrap();
    log.wait_durable(durable.info.last_offset + 1)
        .await
        .unwrap();
    // A close writes a snapshot at the end of the log; then one more batch that never
    // reaches the disk.
    log.close().unwrap();
    drop(log);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    let lost = record_batch((7, 0), 1, &["lost"]);
    log.append_idempotent(lost.clone(), &never_fenced).unwrap();
    fs.crash();
    drop(log);

    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert_eq!(log.latest_offset(), 1);
    // The durable batch is a retry; the lost one is new again and is written.
    let retry = log
        .append_idempotent(record_batch((7, 0), 0, &["kept"]), &never_fenced)
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.info.base_offset, 0);
    let again = log.append_idempotent(lost, &never_fenced).unwrap();
    assert!(!again.duplicate);
    assert_eq!(again.info.base_offset, 1);
    // Fencing through the broker-wide epoch, checked under the writer lock.
    let fenced = log
        .append_idempotent(record_batch((7, 0), 2, &["zombie"]), &|_| 1)
        .unwrap_err();
    assert!(matches!(fenced, StorageError::Producer(_)), "{fenced}");
    assert_eq!(fenced.error_code(), ErrorCode::ProducerFenced);
    assert_eq!(log.latest_offset(), 2);
    storage.shutdown();
}

#[tokio::test]
async fn a_snapshot_that_does_not_match_the_log_is_ignored() {
    let fs = FaultFs::new();
    let storage = storage(&fs);
    let (dir_a, dir_b) = (
        PathBuf::from("/data/topics/a/0"),
        PathBuf::from("/data/topics/b/0"),
    );
    let log = storage.open_log(&dir_a, small_segments()).unwrap();
    log.append_idempotent(record_batch((7, 0), 0, &["a"]), &never_fenced)
        .unwrap();
    log.close().unwrap();
    let log = storage.open_log(&dir_b, small_segments()).unwrap();
    log.append_idempotent(record_batch((8, 0), 0, &["b"]), &never_fenced)
        .unwrap();
    log.wait_durable(1).await.unwrap();
    fs.crash();
    drop(log);
    // A snapshot of the same offset, describing another log: as a crash could leave one that
    // describes batches it then took away, and the same offsets were written again since.
    let [snapshot] = snapshots(&fs, &dir_a).try_into().unwrap();
    let bytes = fs.read_durable(&snapshot).unwrap();
    write_file_durably(&fs, &dir_b.join(snapshot.file_name().unwrap()), &bytes).unwrap();
    let log = storage.open_log(&dir_b, small_segments()).unwrap();
    let state = comparable(&log);
    assert_eq!(state.len(), 1);
    assert_eq!(
        state[0].0, 8,
        "rebuilt from the log, not the foreign snapshot"
    );
    assert!(
        snapshots(&fs, &dir_b).is_empty(),
        "the mismatched snapshot is removed"
    );
    storage.shutdown();
}
