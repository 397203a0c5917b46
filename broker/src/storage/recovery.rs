//! Opening a partition directory after a clean stop or a crash.
//!
//! 1. Leftover `*.tmp` files (a durable write cut short) and index files without their `.log`
//!    are removed.
//! 2. The recovery point (every offset below it was fsynced) is read; without one, it is 0.
//! 3. Closed segments wholly below the segment that holds the recovery point are trusted: their
//!    indexes are loaded, and rebuilt from the log when they disagree with it.
//! 4. From the start of the segment that holds the recovery point to the end, every batch is
//!    checked: CRC and structure (`validate`), and that its base offset follows the previous
//!    batch. Indexes are rebuilt on the way.
//! 5. An invalid region at or above the recovery point is a *torn tail*: it is cut off, with
//!    whatever follows it (later segments included), and a log line says what was cut and
//!    whether valid batches were among it. Nothing there was ever fsynced: an fsync after
//!    the invalid region was written would have made it whole, so even a valid batch after it
//!    (a later unsynced write the disk kept while losing an earlier one: disks reorder writes
//!    between fsyncs) was never acknowledged as durable. Cutting it is what a power loss in
//!    that window means, as with Kafka's recovery from its recovery point. Anything below the
//!    recovery point is corruption, never "repaired": the partition refuses writes, names the
//!    file and position, and serves what precedes the damage.
//! 6. The scanned files are fsynced, so everything recovered counts as durable.

use std::path::Path;
use std::sync::Arc;

use sluice_protocol::batch::{HEADER_BYTES, LOG_OVERHEAD_BYTES, MAGIC, RecordBatchRef, batch_size};

use super::config::LogConfig;
use super::error::{Result, StorageError};
use super::fs::{FileHandle, FileSystem, read_file, write_file_durably};
use super::index::SegmentIndex;
use super::log::RECOVERY_POINT_FILE;
use super::segment::{Segment, SegmentPaths};

/// Bytes read at a time while scanning.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Oldest first; the last is active.
    pub segments: Vec<Arc<Segment>>,
    pub next_offset: u64,
    pub durable_offset: u64,
    /// Set when the partition must refuse writes.
    pub corruption: Option<String>,
    /// How long each of recovery's fsyncs took, in order.
    pub fsyncs: Vec<std::time::Duration>,
}

pub(crate) fn encode_recovery_point(offset: u64) -> Vec<u8> {
    let mut out = offset.to_be_bytes().to_vec();
    out.extend_from_slice(&sluice_protocol::checksum::crc32c(&out).to_be_bytes());
    out
}

fn decode_recovery_point(bytes: &[u8]) -> Option<u64> {
    let (offset, crc) = (bytes.get(..8)?, bytes.get(8..12)?);
    if bytes.len() != 12 || sluice_protocol::checksum::crc32c(offset).to_be_bytes() != crc {
        return None;
    }
    Some(u64::from_be_bytes(offset.try_into().ok()?))
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |error| StorageError::io(context, error)
}

pub(crate) fn recover(fs: &dyn FileSystem, dir: &Path, config: &LogConfig) -> Result<Recovered> {
    if !fs.exists(dir) {
        fs.create_dir_all(dir)
            .map_err(io(format!("create {}", dir.display())))?;
        if let Some(parent) = dir.parent() {
            fs.sync_dir(parent)
                .map_err(io(format!("sync {}", parent.display())))?;
        }
    }
    let mut bases = Vec::new();
    let mut index_files = Vec::new();
    for path in fs
        .read_dir(dir)
        .map_err(io(format!("list {}", dir.display())))?
    {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if name.ends_with(".tmp") {
            remove_if_present(fs, &path)?;
            continue;
        }
        match SegmentPaths::parse(&path) {
            Some((base, "log")) => bases.push(base),
            Some((base, "index" | "timeindex")) => index_files.push((base, path)),
            _ => {}
        }
    }
    bases.sort_unstable();
    for (base, path) in index_files {
        if bases.binary_search(&base).is_err() {
            remove_if_present(fs, &path)?;
        }
    }
    if bases.is_empty() {
        let paths = SegmentPaths::new(dir, 0);
        write_file_durably(fs, &paths.log, &[])
            .map_err(io(format!("create {}", paths.log.display())))?;
        let file = fs
            .open(&paths.log, false)
            .map_err(io(format!("open {}", paths.log.display())))?;
        return Ok(Recovered {
            segments: vec![Arc::new(Segment::active(
                dir,
                0,
                file,
                SegmentIndex::new(),
                0,
                0,
            ))],
            next_offset: 0,
            durable_offset: 0,
            corruption: None,
            fsyncs: Vec::new(),
        });
    }

    let recovery_point = read_file(fs, &dir.join(RECOVERY_POINT_FILE))
        .ok()
        .and_then(|bytes| decode_recovery_point(&bytes))
        .unwrap_or(0);
    let first_scanned = bases
        .iter()
        .rposition(|base| *base <= recovery_point)
        .unwrap_or(0);

    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    let mut corruption = None;
    let mut last: Option<(u64, FileHandle, SegmentIndex, u64)> = None;
    let mut scanned_files = Vec::new();
    // How long each fsync took, the torn tail's cut included.
    let mut fsyncs = Vec::new();
    let mut expected_next = bases[first_scanned];

    // Trusted closed segments below the recovery point.
    for (position, base) in bases.iter().enumerate().take(first_scanned) {
        let next_base = bases[position + 1];
        let paths = SegmentPaths::new(dir, *base);
        let file = fs
            .open(&paths.log, false)
            .map_err(io(format!("open {}", paths.log.display())))?;
        let size = file
            .len()
            .map_err(io(format!("stat {}", paths.log.display())))?;
        // A missing file is rebuilt even when the other one makes the pair look whole: an
        // offset index with no entries is valid for a small segment, so only its absence tells
        // that it was lost (and every lookup would scan the segment from its start).
        let offsets = read_file(fs, &paths.index).ok();
        let times = read_file(fs, &paths.time_index).ok();
        let decoded = offsets.zip(times).and_then(|(offsets, times)| {
            SegmentIndex::decode_closed(&offsets, &times, size, next_base - base)
        });
        let (max_timestamp, unwritten) = match decoded {
            Some(index) => (index.max_timestamp(), None),
            None => {
                let scan = scan_segment(&file, &paths.log, *base, *base, config)?;
                let problem = match &scan.error {
                    Some((at, detail)) => Some((*at, detail.clone())),
                    None if scan.next_offset != next_base => Some((
                        scan.valid_bytes,
                        format!(
                            "segment ends at offset {} but the next one starts at {next_base}",
                            scan.next_offset
                        ),
                    )),
                    None => None,
                };
                if let Some((at, detail)) = problem {
                    corruption = Some(describe(&paths.log, at, &detail));
                    expected_next = scan.next_offset;
                    last = Some((*base, file, scan.index, scan.valid_bytes));
                    break;
                }
                tracing::warn!(segment = %paths.log.display(), "rebuilt segment indexes that disagreed with the log");
                let max_timestamp = scan.index.max_timestamp();
                let unwritten = persist_closed_index(fs, &paths, scan.index, next_base - base);
                (max_timestamp, unwritten)
            }
        };
        segments.push(closed_segment(
            dir,
            *base,
            size,
            next_base,
            max_timestamp,
            unwritten,
        ));
        expected_next = next_base;
    }

    // Scanned segments: from the one holding the recovery point to the end.
    if corruption.is_none() {
        for position in first_scanned..bases.len() {
            let base = bases[position];
            let paths = SegmentPaths::new(dir, base);
            let file = fs
                .open(&paths.log, false)
                .map_err(io(format!("open {}", paths.log.display())))?;
            if base != expected_next {
                if expected_next >= recovery_point {
                    // The previous segment lost an unsynced tail in a crash after a roll: this
                    // and later segments hold only offsets that were never fsynced.
                    drop_unsynced_segments(fs, dir, &bases[position..])?;
                } else {
                    corruption = Some(describe(
                        &paths.log,
                        0,
                        &format!(
                            "segment starts at offset {base} but the previous one ends at {expected_next}"
                        ),
                    ));
                }
                break;
            }
            let scan = scan_segment(&file, &paths.log, base, expected_next, config)?;
            let is_last = position + 1 == bases.len();
            let mut size = scan.valid_bytes;
            if let Some((at, detail)) = &scan.error {
                let file_len = file
                    .len()
                    .map_err(io(format!("stat {}", paths.log.display())))?;
                // A torn tail may sit in a segment that rolled just before the crash: the
                // later segments then hold nothing that was ever fsynced either.
                let torn = scan.next_offset >= recovery_point;
                if torn && !is_last {
                    drop_unsynced_segments(fs, dir, &bases[position + 1..])?;
                }
                if torn {
                    let cut_valid_batches = valid_batch_after(&file, *at, file_len)?;
                    file.set_len(*at)
                        .map_err(io(format!("truncate {}", paths.log.display())))?;
                    let started = std::time::Instant::now();
                    file.sync_data()
                        .map_err(io(format!("sync {}", paths.log.display())))?;
                    fsyncs.push(started.elapsed());
                    tracing::warn!(
                        segment = %paths.log.display(),
                        position = at,
                        cut_bytes = file_len - at,
                        next_offset = scan.next_offset,
                        reason = %detail,
                        cut_valid_batches,
                        "truncated a torn tail (unsynced writes lost in a crash)",
                    );
                    size = *at;
                } else {
                    corruption = Some(describe(&paths.log, *at, detail));
                }
            }
            let ends_here = scan.error.is_some();
            expected_next = scan.next_offset;
            scanned_files.push(file.clone());
            if is_last || ends_here || corruption.is_some() {
                last = Some((base, file, scan.index, size));
                break;
            }
            let span = bases[position + 1] - base;
            let max_timestamp = scan.index.max_timestamp();
            let unwritten = persist_closed_index(fs, &paths, scan.index, span);
            segments.push(closed_segment(
                dir,
                base,
                size,
                scan.next_offset,
                max_timestamp,
                unwritten,
            ));
        }
    }

    let (base, file, index, size) = match last {
        Some(last) => last,
        None => {
            // Corruption found at the start of a segment: the previous one stays in place as
            // the (write-refusing) end of the log.
            let segment = segments
                .pop()
                .expect("at least one segment before the bad one");
            let file = fs
                .open(&segment.paths.log, false)
                .map_err(io(format!("open {}", segment.paths.log.display())))?;
            let scan = scan_segment(
                &file,
                &segment.paths.log,
                segment.base_offset,
                segment.base_offset,
                config,
            )?;
            (segment.base_offset, file, scan.index, scan.valid_bytes)
        }
    };
    segments.push(Arc::new(Segment::active(
        dir,
        base,
        file,
        index,
        size,
        expected_next,
    )));

    let durable_offset = if corruption.is_none() {
        for file in &scanned_files {
            let started = std::time::Instant::now();
            file.sync_data()
                .map_err(io(format!("sync {}", dir.display())))?;
            fsyncs.push(started.elapsed());
        }
        expected_next
    } else {
        recovery_point.min(expected_next)
    };
    Ok(Recovered {
        segments,
        next_offset: expected_next,
        durable_offset,
        corruption,
        fsyncs,
    })
}

/// Removes segments that begin above the recovery point after a crash cut the log short
/// before them: none of their offsets was ever fsynced, so none was acknowledged as durable.
fn drop_unsynced_segments(fs: &dyn FileSystem, dir: &Path, bases: &[u64]) -> Result<()> {
    for base in bases {
        let paths = SegmentPaths::new(dir, *base);
        for path in [&paths.log, &paths.index, &paths.time_index, &paths.snapshot] {
            remove_if_present(fs, path)?;
        }
        tracing::warn!(segment = %paths.log.display(), "removed a segment past a torn tail (never fsynced)");
    }
    fs.sync_dir(dir)
        .map_err(io(format!("sync {}", dir.display())))
}

/// Removes `path`; one that is already gone is fine (a leftover another writer finished with
/// meanwhile, a segment without one of its files).
fn remove_if_present(fs: &dyn FileSystem, path: &Path) -> Result<()> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(StorageError::io(
            format!("remove {}", path.display()),
            error,
        )),
    }
}

fn describe(file: &Path, position: u64, detail: &str) -> String {
    format!(
        "corrupt data in {} at position {position}: {detail}",
        file.display()
    )
}

/// Writes a closed segment's indexes when the files differ from what the log says. Returns
/// the index when a file could not be written: the segment then keeps it in memory, as it
/// keeps a rolled segment's until the flusher has written it, so lookups never fall back to
/// scanning the segment from its start for want of the files.
fn persist_closed_index(
    fs: &dyn FileSystem,
    paths: &SegmentPaths,
    mut index: SegmentIndex,
    span: u64,
) -> Option<SegmentIndex> {
    index.close(u32::try_from(span).unwrap_or(u32::MAX));
    let mut written = true;
    for (path, contents) in [
        (&paths.index, index.encode_offsets()),
        (&paths.time_index, index.encode_times()),
    ] {
        if read_file(fs, path).ok().as_deref() == Some(contents.as_slice()) {
            continue;
        }
        if let Err(error) = write_file_durably(fs, path, &contents) {
            tracing::warn!(path = %path.display(), %error, "could not rewrite segment index; it stays in memory");
            written = false;
        }
    }
    (!written).then_some(index)
}

/// A closed segment, holding `unwritten` (see [`persist_closed_index`]) when given.
fn closed_segment(
    dir: &Path,
    base_offset: u64,
    size_bytes: u64,
    next_offset: u64,
    max_timestamp: Option<i64>,
    unwritten: Option<SegmentIndex>,
) -> Arc<Segment> {
    let segment = Segment::closed(dir, base_offset, size_bytes, next_offset, max_timestamp);
    if let Some(index) = unwritten {
        segment.set_pending_index(index);
    }
    Arc::new(segment)
}

#[derive(Debug)]
struct Scan {
    index: SegmentIndex,
    valid_bytes: u64,
    next_offset: u64,
    /// Where the first invalid batch starts, and why.
    error: Option<(u64, String)>,
}

/// Checks every batch of a segment from its start.
fn scan_segment(
    file: &FileHandle,
    path: &Path,
    base_offset: u64,
    expected_next: u64,
    config: &LogConfig,
) -> Result<Scan> {
    let file_len = file.len().map_err(io(format!("stat {}", path.display())))?;
    let mut scan = Scan {
        index: SegmentIndex::new(),
        valid_bytes: 0,
        next_offset: expected_next,
        error: None,
    };
    let mut buffer: Vec<u8> = Vec::new();
    let mut buffer_start = 0u64;
    let mut position = 0u64;
    while position < file_len {
        let fail = |detail: String| Some((position, detail));
        let remaining = file_len - position;
        if remaining < LOG_OVERHEAD_BYTES as u64 {
            scan.error = fail(format!("{remaining} stray bytes at the end"));
            break;
        }
        // Make sure the batch's first 12 bytes, then all of it, are in the buffer.
        let in_buffer = |buffer: &Vec<u8>, buffer_start: u64, needed: u64| {
            position >= buffer_start && position + needed <= buffer_start + buffer.len() as u64
        };
        if !in_buffer(&buffer, buffer_start, LOG_OVERHEAD_BYTES as u64) {
            fill(
                file,
                path,
                &mut buffer,
                &mut buffer_start,
                position,
                SCAN_CHUNK_BYTES,
                file_len,
            )?;
        }
        let at = (position - buffer_start) as usize;
        let size = batch_size(&buffer[at..]).unwrap_or(0);
        if size < HEADER_BYTES as u64 || size > remaining || size > config.segment_bytes {
            scan.error = fail(format!("batch length {size} is impossible here"));
            break;
        }
        if !in_buffer(&buffer, buffer_start, size) {
            fill(
                file,
                path,
                &mut buffer,
                &mut buffer_start,
                position,
                SCAN_CHUNK_BYTES.max(size as usize),
                file_len,
            )?;
        }
        let at = (position - buffer_start) as usize;
        let bytes = &buffer[at..at + size as usize];
        let verdict = RecordBatchRef::new(bytes).and_then(|batch| batch.validate().map(|()| batch));
        let batch = match verdict {
            Ok(batch) => batch,
            Err(error) => {
                scan.error = fail(error.to_string());
                break;
            }
        };
        if batch.base_offset() != scan.next_offset {
            scan.error = fail(format!(
                "batch base offset {} where {} was expected",
                batch.base_offset(),
                scan.next_offset
            ));
            break;
        }
        let relative = u32::try_from(batch.base_offset() - base_offset).unwrap_or(u32::MAX);
        scan.index.on_append(
            relative,
            u32::try_from(position).unwrap_or(u32::MAX),
            size,
            batch.max_timestamp(),
            config.index_interval_bytes,
        );
        scan.next_offset = batch.last_offset() + 1;
        position += size;
        scan.valid_bytes = position;
    }
    Ok(scan)
}

fn fill(
    file: &FileHandle,
    path: &Path,
    buffer: &mut Vec<u8>,
    buffer_start: &mut u64,
    position: u64,
    want: usize,
    file_len: u64,
) -> Result<()> {
    let length = (file_len - position).min(want as u64) as usize;
    buffer.resize(length, 0);
    let read = file
        .read_at(buffer, position)
        .map_err(io(format!("read {} at {position}", path.display())))?;
    buffer.truncate(read);
    *buffer_start = position;
    Ok(())
}

/// Whether any valid batch starts after `invalid_at`: if one does, the damage is not a torn
/// tail (a torn write leaves nothing valid behind it) and must not be truncated away.
fn valid_batch_after(file: &FileHandle, invalid_at: u64, file_len: u64) -> Result<bool> {
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES + HEADER_BYTES];
    let mut start = invalid_at + 1;
    while start + (HEADER_BYTES as u64) <= file_len {
        let length = (file_len - start).min(chunk.len() as u64) as usize;
        let read = file
            .read_at(&mut chunk[..length], start)
            .map_err(io(format!("read at {start}")))?;
        let window = &chunk[..read];
        let last_candidate = window.len().saturating_sub(HEADER_BYTES);
        for at in 0..=last_candidate.min(SCAN_CHUNK_BYTES - 1) {
            let here = &window[at..];
            if here.get(16) != Some(&MAGIC) {
                continue;
            }
            let Some(size) = batch_size(here) else {
                continue;
            };
            let candidate_start = start + at as u64;
            if size < HEADER_BYTES as u64 || candidate_start + size > file_len {
                continue;
            }
            let mut candidate = vec![0u8; size as usize];
            let read = file
                .read_at(&mut candidate, candidate_start)
                .map_err(io(format!("read at {candidate_start}")))?;
            if read == candidate.len()
                && RecordBatchRef::new(&candidate)
                    .is_ok_and(|batch| batch.crc() == batch.computed_crc())
            {
                return Ok(true);
            }
        }
        start += SCAN_CHUNK_BYTES as u64;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::faultfs::{FaultFs, FaultKind};
    use crate::storage::segment::SegmentCache;
    use sluice_protocol::batch::RecordBatchBuilder;

    /// Two segments without index files: offsets 0..20 in batches of two records, then 20.
    fn two_segments_without_indexes(fs: &FaultFs, dir: &Path) {
        fs.create_dir_all(dir).unwrap();
        let mut first = Vec::new();
        for base in (0..20).step_by(2) {
            let mut builder = RecordBatchBuilder::new();
            builder.append(1_000 + base as i64, None, b"value", &[]);
            builder.append(1_001 + base as i64, None, b"value", &[]);
            first.extend_from_slice(builder.build().stamped(base, 0).as_bytes());
        }
        let mut builder = RecordBatchBuilder::new();
        builder.append(2_000, None, b"value", &[]);
        let second = builder.build().stamped(20, 0);
        for (base, contents) in [(0, first.as_slice()), (20, second.as_bytes().as_ref())] {
            write_file_durably(fs, &SegmentPaths::new(dir, base).log, contents).unwrap();
        }
    }

    fn is_not_an_index(path: &Path) -> bool {
        let name = path.to_string_lossy();
        !name.contains(".index") && !name.contains(".timeindex")
    }

    #[test]
    fn a_rebuilt_index_that_cannot_be_written_stays_in_memory() {
        let fs = FaultFs::new();
        let dir = Path::new("/data/topics/t/0");
        two_segments_without_indexes(&fs, dir);
        let config = LogConfig {
            index_interval_bytes: 1,
            ..LogConfig::default()
        };
        fs.fail_writes_sparing(FaultKind::Enospc, is_not_an_index);
        let recovered = recover(&fs, dir, &config).unwrap();
        assert_eq!(recovered.next_offset, 21);
        let closed = &recovered.segments[0];
        assert!(!fs.exists(&closed.paths.index), "the write failed");
        assert!(closed.pending_index().is_some());
        // A lookup starts at the batch that holds the offset, not at the segment's start.
        let (_, entry) = closed.lookup(&fs, &SegmentCache::new(4), 15).unwrap();
        assert_eq!(entry.relative_offset, 14);
        assert!(entry.position > 0);

        // Once the files can be written, the next recovery writes them and keeps nothing.
        fs.clear_faults();
        let recovered = recover(&fs, dir, &config).unwrap();
        assert!(fs.exists(&recovered.segments[0].paths.index));
        assert!(recovered.segments[0].pending_index().is_none());
    }

    #[test]
    fn recovery_point_round_trips_and_rejects_damage() {
        let bytes = encode_recovery_point(123_456);
        assert_eq!(decode_recovery_point(&bytes), Some(123_456));
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x10;
            assert_eq!(decode_recovery_point(&damaged), None);
        }
        assert_eq!(decode_recovery_point(&bytes[..11]), None);
    }
}
