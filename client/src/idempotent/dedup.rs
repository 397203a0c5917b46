//! "Was this message processed?": [`MessageKey`], the [`DedupStore`] trait and its stores.
//!
//! # The contract every store keeps
//!
//! - After `insert(key)` returned `Ok`, `contains(key)` answers true until the store forgets
//!   the key, and only a documented bound makes it forget: the in-memory store's capacity and
//!   TTL (and a restart), the SQLite store's retention. A forgotten key's message is handled
//!   again if it is delivered again.
//! - `insert` of a key still remembered changes nothing. A key past its TTL or retention counts
//!   as absent even while it is still stored, so inserting it again remembers it afresh.
//! - A persistent store's `insert` is durable when it returns.
//! - Memory is bounded: no store grows with the number of messages seen.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Result;
use crate::consumer::ConsumerRecord;

/// The header that names a message: records with the same value are one message. Compared
/// byte for byte; an empty value counts as absent.
pub const MESSAGE_ID_HEADER: &str = "message-id";

/// What identifies a message for deduplication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageKey {
    /// The value of the record's first non-empty [`MESSAGE_ID_HEADER`] header.
    MessageId(Bytes),
    /// The record's position, for records without a message id.
    Position {
        topic: Arc<str>,
        partition: u32,
        offset: u64,
    },
}

impl MessageKey {
    /// The key of `record`: its message id when it has one, else its position.
    pub fn of(record: &ConsumerRecord) -> MessageKey {
        let message_id = record
            .headers
            .iter()
            .find(|(name, value)| name == MESSAGE_ID_HEADER && !value.is_empty());
        match message_id {
            // A copy: the header is a slice of the fetched batch, and a key kept in a store
            // must not keep that whole batch in memory.
            Some((_, value)) => MessageKey::MessageId(Bytes::copy_from_slice(value)),
            None => MessageKey::Position {
                topic: Arc::clone(&record.topic),
                partition: record.partition,
                offset: record.offset,
            },
        }
    }

    /// The key as stored: `i` then the message id, or `p`, partition and offset (big-endian),
    /// then the topic. The leading byte keeps a message id from ever equalling a position.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            MessageKey::MessageId(id) => {
                let mut bytes = Vec::with_capacity(1 + id.len());
                bytes.push(b'i');
                bytes.extend_from_slice(id);
                bytes
            }
            MessageKey::Position {
                topic,
                partition,
                offset,
            } => {
                let mut bytes = Vec::with_capacity(13 + topic.len());
                bytes.push(b'p');
                bytes.extend_from_slice(&partition.to_be_bytes());
                bytes.extend_from_slice(&offset.to_be_bytes());
                bytes.extend_from_slice(topic.as_bytes());
                bytes
            }
        }
    }
}

impl fmt::Display for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageKey::MessageId(id) => match std::str::from_utf8(id) {
                Ok(text) => write!(f, "message-id {text:?}"),
                Err(_) => write!(f, "message-id 0x{}", hex(id)),
            },
            MessageKey::Position {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}/{partition}@{offset}"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Remembers which messages were processed. See the [module docs](self) for the contract.
///
/// The methods are async so a store may do IO (the SQLite store runs on the blocking pool);
/// the in-memory store answers at once.
pub trait DedupStore: Send {
    /// True when `key` was recorded as processed and is still remembered.
    fn contains(&mut self, key: &MessageKey) -> impl Future<Output = Result<bool>> + Send;

    /// Records `key` as processed.
    fn insert(&mut self, key: &MessageKey) -> impl Future<Output = Result<()>> + Send;
}

/// A bounded in-memory [`DedupStore`]: remembers at most `max_entries` keys holding at most
/// `max_key_bytes` bytes of key, each for at most `ttl`, forgetting the oldest first.
///
/// Memory use is about `max_key_bytes` plus 100 bytes per entry. Everything is forgotten on
/// restart: it catches the redeliveries of a rebalance within one process, not those after a
/// crash (use [`SqliteDedupStore`] or the [inbox](super::inbox) for those).
#[derive(Debug)]
pub struct InMemoryDedupStore {
    /// Key bytes to when they were inserted. The same allocation as in `order`.
    remembered: HashMap<Arc<[u8]>, Instant>,
    /// Keys oldest first, so eviction and expiry take from the front.
    order: VecDeque<(Arc<[u8]>, Instant)>,
    key_bytes: usize,
    max_entries: usize,
    max_key_bytes: usize,
    ttl: Duration,
}

impl Default for InMemoryDedupStore {
    fn default() -> Self {
        InMemoryDedupStore::new()
    }
}

impl InMemoryDedupStore {
    /// A store with the default bounds.
    pub fn new() -> Self {
        InMemoryDedupStore {
            remembered: HashMap::new(),
            order: VecDeque::new(),
            key_bytes: 0,
            max_entries: 100_000,
            max_key_bytes: 16 * 1024 * 1024,
            ttl: Duration::from_secs(3600),
        }
    }

    /// Keys remembered at most; inserting one more forgets the oldest. At least 1.
    ///
    /// Default = 100 000.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// Bytes of keys (as [`MessageKey::to_bytes`]) remembered at most; inserting more forgets
    /// the oldest. A single key larger than this is not remembered at all.
    ///
    /// Default = 16 MiB.
    pub fn max_key_bytes(mut self, max_key_bytes: usize) -> Self {
        self.max_key_bytes = max_key_bytes;
        self
    }

    /// How long a key is remembered.
    ///
    /// Default = 1 hour.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Keys remembered now (expired ones go at the next call).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Bytes of keys remembered now.
    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// [`DedupStore::contains`] at the time `now` (times must not go backwards).
    pub fn contains_at(&mut self, key: &MessageKey, now: Instant) -> bool {
        self.expire(now);
        self.remembered.contains_key(key.to_bytes().as_slice())
    }

    /// [`DedupStore::insert`] at the time `now` (times must not go backwards).
    pub fn insert_at(&mut self, key: &MessageKey, now: Instant) {
        self.expire(now);
        let bytes: Arc<[u8]> = key.to_bytes().into();
        if self.remembered.contains_key(&bytes) {
            return;
        }
        if bytes.len() > self.max_key_bytes {
            tracing::warn!(
                %key,
                key_bytes = bytes.len(),
                max_key_bytes = self.max_key_bytes,
                "key too large to remember"
            );
            return;
        }
        self.key_bytes += bytes.len();
        self.remembered.insert(Arc::clone(&bytes), now);
        self.order.push_back((bytes, now));
        while self.order.len() > self.max_entries || self.key_bytes > self.max_key_bytes {
            self.forget_oldest();
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, inserted)) = self.order.front() {
            if now.saturating_duration_since(*inserted) < self.ttl {
                break;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let (bytes, _) = self
            .order
            .pop_front()
            .expect("forget_oldest is only called on a non-empty store");
        self.key_bytes -= bytes.len();
        let removed = self.remembered.remove(&bytes);
        assert!(removed.is_some(), "every key in order is in remembered");
    }
}

impl DedupStore for InMemoryDedupStore {
    fn contains(&mut self, key: &MessageKey) -> impl Future<Output = Result<bool>> + Send {
        std::future::ready(Ok(self.contains_at(key, Instant::now())))
    }

    fn insert(&mut self, key: &MessageKey) -> impl Future<Output = Result<()>> + Send {
        self.insert_at(key, Instant::now());
        std::future::ready(Ok(()))
    }
}

#[cfg(feature = "sqlite")]
pub use self::persistent::SqliteDedupStore;

#[cfg(feature = "sqlite")]
mod persistent {
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{DedupStore, MessageKey};
    use crate::idempotent::Result;
    use crate::idempotent::sqlite::{self, SharedConnection};

    /// Expired keys are deleted once every this many inserts, so the table stays bounded
    /// without a delete on every insert.
    const INSERTS_PER_CLEANUP: u32 = 1000;

    /// A [`DedupStore`] in a SQLite file: survives restarts and crashes (each insert is a
    /// committed, fsynced transaction). Keys are remembered for `retention` (expired ones are
    /// deleted at the first insert after opening and every 1000 inserts after), so the file
    /// holds about `retention` times the message rate. Several stores may share a file under different scopes.
    ///
    /// Cheap to clone: clones share one connection.
    #[derive(Clone, Debug)]
    pub struct SqliteDedupStore {
        connection: SharedConnection,
        scope: Arc<str>,
        retention: Duration,
        inserts_until_cleanup: u32,
    }

    impl SqliteDedupStore {
        /// Opens (creating) the store in the file at `path`, for the keys of `scope` (say, the
        /// consumer group's name).
        ///
        /// # Errors
        /// The file cannot be opened or is not a SQLite database.
        pub async fn open(path: impl AsRef<Path>, scope: impl Into<String>) -> Result<Self> {
            let path = path.as_ref().to_path_buf();
            let connection = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
                let connection = sqlite::open(&path)?;
                sqlite::create_processed_table(&connection)?;
                Ok(connection)
            })
            .await
            .map_err(|_| crate::idempotent::Error::Cancelled)??;
            Ok(SqliteDedupStore {
                connection: Arc::new(Mutex::new(connection)),
                scope: scope.into().into(),
                retention: Duration::from_secs(7 * 24 * 3600),
                // The first insert cleans up too: a process that inserts fewer than
                // `INSERTS_PER_CLEANUP` keys a run (a short job, a service that restarts
                // often) would otherwise never delete anything.
                inserts_until_cleanup: 1,
            })
        }

        /// How long a key is remembered.
        ///
        /// Default = 7 days.
        pub fn retention(mut self, retention: Duration) -> Self {
            self.retention = retention;
            self
        }

        /// Keys of this scope in the file, expired ones not yet deleted included.
        pub async fn len(&self) -> Result<u64> {
            let scope = Arc::clone(&self.scope);
            let count: i64 = sqlite::blocking(&self.connection, move |connection| {
                Ok(connection.query_row(
                    "SELECT COUNT(*) FROM sluice_processed_messages WHERE scope = ?1",
                    [&*scope],
                    |row| row.get(0),
                )?)
            })
            .await?;
            Ok(count.unsigned_abs())
        }

        /// Deletes this scope's keys older than the retention. Returns how many.
        pub async fn delete_expired(&self) -> Result<usize> {
            let scope = Arc::clone(&self.scope);
            let expired_until_ms = sqlite::ms_before(sqlite::now_ms(), self.retention);
            sqlite::blocking(&self.connection, move |connection| {
                Ok(sqlite::forget_expired(
                    connection,
                    &scope,
                    expired_until_ms,
                )?)
            })
            .await
        }
    }

    impl DedupStore for SqliteDedupStore {
        async fn contains(&mut self, key: &MessageKey) -> Result<bool> {
            let scope = Arc::clone(&self.scope);
            let key = key.clone();
            let expired_until_ms = sqlite::ms_before(sqlite::now_ms(), self.retention);
            sqlite::blocking(&self.connection, move |connection| {
                Ok(sqlite::is_processed(
                    connection,
                    &scope,
                    &key,
                    expired_until_ms,
                )?)
            })
            .await
        }

        async fn insert(&mut self, key: &MessageKey) -> Result<()> {
            let scope = Arc::clone(&self.scope);
            let key = key.clone();
            self.inserts_until_cleanup = self.inserts_until_cleanup.saturating_sub(1);
            let cleanup = self.inserts_until_cleanup == 0;
            if cleanup {
                self.inserts_until_cleanup = INSERTS_PER_CLEANUP;
            }
            let retention = self.retention;
            sqlite::blocking(&self.connection, move |connection| {
                let now_ms = sqlite::now_ms();
                let expired_until_ms = sqlite::ms_before(now_ms, retention);
                sqlite::record_processed(connection, &scope, &key, now_ms, expired_until_ms)?;
                if cleanup {
                    sqlite::forget_expired(connection, &scope, expired_until_ms)?;
                }
                Ok(())
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, headers: Vec<(&str, &'static [u8])>) -> ConsumerRecord {
        ConsumerRecord {
            topic: Arc::from("orders"),
            partition: 2,
            offset,
            timestamp_ms: 0,
            key: None,
            value: Bytes::from_static(b"v"),
            headers: headers
                .into_iter()
                .map(|(name, value)| (name.to_owned(), Bytes::from_static(value)))
                .collect(),
        }
    }

    fn id(text: &'static str) -> MessageKey {
        MessageKey::MessageId(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn the_message_id_header_names_a_message_and_the_position_stands_in_without_it() {
        let with_id = record(7, vec![("trace", b"x"), (MESSAGE_ID_HEADER, b"order-7")]);
        assert_eq!(MessageKey::of(&with_id), id("order-7"));
        // Two copies produced separately share the id, whatever their offsets.
        let copy = record(9, vec![(MESSAGE_ID_HEADER, b"order-7")]);
        assert_eq!(MessageKey::of(&copy), MessageKey::of(&with_id));

        let without = record(7, vec![("trace", b"x"), (MESSAGE_ID_HEADER, b"")]);
        let position = MessageKey::of(&without);
        assert_eq!(
            position,
            MessageKey::Position {
                topic: Arc::from("orders"),
                partition: 2,
                offset: 7
            }
        );
        assert_eq!(position.to_string(), "orders/2@7");
        assert_eq!(id("order-7").to_string(), "message-id \"order-7\"");
        assert_ne!(MessageKey::of(&record(8, vec![])), position);
    }

    #[test]
    fn stored_forms_never_collide_between_ids_and_positions() {
        let position = MessageKey::Position {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
        };
        let lookalike = MessageKey::MessageId(Bytes::from(position.to_bytes()[1..].to_vec()));
        assert_ne!(position.to_bytes(), lookalike.to_bytes());
    }

    #[test]
    fn in_memory_store_forgets_the_oldest_past_max_entries() {
        let now = Instant::now();
        let mut store = InMemoryDedupStore::new().max_entries(3);
        for name in ["a", "b", "c", "d"] {
            let key = MessageKey::MessageId(Bytes::copy_from_slice(name.as_bytes()));
            assert!(!store.contains_at(&key, now));
            store.insert_at(&key, now);
            assert!(store.contains_at(&key, now));
        }
        assert_eq!(store.len(), 3);
        assert!(!store.contains_at(&id("a"), now), "the oldest went first");
        for kept in ["b", "c", "d"] {
            assert!(store.contains_at(
                &MessageKey::MessageId(Bytes::copy_from_slice(kept.as_bytes())),
                now
            ));
        }
        // Inserting a remembered key again neither duplicates nor evicts.
        store.insert_at(&id("d"), now);
        assert_eq!(store.len(), 3);
        assert!(store.contains_at(&id("b"), now));
    }

    #[test]
    fn in_memory_store_stays_within_max_key_bytes() {
        let now = Instant::now();
        // Each id below is 1 + 10 bytes stored.
        let mut store = InMemoryDedupStore::new().max_key_bytes(25);
        store.insert_at(&id("0123456789"), now);
        store.insert_at(&id("abcdefghij"), now);
        assert_eq!(store.key_bytes(), 22);
        store.insert_at(&id("klmnopqrst"), now);
        assert_eq!(
            store.key_bytes(),
            22,
            "the oldest was forgotten to make room"
        );
        assert!(!store.contains_at(&id("0123456789"), now));
        assert!(store.contains_at(&id("klmnopqrst"), now));
        // A key larger than the whole budget is not remembered, and evicts nothing.
        store.insert_at(&id("this id is longer than 25 bytes"), now);
        assert!(!store.contains_at(&id("this id is longer than 25 bytes"), now));
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn in_memory_store_forgets_keys_after_the_ttl() {
        let start = Instant::now();
        let mut store = InMemoryDedupStore::new().ttl(Duration::from_secs(10));
        store.insert_at(&id("early"), start);
        store.insert_at(&id("later"), start + Duration::from_secs(5));
        assert!(store.contains_at(&id("early"), start + Duration::from_millis(9_999)));
        assert!(!store.contains_at(&id("early"), start + Duration::from_secs(10)));
        assert!(store.contains_at(&id("later"), start + Duration::from_secs(10)));
        assert_eq!(store.len(), 1, "expired keys are dropped, not only hidden");
        assert!(!store.contains_at(&id("later"), start + Duration::from_secs(15)));
        assert!(store.is_empty());
        assert_eq!(store.key_bytes(), 0);
    }

    #[test]
    fn in_memory_store_remembers_an_expired_key_inserted_again() {
        let start = Instant::now();
        let mut store = InMemoryDedupStore::new().ttl(Duration::from_secs(10));
        store.insert_at(&id("late"), start);
        let expired = start + Duration::from_secs(10);
        assert!(!store.contains_at(&id("late"), expired));
        // Processed again (it was delivered again after it expired): remembered from now.
        store.insert_at(&id("late"), expired);
        assert!(store.contains_at(&id("late"), expired));
        assert!(store.contains_at(&id("late"), expired + Duration::from_millis(9_999)));
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_store_remembers_an_expired_key_inserted_again_before_cleanup() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("dedup.sqlite");
        let retention = Duration::from_secs(3600);
        let mut store = SqliteDedupStore::open(&path, "billing")
            .await
            .unwrap()
            .retention(retention);
        // The first insert runs the cleanup; the next 999 do not, so the aged row stays.
        store.insert(&id("late")).await.unwrap();
        use crate::idempotent::sqlite::{ms_before, now_ms};
        let aged_ms = ms_before(now_ms(), retention + Duration::from_secs(60));
        let aged = rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE sluice_processed_messages SET processed_at_ms = ?1",
                [aged_ms],
            )
            .unwrap();
        assert_eq!(aged, 1);
        assert!(!store.contains(&id("late")).await.unwrap(), "expired");
        assert_eq!(store.len().await.unwrap(), 1, "but not deleted yet");
        // Delivered again and processed again: after insert, contains answers true.
        store.insert(&id("late")).await.unwrap();
        assert!(store.contains(&id("late")).await.unwrap());
        assert_eq!(store.len().await.unwrap(), 1);
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_store_remembers_across_reopening_and_keeps_scopes_apart() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("dedup.sqlite");
        let position = MessageKey::of(&record(3, vec![]));
        {
            let mut store = SqliteDedupStore::open(&path, "billing").await.unwrap();
            assert!(!store.contains(&id("order-1")).await.unwrap());
            store.insert(&id("order-1")).await.unwrap();
            store.insert(&position).await.unwrap();
            store.insert(&id("order-1")).await.unwrap();
            assert_eq!(store.len().await.unwrap(), 2);
        }
        let mut reopened = SqliteDedupStore::open(&path, "billing").await.unwrap();
        assert!(reopened.contains(&id("order-1")).await.unwrap());
        assert!(reopened.contains(&position).await.unwrap());
        assert!(!reopened.contains(&id("order-2")).await.unwrap());
        let mut other_scope = SqliteDedupStore::open(&path, "shipping").await.unwrap();
        assert!(!other_scope.contains(&id("order-1")).await.unwrap());
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_store_forgets_keys_past_the_retention() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("dedup.sqlite");
        let mut store = SqliteDedupStore::open(&path, "billing").await.unwrap();
        store.insert(&id("old")).await.unwrap();
        // A zero retention makes every stored key expired at once.
        let mut expired = store.clone().retention(Duration::ZERO);
        assert!(!expired.contains(&id("old")).await.unwrap());
        assert!(store.contains(&id("old")).await.unwrap());
        assert_eq!(expired.delete_expired().await.unwrap(), 1);
        assert_eq!(store.len().await.unwrap(), 0);
    }
}
