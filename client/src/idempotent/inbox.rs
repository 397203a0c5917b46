//! The inbox: a handler whose SQLite writes and the "processed" mark commit in one transaction,
//! so its effect happens exactly once in that database, whatever crashes and redeliveries.
//!
//! ```text
//! record ─▶ BEGIN IMMEDIATE ─▶ key in sluice_processed_messages? ──yes──▶ ROLLBACK: Duplicate
//!                                         │ no
//!                                         ▼
//!                        handler(&transaction, &record): the application's writes
//!                                         │ Ok                 │ Err / crash
//!                                         ▼                    ▼
//!                  INSERT key; COMMIT: Processed        ROLLBACK: nothing happened
//!                                         │
//!                                         ▼
//!                              commit the consumer offset
//! ```
//!
//! A crash before `COMMIT` leaves no trace (SQLite rolls the transaction back), so the
//! redelivered record is handled as if for the first time. A crash after `COMMIT` but before
//! the offset commit redelivers a record whose key is already there: it is skipped.
//! `BEGIN IMMEDIATE` takes SQLite's write lock before the check, so two processes sharing the
//! database (an old and a new owner of a partition during a rebalance) cannot both see the key
//! missing and both run the handler.
//!
//! The handler runs synchronously on tokio's blocking pool (rusqlite is blocking) and must not
//! do network calls: the write lock is held while it runs. Anything that should leave the
//! database goes through the [outbox](super::outbox) in the same transaction.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::sqlite::{self, SharedConnection};
use super::{BoxError, Error, Handled, MessageKey, Outcome, RecordSource, Result};
use crate::consumer::{Consumer, ConsumerRecord};

/// Runs handlers inside SQLite transactions that also record the message as processed. Cheap
/// to clone: clones share one connection.
#[derive(Clone, Debug)]
pub struct Inbox {
    connection: SharedConnection,
    scope: Arc<str>,
}

impl Inbox {
    /// Opens (creating) the application's database at `path` for the messages of `scope` (say,
    /// the consumer group's name), with write-ahead logging and `synchronous=FULL`.
    pub async fn open(path: impl AsRef<Path>, scope: impl Into<String>) -> Result<Inbox> {
        let path = path.as_ref().to_path_buf();
        let connection = tokio::task::spawn_blocking(move || sqlite::open(&path))
            .await
            .map_err(|_| Error::Cancelled)??;
        Inbox::from_connection(connection, scope)
    }

    /// Uses a connection the application opened (its settings are applied as in
    /// [`open`](Self::open)). Creates the `sluice_processed_messages` table if needed.
    pub fn from_connection(connection: Connection, scope: impl Into<String>) -> Result<Inbox> {
        sqlite::configure(&connection)?;
        sqlite::create_processed_table(&connection)?;
        Ok(Inbox {
            connection: Arc::new(Mutex::new(connection)),
            scope: scope.into().into(),
        })
    }

    /// Runs `handler` in a transaction unless `record`'s key was processed; the key is recorded
    /// in the same transaction, which commits only when the handler returned `Ok`.
    ///
    /// # Errors
    /// [`Error::Handler`] when the handler failed (nothing of it was written); SQLite errors.
    ///
    /// # Panics
    /// Resumes a panic of the handler (after the transaction was rolled back).
    pub async fn handle<T, E, F>(&self, record: &ConsumerRecord, handler: F) -> Result<Outcome<T>>
    where
        F: FnOnce(&Transaction<'_>, &ConsumerRecord) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Into<BoxError>,
    {
        let scope = Arc::clone(&self.scope);
        let record = record.clone();
        sqlite::blocking(&self.connection, move |connection| {
            let key = MessageKey::of(&record);
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Nothing expires in the inbox: a key is kept until the application deletes it.
            if sqlite::is_processed(&transaction, &scope, &key, i64::MIN)? {
                return Ok(Outcome::Duplicate);
            }
            let value = handler(&transaction, &record).map_err(|error| Error::Handler {
                key: key.clone(),
                source: error.into(),
            })?;
            sqlite::record_processed(&transaction, &scope, &key, sqlite::now_ms(), i64::MIN)?;
            transaction.commit()?;
            Ok(Outcome::Processed(value))
        })
        .await
    }

    /// True when `key` is recorded as processed.
    pub async fn is_processed(&self, key: &MessageKey) -> Result<bool> {
        let scope = Arc::clone(&self.scope);
        let key = key.clone();
        sqlite::blocking(&self.connection, move |connection| {
            Ok(sqlite::is_processed(connection, &scope, &key, i64::MIN)?)
        })
        .await
    }

    /// Deletes this scope's keys processed more than `age` ago, so the table does not grow
    /// forever (nothing expires by itself: a key is kept until deleted). Choose `age` longer
    /// than any redelivery can come late (the topic's retention is safe). Returns how many.
    pub async fn delete_processed_older_than(&self, age: std::time::Duration) -> Result<usize> {
        let scope = Arc::clone(&self.scope);
        let processed_before_ms = sqlite::ms_before(sqlite::now_ms(), age);
        sqlite::blocking(&self.connection, move |connection| {
            Ok(sqlite::forget_expired(
                connection,
                &scope,
                processed_before_ms,
            )?)
        })
        .await
    }

    /// Runs `call` with the inbox's connection on the blocking pool: to read the application's
    /// tables through the same connection.
    pub async fn with_connection<T, F>(&self, call: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        sqlite::blocking(&self.connection, move |connection| Ok(call(connection)?)).await
    }
}

/// A group [`Consumer`] whose records go through an [`Inbox`]: the handler's writes and the
/// processed mark commit together, and the offset is committed after that.
///
/// Build the consumer with [`CommitMode::Manual`](crate::CommitMode::Manual). When the handler
/// fails, its transaction is rolled back and the record is kept: the next call hands it to the
/// handler again, and nothing is committed meanwhile (as in
/// [`IdempotentConsumer`](super::IdempotentConsumer)).
#[derive(Debug)]
pub struct InboxConsumer {
    source: RecordSource,
    inbox: Inbox,
}

impl InboxConsumer {
    pub fn new(consumer: Consumer, inbox: Inbox) -> Self {
        InboxConsumer {
            source: RecordSource::new(consumer),
            inbox,
        }
    }

    /// Takes the next record (or the one whose handler failed last time) and runs it through
    /// [`Inbox::handle`]. Does not commit the offset: call [`commit`](Self::commit), or use
    /// [`process_next`](Self::process_next). Returns `None` once the stream ended.
    pub async fn handle_next<T, E, F>(&mut self, handler: F) -> Result<Option<Handled<T>>>
    where
        F: FnOnce(&Transaction<'_>, &ConsumerRecord) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Into<BoxError>,
    {
        let Some(record) = self.source.next().await? else {
            return Ok(None);
        };
        let outcome = self.inbox.handle(&record, handler).await?;
        self.source.finished();
        Ok(Some(Handled {
            key: MessageKey::of(&record),
            record,
            outcome,
        }))
    }

    /// Commits the offsets of every finished record. Returns false when nothing was
    /// committed (a failed record waits for a retry, or the partition moved).
    pub async fn commit(&mut self) -> Result<bool> {
        self.source.commit().await
    }

    /// [`handle_next`](Self::handle_next), then [`commit`](Self::commit) when a record was
    /// finished.
    pub async fn process_next<T, E, F>(&mut self, handler: F) -> Result<Option<Handled<T>>>
    where
        F: FnOnce(&Transaction<'_>, &ConsumerRecord) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Into<BoxError>,
    {
        let handled = self.handle_next(handler).await?;
        if handled.is_some() {
            self.commit().await?;
        }
        Ok(handled)
    }

    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    pub fn consumer(&self) -> &Consumer {
        &self.source.consumer
    }

    /// Commits what is finished and leaves the group (without committing when a record's
    /// handler failed; see [`IdempotentConsumer::close`](super::IdempotentConsumer::close)).
    pub async fn close(self) -> Result<()> {
        self.source.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(message_id: &'static str) -> ConsumerRecord {
        ConsumerRecord {
            topic: Arc::from("deposits"),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: None,
            value: Bytes::from_static(b"25"),
            headers: vec![(
                super::super::MESSAGE_ID_HEADER.to_owned(),
                Bytes::from_static(message_id.as_bytes()),
            )],
        }
    }

    fn ledger_rows(connection: &Connection) -> rusqlite::Result<i64> {
        connection.query_row("SELECT COUNT(*) FROM ledger", [], |row| row.get(0))
    }

    #[tokio::test]
    async fn a_failed_handler_leaves_no_trace_and_a_processed_key_skips_the_handler() {
        let directory = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(directory.path().join("bank.sqlite"), "ledger")
            .await
            .unwrap();
        inbox
            .with_connection(|connection| {
                connection.execute_batch("CREATE TABLE ledger (amount INTEGER NOT NULL)")
            })
            .await
            .unwrap();
        let deposit = record("deposit-1");

        let failed = inbox
            .handle(&deposit, |transaction, _record| {
                transaction.execute("INSERT INTO ledger (amount) VALUES (25)", [])?;
                Err::<(), BoxError>("the ledger is closed".into())
            })
            .await;
        assert!(matches!(failed, Err(Error::Handler { .. })), "{failed:?}");
        assert_eq!(
            inbox
                .with_connection(|connection| ledger_rows(connection))
                .await
                .unwrap(),
            0,
            "rolled back"
        );
        assert!(!inbox.is_processed(&MessageKey::of(&deposit)).await.unwrap());

        let credit =
            |transaction: &Transaction<'_>, _record: &ConsumerRecord| -> rusqlite::Result<usize> {
                transaction.execute("INSERT INTO ledger (amount) VALUES (25)", [])
            };
        assert_eq!(
            inbox.handle(&deposit, credit).await.unwrap(),
            Outcome::Processed(1)
        );
        assert_eq!(
            inbox.handle(&deposit, credit).await.unwrap(),
            Outcome::Duplicate
        );
        assert_eq!(
            inbox
                .with_connection(|connection| ledger_rows(connection))
                .await
                .unwrap(),
            1
        );
        assert!(inbox.is_processed(&MessageKey::of(&deposit)).await.unwrap());
        // Another scope in the same database has not processed it.
        let connection = Connection::open(directory.path().join("bank.sqlite")).unwrap();
        let audit = Inbox::from_connection(connection, "audit").unwrap();
        assert!(!audit.is_processed(&MessageKey::of(&deposit)).await.unwrap());
    }

    #[tokio::test]
    async fn old_processed_keys_can_be_deleted_and_recent_ones_stay() {
        let directory = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(directory.path().join("bank.sqlite"), "ledger")
            .await
            .unwrap();
        let deposit = record("deposit-1");
        let nothing = |_: &Transaction<'_>, _: &ConsumerRecord| Ok::<(), BoxError>(());
        inbox.handle(&deposit, nothing).await.unwrap();
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(inbox.delete_processed_older_than(hour).await.unwrap(), 0);
        assert!(inbox.is_processed(&MessageKey::of(&deposit)).await.unwrap());
        assert_eq!(
            inbox
                .delete_processed_older_than(std::time::Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        assert!(!inbox.is_processed(&MessageKey::of(&deposit)).await.unwrap());
    }
}
