//! Builds a record batch the way a producer does, stamps it the way the broker does, and reads
//! it back the way a consumer does: `cargo run -p sluice-examples --bin record-batch`.
//!
//! The broker-backed examples (quickstart, consumer group, idempotent consumer, outbox, saga,
//! event sourcing) are in `examples/`: `cargo run -p sluice-examples --example NAME`.

use sluice_protocol::RecordBatchBuilder;
use sluice_protocol::batch::split_batches;

fn main() -> anyhow::Result<()> {
    let mut builder = RecordBatchBuilder::new();
    for (index, city) in ["Lisbon", "Oslo", "Quito"].iter().enumerate() {
        let key = format!("order-{index}");
        builder.append(
            1_700_000_000_000 + index as i64,
            Some(key.as_bytes()),
            city.as_bytes(),
            &[("source", b"example")],
        );
    }
    let batch = builder.build().stamped(42, 0);
    println!(
        "batch: {} records, {} bytes, crc32c {:#010x}",
        batch.record_count(),
        batch.size_bytes(),
        batch.view().crc()
    );

    for view in split_batches(batch.as_bytes()) {
        let view = view?;
        view.validate()?;
        for record in view.records() {
            let record = record?;
            println!(
                "offset {} key {} value {}",
                record.offset(view.base_offset()),
                String::from_utf8_lossy(record.key.unwrap_or_default()),
                String::from_utf8_lossy(record.value),
            );
        }
    }
    Ok(())
}
