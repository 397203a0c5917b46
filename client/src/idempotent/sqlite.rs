//! What the SQLite-backed helpers share: opening a database, running calls on the blocking
//! pool, and the table of processed message keys.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

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
    enable_wal(connection)?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Switches the database to write-ahead logging. Two connections switching a new file at once
/// both hold a shared lock and want the exclusive one; waiting would deadlock, so SQLite
/// answers one of them `SQLITE_BUSY` at once, without the busy timeout (two relays or stores
/// opening one new file together failed so). That one tries again until the busy timeout:
/// the other's switch takes milliseconds.
fn enable_wal(connection: &Connection) -> rusqlite::Result<()> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        // journal_mode answers with the mode now in force; an in-memory database stays "memory".
        match connection.query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get::<_, String>(0)
        }) {
            Ok(_mode) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(error),
        }
    }
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

/// Records `key` for `scope` at `now_ms`. Recording a key still remembered (recorded after
/// `expired_until_ms`) changes nothing; a key that expired but was not deleted yet counts as
/// absent for [`is_processed`], so it is recorded afresh: kept at its old time, it would stay
/// expired, and the message would be handled again at every delivery.
pub(crate) fn record_processed(
    connection: &Connection,
    scope: &str,
    key: &MessageKey,
    now_ms: i64,
    expired_until_ms: i64,
) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO sluice_processed_messages (scope, message_key, processed_at_ms)
         VALUES (?1, ?2, ?3)
         ON CONFLICT (scope, message_key) DO UPDATE SET processed_at_ms = excluded.processed_at_ms
         WHERE processed_at_ms <= ?4",
        params![scope, key.to_bytes(), now_ms, expired_until_ms],
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
