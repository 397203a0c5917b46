//! The Sluice client library.
//!
//! Built so far: [`Connection`], one multiplexed connection to a broker. Producers, consumers,
//! group members and admin calls arrive with the client issue.
//!
//! Modules:
//! - [`connection`]: [`Connection`] and its [`ConnectionOptions`]: URLs, the reader and writer
//!   tasks, correlation of responses to requests.
//! - [`error`]: the one [`Error`] enum every call returns, with `is_retriable()`.
//! - [`producer`]: [`Producer`], batching, partitioning, retries and idempotence.
//! - [`protocol`]: the wire types, re-exported from `sluice-protocol`.

#![deny(unsafe_code)]

pub mod admin;
pub mod client;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod producer;
pub mod resilience;

pub use admin::Admin;
pub use client::{Client, ClientOptions};
pub use connection::{Connection, ConnectionOptions};
pub use consumer::{CommitMode, Consumer, ConsumerBuilder, ConsumerRecord, ResetPolicy, Seek};
pub use error::Error;
pub use producer::{Delivery, DeliveryFuture, Producer, ProducerBuilder, Record};
pub use sluice_protocol as protocol;
