//! Fetch with long polling.
//!
//! Reads every requested partition; when fewer than `min_bytes` came back, waits until a
//! produce lands on any of them (the high watermark's notification) or `max_wait_ms` passes
//! (capped by `limits.fetch_max_wait_ms`), then reads again. `max_bytes` bounds the response,
//! except that the first batch found is always returned whole, so a consumer never gets stuck
//! behind a batch larger than its limit.

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
use crate::storage::PartitionLog;

pub fn fetch(state: &Arc<BrokerState>, request: FetchRequest) -> Outcome {
    let state = Arc::clone(state);
    Outcome::Later(Box::pin(async move {
        fetch_with_wait(&state, request).await.into()
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

async fn fetch_with_wait(state: &Arc<BrokerState>, request: FetchRequest) -> FetchResponse {
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
    loop {
        let (response, total_bytes, any_error) = read_once(&names, &targets, request.max_bytes);
        let now = tokio::time::Instant::now();
        if total_bytes >= u64::from(request.min_bytes.max(1))
            || any_error
            || now >= deadline
            || state.is_shutting_down()
        {
            return response;
        }
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
        if waits.is_empty() {
            return response;
        }
        let mut shutdown = state.shutdown_receiver();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return response,
            _ = shutdown.changed() => return response,
            _ = select_all(waits) => {}
        }
    }
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
