//! What the SQLite-backed helpers share: opening a database, running calls on the blocking
//! pool, and the table of processed message keys.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::{Error, MessageKey, Result};

/// How long a SQLite call waits for another connection's write lock before failing with
/// `SQLITE_BUSY`. Writers hold it for one short transaction, so this is generous.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection shared by async callers; each call runs on the blocking pool.
pub(crate) type SharedConnection = Arc<Mutex<Connection>>;

/// Opens (creating) a database file for the helpers: write-ahead logging, so readers never wait
/// for the writer, and `synchronous=FULL`, so a committed transaction survives a power loss, not
/// only a process crash (a processed key or a sent mark that vanished would undo the guarantee).
pub(crate) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    configure(&connection)?;
    Ok(connection)
}

/// The settings [`open`] applies, for connections the application opened itself.
pub(crate) fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    // journal_mode answers with the mode now in force; an in-memory database stays "memory".
    let _mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Runs `call` with the connection on tokio's blocking pool.
///
/// # Panics
/// Resumes a panic of `call` (a handler's) on the caller's task.
pub(crate) async fn blocking<T, F>(connection: &SharedConnection, call: F) -> Result<T>
where
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let connection = Arc::clone(connection);
    let joined = tokio::task::spawn_blocking(move || {
        // A panic inside a transaction dropped the transaction (rolled back) before the lock
        // was poisoned, so the connection is still in a consistent state.
        let mut guard = connection.lock().unwrap_or_else(PoisonError::into_inner);
        call(&mut guard)
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Cancelled),
    }
}

/// Creates the table of processed message keys, shared by [`super::SqliteDedupStore`] and
/// [`super::inbox::Inbox`]. One row per (scope, key): `scope` keeps the keys of different
/// consumers (say, two groups reading one topic into one database) apart.
pub(crate) fn create_processed_table(connection: &Connection) -> rusqlite::Result<()> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS sluice_processed_messages (
             scope TEXT NOT NULL,
             message_key BLOB NOT NULL,
             processed_at_ms INTEGER NOT NULL,
             PRIMARY KEY (scope, message_key)
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS sluice_processed_messages_by_time
             ON sluice_processed_messages (scope, processed_at_ms);",
    )
}

/// True when `key` is recorded for `scope` after `expired_until_ms` (a key recorded at or before
/// it has expired).
pub(crate) fn is_processed(
    connection: &Connection,
    scope: &str,
    key: &MessageKey,
    expired_until_ms: i64,
) -> rusqlite::Result<bool> {
    connection
        .query_row(
            "SELECT 1 FROM sluice_processed_messages
             WHERE scope = ?1 AND message_key = ?2 AND processed_at_ms > ?3",
            params![scope, key.to_bytes(), expired_until_ms],
            |_| Ok(()),
        )
        .optional()
        .map(|found| found.is_some())
}

/// Records `key` for `scope`; recording it again changes nothing.
pub(crate) fn record_processed(
    connection: &Connection,
    scope: &str,
    key: &MessageKey,
    now_ms: i64,
) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT OR IGNORE INTO sluice_processed_messages (scope, message_key, processed_at_ms)
         VALUES (?1, ?2, ?3)",
        params![scope, key.to_bytes(), now_ms],
    )?;
    Ok(())
}

/// Forgets the keys of `scope` recorded at or before `expired_until_ms`. Returns how many.
pub(crate) fn forget_expired(
    connection: &Connection,
    scope: &str,
    expired_until_ms: i64,
) -> rusqlite::Result<usize> {
    connection.execute(
        "DELETE FROM sluice_processed_messages WHERE scope = ?1 AND processed_at_ms <= ?2",
        params![scope, expired_until_ms],
    )
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// `now_ms - duration`, saturating.
pub(crate) fn ms_before(now_ms: i64, duration: Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
}
