//! Segments: one `.log` file of record batches and its two sparse indexes, named by the offset
//! of their first record; and the bounded cache through which closed segments are opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::error::{Result, StorageError};
use super::fs::{FileHandle, FileSystem, read_file};
use super::index::{IndexEntry, SegmentIndex};

/// The three files of a segment, and the producer-state snapshot taken when it started.
/// Every segment path in the broker is built here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPaths {
    pub log: PathBuf,
    pub index: PathBuf,
    pub time_index: PathBuf,
    /// The producer state of every batch below `base_offset` (see `crate::producers`).
    pub snapshot: PathBuf,
}

impl SegmentPaths {
    /// `<dir>/<base_offset:020>.log`, `.index`, `.timeindex`, `.snapshot`.
    pub fn new(dir: &Path, base_offset: u64) -> Self {
        let stem = format!("{base_offset:020}");
        SegmentPaths {
            log: dir.join(format!("{stem}.log")),
            index: dir.join(format!("{stem}.index")),
            time_index: dir.join(format!("{stem}.timeindex")),
            snapshot: dir.join(format!("{stem}.snapshot")),
        }
    }

    /// The base offset a segment file name encodes, with its extension, when it is one of ours.
    pub fn parse(path: &Path) -> Option<(u64, &str)> {
        let name = path.file_name()?.to_str()?;
        let (stem, extension) = name.split_once('.')?;
        if stem.len() != 20 || !stem.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        Some((stem.parse().ok()?, extension))
    }
}

/// A segment's metadata. The active segment also holds its open file and in-memory index;
/// a closed segment's file and index are opened on demand through the [`SegmentCache`].
#[derive(Debug)]
pub struct Segment {
    /// Unique in this process: what the [`SegmentCache`] knows it by. A topic deleted and
    /// created again has segments at the same paths, which must never be taken for the old.
    id: u64,
    /// Set when the segment is deleted or its log closed: the cache no longer keeps it open.
    removed: AtomicBool,
    pub base_offset: u64,
    pub paths: SegmentPaths,
    /// Bytes of complete batches. Published (Release) after the bytes are in the file.
    size_bytes: AtomicU64,
    /// Offset after the segment's last record.
    next_offset: AtomicU64,
    /// Largest record timestamp, `i64::MIN` while empty.
    max_timestamp: AtomicI64,
    /// Present while the segment is active.
    active: RwLock<Option<ActiveFiles>>,
    /// A closed segment's index until the flusher has written it to disk.
    pending_index: Mutex<Option<Arc<SegmentIndex>>>,
}

#[derive(Debug)]
struct ActiveFiles {
    file: FileHandle,
    index: SegmentIndex,
}

/// An opened segment: its file and its index, ready for lookups.
#[derive(Clone, Debug)]
pub struct OpenSegment {
    pub file: FileHandle,
    pub index: Arc<SegmentIndex>,
}

fn next_segment_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Segment {
    /// An active segment over an open file.
    pub fn active(
        dir: &Path,
        base_offset: u64,
        file: FileHandle,
        index: SegmentIndex,
        size_bytes: u64,
        next_offset: u64,
    ) -> Segment {
        let max_timestamp = index.max_timestamp().unwrap_or(i64::MIN);
        Segment {
            id: next_segment_id(),
            removed: AtomicBool::new(false),
            base_offset,
            paths: SegmentPaths::new(dir, base_offset),
            size_bytes: AtomicU64::new(size_bytes),
            next_offset: AtomicU64::new(next_offset),
            max_timestamp: AtomicI64::new(max_timestamp),
            active: RwLock::new(Some(ActiveFiles { file, index })),
            pending_index: Mutex::new(None),
        }
    }

    /// A closed segment known by its metadata.
    pub fn closed(
        dir: &Path,
        base_offset: u64,
        size_bytes: u64,
        next_offset: u64,
        max_timestamp: Option<i64>,
    ) -> Segment {
        Segment {
            id: next_segment_id(),
            removed: AtomicBool::new(false),
            base_offset,
            paths: SegmentPaths::new(dir, base_offset),
            size_bytes: AtomicU64::new(size_bytes),
            next_offset: AtomicU64::new(next_offset),
            max_timestamp: AtomicI64::new(max_timestamp.unwrap_or(i64::MIN)),
            active: RwLock::new(None),
            pending_index: Mutex::new(None),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub fn max_timestamp(&self) -> Option<i64> {
        match self.max_timestamp.load(Ordering::Acquire) {
            i64::MIN => None,
            timestamp => Some(timestamp),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.read().expect("segment lock poisoned").is_some()
    }

    /// Writer only: records a batch written at the end of the active segment.
    pub fn on_appended(
        &self,
        relative_offset: u32,
        position: u32,
        size_bytes: u64,
        next_offset: u64,
        max_timestamp: i64,
        index_interval_bytes: u64,
    ) {
        if let Some(active) = self.active.write().expect("segment lock poisoned").as_mut() {
            active.index.on_append(
                relative_offset,
                position,
                size_bytes,
                max_timestamp,
                index_interval_bytes,
            );
        }
        self.max_timestamp
            .fetch_max(max_timestamp, Ordering::AcqRel);
        self.next_offset.store(next_offset, Ordering::Release);
        self.size_bytes
            .store(u64::from(position) + size_bytes, Ordering::Release);
    }

    /// Writer only: the active segment's index as it will be persisted when the segment closes
    /// (with its closing time entry).
    pub fn closing_index(&self) -> Option<SegmentIndex> {
        let active = self.active.read().expect("segment lock poisoned");
        let mut index = active.as_ref()?.index.clone();
        let span = self.next_offset() - self.base_offset;
        index.close(u32::try_from(span).unwrap_or(u32::MAX));
        Some(index)
    }

    /// Keeps the closed segment's index in memory until it is on disk.
    pub fn set_pending_index(&self, index: SegmentIndex) {
        *self.pending_index.lock().expect("segment lock poisoned") = Some(Arc::new(index));
    }

    /// The index not yet written to disk, if any.
    pub fn pending_index(&self) -> Option<Arc<SegmentIndex>> {
        self.pending_index
            .lock()
            .expect("segment lock poisoned")
            .clone()
    }

    pub fn clear_pending_index(&self) {
        *self.pending_index.lock().expect("segment lock poisoned") = None;
    }

    /// Writer only: makes the segment closed; later reads open it through the cache. Returns
    /// its file, which may still hold unsynced data.
    pub fn deactivate(&self) -> Option<FileHandle> {
        let active = self.active.write().expect("segment lock poisoned").take()?;
        Some(active.file)
    }

    /// The active segment's file, if it is active.
    pub fn active_file(&self) -> Option<FileHandle> {
        self.active
            .read()
            .expect("segment lock poisoned")
            .as_ref()
            .map(|active| active.file.clone())
    }

    /// Looks up where to start reading `offset` without copying the active index: the index
    /// entry at or before it (relative offset and file position of a batch start; `(0, 0)`,
    /// the segment's start, without one). A closed segment's entry comes from its index file,
    /// which may be damaged in ways that still look well formed: callers check that the batch
    /// at the position has the offset the entry claims before relying on it.
    pub fn lookup(
        &self,
        fs: &dyn FileSystem,
        cache: &SegmentCache,
        offset: u64,
    ) -> Result<(FileHandle, IndexEntry)> {
        let relative = u32::try_from(offset.saturating_sub(self.base_offset)).unwrap_or(u32::MAX);
        if let Some(active) = self.active.read().expect("segment lock poisoned").as_ref() {
            return Ok((active.file.clone(), active.index.lookup(relative)));
        }
        let open = cache.get_or_open(self, fs)?;
        let entry = open.index.lookup(relative);
        Ok((open.file, entry))
    }

    /// Like [`Segment::lookup`], for the first batch that may hold `timestamp_ms`.
    pub fn lookup_time(
        &self,
        fs: &dyn FileSystem,
        cache: &SegmentCache,
        timestamp_ms: i64,
    ) -> Result<(FileHandle, IndexEntry)> {
        if let Some(active) = self.active.read().expect("segment lock poisoned").as_ref() {
            return Ok((active.file.clone(), active.index.lookup_time(timestamp_ms)));
        }
        let open = cache.get_or_open(self, fs)?;
        let entry = open.index.lookup_time(timestamp_ms);
        Ok((open.file, entry))
    }
}

/// Open closed segments, bounded: the least recently used is closed when a new one needs room,
/// so many partitions with many segments hold a fixed number of file descriptors. Shared by
/// every log of a broker.
#[derive(Debug)]
pub struct SegmentCache {
    capacity: usize,
    state: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    /// By segment id.
    entries: HashMap<u64, (OpenSegment, u64)>,
    clock: u64,
    opens: u64,
}

impl SegmentCache {
    pub fn new(capacity: usize) -> Self {
        SegmentCache {
            capacity: capacity.max(1),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// Segments currently open through the cache.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .expect("cache lock poisoned")
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Times a segment was opened from disk (misses).
    pub fn opens(&self) -> u64 {
        self.state.lock().expect("cache lock poisoned").opens
    }

    /// Forgets a segment (deleted by retention, or its log closed), and keeps it from being
    /// cached again by a read that is opening it right now.
    pub fn evict(&self, segment: &Segment) {
        let mut state = self.state.lock().expect("cache lock poisoned");
        segment.removed.store(true, Ordering::Release);
        state.entries.remove(&segment.id);
    }

    fn get_or_open(&self, segment: &Segment, fs: &dyn FileSystem) -> Result<OpenSegment> {
        {
            let mut state = self.state.lock().expect("cache lock poisoned");
            state.clock += 1;
            let clock = state.clock;
            if let Some((open, last_used)) = state.entries.get_mut(&segment.id) {
                *last_used = clock;
                return Ok(open.clone());
            }
        }
        // Open outside the lock: disk reads must not stall other partitions' lookups.
        let open = open_closed_segment(segment, fs)?;
        let mut state = self.state.lock().expect("cache lock poisoned");
        state.opens += 1;
        // Evicted while it was being opened (`evict` sets this under the same lock): this read
        // may use it, but the cache must not hold a deleted file open.
        if segment.removed.load(Ordering::Acquire) {
            return Ok(open);
        }
        while state.entries.len() >= self.capacity {
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, (_, last_used))| *last_used)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => state.entries.remove(&id),
                None => break,
            };
        }
        let clock = state.clock;
        state.entries.insert(segment.id, (open.clone(), clock));
        Ok(open)
    }
}

fn open_closed_segment(segment: &Segment, fs: &dyn FileSystem) -> Result<OpenSegment> {
    let file = fs.open(&segment.paths.log, false).map_err(|error| {
        StorageError::io(format!("open {}", segment.paths.log.display()), error)
    })?;
    // A segment that has just rolled: the flusher has not written its index files yet (or
    // failed to), and the copy it writes them from is the index. Reading the files instead
    // would find none and cache an empty index, and every read of the segment would walk its
    // batch headers from the start.
    if let Some(index) = segment.pending_index() {
        return Ok(OpenSegment { file, index });
    }
    let offsets = read_file(fs, &segment.paths.index).unwrap_or_default();
    let times = read_file(fs, &segment.paths.time_index).unwrap_or_default();
    let span = segment.next_offset() - segment.base_offset;
    // Recovery checked (and if need be rebuilt) these files; an empty index is still correct,
    // only slower, so a file gone bad since then degrades to scanning from the start.
    let index = SegmentIndex::decode_closed(&offsets, &times, segment.size_bytes(), span)
        .unwrap_or_default();
    Ok(OpenSegment {
        file,
        index: Arc::new(index),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::RealFs;

    /// A closed segment of `batches` batches of 100 bytes, with an offset entry for each but
    /// the first, as `on_append` makes them at a 1-byte interval.
    fn closed_with_index(dir: &Path, batches: u32) -> (Segment, SegmentIndex) {
        let mut index = SegmentIndex::new();
        for batch in 0..batches {
            index.on_append(batch * 10, batch * 100, 100, 1_000, 1);
        }
        index.close(batches * 10);
        std::fs::write(
            SegmentPaths::new(dir, 0).log,
            vec![0; batches as usize * 100],
        )
        .unwrap();
        let segment = Segment::closed(
            dir,
            0,
            u64::from(batches) * 100,
            u64::from(batches) * 10,
            Some(1_000),
        );
        (segment, index)
    }

    #[test]
    fn a_closed_segment_whose_index_is_not_on_disk_yet_is_looked_up_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, index) = closed_with_index(dir.path(), 50);
        segment.set_pending_index(index);
        let cache = SegmentCache::new(4);
        let (_, entry) = segment.lookup(&RealFs, &cache, 425).unwrap();
        assert_eq!(
            entry,
            IndexEntry {
                relative_offset: 420,
                position: 4_200
            }
        );
        let (_, entry) = segment.lookup_time(&RealFs, &cache, 1_000).unwrap();
        assert_eq!(entry.position, 0, "every batch holds time 1,000");
        // Cached as looked up: the flusher writing the files later changes nothing.
        segment.clear_pending_index();
        let (_, entry) = segment.lookup(&RealFs, &cache, 425).unwrap();
        assert_eq!(entry.position, 4_200);
        assert_eq!(cache.opens(), 1);
    }

    #[test]
    fn a_segment_created_again_at_the_same_path_is_not_served_from_the_old_ones_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SegmentCache::new(4);
        let read = |segment: &Segment| {
            let (file, _) = segment.lookup(&RealFs, &cache, 0).unwrap();
            let mut byte = [0u8; 1];
            file.read_at(&mut byte, 0).unwrap();
            byte[0]
        };
        let log = SegmentPaths::new(dir.path(), 0).log;
        std::fs::write(&log, [1u8; 100]).unwrap();
        let old = Segment::closed(dir.path(), 0, 100, 10, None);
        assert_eq!(read(&old), 1);
        // The topic is deleted and created again: new files at the same paths, and a read of
        // the old segment that was under way left its entry behind.
        std::fs::remove_file(&log).unwrap();
        std::fs::write(&log, [2u8; 100]).unwrap();
        let new = Segment::closed(dir.path(), 0, 100, 10, None);
        assert_eq!(read(&new), 2);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn an_evicted_segment_is_not_cached_again_by_a_read_that_was_opening_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(SegmentPaths::new(dir.path(), 0).log, [1u8; 100]).unwrap();
        let segment = Segment::closed(dir.path(), 0, 100, 10, None);
        let cache = SegmentCache::new(4);
        segment.lookup(&RealFs, &cache, 0).unwrap();
        assert_eq!(cache.len(), 1);
        cache.evict(&segment);
        assert!(cache.is_empty());
        // A read that found the segment before retention took it still gets its file...
        let (file, _) = segment.lookup(&RealFs, &cache, 0).unwrap();
        assert_eq!(file.len().unwrap(), 100);
        // ...and the cache does not hold the deleted file open after it.
        assert!(cache.is_empty());
    }

    #[test]
    fn a_closed_segment_without_index_files_or_pending_index_scans_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, _) = closed_with_index(dir.path(), 50);
        let (_, entry) = segment.lookup(&RealFs, &SegmentCache::new(4), 425).unwrap();
        assert_eq!(entry.position, 0);
    }

    #[test]
    fn paths_are_zero_padded_and_parse_back() {
        let paths = SegmentPaths::new(Path::new("/data/t/0"), 42);
        assert_eq!(paths.log, Path::new("/data/t/0/00000000000000000042.log"));
        assert_eq!(
            paths.index,
            Path::new("/data/t/0/00000000000000000042.index")
        );
        assert_eq!(
            paths.time_index,
            Path::new("/data/t/0/00000000000000000042.timeindex")
        );
        assert_eq!(SegmentPaths::parse(&paths.log), Some((42, "log")));
        assert_eq!(
            SegmentPaths::parse(&paths.time_index),
            Some((42, "timeindex"))
        );
        assert_eq!(SegmentPaths::parse(Path::new("/x/recovery-point")), None);
        assert_eq!(SegmentPaths::parse(Path::new("/x/42.log")), None);
    }
}
