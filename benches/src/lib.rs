//! Shared helpers for the benchmarks. The `sluice-bench` tool arrives with the bench issue.

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
