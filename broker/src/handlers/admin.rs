//! CreateTopics, DeleteTopics, ListTopics, DescribeTopic.

use std::sync::Arc;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    CreateTopicResult, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicResult,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeTopicRequest, DescribeTopicResponse,
    ListTopicsRequest, ListTopicsResponse, PartitionDescription, TopicListing,
};

use super::Outcome;
use crate::BrokerState;

/// Creating files and fsyncing them is blocking work: it runs off the async runtime.
pub fn create_topics(state: &Arc<BrokerState>, request: CreateTopicsRequest) -> Outcome {
    let state = Arc::clone(state);
    Outcome::Later(Box::pin(async move {
        let results = tokio::task::spawn_blocking(move || {
            request
                .topics
                .into_iter()
                .map(|topic| {
                    match state.topics.create(
                        &topic.name,
                        topic.partitions,
                        &topic.configs,
                        request.validate_only,
                    ) {
                        Ok(_) => CreateTopicResult {
                            name: topic.name,
                            error_code: ErrorCode::None,
                            error_message: None,
                        },
                        Err(error) => CreateTopicResult {
                            name: topic.name,
                            error_code: error.code,
                            error_message: Some(error.message),
                        },
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        CreateTopicsResponse { results }.into()
    }))
}

pub fn delete_topics(state: &Arc<BrokerState>, request: DeleteTopicsRequest) -> Outcome {
    let state = Arc::clone(state);
    Outcome::Later(Box::pin(async move {
        let blocking = Arc::clone(&state);
        let (results, forgotten) = tokio::task::spawn_blocking(move || {
            let state = blocking;
            let mut forgotten = None;
            let results = request
                .names
                .into_iter()
                .map(|name| {
                    let error_code = match name.starts_with("__") {
                        true => ErrorCode::PolicyViolation,
                        false => match state.topics.delete(&name) {
                            Ok(()) => {
                                // The topic's committed offsets go with it.
                                match state.groups.forget_topic(&name) {
                                    Ok(next) => forgotten = forgotten.max(next),
                                    Err(error) => tracing::error!(topic = %name, %error, "forgetting the deleted topic's committed offsets failed"),
                                }
                                ErrorCode::None
                            }
                            Err(error) => error.code,
                        },
                    };
                    DeleteTopicResult { name, error_code }
                })
                .collect();
            (results, forgotten)
        })
        .await
        .unwrap_or_default();
        // Answered once the commits' tombstones are durable: a crash cannot bring them back
        // for a topic created again under the name.
        if let Some(next_offset) = forgotten
            && let Err(error) = state.groups.offsets().wait_durable(next_offset).await
        {
            tracing::error!(%error, "the deleted topics' committed offsets may come back after a crash");
        }
        DeleteTopicsResponse { results }.into()
    }))
}

/// User topics only: internal ones (`__consumer_offsets`) are described by name on request.
pub fn list_topics(state: &Arc<BrokerState>, _request: ListTopicsRequest) -> ListTopicsResponse {
    ListTopicsResponse {
        topics: state
            .topics
            .list()
            .iter()
            .filter(|topic| !topic.internal)
            .map(|topic| TopicListing {
                name: topic.name.clone(),
                partitions: topic.partitions.len() as u32,
                internal: topic.internal,
            })
            .collect(),
    }
}

pub fn describe_topic(
    state: &Arc<BrokerState>,
    request: DescribeTopicRequest,
) -> DescribeTopicResponse {
    let Some(topic) = state.topics.get(&request.name) else {
        return DescribeTopicResponse {
            error_code: ErrorCode::UnknownTopic,
            name: request.name,
            partitions: Vec::new(),
            configs: Vec::new(),
        };
    };
    DescribeTopicResponse {
        error_code: ErrorCode::None,
        name: topic.name.clone(),
        partitions: topic
            .partitions
            .iter()
            .enumerate()
            .map(|(index, log)| PartitionDescription {
                partition: index as u32,
                error_code: if log.poison_reason().is_some() {
                    ErrorCode::StorageError
                } else {
                    ErrorCode::None
                },
                log_start_offset: log.earliest_offset(),
                high_watermark: log.latest_offset(),
                size_bytes: log.size_bytes(),
                segment_count: log.segment_count() as u32,
            })
            .collect(),
        configs: topic.config.entries(),
    }
}
