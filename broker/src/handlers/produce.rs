//! Produce: validate each partition's batch, append it in arrival order, answer per acks.
//!
//! The append happens here, synchronously, before the connection reads its next request, so
//! batches a connection sends to one partition land in the order they were sent. The batch
//! bytes are a slice of the request frame: validated, stamped in place and written as they are.
//! Only `acks=durable` waits, and it waits in the returned future (group commit in storage).
//!
//! A batch with a producer id goes through the idempotent path ([`crate::producers`]): its
//! sequence is checked in the same critical section as the append, and a retry of a batch
//! already in the log is answered with the original's offsets (error code `None`), waiting
//! under `acks=durable` for the original to be fsynced.

use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::batch::ATTRIBUTE_LOG_APPEND_TIME;
use sluice_protocol::messages::{
    Acks, ProducePartitionResponse, ProduceRequest, ProduceResponse, ProduceTopicResponse,
};
use sluice_protocol::{ErrorCode, RecordBatch};

use super::Outcome;
use crate::BrokerState;
use crate::storage::{AppendInfo, PartitionLog, StorageError};

fn result(
    partition: u32,
    error_code: ErrorCode,
    base_offset: u64,
    log_start_offset: u64,
    message: Option<String>,
) -> ProducePartitionResponse {
    ProducePartitionResponse {
        partition,
        error_code,
        base_offset,
        log_start_offset,
        error_message: message,
    }
}

fn failed(partition: u32, error_code: ErrorCode, message: String) -> ProducePartitionResponse {
    result(partition, error_code, 0, 0, Some(message))
}

/// Appends a batch from an idempotent producer: the broker-wide checks first (an id and epoch
/// this broker issued), then the partition's sequence check and the append, atomically.
fn append_idempotent(
    state: &BrokerState,
    log: &Arc<PartitionLog>,
    batch: RecordBatch,
) -> Result<AppendInfo, StorageError> {
    let view = batch.view();
    let producers = &state.producers;
    producers.check_issued(view.producer_id(), view.producer_epoch())?;
    let appended =
        log.append_idempotent(batch, &|producer_id| producers.current_epoch(producer_id))?;
    if appended.duplicate {
        tracing::debug!(dir = %log.dir().display(), base_offset = appended.info.base_offset, "duplicate batch answered with its original offsets");
    }
    Ok(appended.info)
}

pub fn produce(state: &Arc<BrokerState>, request: ProduceRequest) -> Outcome {
    let max_batch_bytes = state.config.limits.max_batch_bytes as usize;
    let mut waits: Vec<(usize, usize, Arc<PartitionLog>, u64)> = Vec::new();
    let mut topics = Vec::with_capacity(request.topics.len());
    for (topic_index, topic_request) in request.topics.into_iter().enumerate() {
        let topic = state
            .topics
            .get(&topic_request.name)
            .filter(|topic| !topic.internal);
        let mut partitions = Vec::with_capacity(topic_request.partitions.len());
        // Empty partitions cost a request 8 bytes each: the errors of a topic that does not
        // exist, or lists more partitions than a topic may have, carry one message (on the
        // first), not one per partition, and never echo the name (it can be 64 KiB).
        let listed = topic_request.partitions.len();
        let too_many = listed > state.config.limits.max_partitions_per_topic as usize;
        for (partition_index, partition) in topic_request.partitions.into_iter().enumerate() {
            let index = partition.partition;
            let once = |message: String| (partition_index == 0).then_some(message);
            if too_many {
                partitions.push(result(
                    index,
                    ErrorCode::InvalidRequest,
                    0,
                    0,
                    once(format!(
                        "{listed} partitions of one topic; a topic has at most {}",
                        state.config.limits.max_partitions_per_topic
                    )),
                ));
                continue;
            }
            let Some(topic) = &topic else {
                let message = once("unknown topic".to_owned());
                partitions.push(result(index, ErrorCode::UnknownTopic, 0, 0, message));
                continue;
            };
            let Some(log) = topic.partition(index) else {
                partitions.push(failed(
                    index,
                    ErrorCode::UnknownPartition,
                    format!("the topic has {} partitions", topic.partitions.len()),
                ));
                continue;
            };
            if partition.records.len() > max_batch_bytes {
                partitions.push(failed(
                    index,
                    ErrorCode::MessageTooLarge,
                    format!(
                        "batch of {} bytes is over max_batch_bytes {max_batch_bytes}",
                        partition.records.len()
                    ),
                ));
                continue;
            }
            let batch = match RecordBatch::new(partition.records)
                .and_then(|batch| batch.validate().map(|()| batch))
            {
                Ok(batch) => batch,
                Err(error) => {
                    partitions.push(failed(index, ErrorCode::CorruptMessage, error.to_string()));
                    continue;
                }
            };
            // The log-append-time bit says the broker stamped the timestamps; this broker keeps
            // the producer's, so a batch claiming otherwise would be stored saying something
            // untrue.
            if batch.view().attributes() & ATTRIBUTE_LOG_APPEND_TIME != 0 {
                partitions.push(failed(
                    index,
                    ErrorCode::InvalidRequest,
                    "the log-append-time attribute is the broker's to set, and this broker keeps \
                     the producer's timestamps"
                        .to_owned(),
                ));
                continue;
            }
            let appended = if batch.view().has_producer_id() {
                append_idempotent(state, log, batch)
            } else {
                log.append(batch)
            };
            match appended {
                Ok(info) => {
                    if request.acks == Acks::Durable {
                        waits.push((
                            topic_index,
                            partition_index,
                            Arc::clone(log),
                            info.last_offset + 1,
                        ));
                    }
                    partitions.push(result(
                        index,
                        ErrorCode::None,
                        info.base_offset,
                        info.log_start_offset,
                        None,
                    ));
                }
                Err(error) => partitions.push(failed(index, error.error_code(), error.to_string())),
            }
        }
        topics.push(ProduceTopicResponse {
            name: topic_request.name,
            partitions,
        });
    }
    let response = ProduceResponse { topics };
    match request.acks {
        Acks::None => Outcome::Silent,
        Acks::Leader => Outcome::Ready(response.into()),
        Acks::Durable if waits.is_empty() => Outcome::Ready(response.into()),
        Acks::Durable => {
            let timeout = Duration::from_millis(u64::from(request.timeout_ms.max(1)));
            let deadline = tokio::time::Instant::now() + timeout;
            Outcome::Later(Box::pin(async move {
                let mut response = response;
                // One deadline for the whole request, however many partitions it waits for.
                for (topic_index, partition_index, log, next_offset) in waits {
                    let outcome =
                        tokio::time::timeout_at(deadline, log.wait_durable(next_offset)).await;
                    let error = match outcome {
                        Ok(Ok(())) => continue,
                        Ok(Err(error)) => (error.error_code(), error.to_string()),
                        Err(_) => (
                            ErrorCode::RequestTimedOut,
                            format!("not durable within {} ms", timeout.as_millis()),
                        ),
                    };
                    let entry = &mut response.topics[topic_index].partitions[partition_index];
                    entry.error_code = error.0;
                    entry.error_message = Some(error.1);
                }
                response.into()
            }))
        }
    }
}
