//! Producer ids and names, broker-wide, persisted under `<data-dir>/producers/`.
//!
//! ```text
//! <data-dir>/producers/id-block   reserved_end u64, crc32c u32
//!                                 (ids below reserved_end may have been handed out)
//! <data-dir>/producers/names      version u8 (1), count u32,
//!                                 (name_length u16, name UTF-8, producer_id u64, epoch u16)*,
//!                                 crc32c u32 of everything before it
//! ```
//!
//! Both files are replaced durably (temporary file, fsync, rename, directory fsync) before
//! whatever they record is answered. Ids come from a block reserved ahead: reserving costs one
//! durable write per [`ID_BLOCK_SIZE`] ids, and after a restart (clean or not) the rest of the
//! block is skipped, so an id is never handed out twice. The names table is rewritten whole on
//! each named InitProducerId: that call is rare (once per producer instance start) and the
//! table is bounded by `limits.max_producers` names of at most [`MAX_NAME_BYTES`] bytes.
//!
//! Names are never forgotten (forgetting one would let a zombie of its old id write again
//! unfenced); a new name over the limit gets `LimitExceeded`.
//!
//! Every method here does blocking file IO: call it off the async runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use sluice_protocol::ErrorCode;
use sluice_protocol::batch::{NO_PRODUCER_EPOCH, NO_PRODUCER_ID};

use super::state::ProducerError;
use crate::storage::Fs;
use crate::storage::fs::{read_file, write_file_durably};

/// Ids reserved with one durable write.
pub const ID_BLOCK_SIZE: u64 = 1024;
/// Longest producer name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// The directory under the data dir.
pub const PRODUCERS_DIR: &str = "producers";
const ID_BLOCK_FILE: &str = "id-block";
const NAMES_FILE: &str = "names";
const NAMES_VERSION: u8 = 1;

/// Why InitProducerId failed; carries its wire error code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProducerIdError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProducerIdError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProducerIdError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NamedProducer {
    producer_id: u64,
    producer_epoch: u16,
}

#[derive(Debug)]
struct IdBlock {
    next_id: u64,
    /// Ids below this are reserved on disk.
    reserved_end: u64,
}

/// The broker's producer ids and named producers.
#[derive(Debug)]
pub struct ProducerRegistry {
    dir: PathBuf,
    fs: Fs,
    max_names: usize,
    ids: Mutex<IdBlock>,
    /// No id at or above this was handed out. Read without a lock on every idempotent batch.
    issued_below: AtomicU64,
    names: Mutex<BTreeMap<String, NamedProducer>>,
    /// For each name whose epoch a running instance raised, the id and epoch it raised it
    /// from: that instance asking again (its answer was lost) is given the same new epoch, not
    /// fenced. Taken only under `names`; in memory only (a retry after a restart is fenced).
    bumped_from: Mutex<BTreeMap<String, (u64, u16)>>,
    /// The current epoch of each named producer's id: the fence every partition checks under
    /// its writer lock. Updated only after the names file holds the epoch. Also every id
    /// fenced entirely (`NO_PRODUCER_EPOCH`): a name's old id when its epochs ran out, and an
    /// unnamed producer's old id when it took a new one ([`Self::fence_unnamed`]).
    epochs: DashMap<u64, u16>,
    /// The unnamed ids fenced, oldest first: at most [`MAX_FENCED_UNNAMED`] are kept fenced.
    fenced_unnamed: Mutex<std::collections::VecDeque<u64>>,
}

/// Unnamed producers' old ids kept fenced at most. A batch of one fenced id can only be still
/// on its way for a request timeout after its producer took a new id; this many newer fences
/// later it is long gone, and the table stays bounded however often clients ask.
const MAX_FENCED_UNNAMED: usize = 65_536;

fn storage_error(context: String) -> impl FnOnce(std::io::Error) -> ProducerIdError {
    move |error| ProducerIdError::new(ErrorCode::StorageError, format!("{context}: {error}"))
}

fn encode_id_block(reserved_end: u64) -> Vec<u8> {
    let mut out = reserved_end.to_be_bytes().to_vec();
    out.extend_from_slice(&sluice_protocol::checksum::crc32c(&out).to_be_bytes());
    out
}

fn decode_id_block(bytes: &[u8]) -> Option<u64> {
    let (value, crc) = (bytes.get(..8)?, bytes.get(8..12)?);
    if bytes.len() != 12 || sluice_protocol::checksum::crc32c(value).to_be_bytes() != crc {
        return None;
    }
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

fn encode_names(names: &BTreeMap<String, NamedProducer>) -> Vec<u8> {
    let mut out = vec![NAMES_VERSION];
    let count = u32::try_from(names.len()).expect("names bounded by max_producers");
    out.extend_from_slice(&count.to_be_bytes());
    for (name, named) in names {
        let length = u16::try_from(name.len()).expect("names bounded by MAX_NAME_BYTES");
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&named.producer_id.to_be_bytes());
        out.extend_from_slice(&named.producer_epoch.to_be_bytes());
    }
    out.extend_from_slice(&sluice_protocol::checksum::crc32c(&out).to_be_bytes());
    out
}

fn decode_names(bytes: &[u8]) -> Option<BTreeMap<String, NamedProducer>> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if sluice_protocol::checksum::crc32c(body).to_be_bytes() != crc {
        return None;
    }
    let (&version, rest) = body.split_first()?;
    if version != NAMES_VERSION {
        return None;
    }
    let (count, mut rest) = rest.split_at_checked(4)?;
    let count = u32::from_be_bytes(count.try_into().ok()?);
    let mut names = BTreeMap::new();
    for _ in 0..count {
        let (length, tail) = rest.split_at_checked(2)?;
        let length = usize::from(u16::from_be_bytes(length.try_into().ok()?));
        let (name, tail) = tail.split_at_checked(length)?;
        let (id, tail) = tail.split_at_checked(8)?;
        let (epoch, tail) = tail.split_at_checked(2)?;
        rest = tail;
        let named = NamedProducer {
            producer_id: u64::from_be_bytes(id.try_into().ok()?),
            producer_epoch: u16::from_be_bytes(epoch.try_into().ok()?),
        };
        let name = std::str::from_utf8(name).ok()?.to_owned();
        if named.producer_id == NO_PRODUCER_ID || names.insert(name, named).is_some() {
            return None;
        }
    }
    rest.is_empty().then_some(names)
}

impl ProducerRegistry {
    /// Opens (or creates) `<data_dir>/producers`. Blocking.
    ///
    /// # Errors
    /// `StorageError` when the directory cannot be created or a file is unreadable or
    /// damaged: starting without them could hand out an id twice or unfence a zombie.
    pub fn open(data_dir: &Path, fs: Fs, max_names: usize) -> Result<Self, ProducerIdError> {
        let dir = data_dir.join(PRODUCERS_DIR);
        if !fs.exists(&dir) {
            fs.create_dir_all(&dir)
                .map_err(storage_error(format!("create {}", dir.display())))?;
            fs.sync_dir(data_dir)
                .map_err(storage_error(format!("sync {}", data_dir.display())))?;
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>, ProducerIdError> {
            let path = dir.join(name);
            match read_file(fs.as_ref(), &path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(storage_error(format!("read {}", path.display()))(error)),
            }
        };
        let damaged = |name: &str| {
            ProducerIdError::new(
                ErrorCode::StorageError,
                format!(
                    "{} is damaged; refusing to start rather than reuse producer ids",
                    dir.join(name).display()
                ),
            )
        };
        let reserved_end = match read(ID_BLOCK_FILE)? {
            None => 0,
            Some(bytes) => decode_id_block(&bytes).ok_or_else(|| damaged(ID_BLOCK_FILE))?,
        };
        let names = match read(NAMES_FILE)? {
            None => BTreeMap::new(),
            Some(bytes) => decode_names(&bytes).ok_or_else(|| damaged(NAMES_FILE))?,
        };
        // The rest of the last reserved block is skipped: some of it may have been handed out
        // before the stop. A name's id is always below the reservation, but a hand-edited file
        // must not make the counter go back either.
        let next_id = names
            .values()
            .map(|named| named.producer_id.saturating_add(1))
            .fold(reserved_end, u64::max);
        let epochs = names
            .values()
            .map(|named| (named.producer_id, named.producer_epoch))
            .collect();
        tracing::info!(dir = %dir.display(), next_id, names = names.len(), "opened producer ids");
        Ok(ProducerRegistry {
            dir,
            fs,
            max_names,
            ids: Mutex::new(IdBlock {
                next_id,
                reserved_end,
            }),
            issued_below: AtomicU64::new(next_id),
            names: Mutex::new(names),
            bumped_from: Mutex::new(BTreeMap::new()),
            epochs,
            fenced_unnamed: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// A fresh producer id. Blocking: it may reserve a new block of ids durably.
    ///
    /// # Errors
    /// `StorageError` when the reservation cannot be written (no id is handed out);
    /// `LimitExceeded` when the 64-bit id space is used up.
    pub fn allocate_id(&self) -> Result<u64, ProducerIdError> {
        let mut ids = self.ids.lock().expect("producer id lock poisoned");
        if ids.next_id >= ids.reserved_end {
            // NO_PRODUCER_ID (u64::MAX) is never handed out: ids stay below reserved_end.
            let reserved_end = ids.next_id.saturating_add(ID_BLOCK_SIZE);
            if reserved_end == ids.next_id {
                return Err(ProducerIdError::new(
                    ErrorCode::LimitExceeded,
                    "producer ids are used up",
                ));
            }
            let path = self.dir.join(ID_BLOCK_FILE);
            write_file_durably(self.fs.as_ref(), &path, &encode_id_block(reserved_end))
                .map_err(storage_error(format!("write {}", path.display())))?;
            ids.reserved_end = reserved_end;
        }
        let id = ids.next_id;
        ids.next_id += 1;
        self.issued_below.store(ids.next_id, Ordering::Release);
        Ok(id)
    }

    /// The id of `name` with its epoch bumped (or a fresh id at epoch 0 for a new name),
    /// persisted before it is returned. From the moment it returns, batches of the id with an
    /// older epoch are fenced on every partition. Blocking.
    ///
    /// `current` is the id and epoch a running instance holds when it asks for a new epoch of
    /// its own; `None` for an instance starting. A running instance whose name has moved on
    /// (a newer instance started since) is fenced instead of taking the name back.
    ///
    /// # Errors
    /// `InvalidRequest` for an empty name or one over [`MAX_NAME_BYTES`]; `ProducerFenced` when
    /// `current` is not the name's id and epoch; `LimitExceeded` for a new name when
    /// `max_producers` names are held; `StorageError` when the table cannot be written (nothing
    /// changes then).
    pub fn init_named(
        &self,
        name: &str,
        current: Option<(u64, u16)>,
    ) -> Result<(u64, u16), ProducerIdError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(ProducerIdError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "producer name must be 1 to {MAX_NAME_BYTES} bytes, got {}",
                    name.len()
                ),
            ));
        }
        let mut names = self.names.lock().expect("producer names lock poisoned");
        let mut bumped_from = self
            .bumped_from
            .lock()
            .expect("producer bumps lock poisoned");
        let previous = names.get(name).copied();
        if let (Some(held), Some(named)) = (current, previous)
            && held != (named.producer_id, named.producer_epoch)
        {
            // The instance that raised the epoch from what it holds, asking again.
            if bumped_from.get(name) == Some(&held) {
                return Ok((named.producer_id, named.producer_epoch));
            }
            return Err(ProducerIdError::new(
                ErrorCode::ProducerFenced,
                format!(
                    "producer {name} holds id {} epoch {}, but the name has moved on to id {} \
                     epoch {}: a newer instance started",
                    held.0, held.1, named.producer_id, named.producer_epoch
                ),
            ));
        }
        let next = match previous {
            // NO_PRODUCER_EPOCH (u16::MAX) is never handed out.
            Some(named) if named.producer_epoch < NO_PRODUCER_EPOCH - 1 => NamedProducer {
                producer_id: named.producer_id,
                producer_epoch: named.producer_epoch + 1,
            },
            Some(named) => {
                // Epochs used up: the name moves to a new id, as Kafka does. The old id stays
                // fenced entirely while this broker runs (see `epochs` below); after a restart
                // only the partitions' own epochs fence it.
                tracing::warn!(
                    producer = name,
                    old_id = named.producer_id,
                    "producer epochs used up; moving the name to a new id"
                );
                NamedProducer {
                    producer_id: self.allocate_id()?,
                    producer_epoch: 0,
                }
            }
            None if names.len() >= self.max_names => {
                return Err(ProducerIdError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the broker holds max_producers ({}) producer names",
                        self.max_names
                    ),
                ));
            }
            None => NamedProducer {
                producer_id: self.allocate_id()?,
                producer_epoch: 0,
            },
        };
        names.insert(name.to_owned(), next);
        let path = self.dir.join(NAMES_FILE);
        if let Err(error) = write_file_durably(self.fs.as_ref(), &path, &encode_names(&names)) {
            match previous {
                Some(previous) => names.insert(name.to_owned(), previous),
                None => names.remove(name),
            };
            return Err(storage_error(format!("write {}", path.display()))(error));
        }
        // A starting instance takes the name from everyone, retries included.
        match current {
            Some(held) => bumped_from.insert(name.to_owned(), held),
            None => bumped_from.remove(name),
        };
        if let Some(previous) = previous
            && previous.producer_id != next.producer_id
        {
            self.epochs.insert(previous.producer_id, NO_PRODUCER_EPOCH);
        }
        self.epochs.insert(next.producer_id, next.producer_epoch);
        Ok((next.producer_id, next.producer_epoch))
    }

    /// Fences every batch of `producer_id`, an id issued to a producer without a name that has
    /// asked for a new one (its outcome of a batch was unknown): a copy of its batch still on
    /// its way (queued in a connection the client gave up on) is refused on every partition
    /// instead of appended after the new id's batches. An id never issued, or a named
    /// producer's, is left alone. In memory only, like the other fences of this table.
    pub fn fence_unnamed(&self, producer_id: u64) {
        if producer_id >= self.issued_below.load(Ordering::Acquire) {
            return;
        }
        // Under the names lock, as names take ids and their entries: a named producer's id, or
        // one fenced already, has its entry.
        let _names = self.names.lock().expect("producer names lock poisoned");
        let mut fenced = self
            .fenced_unnamed
            .lock()
            .expect("fenced producers lock poisoned");
        if self.epochs.contains_key(&producer_id) {
            return;
        }
        self.epochs.insert(producer_id, NO_PRODUCER_EPOCH);
        fenced.push_back(producer_id);
        if fenced.len() > MAX_FENCED_UNNAMED
            && let Some(oldest) = fenced.pop_front()
        {
            self.epochs.remove(&oldest);
        }
    }

    /// The lowest epoch a batch of `producer_id` may carry: a named producer's current epoch,
    /// 0 for everyone else. Cheap; called under partition writer locks.
    pub fn current_epoch(&self, producer_id: u64) -> u16 {
        self.epochs.get(&producer_id).map_or(0, |epoch| *epoch)
    }

    /// Refuses a batch whose producer id this broker never handed out, or whose epoch is not
    /// one it issued (`NO_PRODUCER_EPOCH`, or above a named producer's current epoch).
    ///
    /// # Errors
    /// [`ProducerError::NotIssued`].
    pub fn check_issued(&self, producer_id: u64, producer_epoch: u16) -> Result<(), ProducerError> {
        let issued = producer_id < self.issued_below.load(Ordering::Acquire)
            && producer_epoch != NO_PRODUCER_EPOCH
            && self
                .epochs
                .get(&producer_id)
                .is_none_or(|current| producer_epoch <= *current);
        if issued {
            Ok(())
        } else {
            Err(ProducerError::NotIssued {
                producer_id,
                producer_epoch,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::faultfs::{FaultFs, FaultKind};

    fn open(fs: &FaultFs, max_names: usize) -> Result<ProducerRegistry, ProducerIdError> {
        ProducerRegistry::open(Path::new("/data"), Arc::new(fs.clone()), max_names)
    }

    /// Unnamed ids are fenced entirely, the last `MAX_FENCED_UNNAMED` of them: the oldest
    /// fence goes when one more is made. Named ids and ids never issued are not fenced so.
    #[test]
    fn unnamed_fences_are_kept_for_the_latest_ids_only() {
        let fs = FaultFs::new();
        let registry = open(&fs, 10).unwrap();
        let (named, epoch) = registry.init_named("relay", None).unwrap();
        registry.fence_unnamed(named);
        assert_eq!(
            registry.current_epoch(named),
            epoch,
            "a name's id is not fenced so"
        );
        registry.fence_unnamed(u64::MAX - 1);
        assert_eq!(registry.current_epoch(u64::MAX - 1), 0, "never issued");
        let ids: Vec<u64> = (0..=MAX_FENCED_UNNAMED)
            .map(|_| registry.allocate_id().unwrap())
            .collect();
        for &id in &ids {
            registry.fence_unnamed(id);
        }
        assert_eq!(registry.current_epoch(ids[0]), 0, "the oldest fence went");
        assert_eq!(registry.current_epoch(ids[1]), NO_PRODUCER_EPOCH);
        assert_eq!(
            registry.current_epoch(*ids.last().unwrap()),
            NO_PRODUCER_EPOCH
        );
        assert_eq!(
            registry.epochs.len(),
            MAX_FENCED_UNNAMED + 1,
            "and the name's"
        );
        assert_eq!(registry.current_epoch(named), epoch);
    }

    #[test]
    fn ids_are_never_reused_across_crashes() {
        let fs = FaultFs::new();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let registry = open(&fs, 10).unwrap();
            for _ in 0..(ID_BLOCK_SIZE + 5) {
                let id = registry.allocate_id().unwrap();
                assert!(seen.insert(id), "id {id} handed out twice");
                registry.check_issued(id, 0).unwrap();
            }
            assert!(
                registry
                    .check_issued(registry.allocate_id().unwrap() + 1, 0)
                    .is_err()
            );
            fs.crash();
        }
    }

    #[test]
    fn a_name_keeps_its_id_and_bumps_its_epoch_durably() {
        let fs = FaultFs::new();
        let registry = open(&fs, 2).unwrap();
        let (id, epoch) = registry.init_named("relay", None).unwrap();
        assert_eq!(epoch, 0);
        assert_eq!(registry.init_named("relay", None).unwrap(), (id, 1));
        assert_eq!(registry.current_epoch(id), 1);
        assert!(
            registry.check_issued(id, 2).is_err(),
            "epoch 2 not issued yet"
        );
        registry.check_issued(id, 1).unwrap();
        let (other, _) = registry.init_named("other", None).unwrap();
        assert_ne!(other, id);
        let error = registry.init_named("third", None).unwrap_err();
        assert_eq!(error.code, ErrorCode::LimitExceeded);
        assert_eq!(
            registry.init_named("", None).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            registry
                .init_named(&"n".repeat(256), None)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
        fs.crash();
        drop(registry);
        let registry = open(&fs, 2).unwrap();
        assert_eq!(registry.current_epoch(id), 1);
        assert_eq!(registry.init_named("relay", None).unwrap(), (id, 2));
        assert!(registry.allocate_id().unwrap() > other);
    }

    #[test]
    fn a_running_instance_whose_name_moved_on_is_fenced_not_given_the_name_back() {
        let fs = FaultFs::new();
        let registry = open(&fs, 10).unwrap();
        let first = registry.init_named("relay", None).unwrap();
        // Its own new epoch: granted.
        let bumped = registry.init_named("relay", Some(first)).unwrap();
        assert_eq!(bumped, (first.0, first.1 + 1));
        // A newer instance starts; the older one, back from a partition, asks for a new epoch.
        let newer = registry.init_named("relay", None).unwrap();
        let error = registry.init_named("relay", Some(bumped)).unwrap_err();
        assert_eq!(error.code, ErrorCode::ProducerFenced);
        assert_eq!(
            registry.current_epoch(newer.0),
            newer.1,
            "the newer one keeps it"
        );
        assert_eq!(
            registry.init_named("relay", Some(newer)).unwrap(),
            (newer.0, newer.1 + 1)
        );
    }

    #[test]
    fn an_instance_asking_again_for_the_epoch_it_raised_gets_the_same_one() {
        let fs = FaultFs::new();
        let registry = open(&fs, 10).unwrap();
        let first = registry.init_named("relay", None).unwrap();
        let bumped = registry.init_named("relay", Some(first)).unwrap();
        // The answer was lost and the request sent again, still holding `first`.
        assert_eq!(registry.init_named("relay", Some(first)).unwrap(), bumped);
        assert_eq!(registry.current_epoch(first.0), bumped.1, "raised once");
        // Its next bump, from what it now holds, goes on as usual.
        let again = registry.init_named("relay", Some(bumped)).unwrap();
        assert_eq!(again, (first.0, first.1 + 2));
        // Once a starting instance took the name, neither older epoch gets it back.
        let newer = registry.init_named("relay", None).unwrap();
        for held in [bumped, again] {
            let error = registry.init_named("relay", Some(held)).unwrap_err();
            assert_eq!(error.code, ErrorCode::ProducerFenced, "{held:?}");
        }
        assert_eq!(registry.current_epoch(newer.0), newer.1);
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let fs = FaultFs::new();
        let registry = open(&fs, 10).unwrap();
        let (id, _) = registry.init_named("relay", None).unwrap();
        fs.fail_syncs(FaultKind::Eio);
        assert_eq!(
            registry.init_named("relay", None).unwrap_err().code,
            ErrorCode::StorageError
        );
        fs.clear_faults();
        assert_eq!(registry.current_epoch(id), 0);
        assert_eq!(registry.init_named("relay", None).unwrap(), (id, 1));
    }

    #[test]
    fn damaged_files_refuse_to_start() {
        for file in [ID_BLOCK_FILE, NAMES_FILE] {
            let fs = FaultFs::new();
            let registry = open(&fs, 10).unwrap();
            registry.init_named("relay", None).unwrap();
            drop(registry);
            let path = Path::new("/data").join(PRODUCERS_DIR).join(file);
            let mut bytes = read_file(&fs, &path).unwrap();
            bytes[0] ^= 1;
            write_file_durably(&fs, &path, &bytes).unwrap();
            assert_eq!(open(&fs, 10).unwrap_err().code, ErrorCode::StorageError);
        }
    }

    #[test]
    fn names_files_decode_only_whole() {
        let mut names = BTreeMap::new();
        for (index, name) in ["a", "relay", "ñ"].into_iter().enumerate() {
            names.insert(
                name.to_owned(),
                NamedProducer {
                    producer_id: index as u64 * 7,
                    producer_epoch: index as u16,
                },
            );
        }
        let bytes = encode_names(&names);
        assert_eq!(decode_names(&bytes), Some(names));
        for length in 0..bytes.len() {
            assert_eq!(decode_names(&bytes[..length]), None);
        }
    }
}
