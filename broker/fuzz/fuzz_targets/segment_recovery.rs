//! Arbitrary bytes as a partition directory, opened by recovery: one or two segment files and
//! a recovery point. Nothing may panic, and what recovery leaves must be a log it could
//! serve: every segment a chain of valid batches with consecutive offsets when it reports no
//! corruption, and opening the same directory again must find the same thing (recovery is
//! idempotent).
//!
//! Input: `mode u8, recovery_point u64, log bytes...`. Mode bits: 0 fix the CRC of each
//! leading batch (a random CRC almost never matches, which would keep the fuzzer out of the
//! batch checks); 1 write a recovery-point file; 2 split the log in two segments at the first
//! batch boundary past its middle; 3 write the recovery-point file as the raw 12 bytes after
//! the mode instead.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use sluice_broker::fuzzing::{RecoveryOutcome, recover};
use sluice_broker::storage::LogConfig;
use sluice_broker::storage::faultfs::FaultFs;
use sluice_broker::storage::fs::{FileSystem, read_file};
use sluice_protocol::batch::{HEADER_BYTES, RecordBatchRef, batch_size};

const HEADER: usize = 9;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let recovery_point = rest
        .get(..8)
        .map_or(0, |bytes| u64::from_be_bytes(bytes.try_into().unwrap()));
    let mut log = data.get(HEADER..).unwrap_or_default().to_vec();
    if mode & 1 != 0 {
        fix_crcs(&mut log);
    }
    let fs = FaultFs::new();
    let dir = Path::new("/data/topics/t/0");
    fs.create_dir_all(dir).unwrap();
    if mode & 2 != 0 {
        let mut bytes = recovery_point.to_be_bytes().to_vec();
        bytes.extend_from_slice(&sluice_protocol::checksum::crc32c(&bytes).to_be_bytes());
        write(&fs, &dir.join("recovery-point"), &bytes);
    } else if mode & 8 != 0 {
        write(
            &fs,
            &dir.join("recovery-point"),
            rest.get(..12).unwrap_or(rest),
        );
    }
    let split = (mode & 4 != 0).then(|| split_point(&log)).flatten();
    match split {
        Some((at, second_base)) => {
            write(&fs, &segment_path(dir, 0), &log[..at]);
            write(&fs, &segment_path(dir, second_base), &log[at..]);
        }
        None => write(&fs, &segment_path(dir, 0), &log),
    }
    let config = LogConfig {
        index_interval_bytes: 128,
        segment_bytes: 1 << 24,
        ..LogConfig::default()
    };

    let Ok(first) = recover(&fs, dir, &config) else {
        return;
    };
    check(&fs, dir, &first);
    let again = recover(&fs, dir, &config).expect("the directory recovered once opens again");
    assert_eq!(first, again, "a second recovery found something else");
});

fn segment_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

fn write(fs: &FaultFs, path: &Path, contents: &[u8]) {
    let file = fs.open(path, true).unwrap();
    file.write_all_at(contents, 0).unwrap();
}

/// Sets the CRC of each batch from the start, for as long as batch lengths fit.
fn fix_crcs(log: &mut [u8]) {
    let mut at = 0;
    while let Some(size) = batch_size(&log[at..]) {
        let end = at.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        if size < HEADER_BYTES as u64 || end > log.len() {
            break;
        }
        let crc = sluice_protocol::checksum::crc32c(&log[at + 21..end]);
        log[at + 17..at + 21].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}

/// The first batch boundary at or past the middle of `log`, and the offset the batch there
/// claims (the next segment's base offset).
fn split_point(log: &[u8]) -> Option<(usize, u64)> {
    let mut at = 0;
    while let Some(size) = batch_size(&log[at..]) {
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        if size < HEADER_BYTES as u64 || end > log.len() {
            return None;
        }
        at = end;
        if at >= log.len() / 2 {
            let base = u64::from_be_bytes(log.get(at..at + 8)?.try_into().ok()?);
            return Some((at, base));
        }
    }
    None
}

/// What recovery left is a log: segments in order, the last active, and without corruption
/// every segment a chain of valid batches with consecutive offsets.
fn check(fs: &FaultFs, dir: &Path, outcome: &RecoveryOutcome) {
    let last = outcome.segments.last().expect("at least one segment");
    assert!(last.active, "the last segment is the active one");
    assert_eq!(last.next_offset, outcome.next_offset);
    assert!(outcome.durable_offset <= outcome.next_offset);
    for pair in outcome.segments.windows(2) {
        assert!(!pair[0].active, "only the last segment is active");
        assert!(pair[0].base_offset < pair[1].base_offset);
        if outcome.corruption.is_none() {
            assert_eq!(
                pair[0].next_offset, pair[1].base_offset,
                "a gap between segments"
            );
        }
    }
    if outcome.corruption.is_some() {
        return;
    }
    assert_eq!(outcome.durable_offset, outcome.next_offset);
    for segment in &outcome.segments {
        let bytes = read_file(fs, &segment_path(dir, segment.base_offset)).unwrap();
        assert_eq!(
            bytes.len() as u64,
            segment.size_bytes,
            "a segment file longer than its valid batches without corruption reported"
        );
        let mut next = segment.base_offset;
        let mut at = 0;
        while at < bytes.len() {
            let size = batch_size(&bytes[at..]).expect("a whole batch header") as usize;
            let batch = RecordBatchRef::new(&bytes[at..at + size]).expect("a batch");
            batch.validate().expect("a valid batch");
            assert_eq!(batch.base_offset(), next, "offsets follow each other");
            next = batch.last_offset() + 1;
            at += size;
        }
        assert_eq!(next, segment.next_offset);
    }
}
