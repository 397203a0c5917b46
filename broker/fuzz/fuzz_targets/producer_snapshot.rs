//! Arbitrary bytes as a producer-state snapshot. Nothing may panic; a snapshot that decodes
//! must encode back to the same bytes, and the state it describes must be one the producer
//! table can work with: checking, fencing, expiring and trimming it never trips an invariant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::producers::state::{
    IncomingBatch, ProducerBudget, ProducerStateTable, decode_snapshot,
};

const EXPIRY_MS: u64 = 1000;

fuzz_target!(|data: &[u8]| {
    check(data);
    // A random CRC almost never matches: check the same bytes with their CRC made right.
    if data.len() >= 4 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 4;
        let crc = sluice_protocol::checksum::crc32c(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_be_bytes());
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let Some(snapshot) = decode_snapshot(data) else {
        return;
    };
    let mut table = ProducerStateTable::new(ProducerBudget::new(usize::MAX), EXPIRY_MS);
    table.load(snapshot.entries.clone());
    assert_eq!(
        table.encode_snapshot(snapshot.offset, snapshot.anchor_crc),
        data,
        "a snapshot changed in a round trip"
    );
    for (producer_id, entry) in &snapshot.entries {
        let newest = entry
            .batches()
            .last()
            .copied()
            .expect("entries hold a batch");
        // The next batch in sequence, a retry of the newest, and one from a stale epoch.
        for incoming in [
            IncomingBatch {
                producer_id: *producer_id,
                producer_epoch: entry.producer_epoch,
                first_sequence: entry.next_sequence(),
                last_offset_delta: 0,
            },
            IncomingBatch {
                producer_id: *producer_id,
                producer_epoch: newest.producer_epoch,
                first_sequence: newest.first_sequence,
                last_offset_delta: u32::try_from(newest.last_sequence - newest.first_sequence)
                    .unwrap_or(u32::MAX),
            },
            IncomingBatch {
                producer_id: *producer_id,
                producer_epoch: entry.producer_epoch.wrapping_sub(1),
                first_sequence: 0,
                last_offset_delta: 0,
            },
        ] {
            let _ = table.check(&incoming, 0, entry.last_seen_ms);
        }
        let _ = table.fence(*producer_id, entry.producer_epoch.saturating_add(1), 0);
    }
    table.remove_below(snapshot.offset / 2);
    table.expire(u64::MAX);
    // Only producers seen (by the snapshot's account) within the expiry of the end of time
    // are left.
    assert!(
        table
            .entries()
            .values()
            .all(|entry| entry.last_seen_ms > u64::MAX - EXPIRY_MS),
        "an idle producer outlived its expiry"
    );
}
