//! One partition's idempotent-producer state: a plain state machine, no IO, no clock.
//!
//! ```text
//! check(batch, fence_epoch, now) ─▶ Err(Fenced | OutOfOrder | UnknownProducer | LimitExceeded)
//!        │                        └▶ Ok(Duplicate(original))  answered with the original offsets
//!        └▶ Ok(Append(reservation)) ─▶ the log writes the batch ─▶ record(..)
//! ```
//!
//! [`crate::storage::PartitionLog`] owns a [`ProducerStateTable`] inside its writer lock, so
//! the check and the append are one atomic step. The rules are in [`crate::producers`].
//!
//! # Snapshot file
//!
//! ```text
//! magic "SLPS", version u8 (1), offset u64 (the state of every batch below it),
//! anchor_crc u32 (crc32c field of the batch ending at offset - 1; 0 when offset is 0),
//! count u32, entries (producer id ascending):
//!     producer_id u64, producer_epoch u16, last_seen_ms u64, batch_count u8 (1..=5),
//!     batches (oldest first): producer_epoch u16, first_sequence u64, last_sequence u64,
//!                             base_offset u64, last_offset u64, max_timestamp_ms i64
//! crc32c u32 of everything before it
//! ```
//!
//! The anchor ties a snapshot to the log it describes: a snapshot is used on recovery only
//! when the log still holds, at `offset - 1`, the batch it was taken after.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_protocol::ErrorCode;
use sluice_protocol::batch::RecordBatchRef;

/// Batches kept per producer and partition to recognise retries. Clients keep at most this
/// many in flight per partition, so a retry is always one of them.
pub const RETAINED_BATCHES: usize = 5;

const SNAPSHOT_MAGIC: &[u8; 4] = b"SLPS";
const SNAPSHOT_VERSION: u8 = 1;
/// magic, version, offset, anchor_crc, count.
const SNAPSHOT_HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 4;
const SNAPSHOT_ENTRY_BYTES: usize = 8 + 2 + 8 + 1;
const SNAPSHOT_BATCH_BYTES: usize = 2 + 8 + 8 + 8 + 8 + 8;
const SNAPSHOT_CRC_BYTES: usize = 4;

/// One batch a producer wrote, as a partition remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMetadata {
    pub producer_epoch: u16,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub base_offset: u64,
    pub last_offset: u64,
    /// The batch's own `max_timestamp`, as the producer set it.
    pub max_timestamp_ms: i64,
}

/// What a partition knows about one producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    /// The highest epoch seen here, from a batch or pushed by InitProducerId.
    pub producer_epoch: u16,
    /// The broker's clock at the producer's last batch (or InitProducerId), for expiry.
    pub last_seen_ms: u64,
    /// Oldest first, at most [`RETAINED_BATCHES`], never empty.
    batches: VecDeque<BatchMetadata>,
}

impl ProducerEntry {
    fn new(producer_epoch: u16, last_seen_ms: u64, first: BatchMetadata) -> ProducerEntry {
        let mut batches = VecDeque::with_capacity(RETAINED_BATCHES);
        batches.push_back(first);
        ProducerEntry {
            producer_epoch,
            last_seen_ms,
            batches,
        }
    }

    /// The retained batches, oldest first.
    pub fn batches(&self) -> impl ExactSizeIterator<Item = &BatchMetadata> {
        self.batches.iter()
    }

    fn newest(&self) -> &BatchMetadata {
        self.batches
            .back()
            .expect("a producer entry always holds a batch")
    }

    /// Sequence of the newest batch's last record.
    pub fn last_sequence(&self) -> u64 {
        self.newest().last_sequence
    }

    /// The sequence the next batch must start with. Saturates at `u64::MAX`: a producer that
    /// used up the sequence space gets `OutOfOrderSequence` for every further batch.
    pub fn next_sequence(&self) -> u64 {
        self.last_sequence().saturating_add(1)
    }

    fn push(&mut self, batch: BatchMetadata) {
        if self.batches.len() == RETAINED_BATCHES {
            self.batches.pop_front();
        }
        self.batches.push_back(batch);
    }
}

/// The producer fields of a batch about to be appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncomingBatch {
    pub producer_id: u64,
    pub producer_epoch: u16,
    pub first_sequence: u64,
    pub last_offset_delta: u32,
}

impl IncomingBatch {
    pub fn of(batch: &RecordBatchRef<'_>) -> IncomingBatch {
        IncomingBatch {
            producer_id: batch.producer_id(),
            producer_epoch: batch.producer_epoch(),
            first_sequence: batch.base_sequence(),
            last_offset_delta: batch.last_offset_delta(),
        }
    }

    /// The sequence of the batch's last record, `None` when it does not fit in 64 bits.
    pub fn last_sequence(&self) -> Option<u64> {
        self.first_sequence
            .checked_add(u64::from(self.last_offset_delta))
    }
}

/// Why a batch from an idempotent producer was refused. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    #[error(
        "producer {producer_id} with epoch {producer_epoch} is fenced: epoch {current_epoch} took over"
    )]
    Fenced {
        producer_id: u64,
        producer_epoch: u16,
        current_epoch: u16,
    },
    #[error(
        "producer {producer_id}: batch starts at sequence {first_sequence}, but {expected} is next"
    )]
    OutOfOrder {
        producer_id: u64,
        first_sequence: u64,
        expected: u64,
    },
    #[error(
        "producer {producer_id} has no state on this partition (expired or never seen), so its \
         first batch must start at sequence 0, not {first_sequence}; call InitProducerId again"
    )]
    UnknownProducer {
        producer_id: u64,
        first_sequence: u64,
    },
    #[error(
        "producer id {producer_id} with epoch {producer_epoch} was never issued by this broker"
    )]
    NotIssued {
        producer_id: u64,
        producer_epoch: u16,
    },
    #[error(
        "producer state is full: the broker holds max_producers ({max_producers}) producer \
         partitions and none here is idle past producer_expiry_ms"
    )]
    LimitExceeded { max_producers: usize },
    #[error(
        "producer {producer_id}: sequences {first_sequence} + {last_offset_delta} overflow u64"
    )]
    SequenceOverflow {
        producer_id: u64,
        first_sequence: u64,
        last_offset_delta: u32,
    },
}

impl ProducerError {
    /// The per-partition error code a produce answer carries.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProducerError::Fenced { .. } => ErrorCode::ProducerFenced,
            ProducerError::OutOfOrder { .. } => ErrorCode::OutOfOrderSequence,
            ProducerError::UnknownProducer { .. } | ProducerError::NotIssued { .. } => {
                ErrorCode::UnknownProducerId
            }
            ProducerError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            ProducerError::SequenceOverflow { .. } => ErrorCode::InvalidRequest,
        }
    }
}

/// The broker-wide cap on (producer, partition) states, shared by every partition's table.
#[derive(Debug)]
pub struct ProducerBudget {
    used: AtomicUsize,
    max: usize,
}

impl ProducerBudget {
    pub fn new(max: usize) -> Arc<ProducerBudget> {
        Arc::new(ProducerBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// States held right now, across every partition.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_reserve(self: &Arc<Self>) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .ok()
            .map(|_| Reservation {
                budget: Some(Arc::clone(self)),
            })
    }

    /// Counts recovered state, which is kept even over the cap: dropping it could let a retry
    /// be written twice. New producers are refused until the count is back under the cap.
    fn add(&self, count: usize) {
        self.used.fetch_add(count, Ordering::AcqRel);
    }

    fn release(&self, count: usize) {
        let before = self.used.fetch_sub(count, Ordering::AcqRel);
        assert!(
            before >= count,
            "producer budget released {count} of {before}"
        );
    }
}

/// Room for one new producer, taken before its first batch is written and given back if the
/// write fails (on drop).
#[derive(Debug)]
pub struct Reservation {
    budget: Option<Arc<ProducerBudget>>,
}

impl Reservation {
    fn consume(mut self) {
        self.budget = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.release(1);
        }
    }
}

/// What to do with a batch that passed the checks.
#[derive(Debug)]
pub enum Verdict {
    /// Write it, then [`ProducerStateTable::record`] it (with the reservation of a new
    /// producer).
    Append(Option<Reservation>),
    /// A retry of this batch, already in the log: answer with its offsets, write nothing.
    Duplicate(BatchMetadata),
}

/// A decoded snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot holds the state of every batch below this offset.
    pub offset: u64,
    /// crc32c field of the batch ending at `offset - 1`.
    pub anchor_crc: u32,
    pub entries: Vec<(u64, ProducerEntry)>,
}

/// Every producer's state in one partition. Lives under the partition's writer lock.
#[derive(Debug)]
pub struct ProducerStateTable {
    producers: HashMap<u64, ProducerEntry>,
    budget: Arc<ProducerBudget>,
    expiry_ms: u64,
}

impl Drop for ProducerStateTable {
    fn drop(&mut self) {
        self.budget.release(self.producers.len());
    }
}

impl ProducerStateTable {
    pub fn new(budget: Arc<ProducerBudget>, expiry_ms: u64) -> ProducerStateTable {
        ProducerStateTable {
            producers: HashMap::new(),
            budget,
            expiry_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, producer_id: u64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// A copy of every entry, by producer id.
    pub fn entries(&self) -> BTreeMap<u64, ProducerEntry> {
        self.producers
            .iter()
            .map(|(id, entry)| (*id, entry.clone()))
            .collect()
    }

    /// Decides what to do with `batch`. `fence_epoch` is the lowest epoch still allowed for
    /// this producer id broker-wide (the epoch InitProducerId last issued to its name, else 0).
    ///
    /// # Errors
    /// See [`ProducerError`]; the table is unchanged except for expired producers dropped to
    /// make room.
    pub fn check(
        &mut self,
        batch: &IncomingBatch,
        fence_epoch: u16,
        now_ms: u64,
    ) -> Result<Verdict, ProducerError> {
        let producer_id = batch.producer_id;
        let last_sequence = batch
            .last_sequence()
            .ok_or(ProducerError::SequenceOverflow {
                producer_id,
                first_sequence: batch.first_sequence,
                last_offset_delta: batch.last_offset_delta,
            })?;
        let fenced = |current_epoch: u16| {
            Err(ProducerError::Fenced {
                producer_id,
                producer_epoch: batch.producer_epoch,
                current_epoch,
            })
        };
        if let Some(entry) = self.producers.get(&producer_id) {
            let current_epoch = entry.producer_epoch.max(fence_epoch);
            if batch.producer_epoch < current_epoch {
                return fenced(current_epoch);
            }
            // A retry is the very same batch: same epoch and sequence range.
            if let Some(original) = entry.batches().find(|retained| {
                retained.producer_epoch == batch.producer_epoch
                    && retained.first_sequence == batch.first_sequence
                    && retained.last_sequence == last_sequence
            }) {
                return Ok(Verdict::Duplicate(*original));
            }
            // Sequences continue across epochs (see the module docs), so the check is the same
            // whatever the batch's epoch.
            if entry.last_sequence().checked_add(1) == Some(batch.first_sequence) {
                return Ok(Verdict::Append(None));
            }
            return Err(ProducerError::OutOfOrder {
                producer_id,
                first_sequence: batch.first_sequence,
                expected: entry.next_sequence(),
            });
        }
        if batch.producer_epoch < fence_epoch {
            return fenced(fence_epoch);
        }
        if batch.first_sequence != 0 {
            return Err(ProducerError::UnknownProducer {
                producer_id,
                first_sequence: batch.first_sequence,
            });
        }
        let reservation = match self.budget.try_reserve() {
            Some(reservation) => reservation,
            None => {
                self.expire(now_ms);
                self.budget
                    .try_reserve()
                    .ok_or(ProducerError::LimitExceeded {
                        max_producers: self.budget.max(),
                    })?
            }
        };
        Ok(Verdict::Append(Some(reservation)))
    }

    /// Records a batch the log has just written after [`ProducerStateTable::check`] said
    /// `Append(reservation)`.
    pub fn record(
        &mut self,
        producer_id: u64,
        batch: BatchMetadata,
        reservation: Option<Reservation>,
        now_ms: u64,
    ) {
        match self.producers.entry(producer_id) {
            Entry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                entry.producer_epoch = entry.producer_epoch.max(batch.producer_epoch);
                entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
                entry.push(batch);
                // An unused reservation (the producer appeared meanwhile) goes back on drop.
                drop(reservation);
            }
            Entry::Vacant(vacant) => {
                match reservation {
                    Some(reservation) => reservation.consume(),
                    None => self.budget.add(1),
                }
                vacant.insert(ProducerEntry::new(batch.producer_epoch, now_ms, batch));
            }
        }
    }

    /// Records a batch found in the log on recovery. No checks: the log is the truth.
    pub fn replay(&mut self, producer_id: u64, batch: BatchMetadata, now_ms: u64) {
        self.record(producer_id, batch, None, now_ms);
    }

    /// Raises a producer's epoch (InitProducerId with its name), so older instances are fenced
    /// here from now on, and returns the next sequence it expects; `None` when this partition
    /// holds no state for the producer.
    pub fn fence(&mut self, producer_id: u64, producer_epoch: u16, now_ms: u64) -> Option<u64> {
        let entry = self.producers.get_mut(&producer_id)?;
        entry.producer_epoch = entry.producer_epoch.max(producer_epoch);
        // The new instance is about to produce: do not expire it in between.
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        Some(entry.next_sequence())
    }

    /// Drops producers idle for `producer_expiry_ms` or longer; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let expiry_ms = self.expiry_ms;
        self.remove_where(|entry| now_ms.saturating_sub(entry.last_seen_ms) >= expiry_ms)
    }

    /// Drops producers whose every retained batch is below `log_start_offset` (deleted by
    /// retention), so the state always describes the log as it is; returns how many.
    pub fn remove_below(&mut self, log_start_offset: u64) -> usize {
        self.remove_where(|entry| entry.newest().last_offset < log_start_offset)
    }

    fn remove_where(&mut self, doomed: impl Fn(&ProducerEntry) -> bool) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, entry| !doomed(entry));
        let removed = before - self.producers.len();
        self.budget.release(removed);
        removed
    }

    /// Replaces the table's contents with a snapshot's.
    pub fn load(&mut self, entries: Vec<(u64, ProducerEntry)>) {
        self.budget.release(self.producers.len());
        self.producers = entries.into_iter().collect();
        self.budget.add(self.producers.len());
    }

    /// The snapshot file of this state, taken when the log ends at `offset`.
    pub fn encode_snapshot(&self, offset: u64, anchor_crc: u32) -> Vec<u8> {
        let mut ids: Vec<u64> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(
            SNAPSHOT_HEADER_BYTES
                + ids.len() * (SNAPSHOT_ENTRY_BYTES + RETAINED_BATCHES * SNAPSHOT_BATCH_BYTES)
                + SNAPSHOT_CRC_BYTES,
        );
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&anchor_crc.to_be_bytes());
        let count = u32::try_from(ids.len()).expect("producer table over u32::MAX entries");
        out.extend_from_slice(&count.to_be_bytes());
        for id in ids {
            let entry = &self.producers[&id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.producer_epoch.to_be_bytes());
            out.extend_from_slice(&entry.last_seen_ms.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for batch in &entry.batches {
                out.extend_from_slice(&batch.producer_epoch.to_be_bytes());
                out.extend_from_slice(&batch.first_sequence.to_be_bytes());
                out.extend_from_slice(&batch.last_sequence.to_be_bytes());
                out.extend_from_slice(&batch.base_offset.to_be_bytes());
                out.extend_from_slice(&batch.last_offset.to_be_bytes());
                out.extend_from_slice(&batch.max_timestamp_ms.to_be_bytes());
            }
        }
        let crc = sluice_protocol::checksum::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }
}

/// A cursor over untrusted bytes: every read is checked.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_at_checked(N)?;
        self.rest = rest;
        head.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[byte]| byte)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

/// Decodes a snapshot file; `None` when it is damaged or breaks an invariant, in which case
/// recovery falls back to an older snapshot or to the log alone.
pub fn decode_snapshot(bytes: &[u8]) -> Option<Snapshot> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(SNAPSHOT_CRC_BYTES)?)?;
    if sluice_protocol::checksum::crc32c(body).to_be_bytes() != crc {
        return None;
    }
    let mut cursor = Cursor { rest: body };
    if &cursor.take::<4>()? != SNAPSHOT_MAGIC || cursor.u8()? != SNAPSHOT_VERSION {
        return None;
    }
    let offset = cursor.u64()?;
    let anchor_crc = cursor.u32()?;
    let count = usize::try_from(cursor.u32()?).ok()?;
    // Each entry takes at least this much: a count the file cannot hold is refused before
    // anything is allocated for it.
    if count > cursor.rest.len() / (SNAPSHOT_ENTRY_BYTES + SNAPSHOT_BATCH_BYTES) {
        return None;
    }
    let mut entries: Vec<(u64, ProducerEntry)> = Vec::with_capacity(count);
    for _ in 0..count {
        let producer_id = cursor.u64()?;
        if entries
            .last()
            .is_some_and(|(previous, _)| *previous >= producer_id)
        {
            return None;
        }
        let producer_epoch = cursor.u16()?;
        let last_seen_ms = cursor.u64()?;
        let batch_count = usize::from(cursor.u8()?);
        if !(1..=RETAINED_BATCHES).contains(&batch_count) {
            return None;
        }
        let mut batches = VecDeque::with_capacity(RETAINED_BATCHES);
        for _ in 0..batch_count {
            let batch = BatchMetadata {
                producer_epoch: cursor.u16()?,
                first_sequence: cursor.u64()?,
                last_sequence: cursor.u64()?,
                base_offset: cursor.u64()?,
                last_offset: cursor.u64()?,
                max_timestamp_ms: cursor.i64()?,
            };
            let follows = batches
                .back()
                .is_none_or(|previous: &BatchMetadata| previous.last_offset < batch.base_offset);
            if batch.first_sequence > batch.last_sequence
                || batch.base_offset > batch.last_offset
                || batch.last_offset >= offset
                || batch.producer_epoch > producer_epoch
                || !follows
            {
                return None;
            }
            batches.push_back(batch);
        }
        entries.push((
            producer_id,
            ProducerEntry {
                producer_epoch,
                last_seen_ms,
                batches,
            },
        ));
    }
    if !cursor.rest.is_empty() {
        return None;
    }
    Some(Snapshot {
        offset,
        anchor_crc,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY_MS: u64 = 1_000;

    fn table(max: usize) -> ProducerStateTable {
        ProducerStateTable::new(ProducerBudget::new(max), EXPIRY_MS)
    }

    fn incoming(producer_id: u64, epoch: u16, first: u64, records: u32) -> IncomingBatch {
        IncomingBatch {
            producer_id,
            producer_epoch: epoch,
            first_sequence: first,
            last_offset_delta: records - 1,
        }
    }

    /// Runs check and, when it says so, records the batch at `next_offset`; returns the offset
    /// the batch is answered with and whether it was a duplicate.
    fn append(
        table: &mut ProducerStateTable,
        batch: IncomingBatch,
        fence_epoch: u16,
        next_offset: &mut u64,
        now_ms: u64,
    ) -> Result<(u64, bool), ProducerError> {
        match table.check(&batch, fence_epoch, now_ms)? {
            Verdict::Duplicate(original) => Ok((original.base_offset, true)),
            Verdict::Append(reservation) => {
                let base_offset = *next_offset;
                let last_offset = base_offset + u64::from(batch.last_offset_delta);
                *next_offset = last_offset + 1;
                table.record(
                    batch.producer_id,
                    BatchMetadata {
                        producer_epoch: batch.producer_epoch,
                        first_sequence: batch.first_sequence,
                        last_sequence: batch.last_sequence().unwrap(),
                        base_offset,
                        last_offset,
                        max_timestamp_ms: 7,
                    },
                    reservation,
                    now_ms,
                );
                Ok((base_offset, false))
            }
        }
    }

    #[test]
    fn sequences_must_follow_and_retries_get_the_original_offset() {
        let mut table = table(10);
        let mut next = 0;
        assert_eq!(
            append(&mut table, incoming(1, 0, 0, 3), 0, &mut next, 0),
            Ok((0, false))
        );
        assert_eq!(
            append(&mut table, incoming(1, 0, 3, 2), 0, &mut next, 0),
            Ok((3, false))
        );
        // The same batch again: the original offset, nothing written.
        assert_eq!(
            append(&mut table, incoming(1, 0, 0, 3), 0, &mut next, 0),
            Ok((0, true))
        );
        assert_eq!(
            append(&mut table, incoming(1, 0, 3, 2), 0, &mut next, 0),
            Ok((3, true))
        );
        assert_eq!(next, 5);
        // A gap, an overlap that is not a retained batch, and a replay of the past.
        for (first, records) in [(6, 1), (4, 1), (2, 3), (0, 1)] {
            assert_eq!(
                append(&mut table, incoming(1, 0, first, records), 0, &mut next, 0),
                Err(ProducerError::OutOfOrder {
                    producer_id: 1,
                    first_sequence: first,
                    expected: 5,
                }),
                "{first}+{records}"
            );
        }
        assert_eq!(next, 5, "nothing written by refused batches");
        assert_eq!(table.get(1).unwrap().next_sequence(), 5);
    }

    #[test]
    fn only_the_last_five_batches_are_recognised() {
        let mut table = table(10);
        let mut next = 0;
        for sequence in 0..7 {
            append(&mut table, incoming(1, 0, sequence, 1), 0, &mut next, 0).unwrap();
        }
        let entry = table.get(1).unwrap();
        assert_eq!(entry.batches().len(), RETAINED_BATCHES);
        assert_eq!(entry.batches().next().unwrap().first_sequence, 2);
        for sequence in 2..7 {
            assert_eq!(
                append(&mut table, incoming(1, 0, sequence, 1), 0, &mut next, 0),
                Ok((sequence, true))
            );
        }
        // Older than what is kept: it cannot be answered with its offsets.
        assert!(matches!(
            append(&mut table, incoming(1, 0, 1, 1), 0, &mut next, 0),
            Err(ProducerError::OutOfOrder { expected: 7, .. })
        ));
    }

    #[test]
    fn a_new_producer_starts_at_zero() {
        let mut table = table(10);
        let mut next = 0;
        assert_eq!(
            append(&mut table, incoming(9, 0, 4, 1), 0, &mut next, 0),
            Err(ProducerError::UnknownProducer {
                producer_id: 9,
                first_sequence: 4
            })
        );
        assert!(table.is_empty());
        assert_eq!(
            append(&mut table, incoming(9, 0, 0, 1), 0, &mut next, 0),
            Ok((0, false))
        );
    }

    #[test]
    fn epochs_fence_and_sequences_continue_across_them() {
        let mut table = table(10);
        let mut next = 0;
        append(&mut table, incoming(1, 0, 0, 2), 0, &mut next, 0).unwrap();
        // InitProducerId for the name: epoch 1 from now on, continuing at sequence 2.
        assert_eq!(table.fence(1, 1, 0), Some(2));
        assert_eq!(table.fence(2, 1, 0), None, "no state, nothing reported");
        let fenced = Err(ProducerError::Fenced {
            producer_id: 1,
            producer_epoch: 0,
            current_epoch: 1,
        });
        assert_eq!(
            append(&mut table, incoming(1, 0, 2, 1), 0, &mut next, 0),
            fenced
        );
        // Even a retry of the old instance's own batch is fenced.
        assert_eq!(
            append(&mut table, incoming(1, 0, 0, 2), 0, &mut next, 0),
            fenced
        );
        // The new instance continues; restarting at 0 would be a replay.
        assert!(matches!(
            append(&mut table, incoming(1, 1, 0, 1), 0, &mut next, 0),
            Err(ProducerError::OutOfOrder { expected: 2, .. })
        ));
        assert_eq!(
            append(&mut table, incoming(1, 1, 2, 1), 0, &mut next, 0),
            Ok((2, false))
        );
        // A higher epoch the partition has not been told about (a fence pushed before a
        // restart, say) is accepted when the sequence continues.
        assert_eq!(
            append(&mut table, incoming(1, 2, 3, 1), 0, &mut next, 0),
            Ok((3, false))
        );
        assert_eq!(table.get(1).unwrap().producer_epoch, 2);
    }

    #[test]
    fn the_broker_wide_fence_applies_before_the_partition_knows() {
        let mut table = table(10);
        let mut next = 0;
        // Named producer 1 is at epoch 3 broker-wide; this partition never saw it.
        assert!(matches!(
            append(&mut table, incoming(1, 2, 0, 1), 3, &mut next, 0),
            Err(ProducerError::Fenced {
                current_epoch: 3,
                ..
            })
        ));
        append(&mut table, incoming(1, 3, 0, 1), 3, &mut next, 0).unwrap();
        // Known here at epoch 3, and the registry moved to 4.
        assert!(matches!(
            append(&mut table, incoming(1, 3, 1, 1), 4, &mut next, 0),
            Err(ProducerError::Fenced {
                current_epoch: 4,
                ..
            })
        ));
    }

    #[test]
    fn sequence_arithmetic_never_overflows() {
        let mut table = table(10);
        let mut next = 0;
        assert!(matches!(
            append(&mut table, incoming(1, 0, u64::MAX, 2), 0, &mut next, 0),
            Err(ProducerError::SequenceOverflow { .. })
        ));
        table.replay(
            1,
            BatchMetadata {
                producer_epoch: 0,
                first_sequence: u64::MAX,
                last_sequence: u64::MAX,
                base_offset: 0,
                last_offset: 0,
                max_timestamp_ms: 0,
            },
            0,
        );
        assert_eq!(table.get(1).unwrap().next_sequence(), u64::MAX);
        assert!(matches!(
            append(&mut table, incoming(1, 0, 0, 1), 0, &mut next, 0),
            Err(ProducerError::OutOfOrder { .. })
        ));
        assert_eq!(
            append(&mut table, incoming(1, 0, u64::MAX, 1), 0, &mut next, 0),
            Ok((0, true))
        );
    }

    #[test]
    fn the_budget_is_shared_and_idle_producers_make_room() {
        let budget = ProducerBudget::new(2);
        let mut first = ProducerStateTable::new(Arc::clone(&budget), EXPIRY_MS);
        let mut second = ProducerStateTable::new(Arc::clone(&budget), EXPIRY_MS);
        let (mut next_first, mut next_second) = (0, 0);
        append(&mut first, incoming(1, 0, 0, 1), 0, &mut next_first, 0).unwrap();
        append(&mut second, incoming(2, 0, 0, 1), 0, &mut next_second, 500).unwrap();
        assert_eq!(budget.used(), 2);
        // Full, and nothing in the second table is idle long enough.
        assert_eq!(
            append(&mut second, incoming(3, 0, 0, 1), 0, &mut next_second, 900),
            Err(ProducerError::LimitExceeded { max_producers: 2 })
        );
        // Known producers keep producing at the cap.
        append(&mut first, incoming(1, 0, 1, 1), 0, &mut next_first, 900).unwrap();
        // Producer 2 is idle past the expiry at 1500: it makes room for 3.
        append(
            &mut second,
            incoming(3, 0, 0, 1),
            0,
            &mut next_second,
            1_500,
        )
        .unwrap();
        assert!(second.get(2).is_none());
        assert_eq!(budget.used(), 2);
        // A failed write gives the reservation back.
        match first.check(&incoming(4, 0, 0, 1), 0, 1_500) {
            Err(ProducerError::LimitExceeded { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(first.expire(1_900), 1, "producer 1 last seen at 900");
        let Ok(Verdict::Append(reservation)) = first.check(&incoming(4, 0, 0, 1), 0, 1_900) else {
            panic!("room after expiry")
        };
        assert_eq!(budget.used(), 2);
        drop(reservation);
        assert_eq!(budget.used(), 1);
        drop(second);
        assert_eq!(budget.used(), 0, "a dropped table gives its share back");
    }

    #[test]
    fn retention_drops_producers_whose_batches_are_gone() {
        let mut table = table(10);
        let mut next = 0;
        append(&mut table, incoming(1, 0, 0, 5), 0, &mut next, 0).unwrap();
        append(&mut table, incoming(2, 0, 0, 5), 0, &mut next, 0).unwrap();
        assert_eq!(table.remove_below(5), 1);
        assert!(table.get(1).is_none());
        assert!(table.get(2).is_some());
    }

    fn sample() -> ProducerStateTable {
        let mut table = table(100);
        let mut next = 0;
        for producer in 0..4u64 {
            for sequence in 0..(producer + 3) {
                append(
                    &mut table,
                    incoming(producer * 1000, producer as u16, sequence * 2, 2),
                    0,
                    &mut next,
                    producer * 10,
                )
                .unwrap();
            }
        }
        table.fence(0, 9, 77);
        table
    }

    #[test]
    fn snapshots_round_trip() {
        let table = sample();
        let bytes = table.encode_snapshot(1_000, 0xfeed);
        let snapshot = decode_snapshot(&bytes).expect("decodes");
        assert_eq!(snapshot.offset, 1_000);
        assert_eq!(snapshot.anchor_crc, 0xfeed);
        let mut loaded = self::table(100);
        loaded.load(snapshot.entries);
        assert_eq!(loaded.entries(), table.entries());
        assert_eq!(loaded.encode_snapshot(1_000, 0xfeed), bytes);
        let empty = self::table(1).encode_snapshot(0, 0);
        assert_eq!(decode_snapshot(&empty).unwrap().entries, vec![]);
    }

    #[test]
    fn damaged_snapshots_are_refused() {
        let bytes = sample().encode_snapshot(1_000, 1);
        for length in 0..bytes.len() {
            assert_eq!(decode_snapshot(&bytes[..length]), None, "cut at {length}");
        }
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x04;
            assert_eq!(decode_snapshot(&damaged), None, "flip at {position}");
        }
        // A snapshot that claims batches at or above its own offset breaks an invariant, even
        // with a good checksum.
        assert_eq!(decode_snapshot(&sample().encode_snapshot(3, 1)), None);
    }
}
