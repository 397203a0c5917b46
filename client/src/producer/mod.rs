//! The producer: batching by size and linger, a bounded buffer with backpressure, at most a few
//! batches in flight per partition, retries with backoff, and idempotence on by default.
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_client::Client;
//! use sluice_client::producer::{Acks, Record};
//!
//! # async fn example() -> sluice_client::error::Result<()> {
//! let client = Client::connect("tcp://127.0.0.1:7171").await?;
//! let producer = client
//!     .producer()
//!     .acks(Acks::Durable)
//!     .linger(Duration::from_millis(5))
//!     .producer_name("orders-relay")
//!     .build()
//!     .await?;
//!
//! // Wait for the acknowledgement:
//! let delivery = producer.send(Record::new("orders", "created").key("order-7")).await?;
//! println!("partition {} offset {:?}", delivery.partition, delivery.offset);
//!
//! // Or only for buffer space, and collect the acknowledgements later (or never):
//! let mut pending = Vec::new();
//! for index in 0..1_000 {
//!     pending.push(producer.enqueue(Record::new("orders", format!("event {index}"))).await?);
//! }
//! producer.flush().await?;
//! for delivery in pending {
//!     delivery.await?;
//! }
//! producer.close().await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! ```text
//!  send / enqueue ──▶ partitioner ──▶ accumulator: one open batch per partition ──┐
//!        │             (explicit,         records encoded straight into it        │ closed at
//!        │              key hash,                                                 │ batch_bytes,
//!        ▼              sticky)                                                   │ linger, flush
//!  buffer_bytes: a new batch reserves its size first; when the buffer is full,   ▼
//!  enqueue waits (backpressure) until acknowledged batches give theirs back.   sender task
//!                                                                               │ one produce
//!  DeliveryFuture ◀── (partition, base_offset + index) ◀── answer ◀─────────────┘ request, many
//!                                                                                 partitions
//! ```
//!
//! Modules: [`partitioner`] (which partition a record goes to, public: the key hash is part of
//! the contract), `accumulator` (batching), `sender` (requests, retries, idempotence),
//! `delivery` ([`Delivery`], [`DeliveryFuture`]).
//!
//! # Delivery guarantees
//!
//! - **Idempotent (the default; `acks` = `Durable` or `Leader`)**: exactly once per partition,
//!   in order, across retries, lost connections and broker restarts. The producer gets an id
//!   and epoch from the broker (InitProducerId) and numbers each partition's records; a retry
//!   resends the same batch with the same numbers, and the broker answers a batch it already
//!   wrote with its original offsets instead of writing it again, and refuses one that would
//!   leave a gap. At most 5 batches per partition are in flight (the broker remembers the last
//!   5). A record's future fails only when the record is known not to be written, or its
//!   `delivery_timeout` ran out while retrying (then it may or may not have been written, and
//!   the producer takes a new epoch before sending more to keep later records in order and
//!   free of duplicates). With a [`producer_name`](ProducerBuilder::producer_name) a restarted
//!   producer continues each partition's numbering, so an outbox relay that resends after a
//!   crash does not duplicate what the broker already has; the older instance is fenced
//!   (`ProducerFenced`).
//! - **Not idempotent, `acks` = `Durable` or `Leader`**: at least once. A retry after a lost
//!   answer may write a batch twice, and with more than one batch in flight a retry may reorder
//!   a partition's batches; set `max_in_flight_per_partition(1)` to keep the order.
//! - **`acks` = `None`** (needs `idempotence(false)`): at most once. A future resolves when its
//!   request is queued on the connection, with `offset: None`; nothing says whether the
//!   broker stored it. A request that could not be queued (lost connection) is retried, so
//!   nothing is written twice.
//!
//! Failures: [`Error::Broker`] with the broker's code for a batch it refused
//! (`UnknownTopic`, `MessageTooLarge`, ...), [`Error::RetriesExhausted`] when retries ran past
//! `delivery_timeout`, [`Error::Timeout`] when a batch never got to be sent within it,
//! `UnknownProducerId` for a batch sent where the broker no longer holds the producer's state
//! (retention deleted it or it expired; the producer goes on under a new epoch), and a fatal
//! `ProducerFenced` or `OutOfOrderSequence` that stops the producer: every pending record
//! fails with it and later calls return it.

mod accumulator;
mod delivery;
pub mod partitioner;
mod sender;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sluice_protocol::messages::MetadataRequest;
use sluice_protocol::{ErrorCode, Response, WireError};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

pub use delivery::{Deliveries, DeliveriesFuture, Delivery, DeliveryFuture};
pub use sluice_protocol::messages::Acks;

use self::accumulator::{
    Accumulator, Append, RecordParts, SpareBuffers, Target, TopicRef, closed_error,
};
use self::delivery::BatchCompletion;
use self::sender::{SenderOptions, SenderState};
use crate::client::Client;
use crate::error::{Error, Result};

/// The most batches a partition may have in flight with idempotence: the broker remembers the
/// last 5 batches of each producer and partition to recognise a retry.
pub const MAX_IN_FLIGHT_IDEMPOTENT: usize = 5;
/// Records `enqueue_many` appends per hold of the producer's lock: a long call takes turns with
/// the sender task and other callers instead of blocking them (and their runtime threads) for
/// its whole length. About 30 µs of appending at 100 B.
const RECORDS_PER_LOCK: usize = 1024;
/// Headers a record may have before enqueueing it allocates a small list.
const INLINE_HEADERS: usize = 8;

/// One record to send. Build it with chained setters:
///
/// ```
/// use sluice_client::producer::Record;
///
/// let record = Record::new("orders", "created")
///     .key("order-7")
///     .header("trace-id", "4bf92f35")
///     .timestamp_ms(1_700_000_000_000);
/// ```
///
/// Key and value are [`Bytes`]: converting a `Vec<u8>`, `String` or `&'static` data into them
/// copies nothing, and enqueueing copies them once, into the batch. [`Record::borrowed`] and
/// [`Record::borrowed_key`] take plain slices instead, which cost not even a reference count:
/// the fastest way to hand many records to [`Producer::enqueue_many`].
#[derive(Clone, Debug)]
pub struct Record<'a> {
    topic: &'a str,
    key: Option<Data<'a>>,
    value: Data<'a>,
    headers: Vec<(String, Bytes)>,
    partition: Option<u32>,
    timestamp_ms: Option<i64>,
}

/// A key or value: shared bytes, or a slice the record borrows.
#[derive(Clone, Debug)]
enum Data<'a> {
    Shared(Bytes),
    Borrowed(&'a [u8]),
}

impl std::ops::Deref for Data<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Data::Shared(bytes) => bytes,
            Data::Borrowed(slice) => slice,
        }
    }
}

impl<'a> Record<'a> {
    /// A record for `topic` with `value`, no key and no headers.
    pub fn new(topic: &'a str, value: impl Into<Bytes>) -> Record<'a> {
        Self::with_value(topic, Data::Shared(value.into()))
    }

    /// A record for `topic` whose value is borrowed: enqueueing copies it into the batch, so
    /// it only has to live until then.
    pub fn borrowed(topic: &'a str, value: &'a [u8]) -> Record<'a> {
        Self::with_value(topic, Data::Borrowed(value))
    }

    fn with_value(topic: &'a str, value: Data<'a>) -> Record<'a> {
        Record {
            topic,
            key: None,
            value,
            headers: Vec::new(),
            partition: None,
            timestamp_ms: None,
        }
    }

    /// The key: records with the same key go to the same partition (see [`partitioner`]).
    ///
    /// Default = no key (keyless records are spread sticky round-robin).
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(Data::Shared(key.into()));
        self
    }

    /// A borrowed key, as [`key`](Record::key) otherwise.
    pub fn borrowed_key(mut self, key: &'a [u8]) -> Self {
        self.key = Some(Data::Borrowed(key));
        self
    }

    /// Adds a header. Names are UTF-8; a name may repeat.
    ///
    /// Default = no headers.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends the record to this partition, whatever its key. A partition the topic does not
    /// have fails the send with `UnknownPartition`.
    ///
    /// Default = chosen by the [`partitioner`].
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The record's timestamp, in milliseconds since the Unix epoch.
    ///
    /// Default = the time it is enqueued.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }
}

/// Settings of a [`Producer`], as chained setters; [`build`](ProducerBuilder::build) checks
/// them together and starts the producer.
#[derive(Clone, Debug)]
pub struct ProducerBuilder {
    client: Client,
    acks: Acks,
    idempotence: bool,
    producer_name: Option<String>,
    batch_bytes: usize,
    linger: Duration,
    buffer_bytes: usize,
    max_in_flight_per_partition: usize,
    request_timeout: Duration,
    delivery_timeout: Duration,
}

impl ProducerBuilder {
    fn new(client: &Client) -> ProducerBuilder {
        ProducerBuilder {
            client: client.clone(),
            acks: Acks::Durable,
            idempotence: true,
            producer_name: None,
            batch_bytes: 256 * 1024,
            linger: Duration::from_millis(5),
            buffer_bytes: 32 * 1024 * 1024,
            max_in_flight_per_partition: MAX_IN_FLIGHT_IDEMPOTENT,
            request_timeout: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(120),
        }
    }

    /// When the broker acknowledges a batch: `Durable` once fsynced, `Leader` once in its log
    /// (page cache), `None` never (no answer at all; needs `idempotence(false)`).
    ///
    /// Default = [`Acks::Durable`].
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// Exactly-once, in-order writes per partition across retries (see the
    /// [module docs](self#delivery-guarantees)). Needs `acks` = `Durable` or `Leader` (the
    /// broker's answer is what tells a retry from a first attempt) and at most
    /// [`MAX_IN_FLIGHT_IDEMPOTENT`] batches in flight per partition.
    ///
    /// Default = true.
    pub fn idempotence(mut self, idempotence: bool) -> Self {
        self.idempotence = idempotence;
        self
    }

    /// A stable name for InitProducerId: every producer built with this name gets the same
    /// producer id with a higher epoch, continues each partition's sequence where the previous
    /// instance stopped, and fences that instance (its next batch fails with
    /// `ProducerFenced`). Needs idempotence.
    ///
    /// Default = none: a fresh producer id each time.
    pub fn producer_name(mut self, producer_name: impl Into<String>) -> Self {
        self.producer_name = Some(producer_name.into());
        self
    }

    /// The size a partition's batch closes at, header included. A record bigger than this on
    /// its own gets a batch of its own. Must be at most the broker's `max_batch_bytes`.
    ///
    /// Default = 256 KiB.
    pub fn batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes;
        self
    }

    /// How long a batch waits for more records before it is sent anyway. 0 sends as soon as
    /// the partition can take another batch in flight (records still gather meanwhile).
    ///
    /// Default = 5 ms.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The memory batches may take, from enqueue to acknowledgement. Each batch reserves its
    /// capacity (`batch_bytes`, or one larger record) from it; when it is used up,
    /// [`Producer::enqueue`] and [`Producer::send`] wait for acknowledged batches to free some
    /// instead of growing memory. At least `batch_bytes`, at most 4 GiB. Beside it, the
    /// buffers of up to four acknowledged batches (each at most twice `batch_bytes`) are kept
    /// to build the next batches in, instead of fresh memory.
    ///
    /// Default = 32 MiB.
    pub fn buffer_bytes(mut self, buffer_bytes: usize) -> Self {
        self.buffer_bytes = buffer_bytes;
        self
    }

    /// Batches of one partition in flight at once. At most [`MAX_IN_FLIGHT_IDEMPOTENT`] with
    /// idempotence; without it, more than 1 lets a retry reorder a partition's batches.
    ///
    /// Default = 5.
    pub fn max_in_flight_per_partition(mut self, max_in_flight_per_partition: usize) -> Self {
        self.max_in_flight_per_partition = max_in_flight_per_partition;
        self
    }

    /// How long one produce request may take before it counts as failed (and is retried). The
    /// broker gets it too, as its limit for waiting on durability.
    ///
    /// Default = 30 s.
    pub fn request_timeout(mut self, request_timeout: Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }

    /// How long a record may take from enqueue to acknowledgement, retries included, before
    /// its future fails. At least `linger + request_timeout`. As in Kafka, it is counted from
    /// when the record's batch was opened: a record joining an open batch (which goes on
    /// taking records while its partition waits for a retry) has what is left of the batch's.
    ///
    /// Default = 2 min.
    pub fn delivery_timeout(mut self, delivery_timeout: Duration) -> Self {
        self.delivery_timeout = delivery_timeout;
        self
    }

    /// Checks the settings together.
    fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::Usage(message));
        if self.idempotence && self.acks == Acks::None {
            return invalid(
                "idempotence needs acks = Durable or Leader: with acks = None the broker sends no \
                 answer to tell a retry from a first attempt; use .idempotence(false) for \
                 fire-and-forget"
                    .into(),
            );
        }
        if self.producer_name.is_some() && !self.idempotence {
            return invalid("producer_name needs idempotence".into());
        }
        if self.max_in_flight_per_partition == 0 {
            return invalid("max_in_flight_per_partition must be at least 1".into());
        }
        if self.idempotence && self.max_in_flight_per_partition > MAX_IN_FLIGHT_IDEMPOTENT {
            return invalid(format!(
                "max_in_flight_per_partition is {}, at most {MAX_IN_FLIGHT_IDEMPOTENT} with \
                 idempotence (the broker recognises retries among a partition's last \
                 {MAX_IN_FLIGHT_IDEMPOTENT} batches)",
                self.max_in_flight_per_partition
            ));
        }
        let min_batch_bytes = sluice_protocol::batch::HEADER_BYTES + 8;
        if self.batch_bytes < min_batch_bytes || u32::try_from(self.batch_bytes).is_err() {
            return invalid(format!(
                "batch_bytes is {}, must be from {min_batch_bytes} to 4 GiB",
                self.batch_bytes
            ));
        }
        if self.buffer_bytes < self.batch_bytes || u32::try_from(self.buffer_bytes).is_err() {
            return invalid(format!(
                "buffer_bytes is {}, must be from batch_bytes ({}) to 4 GiB",
                self.buffer_bytes, self.batch_bytes
            ));
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout must be above 0".into());
        }
        if self.delivery_timeout < self.linger + self.request_timeout {
            return invalid(format!(
                "delivery_timeout ({} ms) must be at least linger + request_timeout ({} ms)",
                self.delivery_timeout.as_millis(),
                (self.linger + self.request_timeout).as_millis()
            ));
        }
        Ok(())
    }

    /// Checks the settings, gets a producer id from the broker (with idempotence) and starts
    /// the sender task. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Usage`] for settings that do not go together (see each setter); the
    /// InitProducerId error, after retrying retriable ones, with idempotence.
    pub async fn build(self) -> Result<Producer> {
        self.validate()?;
        let identity = if self.idempotence {
            Some(sender::init_producer_id(&self.client, self.producer_name.as_deref(), None).await?)
        } else {
            None
        };
        let client_options = self.client.options();
        let sender_options = SenderOptions {
            acks: self.acks,
            producer_name: self.producer_name.clone(),
            max_in_flight_per_partition: self.max_in_flight_per_partition,
            request_timeout: self.request_timeout,
            delivery_timeout: self.delivery_timeout,
            max_request_bytes: client_options.connection.max_frame_bytes as usize,
            retry_initial_backoff: client_options.retry_initial_backoff,
            retry_max_backoff: client_options.retry_max_backoff,
        };
        let (lowest_incomplete, _) = watch::channel(u64::MAX);
        let accumulator = Accumulator::new(self.batch_bytes, self.linger, self.delivery_timeout);
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            spare_buffers: accumulator.spare_buffers(),
            accumulator: Mutex::new(accumulator),
            buffer: Semaphore::new(self.buffer_bytes),
            buffer_bytes: self.buffer_bytes,
            wake: Notify::new(),
            sender_waiting: AtomicBool::new(false),
            progress: Progress {
                incomplete: Mutex::new(BTreeSet::new()),
                lowest_incomplete,
            },
        });
        let task = tokio::spawn(sender::run(
            Arc::clone(&shared),
            SenderState::new(sender_options, identity),
        ));
        Ok(Producer {
            inner: Arc::new(Handle {
                shared,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// Sends records to a Sluice broker in batches (see the [module docs](self)). Cheap to clone:
/// clones share one buffer, one sender task and one producer id; closing one closes them all.
///
/// Dropping the last clone without [`close`](Producer::close) lets the sender task deliver
/// what is buffered in the background and end.
#[derive(Clone, Debug)]
pub struct Producer {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.begin_close();
    }
}

impl Producer {
    /// A builder with every setting at its default.
    pub fn builder(client: &Client) -> ProducerBuilder {
        ProducerBuilder::new(client)
    }

    /// Sends `record` and waits for the broker's acknowledgement.
    ///
    /// # Errors
    /// Those of [`enqueue`](Producer::enqueue), then those of the [`DeliveryFuture`].
    pub async fn send(&self, record: Record<'_>) -> Result<Delivery> {
        self.enqueue(record).await?.await
    }

    /// Puts `record` into its partition's batch, waiting only for buffer space, and returns a
    /// future of its acknowledgement. Await the future for the offset, or drop it to fire and
    /// forget: the record is delivered either way. Records enqueued one after the other (by
    /// one task) to one partition are written in that order.
    ///
    /// The first record for a topic looks up its partition count (Metadata).
    ///
    /// # Errors
    /// `UnknownTopic` or `UnknownPartition` ([`Error::Broker`]) for a topic or explicit
    /// partition that does not exist; [`Error::Usage`] for a record larger than
    /// `buffer_bytes`, or once the producer is closed; the producer's fatal error once it has
    /// failed.
    pub async fn enqueue(&self, record: Record<'_>) -> Result<DeliveryFuture> {
        let mut future = None;
        self.append_records(std::iter::once(record), |completion, index| {
            future = Some(DeliveryFuture::new(Arc::clone(completion), index));
        })
        .await?;
        Ok(future.expect("the one record was appended"))
    }

    /// Puts many records into their partitions' batches, as [`enqueue`](Producer::enqueue)
    /// does one after the other, and returns one future of all their acknowledgements. For
    /// throughput: the producer's lock is taken, and the clock read, once per 1,024 records
    /// rather than once per record (a long call lets the sender and other callers in between),
    /// and the future holds an entry per batch the records went into, not one per record.
    ///
    /// The future resolves to each record's [`Delivery`] in the order given, or to the first
    /// failure: records that went into other batches may still have been written.
    ///
    /// # Errors
    /// Those of [`enqueue`](Producer::enqueue), for the first record that cannot be
    /// enqueued; the records before it are enqueued and are delivered all the same.
    pub async fn enqueue_many<'r>(
        &self,
        records: impl IntoIterator<Item = Record<'r>>,
    ) -> Result<DeliveriesFuture> {
        let mut deliveries = DeliveriesFuture::default();
        self.append_records(records.into_iter(), |completion, index| {
            deliveries.push(completion, index);
        })
        .await?;
        Ok(deliveries)
    }

    /// Sends `records` and waits for all their acknowledgements:
    /// [`enqueue_many`](Producer::enqueue_many), then its future.
    ///
    /// # Errors
    /// Those of [`enqueue_many`](Producer::enqueue_many), then those of its future.
    pub async fn send_many<'r>(
        &self,
        records: impl IntoIterator<Item = Record<'r>>,
    ) -> Result<Deliveries> {
        self.enqueue_many(records).await?.await
    }

    /// Appends `records` in order, calling `appended` with each one's batch completion and
    /// index. Takes the accumulator's lock once for up to [`RECORDS_PER_LOCK`] records; lets
    /// it go after those, and to wait for buffer space or a topic's partition count.
    async fn append_records<'r>(
        &self,
        records: impl Iterator<Item = Record<'r>>,
        mut appended: impl FnMut(&Arc<BatchCompletion>, u32),
    ) -> Result<()> {
        enum Wait<'t> {
            Buffer(usize),
            Metadata(&'t str),
            /// Held the lock for `RECORDS_PER_LOCK` records, or the sender waits for it: let the
            /// sender and other callers in.
            Turn,
        }
        let shared = &self.inner.shared;
        let mut records = records.peekable();
        // Buffer this call holds for a new batch; whatever is left is given back, also when
        // the call is dropped while it waits.
        let mut reserved = Reserved { shared, bytes: 0 };
        // The last record's topic and where the accumulator keeps it: a record naming the very
        // same string (same address and length, alive for all of 'r) needs no lookup.
        let mut known_topic: Option<(&'r str, usize)> = None;
        let result = loop {
            let mut wake_sender = false;
            let stopped = {
                let mut accumulator = shared.lock_accumulator();
                // One wall-clock read for the records' timestamps, one monotonic read for the
                // linger of batches opened, per lock held and only when needed.
                let mut timestamp_now = None;
                let mut now = None;
                let mut stopped = None;
                let mut held_for = 0;
                while let Some(record) = records.peek() {
                    if held_for == RECORDS_PER_LOCK
                        || (held_for > 0 && shared.sender_waiting.load(Ordering::Relaxed))
                    {
                        stopped = Some(Ok(Wait::Turn));
                        break;
                    }
                    held_for += 1;
                    let timestamp_ms = record
                        .timestamp_ms
                        .unwrap_or_else(|| *timestamp_now.get_or_insert_with(now_ms));
                    // The header slots are filled only for a record with headers: setting up
                    // the empty slots was a few dozen stores per record.
                    let mut heap_headers;
                    let mut inline_headers;
                    let headers = if record.headers.is_empty() {
                        &[][..]
                    } else {
                        heap_headers = Vec::new();
                        inline_headers = [("", &[][..]); INLINE_HEADERS];
                        header_refs(&record.headers, &mut inline_headers, &mut heap_headers)
                    };
                    let parts = RecordParts {
                        timestamp_ms,
                        key: record.key.as_deref(),
                        value: &record.value,
                        headers,
                    };
                    let target = match (record.partition, &record.key) {
                        (Some(partition), _) => Target::Partition(partition),
                        (None, Some(key)) => Target::Key(key),
                        (None, None) => Target::Sticky,
                    };
                    let topic = match known_topic {
                        Some((name, position)) if std::ptr::eq(name, record.topic) => {
                            TopicRef::Known(position)
                        }
                        _ => TopicRef::Name(record.topic),
                    };
                    match accumulator.append(topic, target, &parts, &mut reserved.bytes, || {
                        *now.get_or_insert_with(Instant::now)
                    }) {
                        Err(error) => {
                            stopped = Some(Err(error));
                            break;
                        }
                        Ok(Append::Appended {
                            completion,
                            index,
                            batch,
                            new_batch,
                            topic,
                            wake_sender: wake,
                        }) => {
                            known_topic = Some((record.topic, topic));
                            // Under the accumulator's lock, so a flush that sees the batch also
                            // waits for it.
                            if new_batch {
                                shared.progress.started(batch);
                            }
                            wake_sender |= wake;
                            appended(completion, index);
                        }
                        Ok(Append::NeedsBuffer {
                            bytes,
                            wake_sender: wake,
                        }) => {
                            wake_sender |= wake;
                            stopped = Some(Ok(Wait::Buffer(bytes)));
                            break;
                        }
                        Ok(Append::UnknownTopic) => {
                            stopped = Some(Ok(Wait::Metadata(record.topic)));
                            break;
                        }
                    }
                    records.next();
                }
                stopped
            };
            if wake_sender {
                shared.wake.notify_one();
            }
            match stopped {
                None => break Ok(()),
                Some(Err(error)) => break Err(error),
                Some(Ok(Wait::Buffer(bytes))) => {
                    if bytes > shared.buffer_bytes {
                        break Err(Error::Usage(format!(
                            "a record of {bytes} bytes (as a batch) is larger than buffer_bytes ({})",
                            shared.buffer_bytes
                        )));
                    }
                    // All of it at once, holding nothing while waiting: two callers each holding
                    // a part and waiting for more could wait on each other for ever.
                    shared.release_buffer(std::mem::take(&mut reserved.bytes));
                    let wanted =
                        u32::try_from(bytes).expect("buffer_bytes fits in u32 (checked by build)");
                    match shared.buffer.acquire_many(wanted).await {
                        Ok(permit) => {
                            permit.forget();
                            reserved.bytes = bytes;
                        }
                        Err(_closed) => break Err(shared.refusal()),
                    }
                }
                Some(Ok(Wait::Turn)) => tokio::task::yield_now().await,
                Some(Ok(Wait::Metadata(topic))) => {
                    match partition_count(&shared.client, topic).await {
                        Ok(count) => shared.lock_accumulator().set_partition_count(topic, count),
                        Err(error) => break Err(error),
                    }
                }
            }
        };
        drop(reserved);
        result
    }

    /// Sends every record enqueued so far without waiting for linger, and waits until each has
    /// been acknowledged or has failed. Records enqueued meanwhile are not waited for.
    ///
    /// # Errors
    /// The producer's fatal error, if it has failed. A record that failed on its own is
    /// reported by its [`DeliveryFuture`], not here.
    pub async fn flush(&self) -> Result<()> {
        let shared = &self.inner.shared;
        let newest = shared.lock_accumulator().seal_all();
        shared.wake.notify_one();
        if let Some(newest) = newest {
            shared.progress.wait_through(newest).await;
        }
        shared.lock_accumulator().failure().map_or(Ok(()), Err)
    }

    /// Refuses further records, delivers every buffered one (as [`flush`](Producer::flush)
    /// does) and stops the sender task. Enqueues waiting for buffer space fail. Closing again
    /// does nothing more.
    ///
    /// # Errors
    /// The producer's fatal error, if it has failed.
    pub async fn close(&self) -> Result<()> {
        let shared = &self.inner.shared;
        if let Some(newest) = shared.begin_close() {
            shared.progress.wait_through(newest).await;
        }
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // A panic in the sender is a bug; its records' futures are gone with it.
            let _ = task.await;
        }
        shared.lock_accumulator().failure().map_or(Ok(()), Err)
    }

    /// Bytes of the buffer in use now: batches being filled, waiting, or in flight. Never more
    /// than `buffer_bytes`.
    pub fn buffered_bytes(&self) -> usize {
        let shared = &self.inner.shared;
        shared.buffer_bytes - shared.buffer.available_permits().min(shared.buffer_bytes)
    }

    /// The configured `buffer_bytes`.
    pub fn buffer_bytes(&self) -> usize {
        self.inner.shared.buffer_bytes
    }
}

/// What the producer handles and the sender task share.
#[derive(Debug)]
pub(crate) struct Shared {
    client: Client,
    accumulator: Mutex<Accumulator>,
    /// The accumulator's, taken without its lock: acknowledged batches' buffers go back here.
    spare_buffers: Arc<SpareBuffers>,
    /// One permit per byte of `buffer_bytes`; closed when the producer closes or fails.
    buffer: Semaphore,
    buffer_bytes: usize,
    /// Wakes the sender: a batch opened or closed, a flush, a close.
    wake: Notify,
    /// Set while the sender waits for the accumulator's lock: a long `enqueue_many` lets it
    /// go at the next record instead of after [`RECORDS_PER_LOCK`].
    sender_waiting: AtomicBool,
    progress: Progress,
}

impl Shared {
    fn lock_accumulator(&self) -> MutexGuard<'_, Accumulator> {
        // No code that can panic halfway through an update runs under this lock, except
        // assertions of our own invariants, after which nothing is consistent anyway.
        self.accumulator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The accumulator's lock for the sender task. When an application's `enqueue_many` holds
    /// it, the sender says so and gets it at that call's next record: the sender's runtime
    /// thread blocks meanwhile, and a megabyte of 1 KiB records copied under the lock (a
    /// whole turn) left that core idle for most of it.
    fn lock_accumulator_for_sender(&self) -> MutexGuard<'_, Accumulator> {
        match self.accumulator.try_lock() {
            Ok(accumulator) => accumulator,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.sender_waiting.store(true, Ordering::Relaxed);
                let accumulator = self.lock_accumulator();
                self.sender_waiting.store(false, Ordering::Relaxed);
                accumulator
            }
        }
    }

    fn release_buffer(&self, bytes: usize) {
        if bytes > 0 {
            self.buffer.add_permits(bytes);
        }
    }
}

/// Buffer bytes an enqueue call holds, given back when it ends or is dropped.
struct Reserved<'a> {
    shared: &'a Shared,
    bytes: usize,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.shared.release_buffer(self.bytes);
    }
}

impl Shared {
    /// Why enqueue is refused now.
    fn refusal(&self) -> Error {
        self.lock_accumulator()
            .failure()
            .unwrap_or_else(closed_error)
    }

    /// Refuses further records, closes every open batch and wakes the sender so it finishes.
    /// Returns the newest batch's id, if any.
    fn begin_close(&self) -> Option<u64> {
        let newest = self.lock_accumulator().close();
        self.buffer.close();
        self.wake.notify_one();
        newest
    }
}

/// Which batches are not finished yet, so flush can wait for those it saw.
#[derive(Debug)]
struct Progress {
    incomplete: Mutex<BTreeSet<u64>>,
    /// The lowest unfinished batch id, or `u64::MAX` when every batch is finished.
    lowest_incomplete: watch::Sender<u64>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.incomplete
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn started(&self, id: u64) {
        let mut incomplete = self.lock();
        incomplete.insert(id);
        let lowest = incomplete.first().copied().unwrap_or(u64::MAX);
        self.lowest_incomplete.send_if_modified(|current| {
            let changed = *current != lowest;
            *current = lowest;
            changed
        });
    }

    pub(crate) fn finished(&self, id: u64) {
        let mut incomplete = self.lock();
        if !incomplete.remove(&id) {
            return;
        }
        let lowest = incomplete.first().copied().unwrap_or(u64::MAX);
        self.lowest_incomplete.send_if_modified(|current| {
            let changed = *current != lowest;
            *current = lowest;
            changed
        });
    }

    /// Waits until every batch up to `id` is finished.
    async fn wait_through(&self, id: u64) {
        let mut lowest = self.lowest_incomplete.subscribe();
        // The sender is kept alive by `self`, so the channel cannot close while we wait.
        let _ = lowest.wait_for(|lowest| *lowest > id).await;
    }
}

/// Looks up the partition count of `topic`.
async fn partition_count(client: &Client, topic: &str) -> Result<u32> {
    let response = client
        .send_with_retry(MetadataRequest {
            topics: Some(vec![topic.to_owned()]),
        })
        .await?;
    let Response::Metadata(metadata) = response else {
        return Err(Error::Protocol(WireError::Invalid {
            what: "response",
            detail: format!("{:?} in answer to Metadata", response.api_key()),
        }));
    };
    let unknown = || Error::Broker {
        code: ErrorCode::UnknownTopic,
        message: Some(format!("no topic {topic}")),
    };
    let found = metadata
        .topics
        .into_iter()
        .find(|entry| entry.name == topic)
        .ok_or_else(unknown)?;
    if !found.error_code.is_ok() {
        return Err(Error::Broker {
            code: found.error_code,
            message: Some(format!("topic {topic}")),
        });
    }
    match u32::try_from(found.partitions.len()) {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(unknown()),
    }
}

/// The headers of a record as the accumulator takes them: in `inline` when there are few, so
/// enqueueing allocates nothing for them.
fn header_refs<'a>(
    headers: &'a [(String, Bytes)],
    inline: &'a mut [(&'a str, &'a [u8]); INLINE_HEADERS],
    heap: &'a mut Vec<(&'a str, &'a [u8])>,
) -> &'a [(&'a str, &'a [u8])] {
    if headers.len() <= INLINE_HEADERS {
        for (slot, (name, value)) in inline.iter_mut().zip(headers) {
            *slot = (name.as_str(), value.as_ref());
        }
        &inline[..headers.len()]
    } else {
        heap.extend(
            headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_ref())),
        );
        heap
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn builder() -> ProducerBuilder {
        // Validation needs no broker; the client only has to exist. A listener that accepts
        // is enough for Client::connect.
        let url = crate::test_support::silent_listener().await;
        let client = Client::connect(&url).await.unwrap();
        Producer::builder(&client)
    }

    #[tokio::test]
    async fn settings_that_do_not_go_together_are_refused() {
        let refused = |builder: ProducerBuilder| match builder.validate() {
            Err(Error::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        };
        let base = builder().await;
        base.validate().expect("the defaults go together");
        let message = refused(base.clone().acks(Acks::None));
        assert!(message.contains("idempotence(false)"), "{message}");
        base.clone()
            .acks(Acks::None)
            .idempotence(false)
            .validate()
            .unwrap();
        refused(base.clone().max_in_flight_per_partition(6));
        base.clone()
            .idempotence(false)
            .max_in_flight_per_partition(6)
            .validate()
            .unwrap();
        refused(base.clone().max_in_flight_per_partition(0));
        refused(base.clone().batch_bytes(10));
        refused(base.clone().buffer_bytes(1024).batch_bytes(4096));
        refused(base.clone().delivery_timeout(Duration::from_secs(1)));
        refused(base.clone().idempotence(false).producer_name("relay"));
    }

    /// An acknowledged batch's buffer is kept, and the next batch is built in it instead of
    /// in fresh memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledged_batch_leaves_its_buffer_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = sluice_broker::Config::on_loopback(dir.path());
        config.listeners.tcp = "127.0.0.1:0".parse().unwrap();
        let broker = sluice_broker::Broker::start(config).await.unwrap();
        let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
            .await
            .unwrap();
        client.admin().create_topic("t", 1, &[]).await.unwrap();
        let producer = Producer::builder(&client)
            .batch_bytes(64 * 1024)
            .linger(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        let spare = Arc::clone(&producer.inner.shared.spare_buffers);
        let value = vec![7u8; 1000];
        let first = producer
            .enqueue(Record::borrowed("t", &value))
            .await
            .unwrap();
        producer.flush().await.unwrap();
        first.await.unwrap();
        assert_eq!(spare.kept(), 1, "the acknowledged batch's buffer is kept");
        let pointer = {
            let buffers = spare.lock();
            buffers[0].as_ptr()
        };

        let second = producer
            .enqueue(Record::borrowed("t", &value))
            .await
            .unwrap();
        assert_eq!(spare.kept(), 0, "the new batch took it");
        producer.flush().await.unwrap();
        let delivery = second.await.unwrap();
        assert_eq!(delivery.offset, Some(1));
        {
            let buffers = spare.lock();
            assert_eq!(buffers.len(), 1);
            assert_eq!(buffers[0].as_ptr(), pointer, "the same memory, twice");
        }
        producer.close().await.unwrap();
        broker.shutdown().await;
    }

    /// A long `enqueue_many` takes the accumulator's lock once for many records, but lets it
    /// go at the next record when the sender waits for it.
    #[tokio::test]
    async fn a_long_enqueue_lets_a_waiting_sender_in_at_the_next_record() {
        let producer = builder()
            .await
            .idempotence(false)
            .linger(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        let shared = &producer.inner.shared;
        shared.lock_accumulator().set_partition_count("t", 1);
        let records = || (0..10).map(|_| Record::borrowed("t", b"value"));

        let mut appended = 0;
        producer
            .append_records(records(), |_, _| appended += 1)
            .await
            .unwrap();
        assert_eq!(appended, 10, "all in one hold of the lock");

        shared.sender_waiting.store(true, Ordering::Relaxed);
        let mut appended = 0;
        {
            let call = producer.append_records(records(), |_, _| appended += 1);
            let mut call = std::pin::pin!(call);
            assert!(
                futures::poll!(call.as_mut()).is_pending(),
                "the call takes turns"
            );
        }
        assert_eq!(appended, 1, "the lock was let go after one record");
    }
}
