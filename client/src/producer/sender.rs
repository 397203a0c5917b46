//! The sender: a background task that takes closed batches from the accumulator, sends them in
//! produce requests, and resolves each record's future from the answer.
//!
//! ```text
//!            ┌──────────── plan(now): per partition, resends first, else new batches ───────┐
//!            │              while the partition's window has room (max in flight)           │
//!            ▼                                                                              │
//!  accumulator ──drain──▶ window per partition: [batch seq 0][seq 10][seq 25] (≤ 5, in order)
//!                                   │ build with (producer id, epoch, base sequence)
//!                                   ▼
//!   request k carries the k-th sendable batch of every partition (one batch per partition
//!   per request), so a partition's batches reach the connection in sequence order
//!                                   │
//!                      answer ◀─────┘  ok / duplicate ──▶ resolve futures (base offset + index)
//!                                      retriable       ──▶ resend the same bytes after backoff
//!                                      definite        ──▶ fail the batch (and later ones)
//!                                      fenced / gap    ──▶ fatal: fail everything, refuse more
//! ```
//!
//! [`SenderState`] is the plain state machine (no IO, the time comes in as `now`); [`run`] is
//! the task that drives it: it waits for a wake-up (new batch, flush, close), an answer, or the
//! next deadline (linger, backoff, delivery timeout), and sends what the state machine plans.
//!
//! # Order and retries
//!
//! A partition's batches are sent in sequence order, and requests are handed to the
//! connection in the order they were planned: each request future is polled once, up to the
//! point where its frame is queued behind the earlier ones (every queue on the way is FIFO),
//! before the next is created. When a batch fails with a retriable error, its partition stops
//! taking new batches; once none of its batches is in flight any more and the backoff is over,
//! every unacknowledged batch of the partition is sent again, oldest first, with the same
//! bytes (so the same sequence numbers). The broker answers a batch it already wrote with its
//! original offsets, and refuses one that would leave a gap (`OutOfOrderSequence`): such a
//! refusal while an earlier batch of the partition is still unacknowledged is part of the same
//! retry, not an error.
//!
//! # Failures
//!
//! - Retriable (lost connection, timeout, circuit open, a broker code that says "later"):
//!   retried until the batch's delivery timeout; then it fails with
//!   [`Error::RetriesExhausted`]. With idempotence its outcome is then unknown, so the later
//!   batches of the partition fail with it and the producer takes a new epoch
//!   (InitProducerId) before sending more: a named producer learns where each partition's
//!   sequence really continues, an unnamed one gets a fresh id.
//! - Definite (unknown topic or partition, batch too large, ...): that batch fails; with
//!   idempotence the later batches of its partition (built on its sequence numbers) fail too,
//!   and the partition's sequence continues where the failed batch began when the refusal was
//!   of its first send (nothing of it was written). A refusal of a resend (an earlier send may
//!   have been written), or an answer that did not decode, leaves the outcome unknown: a new
//!   epoch, as for a retry deadline.
//! - Fatal (`ProducerFenced`, `OutOfOrderSequence` with nothing to explain it,
//!   `UnknownProducerId`): every pending record fails with that error and every later send is
//!   refused with it. Start a new producer (with the same name to continue its sequences).

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sluice_protocol::messages::{
    Acks, InitProducerIdRequest, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
    ProducerIdAndEpoch,
};
use sluice_protocol::{ErrorCode, RecordBatch, Response, WireError};

use super::Shared;
use super::accumulator::{Accumulator, OpenBatch};
use super::delivery::{BatchCompletion, BatchOutcome, copy_error};
use crate::client::Client;
use crate::connection::duration_ms;
use crate::error::{Error, Result};
use crate::resilience::Backoff;

/// Bytes a produce request may take besides its batches: header, acks, timeout, counts.
const REQUEST_OVERHEAD_BYTES: usize = 64;
/// Bytes each partition entry adds besides its batch: partition, length prefix.
const PARTITION_OVERHEAD_BYTES: usize = 8;
/// Bytes each topic of a request adds besides its name and partitions: the name's length
/// prefix, the partition count.
const TOPIC_OVERHEAD_BYTES: usize = 6;

/// The id and epoch an idempotent producer stamps on its batches, and where each partition's
/// sequence continued when they were issued.
#[derive(Clone, Debug, Default)]
pub(crate) struct Identity {
    pub(crate) producer_id: u64,
    pub(crate) producer_epoch: u16,
    pub(crate) sequences: HashMap<String, HashMap<u32, u64>>,
}

/// Asks the broker for a producer id (InitProducerId), retrying retriable errors.
/// An id and epoch from the broker. `current` is the identity a running producer holds when it
/// asks for a new epoch of its own: a named one whose name has moved on to a newer instance
/// is then told `ProducerFenced` instead of taking the name back.
pub(crate) async fn init_producer_id(
    client: &Client,
    name: Option<&str>,
    current: Option<&Identity>,
) -> Result<Identity> {
    let response = client
        .send_with_retry(InitProducerIdRequest {
            producer_name: name.map(str::to_owned),
            current: current.map(|identity| ProducerIdAndEpoch {
                producer_id: identity.producer_id,
                producer_epoch: identity.producer_epoch,
            }),
        })
        .await?;
    let Response::InitProducerId(response) = response else {
        return Err(unexpected_response("InitProducerId", &response));
    };
    if !response.error_code.is_ok() {
        return Err(Error::Broker {
            code: response.error_code,
            message: Some("InitProducerId failed".into()),
        });
    }
    let sequences = response
        .sequences
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .into_iter()
                .map(|partition| (partition.partition, partition.next_sequence))
                .collect();
            (topic.topic, partitions)
        })
        .collect();
    Ok(Identity {
        producer_id: response.producer_id,
        producer_epoch: response.producer_epoch,
        sequences,
    })
}

fn unexpected_response(request: &str, response: &Response) -> Error {
    Error::Protocol(WireError::Invalid {
        what: "response",
        detail: format!("{:?} in answer to {request}", response.api_key()),
    })
}

/// The sender's settings.
#[derive(Clone, Debug)]
pub(crate) struct SenderOptions {
    pub(crate) acks: Acks,
    pub(crate) producer_name: Option<String>,
    pub(crate) max_in_flight_per_partition: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) delivery_timeout: Duration,
    pub(crate) max_request_bytes: usize,
    pub(crate) retry_initial_backoff: Duration,
    pub(crate) retry_max_backoff: Duration,
}

/// Where a sent batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SentState {
    /// In the request with this id, awaiting its answer.
    InRequest(u64),
    /// Failed retriably; sent again when its partition's backoff is over.
    AwaitingResend,
}

/// A batch that left the accumulator: built, with its sequence, kept until acknowledged.
#[derive(Debug)]
struct SentBatch {
    id: u64,
    batch: RecordBatch,
    base_sequence: u64,
    completion: Arc<BatchCompletion>,
    reserved_bytes: usize,
    created_at: Instant,
    state: SentState,
    attempts: u32,
    last_error: Option<Arc<Error>>,
    /// Set when an earlier batch of the partition failed for good: this one cannot be written
    /// without a gap, and fails with this error when its answer comes back.
    doomed: Option<Arc<Error>>,
    /// The how-manieth batch of its window this is (see [`Window::taken`]).
    taken_as: u64,
}

/// One partition's unacknowledged batches, in sequence order.
#[derive(Debug)]
struct Window {
    next_sequence: u64,
    batches: VecDeque<SentBatch>,
    /// Set while batches await a resend: when the backoff is over.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// After a definite failure: where the sequence continues once the window is empty.
    rewind_to: Option<u64>,
    /// Batches taken into the window so far. The broker recognises a retry among the last
    /// `max_in_flight_per_partition` batches it wrote, whose answers may overtake each other:
    /// so no more batches may follow the oldest unacknowledged one than fit in that span, or a
    /// resend of it would be refused as out of order though it was written.
    taken: u64,
}

impl Window {
    fn has_in_request(&self) -> bool {
        self.batches
            .iter()
            .any(|batch| matches!(batch.state, SentState::InRequest(_)))
    }

    /// True when the window may take new batches from the accumulator.
    fn is_clean(&self) -> bool {
        self.retry_at.is_none()
            && self.rewind_to.is_none()
            && self
                .batches
                .iter()
                .all(|batch| batch.doomed.is_none() && batch.state != SentState::AwaitingResend)
    }
}

/// A produce request the task should send.
#[derive(Debug)]
pub(crate) struct PlannedRequest {
    id: u64,
    request: ProduceRequest,
    /// (topic, partition, batch id) of each batch in the request.
    entries: Vec<(Arc<str>, u32, u64)>,
}

/// An answer to a planned request: the produce response, `None` under `acks = none`.
type RequestResult = (PlannedRequest, Result<Option<ProduceResponse>>);

/// What to do with a batch that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Retry,
    FailBatch,
    /// Fail the batch, but the broker may have written it (and recorded its sequences), or
    /// holds no state to continue them from: take a new epoch rather than reuse them.
    FailOutcomeUnknown,
    Fatal,
}

/// The sender's state machine.
#[derive(Debug)]
pub(crate) struct SenderState {
    options: SenderOptions,
    /// `None` without idempotence.
    identity: Option<Identity>,
    windows: HashMap<Arc<str>, HashMap<u32, Window>>,
    next_request_id: u64,
    /// Set when a batch's outcome became unknown: take a new epoch before sending more.
    epoch_bump_needed: bool,
    epoch_bump_at: Option<Instant>,
    epoch_bump_backoff: Backoff,
    /// The error that stopped the producer, once it has to be reported.
    fatal: Option<Arc<Error>>,
    fatal_reported: bool,
}

impl SenderState {
    pub(crate) fn new(options: SenderOptions, identity: Option<Identity>) -> SenderState {
        let epoch_bump_backoff =
            Backoff::new(options.retry_initial_backoff, options.retry_max_backoff);
        SenderState {
            options,
            identity,
            windows: HashMap::new(),
            next_request_id: 0,
            epoch_bump_needed: false,
            epoch_bump_at: None,
            epoch_bump_backoff,
            fatal: None,
            fatal_reported: false,
        }
    }

    fn idempotent(&self) -> bool {
        self.identity.is_some()
    }

    /// True when no batch is unacknowledged.
    pub(crate) fn is_idle(&self) -> bool {
        self.windows
            .values()
            .all(|windows| windows.values().all(|window| window.batches.is_empty()))
    }

    /// How many new batches `partition` may take now.
    fn budget(&self, topic: &str, partition: u32) -> usize {
        if self.epoch_bump_needed || self.fatal.is_some() {
            return 0;
        }
        match self
            .windows
            .get(topic)
            .and_then(|windows| windows.get(&partition))
        {
            None => self.options.max_in_flight_per_partition,
            Some(window) if window.is_clean() => {
                let since_oldest = window
                    .batches
                    .front()
                    .map_or(0, |oldest| window.taken - oldest.taken_as);
                self.options
                    .max_in_flight_per_partition
                    .saturating_sub(usize::try_from(since_oldest).unwrap_or(usize::MAX))
            }
            Some(_) => 0,
        }
    }

    fn window(&mut self, topic: &Arc<str>, partition: u32) -> &mut Window {
        let next_sequence = self
            .identity
            .as_ref()
            .and_then(|identity| identity.sequences.get(&**topic))
            .and_then(|partitions| partitions.get(&partition))
            .copied()
            .unwrap_or(0);
        let backoff = Backoff::new(
            self.options.retry_initial_backoff,
            self.options.retry_max_backoff,
        );
        self.windows
            .entry(Arc::clone(topic))
            .or_default()
            .entry(partition)
            .or_insert_with(|| Window {
                next_sequence,
                batches: VecDeque::new(),
                retry_at: None,
                backoff,
                rewind_to: None,
                taken: 0,
            })
    }

    /// Takes from `accumulator` the closed batches of partitions with room in their window,
    /// and nothing more: this runs under the accumulator's lock, which producers wait for.
    pub(crate) fn drain(&self, accumulator: &mut Accumulator, now: Instant) -> Vec<OpenBatch> {
        if self.fatal.is_some() {
            return Vec::new();
        }
        accumulator.drain(now, |topic, partition| self.budget(topic, partition))
    }

    /// The requests to send now: resends of partitions whose backoff is over, then the
    /// `drained` batches (see [`SenderState::drain`]), built here, outside the accumulator's
    /// lock: building computes a batch's CRC, and producers go on appending meanwhile.
    pub(crate) fn plan(&mut self, drained: Vec<OpenBatch>, now: Instant) -> Vec<PlannedRequest> {
        if self.fatal.is_some() {
            return Vec::new();
        }
        // Per partition, the ids of the batches to send, oldest first.
        let mut sendable: Vec<(Arc<str>, u32, Vec<u64>)> = Vec::new();
        for (topic, windows) in &mut self.windows {
            for (&partition, window) in windows.iter_mut() {
                let due = window.retry_at.is_some_and(|retry_at| retry_at <= now);
                if !due || window.has_in_request() {
                    continue;
                }
                window.retry_at = None;
                let ids: Vec<u64> = window
                    .batches
                    .iter()
                    .filter(|batch| batch.state == SentState::AwaitingResend)
                    .map(|batch| batch.id)
                    .collect();
                if !ids.is_empty() {
                    sendable.push((Arc::clone(topic), partition, ids));
                }
            }
        }
        for open in drained {
            let OpenBatch {
                id,
                topic,
                partition,
                builder,
                reserved_bytes,
                completion,
                created_at,
            } = open;
            let identity = self
                .identity
                .as_ref()
                .map(|identity| (identity.producer_id, identity.producer_epoch));
            let window = self.window(&topic, partition);
            let record_count = u64::from(builder.len());
            let base_sequence = window.next_sequence;
            let batch = match identity {
                Some((producer_id, producer_epoch)) => {
                    window.next_sequence += record_count;
                    builder
                        .producer(producer_id, producer_epoch, base_sequence)
                        .build()
                }
                None => builder.build(),
            };
            window.batches.push_back(SentBatch {
                id,
                batch,
                base_sequence,
                completion,
                reserved_bytes,
                created_at,
                state: SentState::AwaitingResend,
                attempts: 0,
                last_error: None,
                doomed: None,
                taken_as: window.taken,
            });
            window.taken += 1;
            match sendable.last_mut() {
                Some((last_topic, last_partition, ids))
                    if *last_topic == topic && *last_partition == partition =>
                {
                    ids.push(id);
                }
                _ => sendable.push((topic, partition, vec![id])),
            }
        }
        self.requests(sendable)
    }

    /// Packs the sendable batches into requests: the k-th batch of every partition goes into
    /// round k, and a round is split where a request would pass `max_request_bytes`.
    fn requests(&mut self, sendable: Vec<(Arc<str>, u32, Vec<u64>)>) -> Vec<PlannedRequest> {
        let rounds = sendable
            .iter()
            .map(|(_, _, ids)| ids.len())
            .max()
            .unwrap_or(0);
        let mut requests = Vec::new();
        for round in 0..rounds {
            // The request being filled, and its size so far.
            let mut current: Option<(PlannedRequest, usize)> = None;
            for (topic, partition, ids) in &sendable {
                let Some(&batch_id) = ids.get(round) else {
                    continue;
                };
                let batch_bytes = self
                    .sent_mut(topic, *partition, batch_id)
                    .batch
                    .size_bytes()
                    + PARTITION_OVERHEAD_BYTES;
                // A topic's name and counts are written once per request, with its first batch.
                let topic_bytes = TOPIC_OVERHEAD_BYTES + topic.len();
                let topic_at = |request: &PlannedRequest| {
                    request
                        .request
                        .topics
                        .iter()
                        .position(|produce_topic| *produce_topic.name == **topic)
                };
                // What the batch adds to a request where its topic stands at `at`.
                let entry_bytes =
                    |at: Option<usize>| batch_bytes + if at.is_some() { 0 } else { topic_bytes };
                // Where the topic stands in the request being filled (none in a new one).
                let mut at = current.as_ref().and_then(|(request, _)| topic_at(request));
                if let Some((_, bytes)) = &current
                    && bytes + entry_bytes(at) > self.options.max_request_bytes
                {
                    requests.extend(current.take().map(|(request, _)| request));
                    at = None;
                }
                if current.is_none() {
                    current = Some((self.new_request(), REQUEST_OVERHEAD_BYTES));
                }
                let (request, bytes) = current.as_mut().expect("just set");
                *bytes += entry_bytes(at);
                let sent = self.sent_mut(topic, *partition, batch_id);
                sent.state = SentState::InRequest(request.id);
                sent.attempts += 1;
                let records = sent.batch.as_bytes().clone();
                let entry = ProducePartition {
                    partition: *partition,
                    records,
                };
                match at {
                    Some(at) => request.request.topics[at].partitions.push(entry),
                    None => request.request.topics.push(ProduceTopic {
                        name: topic.to_string(),
                        partitions: vec![entry],
                    }),
                }
                request
                    .entries
                    .push((Arc::clone(topic), *partition, batch_id));
            }
            requests.extend(current.map(|(request, _)| request));
        }
        requests
    }

    fn new_request(&mut self) -> PlannedRequest {
        let id = self.next_request_id;
        self.next_request_id += 1;
        PlannedRequest {
            id,
            request: ProduceRequest {
                acks: self.options.acks,
                timeout_ms: u32::try_from(self.options.request_timeout.as_millis())
                    .unwrap_or(u32::MAX),
                topics: Vec::new(),
            },
            entries: Vec::new(),
        }
    }

    fn sent_mut(&mut self, topic: &str, partition: u32, batch_id: u64) -> &mut SentBatch {
        self.windows
            .get_mut(topic)
            .and_then(|windows| windows.get_mut(&partition))
            .and_then(|window| window.batches.iter_mut().find(|batch| batch.id == batch_id))
            .expect("a planned batch is in its window")
    }

    /// Settles every batch of an answered (or failed) request.
    pub(crate) fn handle(&mut self, shared: &Shared, result: RequestResult, now: Instant) {
        let (planned, result) = result;
        match result {
            Ok(None) => {
                for (topic, partition, id) in planned.entries {
                    self.settle(shared, &topic, partition, id, Ok(None), now);
                }
            }
            Ok(Some(response)) => {
                let mut results = HashMap::new();
                for topic in &response.topics {
                    for partition in &topic.partitions {
                        results.insert((topic.name.as_str(), partition.partition), partition);
                    }
                }
                for (topic, partition, id) in &planned.entries {
                    let outcome = match results.get(&(&**topic, *partition)) {
                        Some(result)
                            if matches!(
                                result.error_code,
                                ErrorCode::None | ErrorCode::DuplicateSequence
                            ) =>
                        {
                            Ok(Some(result.base_offset))
                        }
                        Some(result) => Err(Arc::new(Error::Broker {
                            code: result.error_code,
                            message: result.error_message.clone(),
                        })),
                        None => Err(Arc::new(Error::Broker {
                            code: ErrorCode::UnknownServerError,
                            message: Some(format!(
                                "no result for {topic}/{partition} in the produce response"
                            )),
                        })),
                    };
                    self.settle(shared, topic, *partition, *id, outcome, now);
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for (topic, partition, id) in planned.entries {
                    self.settle(shared, &topic, partition, id, Err(Arc::clone(&error)), now);
                }
            }
        }
    }

    /// Applies one batch's outcome.
    fn settle(
        &mut self,
        shared: &Shared,
        topic: &str,
        partition: u32,
        batch_id: u64,
        outcome: BatchOutcome,
        now: Instant,
    ) {
        let idempotent = self.idempotent();
        let Some(window) = self
            .windows
            .get_mut(topic)
            .and_then(|windows| windows.get_mut(&partition))
        else {
            return; // failed already, with the whole producer
        };
        let Some(index) = window.batches.iter().position(|batch| batch.id == batch_id) else {
            return;
        };
        // A base offset with no room above it for the batch's records is no answer a broker
        // gives: the records' offsets would overflow.
        let records = u64::from(window.batches[index].batch.record_count());
        let outcome = match outcome {
            Ok(Some(base_offset)) if base_offset.checked_add(records).is_none() => {
                Err(Arc::new(Error::Protocol(WireError::Invalid {
                    what: "produce response base offset",
                    detail: format!("{base_offset} leaves no room for {records} records"),
                })))
            }
            outcome => outcome,
        };
        match outcome {
            Ok(base_offset) => {
                let sent = window.batches.remove(index).expect("index in range");
                if sent.doomed.is_some() {
                    // The broker took it after all, so its sequence is not to be reused.
                    window.rewind_to = None;
                }
                window.backoff.reset();
                // Kept before the records resolve: whatever their resolving wakes finds it.
                shared.spare_buffers.give(sent.batch);
                finish(
                    shared,
                    sent.id,
                    &sent.completion,
                    sent.reserved_bytes,
                    Ok(base_offset),
                );
            }
            Err(error) => {
                if let Some(doomed) = window.batches[index].doomed.clone() {
                    let sent = window.batches.remove(index).expect("index in range");
                    finish(
                        shared,
                        sent.id,
                        &sent.completion,
                        sent.reserved_bytes,
                        Err(doomed),
                    );
                } else {
                    let first_attempt = window.batches[index].attempts <= 1;
                    let action = classify(&error, index > 0, first_attempt, idempotent);
                    match action {
                        Action::Retry => {
                            let sent = &mut window.batches[index];
                            sent.state = SentState::AwaitingResend;
                            tracing::debug!(
                                topic,
                                partition,
                                base_sequence = sent.base_sequence,
                                attempts = sent.attempts,
                                %error,
                                "batch will be sent again"
                            );
                            sent.last_error = Some(error);
                            if window.retry_at.is_none() {
                                window.retry_at = Some(now + window.backoff.next_delay());
                            }
                        }
                        action @ (Action::FailBatch | Action::FailOutcomeUnknown) => {
                            let sent = window.batches.remove(index).expect("index in range");
                            tracing::warn!(topic, partition, %error, ?action, "batch failed");
                            if idempotent {
                                if action == Action::FailOutcomeUnknown {
                                    // It may have been written with its sequences: a new
                                    // epoch before anything more goes out, not a rewind.
                                    if !self.epoch_bump_needed {
                                        self.epoch_bump_needed = true;
                                        self.epoch_bump_at = Some(now);
                                    }
                                } else {
                                    let rewind = sent.base_sequence;
                                    window.rewind_to =
                                        Some(window.rewind_to.map_or(rewind, |at| at.min(rewind)));
                                }
                                doom_from(shared, window, index, &error, topic, partition);
                            }
                            finish(
                                shared,
                                sent.id,
                                &sent.completion,
                                sent.reserved_bytes,
                                Err(error),
                            );
                        }
                        Action::Fatal => {
                            let error = fatal_error(
                                &error,
                                self.identity.as_ref(),
                                self.options.producer_name.as_deref(),
                                topic,
                                partition,
                            );
                            tracing::error!(%error, "producer failed");
                            self.fatal.get_or_insert(error);
                            return;
                        }
                    }
                }
            }
        }
        Self::tidy(window);
    }

    /// An empty window forgets its backoff and takes up a pending rewind.
    fn tidy(window: &mut Window) {
        if window.batches.is_empty() {
            window.retry_at = None;
            if let Some(sequence) = window.rewind_to.take() {
                window.next_sequence = sequence;
            }
        }
    }

    /// Fails the batches that waited for a resend past their delivery timeout.
    pub(crate) fn expire(&mut self, shared: &Shared, now: Instant) {
        let idempotent = self.idempotent();
        let timeout = self.options.delivery_timeout;
        let mut outcome_unknown = false;
        for (topic, windows) in &mut self.windows {
            for (&partition, window) in windows.iter_mut() {
                let expired = |batch: &SentBatch| {
                    batch.state == SentState::AwaitingResend && batch.created_at + timeout <= now
                };
                while let Some(index) = window.batches.iter().position(expired) {
                    let sent = window.batches.remove(index).expect("index in range");
                    let last = sent.last_error.as_deref().map_or(
                        Error::Timeout {
                            timeout_ms: duration_ms(timeout),
                        },
                        copy_error,
                    );
                    let error = Arc::new(Error::RetriesExhausted {
                        attempts: sent.attempts,
                        last: Box::new(last),
                    });
                    tracing::warn!(topic = &**topic, partition, %error, "batch expired");
                    if idempotent {
                        // It may or may not have been written: the sequence state is unknown.
                        outcome_unknown = true;
                        doom_from(shared, window, index, &error, topic, partition);
                    }
                    finish(
                        shared,
                        sent.id,
                        &sent.completion,
                        sent.reserved_bytes,
                        Err(error),
                    );
                }
                Self::tidy(window);
            }
        }
        if outcome_unknown && !self.epoch_bump_needed {
            self.epoch_bump_needed = true;
            self.epoch_bump_at = Some(now);
        }
    }

    /// The earliest time something is due: a partition's resend, a resend's delivery timeout,
    /// an epoch bump retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        // A new epoch waits for every window to empty; answers wake the task until then.
        let mut next = self
            .epoch_bump_at
            .filter(|_| self.epoch_bump_needed && self.is_idle());
        let mut consider = |deadline: Instant| {
            next = Some(next.map_or(deadline, |next| next.min(deadline)));
        };
        for window in self.windows.values().flat_map(HashMap::values) {
            if let Some(retry_at) = window.retry_at
                && !window.has_in_request()
            {
                consider(retry_at);
            }
            for batch in &window.batches {
                if batch.state == SentState::AwaitingResend {
                    consider(batch.created_at + self.options.delivery_timeout);
                }
            }
        }
        next
    }

    /// The producer's fatal error, the first time it is asked for after it happened.
    pub(crate) fn take_new_fatal(&mut self) -> Option<Arc<Error>> {
        if self.fatal_reported {
            return None;
        }
        let fatal = self.fatal.clone()?;
        self.fatal_reported = true;
        Some(fatal)
    }

    /// Fails every unacknowledged batch with `error`.
    pub(crate) fn fail_all(&mut self, shared: &Shared, error: &Arc<Error>) {
        for window in self.windows.values_mut().flat_map(HashMap::values_mut) {
            for sent in window.batches.drain(..) {
                finish(
                    shared,
                    sent.id,
                    &sent.completion,
                    sent.reserved_bytes,
                    Err(Arc::clone(error)),
                );
            }
        }
    }

    /// True when a new epoch is due now: every window is empty and the retry time has come.
    pub(crate) fn epoch_bump_due(&self, now: Instant) -> bool {
        self.epoch_bump_needed && self.is_idle() && self.epoch_bump_at.is_none_or(|at| at <= now)
    }

    /// Takes a new producer id or epoch: the sequences start again from what the broker says.
    pub(crate) async fn bump_epoch(&mut self, client: &Client) {
        let name = self.options.producer_name.as_deref();
        match init_producer_id(client, name, self.identity.as_ref()).await {
            Ok(identity) => {
                tracing::info!(
                    producer_id = identity.producer_id,
                    producer_epoch = identity.producer_epoch,
                    "new producer epoch after a batch's outcome became unknown"
                );
                self.identity = Some(identity);
                self.windows.clear();
                self.epoch_bump_needed = false;
                self.epoch_bump_at = None;
                self.epoch_bump_backoff.reset();
            }
            // A broker away for longer than the client's retry deadline is still a passing
            // state: the producer waits it out (its records time out meanwhile), as it does
            // for any other send, instead of stopping for good.
            Err(error) if passing(&error) => {
                let delay = self.epoch_bump_backoff.next_delay();
                tracing::warn!(%error, "InitProducerId failed; trying again");
                self.epoch_bump_at = Some(Instant::now() + delay);
            }
            Err(error) => {
                self.fatal.get_or_insert(Arc::new(error));
            }
        }
    }
}

/// Retriable, or given up on at a retry deadline after only retriable failures.
fn passing(error: &Error) -> bool {
    match error {
        Error::RetriesExhausted { last, .. } => passing(last),
        error => error.is_retriable(),
    }
}

/// What to do with a batch that failed with `error`; `has_earlier` when an earlier batch of
/// its partition is still unacknowledged, `first_attempt` when this answer is to the batch's
/// first send.
fn classify(error: &Error, has_earlier: bool, first_attempt: bool, idempotent: bool) -> Action {
    match error {
        Error::Broker {
            code: ErrorCode::ProducerFenced,
            ..
        } if idempotent => Action::Fatal,
        // A gap behind a batch that is being retried is part of that retry: the broker says
        // `UnknownProducerId` for it when the earlier batch was this producer's first there.
        Error::Broker {
            code: ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducerId,
            ..
        } if idempotent && has_earlier => Action::Retry,
        // The broker holds no state for this producer on the partition although everything
        // sent there before was acknowledged: retention deleted the segments that held it, or
        // it expired after `producer_expiry_ms` idle. Nothing of the batch was written; a new
        // epoch starts the partition's sequences again (as Kafka's KIP-360 does), instead of
        // stopping the producer for good.
        Error::Broker {
            code: ErrorCode::UnknownProducerId,
            ..
        } if idempotent => Action::FailOutcomeUnknown,
        // Acknowledged records missing from the broker (lost with an unsynced write, say):
        // going on would hide the loss.
        Error::Broker {
            code: ErrorCode::OutOfOrderSequence,
            ..
        } if idempotent => Action::Fatal,
        // The broker fails a write it could not make durable after appending it.
        Error::Broker {
            code: ErrorCode::StorageError,
            ..
        } if idempotent => Action::FailOutcomeUnknown,
        error if error.is_retriable() => Action::Retry,
        // With idempotence a failed batch's sequences are used again (the rewind) only when
        // the broker certainly did not write it: a refusal of its one send, or a request never
        // sent. Any other failure (an answer that did not decode, a refusal of a resend whose
        // earlier send may have been written) leaves its outcome unknown: the sequences reused,
        // the broker would take the next batch for a retry of this one and answer it with this
        // one's offsets, unwritten.
        error if idempotent && !(first_attempt && refused_unwritten(error)) => {
            Action::FailOutcomeUnknown
        }
        _ => Action::FailBatch,
    }
}

/// A failure that says the broker did not write the batch it was the answer to: refused for
/// what it is or where it was sent, before any append, or never sent at all.
fn refused_unwritten(error: &Error) -> bool {
    match error {
        Error::Broker { code, .. } => matches!(
            code,
            ErrorCode::CorruptMessage
                | ErrorCode::PartitionReadOnly
                | ErrorCode::MessageTooLarge
                | ErrorCode::UnknownTopic
                | ErrorCode::UnknownPartition
                | ErrorCode::InvalidRequest
                | ErrorCode::UnsupportedVersion
                | ErrorCode::UnknownApiKey
                | ErrorCode::Unauthorized
        ),
        Error::RequestTooLarge { .. } | Error::InvalidUrl(_) | Error::Usage(_) => true,
        _ => false,
    }
}

/// Fails the batches after `index` in `window`: they were built on sequence numbers that
/// follow a batch that failed, so the broker would refuse them as a gap. Those in flight fail
/// when their answer comes back.
fn doom_from(
    shared: &Shared,
    window: &mut Window,
    index: usize,
    cause: &Error,
    topic: &str,
    partition: u32,
) {
    let doomed = Arc::new(match cause {
        Error::Broker { code, message } => Error::Broker {
            code: *code,
            message: Some(format!(
                "{}an earlier batch of {topic}/{partition} failed with it, so this one was not \
                 written (the partition keeps its order)",
                message
                    .as_deref()
                    .map(|message| format!("{message}; "))
                    .unwrap_or_default()
            )),
        },
        other => copy_error(other),
    });
    let mut position = index;
    while position < window.batches.len() {
        if window.batches[position].state == SentState::AwaitingResend {
            let sent = window.batches.remove(position).expect("index in range");
            finish(
                shared,
                sent.id,
                &sent.completion,
                sent.reserved_bytes,
                Err(Arc::clone(&doomed)),
            );
        } else {
            window.batches[position].doomed = Some(Arc::clone(&doomed));
            position += 1;
        }
    }
}

/// The error a fatal broker answer becomes, naming the producer and what to do.
fn fatal_error(
    error: &Error,
    identity: Option<&Identity>,
    name: Option<&str>,
    topic: &str,
    partition: u32,
) -> Arc<Error> {
    let who = match (identity, name) {
        (Some(identity), Some(name)) => format!(
            "producer {name:?} (id {}, epoch {})",
            identity.producer_id, identity.producer_epoch
        ),
        (Some(identity), None) => format!(
            "producer id {} (epoch {})",
            identity.producer_id, identity.producer_epoch
        ),
        (None, _) => "the producer".to_owned(),
    };
    let Error::Broker { code, message } = error else {
        return Arc::new(copy_error(error));
    };
    let reason = match code {
        ErrorCode::ProducerFenced => {
            "was fenced: a newer instance with the same name holds a higher epoch"
        }
        ErrorCode::OutOfOrderSequence => {
            "sent a sequence the broker did not expect, so records could be missing"
        }
        ErrorCode::UnknownProducerId => "is no longer known to the broker (its state expired)",
        _ => "failed",
    };
    Arc::new(Error::Broker {
        code: *code,
        message: Some(format!(
            "{who} {reason} (on {topic}/{partition}{}); it stops and fails every pending \
             record. Build a new producer{}",
            message
                .as_deref()
                .map(|message| format!(": {message}"))
                .unwrap_or_default(),
            if name.is_some() {
                " with the same name to continue its sequences"
            } else {
                ""
            }
        )),
    })
}

/// Resolves a batch's records, gives its buffer back and lets flush know.
pub(crate) fn finish(
    shared: &Shared,
    id: u64,
    completion: &BatchCompletion,
    reserved_bytes: usize,
    outcome: BatchOutcome,
) {
    completion.complete(outcome);
    shared.release_buffer(reserved_bytes);
    shared.progress.finished(id);
}

type RequestFuture = Pin<Box<dyn Future<Output = RequestResult> + Send>>;

/// The requests awaiting their answer, polled in the order they were started.
#[derive(Default)]
struct InFlight {
    pending: Vec<RequestFuture>,
    /// Answers that came back on the first poll.
    ready: VecDeque<RequestResult>,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.ready.is_empty()
    }

    /// Polls the new request once, so its frame is queued before any later request's.
    async fn start(&mut self, mut future: RequestFuture) {
        let first = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(result) => self.ready.push_back(result),
            Poll::Pending => self.pending.push(future),
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<RequestResult> {
        if let Some(result) = self.ready.pop_front() {
            return Poll::Ready(result);
        }
        // In start order: an earlier request always gets to its next queue first.
        for index in 0..self.pending.len() {
            if let Poll::Ready(result) = self.pending[index].as_mut().poll(cx) {
                drop(self.pending.remove(index));
                return Poll::Ready(result);
            }
        }
        Poll::Pending
    }
}

/// A planned request after its frame was queued (or failed to be).
enum Queued {
    /// acks=none: nothing comes back.
    Sent(PlannedRequest, Result<()>),
    Waiting(PlannedRequest, Result<crate::connection::PendingResponse>),
}

/// Queues one planned request's frame on the connection, in call order.
async fn queue(client: &Client, mut planned: PlannedRequest) -> Queued {
    // The answer is matched by `entries`; the request itself is not needed again.
    let request = std::mem::take(&mut planned.request);
    if request.acks == Acks::None {
        let result = client.send_without_response(request).await;
        Queued::Sent(planned, result)
    } else {
        let result = client.enqueue(request).await;
        Queued::Waiting(planned, result)
    }
}

/// Awaits the answer to one queued request. An answer closes the client's circuit breaker:
/// without it, a producer's failures added up over its whole life until the breaker opened.
async fn execute(client: Client, queued: Queued, request_timeout: Duration) -> RequestResult {
    match queued {
        Queued::Sent(planned, result) => (planned, result.map(|()| None)),
        Queued::Waiting(planned, Err(error)) => (planned, Err(error)),
        Queued::Waiting(planned, Ok(pending)) => {
            let answer = tokio::time::timeout(request_timeout, pending.response())
                .await
                .unwrap_or_else(|_elapsed| {
                    Err(Error::Timeout {
                        timeout_ms: duration_ms(request_timeout),
                    })
                });
            // Failures count where they are seen, at enqueue (once per broken connection,
            // not once per request in flight on it).
            if answer.is_ok() {
                client.record_success();
            }
            let result = match answer {
                Ok(Response::Produce(response)) => Ok(Some(response)),
                Ok(other) => Err(unexpected_response("Produce", &other)),
                Err(error) => Err(error),
            };
            (planned, result)
        }
    }
}

/// The sender task: runs until the producer is closed and everything is delivered or failed,
/// or until the producer fails.
pub(crate) async fn run(shared: Arc<Shared>, mut state: SenderState) {
    let mut in_flight = InFlight::default();
    loop {
        let now = Instant::now();
        let (drained, deadline, finished) = {
            let mut accumulator = shared.lock_accumulator_for_sender();
            for batch in accumulator.expire(now) {
                let error = Arc::new(Error::Timeout {
                    timeout_ms: duration_ms(state.options.delivery_timeout),
                });
                finish(
                    &shared,
                    batch.id,
                    &batch.completion,
                    batch.reserved_bytes,
                    Err(error),
                );
            }
            state.expire(&shared, now);
            if let Some(fatal) = state.take_new_fatal() {
                for batch in accumulator.fail(Arc::clone(&fatal)) {
                    finish(
                        &shared,
                        batch.id,
                        &batch.completion,
                        batch.reserved_bytes,
                        Err(Arc::clone(&fatal)),
                    );
                }
                state.fail_all(&shared, &fatal);
                shared.buffer.close();
                return;
            }
            let drained = state.drain(&mut accumulator, now);
            // Idle, the sender has no resends either: nothing to plan.
            let finished = accumulator.is_closed()
                && accumulator.is_empty()
                && state.is_idle()
                && in_flight.is_empty()
                && drained.is_empty();
            let deadline = [accumulator.next_deadline(now), state.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            (drained, deadline, finished)
        };
        if finished {
            return;
        }
        let planned = state.plan(drained, now);
        if in_flight.is_empty() && state.epoch_bump_due(now) {
            state.bump_epoch(&shared.client).await;
            continue;
        }
        for request in planned {
            // Queue each request's frame before building the next one's future, so a
            // partition's batches reach the broker in sequence order whatever the connection's
            // queues do (waiting for a slot, a full write queue, the task's poll budget).
            let queued = queue(&shared.client, request).await;
            let future = Box::pin(execute(
                shared.client.clone(),
                queued,
                state.options.request_timeout,
            ));
            in_flight.start(future).await;
        }
        let sleep = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            result = poll_fn(|cx| in_flight.poll_next(cx)), if !in_flight.is_empty() => {
                state.handle(&shared, result, Instant::now());
            }
            () = shared.wake.notified() => {}
            () = sleep => {}
        }
    }
}

#[cfg(test)]
#[path = "sender_test.rs"]
mod tests;
