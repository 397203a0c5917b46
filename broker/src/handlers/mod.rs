//! Request handlers, one file per api, dispatched in one `match`.
//!
//! A handler returns an [`Outcome`]. Work that must happen in arrival order (appending to a
//! partition) runs inside `handle`, on the connection's reader, before the next request is
//! read; work that waits (durability, long polls, disk-heavy admin calls) is returned as a
//! future that the connection runs concurrently, so a long poll never delays a heartbeat.

mod admin;
mod fetch;
mod groups;
mod metadata;
mod offsets;
mod produce;
mod producer_id;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sluice_protocol::{ErrorCode, Request, RequestHeader, Response};

use crate::BrokerState;
use crate::fetch_budget::FetchBudgetPermit;

/// A response still being worked out.
pub type PendingResponse = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

/// A response still being worked out, with the fetch budget its bytes hold (none when it was
/// throttled).
pub type PendingHeldResponse =
    Pin<Box<dyn Future<Output = (Response, Option<FetchBudgetPermit>)> + Send + 'static>>;

/// What a request leads to.
pub enum Outcome {
    /// Answer now.
    Ready(Response),
    /// Answer when this completes.
    Later(PendingResponse),
    /// Answer when this completes, and keep the budget held until the response is written.
    LaterHolding(PendingHeldResponse),
    /// No answer at all (produce with acks=none).
    Silent,
    /// The whole request fails with this code (an error response frame, no body).
    Failed(ErrorCode),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ready(response) => write!(f, "Ready({:?})", response.api_key()),
            Outcome::Later(_) => f.write_str("Later"),
            Outcome::LaterHolding(_) => f.write_str("LaterHolding"),
            Outcome::Silent => f.write_str("Silent"),
            Outcome::Failed(code) => write!(f, "Failed({code})"),
        }
    }
}

pub use fetch::ReadAhead;

/// Handles one decoded request of a connection whose fetch read ahead is `read_ahead`.
pub fn handle(
    state: &Arc<BrokerState>,
    header: &RequestHeader,
    request: Request,
    read_ahead: &Arc<ReadAhead>,
) -> Outcome {
    tracing::trace!(correlation_id = header.correlation_id, api = ?request.api_key(), "request");
    match request {
        Request::ApiVersions(request) => Outcome::Ready(metadata::api_versions(request).into()),
        Request::Metadata(request) => Outcome::Ready(metadata::metadata(state, request).into()),
        Request::CreateTopics(request) => admin::create_topics(state, request),
        Request::DeleteTopics(request) => admin::delete_topics(state, request),
        Request::ListTopics(request) => Outcome::Ready(admin::list_topics(state, request).into()),
        Request::DescribeTopic(request) => {
            Outcome::Ready(admin::describe_topic(state, request).into())
        }
        Request::Produce(request) => produce::produce(state, request),
        Request::InitProducerId(request) => producer_id::init_producer_id(state, request),
        Request::ConsumerGroupHeartbeat(request) => groups::heartbeat(state, request),
        Request::LeaveGroup(request) => groups::leave(state, request),
        Request::CommitOffsets(request) => groups::commit(state, request),
        Request::FetchOffsets(request) => groups::fetch_offsets(state, request),
        Request::DescribeGroup(request) => groups::describe(state, request),
        Request::ListGroups(_) => groups::list(state),
        Request::Fetch(request) => fetch::fetch(state, request, read_ahead),
        Request::ListOffsets(request) => {
            Outcome::Ready(offsets::list_offsets(state, request).into())
        }
        // The protocol enum is non-exhaustive: an api added there before a handler exists here
        // gets an error answer, never a dropped connection.
        _ => Outcome::Failed(ErrorCode::UnknownApiKey),
    }
}
