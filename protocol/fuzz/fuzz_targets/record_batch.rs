//! Arbitrary bytes as one or more record batches (a fetch response, a segment read): split,
//! validate, iterate records and headers. Nothing may panic; a batch that validates must decode
//! every record, and a batch rebuilt from those records must validate and hold the same records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_protocol::RecordBatchBuilder;
use sluice_protocol::batch::{HEADER_BYTES, batch_size, split_batches};

fuzz_target!(|data: &[u8]| {
    check(data);
    // A random CRC almost never matches, which would keep the fuzzer out of the record decoder:
    // check the same bytes again with the CRC of each leading batch made right.
    let mut fixed = data.to_vec();
    let mut at = 0;
    while let Some(size) = batch_size(&fixed[at..]) {
        let end = at.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        if size < HEADER_BYTES as u64 || end > fixed.len() {
            break;
        }
        let crc = sluice_protocol::checksum::crc32c(&fixed[at + 21..end]);
        fixed[at + 17..at + 21].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
    check(&fixed);
});

fn check(data: &[u8]) {
    for batch in split_batches(data) {
        let Ok(batch) = batch else { break };
        let valid = batch.validate().is_ok();
        let mut rebuilt = RecordBatchBuilder::new();
        let mut all_decoded = true;
        for record in batch.records() {
            let Ok(record) = record else {
                all_decoded = false;
                break;
            };
            let headers: Result<Vec<_>, _> = record.headers().collect();
            let Ok(headers) = headers else {
                all_decoded = false;
                break;
            };
            rebuilt.append(record.timestamp_ms, record.key, record.value, &headers);
        }
        if !valid {
            continue;
        }
        assert!(all_decoded, "a valid batch failed to decode");
        let rebuilt = rebuilt.build();
        rebuilt.validate().expect("a rebuilt batch validates");
        assert_eq!(rebuilt.record_count(), batch.record_count());
        for (original, copy) in batch.records().zip(rebuilt.records()) {
            let (original, copy) = (original.unwrap(), copy.unwrap());
            assert_eq!(original.timestamp_ms, copy.timestamp_ms);
            assert_eq!(original.offset_delta, copy.offset_delta);
            assert_eq!(original.key, copy.key);
            assert_eq!(original.value, copy.value);
            assert!(original.headers().map(Result::unwrap).eq(copy.headers().map(Result::unwrap)));
        }
    }
}
