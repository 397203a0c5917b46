//! An in-memory [`FileSystem`] that can lose power and fail: [`FaultFs`].
//!
//! Storage tests run the same code over `FaultFs` as over the real disk, then pull the plug
//! ([`FaultFs::crash`]), tear the last write ([`FaultFs::tear_on_crash`]) or make writes and
//! fsyncs fail ([`FaultFs::fail_writes`], [`FaultFs::fail_syncs`]) to check that recovery only
//! ever relies on what the contract in [`super::fs`] promises.
//!
//! # Model
//! - A file is an inode with two contents: the current contents (the page cache, what reads
//!   see) and the durable contents (what the last successful `sync_data` put on the disk).
//! - A name is an entry in its parent directory pointing at an inode. Each directory has a
//!   current set of file entries and a durable set, as of the last successful `sync_dir` of that
//!   directory. Renaming moves the inode to another name, so open handles keep working after a
//!   rename or a removal, as on Linux.
//! - [`FaultFs::crash`] reverts every file's contents and every directory's file entries to
//!   their durable state, and kills every open handle: they belong to the process that died, so
//!   they fail with EIO from then on.
//!
//! # Simplifications
//! - Directories themselves are durable at once: `create_dir_all`, `remove_dir_all` and the
//!   rename of a directory survive a crash without a `sync_dir`. The file entries inside a
//!   directory are what the durability checks are about, and they follow the contract.
//! - Paths are keys, not resolved: `.` components are dropped, `..` is refused, there are no
//!   symbolic links, and `/` and the empty path (the working directory) always exist.
//! - Faults persist across a crash (a full disk is still full after a reboot); tests call
//!   [`FaultFs::clear_faults`] when they want the disk healthy again.
//! - A file holds at most [`MAXIMUM_FILE_BYTES`], since everything lives in memory.
//! - One lock guards the whole filesystem, so every call is atomic with respect to every other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::ops::Bound;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::fs::{FileHandle, FileSystem, StorageFile};

/// Linux's "no space left on device"; hardcoded to avoid a libc dependency for two numbers.
const ENOSPC: i32 = 28;
/// Linux's "input/output error".
const EIO: i32 = 5;

/// The largest file `FaultFs` holds. Everything is in memory, so a write or `set_len` at an
/// absurd offset fails with `FileTooLarge` instead of trying to allocate it.
pub const MAXIMUM_FILE_BYTES: u64 = 1 << 30;

/// Which error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No space left on device (ENOSPC, 28).
    Enospc,
    /// Input/output error (EIO, 5).
    Eio,
}

impl FaultKind {
    /// The Linux error number this fault stands for.
    pub fn raw_os_error(self) -> i32 {
        match self {
            FaultKind::Enospc => ENOSPC,
            FaultKind::Eio => EIO,
        }
    }

    /// The error the failing call returns, as the real system call would.
    pub fn to_io_error(self) -> io::Error {
        io::Error::from_raw_os_error(self.raw_os_error())
    }
}

/// A fault-injecting, in-memory filesystem. Clones share the same filesystem.
#[derive(Clone, Debug)]
pub struct FaultFs {
    state: Arc<Mutex<State>>,
}

/// An inode: a file's identity, apart from the names that point at it.
struct Inode {
    /// Keys the inode's entry in `State::unsynced_writes`.
    id: u64,
    contents: Mutex<Contents>,
}

type SharedInode = Arc<Inode>;

impl fmt::Debug for Inode {
    // The contents may be large, so only their sizes are shown.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let contents = lock(&self.contents);
        formatter
            .debug_struct("Inode")
            .field("id", &self.id)
            .field("current_bytes", &contents.current.len())
            .field("durable_bytes", &contents.durable.len())
            .finish()
    }
}

/// A file's page-cache and on-disk contents.
#[derive(Default)]
struct Contents {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// The lowest offset at which `current` may differ from `durable`, or `None` when they are
    /// equal. Below it both hold the same bytes, so a sync copies only the tail that changed
    /// instead of the whole file (a log is synced after every append in some tests).
    dirty_from_byte: Option<usize>,
}

impl Contents {
    fn mark_dirty_from(&mut self, offset: usize) {
        let lowest = self
            .dirty_from_byte
            .map_or(offset, |dirty_from_byte| dirty_from_byte.min(offset));
        self.dirty_from_byte = Some(lowest);
    }

    /// Writes `bytes` at `offset` in the current contents; the caller checked the size limit.
    fn write(&mut self, bytes: &[u8], offset: usize) {
        // A write of nothing changes nothing, even past the end, as with pwrite(2).
        if bytes.is_empty() {
            return;
        }
        let end = offset + bytes.len();
        // Writing past the end also changes the bytes between the old end and `offset`.
        self.mark_dirty_from(offset.min(self.current.len()));
        if self.current.len() < end {
            self.current.resize(end, 0);
        }
        self.current[offset..end].copy_from_slice(bytes);
    }

    fn set_len(&mut self, len: usize) {
        if len == self.current.len() {
            return;
        }
        self.mark_dirty_from(len.min(self.current.len()));
        self.current.resize(len, 0);
    }

    /// Makes the current contents durable.
    fn sync(&mut self) {
        if let Some(dirty_from_byte) = self.dirty_from_byte.take() {
            // Both lengths are at least `dirty_from_byte` by construction; clamping keeps this
            // correct (copying more) and panic-free even if that ever stopped holding.
            let start = dirty_from_byte
                .min(self.durable.len())
                .min(self.current.len());
            self.durable.truncate(start);
            self.durable.extend_from_slice(&self.current[start..]);
        }
    }

    /// Puts `bytes` at `offset` straight into the durable contents, as a torn write that the
    /// disk completed partly.
    fn apply_to_durable(&mut self, bytes: &[u8], offset: usize) {
        if bytes.is_empty() {
            return;
        }
        let end = offset + bytes.len();
        if self.durable.len() < end {
            self.durable.resize(end, 0);
        }
        self.durable[offset..end].copy_from_slice(bytes);
    }

    /// Forgets everything not durable, as a power loss does.
    fn revert_to_durable(&mut self) {
        self.current.clone_from(&self.durable);
        self.dirty_from_byte = None;
    }
}

/// The latest `write_all_at` to one file since its last successful sync: what a torn write
/// would partly put on the disk.
struct UnsyncedWrite {
    /// Orders writes across files, so a crash can find the most recent one.
    sequence: u64,
    /// Weak, so that an unsynced write does not keep a deleted file's contents alive.
    inode: Weak<Inode>,
    offset: usize,
    bytes: Vec<u8>,
}

impl fmt::Debug for UnsyncedWrite {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("UnsyncedWrite")
            .field("sequence", &self.sequence)
            .field("offset", &self.offset)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

#[derive(Debug)]
struct WriteFault {
    kind: FaultKind,
    /// How many more bytes writes may put in files before they fail.
    remaining_bytes: u64,
    /// Files (by the path they were opened under) whose writes the fault leaves alone.
    spared: Option<fn(&Path) -> bool>,
}

#[derive(Debug)]
struct State {
    /// Bumped by every crash; a handle from an older generation belongs to a dead process.
    generation: u64,
    next_inode_id: u64,
    next_write_sequence: u64,
    /// Every directory, closed under parents (a directory's parent is always present).
    directories: BTreeSet<PathBuf>,
    /// File entries as the running process sees them.
    current_files: BTreeMap<PathBuf, SharedInode>,
    /// File entries as a crash would leave them.
    durable_files: BTreeMap<PathBuf, SharedInode>,
    /// Per inode id, the latest write not yet synced.
    unsynced_writes: HashMap<u64, UnsyncedWrite>,
    tear_keep_bytes: Option<usize>,
    write_fault: Option<WriteFault>,
    sync_fault: Option<FaultKind>,
    sync_count: u64,
}

impl State {
    fn new() -> State {
        // The roots exist from the start, as they do on a real machine.
        let directories = [PathBuf::from("/"), PathBuf::new()].into_iter().collect();
        State {
            generation: 0,
            next_inode_id: 0,
            next_write_sequence: 0,
            directories,
            current_files: BTreeMap::new(),
            durable_files: BTreeMap::new(),
            unsynced_writes: HashMap::new(),
            tear_keep_bytes: None,
            write_fault: None,
            sync_fault: None,
            sync_count: 0,
        }
    }

    fn is_directory(&self, path: &Path) -> bool {
        self.directories.contains(path)
    }

    fn is_file(&self, path: &Path) -> bool {
        self.current_files.contains_key(path)
    }

    /// Fails unless `path`'s parent is an existing directory, so a new entry can go in it.
    fn require_parent_directory(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(parent) if self.is_directory(parent) => Ok(()),
            _ => Err(error(
                io::ErrorKind::NotFound,
                path,
                "parent directory does not exist",
            )),
        }
    }

    /// How many of `wanted_bytes` a write may put in the file, and the fault to report when
    /// that is not all of them.
    fn take_write_budget(
        &mut self,
        path: &Path,
        wanted_bytes: usize,
    ) -> (usize, Option<FaultKind>) {
        let Some(fault) = &mut self.write_fault else {
            return (wanted_bytes, None);
        };
        if fault.spared.is_some_and(|spared| spared(path)) {
            return (wanted_bytes, None);
        }
        let allowed_bytes = usize::try_from(fault.remaining_bytes)
            .unwrap_or(usize::MAX)
            .min(wanted_bytes);
        fault.remaining_bytes -= allowed_bytes as u64;
        if allowed_bytes < wanted_bytes {
            (allowed_bytes, Some(fault.kind))
        } else {
            (wanted_bytes, None)
        }
    }

    fn record_unsynced_write(&mut self, inode: &SharedInode, offset: usize, bytes: &[u8]) {
        if !self.unsynced_writes.contains_key(&inode.id) {
            // Entries of deleted files are dropped here, so the table stays as small as the
            // set of live files with unsynced writes.
            self.unsynced_writes
                .retain(|_, write| write.inode.strong_count() > 0);
        }
        let sequence = self.next_write_sequence;
        self.next_write_sequence += 1;
        self.unsynced_writes.insert(
            inode.id,
            UnsyncedWrite {
                sequence,
                inode: Arc::downgrade(inode),
                offset,
                bytes: bytes.to_vec(),
            },
        );
    }

    fn crash(&mut self) {
        self.generation += 1;
        if let Some(keep_bytes) = self.tear_keep_bytes.take() {
            let latest = self
                .unsynced_writes
                .values()
                .max_by_key(|write| write.sequence);
            // A file no longer alive cannot survive the crash, so its torn write has nowhere
            // to land.
            if let Some(write) = latest
                && let Some(inode) = write.inode.upgrade()
            {
                let kept = &write.bytes[..keep_bytes.min(write.bytes.len())];
                lock(&inode.contents).apply_to_durable(kept, write.offset);
            }
        }
        self.unsynced_writes.clear();
        self.current_files.clone_from(&self.durable_files);
        // Only files reachable through a durable entry matter after the crash: the rest are
        // held by dead handles alone.
        for inode in self.durable_files.values() {
            lock(&inode.contents).revert_to_durable();
        }
    }

    /// Makes the file entries directly in `directory` durable.
    fn sync_directory(&mut self, directory: &Path) {
        let is_child = |path: &Path| path.parent() == Some(directory);
        let stale: Vec<PathBuf> = paths_under(&self.durable_files, directory)
            .filter(|path| is_child(path))
            .cloned()
            .collect();
        for path in stale {
            self.durable_files.remove(&path);
        }
        let fresh: Vec<(PathBuf, SharedInode)> = entries_under(&self.current_files, directory)
            .filter(|(path, _)| is_child(path))
            .map(|(path, inode)| (path.clone(), Arc::clone(inode)))
            .collect();
        self.durable_files.extend(fresh);
    }

    fn rename_file(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if self.is_directory(to) {
            return Err(error(
                io::ErrorKind::IsADirectory,
                to,
                "cannot replace a directory with a file",
            ));
        }
        self.require_parent_directory(to)?;
        if from == to {
            return Ok(());
        }
        let Some(inode) = self.current_files.remove(from) else {
            return Err(error(io::ErrorKind::NotFound, from, "no such file"));
        };
        // The replaced inode lives on in open handles and, until the directory is synced, in
        // the durable entries.
        self.current_files.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn rename_directory(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        if from.parent().is_none() {
            return Err(error(
                io::ErrorKind::InvalidInput,
                from,
                "cannot rename a root directory",
            ));
        }
        if from == to {
            return Ok(());
        }
        if to.starts_with(from) {
            return Err(error(
                io::ErrorKind::InvalidInput,
                to,
                "cannot move a directory into itself",
            ));
        }
        if self.is_file(to) {
            return Err(error(
                io::ErrorKind::NotADirectory,
                to,
                "cannot replace a file with a directory",
            ));
        }
        self.require_parent_directory(to)?;
        if self.is_directory(to) {
            let has_subdirectory = directories_under(&self.directories, to).any(|path| path != to);
            let has_file = paths_under(&self.current_files, to).next().is_some();
            if has_subdirectory || has_file {
                return Err(error(
                    io::ErrorKind::DirectoryNotEmpty,
                    to,
                    "directory not empty",
                ));
            }
            // Replacing a directory is durable at once, like every directory change here, so
            // the durable entries of files removed from it go with it.
            self.remove_subtree(to);
        }
        let moved_directories: Vec<PathBuf> = directories_under(&self.directories, from)
            .cloned()
            .collect();
        for path in moved_directories {
            self.directories.remove(&path);
            self.directories.insert(rebase(&path, from, to));
        }
        // The durable entries move too: they belong to the directory, which moved whole.
        move_entries(&mut self.current_files, from, to);
        move_entries(&mut self.durable_files, from, to);
        Ok(())
    }

    /// Removes `root`, everything under it, and the durable entries of its files.
    fn remove_subtree(&mut self, root: &Path) {
        let directories: Vec<PathBuf> = directories_under(&self.directories, root)
            .cloned()
            .collect();
        for path in directories {
            self.directories.remove(&path);
        }
        for files in [&mut self.current_files, &mut self.durable_files] {
            let paths: Vec<PathBuf> = paths_under(files, root).cloned().collect();
            for path in paths {
                files.remove(&path);
            }
        }
    }
}

impl FaultFs {
    /// An empty filesystem with only the roots `/` and the empty path (the working directory).
    pub fn new() -> FaultFs {
        FaultFs {
            state: Arc::new(Mutex::new(State::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Simulates a power loss and restart. Every file reverts to what its last successful
    /// `sync_data` wrote, every directory's file entries to its last successful `sync_dir`, and
    /// every handle opened before fails with EIO from now on. An armed tear
    /// ([`FaultFs::tear_on_crash`]) is applied first and then disarmed. Injected faults stay.
    pub fn crash(&self) {
        self.lock().crash();
    }

    /// Makes the next [`FaultFs::crash`] tear the most recent unsynced `write_all_at` (to any
    /// file): its first `keep_bytes` bytes reach the disk, on top of that file's durable
    /// contents, and the rest is lost. Without an unsynced write the crash is a plain one.
    pub fn tear_on_crash(&self, keep_bytes: usize) {
        self.lock().tear_keep_bytes = Some(keep_bytes);
    }

    /// Makes writes fail with `kind`. With `after_bytes = Some(n)`, writes may still put `n`
    /// bytes in files (in total, from now on); the write that crosses the limit puts in the part
    /// that fits and then fails, as a short write on a full disk does. With `None`, every write
    /// of at least one byte fails without writing. `set_len` is not affected: extending a file
    /// on Linux makes it sparse and does not allocate.
    pub fn fail_writes(&self, kind: FaultKind, after_bytes: Option<u64>) {
        self.lock().write_fault = Some(WriteFault {
            kind,
            remaining_bytes: after_bytes.unwrap_or(0),
            spared: None,
        });
    }

    /// Makes every write fail with `kind`, except writes to files whose path (as opened)
    /// `spared` accepts: those neither fail nor count. For a scenario that needs one kind of
    /// file to fit on a full disk whatever order other threads write in.
    pub fn fail_writes_sparing(&self, kind: FaultKind, spared: fn(&Path) -> bool) {
        self.lock().write_fault = Some(WriteFault {
            kind,
            remaining_bytes: 0,
            spared: Some(spared),
        });
    }

    /// Makes every `sync_data` and `sync_dir` fail with `kind`, leaving the durable state as it
    /// was: a failed fsync makes nothing durable.
    pub fn fail_syncs(&self, kind: FaultKind) {
        self.lock().sync_fault = Some(kind);
    }

    /// Removes the write and sync faults. An armed tear stays: it is part of the next crash.
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.write_fault = None;
        state.sync_fault = None;
    }

    /// How many `sync_data` calls have succeeded, over the filesystem's whole life.
    pub fn sync_count(&self) -> u64 {
        self.lock().sync_count
    }

    /// The contents a crash now would leave at `path` (ignoring an armed tear): the durable
    /// contents of the file durably linked there, or `None` when no file would be there.
    pub fn read_durable(&self, path: &Path) -> Option<Vec<u8>> {
        let path = normalize(path).ok()?;
        let state = self.lock();
        let inode = state.durable_files.get(&path)?;
        Some(lock(&inode.contents).durable.clone())
    }
}

impl Default for FaultFs {
    fn default() -> FaultFs {
        FaultFs::new()
    }
}

impl FileSystem for FaultFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileHandle> {
        let path = normalize(path)?;
        let mut state = self.lock();
        if state.is_directory(&path) {
            return Err(error(io::ErrorKind::IsADirectory, &path, "is a directory"));
        }
        let inode = match state.current_files.get(&path) {
            Some(inode) => Arc::clone(inode),
            None if create => {
                state.require_parent_directory(&path)?;
                let inode = Arc::new(Inode {
                    id: state.next_inode_id,
                    contents: Mutex::new(Contents::default()),
                });
                state.next_inode_id += 1;
                state.current_files.insert(path.clone(), Arc::clone(&inode));
                inode
            }
            None => return Err(error(io::ErrorKind::NotFound, &path, "no such file")),
        };
        Ok(Arc::new(FaultFile {
            state: Arc::clone(&self.state),
            inode,
            path,
            generation: state.generation,
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        let mut state = self.lock();
        for ancestor in path.ancestors() {
            if state.is_file(ancestor) {
                let kind = if ancestor == path {
                    io::ErrorKind::AlreadyExists
                } else {
                    io::ErrorKind::NotADirectory
                };
                return Err(error(kind, ancestor, "a file is in the way"));
            }
        }
        for ancestor in path.ancestors() {
            state.directories.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let directory = normalize(path)?;
        let state = self.lock();
        if state.is_file(&directory) {
            return Err(error(
                io::ErrorKind::NotADirectory,
                &directory,
                "not a directory",
            ));
        }
        if !state.is_directory(&directory) {
            return Err(error(
                io::ErrorKind::NotFound,
                &directory,
                "no such directory",
            ));
        }
        let is_child = |child: &&PathBuf| child.parent() == Some(directory.as_path());
        let subdirectories = directories_under(&state.directories, &directory).filter(is_child);
        let files = paths_under(&state.current_files, &directory).filter(is_child);
        // Joined onto the caller's path, as std::fs::read_dir does, so the caller can match
        // the entries against the paths it built.
        Ok(subdirectories
            .chain(files)
            .filter_map(|child| child.file_name())
            .map(|name| path.join(name))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let from = normalize(from)?;
        let to = normalize(to)?;
        let mut state = self.lock();
        if state.is_file(&from) {
            state.rename_file(&from, &to)
        } else if state.is_directory(&from) {
            state.rename_directory(&from, &to)
        } else {
            Err(error(
                io::ErrorKind::NotFound,
                &from,
                "no such file or directory",
            ))
        }
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        let mut state = self.lock();
        if state.is_directory(&path) {
            return Err(error(io::ErrorKind::IsADirectory, &path, "is a directory"));
        }
        match state.current_files.remove(&path) {
            Some(_) => Ok(()),
            None => Err(error(io::ErrorKind::NotFound, &path, "no such file")),
        }
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        let mut state = self.lock();
        if state.is_file(&path) {
            return Err(error(
                io::ErrorKind::NotADirectory,
                &path,
                "not a directory",
            ));
        }
        if !state.is_directory(&path) {
            return Err(error(io::ErrorKind::NotFound, &path, "no such directory"));
        }
        if path.parent().is_none() {
            return Err(error(
                io::ErrorKind::InvalidInput,
                &path,
                "cannot remove a root directory",
            ));
        }
        state.remove_subtree(&path);
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let Ok(path) = normalize(path) else {
            return false;
        };
        let state = self.lock();
        state.is_file(&path) || state.is_directory(&path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        let mut state = self.lock();
        if state.is_file(&path) {
            return Err(error(
                io::ErrorKind::NotADirectory,
                &path,
                "not a directory",
            ));
        }
        if !state.is_directory(&path) {
            return Err(error(io::ErrorKind::NotFound, &path, "no such directory"));
        }
        if let Some(kind) = state.sync_fault {
            return Err(kind.to_io_error());
        }
        state.sync_directory(&path);
        Ok(())
    }
}

/// An open file of a [`FaultFs`].
struct FaultFile {
    state: Arc<Mutex<State>>,
    inode: SharedInode,
    /// The path the file was opened under (a rename since does not change it).
    path: PathBuf,
    /// The generation the handle was opened in; after a crash it no longer matches.
    generation: u64,
}

impl fmt::Debug for FaultFile {
    // The state is shared by every handle and large; the inode identifies the file.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("FaultFile")
            .field("inode", &self.inode.id)
            .field("generation", &self.generation)
            .finish()
    }
}

impl FaultFile {
    /// Locks the filesystem, failing with EIO when the handle outlived a crash.
    fn live_state(&self) -> io::Result<MutexGuard<'_, State>> {
        let state = lock(&self.state);
        if state.generation != self.generation {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(state)
    }
}

impl StorageFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let _state = self.live_state()?;
        let contents = lock(&self.inode.contents);
        let Some(available) = usize::try_from(offset)
            .ok()
            .and_then(|offset| contents.current.get(offset..))
        else {
            // Past the end of the file, as pread(2) reports it.
            return Ok(0);
        };
        let read_bytes = buf.len().min(available.len());
        buf[..read_bytes].copy_from_slice(&available[..read_bytes]);
        Ok(read_bytes)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.live_state()?;
        let offset = checked_file_offset(offset, buf.len())?;
        let (allowed_bytes, fault) = state.take_write_budget(&self.path, buf.len());
        let written = &buf[..allowed_bytes];
        if !written.is_empty() {
            lock(&self.inode.contents).write(written, offset);
            state.record_unsynced_write(&self.inode, offset, written);
        }
        match fault {
            Some(kind) => Err(kind.to_io_error()),
            None => Ok(()),
        }
    }

    /// One write of the parts joined, as `pwritev` is one system call: the write budget and a
    /// tear see it whole, and no other writer's bytes come between its parts.
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_all_at(&parts.concat(), offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.live_state()?;
        if let Some(kind) = state.sync_fault {
            return Err(kind.to_io_error());
        }
        lock(&self.inode.contents).sync();
        state.unsynced_writes.remove(&self.inode.id);
        state.sync_count += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let _state = self.live_state()?;
        Ok(lock(&self.inode.contents).current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _state = self.live_state()?;
        let len = checked_file_offset(len, 0)?;
        lock(&self.inode.contents).set_len(len);
        Ok(())
    }
}

/// Locks a mutex of this module. A poisoned lock means a thread panicked mid-update, after
/// which the simulated disk can no longer be trusted, so the test fails loudly.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("faultfs lock poisoned: a thread panicked while changing the filesystem")
}

/// `offset` as an index, when `offset + extra_bytes` stays within [`MAXIMUM_FILE_BYTES`].
fn checked_file_offset(offset: u64, extra_bytes: usize) -> io::Result<usize> {
    let end = u64::try_from(extra_bytes)
        .ok()
        .and_then(|extra_bytes| offset.checked_add(extra_bytes));
    match end {
        Some(end) if end <= MAXIMUM_FILE_BYTES => usize::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::FileTooLarge, "faultfs: file too large")),
        _ => Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("faultfs: a file may hold at most {MAXIMUM_FILE_BYTES} bytes"),
        )),
    }
}

/// The path as a key: `.` components dropped, `..` refused (nothing here resolves it).
fn normalize(path: &Path) -> io::Result<PathBuf> {
    let mut normalized = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(error(
                    io::ErrorKind::InvalidInput,
                    path,
                    "`..` is not supported",
                ));
            }
            Component::Prefix(_) | Component::RootDir | Component::Normal(_) => {
                normalized.push(component);
            }
        }
    }
    Ok(normalized)
}

fn error(kind: io::ErrorKind, path: &Path, message: &str) -> io::Error {
    io::Error::new(kind, format!("faultfs: {}: {message}", path.display()))
}

/// The entries of `map` at or below `root`. Paths order component by component, so a subtree
/// is one contiguous range starting at its root.
fn entries_under<'map, V>(
    map: &'map BTreeMap<PathBuf, V>,
    root: &'map Path,
) -> impl Iterator<Item = (&'map PathBuf, &'map V)> {
    map.range::<Path, _>((Bound::Included(root), Bound::Unbounded))
        .take_while(move |(path, _)| path.starts_with(root))
}

/// The keys of `map` at or below `root`.
fn paths_under<'map, V>(
    map: &'map BTreeMap<PathBuf, V>,
    root: &'map Path,
) -> impl Iterator<Item = &'map PathBuf> {
    entries_under(map, root).map(|(path, _)| path)
}

/// The directories at or below `root` (see [`entries_under`] for why this is a range).
fn directories_under<'set>(
    directories: &'set BTreeSet<PathBuf>,
    root: &'set Path,
) -> impl Iterator<Item = &'set PathBuf> {
    directories
        .range::<Path, _>((Bound::Included(root), Bound::Unbounded))
        .take_while(move |path| path.starts_with(root))
}

/// `path`, which is at or below `from`, moved to the same place below `to`.
fn rebase(path: &Path, from: &Path, to: &Path) -> PathBuf {
    match path.strip_prefix(from) {
        Ok(relative) if relative.as_os_str().is_empty() => to.to_path_buf(),
        Ok(relative) => to.join(relative),
        // Unreachable for callers, which pass paths under `from`; leaving the path alone is
        // the harmless answer.
        Err(_) => path.to_path_buf(),
    }
}

/// Moves the entries of `map` under `from` to the same places under `to`.
fn move_entries(map: &mut BTreeMap<PathBuf, SharedInode>, from: &Path, to: &Path) {
    let moved: Vec<PathBuf> = paths_under(map, from).cloned().collect();
    for path in moved {
        if let Some(inode) = map.remove(&path) {
            map.insert(rebase(&path, from, to), inode);
        }
    }
}

#[cfg(test)]
#[path = "faultfs_test.rs"]
mod tests;
