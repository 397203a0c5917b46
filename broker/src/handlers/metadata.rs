//! ApiVersions and Metadata.

use std::sync::Arc;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, BrokerMetadata, MetadataRequest, MetadataResponse,
    PartitionMetadata, TopicMetadata,
};

use crate::BrokerState;
use crate::topics::Topic;

/// The node id of this (single) broker.
pub const NODE_ID: u32 = 0;

pub fn api_versions(_request: ApiVersionsRequest) -> ApiVersionsResponse {
    ApiVersionsResponse::supported()
}

fn describe(topic: &Topic) -> TopicMetadata {
    TopicMetadata {
        error_code: ErrorCode::None,
        name: topic.name.clone(),
        internal: topic.internal,
        partitions: (0..topic.partitions.len() as u32)
            .map(|partition| PartitionMetadata {
                partition,
                error_code: ErrorCode::None,
                leader_id: NODE_ID,
            })
            .collect(),
    }
}

pub fn metadata(state: &Arc<BrokerState>, request: MetadataRequest) -> MetadataResponse {
    let topics = match request.topics {
        // "Every topic" means every user topic; internal ones are listed by name.
        None => state
            .topics
            .list()
            .iter()
            .filter(|topic| !topic.internal)
            .map(|topic| describe(topic))
            .collect(),
        // A name asked for twice is answered once: a request naming one topic of a thousand
        // partitions a million times would otherwise build gigabytes of answer.
        Some(mut names) => {
            let mut seen = std::collections::HashSet::with_capacity(names.len());
            names.retain(|name| seen.insert(name.clone()));
            names
                .into_iter()
                .map(|name| match state.topics.get(&name) {
                    Some(topic) => describe(&topic),
                    None => TopicMetadata {
                        error_code: ErrorCode::UnknownTopic,
                        name,
                        internal: false,
                        partitions: Vec::new(),
                    },
                })
                .collect()
        }
    };
    MetadataResponse {
        brokers: vec![BrokerMetadata {
            node_id: NODE_ID,
            host: state.tcp_addr.ip().to_string(),
            port: state.tcp_addr.port(),
        }],
        topics,
    }
}
