//! Client batching: records through `Producer::enqueue` into batches and out as produce
//! requests, with nothing on the other side but a null broker.
//! `cargo bench -p sluice-benches --bench client`
//!
//! The accumulator is private to the client, so it is measured through the public path it
//! serves: enqueue (partitioner, accumulator, one copy of each record into its batch), the
//! sender task (produce requests) and the connection's writer. The null broker answers
//! Metadata (the producer looks up the partition count once) and discards every other frame
//! unread, so the broker's cost is left out. Producers run with `acks=none` and no idempotence:
//! no answer is awaited, so what is timed is the client turning records into batches and
//! batches into bytes on the socket. Each iteration enqueues [`RECORDS`] records and flushes,
//! one `enqueue` per record or 1,000 borrowed records per `enqueue_many` (the `_enqueue_many`
//! cases: one lock and clock read per call, no reference count per record).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_client::producer::{Acks, Producer, Record};
use sluice_client::{Client, protocol};
use sluice_protocol::messages::{MetadataResponse, PartitionMetadata, TopicMetadata};
use sluice_protocol::{ApiKey, ErrorCode, FrameDecoder, Request, Response, decode_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Records per iteration.
const RECORDS: u64 = 100_000;
const TOPIC: &str = "bench";
const SIZES: [(usize, &str); 2] = [(100, "100B"), (1024, "1KiB")];

/// Serves one connection: answers Metadata for [`TOPIC`] with `partitions` partitions, drops
/// everything else.
async fn serve_null(mut socket: TcpStream, partitions: u32) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut decoder = FrameDecoder::for_requests(protocol::frame::DEFAULT_MAX_FRAME_BYTES);
    let mut buffer = BytesMut::with_capacity(1 << 20);
    loop {
        if socket.read_buf(&mut buffer).await? == 0 {
            return Ok(());
        }
        while let Some(frame) = decoder
            .decode(&mut buffer)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))?
        {
            // The api key is the first field of the header: only Metadata is decoded at all.
            if frame.get(..2) != Some(&ApiKey::Metadata.code().to_be_bytes()[..]) {
                continue;
            }
            let Ok((header, Request::Metadata(_))) = decode_request(frame.freeze()) else {
                continue;
            };
            let response = Response::Metadata(MetadataResponse {
                brokers: Vec::new(),
                topics: vec![TopicMetadata {
                    error_code: ErrorCode::None,
                    name: TOPIC.to_owned(),
                    internal: false,
                    partitions: (0..partitions)
                        .map(|partition| PartitionMetadata {
                            partition,
                            error_code: ErrorCode::None,
                            leader_id: 0,
                        })
                        .collect(),
                }],
            });
            let mut answer = BytesMut::new();
            response.encode_frame(header.correlation_id, &mut answer);
            socket.write_all(&answer).await?;
        }
    }
}

/// A producer connected to a fresh null broker whose topic has `partitions` partitions.
async fn producer(partitions: u32) -> Producer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("tcp://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve_null(socket, partitions));
        }
    });
    let client = Client::connect(&url).await.expect("connect");
    client
        .producer()
        .acks(Acks::None)
        .idempotence(false)
        .build()
        .await
        .expect("producer")
}

/// Records per `enqueue_many` call in the `many` cases.
const RECORDS_PER_CALL: u64 = 1_000;

/// Enqueues `RECORDS` records (keyed over `keys` keys, or keyless when `keys` is 0), one
/// `enqueue` each or, with `many`, `RECORDS_PER_CALL` borrowed records per `enqueue_many`;
/// flushes, and returns how long it took.
async fn enqueue_and_flush(
    producer: &Producer,
    value: &Bytes,
    keys: &[Bytes],
    many: bool,
) -> Duration {
    let start = Instant::now();
    if many {
        for call in 0..RECORDS / RECORDS_PER_CALL {
            let first = call * RECORDS_PER_CALL;
            let records = (first..first + RECORDS_PER_CALL).map(|index| {
                let record = Record::borrowed(TOPIC, value);
                if keys.is_empty() {
                    record
                } else {
                    record.borrowed_key(&keys[index as usize % keys.len()])
                }
            });
            black_box(producer.enqueue_many(records).await.expect("enqueue_many"));
        }
        producer.flush().await.expect("flush");
        return start.elapsed();
    }
    for index in 0..RECORDS {
        let mut record = Record::new(TOPIC, value.clone());
        if !keys.is_empty() {
            record = record.key(keys[index as usize % keys.len()].clone());
        }
        // Fire and forget: the future is dropped, as an application not waiting would.
        black_box(producer.enqueue(record).await.expect("enqueue"));
    }
    producer.flush().await.expect("flush");
    start.elapsed()
}

fn batching(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("producer_batching");
    // (label, partitions, distinct keys): keyless records stick to one partition per batch;
    // keyed ones are hashed across 16 partitions, 16 batches filling at once.
    let shapes: [(&str, u32, usize); 2] = [("keyless", 1, 0), ("keyed_16_partitions", 16, 1024)];
    for (shape, partitions, key_count) in shapes {
        let producer = runtime.block_on(producer(partitions));
        let producer = Arc::new(producer);
        let keys: Vec<Bytes> = (0..key_count)
            .map(|index| Bytes::from(format!("key-{index:012}")))
            .collect();
        for (value_bytes, size_label) in SIZES {
            let value = Bytes::from(vec![0x5a; value_bytes]);
            group.throughput(Throughput::Bytes(RECORDS * value_bytes as u64));
            for (call, many) in [("enqueue", false), ("enqueue_many", true)] {
                group.bench_function(format!("{shape}_{size_label}_{call}"), |b| {
                    b.iter_custom(|iterations| {
                        let producer = Arc::clone(&producer);
                        let (value, keys) = (value.clone(), keys.clone());
                        runtime.block_on(async move {
                            let mut total = Duration::ZERO;
                            for _ in 0..iterations {
                                total += enqueue_and_flush(&producer, &value, &keys, many).await;
                            }
                            total
                        })
                    })
                });
            }
        }
        runtime.block_on(producer.close()).expect("close");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    targets = batching
}
criterion_main!(benches);
