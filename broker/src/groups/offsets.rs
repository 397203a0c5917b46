//! Committed offsets: stored in the internal `__consumer_offsets` log (the same storage engine
//! as every topic), kept in memory for lookups, replayed on start.
//!
//! ```text
//! record key:    version u8 (1), group u16-string, topic u16-string, partition u32
//! record value:  version u8 (1), offset u64, metadata i16-nullable-string
//! snapshot file: <data-dir>/groups/offsets.snapshot
//!                "SLOS", version u8 (2), covered_offset u64, count u32,
//!                entries { group, topic, partition u32, offset u64, log_position u64,
//!                          committed_at_ms u64, metadata }, crc32c u32
//!                (version 1 has no committed_at_ms: read as 0, unknown)
//! ```
//!
//! Version 2 is one-way: a broker from before it refuses the file and replays the log, whose
//! segments the snapshot covered may be gone, so going back loses the commits only they held.
//!
//! A commit is appended, and only once it is fsynced is it applied to the in-memory table and
//! acknowledged, so an acknowledged commit survives a crash and a lost one was never visible.
//! Whenever the log rolls a segment, a snapshot of the whole table is written durably; start-up
//! then replays only what follows the snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, BytesMut};
use sluice_protocol::RecordBatchBuilder;
use sluice_protocol::batch::split_batches;

use crate::storage::fs::{Fs, read_file, write_file_durably};
use crate::storage::{PartitionLog, StorageError};

/// The internal topic holding commits.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

const RECORD_VERSION: u8 = 1;
const SNAPSHOT_MAGIC: &[u8; 4] = b"SLOS";
const SNAPSHOT_VERSION: u8 = 2;

/// (group, topic, partition).
pub type OffsetKey = (String, String, u32);

/// A committed offset: the next offset to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub offset: u64,
    pub metadata: Option<String>,
    /// Where the commit sits in the offsets log; a later commit always wins, whatever order
    /// durability completes in.
    pub(crate) log_position: u64,
    /// When it was committed (wall clock, milliseconds since the epoch; 0 when unknown, as in
    /// a version 1 snapshot): the group's offsets expire a retention period after its last
    /// commit, or after it was last seen with a member if later.
    pub(crate) committed_at_ms: u64,
}

/// One commit of a request.
#[derive(Clone, Debug)]
pub struct CommitEntry {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub metadata: Option<String>,
}

#[derive(Debug)]
struct State {
    committed: HashMap<OffsetKey, Committed>,
    /// Commits appended but not yet applied, by first log position, with the keys they
    /// commit: a snapshot must not claim to cover them, and a topic forgotten meanwhile must
    /// forget them too.
    pending: BTreeMap<u64, Vec<OffsetKey>>,
    /// Log position of each forgotten topic's tombstones: a commit of it appended before them,
    /// still pending when they were written, must not come back when it is applied.
    forgotten: HashMap<String, u64>,
    segments_at_snapshot: usize,
}

/// The committed offsets of every group.
#[derive(Debug)]
pub struct OffsetStore {
    log: Arc<PartitionLog>,
    fs: Fs,
    snapshot_path: PathBuf,
    state: Mutex<State>,
    /// Held while a snapshot is written and the segments it covers deleted; the offset the
    /// last written one covers. Snapshots are encoded under `state` but written after it is
    /// let go, so two can be on their way at once: they go one at a time, and one older
    /// than the snapshot already written is dropped (its segments may be gone).
    snapshot_written: Mutex<u64>,
}

fn put_short_string(out: &mut BytesMut, value: &str) {
    let bytes = value.as_bytes();
    let length = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.put_u16(length);
    out.put_slice(&bytes[..usize::from(length)]);
}

fn put_metadata(out: &mut BytesMut, value: Option<&str>) {
    match value {
        None => out.put_i16(-1),
        Some(value) => {
            let length = value.len().min(i16::MAX as usize);
            out.put_i16(length as i16);
            out.put_slice(&value.as_bytes()[..length]);
        }
    }
}

fn get_short_string(src: &mut &[u8]) -> Option<String> {
    if src.remaining() < 2 {
        return None;
    }
    let length = usize::from(src.get_u16());
    let bytes = src.get(..length)?;
    let value = std::str::from_utf8(bytes).ok()?.to_owned();
    src.advance(length);
    Some(value)
}

fn get_metadata(src: &mut &[u8]) -> Option<Option<String>> {
    if src.remaining() < 2 {
        return None;
    }
    let length = src.get_i16();
    if length == -1 {
        return Some(None);
    }
    let length = usize::try_from(length).ok()?;
    let bytes = src.get(..length)?;
    let value = std::str::from_utf8(bytes).ok()?.to_owned();
    src.advance(length);
    Some(Some(value))
}

fn encode_key(group: &str, topic: &str, partition: u32) -> BytesMut {
    let mut key = BytesMut::new();
    key.put_u8(RECORD_VERSION);
    put_short_string(&mut key, group);
    put_short_string(&mut key, topic);
    key.put_u32(partition);
    key
}

fn decode_key(key: &[u8]) -> Option<OffsetKey> {
    let mut key = key;
    if key.first() != Some(&RECORD_VERSION) {
        return None;
    }
    key.advance(1);
    let group = get_short_string(&mut key)?;
    let topic = get_short_string(&mut key)?;
    if key.remaining() != 4 {
        return None;
    }
    Some((group, topic, key.get_u32()))
}

pub(crate) fn decode_record(key: &[u8], value: &[u8]) -> Option<(OffsetKey, u64, Option<String>)> {
    let (group, topic, partition) = decode_key(key)?;
    let mut value = value;
    if value.first() != Some(&RECORD_VERSION) || value.len() < 9 {
        return None;
    }
    value.advance(1);
    let offset = value.get_u64();
    let metadata = get_metadata(&mut value)?;
    Some(((group, topic, partition), offset, metadata))
}

impl OffsetStore {
    /// Loads the snapshot, then replays the log after it. Blocking.
    pub fn open(
        fs: Fs,
        groups_dir: PathBuf,
        log: Arc<PartitionLog>,
    ) -> Result<OffsetStore, String> {
        fs.create_dir_all(&groups_dir)
            .map_err(|error| format!("create {}: {error}", groups_dir.display()))?;
        let snapshot_path = groups_dir.join("offsets.snapshot");
        let (mut committed, covered) = match read_file(fs.as_ref(), &snapshot_path) {
            Ok(bytes) => decode_snapshot(&bytes).unwrap_or_else(|| {
                tracing::warn!(path = %snapshot_path.display(), "ignoring an unreadable offsets snapshot; replaying the whole log");
                (HashMap::new(), 0)
            }),
            Err(_) => (HashMap::new(), 0),
        };
        if log.earliest_offset() > covered {
            // Segments are deleted only once a snapshot covers them: that snapshot is lost.
            tracing::error!(
                path = %snapshot_path.display(),
                covered,
                earliest = log.earliest_offset(),
                "the offsets snapshot does not cover the deleted start of {OFFSETS_TOPIC}: commits made before the earliest offset are lost"
            );
        }
        let mut position = covered.max(log.earliest_offset());
        let end = log.latest_offset();
        let mut replayed = 0usize;
        while position < end {
            let read = log
                .read(position, 1 << 20)
                .map_err(|error| format!("replay {OFFSETS_TOPIC}: {error}"))?;
            if read.records.is_empty() {
                break;
            }
            for batch in split_batches(&read.records) {
                let batch = batch.map_err(|error| format!("replay {OFFSETS_TOPIC}: {error}"))?;
                for record in batch.records() {
                    let record =
                        record.map_err(|error| format!("replay {OFFSETS_TOPIC}: {error}"))?;
                    let record_position = record.offset(batch.base_offset());
                    if record_position < position {
                        continue;
                    }
                    let key = record.key.unwrap_or_default();
                    if record.value.is_empty() {
                        // A tombstone: the topic was deleted, or the group's offsets expired.
                        if let Some(key) = decode_key(key) {
                            if committed
                                .get(&key)
                                .is_some_and(|existing| existing.log_position < record_position)
                            {
                                committed.remove(&key);
                            }
                            replayed += 1;
                        }
                        continue;
                    }
                    if let Some((key, offset, metadata)) = decode_record(key, record.value) {
                        // The snapshot may hold a later commit applied before an earlier one.
                        let newer = committed.get(&key).is_none_or(|existing: &Committed| {
                            existing.log_position < record_position
                        });
                        if newer {
                            committed.insert(
                                key,
                                Committed {
                                    offset,
                                    metadata,
                                    log_position: record_position,
                                    committed_at_ms: u64::try_from(record.timestamp_ms)
                                        .unwrap_or(0),
                                },
                            );
                        }
                        replayed += 1;
                    }
                }
                position = batch.last_offset() + 1;
            }
        }
        tracing::info!(
            entries = committed.len(),
            replayed,
            from = covered,
            "loaded committed offsets"
        );
        let segments = log.segment_count();
        Ok(OffsetStore {
            log,
            fs,
            snapshot_path,
            state: Mutex::new(State {
                committed,
                pending: BTreeMap::new(),
                forgotten: HashMap::new(),
                segments_at_snapshot: segments,
            }),
            snapshot_written: Mutex::new(covered),
        })
    }

    /// Appends a group's commits to the log (page cache). Returns the offset to wait for
    /// durability of, and the log position of the first entry.
    pub fn append(&self, group: &str, entries: &[CommitEntry]) -> Result<(u64, u64), StorageError> {
        let mut builder = RecordBatchBuilder::new();
        let now_ms = i64::try_from(crate::now_ms()).unwrap_or(i64::MAX);
        for entry in entries {
            let key = encode_key(group, &entry.topic, entry.partition);
            let mut value = BytesMut::new();
            value.put_u8(RECORD_VERSION);
            value.put_u64(entry.offset);
            put_metadata(&mut value, entry.metadata.as_deref());
            builder.append(now_ms, Some(&key), &value, &[]);
        }
        let keys = entries
            .iter()
            .map(|entry| (group.to_owned(), entry.topic.clone(), entry.partition))
            .collect();
        // Under the lock, so a snapshot never sees the log position without the pending mark.
        let mut state = self.state.lock().expect("offsets lock poisoned");
        let info = self.log.append(builder.build())?;
        state.pending.insert(info.base_offset, keys);
        Ok((info.last_offset + 1, info.base_offset))
    }

    /// Forgets every group's commits on a deleted topic: a topic created again under its name
    /// starts with none. Appends a tombstone (empty value) per commit, which replay applies,
    /// and drops them from the table at once. Commits of the topic appended before and applied
    /// after (still waiting for their fsync) are forgotten as well. Returns the offset to wait
    /// for durability of, `None` when there was nothing to forget.
    pub fn forget_topic(&self, topic: &str) -> Result<Option<u64>, StorageError> {
        let mut state = self.state.lock().expect("offsets lock poisoned");
        let keys: BTreeSet<OffsetKey> = state
            .committed
            .keys()
            .chain(state.pending.values().flatten())
            .filter(|(_, committed_topic, _)| committed_topic == topic)
            .cloned()
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        let (first_position, next_offset) = self.write_tombstones(&mut state, &keys)?;
        state.forgotten.insert(topic.to_owned(), first_position);
        Ok(Some(next_offset))
    }

    /// Appends a tombstone (empty value) for each key, which replay applies, and drops the
    /// keys from the table. Returns the first tombstone's log position and the offset to wait
    /// for durability of. The tombstones go in as many batches as the log's
    /// `max_message_bytes` needs (tens of thousands of offsets can expire at one check); the
    /// keys of each batch leave the table as it is appended, so a failure part-way leaves the
    /// table as the log says.
    fn write_tombstones(
        &self,
        state: &mut State,
        keys: &BTreeSet<OffsetKey>,
    ) -> Result<(u64, u64), StorageError> {
        let max_batch_bytes =
            usize::try_from(self.log.config().max_message_bytes).unwrap_or(usize::MAX);
        let now_ms = i64::try_from(crate::now_ms()).unwrap_or(i64::MAX);
        let mut first_position = None;
        let mut next_offset = 0;
        let mut appended = |info: crate::storage::AppendInfo| {
            first_position.get_or_insert(info.base_offset);
            next_offset = info.last_offset + 1;
        };
        let mut builder = RecordBatchBuilder::new();
        let mut batch_keys: Vec<&OffsetKey> = Vec::new();
        for key in keys {
            let (group, topic, partition) = key;
            let encoded = encode_key(group, topic, *partition);
            if !builder.try_append(max_batch_bytes, now_ms, Some(&encoded), &[], &[]) {
                if !builder.is_empty() {
                    let full = std::mem::take(&mut builder);
                    appended(self.append_tombstones(state, full, &batch_keys)?);
                    batch_keys.clear();
                }
                // A record too large even for an empty batch goes in alone: the log refuses it.
                builder.append(now_ms, Some(&encoded), &[], &[]);
            }
            batch_keys.push(key);
        }
        if !builder.is_empty() {
            appended(self.append_tombstones(state, builder, &batch_keys)?);
        }
        Ok((first_position.unwrap_or(next_offset), next_offset))
    }

    /// Appends one batch of tombstones and drops their keys from the table.
    fn append_tombstones(
        &self,
        state: &mut State,
        builder: RecordBatchBuilder,
        keys: &[&OffsetKey],
    ) -> Result<crate::storage::AppendInfo, StorageError> {
        let info = self.log.append(builder.build())?;
        for key in keys {
            state.committed.remove(*key);
        }
        Ok(info)
    }

    /// Deletes every committed offset of each group that `expired(group, latest commit time)`
    /// says has expired, in one batch of tombstones, as [`OffsetStore::forget_topic`] does
    /// for a topic. A group with a commit still on its way to the disk is active and kept.
    /// Decided under this store's lock, on the commits as they are then. Returns the groups
    /// forgotten, with how many offsets each had. The caller holds the groups lock, so no
    /// commit is checked and appended meanwhile.
    ///
    /// # Errors
    /// The tombstones could not be appended; nothing is forgotten then.
    pub fn expire_groups(
        &self,
        expired: impl Fn(&str, u64) -> bool,
    ) -> Result<Vec<(String, usize)>, StorageError> {
        let mut state = self.state.lock().expect("offsets lock poisoned");
        let pending: BTreeSet<&str> = state
            .pending
            .values()
            .flatten()
            .map(|(group, _, _)| group.as_str())
            .collect();
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for ((group, _, _), committed) in &state.committed {
            let at = latest.entry(group.as_str()).or_default();
            *at = (*at).max(committed.committed_at_ms);
        }
        let gone: BTreeSet<String> = latest
            .into_iter()
            .filter(|(group, latest)| !pending.contains(group) && expired(group, *latest))
            .map(|(group, _)| group.to_owned())
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let keys: BTreeSet<OffsetKey> = state
            .committed
            .keys()
            .filter(|(group, _, _)| gone.contains(group))
            .cloned()
            .collect();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (group, _, _) in &keys {
            *counts.entry(group.clone()).or_default() += 1;
        }
        self.write_tombstones(&mut state, &keys)?;
        Ok(counts.into_iter().collect())
    }

    /// Forgets a commit whose durability failed: it is never applied.
    pub fn abandon(&self, first_position: u64) {
        self.state
            .lock()
            .expect("offsets lock poisoned")
            .pending
            .remove(&first_position);
    }

    /// Waits until the commits appended up to `next_offset` are fsynced.
    pub async fn wait_durable(&self, next_offset: u64) -> Result<(), StorageError> {
        self.log.wait_durable(next_offset).await
    }

    /// Makes durable commits visible. `first_position` is what [`OffsetStore::append`] returned.
    pub fn apply(&self, group: &str, entries: &[CommitEntry], first_position: u64) {
        let committed_at_ms = crate::now_ms();
        let mut state = self.state.lock().expect("offsets lock poisoned");
        state.pending.remove(&first_position);
        for (index, entry) in entries.iter().enumerate() {
            let log_position = first_position + index as u64;
            if state
                .forgotten
                .get(&entry.topic)
                .is_some_and(|tombstones| log_position < *tombstones)
            {
                continue; // its topic was deleted after this was appended
            }
            let key = (group.to_owned(), entry.topic.clone(), entry.partition);
            let newer = state
                .committed
                .get(&key)
                .is_none_or(|existing| existing.log_position < log_position);
            if newer {
                state.committed.insert(
                    key,
                    Committed {
                        offset: entry.offset,
                        metadata: entry.metadata.clone(),
                        log_position,
                        committed_at_ms,
                    },
                );
            }
        }
        // Tombstones older than every commit still pending can stop nothing any more.
        let oldest_pending = state.pending.first_key_value().map(|(first, _)| *first);
        state
            .forgotten
            .retain(|_, tombstones| oldest_pending.is_some_and(|oldest| oldest < *tombstones));
        let segments = self.log.segment_count();
        if segments != state.segments_at_snapshot {
            state.segments_at_snapshot = segments;
            // Only what is durable: a commit whose fsync failed is in the log but may be lost
            // in a crash, and commits made after would then sit below a covered offset that
            // replay skips.
            let durable = self.log.durable_offset();
            let covered = state
                .pending
                .first_key_value()
                .map_or(durable, |(first, _)| (*first).min(durable));
            let bytes = encode_snapshot(&state.committed, covered);
            drop(state);
            let mut written = self
                .snapshot_written
                .lock()
                .expect("offsets snapshot lock poisoned");
            if covered < *written {
                return;
            }
            // Off the runtime's hot path in practice: a roll happens once per segment.
            if let Err(error) = write_file_durably(self.fs.as_ref(), &self.snapshot_path, &bytes) {
                tracing::warn!(path = %self.snapshot_path.display(), %error, "offsets snapshot failed; start-up will replay more");
                return;
            }
            *written = covered;
            // The snapshot holds everything below `covered`: the segments before it go.
            match self.log.delete_segments_before(covered) {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(
                    deleted,
                    covered,
                    "removed offsets segments covered by the snapshot"
                ),
                Err(error) => {
                    tracing::warn!(%error, "removing covered offsets segments failed")
                }
            }
        }
    }

    /// The committed offset of one partition.
    pub fn get(&self, group: &str, topic: &str, partition: u32) -> Option<Committed> {
        let state = self.state.lock().expect("offsets lock poisoned");
        state
            .committed
            .get(&(group.to_owned(), topic.to_owned(), partition))
            .cloned()
    }

    /// Whether a group has committed anything.
    pub fn has_group(&self, group: &str) -> bool {
        let state = self.state.lock().expect("offsets lock poisoned");
        state.committed.keys().any(|(owner, _, _)| owner == group)
    }

    /// Every committed offset of a group, sorted.
    pub fn group_offsets(&self, group: &str) -> Vec<(String, u32, Committed)> {
        let state = self.state.lock().expect("offsets lock poisoned");
        let mut out: Vec<(String, u32, Committed)> = state
            .committed
            .iter()
            .filter(|((owner, _, _), _)| owner == group)
            .map(|((_, topic, partition), committed)| {
                (topic.clone(), *partition, committed.clone())
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> BTreeSet<String> {
        let state = self.state.lock().expect("offsets lock poisoned");
        state
            .committed
            .keys()
            .map(|(group, _, _)| group.clone())
            .collect()
    }
}

pub(crate) fn encode_snapshot(committed: &HashMap<OffsetKey, Committed>, covered: u64) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_slice(SNAPSHOT_MAGIC);
    out.put_u8(SNAPSHOT_VERSION);
    out.put_u64(covered);
    out.put_u32(committed.len() as u32);
    for ((group, topic, partition), entry) in committed {
        put_short_string(&mut out, group);
        put_short_string(&mut out, topic);
        out.put_u32(*partition);
        out.put_u64(entry.offset);
        out.put_u64(entry.log_position);
        out.put_u64(entry.committed_at_ms);
        put_metadata(&mut out, entry.metadata.as_deref());
    }
    let crc = sluice_protocol::checksum::crc32c(&out);
    out.put_u32(crc);
    out.to_vec()
}

pub(crate) fn decode_snapshot(bytes: &[u8]) -> Option<(HashMap<OffsetKey, Committed>, u64)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if sluice_protocol::checksum::crc32c(body).to_be_bytes() != crc {
        return None;
    }
    let mut src = body;
    if src.get(..4)? != SNAPSHOT_MAGIC {
        return None;
    }
    src.advance(4);
    if src.remaining() < 13 {
        return None;
    }
    let version = src.get_u8();
    if version != 1 && version != SNAPSHOT_VERSION {
        return None;
    }
    let covered = src.get_u64();
    let count = src.get_u32();
    let mut committed = HashMap::new();
    for _ in 0..count {
        let group = get_short_string(&mut src)?;
        let topic = get_short_string(&mut src)?;
        if src.remaining() < if version == 1 { 20 } else { 28 } {
            return None;
        }
        let partition = src.get_u32();
        let offset = src.get_u64();
        let log_position = src.get_u64();
        let committed_at_ms = if version == 1 { 0 } else { src.get_u64() };
        let metadata = get_metadata(&mut src)?;
        committed.insert(
            (group, topic, partition),
            Committed {
                offset,
                metadata,
                log_position,
                committed_at_ms,
            },
        );
    }
    src.is_empty().then_some((committed, covered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let key = encode_key("g", "orders", 7);
        let mut value = BytesMut::new();
        value.put_u8(RECORD_VERSION);
        value.put_u64(42);
        put_metadata(&mut value, Some("m"));
        let decoded = decode_record(&key, &value).unwrap();
        assert_eq!(
            decoded,
            (("g".into(), "orders".into(), 7), 42, Some("m".into()))
        );
        assert!(decode_record(&key[..key.len() - 1], &value).is_none());
        assert!(decode_record(&key, &value[..5]).is_none());
    }

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let mut committed = HashMap::new();
        committed.insert(
            ("g".into(), "t".into(), 1),
            Committed {
                offset: 5,
                metadata: None,
                log_position: 3,
                committed_at_ms: 1_700_000_000_000,
            },
        );
        committed.insert(
            ("h".into(), "t".into(), 0),
            Committed {
                offset: 9,
                metadata: Some("x".into()),
                log_position: 8,
                committed_at_ms: 0,
            },
        );
        let bytes = encode_snapshot(&committed, 77);
        let (decoded, covered) = decode_snapshot(&bytes).unwrap();
        assert_eq!(covered, 77);
        assert_eq!(decoded, committed);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x20;
            assert!(decode_snapshot(&damaged).is_none(), "flip at {position}");
        }
    }
}

#[cfg(test)]
mod store_tests {
    use std::path::Path;

    use super::*;
    use crate::storage::faultfs::FaultFs;
    use crate::storage::{LogConfig, Storage, StorageOptions};

    fn open(storage: &Storage, fs: &Fs) -> OffsetStore {
        open_with(storage, fs, LogConfig::default())
    }

    fn open_with(storage: &Storage, fs: &Fs, config: LogConfig) -> OffsetStore {
        let log = storage
            .open_log(Path::new("/data/topics/__consumer_offsets/0"), config)
            .unwrap();
        OffsetStore::open(Arc::clone(fs), "/data/groups".into(), log).unwrap()
    }

    fn entry(topic: &str, offset: u64) -> CommitEntry {
        CommitEntry {
            topic: topic.into(),
            partition: 0,
            offset,
            metadata: None,
        }
    }

    /// A commit appended before its topic was deleted, and applied after (it waited for its
    /// fsync meanwhile), does not bring the deleted topic's offset back: not when it is
    /// applied, not on replay after a restart.
    #[tokio::test]
    async fn a_commit_pending_while_its_topic_is_forgotten_stays_forgotten() {
        let fs: Fs = Arc::new(FaultFs::new());
        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let store = open(&storage, &fs);
        let kept = [entry("u", 9)];
        let (next, first) = store.append("g", &kept).unwrap();
        store.wait_durable(next).await.unwrap();
        store.apply("g", &kept, first);

        let late = [entry("t", 5)];
        let (next, first) = store.append("g", &late).unwrap();
        let tombstones = store
            .forget_topic("t")
            .unwrap()
            .expect("the pending commit");
        store.wait_durable(next.max(tombstones)).await.unwrap();
        store.apply("g", &late, first);
        let offsets = |store: &OffsetStore| -> Vec<(String, u64)> {
            store
                .group_offsets("g")
                .into_iter()
                .map(|(topic, _, committed)| (topic, committed.offset))
                .collect()
        };
        assert_eq!(offsets(&store), [("u".to_owned(), 9)]);

        // A topic created again under the name takes commits as usual.
        let again = [entry("t", 2)];
        let (next, first) = store.append("g", &again).unwrap();
        store.wait_durable(next).await.unwrap();
        store.apply("g", &again, first);
        assert_eq!(offsets(&store), [("t".to_owned(), 2), ("u".to_owned(), 9)]);
        drop(store);
        storage.shutdown();

        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let replayed = open(&storage, &fs);
        assert_eq!(
            offsets(&replayed),
            [("t".to_owned(), 2), ("u".to_owned(), 9)]
        );
        storage.shutdown();
    }

    /// An expired group's offsets go, also on replay, and other groups' stay; a group with a
    /// commit still on its way to the disk is not expired. Replayed commits keep when they
    /// were made.
    #[tokio::test]
    async fn an_expired_groups_offsets_go_and_stay_gone() {
        let fs: Fs = Arc::new(FaultFs::new());
        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let store = open(&storage, &fs);
        let before_ms = crate::now_ms();
        for group in ["gone", "kept"] {
            let entries = [entry("t", 3), entry("u", 4)];
            let (next, first) = store.append(group, &entries).unwrap();
            store.wait_durable(next).await.unwrap();
            store.apply(group, &entries, first);
        }
        let latest = latest_commits(&store);
        assert_eq!(latest.len(), 2);
        assert!(latest.values().all(|at| *at >= before_ms), "{latest:?}");

        let pending = [entry("t", 5)];
        let (next, first) = store.append("gone", &pending).unwrap();
        let gone = |group: &str, _: u64| group == "gone";
        assert_eq!(
            store.expire_groups(gone).unwrap(),
            [],
            "a commit is pending"
        );
        store.wait_durable(next).await.unwrap();
        store.apply("gone", &pending, first);
        assert_eq!(store.expire_groups(gone).unwrap(), [("gone".to_owned(), 2)]);
        assert!(!store.has_group("gone"));
        assert_eq!(store.expire_groups(gone).unwrap(), [], "nothing left");
        assert_eq!(store.group_offsets("kept").len(), 2);
        store.wait_durable(store.log.latest_offset()).await.unwrap();
        drop(store);
        storage.shutdown();

        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let replayed = open(&storage, &fs);
        assert!(!replayed.has_group("gone"));
        assert_eq!(replayed.group_offsets("kept").len(), 2);
        let latest = latest_commits(&replayed);
        assert!(latest["kept"] >= before_ms, "{latest:?}");
        storage.shutdown();
    }

    /// More tombstones than one batch of the log's `max_message_bytes` holds go in several
    /// batches: expiring the groups, and forgetting a topic, succeed, and stay so on replay.
    #[tokio::test]
    async fn tombstones_over_one_batch_go_in_several() {
        let fs: Fs = Arc::new(FaultFs::new());
        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let config = || LogConfig {
            max_message_bytes: 2048,
            ..LogConfig::default()
        };
        let store = open_with(&storage, &fs, config());
        let commit = |group: &str, topic: &str, partitions: std::ops::Range<u32>| {
            let entries: Vec<CommitEntry> = partitions
                .map(|partition| CommitEntry {
                    partition,
                    ..entry(topic, u64::from(partition))
                })
                .collect();
            let (next, first) = store.append(group, &entries).unwrap();
            store.apply(group, &entries, first);
            next
        };
        // 40 commits of 20 partitions each. A tombstone takes about 20 bytes: 400 of them for
        // "gone" and 200 for "kept" on topic "t" fill several batches of 2 KiB each.
        let mut next = 0;
        for round in 0..10 {
            let partitions = round * 20..round * 20 + 20;
            next = next.max(commit("gone", "t", partitions.clone()));
            next = next.max(commit("gone", "u", partitions.clone()));
            next = next.max(commit("kept", "t", partitions.clone()));
            next = next.max(commit("kept", "u", partitions));
        }
        store.wait_durable(next).await.unwrap();
        let before = store.log.latest_offset();

        let gone = |group: &str, _: u64| group == "gone";
        assert_eq!(
            store.expire_groups(gone).unwrap(),
            [("gone".to_owned(), 400)]
        );
        assert!(!store.has_group("gone"));
        let tombstones = store.log.latest_offset() - before;
        assert_eq!(tombstones, 400, "one record each");
        let read = store.log.read(before, 1 << 20).unwrap();
        let batches = split_batches(&read.records).count();
        assert!(batches > 1, "{batches} batch(es)");

        let forgotten = store
            .forget_topic("t")
            .unwrap()
            .expect("kept's commits on t");
        store.wait_durable(forgotten).await.unwrap();
        let topics = |store: &OffsetStore| -> BTreeSet<String> {
            store
                .group_offsets("kept")
                .into_iter()
                .map(|(topic, _, _)| topic)
                .collect()
        };
        assert_eq!(topics(&store), BTreeSet::from(["u".to_owned()]));
        assert_eq!(store.group_offsets("kept").len(), 200);
        drop(store);
        storage.shutdown();

        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let replayed = open_with(&storage, &fs, config());
        assert!(!replayed.has_group("gone"));
        assert_eq!(topics(&replayed), BTreeSet::from(["u".to_owned()]));
        assert_eq!(replayed.group_offsets("kept").len(), 200);
        storage.shutdown();
    }

    /// Each group's latest commit time, as `expire_groups` sees it.
    fn latest_commits(store: &OffsetStore) -> HashMap<String, u64> {
        let seen = std::sync::Mutex::new(HashMap::new());
        let expired = store
            .expire_groups(|group, latest| {
                seen.lock().unwrap().insert(group.to_owned(), latest);
                false
            })
            .unwrap();
        assert!(expired.is_empty());
        seen.into_inner().unwrap()
    }

    /// A version 1 snapshot (before commit times were kept) still loads, its commit times
    /// unknown.
    #[test]
    fn a_version_1_snapshot_loads_without_commit_times() {
        let mut committed = HashMap::new();
        committed.insert(
            ("g".into(), "t".into(), 1),
            Committed {
                offset: 5,
                metadata: Some("m".into()),
                log_position: 3,
                committed_at_ms: 0,
            },
        );
        let mut v1 = BytesMut::new();
        v1.put_slice(SNAPSHOT_MAGIC);
        v1.put_u8(1);
        v1.put_u64(77);
        v1.put_u32(1);
        put_short_string(&mut v1, "g");
        put_short_string(&mut v1, "t");
        v1.put_u32(1);
        v1.put_u64(5);
        v1.put_u64(3);
        put_metadata(&mut v1, Some("m"));
        let crc = sluice_protocol::checksum::crc32c(&v1);
        v1.put_u32(crc);
        assert_eq!(decode_snapshot(&v1), Some((committed, 77)));
    }
}
