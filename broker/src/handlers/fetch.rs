//! Fetch with long polling.
//!
//! Reads every requested partition; when fewer than `min_bytes` came back, waits until a
//! produce lands on any of them (the high watermark's notification) or `max_wait_ms` passes
//! (capped by `limits.fetch_max_wait_ms`), then reads again. `max_bytes` bounds the response,
//! except that the first batch found is always returned whole, so a consumer never gets stuck
//! behind a batch larger than its limit.
//!
//! Each read pass first reserves its share of the broker-wide fetch budget
//! (`limits.fetch_response_budget_bytes`, see [`crate::fetch_budget`]) and reads no more than
//! it reserved; what the response holds stays reserved until the connection has written it. A
//! pass that finds too little data gives its reservation back before it waits. A fetch that
//! cannot get budget in time is answered without records, its partitions `Throttled`.
//!
//! A fetch that returned records starts reading the connection's likely next fetch (the same
//! request from where this one ended) while its answer goes out; see [`ReadAhead`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use sluice_protocol::ErrorCode;
use sluice_protocol::batch::split_batches;
use sluice_protocol::messages::{
    FetchPartitionResponse, FetchRequest, FetchResponse, FetchTopicResponse,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Outcome;
use crate::BrokerState;
use crate::fetch_budget::FetchBudgetPermit;
use crate::storage::PartitionLog;
use crate::storage::signal::{Appended, HighWatermark};

/// Shortest time a fetch waits for budget, even with a shorter `max_wait_ms`: a moment's
/// contention should not turn a `max_wait_ms = 0` fetch away.
const BUDGET_MIN_WAIT: Duration = Duration::from_secs(1);

pub fn fetch(
    state: &Arc<BrokerState>,
    request: FetchRequest,
    read_ahead: &Arc<ReadAhead>,
) -> Outcome {
    let state = Arc::clone(state);
    let ahead = read_ahead.take_for(&request);
    let read_ahead = Arc::clone(read_ahead);
    Outcome::LaterHolding(Box::pin(async move {
        let read = match ahead {
            Some(reading) => reading.await.ok().flatten(),
            None => None,
        };
        let read = read.and_then(|mut read| {
            refresh_offsets(&state, &mut read.response, &read.logs)
                .then_some((read.response, read.budget))
        });
        let (response, budget) = match read {
            Some((response, budget)) => {
                state.metrics.count_read_ahead_answer();
                (response, Some(budget))
            }
            None => fetch_with_wait(&state, &request).await,
        };
        if let Some(next) = next_fetch(&request, &response) {
            read_ahead.start(&state, next);
        }
        (response.into(), budget)
    }))
}

/// A connection's fetch read ahead: the request its consumer will send next if it goes on
/// reading, and the read of it, under way or done. A consumer catching up fetches, checks what
/// came and fetches again from where it ended; reading that next answer while the last one is
/// on its way to the consumer keeps the broker's reads off the consumer's path. A read ahead
/// takes only fetch budget that is free at once, and holds it until the fetch it was read for
/// takes it, until a request that differs in anything (a seek, other partitions, other limits)
/// replaces it, or for `limits.fetch_read_ahead_ms` at most (0: nothing is read ahead); that
/// fetch then reads for itself.
#[derive(Debug, Default)]
pub struct ReadAhead {
    next: Mutex<Option<Reading>>,
}

/// One read ahead: what it was read for, its task, and the signal that the fetch came.
#[derive(Debug)]
struct Reading {
    request: FetchRequest,
    task: JoinHandle<Option<ReadAheadOf>>,
    claimed: Arc<Notify>,
}

/// A read ahead's answer, the budget its bytes hold, and the logs it read (in the request's
/// order; `None` for a partition that had none).
#[derive(Debug)]
struct ReadAheadOf {
    response: FetchResponse,
    budget: FetchBudgetPermit,
    logs: Vec<Option<Arc<PartitionLog>>>,
}

impl ReadAhead {
    /// The read ahead of `request`, if the last one read ahead was exactly it; any other is
    /// dropped, and its budget with it.
    fn take_for(&self, request: &FetchRequest) -> Option<JoinHandle<Option<ReadAheadOf>>> {
        let reading = self.lock().take()?;
        if reading.request == *request {
            reading.claimed.notify_one();
            Some(reading.task)
        } else {
            reading.task.abort();
            None
        }
    }

    /// Starts reading `request` ahead, in place of any earlier read ahead.
    fn start(&self, state: &Arc<BrokerState>, request: FetchRequest) {
        let hold = Duration::from_millis(state.config.limits.fetch_read_ahead_ms);
        if hold.is_zero() {
            return;
        }
        let state = Arc::clone(state);
        let claimed = Arc::new(Notify::new());
        let reading = Reading {
            request: request.clone(),
            claimed: Arc::clone(&claimed),
            task: tokio::spawn(async move {
                let read = read_now(&state, &request)?;
                tokio::select! {
                    () = claimed.notified() => Some(read),
                    () = tokio::time::sleep(hold) => None,
                }
            }),
        };
        if let Some(earlier) = self.lock().replace(reading) {
            earlier.task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Reading>> {
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for ReadAhead {
    /// A closed connection's read ahead gives its budget back now.
    fn drop(&mut self) {
        if let Some(reading) = self.lock().take() {
            reading.task.abort();
        }
    }
}

/// Sets each partition's high watermark and log start offset of an answer read ahead to what
/// they are now: the records were read a moment ago, the offsets say where the log is. False,
/// and the answer must not be served, when a partition's log is not the one read (`read`, in
/// the answer's order): its topic was deleted since, perhaps created again under its name.
fn refresh_offsets(
    state: &BrokerState,
    response: &mut FetchResponse,
    read: &[Option<Arc<PartitionLog>>],
) -> bool {
    let mut read = read.iter();
    for topic in &mut response.topics {
        let logs = state.topics.get(&topic.name);
        for partition in &mut topic.partitions {
            let now = logs
                .as_ref()
                .and_then(|logs| logs.partition(partition.partition));
            match (now, read.next()) {
                (Some(now), Some(Some(read))) if Arc::ptr_eq(now, read) && !now.is_closing() => {
                    let log_start_offset = now.earliest_offset();
                    // Retention may have removed what was read since: the fetch reads for
                    // itself, and finds its offset out of range.
                    let first = split_batches(&partition.records)
                        .next()
                        .and_then(Result::ok)
                        .map(|batch| batch.base_offset());
                    if first.is_some_and(|first| first < log_start_offset) {
                        return false;
                    }
                    partition.high_watermark = now.latest_offset();
                    partition.log_start_offset = log_start_offset;
                }
                (None, Some(None)) => {}
                _ => return false,
            }
        }
    }
    read.next().is_none()
}

/// The fetch a consumer sends next if it goes on reading: the same request, each partition
/// that returned records asked from the offset after its last one. `None` unless some partition
/// has records past what this answer returned: a consumer at the end of the log waits in a long
/// poll instead, and reading ahead there would only find nothing.
fn next_fetch(request: &FetchRequest, response: &FetchResponse) -> Option<FetchRequest> {
    let mut next = request.clone();
    let mut advanced = false;
    for (topic, answered) in next.topics.iter_mut().zip(&response.topics) {
        // An answer trimmed to fit its frame leaves whole topics out: the answer's topics no
        // longer line up with the request's, and no offset may move to another topic.
        if topic.name != answered.name {
            return None;
        }
        for (partition, answer) in topic.partitions.iter_mut().zip(&answered.partitions) {
            if answer.error_code != ErrorCode::None || answer.partition != partition.partition {
                continue;
            }
            let end = split_batches(&answer.records)
                .map_while(Result::ok)
                .last()
                .map(|batch| batch.last_offset() + 1);
            if let Some(end) = end.filter(|end| *end > partition.fetch_offset) {
                partition.fetch_offset = end;
                advanced |= end < answer.high_watermark;
            }
        }
    }
    advanced.then_some(next)
}

/// Reads `request` once, now: no waiting for data nor for budget. `None` when the budget is
/// not free, a partition fails, or fewer than `min_bytes` came back; the fetch that finds
/// nothing read ahead then reads for itself.
fn read_now(state: &Arc<BrokerState>, request: &FetchRequest) -> Option<ReadAheadOf> {
    let (names, targets) = resolve(state, request);
    let request_max_bytes = frame_max_bytes(state, &names, &targets, request.max_bytes);
    let mut budget = state
        .fetch_budget
        .try_acquire(reservation_bytes(&targets, request_max_bytes))?;
    let max_bytes = request_max_bytes.min(u32::try_from(budget.bytes()).unwrap_or(u32::MAX));
    let (response, total_bytes, any_error) = read_once(state, &names, &targets, max_bytes);
    if any_error || total_bytes < wanted_bytes(request, &targets, max_bytes) {
        return None;
    }
    budget.shrink_to(usize::try_from(total_bytes).unwrap_or(usize::MAX));
    let logs = targets.into_iter().map(|target| target.log).collect();
    Some(ReadAheadOf {
        response,
        budget,
        logs,
    })
}

/// The partitions of a request, resolved once.
struct Target {
    topic_index: usize,
    partition: u32,
    fetch_offset: u64,
    partition_max_bytes: u32,
    log: Option<Arc<PartitionLog>>,
    /// Set when the partition cannot be read at all.
    error: Option<ErrorCode>,
}

async fn fetch_with_wait(
    state: &Arc<BrokerState>,
    request: &FetchRequest,
) -> (FetchResponse, Option<FetchBudgetPermit>) {
    let max_wait = Duration::from_millis(u64::from(
        request
            .max_wait_ms
            .min(state.config.limits.fetch_max_wait_ms),
    ));
    let deadline = tokio::time::Instant::now() + max_wait;
    let (mut names, mut targets) = resolve(state, request);
    loop {
        let request_max_bytes = frame_max_bytes(state, &names, &targets, request.max_bytes);
        let reservation_bytes = reservation_bytes(&targets, request_max_bytes);
        // A closed log (its topic deleted) never moves on: waiting on it would wake at once,
        // again and again, until the deadline.
        let nothing_to_wait_for = targets.iter().all(|target| {
            target
                .log
                .as_ref()
                .is_none_or(|log| log.high_watermark().is_closed())
        });
        let budget_deadline = deadline.max(tokio::time::Instant::now() + BUDGET_MIN_WAIT);
        let Some(mut budget) = state
            .fetch_budget
            .acquire(reservation_bytes, budget_deadline)
            .await
        else {
            tracing::debug!(
                reservation_bytes,
                "fetch throttled: no fetch response budget free in time"
            );
            return (throttled(&names, &targets), None);
        };
        let max_bytes = request_max_bytes.min(u32::try_from(budget.bytes()).unwrap_or(u32::MAX));
        // Each partition's high watermark before it is read, with its log's appended bytes: a
        // fetch that found too little waits for it to move on from here (what was read
        // included at least this much), and counts what was appended since from the bytes.
        let seen = appended(&targets, HighWatermark::appended_at_most);
        let (response, total_bytes, any_error) = read_once(state, &names, &targets, max_bytes);
        // A log closed before or during the read (its topic deleted, perhaps created again
        // under the name: a closed segment is reopened by its path, which the new topic's
        // files may hold by now) is resolved again and read again, so the answer says what is
        // there now.
        // (A log closing at shutdown is still the one resolved: that read stands.)
        if targets
            .iter()
            .any(|target| target.log.as_ref().is_some_and(|log| log.is_closing()))
        {
            let (now_names, now_targets) = resolve(state, request);
            let moved =
                now_targets
                    .iter()
                    .zip(&targets)
                    .any(|(now, read)| match (&now.log, &read.log) {
                        (Some(now), Some(read)) => !Arc::ptr_eq(now, read),
                        (None, None) => false,
                        _ => true,
                    });
            if moved {
                drop(budget);
                (names, targets) = (now_names, now_targets);
                continue;
            }
        }
        let now = tokio::time::Instant::now();
        let wanted = wanted_bytes(request, &targets, max_bytes);
        if total_bytes >= wanted
            || any_error
            || now >= deadline
            || state.is_shutting_down()
            || nothing_to_wait_for
        {
            budget.shrink_to(usize::try_from(total_bytes).unwrap_or(usize::MAX));
            return (response, Some(budget));
        }
        // Nothing is held while waiting for data.
        drop(budget);
        if wait_for_more(state, &targets, &seen, total_bytes, wanted, deadline).await {
            // A topic was deleted under the wait: its names are resolved again, so the answer
            // says so (or reads the topic created again under the name).
            (names, targets) = resolve(state, request);
        }
    }
}

/// Waits until the partitions' logs have appended enough since `seen` (their pairs before a
/// read that found `total_bytes` of the `wanted`) that a read again may find `wanted`, or the
/// deadline or shutdown comes. True when a log was closed under the wait.
///
/// Each append wakes the wait, and only the appended bytes are counted then, not read: a fetch
/// with a `min_bytes` of a MiB over small produces would otherwise read and checksum all it
/// has found again at every append. The count may be over what a read finds (bytes past a
/// partition's limit, or published after the pair a read started from), which costs a read;
/// never under: the pair taken before the read has no more bytes than its watermark's
/// (`appended_at_most`), and the pair after a wake-up is read whole, under the watermark's
/// lock (`appended`).
async fn wait_for_more(
    state: &BrokerState,
    targets: &[Target],
    seen: &[Appended],
    total_bytes: u64,
    wanted: u64,
    deadline: tokio::time::Instant,
) -> bool {
    // Where each partition's watermark stood at the read: with some data but less than
    // `min_bytes`, the fetch offset is already passed, and waiting on it alone would wake at
    // once until `max_wait`.
    let beyond_of = |pairs: &[Appended]| -> Vec<u64> {
        targets
            .iter()
            .zip(pairs)
            .map(|(target, pair)| target.fetch_offset.max(pair.next_offset))
            .collect()
    };
    let mut beyond = beyond_of(seen);
    let mut shutdown = state.shutdown_receiver();
    loop {
        // The watermark is the next offset to be written: beyond `seen` means a record at
        // `seen` was published since.
        let waits: Vec<_> = targets
            .iter()
            .zip(&beyond)
            .filter_map(|(target, beyond)| {
                let log = target.log.as_ref()?;
                Some(Box::pin(log.high_watermark().wait_beyond(*beyond)))
            })
            .collect();
        if waits.is_empty() {
            // No log to wait on: the read again answers at the deadline.
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.wait_for(|stopping| *stopping) => {}
            }
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return false,
            _ = shutdown.wait_for(|stopping| *stopping) => return false,
            (woken, _, _) = select_all(waits) => if woken.is_err() {
                return true;
            },
        }
        let now = appended(targets, HighWatermark::appended);
        let appended: u64 = seen
            .iter()
            .zip(&now)
            .map(|(seen, now)| now.bytes.saturating_sub(seen.bytes))
            .sum();
        if total_bytes.saturating_add(appended) >= wanted {
            return false;
        }
        beyond = beyond_of(&now);
    }
}

/// Each target's watermark paired with its log's appended bytes, as `pair` reads them (zeros
/// for a target without a log).
fn appended(targets: &[Target], pair: fn(&HighWatermark) -> Appended) -> Vec<Appended> {
    targets
        .iter()
        .map(|target| {
            target
                .log
                .as_ref()
                .map_or(Appended::default(), |log| pair(log.high_watermark()))
        })
        .collect()
}

/// The topic names of a request and its partitions, resolved once.
///
/// A partition named twice in one request is read once: its repeats are answered
/// `InvalidRequest` without a read (a request could otherwise list one partition hundreds of
/// thousands of times and have the broker read and checksum its first batch each time).
fn resolve(state: &BrokerState, request: &FetchRequest) -> (Vec<String>, Vec<Target>) {
    let mut names = Vec::with_capacity(request.topics.len());
    let mut targets = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (topic_index, topic_request) in request.topics.iter().enumerate() {
        let topic = state.topics.get(&topic_request.name);
        for partition in &topic_request.partitions {
            let first = seen.insert((topic_request.name.as_str(), partition.partition));
            let (log, error) = match &topic {
                None => (None, Some(ErrorCode::UnknownTopic)),
                Some(_) if !first => (None, Some(ErrorCode::InvalidRequest)),
                Some(topic) => match topic.partition(partition.partition) {
                    Some(log) => (Some(Arc::clone(log)), None),
                    None => (None, Some(ErrorCode::UnknownPartition)),
                },
            };
            targets.push(Target {
                topic_index,
                partition: partition.partition,
                fetch_offset: partition.fetch_offset,
                partition_max_bytes: partition.partition_max_bytes,
                log,
                error,
            });
        }
        names.push(topic_request.name.clone());
    }
    (names, targets)
}

/// A request's `max_bytes`, less when its answer would not fit in a frame of
/// `limits.max_frame_bytes` with its headers (a client refuses a larger frame and drops the
/// connection).
fn frame_max_bytes(
    state: &BrokerState,
    names: &[String],
    targets: &[Target],
    max_bytes: u32,
) -> u32 {
    // One pass over the targets: a request may name hundreds of thousands of topics, and
    // counting each topic's partitions by scanning every target was topics × partitions
    // steps (minutes of a worker for one 8 MiB request).
    let mut partitions = vec![0usize; names.len()];
    for target in targets {
        if let Some(count) = partitions.get_mut(target.topic_index) {
            *count += 1;
        }
    }
    let overhead = FetchResponse::overhead_bytes(
        names
            .iter()
            .zip(partitions)
            .map(|(name, partitions)| (name.as_str(), partitions)),
    );
    let room = u64::from(state.config.limits.max_frame_bytes).saturating_sub(overhead);
    max_bytes
        .min(u32::try_from(room).unwrap_or(u32::MAX))
        .max(1)
}

/// Bytes a fetch waits for: its `min_bytes` (at least 1), but never more than it may be
/// answered with, its `max_bytes` (as the frame and the budget cut it) and its readable
/// partitions' limits together. A fetch wanting more could never have it, and would read
/// everything again at every append to its partitions until its wait ran out.
fn wanted_bytes(request: &FetchRequest, targets: &[Target], max_bytes: u32) -> u64 {
    u64::from(request.min_bytes)
        .min(u64::from(max_bytes))
        .min(readable_partitions_bytes(targets))
        .max(1)
}

/// The readable partitions' `partition_max_bytes` together.
fn readable_partitions_bytes(targets: &[Target]) -> u64 {
    targets
        .iter()
        .filter(|target| target.log.is_some())
        .map(|target| u64::from(target.partition_max_bytes))
        .sum()
}

/// Budget one read pass reserves: what the response may hold (`max_bytes`, or less when the
/// partitions' own limits add up to less), or the largest batch the partitions accept when
/// that is more, since the first batch found is returned whole.
fn reservation_bytes(targets: &[Target], max_bytes: u32) -> u64 {
    let partitions_bytes = readable_partitions_bytes(targets);
    let largest_batch_bytes = targets
        .iter()
        .filter_map(|target| target.log.as_ref())
        .map(|log| log.config().max_message_bytes)
        .max()
        .unwrap_or(0);
    u64::from(max_bytes)
        .min(partitions_bytes)
        .max(largest_batch_bytes)
        .max(1)
}

/// The answer when no budget could be had: no records, every readable partition `Throttled`
/// (retriable), with its offsets so the consumer still learns where the log is.
fn throttled(names: &[String], targets: &[Target]) -> FetchResponse {
    let mut topics: Vec<FetchTopicResponse> = names
        .iter()
        .map(|name| FetchTopicResponse {
            name: name.clone(),
            partitions: Vec::new(),
        })
        .collect();
    for target in targets {
        let (high_watermark, log_start_offset) = target
            .log
            .as_ref()
            .map_or((0, 0), |log| (log.latest_offset(), log.earliest_offset()));
        if let Some(topic) = topics.get_mut(target.topic_index) {
            topic.partitions.push(FetchPartitionResponse {
                partition: target.partition,
                error_code: target.error.unwrap_or(ErrorCode::Throttled),
                high_watermark,
                log_start_offset,
                records: Bytes::new(),
            });
        }
    }
    FetchResponse { topics }
}

/// One pass over the partitions, its answer made to fit in a frame. Returns the response, the
/// record bytes in it, and whether a partition failed (which answers at once).
///
/// The first batch found is served whole, even past `max_bytes` (a consumer must get past
/// it). Beside the entries of many other partitions it may not fit in `max_frame_bytes`; the
/// answer would then be `MessageTooLarge`, to the same fetch every time, and the consumer
/// stuck for good. It carries that partition (and any partition's error) alone instead: the
/// others are asked for again.
fn read_once(
    state: &BrokerState,
    names: &[String],
    targets: &[Target],
    max_bytes: u32,
) -> (FetchResponse, u64, bool) {
    state.metrics.count_fetch_read();
    let (mut response, total_bytes, any_error) = read_partitions(names, targets, max_bytes);
    let overhead = FetchResponse::overhead_bytes(
        response
            .topics
            .iter()
            .map(|topic| (topic.name.as_str(), topic.partitions.len())),
    );
    if total_bytes + overhead > u64::from(state.config.limits.max_frame_bytes) {
        // Errors stay too (a few bytes each): a partition's error must not hide behind the
        // large batch of another, fetch after fetch.
        response.topics.retain_mut(|topic| {
            topic.partitions.retain(|partition| {
                !partition.records.is_empty() || partition.error_code != ErrorCode::None
            });
            !topic.partitions.is_empty()
        });
    }
    (response, total_bytes, any_error)
}

fn read_partitions(
    names: &[String],
    targets: &[Target],
    max_bytes: u32,
) -> (FetchResponse, u64, bool) {
    let mut topics: Vec<FetchTopicResponse> = names
        .iter()
        .map(|name| FetchTopicResponse {
            name: name.clone(),
            partitions: Vec::new(),
        })
        .collect();
    let mut remaining = u64::from(max_bytes);
    let mut total = 0u64;
    let mut any_error = false;
    for target in targets {
        let mut entry = FetchPartitionResponse {
            partition: target.partition,
            error_code: target.error.unwrap_or(ErrorCode::None),
            high_watermark: 0,
            log_start_offset: 0,
            records: Bytes::new(),
        };
        if let Some(log) = &target.log {
            entry.high_watermark = log.latest_offset();
            entry.log_start_offset = log.earliest_offset();
            // After the first batch, the budget is a hard limit.
            let limit = u64::from(target.partition_max_bytes).min(remaining);
            if total == 0 || limit > 0 {
                match log.read(target.fetch_offset, limit as usize) {
                    Ok(read) => {
                        entry.high_watermark = read.high_watermark;
                        entry.log_start_offset = read.log_start_offset;
                        let size = read.records.len() as u64;
                        if total > 0 && size > limit {
                            // Over the budget and not the first: leave it for the next fetch.
                        } else {
                            total += size;
                            remaining = remaining.saturating_sub(size);
                            entry.records = read.records;
                        }
                    }
                    Err(error) => {
                        entry.error_code = error.error_code();
                        any_error = true;
                    }
                }
            }
        } else {
            any_error = true;
        }
        if let Some(topic) = topics.get_mut(target.topic_index) {
            topic.partitions.push(entry);
        }
    }
    (FetchResponse { topics }, total, any_error)
}
