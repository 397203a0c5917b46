//! The filesystem calls storage makes, behind one small trait.
//!
//! Production uses [`RealFs`] (std::fs, positional IO, fsync). Tests also run the same storage
//! code over `FaultFs` (see `faultfs.rs`), which keeps unsynced state apart from synced state so
//! a test can simulate a power loss, tear the last write, and fail writes or fsyncs.
//!
//! # Contract
//! - `write_at` puts bytes in the file's current contents (the page cache). They survive a
//!   power loss only after a later `sync_data` on that file returns `Ok`.
//! - A newly created, renamed or removed directory entry survives a power loss only after a
//!   later `sync_dir` on its parent returns `Ok`.
//! - `read_at` sees every completed `write_at`, synced or not, from any handle.
//! - Methods take `&self` and may be called from many threads; each call is atomic with
//!   respect to the others on the same file (no torn reads of a completed write).
//! - After a failed `sync_data` nothing is known about what reached the disk: callers must not
//!   retry and then report success (see the flusher).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};

/// An open file, shared between the writer and readers.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads up to `len` bytes at `offset` onto the end of `buf`; fewer only at end of file.
    /// Returns how many were read. By default the room is zeroed first, then read into.
    fn read_appending(&self, buf: &mut BytesMut, len: usize, offset: u64) -> io::Result<usize> {
        let start = buf.len();
        buf.resize(start + len, 0);
        let read = self.read_at(&mut buf[start..], offset);
        buf.truncate(start + *read.as_ref().unwrap_or(&0));
        read
    }
    /// `len` bytes at `offset` as shared bytes that are the file's cached pages themselves (a
    /// read-only memory map, whose pages leave this process's page tables when the last clone
    /// is dropped): nothing is copied.
    /// `None` when this file cannot be mapped, and an error when mapping or reading the pages
    /// in failed (a disk error, or the file shorter than asked); the caller then reads with
    /// [`read_appending`](StorageFile::read_appending), which reports the error as a read
    /// does. The file must not shrink below `offset + len` while the bytes live: the storage
    /// only truncates past what it has published.
    fn map(&self, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
        let _ = (offset, len);
        None
    }
    /// Writes all of `buf` at `offset`, extending the file as needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `parts` back to back at `offset`, as one write of their concatenation would,
    /// without concatenating them first. By default one write per part.
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for part in parts {
            self.write_all_at(part, at)?;
            at += part.len() as u64;
        }
        Ok(())
    }
    /// Reserves disk space for `len` bytes at `offset` without changing the file's length
    /// (`fallocate` with `FALLOC_FL_KEEP_SIZE`): later writes there find their blocks
    /// allocated. Space reserved past the end stays taken until [`set_len`](Self::set_len)
    /// gives it back. By default nothing is reserved; an error says it could not be.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Makes the file's contents durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file to `len` bytes; space reserved past `len` is given back.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Shared handle to an open file.
pub type FileHandle = Arc<dyn StorageFile>;

/// Directory and file operations.
pub trait FileSystem: Send + Sync + std::fmt::Debug + 'static {
    /// Opens a file for reading and writing, creating it (empty) when `create` and it is missing.
    fn open(&self, path: &Path, create: bool) -> io::Result<FileHandle>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory (full paths), in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Makes the directory's entries durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// Shared handle to a filesystem.
pub type Fs = Arc<dyn FileSystem>;

/// Writes `contents` to `path` durably: to a temporary sibling, fsynced, renamed into place,
/// and the directory fsynced. After it returns `Ok` the file survives a power loss whole, and a
/// crash before that leaves the previous version (or nothing) in place, never a torn file.
pub fn write_file_durably(fs: &dyn FileSystem, path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let file = fs.open(&temporary, true)?;
    file.set_len(0)?;
    file.write_all_at(contents, 0)?;
    file.sync_data()?;
    drop(file);
    fs.rename(&temporary, path)?;
    fs.sync_dir(dir)
}

/// Reads a whole small file (checkpoints, metadata).
pub fn read_file(fs: &dyn FileSystem, path: &Path) -> io::Result<Vec<u8>> {
    let file = fs.open(path, false)?;
    let len = usize::try_from(file.len()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut buf = vec![0; len];
    let mut filled = 0;
    while filled < len {
        let read = file.read_at(&mut buf[filled..], filled as u64)?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The real disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile {
    file: Arc<File>,
    /// The read-only window over the file that [`StorageFile::map`] hands out slices of,
    /// made on the first call; `None` when it could not be made (reads copy then).
    window: OnceLock<Option<Arc<Window>>>,
}

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(filled)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_appending(&self, buf: &mut BytesMut, len: usize, offset: u64) -> io::Result<usize> {
        // Read straight into the buffer's spare room: a fetch of a megabyte does not zero a
        // megabyte first.
        buf.reserve(len);
        let start = buf.len();
        let mut filled = 0;
        while filled < len {
            let room = &mut buf.spare_capacity_mut()[filled..len];
            let file_offset = libc::off_t::try_from(offset + filled as u64)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: the kernel writes at most `room.len()` bytes into `room`, which is spare
            // capacity of `buf` (reserved above) and not aliased; nothing reads it before the
            // bytes the kernel reported are marked initialised below.
            let read = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    room.as_mut_ptr().cast(),
                    room.len(),
                    file_offset,
                )
            };
            match usize::try_from(read) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        // SAFETY: the first `filled` bytes after `start` were written by pread.
        unsafe { buf.set_len(start + filled) };
        Ok(filled)
    }

    fn map(&self, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
        if MAPPING_UNSUPPORTED.load(Ordering::Relaxed) {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        if len == 0 || end > WINDOW_BYTES as u64 {
            return None;
        }
        let window = self
            .window
            .get_or_init(|| Window::new(&self.file).ok())
            .as_ref()?;
        match window.populate(offset, len) {
            Ok(()) => Some(Ok(Bytes::from_owner(WindowSlice {
                window: Arc::clone(window),
                offset: usize::try_from(offset).expect("within the window"),
                len,
            }))),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                // A kernel without MADV_POPULATE_READ (before 5.14): read from now on.
                MAPPING_UNSUPPORTED.store(true, Ordering::Relaxed);
                None
            }
            Err(error) => Some(Err(error)),
        }
    }

    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        /// Parts handed to one pwritev; more take more calls.
        const MAX_PARTS: usize = 8;
        let mut offset = offset;
        // The next byte to write: part `index`, `skip` bytes in.
        let (mut index, mut skip) = (0, 0);
        loop {
            while index < parts.len() && parts[index].len() == skip {
                index += 1;
                skip = 0;
            }
            if index == parts.len() {
                return Ok(());
            }
            let mut iovecs = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_PARTS];
            let mut count = 0;
            for (slot, part) in iovecs.iter_mut().zip(&parts[index..]) {
                let rest = if count == 0 { &part[skip..] } else { part };
                *slot = libc::iovec {
                    iov_base: rest.as_ptr().cast_mut().cast(),
                    iov_len: rest.len(),
                };
                count += 1;
            }
            let file_offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: the first `count` iovecs point into `parts`, which outlive the call and
            // are only read; the file descriptor is owned by `self.file`.
            let written = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iovecs.as_ptr(),
                    count as libc::c_int,
                    file_offset,
                )
            };
            let mut written = match usize::try_from(written) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(error);
                }
            };
            offset += written as u64;
            while written > 0 {
                let left = parts[index].len() - skip;
                if written >= left {
                    written -= left;
                    index += 1;
                    skip = 0;
                } else {
                    skip += written;
                    written = 0;
                }
            }
        }
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range too large",
            ));
        };
        loop {
            // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
            // `self.file`.
            let done = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            };
            if done == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// Set once mapping turned out not to work here; reads copy from then on.
static MAPPING_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Bytes of a file a [`Window`] covers: every position a segment can have (the index keeps
/// positions as `u32`). Address space only: nothing is read or reserved for it.
const WINDOW_BYTES: usize = 1 << 32;

/// Windows live at once, at most: 16 TiB of the 128 TiB of address space a process has on
/// x86-64. Every partition's active segment keeps its window while it is open, so a broker with
/// tens of thousands of partitions read in large reads would otherwise take all of it, and the
/// next allocation the allocator maps would fail. A file opened past the limit is read by
/// copying, as on a kernel that cannot populate a mapping.
const MAX_WINDOWS: usize = 4096;

static LIVE_WINDOWS: AtomicUsize = AtomicUsize::new(0);

/// Takes one of `max` places in `live`, if one is free.
fn take_window_place(live: &AtomicUsize, max: usize) -> bool {
    live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
        (count < max).then_some(count + 1)
    })
    .is_ok()
}

/// What a released slice takes out of the page tables is widened to these boundaries: the
/// largest page-cache folio (a PMD, 2 MiB on x86-64).
const RELEASE_ALIGN: usize = 2 << 20;

/// A read-only shared mapping of a file's first [`WINDOW_BYTES`], past its end too (a file
/// that grows is covered as it grows), made once per open file and unmapped when the file is
/// closed and no slice of it is left.
///
/// Its pages are the page cache's: reading them copies nothing. A read reads the pages of its
/// range in first ([`populate`](Window::populate), `MADV_POPULATE_READ`), which reports a disk
/// error or a range past the end of the file as an error instead of the `SIGBUS` a first
/// touch would raise, so a damaged disk fails a read as `pread` would; when its slice is
/// dropped the pages leave this process's page tables again (`MADV_DONTNEED`, which only
/// unmaps: the page cache keeps them), so the broker's resident memory does not grow with what
/// it has served. Neither takes the address space's lock for writing, which a mapping per read
/// did twice (`mmap`, `munmap`): one worker's `munmap` then waited for another's page-in, its
/// thread asleep (a quarter of the runtime's context switches while consuming 1 KiB records).
#[derive(Debug)]
struct Window {
    base: std::ptr::NonNull<libc::c_void>,
}

/// Every live window's start address and file, so bytes handed out of one can be sent from the
/// file itself ([`file_source`]).
static WINDOWS: std::sync::Mutex<std::collections::BTreeMap<usize, Arc<File>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn windows() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, Arc<File>>> {
    WINDOWS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The file and position `bytes` were mapped from, when they are a slice of a segment read
/// through [`StorageFile::map`]: such bytes are the page cache's pages of a file region that
/// is never written again, so a socket can be given the region instead of the bytes
/// (`sendfile`), and nothing is copied into it. `None` for any other memory.
pub fn file_source(bytes: &[u8]) -> Option<(Arc<File>, u64)> {
    let address = bytes.as_ptr() as usize;
    let windows = windows();
    let (&base, file) = windows.range(..=address).next_back()?;
    let position = address - base;
    (position + bytes.len() <= WINDOW_BYTES).then(|| (Arc::clone(file), position as u64))
}

// SAFETY: the window is read-only memory owned by this value alone; it is unmapped only on drop.
unsafe impl Send for Window {}
// SAFETY: as above; shared references only read it, and the madvise calls are thread safe.
unsafe impl Sync for Window {}

impl Window {
    fn new(file: &Arc<File>) -> io::Result<Arc<Window>> {
        if !take_window_place(&LIVE_WINDOWS, MAX_WINDOWS) {
            return Err(io::Error::other(format!(
                "{MAX_WINDOWS} files are mapped already"
            )));
        }
        // SAFETY: a fresh read-only mapping chosen by the kernel, of a file descriptor that is
        // open for reading; nothing else refers to the address range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WINDOW_BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let error = io::Error::last_os_error();
            LIVE_WINDOWS.fetch_sub(1, Ordering::AcqRel);
            return Err(error);
        }
        let window = Window {
            base: std::ptr::NonNull::new(base).expect("mmap does not return null"),
        };
        windows().insert(base as usize, Arc::clone(file));
        Ok(Arc::new(window))
    }

    /// The whole pages that hold `len` bytes at `offset`, as (address, length).
    fn pages(&self, offset: u64, len: usize) -> (*mut libc::c_void, usize) {
        let page = page_size();
        let offset = usize::try_from(offset).expect("within the window");
        let first = offset - offset % page;
        let end = (offset + len).next_multiple_of(page).min(WINDOW_BYTES);
        // SAFETY: `first` is within the window (offset + len <= WINDOW_BYTES, checked by map).
        (
            unsafe { self.base.as_ptr().cast::<u8>().add(first).cast() },
            end - first,
        )
    }

    /// Reads in and maps the pages of `len` bytes at `offset`; an error when the disk fails or
    /// the file ends before them.
    fn populate(&self, offset: u64, len: usize) -> io::Result<()> {
        let (address, length) = self.pages(offset, len);
        // SAFETY: the range is within this window's mapping.
        if unsafe { libc::madvise(address, length, libc::MADV_POPULATE_READ) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the pages of the window's bytes `first..end` out of this process's page tables.
    /// A slice still reading a page released this way maps it again from the page cache.
    fn release(&self, first: usize, end: usize) {
        let (address, length) = self.pages(first as u64, end - first);
        // SAFETY: the range is within this window's mapping, which is read-only and shared:
        // MADV_DONTNEED only drops page-table entries, never data.
        unsafe { libc::madvise(address, length, libc::MADV_DONTNEED) };
    }
}

/// What a dropped slice of `len` bytes at `offset` takes out of the page tables: its pages and
/// the rest of the [`RELEASE_ALIGN`] blocks they are in. Reading a page in maps the whole
/// page-cache folio it belongs to (up to 2 MiB on Linux), so the pages of a read's range alone
/// would leave the rest of its folios mapped, a few percent of all that was served (200 MB
/// resident after serving 6 GB).
fn release_range(offset: usize, len: usize) -> (usize, usize) {
    let first = offset - offset % RELEASE_ALIGN;
    let end = (offset + len)
        .next_multiple_of(RELEASE_ALIGN)
        .min(WINDOW_BYTES);
    (first, end)
}

/// Bytes of dropped slices whose pages may stay mapped until they are released together, over
/// all windows. Each release flushes the TLB of every core running a broker thread, by an
/// inter-processor interrupt that the sender waits for and a VM pays a hypervisor exit for:
/// releasing every 1 MiB read on its own spent 3 % of a 1 KiB consume profile on it. Mapped
/// pages count in the broker's resident memory, so what waits is bounded.
const RELEASE_BATCH_BYTES: usize = 8 << 20;

/// Ranges of windows whose slices were dropped, not yet taken out of the page tables. A window
/// that is unmapped meanwhile is skipped: its pages went with it.
static UNRELEASED: std::sync::Mutex<Unreleased> = std::sync::Mutex::new(Unreleased {
    ranges: Vec::new(),
    bytes: 0,
});

#[derive(Debug)]
struct Unreleased {
    /// (window, first byte, end): [`release_range`]s, neighbours of one window merged.
    ranges: Vec<(std::sync::Weak<Window>, usize, usize)>,
    /// What `ranges` cover, in bytes.
    bytes: usize,
}

impl Unreleased {
    /// Adds a range of `window`; all ranges to release now when they add up to a batch.
    fn add(
        &mut self,
        window: &Arc<Window>,
        first: usize,
        end: usize,
    ) -> Option<Vec<(std::sync::Weak<Window>, usize, usize)>> {
        match self.ranges.last_mut() {
            // A consumer reads a file front to back: its next slice meets or overlaps the last.
            Some((last_window, last_first, last_end))
                if std::ptr::eq(last_window.as_ptr(), Arc::as_ptr(window))
                    && first <= *last_end
                    && end >= *last_first =>
            {
                let before = *last_end - *last_first;
                *last_first = (*last_first).min(first);
                *last_end = (*last_end).max(end);
                self.bytes += (*last_end - *last_first) - before;
            }
            _ => {
                self.ranges.push((Arc::downgrade(window), first, end));
                self.bytes += end - first;
            }
        }
        (self.bytes >= RELEASE_BATCH_BYTES).then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.ranges)
        })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        windows().remove(&(self.base.as_ptr() as usize));
        // SAFETY: the mapping was made by `new` with this address and length, and no slice of
        // it is left (each holds the window).
        unsafe { libc::munmap(self.base.as_ptr(), WINDOW_BYTES) };
        LIVE_WINDOWS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bytes of a [`Window`], as a [`Bytes`] owner: the pages were read in when it was made and
/// are released from the page tables when it is dropped.
struct WindowSlice {
    window: Arc<Window>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for WindowSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset + len` is within the window, mapped readable for as long as the
        // window lives (this slice holds it), and the pages were read in when the slice was
        // made; the file does not shrink below them while the storage has them published.
        unsafe {
            std::slice::from_raw_parts(
                self.window.base.as_ptr().cast::<u8>().add(self.offset),
                self.len,
            )
        }
    }
}

impl Drop for WindowSlice {
    fn drop(&mut self) {
        let (first, end) = release_range(self.offset, self.len);
        let due = UNRELEASED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(&self.window, first, end);
        // Released outside the lock; a window unmapped meanwhile has nothing left to release.
        for (window, first, end) in due.into_iter().flatten() {
            if let Some(window) = window.upgrade() {
                window.release(first, end);
            }
        }
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| {
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
    })
}

impl FileSystem for RealFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileHandle> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(RealFile {
            file: Arc::new(file),
            window: OnceLock::new(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(path)?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows are taken up to the limit and refused past it until one is given back.
    #[test]
    fn window_places_run_out_and_come_back() {
        let live = AtomicUsize::new(0);
        assert!(take_window_place(&live, 2));
        assert!(take_window_place(&live, 2));
        assert!(!take_window_place(&live, 2), "the limit is 2");
        assert_eq!(live.load(Ordering::Acquire), 2, "a refusal takes nothing");
        live.fetch_sub(1, Ordering::AcqRel);
        assert!(take_window_place(&live, 2));
    }

    /// The vectored write lands the parts back to back, however many and whatever their
    /// sizes (empty ones included), over what the file held.
    #[test]
    fn vectored_writes_land_their_parts_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = RealFs.open(&dir.path().join("f"), true).unwrap();
        file.write_all_at(&[0xee; 64], 0).unwrap();
        let owned: Vec<Vec<u8>> = (0..20u8)
            .map(|index| vec![index; usize::from(index % 4) * 3])
            .collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        file.write_all_vectored_at(&parts, 10).unwrap();
        let expected: Vec<u8> = owned.concat();
        let mut read = vec![0; 10 + expected.len() + 4];
        let length = file.len().unwrap() as usize;
        assert_eq!(length, 64.max(10 + expected.len()));
        file.read_at(&mut read, 0).unwrap();
        assert_eq!(&read[..10], &[0xee; 10]);
        assert_eq!(&read[10..10 + expected.len()], expected.as_slice());
        // Reads onto the end of a buffer, past the end of the file only as far as it goes.
        let mut appended = BytesMut::from(&b"head"[..]);
        let read = file.read_appending(&mut appended, 20, 10).unwrap();
        assert_eq!(read, 20);
        assert_eq!(&appended[..4], b"head");
        assert_eq!(&appended[4..], &expected[..20]);
        let past_end = file
            .read_appending(&mut appended, 1_000, length as u64 - 3)
            .unwrap();
        assert_eq!(past_end, 3, "a short read at the end of the file");
        assert_eq!(appended.len(), 4 + 20 + 3);
        file.write_all_vectored_at(&[], 0).unwrap();
        file.write_all_vectored_at(&[&[], &[]], 1_000).unwrap();
        assert_eq!(
            file.len().unwrap() as usize,
            length,
            "empty writes change nothing"
        );
    }

    /// A mapped range holds the file's bytes from any offset (page aligned or not), clones
    /// and slices of it too, after the file grows; a range past the end is an error, not a
    /// crash.
    #[test]
    fn mapped_ranges_hold_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = RealFs.open(&dir.path().join("f"), true).unwrap();
        let contents: Vec<u8> = (0..200_000u32).map(|at| (at % 251) as u8).collect();
        file.write_all_at(&contents, 0).unwrap();
        for (offset, len) in [
            (0, 1),
            (0, 4096),
            (1, 4096),
            (4095, 70_000),
            (123_457, 76_543),
        ] {
            let mapped = file
                .map(offset as u64, len)
                .expect("a real file maps")
                .unwrap();
            assert_eq!(&mapped[..], &contents[offset..offset + len]);
            let tail = mapped.slice(len / 2..);
            drop(mapped);
            assert_eq!(&tail[..], &contents[offset + len / 2..offset + len]);
        }
        let early = file.map(190_000, 10_000).unwrap().unwrap();
        file.write_all_at(&[9; 10_000], 200_000).unwrap();
        let grown = file.map(195_000, 10_000).unwrap().unwrap();
        assert_eq!(&grown[..5_000], &contents[195_000..]);
        assert_eq!(&grown[5_000..], &[9; 5_000]);
        assert_eq!(&early[..], &contents[190_000..]);
        let past_end = file.map(205_000, 8_192).expect("a real file maps");
        assert!(past_end.is_err(), "a range past the end of the file fails");
    }

    /// What a mapped range read in stays resident in this process while it is held, and after
    /// that only until a batch of dropped ranges is released: the broker's memory does not
    /// grow with what it has served.
    #[test]
    fn mapped_pages_leave_the_process_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = RealFs.open(&dir.path().join("f"), true).unwrap();
        for at in (0..32u64 << 20).step_by(1 << 20) {
            file.write_all_at(&[7u8; 1 << 20], at).unwrap();
        }
        let mapped = file.map(4096, 4 << 20).unwrap().unwrap();
        let address = mapped.as_ptr() as usize;
        assert!(
            resident_kib(address) >= 4 << 10,
            "read in: {} KiB",
            resident_kib(address)
        );
        drop(mapped);
        // Dropped slices are released together, a batch at a time: what stays mapped is at
        // most a batch and the folio after the last slice.
        let bound_kib = (RELEASE_BATCH_BYTES + RELEASE_ALIGN) as u64 / 1024;
        assert!(resident_kib(address) <= bound_kib);
        // A consumer's reads one after the other, each dropped before the next.
        let mut at = 0;
        while at < 30 << 20 {
            let len = 100_000 + (at % 7) * 10_000;
            drop(file.map(at as u64, len).unwrap().unwrap());
            at += len;
            assert!(
                resident_kib(address) <= bound_kib,
                "after {at} bytes read: {} KiB",
                resident_kib(address)
            );
        }
    }

    /// Neighbouring ranges of a window merge, a batch's worth is handed back whole, and a range
    /// of another window starts a range of its own.
    #[test]
    fn dropped_ranges_are_released_a_batch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        let window = Window::new(&file).unwrap();
        let other = Window::new(&file).unwrap();
        let mut unreleased = Unreleased {
            ranges: Vec::new(),
            bytes: 0,
        };
        assert!(unreleased.add(&window, 0, 2 << 20).is_none());
        assert!(
            unreleased.add(&window, 0, 2 << 20).is_none(),
            "the same range"
        );
        assert!(unreleased.add(&window, 2 << 20, 4 << 20).is_none());
        assert_eq!(unreleased.ranges.len(), 1);
        assert_eq!(unreleased.bytes, 4 << 20);
        assert!(unreleased.add(&other, 0, 2 << 20).is_none());
        assert_eq!(unreleased.ranges.len(), 2);
        let due = unreleased
            .add(&other, 2 << 20, 4 << 20)
            .expect("8 MiB make a batch");
        let due: Vec<(usize, usize)> = due
            .iter()
            .map(|(released, first, end)| {
                assert!(released.upgrade().is_some());
                (*first, *end)
            })
            .collect();
        assert_eq!(due, [(0, 4 << 20), (0, 4 << 20)]);
        assert!(unreleased.ranges.is_empty());
        assert_eq!(unreleased.bytes, 0);
    }

    /// The resident KiB of the mapping that holds `address` (its `Rss` in /proc/self/smaps).
    fn resident_kib(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((from, to)) = range.split_once('-')
                && let (Ok(from), Ok(to)) = (
                    usize::from_str_radix(from, 16),
                    usize::from_str_radix(to, 16),
                )
            {
                inside = (from..to).contains(&address);
            } else if inside && let Some(rss) = line.strip_prefix("Rss:") {
                return rss.trim().trim_end_matches(" kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}");
    }
}
