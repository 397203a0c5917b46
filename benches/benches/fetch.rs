//! Fetch response assembly: a `FetchResponse` of many partitions, each carrying 1 MiB of record
//! batches, encoded into a response frame.
//! `cargo bench -p sluice-benches --bench fetch`
//!
//! `in_parts` encodes as the broker's connection does: `encode_frame_parts`, whose record
//! batches are parts of their own (shared, not copied), so its cost does not grow with the
//! record bytes. `fresh_buffer` and `presized_buffer` are the copying encoders it replaced,
//! into a new `BytesMut` that grows as it goes or that is reserved at the frame's size first:
//! the bytes/s of either is the ceiling a copying fetch path put on consume throughput.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::sample_batch;
use sluice_protocol::messages::{FetchPartitionResponse, FetchResponse, FetchTopicResponse};
use sluice_protocol::{ErrorCode, Response};

/// Record bytes per partition.
const PARTITION_BYTES: usize = 1 << 20;
const PARTITION_COUNTS: [u32; 3] = [1, 8, 32];

/// About 1 MiB of whole 100-byte-record batches, back to back, as a log read returns them.
fn partition_records() -> Bytes {
    let batch = sample_batch(1000, 100);
    let mut records = BytesMut::with_capacity(PARTITION_BYTES + batch.size_bytes());
    while records.len() + batch.size_bytes() <= PARTITION_BYTES {
        records.extend_from_slice(batch.as_bytes());
    }
    records.freeze()
}

fn response(partitions: u32, records: &Bytes) -> Response {
    Response::Fetch(FetchResponse {
        topics: vec![FetchTopicResponse {
            name: "orders".to_owned(),
            partitions: (0..partitions)
                .map(|partition| FetchPartitionResponse {
                    partition,
                    error_code: ErrorCode::None,
                    high_watermark: 1_000_000,
                    log_start_offset: 0,
                    // Shares the buffer: building the response copies nothing.
                    records: records.clone(),
                })
                .collect(),
        }],
    })
}

fn assembly(c: &mut Criterion) {
    let records = partition_records();
    let mut group = c.benchmark_group("fetch_response_encode");
    for partitions in PARTITION_COUNTS {
        let response = response(partitions, &records);
        let frame_bytes = {
            let mut frame = BytesMut::new();
            response.encode_frame(7, &mut frame);
            frame.len()
        };
        group.throughput(Throughput::Bytes(
            records.len() as u64 * u64::from(partitions),
        ));
        group.bench_function(format!("fresh_buffer_{partitions}_partitions"), |b| {
            b.iter(|| {
                let mut frame = BytesMut::new();
                response.encode_frame(7, &mut frame);
                black_box(frame.freeze())
            })
        });
        group.bench_function(format!("in_parts_{partitions}_partitions"), |b| {
            b.iter(|| black_box(response.encode_frame_parts(7)))
        });
        group.bench_function(format!("presized_buffer_{partitions}_partitions"), |b| {
            b.iter(|| {
                let mut frame = BytesMut::with_capacity(frame_bytes);
                response.encode_frame(7, &mut frame);
                black_box(frame.freeze())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = assembly
}
criterion_main!(benches);
