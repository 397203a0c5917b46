//! Record-batch hot paths: build+encode, decode+validate, CRC32C.
//! `cargo bench -p sluice-benches --bench protocol`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::sample_batch;
use sluice_protocol::{RecordBatchBuilder, RecordBatchRef};

const RECORDS: usize = 1000;
const SIZES: [(usize, &str); 2] = [(100, "100B"), (1024, "1KiB")];

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_encode");
    for (value_bytes, label) in SIZES {
        let bytes = sample_batch(RECORDS, value_bytes).size_bytes();
        let value = vec![0x5a; value_bytes];
        let keys: Vec<String> = (0..RECORDS)
            .map(|index| format!("key-{index:012}"))
            .collect();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                let mut builder = RecordBatchBuilder::with_capacity(bytes);
                for (index, key) in keys.iter().enumerate() {
                    builder.append(
                        1_700_000_000_000 + index as i64,
                        Some(key.as_bytes()),
                        &value,
                        &[],
                    );
                }
                black_box(builder.build())
            })
        });
    }
    group.finish();
}

fn decode_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_decode_validate");
    for (value_bytes, label) in SIZES {
        let batch = sample_batch(RECORDS, value_bytes);
        let bytes = batch.as_bytes().clone();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                let view = RecordBatchRef::new(black_box(&bytes)).unwrap();
                view.validate().unwrap();
                // Touch every record as a consumer would: decode key and value.
                let mut total = 0usize;
                for record in view.records() {
                    let record = record.unwrap();
                    total += record.value.len() + record.key.map_or(0, <[u8]>::len);
                }
                black_box(total)
            })
        });
    }
    group.finish();
}

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for (value_bytes, label) in SIZES {
        let batch = sample_batch(RECORDS, value_bytes);
        let bytes = batch.as_bytes().clone();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        // What batches are checksummed with, beside the faster crc-fast that did not make
        // the pipeline faster (protocol/src/checksum.rs says why).
        group.bench_function(label, |b| {
            b.iter(|| black_box(sluice_protocol::checksum::crc32c(black_box(&bytes))))
        });
        group.bench_function(format!("{label}/crc-fast"), |b| {
            b.iter(|| {
                black_box(crc_fast::checksum(
                    crc_fast::CrcAlgorithm::Crc32Iscsi,
                    black_box(&bytes),
                ))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = encode, decode_validate, crc
}
criterion_main!(benches);
