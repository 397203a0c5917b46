//! Arbitrary bytes as the committed-offsets snapshot (`groups/offsets.snapshot`) and as the
//! key and value of a `__consumer_offsets` record. Nothing may panic; a snapshot that decodes
//! must decode to the same entries after encoding them again.
//!
//! Input: the snapshot; the same bytes split in two at the first byte's position are also
//! decoded as a record's key and value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::fuzzing::{
    decode_offsets_record, decode_offsets_snapshot, encode_offsets_snapshot,
};

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
    if let Some((&split, rest)) = data.split_first() {
        let (key, value) = rest.split_at(usize::from(split).min(rest.len()));
        let _ = decode_offsets_record(key, value);
    }
});

fn check(data: &[u8]) {
    let Some((entries, covered)) = decode_offsets_snapshot(data) else {
        return;
    };
    let encoded = encode_offsets_snapshot(&entries, covered);
    let (again, covered_again) =
        decode_offsets_snapshot(&encoded).expect("an encoded snapshot decodes");
    assert_eq!(covered_again, covered);
    assert_eq!(again, entries, "a snapshot changed in a round trip");
}
