//! The record accumulator: per partition, records are encoded straight into an open
//! [`RecordBatchBuilder`]; closed batches queue up until the sender takes them.
//!
//! ```text
//!  enqueue ──append──▶ topic ─▶ partition ─▶ open batch (RecordBatchBuilder, one buffer)
//!                                                │ full (batch_bytes) / linger over / flush
//!                                                ▼
//!                                   sealed batches (in order) ──drain(budget)──▶ sender
//! ```
//!
//! A plain state machine: no IO, no clock of its own (the time comes in as `now`), no locks.
//! The producer keeps it behind a mutex that enqueues and the sender task share.
//!
//! Memory is accounted per batch, not per record: a new batch reserves its whole capacity
//! (`batch_bytes`, or one record's size when that record alone is bigger) from the producer's
//! buffer before it is created, and the builder's buffer is allocated with exactly that
//! capacity. Appending a record therefore copies its key, value and headers once, into place,
//! and never reallocates: no per-record allocation. The reservation is given back when the
//! batch is acknowledged or fails.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice_protocol::batch::HEADER_BYTES;
use sluice_protocol::wire::varint_len;
use sluice_protocol::{ErrorCode, RecordBatch, RecordBatchBuilder};

use super::delivery::{BatchCompletion, copy_error};
use super::partitioner::{StickyPartitioner, partition_for_key};
use crate::error::Error;

/// A record as the accumulator appends it: borrowed, nothing copied yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordParts<'a> {
    pub(crate) timestamp_ms: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) value: &'a [u8],
    pub(crate) headers: &'a [(&'a str, &'a [u8])],
}

impl RecordParts<'_> {
    /// Bytes the record takes as the first record of a batch (timestamp and offset deltas 0),
    /// as [`RecordBatchBuilder::record_size_bytes`] counts them.
    pub(crate) fn first_record_bytes(&self) -> usize {
        let key_bytes = match self.key {
            None => varint_len(-1),
            Some(key) => varint_len(key.len() as i64) + key.len(),
        };
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(name, value)| {
                varint_len(name.len() as i64)
                    + name.len()
                    + varint_len(value.len() as i64)
                    + value.len()
            })
            .sum();
        let body = 1
            + varint_len(0)
            + varint_len(0)
            + key_bytes
            + varint_len(self.value.len() as i64)
            + self.value.len()
            + varint_len(self.headers.len() as i64)
            + header_bytes;
        varint_len(body as i64) + body
    }

    /// Bytes a batch holding only this record takes.
    pub(crate) fn single_record_batch_bytes(&self) -> usize {
        HEADER_BYTES + self.first_record_bytes()
    }
}

/// The topic a record goes to: by name, or by where an earlier append found it (topics are
/// never removed or moved, so a position stays valid).
#[derive(Clone, Copy, Debug)]
pub(crate) enum TopicRef<'a> {
    Name(&'a str),
    Known(usize),
}

/// Where a record should go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target<'a> {
    /// Chosen by the caller.
    Partition(u32),
    /// By the hash of the key.
    Key(&'a [u8]),
    /// Keyless: the sticky partition.
    Sticky,
}

/// A batch being filled, or closed and waiting for the sender.
#[derive(Debug)]
pub(crate) struct OpenBatch {
    /// Unique per producer, increasing in creation order (flush waits on it).
    pub(crate) id: u64,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) builder: RecordBatchBuilder,
    /// Bytes reserved from the producer's buffer; the batch never grows past them.
    pub(crate) reserved_bytes: usize,
    pub(crate) completion: Arc<BatchCompletion>,
    pub(crate) created_at: Instant,
}

/// What [`Accumulator::append`] did.
#[derive(Debug)]
pub(crate) enum Append<'a> {
    /// The record is in a batch.
    Appended {
        /// The completion of the record's batch: cloned into a [`DeliveryFuture`] by a caller
        /// that wants one, so a caller appending many records to one batch clones it once.
        completion: &'a Arc<BatchCompletion>,
        /// The record's position in its batch.
        index: u32,
        /// The id of the record's batch.
        batch: u64,
        /// Where the record's topic is: [`TopicRef::Known`] finds it again without a lookup.
        topic: usize,
        /// True when this record opened the batch.
        new_batch: bool,
        /// A batch was closed or opened: the sender has something new to do or a new deadline.
        wake_sender: bool,
    },
    /// The record needs a new batch: reserve `bytes` of buffer (in all) and append again.
    NeedsBuffer { bytes: usize, wake_sender: bool },
    /// The partition count of the topic is not known yet: look it up and append again.
    UnknownTopic,
}

/// Why records are refused.
#[derive(Clone, Debug)]
enum Refusal {
    Closed,
    Failed(Arc<Error>),
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<OpenBatch>,
    /// Closed batches, oldest first.
    sealed: VecDeque<OpenBatch>,
}

#[derive(Debug)]
struct TopicQueues {
    name: Arc<str>,
    partition_count: u32,
    /// One queue per partition, created as partitions are first used.
    partitions: Vec<PartitionQueue>,
    sticky: StickyPartitioner,
}

impl TopicQueues {
    /// Closes the open batch of `partition`, if any.
    fn seal(&mut self, partition: u32) -> bool {
        let queue = &mut self.partitions[partition as usize];
        let Some(open) = queue.open.take() else {
            return false;
        };
        queue.sealed.push_back(open);
        self.sticky.batch_closed(partition);
        true
    }

    /// Appends `record` to the open batch of `partition` if it has one and the record fits in
    /// the batch's reservation; returns whether it did.
    fn try_append(&mut self, partition: u32, record: &RecordParts<'_>) -> bool {
        self.partitions
            .get_mut(partition as usize)
            .and_then(|queue| queue.open.as_mut())
            .is_some_and(|open| {
                open.builder.try_append(
                    open.reserved_bytes,
                    record.timestamp_ms,
                    record.key,
                    record.value,
                    record.headers,
                )
            })
    }

    /// The open batch of `partition`, which has one.
    fn open(&self, partition: u32) -> &OpenBatch {
        self.partitions[partition as usize]
            .open
            .as_ref()
            .expect("the partition has an open batch")
    }
}

/// Buffers of acknowledged batches, kept to build the next batches in.
///
/// A batch's buffer is fresh memory from the allocator, which at batch sizes of a megabyte
/// hands it back to the kernel when it is freed, so every batch paid a page fault and the
/// zeroing of each of its pages before its first record was copied in (almost all of a 1 KiB
/// produce run's page faults). At most [`SpareBuffers::MAX`] are kept, each at most twice
/// `batch_bytes`, for the producer's lifetime: up to 8 × `batch_bytes` beside its
/// `buffer_bytes` (2 MiB at the default 256 KiB batches).
#[derive(Debug)]
pub(crate) struct SpareBuffers {
    buffers: Mutex<Vec<BytesMut>>,
    max_capacity: usize,
}

impl SpareBuffers {
    pub(crate) const MAX: usize = 4;

    pub(crate) fn new(batch_bytes: usize) -> Self {
        SpareBuffers {
            buffers: Mutex::new(Vec::with_capacity(Self::MAX)),
            max_capacity: batch_bytes.saturating_mul(2),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BytesMut>> {
        self.buffers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A kept buffer with room for `bytes`, if there is one.
    fn take(&self, bytes: usize) -> Option<BytesMut> {
        let mut buffers = self.lock();
        let index = buffers
            .iter()
            .position(|buffer| buffer.capacity() >= bytes)?;
        Some(buffers.swap_remove(index))
    }

    /// Keeps the buffer of an acknowledged batch, when nothing else holds it and there is room.
    pub(crate) fn give(&self, batch: RecordBatch) {
        let Ok(buffer) = batch.try_into_buffer() else {
            return;
        };
        if buffer.capacity() > self.max_capacity {
            return;
        }
        let mut buffers = self.lock();
        if buffers.len() < Self::MAX {
            buffers.push(buffer);
        }
    }

    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.lock().len()
    }
}

/// The batches of every partition a producer writes to.
#[derive(Debug)]
pub(crate) struct Accumulator {
    /// Where new batches get their buffers.
    spare: Arc<SpareBuffers>,
    batch_bytes: usize,
    linger: Duration,
    delivery_timeout: Duration,
    /// Every topic written to, in the order first seen; `topic_index` finds them by name.
    topics: Vec<TopicQueues>,
    topic_index: HashMap<Arc<str>, usize>,
    /// The topic appended to last: a run of records to one topic skips the hash lookup.
    last_topic: usize,
    next_batch_id: u64,
    /// Batches open or sealed, not yet drained.
    queued_batches: usize,
    refusal: Option<Refusal>,
    /// Varies where each topic's sticky rotation starts.
    sticky_seed: u32,
}

impl Accumulator {
    pub(crate) fn new(batch_bytes: usize, linger: Duration, delivery_timeout: Duration) -> Self {
        let sticky_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        Accumulator {
            spare: Arc::new(SpareBuffers::new(batch_bytes)),
            batch_bytes,
            linger,
            delivery_timeout,
            topics: Vec::new(),
            topic_index: HashMap::new(),
            last_topic: 0,
            next_batch_id: 0,
            queued_batches: 0,
            refusal: None,
            sticky_seed,
        }
    }

    /// The buffers acknowledged batches are given back to.
    pub(crate) fn spare_buffers(&self) -> Arc<SpareBuffers> {
        Arc::clone(&self.spare)
    }

    /// Records the partition count of `topic` (from Metadata). A count only grows.
    pub(crate) fn set_partition_count(&mut self, topic: &str, partition_count: u32) {
        assert!(partition_count > 0, "a topic has at least one partition");
        if let Some(position) = self.topic_position(topic) {
            let queues = &mut self.topics[position];
            queues.partition_count = queues.partition_count.max(partition_count);
            return;
        }
        self.sticky_seed = self.sticky_seed.wrapping_mul(0x9e37_79b9).wrapping_add(1);
        let name: Arc<str> = Arc::from(topic);
        self.topic_index
            .insert(Arc::clone(&name), self.topics.len());
        self.topics.push(TopicQueues {
            name,
            partition_count,
            partitions: Vec::new(),
            sticky: StickyPartitioner::new(self.sticky_seed),
        });
    }

    /// Where the queues of `topic` are in `topics`, if it is known; the last topic used is
    /// found without hashing.
    fn topic_position(&mut self, topic: &str) -> Option<usize> {
        let last_matches = self
            .topics
            .get(self.last_topic)
            .is_some_and(|queues| &*queues.name == topic);
        if !last_matches {
            self.last_topic = *self.topic_index.get(topic)?;
        }
        Some(self.last_topic)
    }

    /// Appends `record` to the open batch of its partition, closing a full batch first.
    ///
    /// `reserved_bytes` is buffer the caller holds; a new batch takes what it needs of it and
    /// leaves the rest, which the caller gives back. `now` is called only when the record
    /// opens a batch (its linger starts then), so appending to an open batch reads no clock.
    ///
    /// # Errors
    /// [`Error::Usage`] once the producer is closed, the producer's fatal error once it has
    /// failed, and `UnknownPartition` for an explicit partition the topic does not have.
    pub(crate) fn append(
        &mut self,
        topic: TopicRef<'_>,
        target: Target<'_>,
        record: &RecordParts<'_>,
        reserved_bytes: &mut usize,
        now: impl FnOnce() -> Instant,
    ) -> Result<Append<'_>, Error> {
        match &self.refusal {
            None => {}
            Some(Refusal::Closed) => return Err(closed_error()),
            Some(Refusal::Failed(error)) => return Err(copy_error(error)),
        }
        let position = match topic {
            TopicRef::Known(position) => position,
            TopicRef::Name(name) => match self.topic_position(name) {
                Some(position) => position,
                None => return Ok(Append::UnknownTopic),
            },
        };
        let queues = &mut self.topics[position];
        let partition_count = queues.partition_count;
        if queues.partitions.len() < partition_count as usize {
            queues
                .partitions
                .resize_with(partition_count as usize, PartitionQueue::default);
        }
        let mut wake_sender = false;
        let partition = match target {
            Target::Partition(partition) if partition < partition_count => partition,
            Target::Partition(partition) => {
                return Err(Error::Broker {
                    code: ErrorCode::UnknownPartition,
                    message: Some(format!(
                        "topic {} has {partition_count} partitions, record asks for partition {partition}",
                        queues.name
                    )),
                });
            }
            Target::Key(key) => partition_for_key(key, partition_count),
            Target::Sticky => {
                let sticky = queues.sticky.partition(partition_count);
                let has_open_batch = queues.partitions[sticky as usize].open.is_some();
                if !has_open_batch {
                    sticky
                } else if queues.try_append(sticky, record) {
                    return Ok(appended_to_open(
                        queues.open(sticky),
                        position,
                        false,
                        wake_sender,
                    ));
                } else {
                    // The sticky batch is full: close it and move on to the next partition.
                    wake_sender |= queues.seal(sticky);
                    queues.sticky.partition(partition_count)
                }
            }
        };
        if queues.try_append(partition, record) {
            return Ok(appended_to_open(
                queues.open(partition),
                position,
                false,
                wake_sender,
            ));
        }
        wake_sender |= queues.seal(partition);
        let needed_bytes = self.batch_bytes.max(record.single_record_batch_bytes());
        if *reserved_bytes < needed_bytes {
            return Ok(Append::NeedsBuffer {
                bytes: needed_bytes,
                wake_sender,
            });
        }
        *reserved_bytes -= needed_bytes;
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        self.queued_batches += 1;
        let mut builder = match self.spare.take(needed_bytes) {
            Some(buffer) => RecordBatchBuilder::with_buffer(buffer, needed_bytes - HEADER_BYTES),
            None => RecordBatchBuilder::with_capacity(needed_bytes - HEADER_BYTES),
        };
        builder.append(
            record.timestamp_ms,
            record.key,
            record.value,
            record.headers,
        );
        let open = queues.partitions[partition as usize]
            .open
            .insert(OpenBatch {
                id,
                topic: Arc::clone(&queues.name),
                partition,
                builder,
                reserved_bytes: needed_bytes,
                completion: BatchCompletion::new(partition),
                created_at: now(),
            });
        Ok(appended_to_open(open, position, true, true))
    }

    /// Takes batches for the sender: per partition, up to `budget(topic, partition)` of them,
    /// oldest first. An open batch whose linger is over is closed first, but only when the
    /// partition has budget: while its window is full it keeps filling.
    pub(crate) fn drain(
        &mut self,
        now: Instant,
        mut budget: impl FnMut(&Arc<str>, u32) -> usize,
    ) -> Vec<OpenBatch> {
        let mut drained = Vec::new();
        if self.queued_batches == 0 {
            return drained;
        }
        let linger = self.linger;
        for queues in self.topics.iter_mut() {
            for partition in 0..queues.partitions.len() as u32 {
                let queue = &queues.partitions[partition as usize];
                let lingered = queue
                    .open
                    .as_ref()
                    .is_some_and(|open| open.created_at + linger <= now);
                if queue.sealed.is_empty() && !lingered {
                    continue;
                }
                let allowed = budget(&queues.name, partition);
                if allowed == 0 {
                    continue;
                }
                if lingered {
                    queues.seal(partition);
                }
                let queue = &mut queues.partitions[partition as usize];
                let take = allowed.min(queue.sealed.len());
                drained.extend(queue.sealed.drain(..take));
            }
        }
        self.queued_batches -= drained.len();
        drained
    }

    /// Removes the batches that waited longer than the delivery timeout without being sent.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<OpenBatch> {
        let mut expired = Vec::new();
        if self.queued_batches == 0 {
            return expired;
        }
        let timeout = self.delivery_timeout;
        for queues in self.topics.iter_mut() {
            for partition in 0..queues.partitions.len() as u32 {
                let queue = &mut queues.partitions[partition as usize];
                while queue
                    .sealed
                    .front()
                    .is_some_and(|batch| batch.created_at + timeout <= now)
                {
                    expired.extend(queue.sealed.pop_front());
                }
                if queue.sealed.is_empty()
                    && queue
                        .open
                        .as_ref()
                        .is_some_and(|batch| batch.created_at + timeout <= now)
                {
                    expired.extend(queue.open.take());
                    queues.sticky.batch_closed(partition);
                }
            }
        }
        self.queued_batches -= expired.len();
        expired
    }

    /// When the sender must look again without being woken: the next linger or delivery
    /// timeout that runs out after `now`.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.queued_batches == 0 {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |deadline: Instant| {
            if deadline > now {
                next = Some(next.map_or(deadline, |next| next.min(deadline)));
            }
        };
        for queues in self.topics.iter() {
            for queue in &queues.partitions {
                if let Some(oldest) = queue.sealed.front().or(queue.open.as_ref()) {
                    consider(oldest.created_at + self.delivery_timeout);
                }
                if let Some(open) = &queue.open {
                    consider(open.created_at + self.linger);
                }
            }
        }
        next
    }

    /// Closes every open batch, so the sender takes them without waiting for their linger.
    /// Returns the id of the newest batch created so far, if any.
    pub(crate) fn seal_all(&mut self) -> Option<u64> {
        for queues in self.topics.iter_mut() {
            for partition in 0..queues.partitions.len() as u32 {
                queues.seal(partition);
            }
        }
        self.next_batch_id.checked_sub(1)
    }

    /// Refuses further records and closes every open batch.
    pub(crate) fn close(&mut self) -> Option<u64> {
        if self.refusal.is_none() {
            self.refusal = Some(Refusal::Closed);
        }
        self.seal_all()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.refusal.is_some()
    }

    /// The error the producer failed with, if it has.
    pub(crate) fn failure(&self) -> Option<Error> {
        match &self.refusal {
            Some(Refusal::Failed(error)) => Some(copy_error(error)),
            _ => None,
        }
    }

    /// Refuses further records with `error` and hands back every queued batch to be failed.
    pub(crate) fn fail(&mut self, error: Arc<Error>) -> Vec<OpenBatch> {
        self.refusal = Some(Refusal::Failed(error));
        let mut taken = Vec::with_capacity(self.queued_batches);
        for queues in self.topics.iter_mut() {
            for queue in &mut queues.partitions {
                taken.extend(queue.sealed.drain(..));
                taken.extend(queue.open.take());
            }
        }
        self.queued_batches = 0;
        taken
    }

    /// True when no batch is open or waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.queued_batches == 0
    }
}

/// The record just appended to `open` is its last.
fn appended_to_open(
    open: &OpenBatch,
    topic: usize,
    new_batch: bool,
    wake_sender: bool,
) -> Append<'_> {
    Append::Appended {
        completion: &open.completion,
        index: open.builder.len() - 1,
        batch: open.id,
        topic,
        new_batch,
        wake_sender,
    }
}

pub(crate) fn closed_error() -> Error {
    Error::Usage("the producer is closed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &[u8]) -> RecordParts<'_> {
        RecordParts {
            timestamp_ms: 1_700_000_000_000,
            key: None,
            value,
            headers: &[],
        }
    }

    /// Appends, reserving buffer as asked; returns the partition.
    fn append(
        accumulator: &mut Accumulator,
        target: Target<'_>,
        value: &[u8],
        now: Instant,
    ) -> u32 {
        let mut reserved = 0;
        loop {
            match accumulator
                .append(
                    TopicRef::Name("t"),
                    target,
                    &record(value),
                    &mut reserved,
                    || now,
                )
                .expect("append")
            {
                Append::Appended { completion, .. } => return completion.partition(),
                Append::NeedsBuffer { bytes, .. } => reserved = bytes,
                Append::UnknownTopic => panic!("topic registered"),
            }
        }
    }

    #[test]
    fn first_record_size_matches_the_builder() {
        let headers: [(&str, &[u8]); 2] = [("trace", b"abc"), ("", b"")];
        let long_value = vec![7u8; 300];
        for (key, value, headers) in [
            (None, &b""[..], &headers[..0]),
            (Some(&b"key"[..]), &b"value"[..], &headers[..]),
            (Some(&b""[..]), &long_value[..], &headers[..1]),
        ] {
            let parts = RecordParts {
                timestamp_ms: 5,
                key,
                value,
                headers,
            };
            let builder = RecordBatchBuilder::new();
            assert_eq!(
                parts.first_record_bytes(),
                builder.record_size_bytes(5, key, value, headers)
            );
        }
    }

    #[test]
    fn batches_close_at_batch_bytes_without_reallocating() {
        let now = Instant::now();
        let mut accumulator =
            Accumulator::new(1_000, Duration::from_secs(60), Duration::from_secs(600));
        accumulator.set_partition_count("t", 1);
        for _ in 0..50 {
            append(&mut accumulator, Target::Partition(0), &[1; 90], now);
        }
        let drained = accumulator.drain(now, |_, _| usize::MAX);
        assert!(drained.len() >= 4, "{} batches closed", drained.len());
        for batch in &drained {
            assert!(batch.builder.size_bytes() <= 1_000);
            assert!(
                batch.builder.size_bytes() > 1_000 - 100,
                "only a whole record was left out"
            );
        }
        // The last one is still open, within its linger.
        assert!(!accumulator.is_empty());
        assert_eq!(
            accumulator.next_deadline(now),
            Some(now + Duration::from_secs(60))
        );
        let lingered = accumulator.drain(now + Duration::from_secs(60), |_, _| 1);
        assert_eq!(lingered.len(), 1);
        assert!(accumulator.is_empty());
        let ids: Vec<u64> = drained
            .iter()
            .chain(&lingered)
            .map(|batch| batch.id)
            .collect();
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "in order: {ids:?}"
        );
    }

    #[test]
    fn an_oversized_record_gets_a_batch_of_its_own() {
        let now = Instant::now();
        let mut accumulator = Accumulator::new(100, Duration::ZERO, Duration::from_secs(600));
        accumulator.set_partition_count("t", 1);
        let mut reserved = 0;
        let big = [0u8; 500];
        let Append::NeedsBuffer { bytes, .. } = accumulator
            .append(
                TopicRef::Name("t"),
                Target::Partition(0),
                &record(&big),
                &mut reserved,
                || now,
            )
            .unwrap()
        else {
            panic!("a new batch needs buffer");
        };
        assert_eq!(bytes, record(&big).single_record_batch_bytes());
        reserved = bytes + 10;
        accumulator
            .append(
                TopicRef::Name("t"),
                Target::Partition(0),
                &record(&big),
                &mut reserved,
                || now,
            )
            .unwrap();
        assert_eq!(reserved, 10, "the unused part goes back to the caller");
    }

    #[test]
    fn keyless_records_stick_until_the_batch_closes() {
        let now = Instant::now();
        let mut accumulator =
            Accumulator::new(1_000, Duration::from_secs(60), Duration::from_secs(600));
        accumulator.set_partition_count("t", 4);
        let first = append(&mut accumulator, Target::Sticky, &[0; 90], now);
        for _ in 0..8 {
            assert_eq!(
                append(&mut accumulator, Target::Sticky, &[0; 90], now),
                first
            );
        }
        // The tenth record does not fit: the batch closes and records move round-robin.
        let second = append(&mut accumulator, Target::Sticky, &[0; 90], now);
        assert_eq!(second, (first + 1) % 4);
        let third = {
            let drained = accumulator.seal_all();
            assert!(drained.is_some());
            append(&mut accumulator, Target::Sticky, &[0; 90], now)
        };
        assert_eq!(third, (first + 2) % 4);
    }

    #[test]
    fn the_window_budget_keeps_a_lingered_batch_open() {
        let now = Instant::now();
        let mut accumulator = Accumulator::new(1_000, Duration::ZERO, Duration::from_secs(600));
        accumulator.set_partition_count("t", 1);
        append(&mut accumulator, Target::Partition(0), b"a", now);
        assert!(accumulator.drain(now, |_, _| 0).is_empty());
        append(&mut accumulator, Target::Partition(0), b"b", now);
        let drained = accumulator.drain(now, |_, _| 5);
        assert_eq!(drained.len(), 1);
        assert_eq!(
            drained[0].builder.len(),
            2,
            "the second record joined the open batch"
        );
    }

    #[test]
    fn expiry_and_refusal() {
        let now = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut accumulator = Accumulator::new(1_000, Duration::from_secs(60), timeout);
        accumulator.set_partition_count("t", 2);
        append(&mut accumulator, Target::Partition(0), b"a", now);
        append(
            &mut accumulator,
            Target::Partition(1),
            b"b",
            now + Duration::from_secs(5),
        );
        assert_eq!(accumulator.next_deadline(now), Some(now + timeout));
        assert_eq!(accumulator.expire(now + timeout).len(), 1);
        assert_eq!(accumulator.expire(now + timeout).len(), 0);
        let mut reserved = 0;
        assert!(matches!(
            accumulator.append(
                TopicRef::Name("t"),
                Target::Partition(2),
                &record(b"x"),
                &mut reserved,
                || now
            ),
            Err(Error::Broker {
                code: ErrorCode::UnknownPartition,
                ..
            })
        ));
        assert!(matches!(
            accumulator.append(
                TopicRef::Name("other"),
                Target::Sticky,
                &record(b"x"),
                &mut reserved,
                || now
            ),
            Ok(Append::UnknownTopic)
        ));
        accumulator.close();
        assert!(matches!(
            accumulator.append(
                TopicRef::Name("t"),
                Target::Sticky,
                &record(b"x"),
                &mut reserved,
                || now
            ),
            Err(Error::Usage(_))
        ));
        let failed = accumulator.fail(Arc::new(Error::ConnectionClosed));
        assert_eq!(failed.len(), 1);
        assert!(accumulator.is_empty());
        assert!(matches!(
            accumulator.append(
                TopicRef::Name("t"),
                Target::Sticky,
                &record(b"x"),
                &mut reserved,
                || now
            ),
            Err(Error::ConnectionClosed)
        ));
    }
}
