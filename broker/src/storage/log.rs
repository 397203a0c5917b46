//! `PartitionLog`: one partition's append-only log of record batches in segment files.
//!
//! ```text
//! append(batch) ── writer lock ──▶ stamp base_offset ─▶ write_all_at(end of active segment)
//!                                   │                     (page cache; rolls first if full/old)
//!                                   ▼
//!                     index entry, segment size (Release) ─▶ high watermark (Release) ─▶ wake fetches
//! wait_durable(next) ── waiter + requested offset ──▶ flusher: fsync ─▶ durable offset ─▶ waiters
//! read(offset, max) ── segment list (read lock) ─▶ sparse index ─▶ pread whole batches
//! ```
//!
//! One writer at a time (a mutex held only for the page-cache write), any number of readers:
//! readers take no lock the writer holds while writing, and use positional reads of bytes the
//! writer has already published.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use sluice_protocol::RecordBatch;
use sluice_protocol::batch::{
    HEADER_BYTES, LOG_OVERHEAD_BYTES, MAGIC, NO_PRODUCER_ID, RecordBatchRef, batch_base_timestamp,
    batch_size, split_batches, stamp_base_offset, stamp_leader_epoch,
};
use tokio::sync::oneshot;

use super::StorageShared;
use super::config::{FsyncPolicy, LogConfig};
use super::error::{Result, StorageError};
use super::fs::{FileHandle, read_file, write_file_durably};
use super::group_commit::{GroupCommit, Registered};
use super::index::{IndexEntry, SegmentIndex};
use super::recovery::{self, Recovered};
use super::segment::{Segment, SegmentPaths};
use super::signal::HighWatermark;
use crate::now_ms;
use crate::producers::state::{Verdict, decode_snapshot};
use crate::producers::{BatchMetadata, IncomingBatch, ProducerEntry, ProducerStateTable};

/// Where an appended batch went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    pub log_start_offset: u64,
}

/// What an idempotent append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotentAppend {
    /// Where the batch is: just written, or where its original went.
    pub info: AppendInfo,
    /// The batch was a retry of one already in the log and was not written again.
    pub duplicate: bool,
}

/// What a read returned: whole batches, back to back, as they were appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub records: Bytes,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

/// The file name of the recovery-point checkpoint in a partition directory.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";

/// Reads of at least this many bytes map the segment's pages instead of copying them (see
/// [`StorageFile::map`](super::fs::StorageFile::map)); below it a copy costs less than a mapping.
const MAP_AT_LEAST: usize = 64 * 1024;

/// A copied read whose whole batches leave more than this unused (a partial batch at its end)
/// is copied again at their length, so the memory it holds is what the fetch budget counts.
const TRAILING_COPY_SLACK: usize = 4 * 1024;

/// Bytes read at once while walking batch headers to the batch that holds an offset: a sparse
/// index entry's worth (`index_interval_bytes` is 4 KiB by default), so a walk over small
/// batches costs one read instead of one per batch, and a read of the last few records at the
/// end of the log is often in it already.
const WALK_CHUNK_BYTES: usize = 4096;

/// The bytes a header walk read last: one read at a time of up to [`WALK_CHUNK_BYTES`], from
/// the header it needed.
struct WalkChunk {
    bytes: [u8; WALK_CHUNK_BYTES],
    /// File position of `bytes[0]`, and how many are valid.
    start: u64,
    len: usize,
}

impl WalkChunk {
    fn new() -> Self {
        WalkChunk {
            bytes: [0; WALK_CHUNK_BYTES],
            start: 0,
            len: 0,
        }
    }

    fn get(&self, position: u64, len: usize) -> Option<&[u8]> {
        let from = usize::try_from(position.checked_sub(self.start)?).ok()?;
        self.bytes[..self.len].get(from..from.checked_add(len)?)
    }

    /// The header probe at `position`, which ends at or before `end` (the segment's size):
    /// from the chunk, or after reading the chunk that starts there, as far as `end` allows.
    fn header(
        &mut self,
        position: u64,
        end: u64,
        read_exact: impl FnOnce(&mut [u8], u64) -> Result<()>,
    ) -> Result<[u8; HEADER_PROBE_BYTES]> {
        if let Some(header) = self.get(position, HEADER_PROBE_BYTES) {
            return Ok(header.try_into().expect("a header probe"));
        }
        let room = usize::try_from(end.saturating_sub(position)).unwrap_or(usize::MAX);
        let len = room.clamp(HEADER_PROBE_BYTES, WALK_CHUNK_BYTES);
        self.len = 0;
        read_exact(&mut self.bytes[..len], position)?;
        self.start = position;
        self.len = len;
        Ok(self.bytes[..HEADER_PROBE_BYTES]
            .try_into()
            .expect("a header probe"))
    }
}

/// Bytes read at a time when looking for the batch that holds an offset.
const HEADER_PROBE_BYTES: usize = 27;

/// Extension of producer-state snapshot files (see `SegmentPaths`).
pub const SNAPSHOT_EXTENSION: &str = "snapshot";
/// Producer snapshots kept per partition: the newest, and one to fall back on.
const SNAPSHOTS_KEPT: usize = 2;
/// Bytes read at a time when replaying batch headers into the producer state.
const REPLAY_CHUNK_BYTES: usize = 1 << 20;

/// Appends of at least this many bytes reserve the active segment's disk space ahead of them
/// (see [`Writer::preallocated_to`]); smaller ones come from partitions too slow to gain.
const PREALLOCATE_MIN_WRITE: u64 = 64 * 1024;

/// How far ahead of an append its segment's space is reserved: eight such appends, at most
/// this much, so a partition holds at most this much disk past its end.
const PREALLOCATE_MAX_AHEAD: u64 = 8 << 20;

/// Up to where an append of `len` bytes that ends at `end` reserves its file's space: eight
/// such appends further, at most 8 MiB (`PREALLOCATE_MAX_AHEAD`; a segment also stops at
/// `segment_bytes`). Public so the benchmarks' page-cache limit reserves as the broker does.
pub fn reservation_end(end: u64, len: u64) -> u64 {
    end + (len * 8).min(PREALLOCATE_MAX_AHEAD)
}

// Where the producer fields sit in a batch header (see `sluice_protocol::batch`).
const LAST_OFFSET_DELTA_AT: usize = 23;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;

#[derive(Debug)]
struct Writer {
    active: Arc<Segment>,
    active_file: FileHandle,
    /// Wall-clock time of the active segment's first append, for `segment_ms`.
    active_since_ms: Option<u64>,
    next_offset: u64,
    /// Bytes appended since the log was opened, published with the high watermark.
    appended_bytes: u64,
    /// Files of rolled segments with data the flusher has not synced yet.
    unsynced_files: Vec<FileHandle>,
    /// A segment file was created since the directory was last synced.
    directory_dirty: bool,
    /// Idempotent-producer state, checked and updated with each append under this lock.
    producers: ProducerStateTable,
    /// The crc32c field of the log's last batch: the anchor of a snapshot taken at the end of
    /// the log. `None` when the log is empty or its last batch could not be read on open.
    last_batch_crc: Option<u32>,
    /// Up to where the active segment's file has disk space reserved (`fallocate` keeping its
    /// length), when it may hold some past its end: `Some(0)` for the segment a log opens
    /// with, which a crash may have left so. Big appends reserve ahead, so the filesystem
    /// allocates their blocks once per reservation instead of block by block on every write
    /// (ext4's delayed allocation bookkeeping was a third of a 1 MiB write's cost). The space
    /// past the end is given back when the segment rolls or the log closes.
    preallocated_to: Option<u64>,
}

impl Writer {
    /// Reserves the active segment's space ahead of an append of `len` bytes at `position`,
    /// when the append is big and the last reservation does not cover it.
    fn preallocate_for(&mut self, position: u64, len: u64, segment_bytes: u64) {
        let end = position + len;
        if len < PREALLOCATE_MIN_WRITE || end <= self.preallocated_to.unwrap_or(0) {
            return;
        }
        let to = reservation_end(end, len).min(segment_bytes.max(end));
        match self.active_file.preallocate(position, to - position) {
            Ok(()) => {}
            // Unsupported here, or the disk is full (which the write reports): the writes up
            // to `to` allocate as they go, and the range is not asked for again.
            Err(error) => tracing::debug!(
                segment = %self.active.paths.log.display(),
                %error,
                "could not reserve segment space ahead"
            ),
        }
        self.preallocated_to = Some(to);
    }

    /// Gives back the disk space the active segment's file holds past its end, if it may hold
    /// any. Its length and contents do not change.
    fn release_preallocation(&mut self) {
        if self.preallocated_to.take().is_none() {
            return;
        }
        if let Err(error) = self.active_file.set_len(self.active.size_bytes()) {
            tracing::debug!(
                segment = %self.active.paths.log.display(),
                %error,
                "could not give back reserved segment space"
            );
        }
    }
}

/// One partition's log. Shared as `Arc<PartitionLog>`.
#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    shared: Arc<StorageShared>,
    writer: Mutex<Writer>,
    /// Every segment, oldest first; the last is the active one.
    segments: RwLock<Vec<Arc<Segment>>>,
    high_watermark: HighWatermark,
    log_start_offset: AtomicU64,
    /// Group commit: who waits for which offset, and whether a sync job is queued.
    durability: GroupCommit<oneshot::Sender<std::result::Result<(), String>>>,
    /// Set once: why the partition refuses writes.
    poisoned: Mutex<Option<String>>,
    is_poisoned: AtomicBool,
    /// Weak-ack data waits for the interval flush.
    dirty: AtomicBool,
    /// A roll left a file for the next sync to close (`fsync=never` asks for one then).
    rolled_unsynced: AtomicBool,
    /// An fsync of this log failed: no later one counts (see `run_sync`).
    fsync_failed: AtomicBool,
    fsyncs: AtomicU64,
    last_checkpoint: Mutex<Option<u64>>,
    /// Serialises writes of producer snapshots (the flusher's and close's) and deletions of
    /// segment files: `close` takes it last, so no write or deletion runs after it returns.
    snapshot_lock: Mutex<()>,
    /// Serialises writing closed segments' index files: `close` and the flusher may both
    /// write one, and two writers of the same temporary file would truncate each other's.
    index_lock: Mutex<()>,
    /// Set when `close` starts: snapshots the flusher still has queued are not written into
    /// a directory that may be about to be deleted.
    closing: AtomicBool,
}

/// When a recovered active segment started, for `segment_ms`: its first batch's timestamp,
/// no later than now (a clock or producer far ahead must not hold the roll off), or `None`
/// for an empty segment. Without it, every restart would start the segment's age again, and
/// a partition restarted more often than `segment_ms` would never roll, nor retention
/// delete anything of it.
fn active_since(active: &Segment, file: &FileHandle, now_ms: u64) -> Option<u64> {
    if active.size_bytes() < HEADER_BYTES as u64 {
        return None;
    }
    let mut header = [0u8; HEADER_BYTES];
    let timestamp = match file.read_at(&mut header, 0) {
        Ok(HEADER_BYTES) => batch_base_timestamp(&header),
        // Unreadable now: the append path reports it; count the age from now.
        _ => None,
    };
    Some(timestamp.map_or(now_ms, |timestamp| {
        u64::try_from(timestamp).unwrap_or(0).min(now_ms)
    }))
}

impl PartitionLog {
    /// Opens (recovering) or creates the log in `dir`.
    pub(crate) fn open(
        shared: Arc<StorageShared>,
        dir: &Path,
        config: LogConfig,
    ) -> Result<Arc<PartitionLog>> {
        config
            .validate()
            .map_err(|reason| StorageError::io("log config", std::io::Error::other(reason)))?;
        let recovered: Recovered = recovery::recover(shared.fs.as_ref(), dir, &config)?;
        // Recovery's fsyncs are fsyncs like any other (`sluice_fsyncs_total`).
        for elapsed in &recovered.fsyncs {
            shared.observe_fsync(*elapsed);
        }
        let next_offset = recovered.next_offset;
        let log_start_offset = recovered
            .segments
            .first()
            .map_or(next_offset, |segment| segment.base_offset);
        let active = recovered
            .segments
            .last()
            .cloned()
            .expect("recovery leaves at least one segment");
        let active_file = active
            .active_file()
            .expect("recovery leaves the last segment active");
        let poisoned = recovered.corruption.clone();
        let active_since_ms = active_since(&active, &active_file, now_ms());
        let log = Arc::new(PartitionLog {
            dir: dir.to_path_buf(),
            config,
            writer: Mutex::new(Writer {
                active,
                active_file,
                active_since_ms,
                next_offset,
                appended_bytes: 0,
                unsynced_files: Vec::new(),
                directory_dirty: false,
                producers: ProducerStateTable::new(
                    Arc::clone(&shared.producer_budget),
                    shared.producer_expiry_ms,
                ),
                last_batch_crc: None,
                // A crash may have left space reserved past the segment's end (even with
                // nothing of the append that reserved it on disk): given back at its roll.
                preallocated_to: Some(0),
            }),
            segments: RwLock::new(recovered.segments),
            high_watermark: HighWatermark::new(next_offset),
            log_start_offset: AtomicU64::new(log_start_offset),
            durability: GroupCommit::new(recovered.durable_offset),
            is_poisoned: AtomicBool::new(poisoned.is_some()),
            poisoned: Mutex::new(poisoned),
            dirty: AtomicBool::new(false),
            rolled_unsynced: AtomicBool::new(false),
            fsync_failed: AtomicBool::new(false),
            fsyncs: AtomicU64::new(recovered.fsyncs.len() as u64),
            last_checkpoint: Mutex::new(None),
            snapshot_lock: Mutex::new(()),
            index_lock: Mutex::new(()),
            closing: AtomicBool::new(false),
            shared,
        });
        if log.poison_reason().is_none() {
            match log.rebuild_producer_state() {
                // `corrupt` has poisoned the partition: its producer state cannot be known.
                Ok(()) | Err(StorageError::Corrupt { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        if let Some(reason) = log.poison_reason() {
            tracing::error!(dir = %log.dir.display(), %reason, "partition refuses writes");
        } else {
            log.checkpoint_recovery_point()?;
        }
        log.shared.flusher.register(Arc::downgrade(&log));
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The offset the next appended record gets (the high watermark).
    pub fn latest_offset(&self) -> u64 {
        self.high_watermark.get()
    }

    /// The first offset still in the log.
    pub fn earliest_offset(&self) -> u64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    /// The high watermark, for long polls that wait for data.
    pub fn high_watermark(&self) -> &HighWatermark {
        &self.high_watermark
    }

    /// Every offset below this is fsynced.
    pub fn durable_offset(&self) -> u64 {
        self.durability.durable_offset()
    }

    /// fsyncs of this log's segment files so far.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.read().expect("segments lock poisoned").len()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_base_offsets(&self) -> Vec<u64> {
        let segments = self.segments.read().expect("segments lock poisoned");
        segments.iter().map(|segment| segment.base_offset).collect()
    }

    pub fn size_bytes(&self) -> u64 {
        let segments = self.segments.read().expect("segments lock poisoned");
        segments.iter().map(|segment| segment.size_bytes()).sum()
    }

    /// Why the partition refuses writes, if it does.
    pub fn poison_reason(&self) -> Option<String> {
        self.poisoned.lock().expect("poison lock poisoned").clone()
    }

    fn poison(&self, reason: String) {
        let mut poisoned = self.poisoned.lock().expect("poison lock poisoned");
        if poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), %reason, "partition refuses writes");
            *poisoned = Some(reason);
            self.is_poisoned.store(true, Ordering::Release);
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned {
                reason: self.poison_reason().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// [`check_writable`](Self::check_writable) for a write about to be made: its refusal says
    /// that nothing of it was written.
    fn check_appendable(&self) -> Result<()> {
        self.check_writable().map_err(|error| match error {
            StorageError::Poisoned { reason } => StorageError::Refused { reason },
            other => other,
        })
    }

    /// Appends a batch the caller has validated (`RecordBatch::validate`), stamping its base
    /// offset. The bytes are in the page cache when this returns; call
    /// [`PartitionLog::wait_durable`] for fsync.
    ///
    /// # Errors
    /// `BatchTooLarge` over `max_message_bytes`; `Refused` once the partition refuses writes;
    /// `Io` when the write failed, in which case nothing of the batch is visible and the log is
    /// as it was.
    pub fn append(self: &Arc<Self>, batch: RecordBatch) -> Result<AppendInfo> {
        self.append_at(batch, now_ms())
    }

    /// [`PartitionLog::append`] with the wall-clock time given, for tests of time-based rolls.
    pub fn append_at(self: &Arc<Self>, batch: RecordBatch, now_ms: u64) -> Result<AppendInfo> {
        self.check_batch(&batch)?;
        let info = {
            let mut writer = self.writer.lock().expect("writer lock poisoned");
            self.check_appendable()?;
            self.write_batch(&mut writer, batch, now_ms)?
        };
        self.after_append();
        Ok(info)
    }

    /// Appends a validated batch from an idempotent producer (`producer_id` set), checking its
    /// epoch and sequence against the partition's producer state in the same critical section
    /// as the write (rules in [`crate::producers`]). A retry of one of the producer's last
    /// batches is not written again: it is answered with the original's offsets and
    /// `duplicate` set; wait for durability on `info.last_offset + 1` as for any append.
    ///
    /// `fence_epoch(producer_id)` is the lowest epoch the broker still allows for the id. It is
    /// called under the writer lock, so a fence raised before the call is never missed.
    ///
    /// # Errors
    /// [`StorageError::Producer`] when the producer rules refuse the batch (nothing written),
    /// and everything [`PartitionLog::append`] returns.
    pub fn append_idempotent(
        self: &Arc<Self>,
        batch: RecordBatch,
        fence_epoch: &dyn Fn(u64) -> u16,
    ) -> Result<IdempotentAppend> {
        self.append_idempotent_at(batch, now_ms(), fence_epoch)
    }

    /// [`PartitionLog::append_idempotent`] with the wall-clock time given.
    pub fn append_idempotent_at(
        self: &Arc<Self>,
        batch: RecordBatch,
        now_ms: u64,
        fence_epoch: &dyn Fn(u64) -> u16,
    ) -> Result<IdempotentAppend> {
        self.check_batch(&batch)?;
        let view = batch.view();
        assert!(
            view.has_producer_id(),
            "idempotent append of a batch without a producer id"
        );
        let incoming = IncomingBatch::of(&view);
        let max_timestamp_ms = view.max_timestamp();
        let appended = {
            let mut writer = self.writer.lock().expect("writer lock poisoned");
            self.check_appendable()?;
            let floor = fence_epoch(incoming.producer_id);
            match writer.producers.check(&incoming, floor, now_ms)? {
                Verdict::Duplicate(original) => {
                    return Ok(IdempotentAppend {
                        info: AppendInfo {
                            base_offset: original.base_offset,
                            last_offset: original.last_offset,
                            log_start_offset: self.earliest_offset(),
                        },
                        duplicate: true,
                    });
                }
                // A failed write drops the reservation, which gives it back.
                Verdict::Append(reservation) => {
                    let info = self.write_batch(&mut writer, batch, now_ms)?;
                    let last_sequence = incoming
                        .last_sequence()
                        .expect("check refuses sequences that overflow");
                    writer.producers.record(
                        incoming.producer_id,
                        BatchMetadata {
                            producer_epoch: incoming.producer_epoch,
                            first_sequence: incoming.first_sequence,
                            last_sequence,
                            base_offset: info.base_offset,
                            last_offset: info.last_offset,
                            max_timestamp_ms,
                        },
                        reservation,
                        now_ms,
                    );
                    info
                }
            }
        };
        self.after_append();
        Ok(IdempotentAppend {
            info: appended,
            duplicate: false,
        })
    }

    fn check_batch(&self, batch: &RecordBatch) -> Result<()> {
        let size_bytes = batch.size_bytes() as u64;
        if size_bytes > self.config.max_message_bytes {
            return Err(StorageError::BatchTooLarge {
                size_bytes,
                max_message_bytes: self.config.max_message_bytes,
            });
        }
        assert!(
            batch.record_count() > 0,
            "append of a batch that was not validated"
        );
        Ok(())
    }

    /// Writes a checked batch at the end of the log (rolling first when the active segment is
    /// full or old) and publishes it. Writer lock held.
    fn write_batch(
        self: &Arc<Self>,
        writer: &mut Writer,
        batch: RecordBatch,
        now_ms: u64,
    ) -> Result<AppendInfo> {
        let size_bytes = batch.size_bytes() as u64;
        let active_size = writer.active.size_bytes();
        let too_big = active_size + size_bytes > self.config.segment_bytes;
        let too_old = writer
            .active_since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= self.config.segment_ms);
        if active_size > 0 && (too_big || too_old) {
            self.roll(writer, now_ms)?;
        }
        let base_offset = writer.next_offset;
        let view = batch.view();
        let last_offset = base_offset + u64::from(view.last_offset_delta());
        // The batch goes to the file as received, but for the header's stamped fields: the
        // header is stamped in a copy and written with the rest in one vectored write, so
        // the records are not copied (the batch shares its buffer with the request frame).
        let bytes = batch.as_bytes();
        let mut header = [0u8; HEADER_BYTES];
        header.copy_from_slice(&bytes[..HEADER_BYTES]);
        stamp_base_offset(&mut header, base_offset).expect("a whole header");
        stamp_leader_epoch(&mut header, 0).expect("a whole header");
        let position = writer.active.size_bytes();
        writer.preallocate_for(position, size_bytes, self.config.segment_bytes);
        if let Err(error) = writer
            .active_file
            .write_all_vectored_at(&[&header, &bytes[HEADER_BYTES..]], position)
        {
            // Part of the batch may be in the file: cut it off so the log stays whole.
            if let Err(truncate_error) = writer.active_file.set_len(position) {
                self.poison(format!(
                    "write to {} failed ({error}) and could not be undone ({truncate_error})",
                    writer.active.paths.log.display()
                ));
            }
            return Err(StorageError::io(
                format!("append to {}", writer.active.paths.log.display()),
                error,
            ));
        }
        let relative_offset = u32::try_from(base_offset - writer.active.base_offset)
            .expect("segment offset span over u32 (segments roll long before)");
        let position_u32 =
            u32::try_from(position).expect("segment position over u32 (segment_bytes bounds it)");
        writer.active.on_appended(
            relative_offset,
            position_u32,
            size_bytes,
            last_offset + 1,
            view.max_timestamp(),
            self.config.index_interval_bytes,
        );
        writer.next_offset = last_offset + 1;
        writer.last_batch_crc = Some(view.crc());
        writer.active_since_ms.get_or_insert(now_ms);
        // Published after the bytes are in the file and the segment size is updated.
        writer.appended_bytes += size_bytes;
        self.high_watermark
            .publish(writer.next_offset, writer.appended_bytes);
        Ok(AppendInfo {
            base_offset,
            last_offset,
            log_start_offset: self.earliest_offset(),
        })
    }

    /// After the writer lock is released: the fsync policy for weak-ack data.
    fn after_append(self: &Arc<Self>) {
        match self.shared.fsync {
            FsyncPolicy::Always => self.request_sync(None),
            FsyncPolicy::Interval(_) => {
                if !self.dirty.swap(true, Ordering::AcqRel) {
                    self.shared.flusher.mark_dirty(Arc::clone(self));
                }
            }
            // A rolled segment's file stays open until a sync closes it: one each roll, so
            // descriptors (and the disk space of segments retention deletes) stay bounded.
            FsyncPolicy::Never => {
                if self.rolled_unsynced.swap(false, Ordering::AcqRel) {
                    self.request_sync(None);
                }
            }
        }
    }

    /// Closes the active segment and starts a new one. Runs under the writer lock, so it does
    /// no fsync: the flusher syncs the new file's directory entry before any offset in it
    /// counts as durable, and writes the closed segment's indexes (readers use the in-memory
    /// copy until then).
    ///
    /// The producer state is snapshotted here too. It must describe exactly the batches below
    /// the new segment, so it is encoded now, under the lock, and handed to the flusher to
    /// write durably. Nothing relies on the file before it is whole: recovery ignores `.tmp`
    /// leftovers, damaged files and snapshots whose anchor batch the log does not hold (a
    /// crash can leave the snapshot on disk and lose the tail of the log it describes), and
    /// falls back to an older snapshot or to the log alone.
    fn roll(self: &Arc<Self>, writer: &mut Writer, now_ms: u64) -> Result<()> {
        let fs = self.shared.fs.as_ref();
        let old = Arc::clone(&writer.active);
        let base_offset = writer.next_offset;
        let paths = SegmentPaths::new(&self.dir, base_offset);
        let file = fs.open(&paths.log, true).map_err(|error| {
            StorageError::io(format!("create segment {}", paths.log.display()), error)
        })?;
        writer.directory_dirty = true;
        writer.release_preallocation();
        if let Some(index) = old.closing_index() {
            old.set_pending_index(index);
            self.shared
                .flusher
                .persist_index(Arc::clone(self), Arc::clone(&old));
        }
        if let Some(old_file) = old.deactivate() {
            writer.unsynced_files.push(old_file);
            self.rolled_unsynced.store(true, Ordering::Release);
        }
        let segment = Arc::new(Segment::active(
            &self.dir,
            base_offset,
            file.clone(),
            SegmentIndex::new(),
            0,
            base_offset,
        ));
        self.segments
            .write()
            .expect("segments lock poisoned")
            .push(Arc::clone(&segment));
        writer.active = segment;
        writer.active_file = file;
        writer.active_since_ms = None;
        tracing::debug!(dir = %self.dir.display(), base_offset, "rolled segment");
        writer.producers.expire(now_ms);
        // Without an anchor (the last batch was unreadable on open) recovery could not tell
        // the snapshot from a stale one: skip it and let recovery read the log instead.
        if let Some(anchor_crc) = writer.last_batch_crc {
            let snapshot = writer.producers.encode_snapshot(base_offset, anchor_crc);
            self.shared
                .flusher
                .persist_snapshot(Arc::clone(self), base_offset, snapshot);
        }
        Ok(())
    }

    /// Flusher only: [`persist_snapshot`](Self::persist_snapshot) of a snapshot taken at a
    /// roll, unless the log is closing (`close` takes its own).
    pub(crate) fn persist_rolled_snapshot(&self, offset: u64, contents: &[u8]) {
        let serialised = self.snapshot_lock.lock().expect("snapshot lock poisoned");
        if !self.closing.load(Ordering::Acquire) {
            self.write_snapshot(&serialised, offset, contents);
        }
    }

    /// Writes a producer-state snapshot durably, then deletes all but the newest
    /// [`SNAPSHOTS_KEPT`]. A failure costs only a longer scan on recovery.
    fn persist_snapshot(&self, offset: u64, contents: &[u8]) {
        let serialised = self.snapshot_lock.lock().expect("snapshot lock poisoned");
        self.write_snapshot(&serialised, offset, contents);
    }

    fn write_snapshot(
        &self,
        _serialised: &std::sync::MutexGuard<'_, ()>,
        offset: u64,
        contents: &[u8],
    ) {
        let fs = self.shared.fs.as_ref();
        let path = SegmentPaths::new(&self.dir, offset).snapshot;
        if let Err(error) = write_file_durably(fs, &path, contents) {
            tracing::warn!(snapshot = %path.display(), %error, "writing producer snapshot failed; recovery will read more of the log");
            return;
        }
        let Ok(snapshots) = self.snapshot_files() else {
            return;
        };
        let keep_from = snapshots.len().saturating_sub(SNAPSHOTS_KEPT);
        // Older snapshots are only fallbacks; removing them needs no directory sync, since
        // one that comes back after a crash is still checked against the log before use.
        for (_, old) in &snapshots[..keep_from] {
            let _ = fs.remove_file(old);
        }
    }

    /// The producer snapshots in the partition directory, oldest first.
    fn snapshot_files(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = self
            .shared
            .fs
            .read_dir(&self.dir)
            .map_err(|error| StorageError::io(format!("list {}", self.dir.display()), error))?;
        let mut snapshots: Vec<(u64, PathBuf)> = entries
            .into_iter()
            .filter_map(|path| match SegmentPaths::parse(&path) {
                Some((offset, SNAPSHOT_EXTENSION)) => Some((offset, path)),
                _ => None,
            })
            .collect();
        snapshots.sort_unstable();
        Ok(snapshots)
    }

    /// Writes a snapshot of the producer state at the end of the log, synchronously. Blocking.
    fn snapshot_producers_now(&self) {
        let (offset, contents) = {
            let writer = self.writer.lock().expect("writer lock poisoned");
            let (offset, Some(anchor_crc)) = (writer.next_offset, writer.last_batch_crc) else {
                return;
            };
            (offset, writer.producers.encode_snapshot(offset, anchor_crc))
        };
        self.persist_snapshot(offset, &contents);
    }

    /// The crc32c field of the batch that ends at `offset - 1`, if the log holds it.
    fn anchor_crc(&self, offset: u64) -> Option<u32> {
        let last = offset.checked_sub(1)?;
        let read = self.read(last, 1).ok()?;
        let batch = split_batches(&read.records).next()?.ok()?;
        (batch.last_offset() == last).then(|| batch.crc())
    }

    /// Rebuilds the producer state on open: from the newest snapshot that the log still
    /// matches, then every batch header after it. Without a usable snapshot, from the start
    /// of the log. Runs before anyone else holds the log.
    fn rebuild_producer_state(&self) -> Result<()> {
        let log_start = self.earliest_offset();
        let log_end = self.high_watermark.get();
        let fs = self.shared.fs.as_ref();
        let mut loaded = None;
        for (offset, path) in self.snapshot_files()?.into_iter().rev() {
            // A snapshot at or below the log start describes only deleted batches; one above
            // the end describes batches a crash took away.
            let in_range = log_start < offset && offset <= log_end;
            if in_range && loaded.is_some() {
                continue; // an older fallback, kept
            }
            if in_range {
                let snapshot = read_file(fs, &path)
                    .ok()
                    .and_then(|bytes| decode_snapshot(&bytes))
                    .filter(|snapshot| {
                        snapshot.offset == offset
                            && self.anchor_crc(offset) == Some(snapshot.anchor_crc)
                    });
                if let Some(snapshot) = snapshot {
                    loaded = Some(snapshot);
                    continue;
                }
                tracing::warn!(snapshot = %path.display(), "ignoring a producer snapshot that is damaged or does not match the log");
            }
            let _ = fs.remove_file(&path);
        }
        let now_ms = now_ms();
        let last_batch_crc = self.anchor_crc(log_end);
        let mut writer = self.writer.lock().expect("writer lock poisoned");
        writer.last_batch_crc = last_batch_crc;
        let from = match loaded {
            Some(snapshot) => {
                writer.producers.load(snapshot.entries);
                snapshot.offset
            }
            None => log_start,
        };
        writer.producers.remove_below(log_start);
        self.replay_producers(&mut writer.producers, from, now_ms)?;
        tracing::debug!(dir = %self.dir.display(), from, producers = writer.producers.len(), "rebuilt producer state");
        Ok(())
    }

    /// Feeds the producer fields of every batch from `from` to the end of the log to `table`.
    /// Reads headers only, in chunks, so small batches cost one read per chunk and large ones
    /// are skipped over.
    fn replay_producers(
        &self,
        table: &mut ProducerStateTable,
        from: u64,
        now_ms: u64,
    ) -> Result<()> {
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .expect("segments lock poisoned")
            .clone();
        let fs = self.shared.fs.as_ref();
        let mut buffer: Vec<u8> = Vec::new();
        for segment in segments {
            let end = segment.size_bytes();
            if segment.next_offset() <= from || end == 0 {
                continue;
            }
            let (file, entry) = segment.lookup(fs, &self.shared.cache, from)?;
            let mut position = self.walk_start(&segment, &file, entry);
            let mut buffer_start = 0u64;
            buffer.clear();
            while position < end {
                if end - position < HEADER_BYTES as u64 {
                    return Err(self.corrupt(&segment, position, "partial batch header".into()));
                }
                let buffered = position >= buffer_start
                    && position + HEADER_BYTES as u64 <= buffer_start + buffer.len() as u64;
                if !buffered {
                    let length = (end - position).min(REPLAY_CHUNK_BYTES as u64) as usize;
                    buffer.resize(length, 0);
                    self.read_exact(&file, &segment, &mut buffer, position)?;
                    buffer_start = position;
                }
                let at = (position - buffer_start) as usize;
                let header = &buffer[at..at + HEADER_BYTES];
                let size = batch_size(header).unwrap_or(0);
                if size < HEADER_BYTES as u64 || size > end - position {
                    return Err(self.corrupt(
                        &segment,
                        position,
                        format!("batch size {size} out of bounds"),
                    ));
                }
                let field = |at: usize, bytes: usize| -> u64 {
                    header[at..at + bytes]
                        .iter()
                        .fold(0, |value, byte| (value << 8) | u64::from(*byte))
                };
                let base_offset = field(0, 8);
                let last_offset_delta = field(LAST_OFFSET_DELTA_AT, 4);
                let producer_id = field(PRODUCER_ID_AT, 8);
                let first_sequence = field(BASE_SEQUENCE_AT, 8);
                // A batch whose sequences overflow was never accepted as idempotent (only the
                // plain append path could have stored it): it says nothing about a producer.
                let last_sequence = first_sequence.checked_add(last_offset_delta);
                if let Some(last_sequence) = last_sequence
                    && base_offset >= from
                    && producer_id != NO_PRODUCER_ID
                {
                    table.replay(
                        producer_id,
                        BatchMetadata {
                            producer_epoch: field(PRODUCER_EPOCH_AT, 2) as u16,
                            first_sequence,
                            last_sequence,
                            base_offset,
                            last_offset: base_offset.saturating_add(last_offset_delta),
                            max_timestamp_ms: field(MAX_TIMESTAMP_AT, 8) as i64,
                        },
                        now_ms,
                    );
                }
                position += size;
            }
        }
        Ok(())
    }

    /// Raises a producer's epoch here (InitProducerId with its name) and returns the sequence
    /// its next batch must start with, or `None` when the partition holds no state for it.
    pub fn fence_producer(&self, producer_id: u64, producer_epoch: u16) -> Option<u64> {
        let mut writer = self.writer.lock().expect("writer lock poisoned");
        writer
            .producers
            .fence(producer_id, producer_epoch, now_ms())
    }

    /// A copy of the partition's producer state, by producer id.
    pub fn producer_state(&self) -> BTreeMap<u64, ProducerEntry> {
        self.writer
            .lock()
            .expect("writer lock poisoned")
            .producers
            .entries()
    }

    /// Flusher only: [`write_index`](Self::write_index) of a rolled segment, unless the log is
    /// closing (`close` writes every pending index itself).
    pub(crate) fn persist_index(&self, segment: &Segment) {
        let serialised = self.index_lock.lock().expect("index lock poisoned");
        if !self.closing.load(Ordering::Acquire) {
            self.write_index(&serialised, segment);
        }
    }

    /// Writes a closed segment's pending indexes durably, then drops the in-memory copy.
    fn write_index(&self, _serialised: &std::sync::MutexGuard<'_, ()>, segment: &Segment) {
        let Some(index) = segment.pending_index() else {
            return;
        };
        let fs = self.shared.fs.as_ref();
        let persisted = write_file_durably(fs, &segment.paths.index, &index.encode_offsets())
            .and_then(|()| {
                write_file_durably(fs, &segment.paths.time_index, &index.encode_times())
            });
        match persisted {
            Ok(()) => segment.clear_pending_index(),
            // The log itself is intact and recovery rebuilds missing indexes; readers keep
            // using the in-memory copy meanwhile.
            Err(error) => {
                tracing::warn!(segment = %segment.paths.log.display(), %error, "writing segment index failed")
            }
        }
    }

    /// Resolves once every offset below `next_offset` is fsynced. Concurrent callers share
    /// fsyncs (group commit). The fsync runs on the flusher's threads, never the caller's.
    ///
    /// # Errors
    /// `Poisoned` when an fsync failed: the data may or may not be on disk, and the partition
    /// refuses further writes rather than pretend.
    pub async fn wait_durable(self: &Arc<Self>, next_offset: u64) -> Result<()> {
        let registered = self.durability.register(
            next_offset,
            || self.check_writable(),
            oneshot::channel,
            || self.shared.flusher.sync(Arc::clone(self)),
        )?;
        let receiver = match registered {
            Registered::Durable => return Ok(()),
            Registered::Waiting(receiver) => receiver,
        };
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StorageError::Poisoned { reason }),
            Err(_) => Err(StorageError::Closed),
        }
    }

    /// Asks the flusher to sync up to `next_offset` (default: everything appended so far)
    /// without waiting.
    pub(crate) fn request_sync(self: &Arc<Self>, next_offset: Option<u64>) {
        let target = next_offset.unwrap_or_else(|| self.high_watermark.get());
        self.durability
            .request(target, || self.shared.flusher.sync(Arc::clone(self)));
    }

    pub(crate) fn clear_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    /// Flusher only: fsyncs everything appended so far, releases the waiters it covers, and
    /// returns whether another round is wanted.
    pub(crate) fn run_sync(&self) -> bool {
        let target = self.high_watermark.get();
        // After a failed fsync nothing more becomes durable: one that succeeds later does not
        // prove the earlier writes reached the disk (the kernel may have dropped the pages it
        // failed to write, and reports the error once). The waiters fail; the durable offset
        // stays where the failure left it, and so does the recovery point. (A log refusing
        // writes for another reason, damage found or a close, still syncs what it holds.)
        let result = if self.fsync_failed.load(Ordering::Acquire) {
            Err(self.poison_reason().unwrap_or_default())
        } else {
            self.sync_files()
        };
        // A failed fsync poisons the partition under the group-commit lock, before the waiters
        // fail, so no new waiter registers for an fsync that will never be retried.
        self.durability.synced(
            target,
            result,
            |reason| {
                self.fsync_failed.store(true, Ordering::Release);
                self.poison(reason.to_owned());
            },
            || {
                self.is_poisoned
                    .load(Ordering::Acquire)
                    .then(|| self.poison_reason().unwrap_or_default())
            },
        )
    }

    /// fsyncs the rolled segments not yet synced and the active one.
    ///
    /// When a roll created a segment file since the last sync, the partition's directory is
    /// fsynced too, after the files: until then the new file's name may not survive a power
    /// loss, and with it every offset in the file, so none of them may count as durable.
    fn sync_files(&self) -> std::result::Result<(), String> {
        let (mut files, active_path, directory_dirty) = {
            let mut writer = self.writer.lock().expect("writer lock poisoned");
            let mut files = std::mem::take(&mut writer.unsynced_files);
            files.push(writer.active_file.clone());
            let directory_dirty = std::mem::take(&mut writer.directory_dirty);
            (files, writer.active.paths.log.clone(), directory_dirty)
        };
        for file in files.drain(..) {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let synced = file.sync_data();
            self.shared.observe_fsync(started.elapsed());
            synced.map_err(|error| {
                format!(
                    "fsync of {} (or a segment before it) failed: {error}",
                    active_path.display()
                )
            })?;
        }
        if directory_dirty {
            self.shared.fs.sync_dir(&self.dir).map_err(|error| {
                format!(
                    "fsync of the directory {} (after creating {}) failed: {error}",
                    self.dir.display(),
                    active_path.display()
                )
            })?;
        }
        Ok(())
    }

    /// Writes the recovery point (the durable offset) durably, when it moved. Called by the
    /// flusher's ticker every `recovery_checkpoint_ms` and at close, never on the produce path.
    pub fn checkpoint_recovery_point(&self) -> Result<()> {
        let mut last = self
            .last_checkpoint
            .lock()
            .expect("checkpoint lock poisoned");
        // Read under the lock: two checkpoints at once (the ticker's and close's) write in the
        // order they read, so the file never goes back to the older point.
        let durable = self.durable_offset();
        if *last == Some(durable) {
            return Ok(());
        }
        let path = self.dir.join(RECOVERY_POINT_FILE);
        write_file_durably(
            self.shared.fs.as_ref(),
            &path,
            &recovery::encode_recovery_point(durable),
        )
        .map_err(|error| StorageError::io(format!("write {}", path.display()), error))?;
        *last = Some(durable);
        Ok(())
    }

    /// Whether [`PartitionLog::close`] has begun: set before the log's files can be deleted,
    /// so a read that finds it clear after reading read this log's files.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Syncs everything, checkpoints, and wakes every waiting fetch. Appends fail afterwards.
    pub fn close(self: &Arc<Self>) -> Result<()> {
        self.closing.store(true, Ordering::Release);
        let closed: Vec<Arc<Segment>> = self
            .segments
            .read()
            .expect("segments lock poisoned")
            .clone();
        for segment in &closed {
            let serialised = self.index_lock.lock().expect("index lock poisoned");
            self.write_index(&serialised, segment);
        }
        let result = if self.is_poisoned.load(Ordering::Acquire) {
            Ok(())
        } else {
            // What the sync covers is what was appended before it started: an append landing
            // during it must not count as durable (as in `run_sync`).
            let synced = self.high_watermark.get();
            self.sync_files()
                .map_err(|reason| {
                    self.fsync_failed.store(true, Ordering::Release);
                    StorageError::Poisoned { reason }
                })
                .and_then(|()| {
                    self.durability.mark_durable(synced);
                    self.checkpoint_recovery_point()
                })
                // With a snapshot at the end of the log, the next open replays nothing.
                .map(|()| self.snapshot_producers_now())
        };
        // Closing is not a failure: refuse further writes without the poisoning alarm.
        {
            let mut poisoned = self.poisoned.lock().expect("poison lock poisoned");
            poisoned.get_or_insert_with(|| "the log is closed".to_owned());
            self.is_poisoned.store(true, Ordering::Release);
        }
        self.high_watermark.close();
        // No append follows (they check for the poisoning under the writer lock): the active
        // segment gives back the space reserved past its end.
        self.writer
            .lock()
            .expect("writer lock poisoned")
            .release_preallocation();
        // The segments' lock is let go before the snapshot lock is taken: retention takes
        // them in the other order.
        for segment in self.segments.read().expect("segments lock poisoned").iter() {
            self.shared.cache.evict(segment);
        }
        // A snapshot the flusher began writing before `closing` was set is finished before
        // this returns (and the directory can go); later ones see the flag and write nothing.
        // Likewise for index files, whose writes the loop above already waited for.
        drop(self.snapshot_lock.lock().expect("snapshot lock poisoned"));
        result
    }

    fn out_of_range(&self, requested: u64) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start_offset: self.earliest_offset(),
            log_end_offset: self.high_watermark.get(),
        }
    }

    /// The segment that holds `offset`, or the first after it.
    fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().expect("segments lock poisoned");
        let at = segments.partition_point(|segment| segment.base_offset <= offset);
        at.checked_sub(1)
            .and_then(|index| segments.get(index))
            .filter(|segment| offset < segment.next_offset() || segment.is_active())
            .or_else(|| segments.get(at))
            .cloned()
    }

    /// Reads whole batches starting with the one that holds `offset`, up to `max_bytes` in all,
    /// but at least one batch however large. Reading at the high watermark returns no records.
    ///
    /// # Errors
    /// `OffsetOutOfRange` below the earliest or above the latest offset; `Corrupt` when a
    /// stored batch fails its CRC (the partition then refuses writes).
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult> {
        let high_watermark = self.high_watermark.get();
        let log_start_offset = self.earliest_offset();
        if offset < log_start_offset || offset > high_watermark {
            return Err(self.out_of_range(offset));
        }
        let empty = ReadResult {
            records: Bytes::new(),
            high_watermark,
            log_start_offset,
        };
        if offset == high_watermark {
            return Ok(empty);
        }
        let Some(segment) = self.segment_for(offset) else {
            return Ok(empty);
        };
        // Retention may have deleted the segment that held `offset` since the log start was
        // read: the next one is then not where `offset` is, and the reader must hear that it
        // is out of range, not be served what follows.
        if segment.base_offset > offset && offset < self.earliest_offset() {
            return Err(self.out_of_range(offset));
        }
        let fs = self.shared.fs.as_ref();
        let (file, entry) = segment.lookup(fs, &self.shared.cache, offset)?;
        let end = segment.size_bytes();
        // Walk batch headers from the index entry to the batch that holds the offset, each one
        // starting where the previous ended: the CRC leaves the base offset out.
        let mut position = u64::from(entry.position);
        let mut expected_base = segment.base_offset + u64::from(entry.relative_offset);
        // The index is only a shortcut: when the batch at an entry's position is not the one
        // the entry claims, the index file is damaged, not the log, and the walk starts over
        // from the segment's first batch (see `walk_start`).
        let mut trusting_index = position > 0;
        let mut chunk = WalkChunk::new();
        let first_size = loop {
            let problem = if position + HEADER_PROBE_BYTES as u64 > end {
                if !trusting_index {
                    return Ok(empty);
                }
                format!("position {position} is past the end ({end})")
            } else {
                let header = chunk.header(position, end, |buf, at| {
                    self.read_exact(&file, &segment, buf, at)
                })?;
                let base = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
                let size = batch_size(&header).unwrap_or(0);
                let last_delta = u32::from_be_bytes(header[23..27].try_into().expect("4 bytes"));
                if size < HEADER_BYTES as u64 || position + size > end {
                    format!("batch size {size} out of bounds")
                } else if base != expected_base {
                    format!("batch base offset {base} where {expected_base} was expected")
                } else if base + u64::from(last_delta) >= offset {
                    break size;
                } else {
                    trusting_index = false;
                    expected_base = base + u64::from(last_delta) + 1;
                    position += size;
                    continue;
                }
            };
            if trusting_index {
                tracing::warn!(index = %segment.paths.index.display(), position, %problem, "the sparse index disagrees with its segment; reading from the segment's start");
                trusting_index = false;
                position = 0;
                expected_base = segment.base_offset;
                continue;
            }
            return Err(self.corrupt(&segment, position, problem));
        };
        let want = (max_bytes as u64).max(first_size).min(end - position);
        let length = usize::try_from(want).expect("read length fits in memory");
        // A large read maps the file's cached pages instead of copying them: the checks below
        // read them in place and the connection writes them from there. A small one, or one
        // the file cannot map, is read into a buffer.
        let mapped = (length >= MAP_AT_LEAST)
            .then(|| file.map(position, length))
            .flatten()
            .and_then(Result::ok);
        let is_mapped = mapped.is_some();
        // A read of the log's last few records was read with the walk's headers.
        let read = mapped.or_else(|| chunk.get(position, length).map(Bytes::copy_from_slice));
        let mut buffer = match read {
            Some(read) => read,
            None => {
                let mut buffer = BytesMut::new();
                let read = file
                    .read_appending(&mut buffer, length, position)
                    .map_err(|error| {
                        StorageError::io(
                            format!("read {} at {position}", segment.paths.log.display()),
                            error,
                        )
                    })?;
                if read < length {
                    return Err(self.corrupt(
                        &segment,
                        position,
                        format!("short read: {read} of {length} bytes"),
                    ));
                }
                buffer.freeze()
            }
        };
        // Keep whole batches only, each checked as it leaves the disk: its CRC, and what the
        // CRC leaves out (the format version, and the base offset following on).
        let mut cut = 0usize;
        while let Some(size) = buffer.get(cut..).and_then(batch_size) {
            let size = size as usize;
            if cut + size > buffer.len() || size < HEADER_BYTES {
                break;
            }
            let problem = match RecordBatchRef::new(&buffer[cut..cut + size]) {
                // Written, but the high watermark read above had not passed it: an append
                // lands in the segment a moment before it is published, and a reader must not
                // see it first (a consumer would fetch next from past the high watermark and
                // be told its offset is out of range).
                Ok(batch) if batch.base_offset() >= high_watermark => break,
                Err(error) => Some(error.to_string()),
                Ok(batch) if batch.crc() != batch.computed_crc() => {
                    Some("crc32c mismatch".to_owned())
                }
                Ok(batch) if batch.magic() != MAGIC => {
                    Some(format!("magic {} (expected {MAGIC})", batch.magic()))
                }
                Ok(batch) if batch.base_offset() != expected_base => Some(format!(
                    "batch base offset {} where {expected_base} was expected",
                    batch.base_offset()
                )),
                Ok(batch) => {
                    expected_base = batch.last_offset() + 1;
                    None
                }
            };
            if let Some(problem) = problem {
                if cut > 0 {
                    break; // serve what precedes the damage; the next read reports it
                }
                return Err(self.corrupt(&segment, position, problem));
            }
            cut += size;
        }
        // A copied read keeps only its whole batches: truncating would keep the whole buffer
        // alive under the fetch budget's count of what is kept (up to 64 KiB a partition).
        if !is_mapped && buffer.len() - cut > TRAILING_COPY_SLACK {
            buffer = Bytes::copy_from_slice(&buffer[..cut]);
        } else {
            buffer.truncate(cut);
        }
        Ok(ReadResult {
            records: buffer,
            high_watermark,
            log_start_offset,
        })
    }

    /// Where a walk over `segment`'s batch headers may start, for a lookup that found `entry`:
    /// the entry's position when the batch there has the offset the entry claims, else the
    /// segment's first batch. A closed segment's index file is only a shortcut, checked for its
    /// shape when it is loaded; one damaged in a way that still looks well formed must make
    /// lookups slower, never make intact data look corrupt.
    fn walk_start(&self, segment: &Segment, file: &FileHandle, entry: IndexEntry) -> u64 {
        let position = u64::from(entry.position);
        if position == 0 {
            return 0;
        }
        let claimed = segment.base_offset + u64::from(entry.relative_offset);
        let end = segment.size_bytes();
        let mut header = [0u8; LOG_OVERHEAD_BYTES];
        let agrees = position + HEADER_BYTES as u64 <= end
            && file
                .read_at(&mut header, position)
                .is_ok_and(|read| read == header.len())
            && u64::from_be_bytes(header[..8].try_into().expect("8 bytes")) == claimed
            && batch_size(&header)
                .is_some_and(|size| size >= HEADER_BYTES as u64 && position + size <= end);
        if agrees {
            position
        } else {
            tracing::warn!(index = %segment.paths.index.display(), position, claimed, "the sparse index disagrees with its segment; reading from the segment's start");
            0
        }
    }

    fn read_exact(
        &self,
        file: &FileHandle,
        segment: &Segment,
        buf: &mut [u8],
        position: u64,
    ) -> Result<()> {
        let read = file.read_at(buf, position).map_err(|error| {
            StorageError::io(
                format!("read {} at {position}", segment.paths.log.display()),
                error,
            )
        })?;
        if read < buf.len() {
            return Err(self.corrupt(
                segment,
                position,
                format!("short read: {read} of {} bytes", buf.len()),
            ));
        }
        Ok(())
    }

    fn corrupt(&self, segment: &Segment, position: u64, detail: String) -> StorageError {
        let error = StorageError::Corrupt {
            file: segment.paths.log.clone(),
            position,
            detail,
        };
        self.poison(error.to_string());
        error
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, with that
    /// timestamp; `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(u64, i64)>> {
        // Only what is published counts, as for `read`: a batch in the file a moment before
        // the high watermark passes it is not an answer yet.
        let high_watermark = self.high_watermark.get();
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .expect("segments lock poisoned")
            .clone();
        let fs = self.shared.fs.as_ref();
        for segment in segments {
            if segment.max_timestamp().is_none_or(|max| max < timestamp_ms) {
                continue;
            }
            let (file, entry) = segment.lookup_time(fs, &self.shared.cache, timestamp_ms)?;
            let mut position = self.walk_start(&segment, &file, entry);
            let end = segment.size_bytes();
            let mut header = [0u8; HEADER_BYTES];
            while position + HEADER_BYTES as u64 <= end {
                self.read_exact(&file, &segment, &mut header, position)?;
                let size = batch_size(&header).unwrap_or(0);
                if size < HEADER_BYTES as u64 || position + size > end {
                    return Err(self.corrupt(
                        &segment,
                        position,
                        format!("batch size {size} out of bounds"),
                    ));
                }
                if u64::from_be_bytes(header[..8].try_into().expect("8 bytes")) >= high_watermark {
                    return Ok(None);
                }
                let max_timestamp = i64::from_be_bytes(header[35..43].try_into().expect("8 bytes"));
                if max_timestamp >= timestamp_ms {
                    let mut batch = vec![0u8; size as usize];
                    self.read_exact(&file, &segment, &mut batch, position)?;
                    let view = RecordBatchRef::new(&batch)
                        .map_err(|error| self.corrupt(&segment, position, error.to_string()))?;
                    for record in view.records() {
                        let record = record
                            .map_err(|error| self.corrupt(&segment, position, error.to_string()))?;
                        if record.timestamp_ms >= timestamp_ms {
                            return Ok(Some((
                                record.offset(view.base_offset()),
                                record.timestamp_ms,
                            )));
                        }
                    }
                }
                position += size;
            }
        }
        Ok(None)
    }

    /// Deletes whole closed segments past `retention_bytes` or `retention_ms`, oldest first.
    /// The active segment is never deleted. Returns how many segments went.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<usize> {
        let deleted = self.delete_leading_segments(|segment, total_bytes| {
            let over_size = self
                .config
                .retention_bytes
                .is_some_and(|limit| total_bytes > limit);
            let expired = self.config.retention_ms.is_some_and(|limit| {
                // A limit past i64::MAX milliseconds is never reached (as `limit as i64`, it
                // was negative and expired everything).
                segment.max_timestamp().is_some_and(|newest| {
                    i64::try_from(limit)
                        .is_ok_and(|limit| (now_ms as i64).saturating_sub(newest) > limit)
                })
            });
            over_size || expired
        })?;
        // This periodic pass is also when idle producers expire, and producers whose batches
        // retention deleted are forgotten, so the state keeps describing the log as it is.
        let log_start_offset = self.earliest_offset();
        let mut writer = self.writer.lock().expect("writer lock poisoned");
        let forgotten =
            writer.producers.remove_below(log_start_offset) + writer.producers.expire(now_ms);
        if forgotten > 0 {
            tracing::debug!(dir = %self.dir.display(), forgotten, "dropped producer state");
        }
        Ok(deleted)
    }

    /// Deletes the closed segments that end at or before `offset` (for a log whose contents
    /// below `offset` are kept elsewhere, such as the committed-offsets snapshot). Returns how
    /// many went.
    pub fn delete_segments_before(&self, offset: u64) -> Result<usize> {
        self.delete_leading_segments(|segment, _| segment.next_offset() <= offset)
    }

    /// Deletes closed segments from the oldest on while `doomed(segment, total bytes of the
    /// segments still kept)` holds. The active segment is never deleted.
    fn delete_leading_segments(&self, doomed: impl Fn(&Segment, u64) -> bool) -> Result<usize> {
        // Held until the files are gone, so that `close` returns only after them; a log
        // already closing deletes nothing, since its directory may hold a topic created again
        // under the same name by the time the paths are removed.
        let serialised = self.snapshot_lock.lock().expect("snapshot lock poisoned");
        if self.closing.load(Ordering::Acquire) {
            return Ok(0);
        }
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write().expect("segments lock poisoned");
            let mut total: u64 = segments.iter().map(|segment| segment.size_bytes()).sum();
            let mut count = 0;
            for segment in segments.iter().take(segments.len().saturating_sub(1)) {
                if !doomed(segment, total) {
                    break;
                }
                total -= segment.size_bytes();
                count += 1;
            }
            let removed: Vec<Arc<Segment>> = segments.drain(..count).collect();
            if let Some(first) = segments.first() {
                self.log_start_offset
                    .store(first.base_offset, Ordering::Release);
            }
            removed
        };
        let fs = self.shared.fs.as_ref();
        for segment in &doomed {
            self.shared.cache.evict(segment);
            // The snapshot taken when this segment started describes only batches that are
            // now gone.
            for path in [
                &segment.paths.log,
                &segment.paths.index,
                &segment.paths.time_index,
                &segment.paths.snapshot,
            ] {
                if let Err(error) = fs.remove_file(path)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(StorageError::io(
                        format!("delete {}", path.display()),
                        error,
                    ));
                }
            }
            tracing::info!(segment = %segment.paths.log.display(), "deleted segment");
        }
        if !doomed.is_empty() {
            fs.sync_dir(&self.dir)
                .map_err(|error| StorageError::io(format!("sync {}", self.dir.display()), error))?;
        }
        drop(serialised);
        Ok(doomed.len())
    }
}
