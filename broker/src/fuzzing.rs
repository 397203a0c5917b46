//! Entry points for the fuzz targets in `broker/fuzz/`: the decoders of what the broker reads
//! from its data directory, reachable with plain types. Not part of the broker's API.
//!
//! - `segment_recovery`: a partition directory (segment files, recovery point) through
//!   [`recover`];
//! - `segment_index`: the `.index` and `.timeindex` files of a closed segment through
//!   `SegmentIndex::decode_closed`;
//! - `producer_snapshot`: a producer-state snapshot through `producers::state::decode_snapshot`;
//! - `offsets_snapshot`: the committed-offsets snapshot and `__consumer_offsets` records through
//!   [`decode_offsets_snapshot`] and [`decode_offsets_record`];
//! - `topic_metadata`: a `topic.toml` through [`decode_topic_metadata`].
//!
//! The network decoders (frames, requests, record batches) live in `sluice-protocol` and are
//! fuzzed by `protocol/fuzz/`.

use std::collections::HashMap;
use std::path::Path;

use crate::groups::offsets::{self, Committed, OffsetKey};
use crate::storage::fs::FileSystem;
use crate::storage::{LogConfig, StorageError, recovery};
use crate::topics::TopicMetadata;

/// One segment as recovery left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredSegment {
    pub base_offset: u64,
    /// Bytes of the log file that hold valid batches (the file itself may be longer when the
    /// partition is corrupt).
    pub size_bytes: u64,
    pub next_offset: u64,
    pub active: bool,
}

/// What recovery of one partition directory found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryOutcome {
    /// Oldest first; the last is the active segment.
    pub segments: Vec<RecoveredSegment>,
    pub next_offset: u64,
    pub durable_offset: u64,
    /// Why the partition would refuse writes.
    pub corruption: Option<String>,
}

/// Recovers the partition directory `dir` of `fs`, as opening a `PartitionLog` does first.
///
/// # Errors
/// What recovery returns when the filesystem fails.
pub fn recover(
    fs: &dyn FileSystem,
    dir: &Path,
    config: &LogConfig,
) -> Result<RecoveryOutcome, StorageError> {
    let recovered = recovery::recover(fs, dir, config)?;
    Ok(RecoveryOutcome {
        segments: recovered
            .segments
            .iter()
            .map(|segment| RecoveredSegment {
                base_offset: segment.base_offset,
                size_bytes: segment.size_bytes(),
                next_offset: segment.next_offset(),
                active: segment.is_active(),
            })
            .collect(),
        next_offset: recovered.next_offset,
        durable_offset: recovered.durable_offset,
        corruption: recovered.corruption,
    })
}

/// One committed offset as the snapshot stores it: (group, topic, partition), offset, position
/// in the offsets log, when it was committed (ms since the epoch, 0 unknown), metadata.
pub type OffsetsSnapshotEntry = (OffsetKey, u64, u64, u64, Option<String>);

/// Decodes the committed-offsets snapshot: its entries (sorted) and the log offset it covers.
pub fn decode_offsets_snapshot(bytes: &[u8]) -> Option<(Vec<OffsetsSnapshotEntry>, u64)> {
    let (committed, covered) = offsets::decode_snapshot(bytes)?;
    let mut entries: Vec<OffsetsSnapshotEntry> = committed
        .into_iter()
        .map(|(key, entry)| {
            (
                key,
                entry.offset,
                entry.log_position,
                entry.committed_at_ms,
                entry.metadata,
            )
        })
        .collect();
    entries.sort();
    Some((entries, covered))
}

/// Encodes a committed-offsets snapshot (later entries of the same key win).
pub fn encode_offsets_snapshot(entries: &[OffsetsSnapshotEntry], covered: u64) -> Vec<u8> {
    let committed: HashMap<OffsetKey, Committed> = entries
        .iter()
        .map(|(key, offset, log_position, committed_at_ms, metadata)| {
            (
                key.clone(),
                Committed {
                    offset: *offset,
                    metadata: metadata.clone(),
                    log_position: *log_position,
                    committed_at_ms: *committed_at_ms,
                },
            )
        })
        .collect();
    offsets::encode_snapshot(&committed, covered)
}

/// Decodes one record of `__consumer_offsets`: (group, topic, partition), offset, metadata.
pub fn decode_offsets_record(key: &[u8], value: &[u8]) -> Option<(OffsetKey, u64, Option<String>)> {
    offsets::decode_record(key, value)
}

/// A decoded `topic.toml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMetadataFile {
    pub partitions: u32,
    pub internal: bool,
    pub overrides: Vec<(String, String)>,
    /// `defaults` with the overrides applied, or why they do not apply.
    pub config: Result<LogConfig, String>,
}

/// Decodes a `topic.toml` as opening the broker does, with `max_partitions_per_topic`.
///
/// # Errors
/// Why the file is refused.
pub fn decode_topic_metadata(
    bytes: &[u8],
    max_partitions_per_topic: u32,
    defaults: &LogConfig,
) -> Result<TopicMetadataFile, String> {
    let metadata = TopicMetadata::decode(bytes, max_partitions_per_topic)?;
    let config = defaults.with_overrides(
        metadata
            .config
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str())),
    );
    Ok(TopicMetadataFile {
        partitions: metadata.partitions,
        internal: metadata.internal,
        overrides: metadata.config.into_iter().collect(),
        config,
    })
}

/// Encodes a `topic.toml` as creating a topic does.
pub fn encode_topic_metadata(file: &TopicMetadataFile) -> String {
    TopicMetadata {
        partitions: file.partitions,
        internal: file.internal,
        config: file.overrides.iter().cloned().collect(),
    }
    .encode()
}

/// The seed inputs of each fuzz target: valid files of every format, so the fuzzer starts past
/// the CRCs and magic numbers. `broker/fuzz/seeds/<target>/` holds them as files (with any
/// crash the fuzzer finds, added as a regression); `.ci/fuzz` hands them to libFuzzer.
#[cfg(test)]
mod seeds {
    use std::path::PathBuf;

    use sluice_protocol::RecordBatchBuilder;

    use super::*;
    use crate::producers::state::{BatchMetadata, ProducerBudget, ProducerStateTable};
    use crate::storage::faultfs::FaultFs;
    use crate::storage::index::SegmentIndex;

    /// A segment of three batches (offsets 0-2, 3-4, 5), as `segment_recovery` takes it after
    /// its 9-byte header.
    fn segment() -> Vec<u8> {
        let mut log = Vec::new();
        let mut offset = 0;
        for (count, value) in [(3, "abc"), (2, "de"), (1, "")] {
            let mut builder = RecordBatchBuilder::new();
            for index in 0..count {
                let headers: &[(&str, &[u8])] = if index == 0 { &[("h", b"v")] } else { &[] };
                builder.append(
                    1_700_000_000_000 + offset as i64,
                    Some(b"k"),
                    value.as_bytes(),
                    headers,
                );
            }
            log.extend_from_slice(builder.build().stamped(offset, 0).as_bytes());
            offset += count;
        }
        log
    }

    fn recovery_input(mode: u8, recovery_point: u64, log: &[u8]) -> Vec<u8> {
        let mut input = vec![mode];
        input.extend_from_slice(&recovery_point.to_be_bytes());
        input.extend_from_slice(log);
        input
    }

    fn index_input() -> Vec<u8> {
        let mut index = SegmentIndex::new();
        for batch in 0..6u32 {
            index.on_append(batch * 10, batch * 100, 100, 1000 + i64::from(batch), 150);
        }
        index.close(60);
        let (offsets, times) = (index.encode_offsets(), index.encode_times());
        let mut input = 600u32.to_be_bytes().to_vec();
        input.extend_from_slice(&60u16.to_be_bytes());
        input.extend_from_slice(&(offsets.len() as u16).to_be_bytes());
        input.extend_from_slice(&offsets);
        input.extend_from_slice(&times);
        input
    }

    fn producer_snapshot() -> Vec<u8> {
        let mut table = ProducerStateTable::new(ProducerBudget::new(100), 1000);
        for (producer_id, batches) in [(7u64, 1u64), (9, 6)] {
            for batch in 0..batches {
                let base_offset = producer_id * 100 + batch * 2;
                table.replay(
                    producer_id,
                    BatchMetadata {
                        producer_epoch: 1,
                        first_sequence: batch * 2,
                        last_sequence: batch * 2 + 1,
                        base_offset,
                        last_offset: base_offset + 1,
                        max_timestamp_ms: 1_700_000_000_000,
                    },
                    5,
                );
            }
        }
        table.encode_snapshot(2000, 0xdead_beef)
    }

    fn offsets_snapshot() -> Vec<u8> {
        let entries = vec![
            (
                ("group".into(), "orders".into(), 0),
                42,
                3,
                1_700_000_000_000,
                None,
            ),
            (
                ("group".into(), "orders".into(), 1),
                7,
                4,
                1_700_000_000_500,
                Some("meta".into()),
            ),
            (
                ("other".into(), "t".into(), 9),
                0,
                5,
                0,
                Some(String::new()),
            ),
        ];
        encode_offsets_snapshot(&entries, 6)
    }

    fn topic_metadata() -> Vec<u8> {
        encode_topic_metadata(&TopicMetadataFile {
            partitions: 8,
            internal: false,
            overrides: vec![
                ("retention_ms".into(), "-1".into()),
                ("segment_bytes".into(), "1048576".into()),
            ],
            config: Ok(LogConfig::default()),
        })
        .into_bytes()
    }

    /// (target, file name, contents).
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let log = segment();
        let torn = [&log[..], &log[..40]].concat();
        vec![
            (
                "segment_recovery",
                "three-batches",
                recovery_input(0, 0, &log),
            ),
            (
                "segment_recovery",
                "recovery-point",
                recovery_input(2, 5, &log),
            ),
            (
                "segment_recovery",
                "two-segments",
                recovery_input(4, 0, &log),
            ),
            (
                "segment_recovery",
                "two-segments-recovery-point",
                recovery_input(6, 3, &log),
            ),
            ("segment_recovery", "torn-tail", recovery_input(0, 0, &torn)),
            ("segment_index", "closed", index_input()),
            ("producer_snapshot", "two-producers", producer_snapshot()),
            ("offsets_snapshot", "three-commits", offsets_snapshot()),
            ("topic_metadata", "overrides", topic_metadata()),
        ]
    }

    fn seeds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
    }

    /// Rewrites the seed files: `cargo test -p sluice-broker --lib fuzzing -- --ignored`,
    /// after a format changed.
    #[test]
    #[ignore = "writes files; run when a format changes"]
    fn write_seed_files() {
        for (target, name, contents) in seeds() {
            let dir = seeds_dir().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), contents).unwrap();
        }
    }

    #[test]
    fn the_seed_files_are_valid_inputs_of_todays_formats() {
        for (target, name, contents) in seeds() {
            let path = seeds_dir().join(target).join(name);
            let committed =
                std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            // The offsets snapshot is written in hash-map order: compare what it says.
            // Its version byte too: an older version still decodes, to the same entries
            // but for what it lacks.
            if target == "offsets_snapshot" {
                assert_eq!(
                    (committed.get(4), decode_offsets_snapshot(&committed)),
                    (contents.get(4), decode_offsets_snapshot(&contents)),
                    "{} is stale: run write_seed_files",
                    path.display()
                );
                continue;
            }
            assert_eq!(
                committed,
                contents,
                "{} is stale: run write_seed_files",
                path.display()
            );
        }
        let log = segment();
        let fs = FaultFs::new();
        let dir = std::path::Path::new("/t/0");
        fs.create_dir_all(dir).unwrap();
        let file = fs.open(&dir.join(format!("{:020}.log", 0)), true).unwrap();
        file.write_all_at(&log, 0).unwrap();
        let recovered = recover(&fs, dir, &LogConfig::default()).unwrap();
        assert_eq!((recovered.next_offset, recovered.corruption), (6, None));
        assert!(crate::producers::state::decode_snapshot(&producer_snapshot()).is_some());
        assert_eq!(
            decode_offsets_snapshot(&offsets_snapshot())
                .unwrap()
                .0
                .len(),
            3
        );
        assert_eq!(
            decode_topic_metadata(&topic_metadata(), 8, &LogConfig::default())
                .unwrap()
                .partitions,
            8
        );
    }

    /// Every file under `broker/fuzz/seeds/` (seeds, and crashes kept as regressions) goes
    /// through its decoder without a panic.
    #[test]
    fn every_seed_and_regression_file_decodes_without_panicking() {
        let defaults = LogConfig::default();
        for target in [
            "segment_recovery",
            "segment_index",
            "producer_snapshot",
            "offsets_snapshot",
            "topic_metadata",
        ] {
            let dir = seeds_dir().join(target);
            let entries: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|error| panic!("the seed directory {}: {error}", dir.display()))
                .map(|entry| entry.unwrap().path())
                .collect();
            assert!(
                entries.iter().any(|path| path.is_file()),
                "no seed file in {}: run write_seed_files",
                dir.display()
            );
            for path in entries {
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
                match target {
                    "segment_recovery" => {
                        let fs = FaultFs::new();
                        let dir = std::path::Path::new("/t/0");
                        fs.create_dir_all(dir).unwrap();
                        let log = bytes.get(9..).unwrap_or_default();
                        let file = fs.open(&dir.join(format!("{:020}.log", 0)), true).unwrap();
                        file.write_all_at(log, 0).unwrap();
                        let _ = recover(&fs, dir, &defaults);
                    }
                    "segment_index" => {
                        let _ = SegmentIndex::decode_closed(&bytes, &bytes, 1 << 20, 1 << 10);
                    }
                    "producer_snapshot" => {
                        let _ = crate::producers::state::decode_snapshot(&bytes);
                    }
                    "offsets_snapshot" => {
                        let _ = decode_offsets_snapshot(&bytes);
                    }
                    _ => {
                        let _ = decode_topic_metadata(&bytes, 1024, &defaults);
                    }
                }
            }
        }
    }
}
