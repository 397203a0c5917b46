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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    FetchPartitionResponse, FetchRequest, FetchResponse, FetchTopicResponse,
};

use super::Outcome;
use crate::BrokerState;
use crate::fetch_budget::FetchBudgetPermit;
use crate::storage::PartitionLog;

/// Shortest time a fetch waits for budget, even with a shorter `max_wait_ms`: a moment's
/// contention should not turn a `max_wait_ms = 0` fetch away.
const BUDGET_MIN_WAIT: Duration = Duration::from_secs(1);

pub fn fetch(state: &Arc<BrokerState>, request: FetchRequest) -> Outcome {
    let state = Arc::clone(state);
    Outcome::LaterHolding(Box::pin(async move {
        let (response, budget) = fetch_with_wait(&state, request).await;
        (response.into(), budget)
    }))
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
    request: FetchRequest,
) -> (FetchResponse, Option<FetchBudgetPermit>) {
    let max_wait = Duration::from_millis(u64::from(
        request
            .max_wait_ms
            .min(state.config.limits.fetch_max_wait_ms),
    ));
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut names = Vec::with_capacity(request.topics.len());
    let mut targets = Vec::new();
    for (topic_index, topic_request) in request.topics.into_iter().enumerate() {
        let topic = state.topics.get(&topic_request.name);
        for partition in topic_request.partitions {
            let (log, error) = match &topic {
                None => (None, Some(ErrorCode::UnknownTopic)),
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
        names.push(topic_request.name);
    }
    let reservation_bytes = reservation_bytes(&targets, request.max_bytes);
    let nothing_to_wait_for = targets.iter().all(|target| target.log.is_none());
    loop {
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
        let max_bytes = request
            .max_bytes
            .min(u32::try_from(budget.bytes()).unwrap_or(u32::MAX));
        let (response, total_bytes, any_error) = read_once(&names, &targets, max_bytes);
        let now = tokio::time::Instant::now();
        if total_bytes >= u64::from(request.min_bytes.max(1))
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
        // Wait for any partition's high watermark to pass its fetch offset.
        let waits: Vec<_> = targets
            .iter()
            .filter_map(|target| {
                let log = target.log.as_ref()?;
                Some(Box::pin(
                    log.high_watermark().wait_beyond(target.fetch_offset),
                ))
            })
            .collect();
        let mut shutdown = state.shutdown_receiver();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => {}
            _ = select_all(waits) => {}
        }
    }
}

/// Budget one read pass reserves: what the response may hold (`max_bytes`, or less when the
/// partitions' own limits add up to less), or the largest batch the partitions accept when
/// that is more, since the first batch found is returned whole.
fn reservation_bytes(targets: &[Target], max_bytes: u32) -> u64 {
    let readable = || targets.iter().filter(|target| target.log.is_some());
    let partitions_bytes: u64 = readable()
        .map(|target| u64::from(target.partition_max_bytes))
        .sum();
    let largest_batch_bytes = readable()
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

/// One pass over the partitions. Returns the response, the record bytes in it, and whether a
/// partition failed (which answers at once).
fn read_once(names: &[String], targets: &[Target], max_bytes: u32) -> (FetchResponse, u64, bool) {
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
