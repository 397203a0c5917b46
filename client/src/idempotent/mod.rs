//! Idempotent-consumer helpers: run a handler at most once per message although the broker
//! delivers at least once, and publish database changes without losing or duplicating them.
//!
//! Consumer groups deliver at least once: a record yielded but not committed when a member
//! crashes, is fenced or hands its partition over is delivered again to the next owner. These
//! helpers remember which messages were processed, so the redelivered ones are skipped.
//!
//! ```text
//!                      IdempotentConsumer / InboxConsumer
//! Consumer ──record──▶ MessageKey ──▶ seen before? ──yes──▶ skip ──────────────┐
//!  (group)             (message-id        │ no                                  ▼
//!                       header, else      ▼                             commit the offset
//!                       position)      handler ──Ok──▶ remember the key ──▶ (never before)
//!                                         │ Err
//!                                         ▼
//!                        keep the record: the next call retries it, nothing is committed
//!
//! application transaction: business rows + outbox rows ──▶ OutboxRelay ──▶ producer ──▶ topic
//! ```
//!
//! Modules:
//! - [`dedup`]: [`MessageKey`] (what identifies a message), the [`DedupStore`] trait, the
//!   bounded [`InMemoryDedupStore`] and, with the `sqlite` feature, the persistent
//!   [`SqliteDedupStore`].
//! - [`IdempotentConsumer`] (here): a group [`Consumer`] plus a [`DedupStore`]; runs an async
//!   handler for the keys the store does not remember, and commits offsets only after it
//!   succeeded.
//! - [`inbox`] (`sqlite`): the handler gets a SQLite transaction, and the processed key is
//!   written in that same transaction, so the handler's effect and "processed" commit together.
//! - [`outbox`] (`sqlite`): the transactional outbox: an application writes business rows and
//!   outbox rows in one transaction; [`outbox::OutboxRelay`] publishes the outbox in order.
//!
//! # Which guarantee each helper gives
//!
//! - [`IdempotentConsumer`] with any [`DedupStore`]: a message whose key the store remembers is
//!   never handled again. The key is remembered *after* the handler succeeded, so a crash
//!   between the handler's end and the store's write runs the handler again on redelivery:
//!   the handler's effects are at least once, its runs on redelivered messages at most once
//!   per key for as long as the store remembers the key (the in-memory store forgets on
//!   restart, after its TTL, and when full). Make the handler's effect idempotent, or use the
//!   inbox, when that window matters.
//! - [`inbox::InboxConsumer`]: the handler's SQLite writes and the processed key commit in one
//!   transaction: the effect happens exactly once in that database, whatever crashes.
//! - [`outbox::OutboxRelay`]: every outbox row reaches its topic exactly once, in the order of
//!   the rows, across crashes and restarts of the relay (see its module for how).
//!
//! # Why SQLite (rusqlite, bundled) rather than redb
//!
//! The inbox and the outbox only work if the helper's rows and the *application's* rows commit
//! in one transaction, so the store must be the database the application already writes its
//! state to. SQLite is that database for a great many services, speaks SQL the application
//! uses for its own tables, and its files can be inspected with the `sqlite3` shell. redb is a
//! fine embedded key-value store, but an application keeping its business tables in SQL would
//! need a second database and lose the shared transaction, which is the whole point. rusqlite
//! with `bundled` compiles SQLite in, so nothing is needed on the system; the cost is about 40 s
//! of a clean release build, which is why it sits behind the default-on `sqlite` feature.
//!
//! rusqlite is blocking. Every SQLite call here runs on tokio's blocking pool
//! (`spawn_blocking`), never on an async worker: a commit with `synchronous=FULL` waits for an
//! fsync, which must not stall other tasks.
//!
//! # Message keys
//!
//! A message is identified by its [`MESSAGE_ID_HEADER`] header (`message-id`) when it has one
//! with a non-empty value: producers that may send the same message twice (an application
//! retrying after a lost answer, an outbox relay) set it, and every copy is then one message.
//! Without it the key is the record's position, (topic, partition, offset), which identifies
//! redeliveries of one record but not two copies produced separately.

pub mod dedup;
#[cfg(feature = "sqlite")]
pub mod inbox;
#[cfg(feature = "sqlite")]
pub mod outbox;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::future::Future;

use futures::StreamExt;
use sluice_protocol::ErrorCode;

#[cfg(feature = "sqlite")]
pub use dedup::SqliteDedupStore;
pub use dedup::{DedupStore, InMemoryDedupStore, MESSAGE_ID_HEADER, MessageKey};

use crate::consumer::{Consumer, ConsumerRecord};

/// Any error a handler returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A result of the idempotent helpers.
pub type Result<T> = std::result::Result<T, Error>;

/// Why an idempotent helper failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A consumer, producer or admin call failed.
    #[error(transparent)]
    Client(#[from] crate::error::Error),

    /// The handler failed. The record was neither remembered nor committed: the next call
    /// hands the same record to the handler again.
    #[error("handler failed on {key}: {source}")]
    Handler {
        key: MessageKey,
        #[source]
        source: BoxError,
    },

    /// A SQLite call failed.
    #[cfg(feature = "sqlite")]
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// Stored data does not decode (an outbox row's headers, say).
    #[error("invalid stored data: {0}")]
    Corrupt(String),

    /// The helper was used wrongly (an outbox shared by two relay names, ...).
    #[error("{0}")]
    Usage(String),

    /// A deadline passed (the outbox relay's reconciliation read, say).
    #[error("{0}")]
    Timeout(String),

    /// The runtime shut down while a blocking SQLite call was queued.
    #[error("the blocking task was cancelled")]
    Cancelled,
}

/// What happened to one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<T = ()> {
    /// The handler ran and succeeded; its result.
    Processed(T),
    /// The key was processed before; the handler did not run.
    Duplicate,
}

/// One record taken from the stream and finished with.
#[derive(Clone, Debug)]
pub struct Handled<T = ()> {
    pub record: ConsumerRecord,
    pub key: MessageKey,
    pub outcome: Outcome<T>,
}

impl<T> Handled<T> {
    /// True when the handler ran for this record.
    pub fn was_processed(&self) -> bool {
        matches!(self.outcome, Outcome::Processed(_))
    }
}

/// The record stream under both consumer wrappers: holds back a record whose handler failed,
/// so it is handed out again instead of being skipped, and commits only finished records.
///
/// The [`Consumer`] counts a record as processed once the next one is asked for, or on
/// [`Consumer::commit`] and [`Consumer::close`], which commit everything yielded. So while a
/// record is unfinished this never asks for the next one, never commits and never closes the
/// consumer: doing any of those would commit the unfinished record.
#[derive(Debug)]
struct RecordSource {
    consumer: Consumer,
    /// Yielded by the consumer, not finished: the handler failed, or has not run yet.
    unfinished: Option<ConsumerRecord>,
}

impl RecordSource {
    fn new(consumer: Consumer) -> Self {
        RecordSource {
            consumer,
            unfinished: None,
        }
    }

    /// The unfinished record again, or the next one; `None` once the stream ended.
    async fn next(&mut self) -> Result<Option<ConsumerRecord>> {
        if let Some(record) = &self.unfinished {
            return Ok(Some(record.clone()));
        }
        match self.consumer.next().await {
            None => Ok(None),
            Some(Err(error)) => Err(error.into()),
            Some(Ok(record)) => {
                self.unfinished = Some(record.clone());
                Ok(Some(record))
            }
        }
    }

    fn finished(&mut self) {
        self.unfinished = None;
    }

    /// Commits every finished record. Returns false when nothing could be committed: a record
    /// is unfinished, or the broker refused the commit because this member no longer owns the
    /// partition (its next owner gets the records again and the dedup store skips them).
    async fn commit(&mut self) -> Result<bool> {
        if self.unfinished.is_some() {
            return Ok(false);
        }
        match self.consumer.commit().await {
            Ok(_) => Ok(true),
            Err(crate::error::Error::Broker { code, message })
                if matches!(
                    code,
                    ErrorCode::FencedMemberEpoch
                        | ErrorCode::UnknownMember
                        | ErrorCode::RebalanceInProgress
                ) =>
            {
                tracing::warn!(
                    %code,
                    ?message,
                    "commit refused: the partition moved; its next owner skips what was processed"
                );
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn close(self) -> Result<()> {
        if self.unfinished.is_some() {
            // Closing would commit the unfinished record: leave the group without a commit,
            // at once (dropping left the partitions with this member until its session timed
            // out). What was finished since the last commit comes again, to the dedup store.
            self.consumer.close_without_commit().await;
            return Ok(());
        }
        self.consumer.close().await.map_err(Error::from)
    }
}

/// A group [`Consumer`] that runs a handler at most once per [`MessageKey`] and commits
/// offsets only after the handler succeeded.
///
/// ```no_run
/// use sluice_client::{Client, CommitMode};
/// use sluice_client::idempotent::{IdempotentConsumer, InMemoryDedupStore, BoxError};
///
/// # async fn example() -> sluice_client::idempotent::Result<()> {
/// let client = Client::connect("tcp://127.0.0.1:7171").await?;
/// let consumer = client
///     .consumer()
///     .group("billing")
///     .topics(["payments"])
///     .commit_mode(CommitMode::Manual)
///     .build()
///     .await?;
/// let mut payments = IdempotentConsumer::new(consumer, InMemoryDedupStore::new());
/// while let Some(handled) = payments
///     .process_next(|record| async move {
///         println!("charging {:?}", record.value);
///         Ok::<(), BoxError>(())
///     })
///     .await?
/// {
///     println!("{}: {:?}", handled.key, handled.outcome);
/// }
/// # Ok(()) }
/// ```
///
/// Build the consumer with [`CommitMode::Manual`](crate::CommitMode::Manual) so offsets move
/// only when this wrapper commits. (Auto commit is safe too: it commits only records this
/// wrapper has finished, just later.)
///
/// When the handler fails, [`handle_next`](Self::handle_next) returns [`Error::Handler`] and
/// keeps the record: the next call runs the handler on it again (retry with your own backoff),
/// and nothing after it is taken or committed meanwhile. Giving up means dropping the wrapper
/// (or calling [`close`](Self::close)): the record is then redelivered to the partition's
/// next owner.
#[derive(Debug)]
pub struct IdempotentConsumer<S> {
    source: RecordSource,
    store: S,
}

impl<S: DedupStore> IdempotentConsumer<S> {
    pub fn new(consumer: Consumer, store: S) -> Self {
        IdempotentConsumer {
            source: RecordSource::new(consumer),
            store,
        }
    }

    /// Takes the next record (or the one whose handler failed last time) and runs `handler` on
    /// it unless the store has its key; remembers the key once the handler succeeded. Does not
    /// commit: call [`commit`](Self::commit), or use [`process_next`](Self::process_next).
    /// Returns `None` once the consumer's stream ended.
    ///
    /// Cancel-safe: a record whose call was dropped midway is handed out again next time.
    ///
    /// # Errors
    /// [`Error::Handler`] when the handler failed; the stream's or the store's errors.
    pub async fn handle_next<T, E, F, Fut>(&mut self, handler: F) -> Result<Option<Handled<T>>>
    where
        F: FnOnce(ConsumerRecord) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<BoxError>,
    {
        let Some(record) = self.source.next().await? else {
            return Ok(None);
        };
        let key = MessageKey::of(&record);
        if self.store.contains(&key).await? {
            self.source.finished();
            return Ok(Some(Handled {
                record,
                key,
                outcome: Outcome::Duplicate,
            }));
        }
        let value = match handler(record.clone()).await {
            Ok(value) => value,
            Err(error) => {
                return Err(Error::Handler {
                    key,
                    source: error.into(),
                });
            }
        };
        self.store.insert(&key).await?;
        self.source.finished();
        Ok(Some(Handled {
            record,
            key,
            outcome: Outcome::Processed(value),
        }))
    }

    /// Commits the offsets of every finished record (group mode). Returns false when nothing
    /// was committed: a record's handler failed and it is waiting to be retried, or the broker
    /// refused the commit because the partition moved to another member.
    pub async fn commit(&mut self) -> Result<bool> {
        self.source.commit().await
    }

    /// [`handle_next`](Self::handle_next), then [`commit`](Self::commit) when a record was
    /// finished.
    pub async fn process_next<T, E, F, Fut>(&mut self, handler: F) -> Result<Option<Handled<T>>>
    where
        F: FnOnce(ConsumerRecord) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<BoxError>,
    {
        let handled = self.handle_next(handler).await?;
        if handled.is_some() {
            self.commit().await?;
        }
        Ok(handled)
    }

    /// The dedup store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The consumer, to look at its assignment or member id.
    pub fn consumer(&self) -> &Consumer {
        &self.source.consumer
    }

    /// Commits what is finished and leaves the group. With a record whose handler failed, it
    /// leaves without committing (closing the consumer would commit that record); the group
    /// moves its partitions after the session timeout.
    pub async fn close(self) -> Result<()> {
        self.source.close().await
    }
}
