//! Storage hot paths on the real disk: append with fsync=never and with durable group commit,
//! concurrent durable appenders sharing fsyncs, and sequential reads from the page cache.
//! `cargo bench -p sluice-benches --bench storage`
//!
//! The data directory is a temporary directory under `$SLUICE_BENCH_DIR` (default: the system
//! temporary directory); put it on the disk you want to measure, not on a tmpfs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::sample_batch;
use sluice_broker::storage::{
    FsyncPolicy, LogConfig, PartitionLog, RealFs, Storage, StorageOptions,
};
use sluice_protocol::RecordBatch;

const RECORDS: usize = 1000;
const SIZES: [(usize, &str); 2] = [(100, "100B"), (1024, "1KiB")];

struct Bench {
    _dir: tempfile::TempDir,
    storage: Storage,
    log: Arc<PartitionLog>,
}

fn open(name: &str) -> Bench {
    let base = std::env::var_os("SLUICE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .expect("temp dir");
    let storage = Storage::new(
        Arc::new(RealFs),
        StorageOptions {
            fsync: FsyncPolicy::Never,
            ..StorageOptions::default()
        },
    );
    let config = LogConfig {
        segment_bytes: 256 << 20,
        retention_bytes: None,
        retention_ms: None,
        max_message_bytes: 2 << 20,
        ..LogConfig::default()
    };
    let log = storage
        .open_log(&dir.path().join("p0"), config)
        .expect("open log");
    Bench {
        _dir: dir,
        storage,
        log,
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.log.close();
        self.storage.shutdown();
    }
}

/// A batch with its own buffer, as the broker gets it from a request frame, so stamping the
/// base offset happens in place.
fn unique(batch: &RecordBatch) -> RecordBatch {
    RecordBatch::new(Bytes::copy_from_slice(batch.as_bytes())).expect("batch")
}

fn append_never(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_fsync_never");
    for (value_bytes, label) in SIZES {
        let batch = sample_batch(RECORDS, value_bytes);
        let bench = open("append-never");
        group.throughput(Throughput::Bytes(batch.size_bytes() as u64));
        group.bench_function(label, |b| {
            b.iter_batched(
                || unique(&batch),
                |batch| bench.log.append(batch).expect("append"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn append_durable(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("append_durable");
    group.sample_size(20);
    // 1,000-record batches (page-cache writes dominate) and 1-record batches (fsync dominates:
    // the case group commit exists for).
    for records in [1000usize, 1] {
        let batch = sample_batch(records, 100);
        for appenders in [1usize, 8] {
            let bench = open("append-durable");
            group.throughput(Throughput::Bytes((batch.size_bytes() * appenders) as u64));
            let mut batches = 0u64;
            let fsyncs_before = bench.log.fsync_count();
            let name = format!("100Bx{records}_{appenders}_appenders");
            group.bench_function(&name, |b| {
                b.iter_custom(|iterations| {
                    let copies: Vec<Vec<RecordBatch>> = (0..appenders)
                        .map(|_| (0..iterations).map(|_| unique(&batch)).collect())
                        .collect();
                    batches += iterations * appenders as u64;
                    let log = Arc::clone(&bench.log);
                    runtime.block_on(async move {
                        let start = Instant::now();
                        let tasks: Vec<_> = copies
                            .into_iter()
                            .map(|mine| {
                                let log = Arc::clone(&log);
                                tokio::spawn(async move {
                                    for batch in mine {
                                        let info = log.append(batch).expect("append");
                                        log.wait_durable(info.last_offset + 1)
                                            .await
                                            .expect("durable");
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("appender");
                        }
                        start.elapsed()
                    })
                })
            });
            let fsyncs = bench.log.fsync_count() - fsyncs_before;
            println!(
                "append_durable/{name}: {fsyncs} fsyncs for {batches} batches = {:.3} fsyncs per batch",
                fsyncs as f64 / batches.max(1) as f64
            );
        }
    }
    group.finish();
}

fn read_page_cache(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_page_cache");
    for (value_bytes, label) in SIZES {
        let batch = sample_batch(RECORDS, value_bytes);
        let bench = open("read");
        let mut written = 0u64;
        while written < 128 << 20 {
            bench.log.append(unique(&batch)).expect("fill");
            written += batch.size_bytes() as u64;
        }
        let end = bench.log.latest_offset();
        let max_bytes = 1 << 20;
        let mut offset = 0u64;
        // One read of about max_bytes per iteration, cycling through the log.
        let probe = bench.log.read(0, max_bytes).expect("read").records.len();
        group.throughput(Throughput::Bytes(probe as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                if offset >= end {
                    offset = 0;
                }
                let read = bench.log.read(offset, max_bytes).expect("read");
                let batches = sluice_protocol::batch::split_batches(&read.records);
                let last = batches
                    .last()
                    .expect("a batch")
                    .expect("whole")
                    .last_offset();
                offset = last + 1;
                black_box(read)
            })
        });
    }
    group.finish();
}

/// A consumer at the end of the log: reads of each of the last 32 one-record batches (100 B)
/// in turn, as fetches at 10,000 msgs/s are; each walks batch headers from the sparse index
/// entry before it.
fn read_tail(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_tail");
    let bench = open("tail");
    let batch = sample_batch(1, 100);
    for _ in 0..10_000 {
        bench.log.append(unique(&batch)).expect("fill");
    }
    let end = bench.log.latest_offset();
    let mut next = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_record_batches", |b| {
        b.iter(|| {
            next = (next + 1) % 32;
            let read = bench.log.read(end - 1 - next, 1 << 20).expect("read");
            assert!(!read.records.is_empty());
            black_box(read)
        })
    });
    group.finish();
}

/// A megabyte read from the page cache and checked (CRC of every batch), as a fetch does:
/// copied into a buffer (`read_appending`, what reads of under 64 KiB do) or mapped in place
/// (`map`, what larger ones do).
fn read_copied_or_mapped(c: &mut Criterion) {
    use sluice_broker::storage::fs::FileSystem;

    let mut group = c.benchmark_group("read_1MiB_checked");
    let base = std::env::var_os("SLUICE_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let file = RealFs
        .open(&dir.path().join("segment"), true)
        .expect("open");
    let batch = sample_batch(RECORDS, 1024);
    let batch_bytes = batch.size_bytes();
    let mut written = 0u64;
    while written < 128 << 20 {
        file.write_all_at(batch.as_bytes(), written).expect("fill");
        written += batch_bytes as u64;
    }
    let batches = written / batch_bytes as u64;
    let check = |bytes: &[u8]| {
        for batch in sluice_protocol::batch::split_batches(bytes) {
            let batch = batch.expect("whole");
            assert_eq!(batch.crc(), batch.computed_crc());
        }
    };
    group.throughput(Throughput::Bytes(batch_bytes as u64));
    let mut next = 0u64;
    let mut position = move || {
        next = (next + 1) % batches;
        next * batch_bytes as u64
    };
    group.bench_function("copied", |b| {
        let mut buffer = bytes::BytesMut::new();
        b.iter(|| {
            buffer.clear();
            file.read_appending(&mut buffer, batch_bytes, position())
                .expect("read");
            check(&buffer);
        })
    });
    group.bench_function("mapped", |b| {
        b.iter(|| {
            let mapped = file
                .map(position(), batch_bytes)
                .expect("maps")
                .expect("read");
            check(&mapped);
            black_box(mapped)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = append_never, append_durable, read_page_cache, read_copied_or_mapped, read_tail
}
criterion_main!(benches);
