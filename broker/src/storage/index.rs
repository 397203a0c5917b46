//! Sparse indexes of one segment: relative offset → file position, and timestamp → relative
//! offset.
//!
//! ```text
//! .index       entries of { relative_offset u32, position u32 }         8 bytes, big-endian
//! .timeindex   entries of { max_timestamp_before i64, relative_offset u32 }  12 bytes
//!              each file then ends with { crc32c u32 } of its entries
//! ```
//!
//! An offset entry is added for the first batch written after `index_interval_bytes` have
//! accumulated since the previous entry, so a lookup lands at most that many bytes (plus one
//! batch) before its target. A time entry is added with each offset entry and records the
//! largest timestamp of every batch *before* that offset: when it is below a target time, no
//! earlier batch can hold the answer, so a timestamp lookup may start there. When a segment
//! closes, a last time entry records its largest timestamp, which retention and recovery read.
//!
//! The active segment keeps its index in memory; the files are written durably when the
//! segment rolls and at checkpoints, and rebuilt from the log when they disagree with it. The
//! checksum catches what order and bounds checks cannot: a time entry whose timestamp changed
//! by a bit still reads as ordered, and would start a timestamp lookup past its answer. A file
//! without it (or written before it was added) is rebuilt like any damaged one.

/// Bytes of the CRC-32C that ends each index file, over all of the file before it.
const CHECKSUM_BYTES: usize = 4;

/// `entries`, then their CRC-32C.
fn with_checksum(mut entries: Vec<u8>) -> Vec<u8> {
    let crc = sluice_protocol::checksum::crc32c(&entries);
    entries.extend_from_slice(&crc.to_be_bytes());
    entries
}

/// The entries of an index file, if its checksum matches them.
fn checked_entries(file: &[u8]) -> Option<&[u8]> {
    let (entries, crc) = file.split_at(file.len().checked_sub(CHECKSUM_BYTES)?);
    (sluice_protocol::checksum::crc32c(entries).to_be_bytes()[..] == *crc).then_some(entries)
}

/// Where a batch starts, relative to its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// The largest timestamp of all batches before `relative_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp_before: i64,
    pub relative_offset: u32,
}

const OFFSET_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 12;

/// Both sparse indexes of one segment, and the running state that decides the next entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    offsets: Vec<IndexEntry>,
    times: Vec<TimeEntry>,
    bytes_since_entry: u64,
    /// Largest timestamp of any batch in the segment; `i64::MIN` when empty.
    max_timestamp: Option<i64>,
}

impl SegmentIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a batch about to be written at `position`.
    pub fn on_append(
        &mut self,
        relative_offset: u32,
        position: u32,
        size_bytes: u64,
        max_timestamp: i64,
        index_interval_bytes: u64,
    ) {
        if self.bytes_since_entry >= index_interval_bytes {
            self.offsets.push(IndexEntry {
                relative_offset,
                position,
            });
            self.times.push(TimeEntry {
                max_timestamp_before: self.max_timestamp.unwrap_or(i64::MIN),
                relative_offset,
            });
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += size_bytes;
        self.max_timestamp = Some(
            self.max_timestamp
                .map_or(max_timestamp, |max| max.max(max_timestamp)),
        );
    }

    /// Adds the closing time entry: the segment's largest timestamp, at its end.
    pub fn close(&mut self, next_relative_offset: u32) {
        if let Some(max_timestamp_before) = self.max_timestamp {
            self.times.push(TimeEntry {
                max_timestamp_before,
                relative_offset: next_relative_offset,
            });
        }
    }

    /// Largest timestamp in the segment, if it holds any batch.
    pub fn max_timestamp(&self) -> Option<i64> {
        self.max_timestamp
    }

    /// The entry to start a scan for `relative_offset` from: the last at or before it.
    pub fn lookup(&self, relative_offset: u32) -> IndexEntry {
        let at = self
            .offsets
            .partition_point(|entry| entry.relative_offset <= relative_offset);
        at.checked_sub(1)
            .and_then(|index| self.offsets.get(index).copied())
            .unwrap_or(IndexEntry {
                relative_offset: 0,
                position: 0,
            })
    }

    /// The entry to start a scan for the first batch holding a timestamp at or after
    /// `timestamp_ms`.
    pub fn lookup_time(&self, timestamp_ms: i64) -> IndexEntry {
        let at = self
            .times
            .partition_point(|entry| entry.max_timestamp_before < timestamp_ms);
        match at.checked_sub(1).and_then(|index| self.times.get(index)) {
            Some(entry) => self.lookup(entry.relative_offset),
            None => IndexEntry {
                relative_offset: 0,
                position: 0,
            },
        }
    }

    pub fn offset_entries(&self) -> &[IndexEntry] {
        &self.offsets
    }

    /// The `.index` file: the offset entries and their checksum.
    pub fn encode_offsets(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.offsets.len() * OFFSET_ENTRY_BYTES + CHECKSUM_BYTES);
        for entry in &self.offsets {
            out.extend_from_slice(&entry.relative_offset.to_be_bytes());
            out.extend_from_slice(&entry.position.to_be_bytes());
        }
        with_checksum(out)
    }

    /// The `.timeindex` file: the time entries and their checksum.
    pub fn encode_times(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * TIME_ENTRY_BYTES + CHECKSUM_BYTES);
        for entry in &self.times {
            out.extend_from_slice(&entry.max_timestamp_before.to_be_bytes());
            out.extend_from_slice(&entry.relative_offset.to_be_bytes());
        }
        with_checksum(out)
    }

    /// Reads the index files of a closed segment and checks them against what is known of the
    /// segment: `size_bytes` of log and `record_span` offsets. `None` when a checksum does not
    /// match, or they are torn, out of order or point past the segment: the caller rebuilds
    /// them from the log.
    pub fn decode_closed(
        offsets: &[u8],
        times: &[u8],
        size_bytes: u64,
        record_span: u64,
    ) -> Option<SegmentIndex> {
        let (offsets, times) = (checked_entries(offsets)?, checked_entries(times)?);
        if !offsets.len().is_multiple_of(OFFSET_ENTRY_BYTES)
            || !times.len().is_multiple_of(TIME_ENTRY_BYTES)
        {
            return None;
        }
        let offsets: Vec<IndexEntry> = offsets
            .chunks_exact(OFFSET_ENTRY_BYTES)
            .map(|chunk| IndexEntry {
                relative_offset: u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
                position: u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
            })
            .collect();
        let times: Vec<TimeEntry> = times
            .chunks_exact(TIME_ENTRY_BYTES)
            .map(|chunk| {
                let mut timestamp = [0u8; 8];
                timestamp.copy_from_slice(&chunk[..8]);
                TimeEntry {
                    max_timestamp_before: i64::from_be_bytes(timestamp),
                    relative_offset: u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]),
                }
            })
            .collect();
        let increasing = offsets.windows(2).all(|pair| {
            pair[0].relative_offset < pair[1].relative_offset && pair[0].position < pair[1].position
        }) && times.windows(2).all(|pair| {
            pair[0].relative_offset <= pair[1].relative_offset
                && pair[0].max_timestamp_before <= pair[1].max_timestamp_before
        });
        let within = offsets.iter().all(|entry| {
            u64::from(entry.position) < size_bytes && u64::from(entry.relative_offset) < record_span
        }) && times
            .iter()
            .all(|entry| u64::from(entry.relative_offset) <= record_span);
        // A closed segment ends with the closing time entry; without it the file is torn.
        let closed = record_span == 0
            || times
                .last()
                .is_some_and(|entry| u64::from(entry.relative_offset) == record_span);
        if !(increasing && within && closed) {
            return None;
        }
        let max_timestamp = times.last().map(|entry| entry.max_timestamp_before);
        let mut index = SegmentIndex {
            offsets,
            times,
            bytes_since_entry: 0,
            max_timestamp,
        };
        // The closing entry is not a lookup entry; keep it for max_timestamp only.
        if record_span == 0 {
            index.max_timestamp = None;
        }
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        let mut index = SegmentIndex::new();
        // Ten batches of 100 bytes, 10 records each, timestamps 1000, 1010, ...
        for batch in 0..10u32 {
            index.on_append(
                batch * 10,
                batch * 100,
                100,
                1000 + i64::from(batch) * 10,
                250,
            );
        }
        index
    }

    #[test]
    fn entries_every_interval() {
        let index = sample();
        let positions: Vec<u32> = index.offset_entries().iter().map(|e| e.position).collect();
        assert_eq!(positions, [300, 600, 900]);
        assert_eq!(index.lookup(0).position, 0);
        assert_eq!(index.lookup(29).position, 0);
        assert_eq!(index.lookup(30).position, 300);
        assert_eq!(index.lookup(75).position, 600);
        assert_eq!(index.lookup(1000).position, 900);
    }

    #[test]
    fn time_lookup_never_starts_after_the_answer() {
        let index = sample();
        // Batch k holds timestamp 1000 + 10k; the first batch at or after t must not be skipped.
        for target in 990..1100 {
            let start = index.lookup_time(target);
            let first_batch = ((target - 1000).max(0) as u32).div_ceil(10).min(9);
            assert!(
                start.relative_offset <= first_batch * 10,
                "target {target} starts at {start:?}, answer in batch {first_batch}"
            );
        }
    }

    /// [`sample`] closed at offset 100, and its two files.
    fn closed_sample() -> (SegmentIndex, Vec<u8>, Vec<u8>) {
        let mut index = sample();
        index.close(100);
        let (offsets, times) = (index.encode_offsets(), index.encode_times());
        (index, offsets, times)
    }

    #[test]
    fn closed_index_round_trips_and_rejects_damage() {
        let (index, offsets, times) = closed_sample();
        let decoded = SegmentIndex::decode_closed(&offsets, &times, 1000, 100).unwrap();
        assert_eq!(decoded.offset_entries(), index.offset_entries());
        assert_eq!(decoded.max_timestamp(), Some(1090));
        assert!(SegmentIndex::decode_closed(&offsets[..7], &times, 1000, 100).is_none());
        assert!(SegmentIndex::decode_closed(&offsets, &times, 500, 100).is_none());
        assert!(
            SegmentIndex::decode_closed(&offsets, &times[..times.len() - 12], 1000, 100).is_none()
        );
        let mut swapped = offsets.clone();
        swapped[..8].copy_from_slice(&offsets[8..16]);
        assert!(SegmentIndex::decode_closed(&swapped, &times, 1000, 100).is_none());
        // Out of order behind a valid checksum: the order checks still refuse it.
        let resigned = with_checksum(swapped[..swapped.len() - CHECKSUM_BYTES].to_vec());
        assert!(SegmentIndex::decode_closed(&resigned, &times, 1000, 100).is_none());
        // No checksum at all (an index written before it was added): rebuilt.
        let bare = &times[..times.len() - CHECKSUM_BYTES];
        assert!(SegmentIndex::decode_closed(&offsets, bare, 1000, 100).is_none());
    }

    #[test]
    fn a_time_entry_off_by_a_bit_is_caught() {
        let (_, offsets, mut damaged) = closed_sample();
        // The second entry says the batches before offset 60 reach 1050; one bit less says
        // 1048: still in order, but a lookup for 1049 or 1050 would start past its answer.
        assert_eq!(&damaged[12..20], &1050i64.to_be_bytes());
        damaged[19] ^= 0x02;
        let entries = &damaged[..damaged.len() - CHECKSUM_BYTES];
        let still_ordered = entries.chunks_exact(TIME_ENTRY_BYTES).collect::<Vec<_>>();
        assert!(
            still_ordered
                .windows(2)
                .all(|pair| pair[0][..8] <= pair[1][..8])
        );
        assert!(SegmentIndex::decode_closed(&offsets, &damaged, 1000, 100).is_none());
    }
}
