//! The Sluice client library.
//!
//! ```text
//! Client::connect("tcp://…,quic://…") ── one multiplexed Connection per broker
//!   │  (reconnect with backoff + jitter, circuit breaker, retries of retriable errors)
//!   ├── producer() ─▶ Producer: per-partition batches ─▶ sender task ─▶ Produce (idempotent)
//!   ├── consumer() ─▶ Consumer: Stream of records (standalone, or a group member)
//!   └── admin()    ─▶ Admin: topics, groups, offsets
//! ```
//!
//! Modules:
//! - [`client`]: [`Client`] and [`ClientOptions`]: bootstrap URLs, reconnects, retries.
//! - [`connection`]: [`Connection`] and its [`ConnectionOptions`]: URLs (tcp:// and quic://),
//!   the reader and writer tasks, correlation of responses to requests.
//! - [`resilience`]: backoff with jitter and the circuit breaker, as plain state machines.
//! - [`producer`]: [`Producer`], batching, partitioning, retries and idempotence.
//! - [`consumer`]: [`Consumer`], the group member state machine, commits (which offsets are
//!   committed when is documented there).
//! - [`admin`]: the [`Admin`] calls for topics, groups and offsets.
//! - [`idempotent`]: dedup stores, the idempotent consumer, the SQLite inbox and outbox relay.
//! - [`error`]: the one [`Error`] enum every call returns, with `is_retriable()`.
//! - [`protocol`]: the wire types, re-exported from `sluice-protocol`.
//!
//! The `sluice` command line tool lives in `src/bin/sluice.rs` (default feature `cli`).

#![deny(unsafe_code)]

pub mod admin;
pub mod client;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod idempotent;
pub mod producer;
pub mod resilience;
mod sync;
#[cfg(test)]
mod test_support;

pub use admin::Admin;
pub use client::{Client, ClientOptions};
pub use connection::{Connection, ConnectionOptions, PendingResponse};
pub use consumer::{
    CommitMode, Consumer, ConsumerBatch, ConsumerBuilder, ConsumerRecord, RecordView, ResetPolicy,
    Seek,
};
pub use error::Error;
pub use producer::{Delivery, DeliveryFuture, Producer, ProducerBuilder, Record};
pub use sluice_protocol as protocol;
