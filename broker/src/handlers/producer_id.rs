//! InitProducerId: an id and epoch for an idempotent producer (rules in [`crate::producers`]).
//!
//! Without a name: a fresh id at epoch 0; a running producer asking for a new one (it says
//! which id it holds: a batch's outcome was unknown) has its old id fenced on every partition,
//! so a copy of its batch still on its way is refused rather than appended after the new id's
//! batches (see [`crate::producers::ProducerRegistry::fence_unnamed`]). With a name: the
//! name's id with its epoch bumped
//! and persisted; then the new epoch is pushed into every partition that holds state for the
//! id, which fences older instances there and reports where each partition's sequence
//! continues. The epoch is visible to every partition's check before the first of them is
//! visited, so a batch of an older instance is either counted in the reported sequences or
//! fenced, never both missed.
//!
//! Reserving ids and writing the names table fsync files: the work runs off the async
//! runtime.

use std::sync::Arc;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, PartitionSequence, TopicSequences,
};

use super::Outcome;
use crate::BrokerState;

fn failed(error_code: ErrorCode) -> InitProducerIdResponse {
    InitProducerIdResponse {
        error_code,
        producer_id: sluice_protocol::batch::NO_PRODUCER_ID,
        producer_epoch: sluice_protocol::batch::NO_PRODUCER_EPOCH,
        sequences: Vec::new(),
    }
}

pub fn init_producer_id(state: &Arc<BrokerState>, request: InitProducerIdRequest) -> Outcome {
    let state = Arc::clone(state);
    Outcome::Later(Box::pin(async move {
        tokio::task::spawn_blocking(move || init(&state, request))
            .await
            .unwrap_or_else(|_| failed(ErrorCode::UnknownServerError))
            .into()
    }))
}

fn init(state: &BrokerState, request: InitProducerIdRequest) -> InitProducerIdResponse {
    let registry = &state.producers;
    let allocated = match &request.producer_name {
        None => registry.allocate_id().map(|id| (id, 0)),
        Some(name) => registry.init_named(
            name,
            request
                .current
                .map(|current| (current.producer_id, current.producer_epoch)),
        ),
    };
    let (producer_id, producer_epoch) = match allocated {
        Ok(allocated) => allocated,
        Err(error) => {
            tracing::warn!(producer = ?request.producer_name, %error, "InitProducerId failed");
            return failed(error.code);
        }
    };
    if request.producer_name.is_none()
        && let Some(current) = &request.current
    {
        registry.fence_unnamed(current.producer_id);
    }
    // A fresh id has no state anywhere: nothing to fence, every sequence starts at 0.
    let sequences = match request.producer_name {
        None => Vec::new(),
        Some(_) => fence_everywhere(state, producer_id, producer_epoch),
    };
    tracing::debug!(producer = ?request.producer_name, producer_id, producer_epoch, "InitProducerId");
    InitProducerIdResponse {
        error_code: ErrorCode::None,
        producer_id,
        producer_epoch,
        sequences,
    }
}

/// Raises the producer's epoch on every partition that knows it; returns where each of them
/// continues.
fn fence_everywhere(
    state: &BrokerState,
    producer_id: u64,
    producer_epoch: u16,
) -> Vec<TopicSequences> {
    let mut sequences = Vec::new();
    for topic in state.topics.list() {
        let partitions: Vec<PartitionSequence> = topic
            .partitions
            .iter()
            .enumerate()
            .filter_map(|(partition, log)| {
                let next_sequence = log.fence_producer(producer_id, producer_epoch)?;
                Some(PartitionSequence {
                    partition: u32::try_from(partition).ok()?,
                    next_sequence,
                })
            })
            .collect();
        if !partitions.is_empty() {
            sequences.push(TopicSequences {
                topic: topic.name.clone(),
                partitions,
            });
        }
    }
    sequences
}
