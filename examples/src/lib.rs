//! The little the example programs share: where the broker is, names that do not collide
//! between runs, and waiting for a record with a deadline.
//!
//! The programs themselves are in `examples/` (run one with
//! `cargo run -p sluice-examples --example NAME`):
//!
//! | example               | pattern                                                           |
//! |-----------------------|-------------------------------------------------------------------|
//! | `quickstart`          | create a topic, produce, consume with a group                     |
//! | `consumer_group`      | three members share partitions; one dies, the others take over    |
//! | `idempotent_consumer` | duplicates and redeliveries skipped once their key is stored      |
//! | `outbox`              | database rows published exactly once, even across a relay crash   |
//! | `saga`                | an orchestrated order saga with compensations                     |
//! | `event_sourcing`      | an aggregate rebuilt from its events, and a CQRS read model       |
//!
//! Each takes the broker from `SLUICE_BROKER` (default `tcp://127.0.0.1:7171`) and exits 0 once
//! its scenario completed. `tests/examples.rs` runs every one against a broker it starts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use futures::{Stream, StreamExt};
use sluice_client::ConsumerRecord;

/// The broker every example talks to when `SLUICE_BROKER` is not set.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:7171";

/// The broker URL: `SLUICE_BROKER`, else [`DEFAULT_BROKER`].
pub fn broker_url() -> String {
    std::env::var("SLUICE_BROKER").unwrap_or_else(|_| DEFAULT_BROKER.to_owned())
}

/// A suffix for topic and group names, different for every run, so running an example again
/// against the same broker starts from empty topics and fresh groups.
pub fn unique_suffix() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    format!("{}-{}", std::process::id(), millis)
}

/// The next record of `stream`, or an error once `deadline` passed.
///
/// # Errors
/// The deadline passed, the stream ended, or it yielded an error.
pub async fn next_record<S>(
    stream: &mut S,
    deadline: Instant,
    waiting_for: &str,
) -> anyhow::Result<ConsumerRecord>
where
    S: Stream<Item = sluice_client::error::Result<ConsumerRecord>> + Unpin,
{
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, stream.next()).await {
        Err(_) => Err(anyhow!("timed out waiting for {waiting_for}")),
        Ok(None) => Err(anyhow!(
            "the consumer stopped while waiting for {waiting_for}"
        )),
        Ok(Some(record)) => record.with_context(|| format!("consuming {waiting_for}")),
    }
}

/// A deadline `seconds` from now: every wait in the examples has one, so a scenario that
/// cannot complete fails with a message instead of hanging.
pub fn deadline_in(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

/// The value of a record as text (the examples only send text).
pub fn text(record: &ConsumerRecord) -> String {
    String::from_utf8_lossy(&record.value).into_owned()
}

/// The value of header `name`, as text.
pub fn header(record: &ConsumerRecord, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}
