//! The benchmarks' shared helpers, and the `sluice-bench` tool ([`tool`]).
//!
//! - [`sample_batch`]: record batches as a producer builds them, for the criterion benches in
//!   `benches/` (protocol, storage, client batching, fetch responses, group assignment).
//! - [`tool`]: everything behind `src/bin/sluice-bench.rs`.

pub mod tool;

use sluice_protocol::{RecordBatch, RecordBatchBuilder};

/// A batch of `records` records with `value_bytes`-byte values and 16-byte keys, as a producer
/// would build it.
pub fn sample_batch(records: usize, value_bytes: usize) -> RecordBatch {
    let value = vec![0x5a; value_bytes];
    let mut builder = RecordBatchBuilder::with_capacity(records * (value_bytes + 32));
    for index in 0..records {
        let key = format!("key-{index:012}");
        builder.append(
            1_700_000_000_000 + index as i64,
            Some(key.as_bytes()),
            &value,
            &[],
        );
    }
    builder.build()
}
