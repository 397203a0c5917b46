//! Storage engine tests over the real disk and over the fault-injecting filesystem.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_broker::storage::faultfs::{FaultFs, FaultKind};
use sluice_broker::storage::{
    FsyncPolicy, LogConfig, PartitionLog, RealFs, Storage, StorageError, StorageOptions,
};
use sluice_protocol::batch::split_batches;
use sluice_protocol::{RecordBatch, RecordBatchBuilder};

fn batch(first_value: u64, records: usize, value_bytes: usize, timestamp_ms: i64) -> RecordBatch {
    let mut builder = RecordBatchBuilder::new();
    for index in 0..records {
        let mut value = (first_value + index as u64).to_be_bytes().to_vec();
        value.resize(value_bytes.max(8), 0xab);
        builder.append(timestamp_ms + index as i64, None, &value, &[]);
    }
    builder.build()
}

/// Every record of a log, as (offset, first 8 value bytes as u64), by reading from `from`.
fn read_all(log: &PartitionLog, from: u64, max_bytes: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < log.latest_offset() {
        let read = log.read(offset, max_bytes).expect("read");
        assert!(
            !read.records.is_empty(),
            "empty read at {offset} below {}",
            log.latest_offset()
        );
        for batch in split_batches(&read.records) {
            let batch = batch.expect("whole batches");
            batch.validate().expect("valid batch");
            for record in batch.records() {
                let record = record.unwrap();
                let tag = u64::from_be_bytes(record.value[..8].try_into().unwrap());
                let record_offset = record.offset(batch.base_offset());
                if record_offset >= offset {
                    out.push((record_offset, tag));
                }
            }
            offset = batch.last_offset() + 1;
        }
    }
    out
}

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 512,
        max_message_bytes: 4096,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn storage(fs: sluice_broker::storage::Fs, fsync: FsyncPolicy) -> Storage {
    Storage::new(
        fs,
        StorageOptions {
            fsync,
            open_segments_max: 4,
            ..StorageOptions::default()
        },
    )
}

fn partition_dir(root: &Path) -> PathBuf {
    root.join("topics").join("orders").join("0")
}

#[test]
fn round_trip_across_many_segment_rolls_and_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    let mut expected = Vec::new();
    let mut next_tag = 0u64;
    for round in 0..300usize {
        let records = 1 + round % 7;
        let info = log
            .append(batch(
                next_tag,
                records,
                20 + round % 90,
                1_000 + round as i64,
            ))
            .unwrap();
        assert_eq!(info.base_offset, expected.len() as u64);
        assert_eq!(info.last_offset, info.base_offset + records as u64 - 1);
        for index in 0..records {
            expected.push((expected.len() as u64, next_tag + index as u64));
        }
        next_tag += records as u64;
    }
    assert!(
        log.segment_count() > 10,
        "only {} segments",
        log.segment_count()
    );
    // From every offset, with small and large reads.
    for from in (0..expected.len() as u64).step_by(37) {
        assert_eq!(read_all(&log, from, 300), expected[from as usize..]);
    }
    assert_eq!(read_all(&log, 0, 1 << 20), expected);
    // Closed segments went through the bounded cache.
    assert!(storage.open_segment_count() <= 4);
    log.close().unwrap();
    drop(log);

    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert_eq!(log.latest_offset(), expected.len() as u64);
    assert_eq!(read_all(&log, 0, 1000), expected);
    let info = log.append(batch(next_tag, 1, 10, 5_000)).unwrap();
    assert_eq!(info.base_offset, expected.len() as u64);
    storage.shutdown();
}

/// A reader racing an appender never sees a batch before the high watermark has passed it: an
/// append lands in the segment a moment before it is published, and a consumer that saw it
/// first would fetch next from past the high watermark and be told its offset is out of range.
/// The race is narrow; many rounds make a regression show.
#[test]
fn a_read_racing_appends_returns_nothing_past_its_high_watermark() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage
        .open_log(&partition_dir(root.path()), LogConfig::default())
        .unwrap();
    let appends = sluice_testkit::scale(20_000, 200_000) as u64;
    std::thread::scope(|scope| {
        let appender = scope.spawn(|| {
            for index in 0..appends {
                log.append(batch(index, 1, 16, 1)).unwrap();
            }
        });
        let mut next = 0u64;
        while next < appends {
            let read = match log.read(next, 1 << 20) {
                Ok(read) => read,
                Err(error) => panic!("read at {next}: {error}"),
            };
            for batch in split_batches(&read.records) {
                let batch = batch.expect("whole batches");
                assert!(
                    batch.last_offset() < read.high_watermark,
                    "a read with high watermark {} returned offset {}",
                    read.high_watermark,
                    batch.last_offset()
                );
                next = batch.last_offset() + 1;
            }
        }
        appender.join().unwrap();
    });
}

#[test]
fn reads_outside_the_log_get_clear_errors_and_at_least_one_batch() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage
        .open_log(&partition_dir(root.path()), LogConfig::default())
        .unwrap();
    log.append(batch(0, 100, 100, 1)).unwrap();
    log.append(batch(100, 1, 10, 2)).unwrap();
    match log.read(102, 100) {
        Err(StorageError::OffsetOutOfRange {
            requested: 102,
            log_start_offset: 0,
            log_end_offset: 101,
        }) => {}
        other => panic!("read above the end: {other:?}"),
    }
    assert!(
        log.read(101, 100).unwrap().records.is_empty(),
        "read at the end is empty"
    );
    // max_bytes far below the first batch's size still returns that whole batch.
    let read = log.read(50, 10).unwrap();
    let batches: Vec<_> = split_batches(&read.records).map(Result::unwrap).collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].record_count(), 100);
    assert_eq!(read.high_watermark, 101);
    storage.shutdown();
}

/// A copied read (under 64 KiB) that ends in part of a batch holds only its whole batches'
/// memory: the fetch budget counts what a read keeps, and a copy that kept its whole buffer
/// held up to 64 KiB a partition against a count of a few hundred bytes.
#[test]
fn a_copied_read_holds_no_more_memory_than_its_whole_batches() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage
        .open_log(&partition_dir(root.path()), LogConfig::default())
        .unwrap();
    log.append(batch(0, 1, 100, 1)).unwrap();
    log.append(batch(1, 60, 1_000, 2)).unwrap();
    let read = log.read(0, 60_000).unwrap();
    let kept = read.records.len();
    assert!(kept < 300, "the small batch only: {kept} bytes");
    let held = read
        .records
        .try_into_mut()
        .expect("the read's only reference")
        .capacity();
    assert!(held < kept + 4096, "{held} bytes held for {kept}");
    storage.shutdown();
}

#[test]
fn retention_by_bytes_and_by_age_deletes_whole_closed_segments() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let config = LogConfig {
        retention_bytes: Some(10_000),
        ..small_segments()
    };
    let log = storage
        .open_log(&partition_dir(root.path()), config)
        .unwrap();
    for round in 0..100u64 {
        log.append(batch(round, 1, 500, 1_000 + round as i64))
            .unwrap();
    }
    let before = log.segment_count();
    let deleted = log.enforce_retention(0).unwrap();
    assert!(deleted > 0);
    assert_eq!(log.segment_count(), before - deleted);
    assert!(
        log.size_bytes() <= 10_000 + 4096,
        "size {} after retention",
        log.size_bytes()
    );
    let earliest = log.earliest_offset();
    assert_eq!(log.segment_base_offsets()[0], earliest);
    assert!(matches!(
        log.read(0, 100),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        read_all(&log, earliest, 4096).first().map(|r| r.0),
        Some(earliest)
    );
    for base in log.segment_base_offsets() {
        assert!(base >= earliest);
    }
    storage.shutdown();

    // By age: everything but the active segment is older than the limit.
    let root = tempfile::tempdir().unwrap();
    let storage = self::storage(Arc::new(RealFs), FsyncPolicy::Never);
    let config = LogConfig {
        retention_ms: Some(60_000),
        ..small_segments()
    };
    let log = storage
        .open_log(&partition_dir(root.path()), config)
        .unwrap();
    for round in 0..40u64 {
        log.append(batch(round, 1, 500, 1_000_000 + round as i64))
            .unwrap();
    }
    assert_eq!(
        log.enforce_retention(1_000_000 + 30_000).unwrap(),
        0,
        "nothing is old yet"
    );
    let deleted = log.enforce_retention(1_000_000 + 120_000).unwrap();
    assert_eq!(log.segment_count(), 1, "{deleted} deleted");
    assert_eq!(log.earliest_offset(), log.segment_base_offsets()[0]);
    storage.shutdown();
}

#[test]
fn a_retention_ms_past_i64_max_keeps_everything() {
    // As a topic override, `retention_ms` is any u64: someone meaning "for ever" may write
    // u64::MAX, which must never read as a negative limit that expires every segment.
    for limit in [u64::MAX, 1 << 63] {
        let root = tempfile::tempdir().unwrap();
        let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
        let limit = limit.to_string();
        let config = small_segments()
            .with_overrides([("retention_ms", limit.as_str())])
            .unwrap();
        let log = storage
            .open_log(&partition_dir(root.path()), config)
            .unwrap();
        for round in 0..40u64 {
            log.append(batch(round, 1, 500, 1_000 + round as i64))
                .unwrap();
        }
        let segments = log.segment_count();
        assert!(segments > 2);
        assert_eq!(
            log.enforce_retention(10_000_000).unwrap(),
            0,
            "limit {limit}"
        );
        assert_eq!(log.segment_count(), segments);
        assert_eq!(log.earliest_offset(), 0);
        storage.shutdown();
    }
}

#[test]
fn retention_of_a_closed_log_leaves_a_new_log_in_its_directory_alone() {
    // A topic deleted while the retention pass still holds its log, then created again under
    // the same name: the pass must not delete the new log's files by their (equal) paths.
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let dir = partition_dir(root.path());
    let config = LogConfig {
        retention_bytes: Some(0),
        ..small_segments()
    };
    let old = storage.open_log(&dir, config.clone()).unwrap();
    for round in 0..40u64 {
        old.append(batch(round, 1, 500, 1_000 + round as i64))
            .unwrap();
    }
    assert!(old.segment_count() > 2);
    old.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let new = storage.open_log(&dir, config).unwrap();
    for round in 0..40u64 {
        new.append(batch(1_000 + round, 1, 500, 1_000 + round as i64))
            .unwrap();
    }
    let segments = new.segment_base_offsets();
    assert!(segments.len() > 2);
    assert_eq!(old.enforce_retention(10_000_000).unwrap(), 0);
    for base in segments {
        let file = dir.join(format!("{base:020}.log"));
        assert!(file.exists(), "{} was deleted", file.display());
    }
    assert_eq!(read_all(&new, 0, 4096).len(), 40);
    storage.shutdown();
}

#[test]
fn segments_roll_by_age() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let config = LogConfig {
        segment_ms: 1_000,
        ..LogConfig::default()
    };
    let log = storage
        .open_log(&partition_dir(root.path()), config)
        .unwrap();
    log.append_at(batch(0, 1, 10, 1), 10_000).unwrap();
    log.append_at(batch(1, 1, 10, 2), 10_500).unwrap();
    assert_eq!(log.segment_count(), 1);
    log.append_at(batch(2, 1, 10, 3), 11_000).unwrap();
    assert_eq!(log.segment_base_offsets(), [0, 2]);
    storage.shutdown();
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_restart_does_not_start_the_active_segments_age_again() {
    // The active segment's age counts from its first batch, across restarts: a partition
    // restarted more often than segment_ms must still roll (and retention delete its past).
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let config = LogConfig {
        segment_ms: 30_000,
        ..LogConfig::default()
    };
    let long_ago = wall_clock_ms() - 60_000;
    let storage = self::storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, config.clone()).unwrap();
    log.append_at(batch(0, 1, 10, long_ago as i64), long_ago)
        .unwrap();
    log.close().unwrap();
    storage.shutdown();

    let storage = self::storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, config.clone()).unwrap();
    log.append(batch(1, 1, 10, wall_clock_ms() as i64)).unwrap();
    assert_eq!(log.segment_base_offsets(), [0, 1], "the old segment rolled");
    log.close().unwrap();
    storage.shutdown();

    // A first batch stamped in the future counts from the restart, not from its stamp.
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = self::storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, config.clone()).unwrap();
    let future = wall_clock_ms() + 3_600_000;
    log.append(batch(0, 1, 10, future as i64)).unwrap();
    log.close().unwrap();
    storage.shutdown();
    let storage = self::storage(Arc::new(RealFs), FsyncPolicy::Never);
    // The age counts from the open, somewhere between these two readings.
    let before = wall_clock_ms();
    let log = storage.open_log(&dir, config).unwrap();
    let opened = wall_clock_ms();
    log.append_at(batch(1, 1, 10, opened as i64), before + 29_000)
        .unwrap();
    assert_eq!(log.segment_count(), 1);
    log.append_at(batch(2, 1, 10, opened as i64), opened + 31_000)
        .unwrap();
    assert_eq!(log.segment_base_offsets(), [0, 2]);
    storage.shutdown();
}

/// Descriptors of this process open on files under `dir`: (all, those of deleted files).
fn open_descriptors_under(dir: &Path) -> (usize, usize) {
    let (mut open, mut deleted) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with(&*dir.to_string_lossy()) {
            open += 1;
            if target.ends_with(" (deleted)") {
                deleted += 1;
            }
        }
    }
    (open, deleted)
}

#[test]
fn with_fsync_never_rolled_segments_are_closed_and_deleted_ones_let_go() {
    // fsync=never syncs nothing for weak acks, but a rolled segment's file must not stay open
    // for ever: one descriptor per roll would run out, and the space of segments retention
    // deletes would never come back.
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let config = LogConfig {
        retention_bytes: Some(8_192),
        ..small_segments()
    };
    let log = storage.open_log(&dir, config).unwrap();
    for round in 0..400u64 {
        log.append(batch(round, 1, 500, 1_000 + round as i64))
            .unwrap();
    }
    assert!(log.segment_count() > 40);
    log.enforce_retention(0).unwrap();
    assert!(log.segment_count() < 6);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (open, deleted) = open_descriptors_under(&dir);
        // The active segment, plus what the read cache (4) and the flusher may hold.
        if open <= 6 && deleted == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} descriptors open under {}, {deleted} of deleted files",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    storage.shutdown();
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage
        .open_log(&partition_dir(root.path()), small_segments())
        .unwrap();
    // Batch r holds two records, at 10_000 + 20r and one millisecond later.
    let mut model = Vec::new();
    for round in 0..200u64 {
        log.append(batch(round * 2, 2, 40, 10_000 + round as i64 * 20))
            .unwrap();
        model.push((round * 2, 10_000 + round as i64 * 20));
        model.push((round * 2 + 1, 10_000 + round as i64 * 20 + 1));
    }
    assert!(log.segment_count() > 3);
    for target in [0i64, 10_000, 10_001, 10_002, 10_015, 10_020, 12_345, 13_981] {
        let expected = model
            .iter()
            .find(|(_, timestamp)| *timestamp >= target)
            .copied();
        assert_eq!(
            log.offset_for_timestamp(target).unwrap(),
            expected,
            "target {target}"
        );
    }
    assert_eq!(log.offset_for_timestamp(14_000).unwrap(), None);
    storage.shutdown();
}

#[tokio::test]
async fn torn_write_at_every_byte_of_the_last_batch_recovers_the_batches_before_it() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let dir = PathBuf::from("/data/topics/t/0");
    let config = LogConfig::default();
    // Stamped now: a segment whose first record is older than segment_ms rolls at the first
    // append after a restart, and a roll syncs (even with fsync=never), which would make the
    // batch to be torn durable.
    let now = wall_clock_ms() as i64;
    let last = batch(3, 3, 30, now + 7);
    let last_size = last.size_bytes();
    for keep in 0..last_size {
        let log = storage.open_log(&dir, config.clone()).unwrap();
        if log.latest_offset() == 0 {
            log.append(batch(0, 3, 30, now + 1)).unwrap();
            log.wait_durable(3).await.unwrap();
            log.checkpoint_recovery_point().unwrap();
        }
        assert_eq!(
            log.latest_offset(),
            3,
            "keep {keep}: earlier batches intact"
        );
        log.append(last.clone()).unwrap();
        fs.tear_on_crash(keep);
        fs.crash();
        drop(log);
        let log = storage.open_log(&dir, config.clone()).unwrap();
        assert_eq!(log.latest_offset(), 3, "keep {keep} of {last_size}");
        assert_eq!(read_all(&log, 0, 1 << 20), [(0, 0), (1, 1), (2, 2)]);
        assert!(
            log.poison_reason().is_none(),
            "keep {keep}: {:?}",
            log.poison_reason()
        );
        // The log accepts writes right after the cut.
        let info = log.append(batch(3, 1, 5, now + 9)).unwrap();
        assert_eq!(info.base_offset, 3);
        fs.crash();
    }
    storage.shutdown();
}

#[tokio::test]
async fn power_loss_keeps_everything_fsynced_and_below_the_recovery_point() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let dir = PathBuf::from("/data/topics/t/0");
    let log = storage.open_log(&dir, small_segments()).unwrap();
    let mut durable = 0;
    for round in 0..120u64 {
        let info = log.append(batch(round * 3, 3, 60, round as i64)).unwrap();
        if round % 10 == 9 {
            log.wait_durable(info.last_offset + 1).await.unwrap();
            durable = info.last_offset + 1;
        }
        if round == 60 {
            log.checkpoint_recovery_point().unwrap();
        }
    }
    // A few more, never synced.
    for round in 120..125u64 {
        log.append(batch(round * 3, 3, 60, round as i64)).unwrap();
    }
    assert!(log.segment_count() > 5);
    fs.crash();
    drop(log);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert!(log.poison_reason().is_none(), "{:?}", log.poison_reason());
    let recovered = log.latest_offset();
    assert!(
        recovered >= durable,
        "lost fsynced data: {recovered} < {durable}"
    );
    let records = read_all(&log, 0, 1 << 20);
    assert_eq!(records.len() as u64, recovered);
    for (offset, tag) in records {
        assert_eq!(
            offset, tag,
            "recovered records are a prefix of what was written"
        );
    }
    storage.shutdown();
}

/// A read walks batch headers from the index entry before its offset a few kilobytes at a
/// time: batches of every size, headers across those reads' edges, every offset read alone
/// and in a run, and what each read returns is the same.
#[test]
fn reads_find_every_offset_among_batches_of_every_size() {
    let root = tempfile::tempdir().unwrap();
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage
        .open_log(&partition_dir(root.path()), LogConfig::default())
        .unwrap();
    let mut next = 0u64;
    for index in 0..300u64 {
        let records = 1 + (index % 4) as usize;
        log.append(batch(next, records, 8 + (index as usize * 37) % 1500, 1))
            .unwrap();
        next += records as u64;
    }
    let expected: Vec<(u64, u64)> = (0..next).map(|offset| (offset, offset)).collect();
    for offset in 0..next {
        let read = log.read(offset, 1).unwrap();
        let first = split_batches(&read.records).next().unwrap().unwrap();
        assert!(
            first.base_offset() <= offset && offset <= first.last_offset(),
            "offset {offset} in the batch read"
        );
        assert_eq!(
            split_batches(&read.records).count(),
            1,
            "one batch for max_bytes 1"
        );
    }
    for max_bytes in [1, 700, 5_000, 1 << 20] {
        assert_eq!(
            read_all(&log, 0, max_bytes),
            expected,
            "max_bytes {max_bytes}"
        );
    }
    assert_eq!(read_all(&log, next - 3, 100), expected[next as usize - 3..]);
    storage.shutdown();
}

/// Reads of 64 KiB and more map the segment's pages instead of copying them: they return what
/// small (copied) reads return, and check every batch as it leaves the disk just the same: a
/// bit flipped in the file under a running log is never served.
#[test]
fn large_reads_map_the_segment_and_check_what_they_serve() {
    use std::os::unix::fs::FileExt;

    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, LogConfig::default()).unwrap();
    // 12 batches of about 20 KB: one is read by copying, several by mapping.
    for index in 0..12u64 {
        log.append(batch(index * 20, 20, 1000, index as i64))
            .unwrap();
    }
    let expected: Vec<(u64, u64)> = (0..240).map(|offset| (offset, offset)).collect();
    assert_eq!(read_all(&log, 0, 1), expected, "a batch per read, copied");
    assert_eq!(read_all(&log, 0, 1 << 20), expected, "mapped reads");
    // Which way each read went: a large read is the file's own pages, a small one a copy.
    let large = log.read(0, 1 << 20).unwrap();
    assert!(sluice_broker::storage::fs::file_source(&large.records).is_some());
    let small = log.read(0, 1).unwrap();
    assert!(sluice_broker::storage::fs::file_source(&small.records).is_none());
    assert_eq!(
        read_all(&log, 37, 100_000),
        expected[37..],
        "mapped, mid-batch"
    );

    // Flip a bit in the sixth batch's values, through the page cache, as a disk that
    // changed under the broker would.
    let segment = dir.join("00000000000000000000.log");
    let contents = std::fs::read(&segment).unwrap();
    let sixth: usize = split_batches(&contents)
        .take(5)
        .map(|batch| batch.unwrap().as_bytes().len())
        .sum();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.write_all_at(&[contents[sixth + 500] ^ 0x10], (sixth + 500) as u64)
        .unwrap();
    let read = log.read(0, 1 << 20).unwrap();
    let served: Vec<u64> = split_batches(&read.records)
        .map(|batch| batch.unwrap().base_offset())
        .collect();
    assert_eq!(served, [0, 20, 40, 60, 80], "what precedes the damage");
    match log.read(100, 1 << 20) {
        Err(StorageError::Corrupt { file, position, .. }) => {
            assert_eq!(file, segment);
            assert_eq!(position, sixth as u64);
        }
        other => panic!("a read of the damaged batch: {other:?}"),
    }
    storage.shutdown();
}

#[test]
fn bit_flip_below_the_recovery_point_refuses_writes_and_names_the_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, LogConfig::default()).unwrap();
    let first = log.append(batch(0, 2, 50, 1)).unwrap();
    log.append(batch(2, 2, 50, 2)).unwrap();
    log.append(batch(4, 2, 50, 3)).unwrap();
    log.close().unwrap();
    drop(log);
    // Flip a bit inside the second batch's value bytes.
    let segment = dir.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let second_start = bytes.len() / 3;
    bytes[second_start + 100] ^= 0x04;
    std::fs::write(&segment, &bytes).unwrap();

    let log = storage.open_log(&dir, LogConfig::default()).unwrap();
    let reason = log.poison_reason().expect("corruption detected");
    assert!(reason.contains("00000000000000000000.log"), "{reason}");
    assert!(
        reason.contains(&format!("position {second_start}")),
        "{reason}"
    );
    match log.append(batch(9, 1, 5, 9)) {
        Err(StorageError::Refused { reason }) => {
            assert!(reason.contains("00000000000000000000.log"))
        }
        other => panic!("append to a corrupt partition: {other:?}"),
    }
    // What precedes the damage is served.
    assert_eq!(first.base_offset, 0);
    assert_eq!(read_all(&log, 0, 1 << 20), [(0, 0), (1, 1)]);
    // The file was not "repaired".
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    storage.shutdown();
}

#[test]
fn garbage_after_the_last_batch_is_cut() {
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, LogConfig::default()).unwrap();
    log.append(batch(0, 2, 50, 1)).unwrap();
    log.append(batch(2, 1, 50, 2)).unwrap();
    log.close().unwrap();
    drop(log);
    let segment = dir.join("00000000000000000000.log");
    let clean_len = std::fs::metadata(&segment).unwrap().len();
    // Garbage after the recovery point, as a crash mid-append could leave.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    std::io::Write::write_all(&mut file, &[0x5a; 333]).unwrap();
    drop(file);
    // The checkpoint says 3 are durable: the garbage lies above it.
    let log = storage.open_log(&dir, LogConfig::default()).unwrap();
    assert!(log.poison_reason().is_none());
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), clean_len);
    assert_eq!(read_all(&log, 0, 1 << 20), [(0, 0), (1, 1), (2, 2)]);
    assert_eq!(log.append(batch(3, 1, 5, 3)).unwrap().base_offset, 3);
    storage.shutdown();
}

#[test]
fn enospc_fails_the_append_and_the_log_stays_consistent() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let log = storage
        .open_log(Path::new("/data/topics/t/0"), LogConfig::default())
        .unwrap();
    log.append(batch(0, 2, 50, 1)).unwrap();
    fs.fail_writes(FaultKind::Enospc, Some(40));
    match log.append(batch(2, 2, 50, 2)) {
        Err(StorageError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(28)),
        other => panic!("append on a full disk: {other:?}"),
    }
    assert_eq!(log.latest_offset(), 2);
    assert_eq!(read_all(&log, 0, 1 << 20), [(0, 0), (1, 1)]);
    fs.clear_faults();
    assert_eq!(log.append(batch(2, 2, 50, 3)).unwrap().base_offset, 2);
    assert_eq!(read_all(&log, 0, 1 << 20), [(0, 0), (1, 1), (2, 2), (3, 3)]);
    storage.shutdown();
}

#[tokio::test]
async fn failed_fsync_refuses_writes_and_never_acknowledges() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let log = storage
        .open_log(Path::new("/data/topics/t/0"), LogConfig::default())
        .unwrap();
    let info = log.append(batch(0, 1, 10, 1)).unwrap();
    fs.fail_syncs(FaultKind::Eio);
    assert!(matches!(
        log.wait_durable(info.last_offset + 1).await,
        Err(StorageError::Poisoned { .. })
    ));
    fs.clear_faults();
    // No retry-then-acknowledge: the partition stays refused.
    assert!(matches!(
        log.wait_durable(info.last_offset + 1).await,
        Err(StorageError::Poisoned { .. })
    ));
    assert!(matches!(
        log.append(batch(1, 1, 10, 2)),
        Err(StorageError::Refused { .. })
    ));
    assert_eq!(log.durable_offset(), 0);
    storage.shutdown();
}

#[tokio::test]
async fn concurrent_durable_appenders_share_fsyncs() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let log = storage
        .open_log(Path::new("/data/topics/t/0"), LogConfig::default())
        .unwrap();
    let appenders = 8;
    let rounds = 50;
    let mut tasks = Vec::new();
    for appender in 0..appenders {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let info = log
                    .append(batch(appender * 1000 + round, 1, 100, 1))
                    .unwrap();
                log.wait_durable(info.last_offset + 1).await.unwrap();
                assert!(log.durable_offset() > info.last_offset);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let batches = appenders * rounds;
    assert_eq!(log.latest_offset(), batches);

    // Sharing, without depending on how the appenders above interleaved with the flusher:
    // many batches appended, then a durability waiter for each of them registered at once.
    // One fsync round covers everything appended before it started, so they all share one
    // (two when a round started by the first waiters was already under way); a fsync per
    // waiter would be `SHARED` of them.
    const SHARED: u64 = 64;
    let mut infos = Vec::new();
    for index in 0..SHARED {
        infos.push(log.append(batch(1_000_000 + index, 1, 100, 1)).unwrap());
    }
    let fsyncs_before = log.fsync_count();
    futures::future::join_all(
        infos
            .iter()
            .map(|info| log.wait_durable(info.last_offset + 1)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<()>, _>>()
    .unwrap();
    let shared_fsyncs = log.fsync_count() - fsyncs_before;
    assert!(log.durable_offset() >= batches + SHARED);
    assert!(
        shared_fsyncs <= 2,
        "{shared_fsyncs} fsyncs for {SHARED} durability waiters registered together"
    );
    eprintln!(
        "{} fsyncs for {batches} batches of {appenders} concurrent appenders; \
         {shared_fsyncs} for {SHARED} waiters at once",
        fsyncs_before
    );

    // Every acknowledged batch is on the simulated disk.
    fs.crash();
    drop(log);
    let log = storage
        .open_log(Path::new("/data/topics/t/0"), LogConfig::default())
        .unwrap();
    assert_eq!(log.latest_offset(), batches + SHARED);
    storage.shutdown();
}

#[tokio::test]
async fn fsync_always_policy_makes_weak_acks_durable_without_waiting() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Always);
    let log = storage
        .open_log(Path::new("/data/topics/t/0"), LogConfig::default())
        .unwrap();
    log.append(batch(0, 1, 10, 1)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.durable_offset() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "fsync=always never synced"
        );
        tokio::task::yield_now().await;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    storage.shutdown();
}

#[test]
fn missing_or_damaged_indexes_are_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let dir = partition_dir(root.path());
    let storage = storage(Arc::new(RealFs), FsyncPolicy::Never);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    for round in 0..100u64 {
        log.append(batch(round, 1, 200, round as i64)).unwrap();
    }
    let bases = log.segment_base_offsets();
    log.close().unwrap();
    drop(log);
    let first_index = dir.join(format!("{:020}.index", bases[0]));
    let good = std::fs::read(&first_index).unwrap();
    assert!(!good.is_empty());
    std::fs::write(&first_index, b"nonsense").unwrap();
    std::fs::remove_file(dir.join(format!("{:020}.timeindex", bases[1]))).unwrap();

    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert!(log.poison_reason().is_none());
    assert_eq!(
        std::fs::read(&first_index).unwrap(),
        good,
        "index rewritten from the log"
    );
    assert!(dir.join(format!("{:020}.timeindex", bases[1])).exists());
    let records = read_all(&log, 0, 4096);
    assert_eq!(records.len(), 100);
    storage.shutdown();
}

#[tokio::test]
async fn power_loss_just_after_a_roll_cuts_back_to_the_durable_prefix() {
    let fs = FaultFs::new();
    let storage = storage(Arc::new(fs.clone()), FsyncPolicy::Never);
    let dir = PathBuf::from("/data/topics/t/0");
    let log = storage.open_log(&dir, small_segments()).unwrap();
    let mut durable = 0;
    for round in 0..5u64 {
        let info = log.append(batch(round, 1, 200, round as i64)).unwrap();
        durable = info.last_offset + 1;
    }
    log.wait_durable(durable).await.unwrap();
    log.checkpoint_recovery_point().unwrap();
    // Unsynced appends that roll into new segments; then the directory (not the data) reaches
    // the disk, as a background index write would make it.
    for round in 5..40u64 {
        log.append(batch(round, 1, 200, round as i64)).unwrap();
    }
    assert!(log.segment_count() > 2);
    use sluice_broker::storage::fs::FileSystem;
    fs.sync_dir(&dir).unwrap();
    fs.crash();
    drop(log);
    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert!(log.poison_reason().is_none(), "{:?}", log.poison_reason());
    assert!(log.latest_offset() >= durable);
    let records = read_all(&log, 0, 1 << 20);
    for (offset, tag) in &records {
        assert_eq!(offset, tag);
    }
    // Writable again, continuing right after what survived.
    let next = log.latest_offset();
    assert_eq!(
        log.append(batch(next, 1, 10, 99)).unwrap().base_offset,
        next
    );
    storage.shutdown();
}

/// Bytes of disk `path` holds: its allocated blocks, those reserved ahead included.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The partition's segment files, oldest first.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    files
}

/// Whether the filesystem under `dir` reserves space past a file's end (`fallocate`).
fn reserves_space_ahead(dir: &Path) -> bool {
    use sluice_broker::storage::fs::FileSystem;
    let probe = dir.join("probe");
    let file = RealFs.open(&probe, true).unwrap();
    let reserved = file.preallocate(0, 1 << 20).is_ok() && allocated_bytes(&probe) >= 1 << 20;
    drop(file);
    std::fs::remove_file(&probe).unwrap();
    reserved
}

/// A partition directory in a fresh temporary directory and a storage over the real disk, when
/// its filesystem reserves space past a file's end; `None` (the test skips) otherwise.
fn partition_on_a_disk_that_reserves() -> Option<(tempfile::TempDir, PathBuf, Storage)> {
    let root = tempfile::tempdir().unwrap();
    if !reserves_space_ahead(root.path()) {
        eprintln!("skipped: this filesystem does not reserve space past a file's end");
        return None;
    }
    let dir = partition_dir(root.path());
    Some((root, dir, storage(Arc::new(RealFs), FsyncPolicy::Never)))
}

/// At most this much disk past its length is a segment's own (the filesystem's rounding to
/// whole blocks and its extent tree), not a reservation left behind.
const ALLOCATION_SLACK: u64 = 64 * 1024;

fn assert_holds_no_reservation(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let allocated = allocated_bytes(path);
    assert!(
        allocated <= len.next_multiple_of(4096) + ALLOCATION_SLACK,
        "{} holds {allocated} bytes of disk for {len} bytes",
        path.display()
    );
}

#[test]
fn big_appends_reserve_disk_ahead_and_rolls_and_close_give_it_back() {
    let Some((_root, dir, storage)) = partition_on_a_disk_that_reserves() else {
        return;
    };
    // Segments roll by age here, far from full, with their reservation ahead.
    let config = LogConfig {
        segment_bytes: 64 << 20,
        segment_ms: 1_000,
        index_interval_bytes: 4096,
        max_message_bytes: 1 << 20,
        retention_ms: None,
        ..LogConfig::default()
    };
    let log = storage.open_log(&dir, config).unwrap();
    let mut expected = Vec::new();
    let mut tag = 0;
    // Batches of about 256 KiB: each reserves eight more ahead (2 MiB).
    for now_ms in [1_000, 1_500, 3_000, 3_500, 5_000] {
        let info = log.append_at(batch(tag, 256, 1000, 1_000), now_ms).unwrap();
        expected.extend((0..256).map(|index| (info.base_offset + index, tag + index)));
        tag += 256;
        let files = segment_files(&dir);
        let active = files.last().unwrap();
        let len = std::fs::metadata(active).unwrap().len();
        assert!(
            allocated_bytes(active) >= len + (1 << 20),
            "{} bytes of disk for the {len} bytes of {}",
            allocated_bytes(active),
            active.display()
        );
    }
    let files = segment_files(&dir);
    assert_eq!(files.len(), 3);
    for rolled in &files[..2] {
        assert_holds_no_reservation(rolled);
    }
    // The reservation changed no length: every record reads back, from every segment.
    assert_eq!(read_all(&log, 0, 1 << 20), expected);
    log.close().unwrap();
    for file in &files {
        assert_holds_no_reservation(file);
    }
}

#[test]
fn space_a_crash_left_reserved_past_the_end_is_given_back_on_close() {
    let Some((_root, dir, storage)) = partition_on_a_disk_that_reserves() else {
        return;
    };
    let log = storage.open_log(&dir, small_segments()).unwrap();
    log.append(batch(0, 3, 100, 1_000)).unwrap();
    log.close().unwrap();
    drop(log);
    // As a crash while reserving ahead leaves it: 2 MiB past the end, the length unchanged.
    let files = segment_files(&dir);
    let segment = files.last().unwrap();
    let len = std::fs::metadata(segment).unwrap().len();
    {
        use sluice_broker::storage::fs::FileSystem;
        let file = RealFs.open(segment, false).unwrap();
        file.preallocate(len, 2 << 20).unwrap();
    }
    assert_eq!(std::fs::metadata(segment).unwrap().len(), len);
    assert!(allocated_bytes(segment) >= 2 << 20);

    let log = storage.open_log(&dir, small_segments()).unwrap();
    assert_eq!(read_all(&log, 0, 1 << 20), vec![(0, 0), (1, 1), (2, 2)]);
    log.close().unwrap();
    assert_holds_no_reservation(segment);
}
