//! The per-record work of record batches, one operation at a time, for instruction counts:
//! steady where wall-clock timings on a shared machine are not.
//!
//! ```text
//! cargo build --release -p sluice-benches --example batch_work
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/batch_work validate 100 200
//! ```
//!
//! `OPERATION` is one of `build` (a producer's appends and the batch's CRC), `validate` (what
//! the broker and the consumer check: CRC and every record), `records` (a consumer decoding
//! every record of a checked batch) or `none` (the fixed cost, to subtract). Each run does
//! `BATCHES` batches of 1,000 keyless records of `VALUE_BYTES` bytes, the shape of
//! `sluice-bench`'s workloads; instructions per record are (Ir of the operation - Ir of
//! `none`) / (BATCHES × 1,000).

use std::hint::black_box;
use std::process::ExitCode;

use sluice_protocol::{RecordBatch, RecordBatchBuilder, RecordBatchRef};

const RECORDS_PER_BATCH: usize = 1000;
const USAGE: &str = "usage: batch_work build|validate|records|none VALUE_BYTES BATCHES";

fn build(value: &[u8]) -> RecordBatch {
    let mut builder = RecordBatchBuilder::with_capacity(RECORDS_PER_BATCH * (value.len() + 16));
    for index in 0..RECORDS_PER_BATCH {
        // A new millisecond every 100 records, as a fast producer's clock moves.
        let timestamp_ms = 1_700_000_000_000 + (index / 100) as i64;
        builder.try_append(usize::MAX, timestamp_ms, None, black_box(value), &[]);
    }
    builder.build()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(operation), Some(Ok(value_bytes)), Some(Ok(batches))) = (
        args.first(),
        args.get(1).map(|arg| arg.parse::<usize>()),
        args.get(2).map(|arg| arg.parse::<usize>()),
    ) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let value = vec![0x5a; value_bytes];
    let batch = build(&value);
    let mut total = 0usize;
    for _ in 0..batches {
        match operation.as_str() {
            "build" => total += build(&value).size_bytes(),
            "validate" => {
                let view = RecordBatchRef::new(black_box(batch.as_bytes())).expect("a batch");
                view.validate().expect("a valid batch");
                total += 1;
            }
            "records" => {
                let view = RecordBatchRef::new(black_box(batch.as_bytes())).expect("a batch");
                for record in view.records() {
                    total += record.expect("a valid record").value.len();
                }
            }
            "none" => total += black_box(1),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    println!("{total}");
    ExitCode::SUCCESS
}
