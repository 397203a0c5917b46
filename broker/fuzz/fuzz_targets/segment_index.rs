//! Arbitrary bytes as the `.index` and `.timeindex` files of a closed segment, checked against
//! a segment size and offset span taken from the input. Nothing may panic; an index that is
//! accepted must encode back to the same files, and every lookup must land inside the segment.
//!
//! Input: `size_bytes u32, record_span u16, offsets_length u16, offsets..., times...`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::storage::index::SegmentIndex;

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..8) else {
        return;
    };
    let size_bytes = u64::from(u32::from_be_bytes(header[..4].try_into().unwrap()));
    let record_span = u64::from(u16::from_be_bytes([header[4], header[5]]));
    let offsets_length = usize::from(u16::from_be_bytes([header[6], header[7]]));
    let rest = &data[8..];
    let (offsets, times) = rest.split_at(offsets_length.min(rest.len()));
    let Some(index) = SegmentIndex::decode_closed(offsets, times, size_bytes, record_span) else {
        return;
    };
    assert_eq!(
        index.encode_offsets(),
        offsets,
        "offsets changed in a round trip"
    );
    assert_eq!(index.encode_times(), times, "times changed in a round trip");
    for relative_offset in [
        0,
        1,
        record_span / 2,
        record_span.saturating_sub(1),
        record_span,
    ]
    .into_iter()
    .chain(
        index
            .offset_entries()
            .iter()
            .map(|e| u64::from(e.relative_offset)),
    ) {
        let entry = index.lookup(relative_offset as u32);
        assert!(u64::from(entry.relative_offset) <= relative_offset);
        assert!(entry.position == 0 || u64::from(entry.position) < size_bytes);
    }
    for timestamp in [i64::MIN, -1, 0, 1, i64::MAX] {
        let entry = index.lookup_time(timestamp);
        assert!(entry.position == 0 || u64::from(entry.position) < size_bytes);
    }
});
