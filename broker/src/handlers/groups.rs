//! ConsumerGroupHeartbeat, LeaveGroup, CommitOffsets, FetchOffsets, DescribeGroup, ListGroups.

use std::sync::Arc;

use sluice_protocol::messages::{
    CommitOffsetsRequest, ConsumerGroupHeartbeatRequest, DescribeGroupRequest, FetchOffsetsRequest,
    LeaveGroupRequest,
};

use super::Outcome;
use crate::BrokerState;

pub fn heartbeat(state: &Arc<BrokerState>, request: ConsumerGroupHeartbeatRequest) -> Outcome {
    Outcome::Ready(state.groups.heartbeat(request, &state.topics).into())
}

pub fn leave(state: &Arc<BrokerState>, request: LeaveGroupRequest) -> Outcome {
    Outcome::Ready(state.groups.leave(request, &state.topics).into())
}

/// Commits are answered once durable: an acknowledged commit survives a crash.
pub fn commit(state: &Arc<BrokerState>, request: CommitOffsetsRequest) -> Outcome {
    let (response, pending) = state.groups.start_commit(request, &state.topics);
    match pending {
        None => Outcome::Ready(response.into()),
        Some(pending) => {
            let groups = Arc::clone(&state.groups);
            Outcome::Later(Box::pin(async move {
                groups.finish_commit(response, pending).await.into()
            }))
        }
    }
}

pub fn fetch_offsets(state: &Arc<BrokerState>, request: FetchOffsetsRequest) -> Outcome {
    Outcome::Ready(state.groups.fetch_offsets(request).into())
}

pub fn describe(state: &Arc<BrokerState>, request: DescribeGroupRequest) -> Outcome {
    Outcome::Ready(state.groups.describe(request, &state.topics).into())
}

pub fn list(state: &Arc<BrokerState>) -> Outcome {
    Outcome::Ready(state.groups.list().into())
}
