//! The transactional outbox: an application writes its business rows and the messages to
//! publish in one SQLite transaction; [`OutboxRelay`] publishes those messages in order, each
//! exactly once, across crashes and restarts.
//!
//! ```text
//!  application transaction                    OutboxRelay (one per outbox)
//!  ┌──────────────────────────┐   ┌──────────────────────────────────────────────────────────┐
//!  │ INSERT INTO orders ...   │   │ start: producer "NAME" (fences the previous instance)    │
//!  │ outbox::insert(&tx, msg) │──▶│        reconcile: read back [scan_from, end) of each     │
//!  │ COMMIT                   │   │        partition, mark the rows found there as sent      │
//!  └──────────────────────────┘   │ loop:  ensure a scan_from for every partition of a topic │
//!                                 │        publish unsent rows in id order (headers outbox-id │
//!                                 │        = NAME:ID, message-id), wait for the offsets      │
//!                                 │        mark them sent + advance scan_from, one transaction│
//!                                 └──────────────────────────────────────────────────────────┘
//! ```
//!
//! # Why a crash at any step neither loses nor duplicates a row
//!
//! A row is marked sent only after the broker acknowledged it (`acks=durable`), so a crash
//! before the mark loses nothing: the row is still unsent. The danger is the other way: a
//! crash between publishing and marking leaves rows that are in the topic but unmarked, and
//! publishing them again would duplicate them. The broker's idempotence does not help across
//! a restart on its own: it drops a batch resent with the *same* sequence numbers, but a
//! restarted producer continues its sequences after the last one the broker saw, so the same
//! rows sent again are new batches to it. Persisting the producer's batches and sequence
//! numbers to resend them byte for byte would tie the relay to the producer's internals.
//!
//! Instead the relay reads back what it wrote. Every published record carries the header
//! [`OUTBOX_ID_HEADER`] = `NAME:ID`. For each partition of each topic it publishes to, the
//! relay keeps `scan_from` in `sluice_outbox_scan`: an offset below which every record of this
//! relay is already marked. `scan_from` is written (at the partition's end) *before* the
//! first publish to a topic, and moves forward only in the transaction that marks rows. On
//! start, and after any publishing error, the relay:
//!
//! 1. takes its producer id under its stable name (InitProducerId). This fences the previous
//!    instance: a relay that was thought dead but still runs can no longer write, so what is
//!    in the topic stops changing under the next step;
//! 2. reads every partition from `scan_from` to its current end and marks the rows whose
//!    `outbox-id` it finds (with the offsets found) once the broker says they are fsynced
//!    (ListOffsets `Durable`: it serves records before their fsync), then moves `scan_from` to
//!    that end;
//! 3. only then publishes the rows still unsent.
//!
//! So a row is published again only when it is not in the topic. Within a run, retries of a
//! batch (lost answers, reconnects) are deduplicated by the broker's idempotence. Rows go out
//! in id order, one batch of at most `max_batch_rows` at a time, on one producer, so each
//! partition gets its rows in id order. (If a batch timed out after all retries while later
//! rows got through, the missing row is published after them on the next try: still once,
//! but out of order. Timeouts are minutes by default.)
//!
//! Costs and limits: a read-back after every restart, of what was written to those partitions
//! since the last mark, or since the last minute for partitions the relay's recent batches
//! did not go to (with every row published marked, the relay moves all `scan_from` to the
//! partitions' ends at most once a minute: other writers' records would otherwise pile up in
//! front of a read-back until it could not finish within its timeout). Records deleted by retention before they were read
//! back cannot be found, and their rows would be published again: keep the relay running
//! well within the topic's retention. One relay name per outbox: the relay refuses a database
//! that another name relays. The application must create the topics.
//!
//! Consumers dedup with the `message-id` header (set to `NAME:ID` unless the message has one),
//! so an [`IdempotentConsumer`](super::IdempotentConsumer) downstream needs no extra setup.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sluice_protocol::messages::OffsetSpec;

use super::sqlite::{self, SharedConnection};
use super::{Error, MESSAGE_ID_HEADER, Result};
use crate::client::Client;
use crate::consumer::Seek;
use crate::producer::{Acks, Producer, Record};

/// The header naming the outbox row a record came from: `RELAY_NAME:ROW_ID`.
pub const OUTBOX_ID_HEADER: &str = "outbox-id";

/// A message to publish, as the application writes it into the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    topic: String,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

impl OutboxMessage {
    /// A message for `topic` with `value`, no key and no headers.
    pub fn new(topic: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        OutboxMessage {
            topic: topic.into(),
            key: None,
            value: value.into(),
            headers: Vec::new(),
        }
    }

    /// The record key (which partition it goes to). Default = none.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header. Default = none.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Creates the outbox tables if needed. [`insert`] and [`OutboxRelay`] need them.
pub fn create_schema(connection: &Connection) -> rusqlite::Result<()> {
    // AUTOINCREMENT: ids are never reused, even after sent rows are deleted, because an id
    // in a topic's outbox-id header must keep meaning the same row.
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS sluice_outbox (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             topic TEXT NOT NULL,
             record_key BLOB,
             value BLOB NOT NULL,
             headers BLOB NOT NULL,
             created_at_ms INTEGER NOT NULL,
             sent_at_ms INTEGER,
             sent_partition INTEGER,
             sent_offset INTEGER
         );
         CREATE INDEX IF NOT EXISTS sluice_outbox_unsent
             ON sluice_outbox (id) WHERE sent_at_ms IS NULL;
         CREATE TABLE IF NOT EXISTS sluice_outbox_scan (
             topic TEXT NOT NULL,
             partition INTEGER NOT NULL,
             scan_from_offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS sluice_outbox_relay (name TEXT NOT NULL);",
    )
}

/// Adds `message` to the outbox and returns its row id. Call it with the transaction that
/// writes the business rows (`&transaction` derefs to a connection), so both commit or
/// neither does.
pub fn insert(connection: &Connection, message: &OutboxMessage) -> rusqlite::Result<i64> {
    connection.execute(
        "INSERT INTO sluice_outbox (topic, record_key, value, headers, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            message.topic,
            message.key,
            message.value,
            encode_headers(&message.headers)?,
            sqlite::now_ms()
        ],
    )?;
    Ok(connection.last_insert_rowid())
}

/// Headers as stored: for each, the name's length (u16, big-endian), the name, the value's
/// length (u32, big-endian), the value.
/// A header too long to store is refused, as a value SQLite cannot take: the application's
/// transaction gets the error (no panic), and can roll back.
fn encode_headers(headers: &[(String, Vec<u8>)]) -> rusqlite::Result<Vec<u8>> {
    let too_long = |error| rusqlite::Error::ToSqlConversionFailure(Box::new(error));
    let mut bytes = Vec::new();
    for (name, value) in headers {
        let name_length = u16::try_from(name.len()).map_err(too_long)?;
        let value_length = u32::try_from(value.len()).map_err(too_long)?;
        bytes.extend_from_slice(&name_length.to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&value_length.to_be_bytes());
        bytes.extend_from_slice(value);
    }
    Ok(bytes)
}

fn decode_headers(mut bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    fn take<'a>(bytes: &mut &'a [u8], count: usize) -> Result<&'a [u8]> {
        if bytes.len() < count {
            return Err(Error::Corrupt(format!(
                "outbox headers end after {} bytes where {count} more were expected",
                bytes.len()
            )));
        }
        let (taken, rest) = bytes.split_at(count);
        *bytes = rest;
        Ok(taken)
    }
    let mut headers = Vec::new();
    while !bytes.is_empty() {
        let name_length = u16::from_be_bytes(take(&mut bytes, 2)?.try_into().expect("2 bytes"));
        let name = std::str::from_utf8(take(&mut bytes, usize::from(name_length))?)
            .map_err(|_| Error::Corrupt("an outbox header name is not UTF-8".into()))?
            .to_owned();
        let value_length = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes"));
        let value_length = usize::try_from(value_length)
            .map_err(|_| Error::Corrupt("an outbox header value is too long".into()))?;
        headers.push((name, take(&mut bytes, value_length)?.to_vec()));
    }
    Ok(headers)
}

/// An outbox row as the relay publishes it.
#[derive(Debug)]
struct UnsentRow {
    id: i64,
    message: OutboxMessage,
}

/// One published row: where it landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedRow {
    pub id: i64,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// Rows published by [`OutboxRelay::publish_pending`] and not yet marked sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "rows stay unsent until mark_sent"]
pub struct PublishedBatch {
    pub rows: Vec<PublishedRow>,
    /// Which publish of its relay this was (1, 2, ...; 0 for an empty batch), so that marking
    /// it re-arms the producer only when no later publish may have left rows unmarked.
    publish: u64,
}

/// Settings of an [`OutboxRelay`].
#[derive(Clone, Debug)]
pub struct OutboxRelayBuilder {
    client: Client,
    database_path: PathBuf,
    name: String,
    max_batch_rows: usize,
    read_back_timeout: Duration,
    scan_catch_up_every: Duration,
}

impl OutboxRelayBuilder {
    /// Rows published (and then marked) at a time. At least 1.
    ///
    /// Default = 500.
    pub fn max_batch_rows(mut self, max_batch_rows: usize) -> Self {
        self.max_batch_rows = max_batch_rows.max(1);
        self
    }

    /// How long the read-back after a restart may take before it fails.
    ///
    /// Default = 30 s.
    pub fn read_back_timeout(mut self, read_back_timeout: Duration) -> Self {
        self.read_back_timeout = read_back_timeout;
        self
    }

    /// How often, at most, the relay moves where a read-back starts to the partitions' ends
    /// (only while every row it published is marked), so that other writers' records do not
    /// pile up in front of the read-back after a restart.
    ///
    /// Default = 60 s.
    pub fn scan_catch_up_every(mut self, every: Duration) -> Self {
        self.scan_catch_up_every = every;
        self
    }

    /// Opens the outbox, takes the producer name (fencing any older relay of this name) and
    /// reads back what an earlier instance published but did not mark.
    ///
    /// # Errors
    /// [`Error::Usage`] when another relay name relays this outbox; SQLite, producer and
    /// read-back errors.
    pub async fn build(self) -> Result<OutboxRelay> {
        let path = self.database_path.clone();
        let name = self.name.clone();
        let connection = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let mut connection = sqlite::open(&path)?;
            // The check and the claim in one transaction that takes the write lock first:
            // as two statements, two relays of different names starting together could both
            // find no owner and both claim the outbox, and publish every row twice.
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            create_schema(&transaction)?;
            let owner: Option<String> = transaction
                .query_row("SELECT name FROM sluice_outbox_relay", [], |row| row.get(0))
                .optional()?;
            match owner {
                None => {
                    transaction.execute(
                        "INSERT INTO sluice_outbox_relay (name) VALUES (?1)",
                        [&name],
                    )?;
                }
                Some(owner) if owner == name => {}
                Some(owner) => {
                    return Err(Error::Usage(format!(
                        "the outbox in {} is relayed by {owner:?}, not {name:?}: two relays of one \
                         outbox would publish its rows twice",
                        path.display()
                    )));
                }
            }
            transaction.commit()?;
            Ok(connection)
        })
        .await
        .map_err(|_| Error::Cancelled)??;
        let mut relay = OutboxRelay {
            client: self.client,
            connection: Arc::new(Mutex::new(connection)),
            name: self.name.into(),
            max_batch_rows: self.max_batch_rows,
            read_back_timeout: self.read_back_timeout,
            producer: None,
            published_by: None,
            publishes: 0,
            known_topics: HashSet::new(),
            scan_catch_up_every: self.scan_catch_up_every,
            scan_caught_up_at: Instant::now(),
        };
        relay.producer().await?;
        Ok(relay)
    }
}

/// Publishes the outbox's rows in order, each exactly once (see the [module docs](self)).
///
/// ```no_run
/// use sluice_client::Client;
/// use sluice_client::idempotent::outbox::{self, OutboxMessage, OutboxRelay};
///
/// # async fn example() -> sluice_client::idempotent::Result<()> {
/// // The application, in its own transaction:
/// let mut connection = rusqlite::Connection::open("shop.sqlite")?;
/// outbox::create_schema(&connection)?;
/// let transaction = connection.transaction()?;
/// transaction.execute("INSERT INTO orders (id, total) VALUES (7, 1250)", [])?;
/// outbox::insert(&transaction, &OutboxMessage::new("orders", "order 7 placed").key("7"))?;
/// transaction.commit()?;
///
/// // The relay, somewhere else:
/// let client = Client::connect("tcp://127.0.0.1:7171").await?;
/// let mut relay = OutboxRelay::builder(&client, "shop.sqlite", "shop-outbox").build().await?;
/// while relay.relay_once().await? > 0 {}
/// relay.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct OutboxRelay {
    client: Client,
    connection: SharedConnection,
    name: Arc<str>,
    max_batch_rows: usize,
    read_back_timeout: Duration,
    /// `None` at first, and from the moment a publish starts until its rows are marked sent:
    /// whatever comes between (an error, a failed mark, a publish dropped half-way, another
    /// publish before the mark) leaves rows that may be in the topic unmarked, and the next
    /// publish must take a new producer epoch and read back before it sends anything, or it
    /// would send those rows again.
    producer: Option<Producer>,
    /// The producer of the last publish, back in `producer` once that publish's rows are
    /// marked sent. Marking an earlier batch does not bring it back: the last publish's rows
    /// are still unmarked. Dropped when a new producer is taken (that fenced it).
    published_by: Option<Producer>,
    /// Publishes with rows so far; the last one's number is in its [`PublishedBatch`].
    publishes: u64,
    /// Topics whose partitions all have a `scan_from` row.
    known_topics: HashSet<String>,
    /// How often, at most, every `scan_from` moves to its partition's end.
    scan_catch_up_every: Duration,
    /// When every `scan_from` last moved to its partition's end.
    scan_caught_up_at: Instant,
}

impl OutboxRelay {
    /// A relay of the outbox in the SQLite file at `database_path`, publishing with the
    /// idempotent producer named `name`. The name must stay the same across restarts.
    pub fn builder(
        client: &Client,
        database_path: impl AsRef<Path>,
        name: impl Into<String>,
    ) -> OutboxRelayBuilder {
        OutboxRelayBuilder {
            client: client.clone(),
            database_path: database_path.as_ref().to_path_buf(),
            name: name.into(),
            max_batch_rows: 500,
            read_back_timeout: Duration::from_secs(30),
            scan_catch_up_every: Duration::from_secs(60),
        }
    }

    /// The producer, taking a new one (and reading back) when there is none.
    async fn producer(&mut self) -> Result<Producer> {
        if let Some(producer) = &self.producer {
            return Ok(producer.clone());
        }
        // InitProducerId under the name first: it fences the previous instance, so nothing
        // more lands in the topics while they are read back.
        let producer = self
            .client
            .producer()
            .producer_name(&*self.name)
            .acks(Acks::Durable)
            .linger(Duration::ZERO)
            .build()
            .await?;
        // The last publish's producer is fenced now: marking its batch must not re-arm it.
        self.published_by = None;
        self.read_back().await?;
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Reads every partition this relay publishes to from its `scan_from` to its end, marks
    /// the rows found there as sent, and moves `scan_from` to the end. Partitions added to a
    /// topic since get a `scan_from` at their end. Returns how many rows it marked.
    async fn read_back(&mut self) -> Result<usize> {
        let scan: Vec<(String, u32, u64)> = sqlite::blocking(&self.connection, |connection| {
            let mut statement = connection.prepare(
                "SELECT topic, partition, scan_from_offset FROM sluice_outbox_scan
                 ORDER BY topic, partition",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)?))
                })?
                .collect::<rusqlite::Result<Vec<(String, u32, i64)>>>()?;
            rows.into_iter()
                .map(|(topic, partition, offset)| Ok((topic, partition, offset_from_sql(offset)?)))
                .collect()
        })
        .await?;
        let topics: BTreeSet<String> = scan.iter().map(|(topic, _, _)| topic.clone()).collect();
        let mut scan_from: BTreeMap<(String, u32), u64> = scan
            .into_iter()
            .map(|(topic, partition, offset)| ((topic, partition), offset))
            .collect();
        // Where each partition ends now; records after it are not this relay's (it is fenced).
        let ends = self.partition_ends(&topics).await?;
        for (partition, end) in &ends {
            scan_from.entry(partition.clone()).or_insert(*end);
        }
        let mut remaining: BTreeMap<(String, u32), u64> = ends
            .iter()
            .filter(|(partition, end)| scan_from.get(*partition).is_some_and(|from| from < *end))
            .map(|(partition, end)| (partition.clone(), *end))
            .collect();
        let mut found: Vec<PublishedRow> = Vec::new();
        let deadline = Instant::now() + self.read_back_timeout;
        if !remaining.is_empty() {
            let mut consumer = self.client.consumer().build().await?;
            for (topic, partition) in remaining.keys() {
                let from = scan_from[&(topic.clone(), *partition)];
                consumer
                    .assign(&[(topic.clone(), *partition)], Seek::Offset(from))
                    .await?;
            }
            let prefix = format!("{}:", self.name);
            while !remaining.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let record = match tokio::time::timeout(left, consumer.next()).await {
                    Err(_elapsed) => {
                        return Err(Error::Timeout(format!(
                            "outbox read-back did not reach the end of {remaining:?} within {} ms",
                            self.read_back_timeout.as_millis()
                        )));
                    }
                    Ok(None) => return Err(Error::Usage("the read-back consumer stopped".into())),
                    Ok(Some(record)) => record?,
                };
                let partition = (record.topic.to_string(), record.partition);
                let Some(end) = remaining.get(&partition).copied() else {
                    continue;
                };
                if record.offset >= end {
                    remaining.remove(&partition);
                    continue;
                }
                if record.offset + 1 == end {
                    remaining.remove(&partition);
                }
                let outbox_id = record
                    .headers
                    .iter()
                    .find(|(name, _)| name == OUTBOX_ID_HEADER)
                    .and_then(|(_, value)| std::str::from_utf8(value).ok())
                    .and_then(|value| value.strip_prefix(&prefix))
                    .and_then(|id| id.parse::<i64>().ok());
                if let Some(id) = outbox_id {
                    found.push(PublishedRow {
                        id,
                        topic: partition.0,
                        partition: partition.1,
                        offset: record.offset,
                    });
                }
            }
            drop(consumer);
        }
        self.wait_until_durable(&found, deadline).await?;
        // Everything below each end has been looked at. Setting (not raising) scan_from also
        // follows a topic that was deleted and created again, whose end moved back.
        let marked = sqlite::blocking(&self.connection, move |connection| {
            let transaction = connection.transaction()?;
            let marked = mark_rows(&transaction, &found)?;
            for ((topic, partition), end) in &ends {
                transaction.execute(
                    "INSERT INTO sluice_outbox_scan (topic, partition, scan_from_offset)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (topic, partition)
                     DO UPDATE SET scan_from_offset = excluded.scan_from_offset",
                    params![topic, partition, offset_to_sql(*end)?],
                )?;
            }
            transaction.commit()?;
            Ok(marked)
        })
        .await?;
        if marked > 0 {
            tracing::info!(
                relay = %self.name,
                rows = marked,
                "outbox rows found published but not marked; marked them sent"
            );
        }
        self.known_topics = topics.into_iter().collect();
        Ok(marked)
    }

    /// Waits until every record in `found` is fsynced. The broker serves records as soon as
    /// they are appended, before their fsync: the previous relay's last batch may be found
    /// while its fsync is under way, or after it failed (or a power loss may take it before it
    /// completes). Marked sent then, its rows would be in no topic and never published.
    async fn wait_until_durable(&self, found: &[PublishedRow], deadline: Instant) -> Result<()> {
        let mut last: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        for row in found {
            let offset = last.entry((row.topic.as_str(), row.partition)).or_default();
            *offset = (*offset).max(row.offset);
        }
        let admin = self.client.admin();
        for ((topic, partition), last) in last {
            loop {
                let (durable, _) = admin
                    .list_offset(topic, partition, OffsetSpec::Durable)
                    .await?;
                if durable > last {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Timeout(format!(
                        "outbox read-back: {topic}/{partition} is not fsynced up to offset \
                         {last} within {} ms (its rows stay unsent)",
                        self.read_back_timeout.as_millis()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// Where each partition of `topics` ends now.
    async fn partition_ends<'t>(
        &self,
        topics: impl IntoIterator<Item = &'t String>,
    ) -> Result<BTreeMap<(String, u32), u64>> {
        let admin = self.client.admin();
        let mut ends = BTreeMap::new();
        for topic in topics {
            for partition in 0..admin.partition_count(topic).await? {
                let (end, _) = admin
                    .list_offset(topic, partition, OffsetSpec::Latest)
                    .await?;
                ends.insert((topic.clone(), partition), end);
            }
        }
        Ok(ends)
    }

    /// Gives every partition of `topics` a `scan_from` (its end now) before anything is
    /// published there, so a read-back after a crash knows where to look.
    async fn ensure_scan_positions(&mut self, topics: BTreeSet<String>) -> Result<()> {
        let new: Vec<String> = topics
            .into_iter()
            .filter(|topic| !self.known_topics.contains(topic))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let ends = self.partition_ends(&new).await?;
        sqlite::blocking(&self.connection, move |connection| {
            let transaction = connection.transaction()?;
            for ((topic, partition), end) in ends {
                transaction.execute(
                    "INSERT OR IGNORE INTO sluice_outbox_scan (topic, partition, scan_from_offset)
                     VALUES (?1, ?2, ?3)",
                    params![topic, partition, offset_to_sql(end)?],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await?;
        self.known_topics.extend(new);
        Ok(())
    }

    /// With every row published marked (no record of this relay lies past a mark), moves every
    /// `scan_from` to its partition's end, at most every `scan_catch_up_every`. A failure
    /// only leaves them where they were.
    async fn catch_up_scan_positions(&mut self) {
        if self.scan_caught_up_at.elapsed() < self.scan_catch_up_every {
            return;
        }
        self.scan_caught_up_at = Instant::now();
        let topics: Vec<String> = self.known_topics.iter().cloned().collect();
        let moved = match self.partition_ends(&topics).await {
            Ok(ends) => {
                sqlite::blocking(&self.connection, move |connection| {
                    let transaction = connection.transaction()?;
                    for ((topic, partition), end) in ends {
                        transaction.execute(
                            "UPDATE sluice_outbox_scan
                             SET scan_from_offset = MAX(scan_from_offset, ?3)
                             WHERE topic = ?1 AND partition = ?2",
                            params![topic, partition, offset_to_sql(end)?],
                        )?;
                    }
                    transaction.commit()?;
                    Ok(())
                })
                .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = moved {
            tracing::debug!(relay = %self.name, %error, "outbox scan positions not moved on");
        }
    }

    /// Publishes up to `max_batch_rows` unsent rows in id order and waits until the broker
    /// acknowledged each (durably). The rows are not marked: call
    /// [`mark_sent`](Self::mark_sent) (or use [`relay_once`](Self::relay_once)). An empty
    /// batch means the outbox had nothing to send.
    ///
    /// # Errors
    /// SQLite or producer errors. After one, the next call takes a new producer epoch and
    /// reads back what this call may have published before sending anything again.
    pub async fn publish_pending(&mut self) -> Result<PublishedBatch> {
        let producer = self.producer().await?;
        let limit = i64::try_from(self.max_batch_rows).unwrap_or(i64::MAX);
        let rows = sqlite::blocking(&self.connection, move |connection| {
            let mut statement = connection.prepare(
                "SELECT id, topic, record_key, value, headers FROM sluice_outbox
                 WHERE sent_at_ms IS NULL ORDER BY id LIMIT ?1",
            )?;
            let mut rows = statement.query([limit])?;
            let mut unsent = Vec::new();
            while let Some(row) = rows.next()? {
                let headers: Vec<u8> = row.get(4)?;
                unsent.push(UnsentRow {
                    id: row.get(0)?,
                    message: OutboxMessage {
                        topic: row.get(1)?,
                        key: row.get(2)?,
                        value: row.get(3)?,
                        headers: decode_headers(&headers)?,
                    },
                });
            }
            Ok(unsent)
        })
        .await?;
        if rows.is_empty() {
            return Ok(PublishedBatch::default());
        }
        self.ensure_scan_positions(rows.iter().map(|row| row.message.topic.clone()).collect())
            .await?;
        // Until the rows are marked, the next publish starts with a new epoch and a read-back
        // (see `producer`): what of the batch got through is found there, not sent again.
        self.producer = None;
        self.published_by = None;
        self.publishes += 1;
        let published = self.send(&producer, &rows).await?;
        self.published_by = Some(producer);
        Ok(PublishedBatch {
            rows: published,
            publish: self.publishes,
        })
    }

    async fn send(&self, producer: &Producer, rows: &[UnsentRow]) -> Result<Vec<PublishedRow>> {
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let outbox_id = format!("{}:{}", self.name, row.id);
            let message = &row.message;
            let mut record = Record::new(&message.topic, message.value.clone())
                .header(OUTBOX_ID_HEADER, outbox_id.clone());
            // An empty message id is none (`MessageKey::of` skips it): the relay's stands in.
            if !message
                .headers
                .iter()
                .any(|(name, value)| name == MESSAGE_ID_HEADER && !value.is_empty())
            {
                record = record.header(MESSAGE_ID_HEADER, outbox_id);
            }
            for (name, value) in &message.headers {
                record = record.header(name.clone(), value.clone());
            }
            if let Some(key) = &message.key {
                record = record.key(key.clone());
            }
            deliveries.push(producer.enqueue(record).await?);
        }
        producer.flush().await?;
        let mut published = Vec::with_capacity(rows.len());
        for (row, delivery) in rows.iter().zip(deliveries) {
            let delivery = delivery.await?;
            let offset = delivery.offset.ok_or_else(|| {
                Error::Usage("the relay's producer got no offset (acks must not be none)".into())
            })?;
            published.push(PublishedRow {
                id: row.id,
                topic: row.message.topic.clone(),
                partition: delivery.partition,
                offset,
            });
        }
        Ok(published)
    }

    /// Marks published rows sent (with their partition and offset) and moves each partition's
    /// `scan_from` past them, in one transaction. Returns how many rows changed.
    ///
    /// Marking the last batch published lets the next publish go on with the same producer;
    /// after marking an earlier one (a later publish came first), the next publish takes a new
    /// producer epoch and reads back what the later publish sent.
    pub async fn mark_sent(&mut self, batch: &PublishedBatch) -> Result<usize> {
        let rows = batch.rows.clone();
        let marked = sqlite::blocking(&self.connection, move |connection| {
            let transaction = connection.transaction()?;
            let marked = mark_rows(&transaction, &rows)?;
            for row in &rows {
                transaction.execute(
                    "UPDATE sluice_outbox_scan SET scan_from_offset = MAX(scan_from_offset, ?3)
                     WHERE topic = ?1 AND partition = ?2",
                    params![row.topic, row.partition, offset_to_sql(row.offset + 1)?],
                )?;
            }
            transaction.commit()?;
            Ok(marked)
        })
        .await?;
        // The last publish is marked, so every row published is (the read-back before that
        // publish marked the earlier ones): the producer may go on without a read-back.
        if batch.publish == self.publishes
            && let Some(producer) = self.published_by.take()
        {
            self.producer = Some(producer);
            self.catch_up_scan_positions().await;
        }
        Ok(marked)
    }

    /// Publishes one batch and marks it sent. Returns how many rows were sent (0 when the
    /// outbox is empty).
    pub async fn relay_once(&mut self) -> Result<usize> {
        let batch = self.publish_pending().await?;
        if batch.rows.is_empty() {
            return Ok(0);
        }
        self.mark_sent(&batch).await?;
        Ok(batch.rows.len())
    }

    /// Rows not marked sent yet.
    pub async fn unsent_count(&self) -> Result<u64> {
        let count: i64 = sqlite::blocking(&self.connection, |connection| {
            Ok(connection.query_row(
                "SELECT COUNT(*) FROM sluice_outbox WHERE sent_at_ms IS NULL",
                [],
                |row| row.get(0),
            )?)
        })
        .await?;
        Ok(count.unsigned_abs())
    }

    /// Deletes rows sent more than `age` ago, so the table does not grow forever. Returns how
    /// many.
    pub async fn delete_sent_older_than(&self, age: Duration) -> Result<usize> {
        let sent_before_ms = sqlite::ms_before(sqlite::now_ms(), age);
        sqlite::blocking(&self.connection, move |connection| {
            Ok(connection.execute(
                "DELETE FROM sluice_outbox WHERE sent_at_ms IS NOT NULL AND sent_at_ms < ?1",
                [sent_before_ms],
            )?)
        })
        .await
    }

    /// Closes the producer (delivering anything still buffered).
    pub async fn close(self) -> Result<()> {
        for producer in [self.producer, self.published_by].into_iter().flatten() {
            producer.close().await?;
        }
        Ok(())
    }
}

/// An offset as SQLite stores it (a signed 64-bit integer).
fn offset_to_sql(offset: u64) -> rusqlite::Result<i64> {
    i64::try_from(offset).map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))
}

fn offset_from_sql(offset: i64) -> Result<u64> {
    u64::try_from(offset)
        .map_err(|_| Error::Corrupt(format!("negative offset {offset} in sluice_outbox_scan")))
}

/// Marks rows sent; a row already marked keeps its first mark. Returns how many changed.
fn mark_rows(connection: &Connection, rows: &[PublishedRow]) -> rusqlite::Result<usize> {
    let now_ms = sqlite::now_ms();
    let mut marked = 0;
    for row in rows {
        marked += connection.execute(
            "UPDATE sluice_outbox SET sent_at_ms = ?2, sent_partition = ?3, sent_offset = ?4
             WHERE id = ?1 AND sent_at_ms IS NULL",
            params![row.id, now_ms, row.partition, offset_to_sql(row.offset)?],
        )?;
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_every_truncation_is_refused() {
        let headers = vec![
            ("trace".to_owned(), b"4bf92f35".to_vec()),
            ("empty".to_owned(), Vec::new()),
            ("ünïcode".to_owned(), vec![0, 255]),
        ];
        let bytes = encode_headers(&headers).unwrap();
        assert_eq!(decode_headers(&bytes).unwrap(), headers);
        // A name over 64 KiB is an error for the caller's transaction, not a panic.
        assert!(encode_headers(&[("n".repeat(70_000), Vec::new())]).is_err());
        assert_eq!(decode_headers(&[]).unwrap(), Vec::new());
        // Cutting anywhere inside a header leaves an incomplete one; cutting between headers
        // leaves fewer, whole ones.
        let boundaries = [0, 2 + 5 + 4 + 8, 2 + 5 + 4 + 8 + 2 + 5 + 4];
        for length in 0..bytes.len() {
            match decode_headers(&bytes[..length]) {
                Ok(decoded) => assert!(
                    boundaries.contains(&length),
                    "cut at {length} decoded: {decoded:?}"
                ),
                Err(Error::Corrupt(_)) => assert!(!boundaries.contains(&length)),
                Err(other) => panic!("unexpected error {other}"),
            }
        }
    }

    #[test]
    fn insert_stores_the_message_in_the_callers_transaction() {
        let mut connection = Connection::open_in_memory().unwrap();
        create_schema(&connection).unwrap();
        let message = OutboxMessage::new("orders", "placed")
            .key("7")
            .header("trace", "t1");
        {
            let transaction = connection.transaction().unwrap();
            insert(&transaction, &message).unwrap();
            // Dropped without commit: rolled back with the business rows it belonged to.
        }
        let count = |connection: &Connection| -> i64 {
            connection
                .query_row("SELECT COUNT(*) FROM sluice_outbox", [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(count(&connection), 0);
        let transaction = connection.transaction().unwrap();
        let first = insert(&transaction, &message).unwrap();
        let second = insert(&transaction, &message).unwrap();
        transaction.commit().unwrap();
        assert_eq!(count(&connection), 2);
        assert!(second > first, "ids follow insertion order");
        let (key, headers): (Vec<u8>, Vec<u8>) = connection
            .query_row(
                "SELECT record_key, headers FROM sluice_outbox WHERE id = ?1",
                [first],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(key, b"7");
        assert_eq!(
            decode_headers(&headers).unwrap(),
            vec![("trace".to_owned(), b"t1".to_vec())]
        );
    }
}
