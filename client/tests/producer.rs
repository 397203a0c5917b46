//! The producer against a real broker: keyed partitioning and offsets, batching, flush and
//! close, backpressure while the broker is down, retries across a broker restart with neither
//! duplicates nor gaps, fencing by name, and `acks = none`.
//!
//! Every wait has a deadline; nothing sleeps to synchronise.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use sluice_broker::{Broker, BrokerHandle};
use sluice_client::producer::partitioner::partition_for_key;
use sluice_client::producer::{Acks, Delivery, DeliveryFuture, Record};
use sluice_client::protocol::batch::split_batches;
use sluice_client::protocol::messages::*;
use sluice_client::protocol::{ErrorCode, Response};
use sluice_client::{Client, Error, Producer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any one test may take before it counts as hung.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

mod support;

use support::{config, restart};

async fn start(data_dir: &Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(config(data_dir, "127.0.0.1:0".parse().unwrap()))
        .await
        .expect("broker starts");
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    (broker, client)
}

/// As [`start`], on a port below the ephemeral range, for a test that restarts the broker on
/// the same port (see [`free_port_below_the_ephemeral_range`]). A port taken between the probe
/// and the broker's bind is given up for another.
async fn start_on_a_fixed_port(data_dir: &Path) -> (BrokerHandle, Client) {
    let broker = support::start_on_a_fixed_port(data_dir).await;
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

/// Runs a test body under [`TEST_DEADLINE`].
async fn within_deadline<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, body)
        .await
        .expect("the test finished within its deadline")
}

/// A record as read back from the broker.
#[derive(Clone, Debug)]
struct Stored {
    offset: u64,
    key: Option<Vec<u8>>,
    value: String,
}

/// Everything in a partition: its records, and the record count of each batch.
#[derive(Debug, Default)]
struct PartitionContents {
    records: Vec<Stored>,
    batch_record_counts: Vec<u32>,
    batch_sizes: Vec<usize>,
}

async fn fetch_all(client: &Client, topic: &str, partition: u32) -> PartitionContents {
    let mut contents = PartitionContents::default();
    let mut offset = 0;
    loop {
        let Response::Fetch(mut response) = client
            .send(FetchRequest {
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 4 << 20,
                topics: vec![FetchTopic {
                    name: topic.into(),
                    partitions: vec![FetchPartition {
                        partition,
                        fetch_offset: offset,
                        partition_max_bytes: 4 << 20,
                    }],
                }],
            })
            .await
            .expect("fetch")
        else {
            panic!("wrong response")
        };
        let fetched = response.topics.remove(0).partitions.remove(0);
        assert_eq!(fetched.error_code, ErrorCode::None);
        if fetched.records.is_empty() {
            assert_eq!(
                offset, fetched.high_watermark,
                "nothing more below the high watermark"
            );
            return contents;
        }
        for batch in split_batches(&fetched.records) {
            let batch = batch.expect("whole batch");
            batch.validate().expect("valid batch");
            contents.batch_record_counts.push(batch.record_count());
            contents.batch_sizes.push(batch.size_bytes());
            for record in batch.records() {
                let record = record.expect("record");
                let record_offset = record.offset(batch.base_offset());
                assert_eq!(record_offset, offset, "offsets run without gaps");
                contents.records.push(Stored {
                    offset: record_offset,
                    key: record.key.map(<[u8]>::to_vec),
                    value: String::from_utf8(record.value.to_vec()).expect("UTF-8 value"),
                });
                offset += 1;
            }
        }
    }
}

/// Awaits every future, in order.
async fn deliveries(futures: Vec<DeliveryFuture>) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(futures.len());
    for future in futures {
        out.push(future.await.expect("delivered"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_the_hash_says_in_order_with_their_offsets() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        const PARTITIONS: u32 = 8;
        const RECORDS: usize = 10_000;
        create_topic(&client, "keyed", PARTITIONS).await;
        let producer = client.producer().build().await.expect("producer");
        let mut futures = Vec::with_capacity(RECORDS);
        for index in 0..RECORDS {
            let key = format!("key-{}", index % 1_000);
            let future = producer
                .enqueue(Record::new("keyed", format!("value-{index}")).key(key.clone()))
                .await
                .expect("enqueue");
            assert_eq!(
                future.partition(),
                partition_for_key(key.as_bytes(), PARTITIONS),
                "record {index}"
            );
            futures.push(future);
        }
        let delivered = deliveries(futures).await;
        // Per partition, offsets follow enqueue order from 0 without gaps.
        let mut next_offset = BTreeMap::<u32, u64>::new();
        let mut expected = BTreeMap::<u32, Vec<(u64, String, String)>>::new();
        for (index, delivery) in delivered.iter().enumerate() {
            let next = next_offset.entry(delivery.partition).or_insert(0);
            assert_eq!(delivery.offset, Some(*next), "record {index}");
            *next += 1;
            expected.entry(delivery.partition).or_default().push((
                *next - 1,
                format!("key-{}", index % 1_000),
                format!("value-{index}"),
            ));
        }
        assert_eq!(
            next_offset.len(),
            PARTITIONS as usize,
            "every partition got keys"
        );
        for (partition, expected) in expected {
            let stored = fetch_all(&client, "keyed", partition).await;
            assert_eq!(
                stored.records.len(),
                expected.len(),
                "partition {partition}"
            );
            for (stored, (offset, key, value)) in stored.records.iter().zip(&expected) {
                assert_eq!(stored.offset, *offset);
                assert_eq!(stored.key.as_deref(), Some(key.as_bytes()));
                assert_eq!(&stored.value, value);
            }
        }
        producer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linger_and_batch_bytes_make_multi_record_batches() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "batched", 1).await;
        const BATCH_BYTES: usize = 4_096;
        let producer = client
            .producer()
            .batch_bytes(BATCH_BYTES)
            .linger(Duration::from_millis(200))
            .build()
            .await
            .expect("producer");
        let mut futures = Vec::new();
        for index in 0..1_000 {
            futures.push(
                producer
                    .enqueue(Record::new("batched", format!("record {index:04}")))
                    .await
                    .expect("enqueue"),
            );
        }
        let delivered = deliveries(futures).await;
        let offsets: Vec<u64> = delivered.iter().map(|d| d.offset.unwrap()).collect();
        assert_eq!(offsets, (0..1_000).collect::<Vec<u64>>());
        let stored = fetch_all(&client, "batched", 0).await;
        let values: Vec<&str> = stored.records.iter().map(|r| r.value.as_str()).collect();
        let expected: Vec<String> = (0..1_000)
            .map(|index| format!("record {index:04}"))
            .collect();
        assert_eq!(values, expected);
        // ~20 bytes a record: about 180 fit in 4 KiB, so 1000 records take a handful of
        // batches, each within batch_bytes.
        let batches = stored.batch_record_counts.len();
        assert!(
            (5..=20).contains(&batches),
            "{batches} batches: {:?}",
            stored.batch_record_counts
        );
        assert!(stored.batch_sizes.iter().all(|size| *size <= BATCH_BYTES));
        assert!(
            stored
                .batch_record_counts
                .iter()
                .filter(|count| **count > 100)
                .count()
                >= 4
        );

        // A lone record is sent when its linger runs out, without a flush.
        let lone = producer
            .enqueue(Record::new("batched", "lone"))
            .await
            .expect("enqueue");
        let delivered = tokio::time::timeout(Duration::from_secs(10), lone)
            .await
            .expect("sent after its linger")
            .expect("delivered");
        assert_eq!(delivered.offset, Some(1_000));
        producer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_carries_batches_of_many_partitions() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "wide", 6).await;
        let producer = client
            .producer()
            .linger(Duration::from_secs(60))
            .delivery_timeout(Duration::from_secs(300))
            .build()
            .await
            .expect("producer");
        let mut futures = Vec::new();
        for partition in 0..6 {
            for index in 0..10 {
                futures.push(
                    producer
                        .enqueue(
                            Record::new("wide", format!("{partition}-{index}"))
                                .partition(partition),
                        )
                        .await
                        .expect("enqueue"),
                );
            }
        }
        producer.flush().await.expect("flush");
        for future in futures {
            let delivery = future
                .now_or_never()
                .expect("resolved by flush")
                .expect("delivered");
            assert!(delivery.offset.unwrap() < 10);
        }
        for partition in 0..6 {
            let stored = fetch_all(&client, "wide", partition).await;
            assert_eq!(
                stored.batch_record_counts,
                vec![10],
                "one batch per partition"
            );
        }
        producer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_close_deliver_everything_buffered() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "flushed", 3).await;
        // A linger far longer than the test: only flush and close can send these.
        let producer = client
            .producer()
            .linger(Duration::from_secs(3_600))
            .delivery_timeout(Duration::from_secs(7_200))
            .build()
            .await
            .expect("producer");
        let mut before_flush = Vec::new();
        for index in 0..100 {
            before_flush.push(
                producer
                    .enqueue(Record::new("flushed", format!("a{index}")))
                    .await
                    .expect("enqueue"),
            );
        }
        assert!(producer.buffered_bytes() > 0);
        producer.flush().await.expect("flush");
        for future in before_flush {
            future
                .now_or_never()
                .expect("resolved by flush")
                .expect("delivered");
        }
        let mut before_close = Vec::new();
        for index in 0..100 {
            before_close.push(
                producer
                    .enqueue(Record::new("flushed", format!("b{index}")).key(format!("k{index}")))
                    .await
                    .expect("enqueue"),
            );
        }
        producer.close().await.expect("close");
        for future in before_close {
            future
                .now_or_never()
                .expect("resolved by close")
                .expect("delivered");
        }
        assert_eq!(producer.buffered_bytes(), 0);
        match producer.enqueue(Record::new("flushed", "late")).await {
            Err(Error::Usage(message)) => assert!(message.contains("closed"), "{message}"),
            other => panic!("expected the closed producer to refuse, got {other:?}"),
        }
        let mut stored = 0;
        for partition in 0..3 {
            stored += fetch_all(&client, "flushed", partition).await.records.len();
        }
        assert_eq!(stored, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_makes_enqueue_wait_instead_of_growing() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) = start_on_a_fixed_port(dir.path()).await;
        let tcp = broker.tcp_addr;
        create_topic(&client, "pressure", 1).await;
        const BATCH_BYTES: usize = 1_024;
        const BUFFER_BYTES: usize = 4 * BATCH_BYTES;
        let producer = client
            .producer()
            .batch_bytes(BATCH_BYTES)
            .buffer_bytes(BUFFER_BYTES)
            .linger(Duration::ZERO)
            .build()
            .await
            .expect("producer");
        producer
            .send(Record::new("pressure", "before the outage"))
            .await
            .expect("delivered while the broker is up");

        broker.shutdown().await;
        let value = "x".repeat(100);
        let mut futures = Vec::new();
        // An enqueue that finds room completes when first polled (it takes no lock it must
        // wait for); one that finds the buffer full waits for space, which nothing gives back
        // while the broker is down.
        let (blocked, mut waiting) = loop {
            assert!(futures.len() < 1_000, "the buffer never filled up");
            let mut enqueue = Box::pin(producer.enqueue(Record::new(
                "pressure",
                format!("{:04}{value}", futures.len()),
            )));
            match (&mut enqueue).now_or_never() {
                Some(future) => futures.push(future.expect("enqueue")),
                None => break (futures.len(), enqueue),
            }
            assert!(
                producer.buffered_bytes() <= BUFFER_BYTES,
                "{} bytes buffered, limit {BUFFER_BYTES}",
                producer.buffered_bytes()
            );
        };
        // It keeps waiting while the sender and everything else run, and the buffer does not
        // grow past its limit meanwhile.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            assert!(
                (&mut waiting).now_or_never().is_none(),
                "an enqueue went through with the buffer full and the broker down"
            );
        }
        // About 9 records of 110 bytes fit a 1 KiB batch, and 4 batches the buffer.
        assert!(
            (20..=40).contains(&blocked),
            "blocked after {blocked} records"
        );
        assert!(producer.buffered_bytes() <= BUFFER_BYTES);
        assert!(producer.buffered_bytes() > BUFFER_BYTES - BATCH_BYTES);

        // Once the broker is back, the waiting enqueue goes through, the records go out, and
        // later ones too.
        let _broker = restart(dir.path(), tcp).await;
        futures.push(
            waiting
                .await
                .expect("the waiting enqueue goes through once the broker is back"),
        );
        assert!(producer.buffered_bytes() <= BUFFER_BYTES);
        for index in blocked + 1..blocked + 20 {
            futures.push(
                producer
                    .enqueue(Record::new("pressure", format!("{index:04}{value}")))
                    .await
                    .expect("enqueue after the restart"),
            );
            assert!(producer.buffered_bytes() <= BUFFER_BYTES);
        }
        let delivered = deliveries(futures).await;
        let offsets: Vec<u64> = delivered.iter().map(|d| d.offset.unwrap()).collect();
        assert_eq!(offsets, (1..=(blocked as u64 + 20)).collect::<Vec<u64>>());
        producer.close().await.expect("close");
        let stored = fetch_all(&client, "pressure", 0).await;
        assert_eq!(stored.records.len(), blocked + 21);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_a_broker_restart_leave_no_duplicate_and_no_gap() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, client) = start_on_a_fixed_port(dir.path()).await;
        let tcp = broker.tcp_addr;
        const PARTITIONS: u32 = 4;
        const RECORDS: usize = 3_000;
        create_topic(&client, "restart", PARTITIONS).await;
        let producer = client
            .producer()
            .batch_bytes(2_048)
            .linger(Duration::from_millis(2))
            .build()
            .await
            .expect("producer");

        // The sending task keeps at most 200 records unacknowledged, so production spans the
        // outage, and says when the first third is acknowledged.
        let (third_delivered, third_delivered_signal) = tokio::sync::oneshot::channel();
        let sending = {
            let producer = producer.clone();
            tokio::spawn(async move {
                let mut third_delivered = Some(third_delivered);
                let mut outstanding = std::collections::VecDeque::new();
                let mut delivered = Vec::with_capacity(RECORDS);
                for index in 0..RECORDS {
                    if outstanding.len() == 200 {
                        let future: DeliveryFuture = outstanding.pop_front().unwrap();
                        delivered.push(future.await.expect("delivered"));
                    }
                    if delivered.len() == RECORDS / 3 {
                        let _ = third_delivered.take().map(|signal| signal.send(()));
                    }
                    let record = Record::new("restart", format!("{index:05}"))
                        .key(format!("k{}", index % 16));
                    outstanding.push_back(producer.enqueue(record).await.expect("enqueue"));
                }
                delivered.extend(deliveries(outstanding.into()).await);
                delivered
            })
        };
        third_delivered_signal.await.expect("a third delivered");
        broker.shutdown().await;
        let broker = restart(dir.path(), tcp).await;
        let delivered = sending.await.expect("sending task");
        producer.close().await.expect("close");

        // Every value exactly once, each partition in enqueue order, at the reported offsets.
        let mut seen = vec![0u32; RECORDS];
        for partition in 0..PARTITIONS {
            let stored = fetch_all(&client, "restart", partition).await;
            let mut previous: Option<usize> = None;
            for record in &stored.records {
                let index: usize = record.value.parse().expect("an index");
                seen[index] += 1;
                assert!(previous.is_none_or(|previous| previous < index), "in order");
                previous = Some(index);
                assert_eq!(delivered[index].partition, partition);
                assert_eq!(
                    delivered[index].offset,
                    Some(record.offset),
                    "record {index}"
                );
            }
        }
        let missing: Vec<usize> = (0..RECORDS).filter(|index| seen[*index] == 0).collect();
        let doubled: Vec<usize> = (0..RECORDS).filter(|index| seen[*index] > 1).collect();
        assert!(missing.is_empty(), "missing: {missing:?}");
        assert!(doubled.is_empty(), "written twice: {doubled:?}");
        broker.shutdown().await;
    })
    .await;
}

/// A TCP proxy in front of the broker that can swallow the broker's answers (the requests
/// still reach it) and cut every connection, as a network failure would.
struct Proxy {
    addr: SocketAddr,
    swallow_answers: Arc<AtomicBool>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(broker: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow_answers = Arc::new(AtomicBool::new(false));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (swallow_answers, pumps) = (Arc::clone(&swallow_answers), Arc::clone(&pumps));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(broker).await else {
                        continue;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let swallow = Arc::clone(&swallow_answers);
                    let answers = tokio::spawn(async move {
                        let mut buffer = vec![0; 64 * 1024];
                        while let Ok(read @ 1..) = server_read.read(&mut buffer).await {
                            if !swallow.load(Ordering::SeqCst)
                                && client_write.write_all(&buffer[..read]).await.is_err()
                            {
                                break;
                            }
                        }
                    });
                    pumps.lock().unwrap().extend([requests, answers]);
                }
            })
        };
        Proxy {
            addr,
            swallow_answers,
            pumps,
            accept,
        }
    }

    fn swallow_answers(&self, swallow: bool) {
        self.swallow_answers.store(swallow, Ordering::SeqCst);
    }

    /// Closes every proxied connection; new ones are proxied as before.
    fn cut(&self) {
        for pump in self.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The sum of the partitions' high watermarks, read around the proxy.
async fn high_watermarks(client: &Client, topic: &str, partitions: u32) -> u64 {
    let Response::Fetch(response) = client
        .send(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 1,
            topics: vec![FetchTopic {
                name: topic.into(),
                partitions: (0..partitions)
                    .map(|partition| FetchPartition {
                        partition,
                        fetch_offset: 0,
                        partition_max_bytes: 1,
                    })
                    .collect(),
            }],
        })
        .await
        .expect("fetch")
    else {
        panic!("wrong response")
    };
    response.topics[0]
        .partitions
        .iter()
        .map(|p| p.high_watermark)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_retried_and_the_broker_does_not_write_twice() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, direct) = start(dir.path()).await;
        create_topic(&direct, "lost", 2).await;
        let proxy = Proxy::start(_broker.tcp_addr).await;
        let client = Client::connect(&format!("tcp://{}", proxy.addr))
            .await
            .expect("connect");
        let producer = client.producer().build().await.expect("producer");
        let mut futures = Vec::new();
        for index in 0..10 {
            futures.push(
                producer
                    .enqueue(Record::new("lost", format!("{index:03}")))
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.expect("flush");

        // The broker writes these, but its answers never arrive.
        proxy.swallow_answers(true);
        for index in 10..60 {
            let record = Record::new("lost", format!("{index:03}")).partition(index % 2);
            futures.push(producer.enqueue(record).await.unwrap());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while high_watermarks(&direct, "lost", 2).await < 60 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker never got them"
            );
            tokio::task::yield_now().await;
        }
        assert!(futures[59].partition() < 2);
        // The connection breaks; the producer reconnects and sends the same batches again.
        proxy.swallow_answers(false);
        proxy.cut();
        let delivered = deliveries(futures).await;
        producer.close().await.expect("close");

        let mut values = BTreeMap::new();
        for partition in 0..2 {
            for record in fetch_all(&direct, "lost", partition).await.records {
                let previous = values.insert(record.value.clone(), (partition, record.offset));
                assert!(previous.is_none(), "{} written twice", record.value);
            }
        }
        assert_eq!(values.len(), 60, "every record once");
        for (index, delivery) in delivered.iter().enumerate() {
            let stored = values[&format!("{index:03}")];
            assert_eq!(
                (delivery.partition, delivery.offset.unwrap()),
                stored,
                "record {index}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_with_the_same_name_fences_the_first() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "fenced", 1).await;
        let first = client
            .producer()
            .producer_name("relay")
            .build()
            .await
            .expect("first");
        let delivered = first.send(Record::new("fenced", "one")).await.expect("one");
        assert_eq!(delivered.offset, Some(0));

        let second = client
            .producer()
            .producer_name("relay")
            .build()
            .await
            .expect("second");
        // The second instance continues the partition's sequence where the first stopped.
        let delivered = second
            .send(Record::new("fenced", "two"))
            .await
            .expect("two");
        assert_eq!(delivered.offset, Some(1));

        let is_fenced = |result: &Result<Delivery, Error>| {
            matches!(
                result,
                Err(Error::Broker {
                    code: ErrorCode::ProducerFenced,
                    ..
                })
            )
        };
        let result = first.send(Record::new("fenced", "zombie")).await;
        assert!(
            is_fenced(&result),
            "expected ProducerFenced, got {result:?}"
        );
        if let Err(Error::Broker { message, .. }) = &result {
            let message = message.as_deref().unwrap_or_default();
            assert!(
                message.contains("relay") && message.contains("fenced"),
                "{message}"
            );
        }
        // The fenced producer refuses everything from now on, with the same error.
        let later = first
            .enqueue(Record::new("fenced", "later"))
            .await
            .map(|_| Delivery {
                partition: 0,
                offset: None,
            });
        assert!(is_fenced(&later), "expected ProducerFenced, got {later:?}");
        assert!(matches!(
            first.close().await,
            Err(Error::Broker {
                code: ErrorCode::ProducerFenced,
                ..
            })
        ));

        let delivered = second
            .send(Record::new("fenced", "three"))
            .await
            .expect("three");
        assert_eq!(delivered.offset, Some(2));
        second.close().await.expect("close");
        let stored = fetch_all(&client, "fenced", 0).await;
        let values: Vec<&str> = stored.records.iter().map(|r| r.value.as_str()).collect();
        assert_eq!(values, ["one", "two", "three"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_none_resolves_without_offsets() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "unacked", 1).await;
        assert!(matches!(
            client.producer().acks(Acks::None).build().await,
            Err(Error::Usage(_))
        ));
        let producer: Producer = client
            .producer()
            .acks(Acks::None)
            .idempotence(false)
            .build()
            .await
            .expect("producer");
        let mut futures = Vec::new();
        for index in 0..50 {
            futures.push(
                producer
                    .enqueue(Record::new("unacked", format!("{index}")))
                    .await
                    .expect("enqueue"),
            );
        }
        for delivery in deliveries(futures).await {
            assert_eq!(
                delivery,
                Delivery {
                    partition: 0,
                    offset: None
                }
            );
        }
        producer.close().await.expect("close");
        // Nothing acknowledges them, but the fetch travels on the same connection behind them,
        // and the broker appends a connection's produces before it reads its next request.
        assert_eq!(fetch_all(&client, "unacked", 0).await.records.len(), 50);
    })
    .await;
}

#[tokio::test]
async fn unknown_topics_and_partitions_are_refused_at_enqueue() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        create_topic(&client, "known", 2).await;
        let producer = client.producer().build().await.expect("producer");
        assert!(matches!(
            producer.enqueue(Record::new("missing", "x")).await,
            Err(Error::Broker {
                code: ErrorCode::UnknownTopic,
                ..
            })
        ));
        assert!(matches!(
            producer
                .enqueue(Record::new("known", "x").partition(2))
                .await,
            Err(Error::Broker {
                code: ErrorCode::UnknownPartition,
                ..
            })
        ));
        let delivered = producer
            .send(
                Record::new("known", "x")
                    .partition(1)
                    .header("trace", "t-1"),
            )
            .await
            .expect("delivered");
        assert_eq!(
            delivered,
            Delivery {
                partition: 1,
                offset: Some(0)
            }
        );
        producer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_many_keeps_every_records_partition_offset_and_order() {
    within_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let (_broker, client) = start(dir.path()).await;
        const PARTITIONS: u32 = 4;
        const RECORDS: usize = 5_000;
        create_topic(&client, "many", PARTITIONS).await;
        // Small batches and a small buffer: one call spans many batches and has to wait for
        // buffer space halfway through, letting go of the producer's lock in between.
        let producer = client
            .producer()
            .batch_bytes(4_096)
            .buffer_bytes(64 * 1024)
            .build()
            .await
            .expect("producer");
        // Shared values with borrowed keys, then borrowed values without keys.
        let keys: Vec<String> = (0..100).map(|index| format!("key-{index}")).collect();
        let keyed = producer
            .send_many((0..RECORDS).map(|index| {
                Record::new("many", format!("value-{index}"))
                    .borrowed_key(keys[index % 100].as_bytes())
            }))
            .await
            .expect("keyed records delivered");
        assert_eq!(keyed.len(), RECORDS);
        let keyless_values: Vec<String> = (RECORDS..RECORDS + 3_000)
            .map(|index| format!("value-{index}"))
            .collect();
        let keyless = producer
            .send_many(
                keyless_values
                    .iter()
                    .map(|value| Record::borrowed("many", value.as_bytes())),
            )
            .await
            .expect("keyless records delivered");
        assert_eq!(keyless.len(), 3_000);

        let mut next_offset = BTreeMap::<u32, u64>::new();
        let mut expected = BTreeMap::<u32, Vec<String>>::new();
        for (index, delivery) in keyed.iter().chain(keyless.iter()).enumerate() {
            if index < RECORDS {
                let key = format!("key-{}", index % 100);
                assert_eq!(
                    delivery.partition,
                    partition_for_key(key.as_bytes(), PARTITIONS),
                    "record {index}"
                );
            }
            let next = next_offset.entry(delivery.partition).or_insert(0);
            assert_eq!(delivery.offset, Some(*next), "record {index}");
            *next += 1;
            expected
                .entry(delivery.partition)
                .or_default()
                .push(format!("value-{index}"));
        }
        for (partition, expected) in expected {
            let stored = fetch_all(&client, "many", partition).await;
            let values: Vec<&String> = stored.records.iter().map(|stored| &stored.value).collect();
            assert_eq!(
                values,
                expected.iter().collect::<Vec<_>>(),
                "partition {partition}"
            );
        }

        // A record that cannot be enqueued stops the call there; those before it are sent.
        let refused = producer
            .enqueue_many([
                Record::new("many", "before").partition(0),
                Record::new("many", "nowhere").partition(PARTITIONS),
                Record::new("many", "after").partition(0),
            ])
            .await;
        assert!(
            matches!(
                refused,
                Err(Error::Broker {
                    code: ErrorCode::UnknownPartition,
                    ..
                })
            ),
            "{refused:?}"
        );
        producer.flush().await.expect("flush");
        let partition_zero = fetch_all(&client, "many", 0).await;
        let last: Vec<&str> = partition_zero
            .records
            .iter()
            .rev()
            .take(1)
            .map(|stored| stored.value.as_str())
            .collect();
        assert_eq!(last, ["before"]);
        producer.close().await.expect("close");
    })
    .await;
}
