//! ListOffsets: earliest, latest, or the first offset at or after a timestamp.

use std::sync::Arc;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    ListOffsetsPartitionResponse, ListOffsetsRequest, ListOffsetsResponse,
    ListOffsetsTopicResponse, OffsetSpec,
};

use crate::BrokerState;

/// A partition named twice in one request is looked up once: its repeats are answered
/// `InvalidRequest` (as Kafka does), so a request cannot make the broker read and decode a
/// batch from disk hundreds of thousands of times for one lookup.
pub fn list_offsets(state: &Arc<BrokerState>, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut seen = std::collections::HashSet::new();
    let topics = request
        .topics
        .into_iter()
        .map(|topic_request| {
            let topic = state.topics.get(&topic_request.name);
            let partitions = topic_request
                .partitions
                .into_iter()
                .map(|partition| {
                    let mut entry = ListOffsetsPartitionResponse {
                        partition: partition.partition,
                        error_code: ErrorCode::None,
                        offset: 0,
                        timestamp: -1,
                    };
                    let Some(topic) = &topic else {
                        entry.error_code = ErrorCode::UnknownTopic;
                        return entry;
                    };
                    if !seen.insert((topic.name.clone(), partition.partition)) {
                        entry.error_code = ErrorCode::InvalidRequest;
                        return entry;
                    }
                    let Some(log) = topic.partition(partition.partition) else {
                        entry.error_code = ErrorCode::UnknownPartition;
                        return entry;
                    };
                    match partition.spec {
                        OffsetSpec::Earliest => entry.offset = log.earliest_offset(),
                        OffsetSpec::Latest => entry.offset = log.latest_offset(),
                        OffsetSpec::Durable => entry.offset = log.durable_offset(),
                        OffsetSpec::Timestamp(timestamp_ms) => {
                            match log.offset_for_timestamp(timestamp_ms) {
                                Ok(Some((offset, timestamp))) => {
                                    entry.offset = offset;
                                    entry.timestamp = timestamp;
                                }
                                Ok(None) => entry.offset = log.latest_offset(),
                                Err(error) => entry.error_code = error.error_code(),
                            }
                        }
                    }
                    entry
                })
                .collect();
            ListOffsetsTopicResponse {
                name: topic_request.name,
                partitions,
            }
        })
        .collect();
    ListOffsetsResponse { topics }
}
