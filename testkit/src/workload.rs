//! The moving parts the reliability tests share: producers that log what was acknowledged,
//! standalone consumers that log what they read, and a final read of a whole topic.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sluice_client::producer::{Acks, Record};
use sluice_client::protocol::messages::OffsetSpec;
use sluice_client::{Client, Seek};

use crate::history::History;

/// One acknowledged record.
#[derive(Clone, Debug)]
pub struct Acked {
    pub partition: u32,
    pub offset: u64,
    pub value: String,
    /// When the acknowledgement reached the producer.
    pub at: Instant,
}

/// One record a consumer read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    pub partition: u32,
    pub offset: u64,
    pub value: String,
}

/// What a producer or consumer task logs, shared with the test while it runs.
#[derive(Debug)]
pub struct Log<T> {
    entries: Mutex<Vec<T>>,
    errors: Mutex<Vec<String>>,
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Log {
            entries: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        }
    }
}

impl<T: Clone> Log<T> {
    pub fn push(&self, entry: T) {
        self.entries.lock().expect("log lock poisoned").push(entry);
    }

    pub fn error(&self, error: String) {
        self.errors.lock().expect("log lock poisoned").push(error);
    }

    /// A copy of the entries so far.
    pub fn entries(&self) -> Vec<T> {
        self.entries.lock().expect("log lock poisoned").clone()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("log lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the errors so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("log lock poisoned").clone()
    }
}

/// Connects, retrying while the broker is down or restarting (up to a minute).
///
/// # Errors
/// The last connection error after a minute.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect_with(url, crate::restart_tolerant_client_options()).await {
            Ok(client) => return Ok(client),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error).context("connect"),
        }
    }
}

/// How a producer task sends.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    pub topic: String,
    /// Each value starts with this (values must be unique across the test).
    pub name: String,
    pub acks: Acks,
    /// Records awaiting their acknowledgement at most.
    pub window: usize,
    /// Pause after each record, to bound the history's size.
    pub pause: Duration,
    /// Bytes added to each value so segments fill and roll.
    pub padding_bytes: usize,
}

/// Sends unique values with an idempotent producer until `stop`, then waits for every
/// outstanding acknowledgement (so call it with the broker up at the end), and closes the
/// producer. Acknowledged records go to `log`, failed ones to its errors.
///
/// # Errors
/// Building or closing the producer failed (a fatal producer error is returned by close).
pub async fn produce(
    client: Client,
    settings: ProducerSettings,
    stop: Arc<AtomicBool>,
    log: Arc<Log<Acked>>,
) -> anyhow::Result<()> {
    let producer = client
        .producer()
        .acks(settings.acks)
        .linger(Duration::from_millis(2))
        // Below the small segment and message sizes the tests give their topics.
        .batch_bytes(8 * 1024)
        .request_timeout(Duration::from_secs(10))
        .delivery_timeout(Duration::from_secs(600))
        .build()
        .await
        .context("build producer")?;
    let padding = "x".repeat(settings.padding_bytes);
    let mut pending = VecDeque::new();
    let mut sequence = 0u64;
    let settle = |value: String, outcome: sluice_client::error::Result<sluice_client::Delivery>| {
        match outcome {
            Ok(delivery) => match delivery.offset {
                Some(offset) => log.push(Acked {
                    partition: delivery.partition,
                    offset,
                    value,
                    at: Instant::now(),
                }),
                None => log.error(format!("{value}: acknowledged without an offset")),
            },
            Err(error) => log.error(format!("{value}: {error}")),
        }
    };
    while !stop.load(Ordering::Acquire) {
        let value = format!("{}-{sequence:09}-{padding}", settings.name);
        sequence += 1;
        let future = match producer
            .enqueue(Record::new(&settings.topic, value.clone()))
            .await
        {
            Ok(future) => future,
            Err(error) => {
                log.error(format!("{value}: enqueue: {error}"));
                break;
            }
        };
        pending.push_back((value, future));
        while pending.len() >= settings.window.max(1) {
            let (value, future) = pending.pop_front().expect("not empty");
            settle(value, future.await);
        }
        if !settings.pause.is_zero() {
            tokio::time::sleep(settings.pause).await;
        }
    }
    while let Some((value, future)) = pending.pop_front() {
        settle(value, future.await);
    }
    producer.close().await.context("close producer")
}

/// Reads every partition of `topic` from the earliest offset with a standalone consumer until
/// `stop`, logging records and stream errors (a batch that failed its CRC, say).
///
/// # Errors
/// The consumer could not start.
pub async fn consume(
    client: Client,
    topic: String,
    partitions: u32,
    stop: Arc<AtomicBool>,
    log: Arc<Log<ReadRecord>>,
) -> anyhow::Result<()> {
    let mut consumer = client
        .consumer()
        .fetch_max_wait(Duration::from_millis(100))
        .build()
        .await?;
    let assignment: Vec<(String, u32)> = (0..partitions)
        .map(|partition| (topic.clone(), partition))
        .collect();
    consumer.assign(&assignment, Seek::Earliest).await?;
    while !stop.load(Ordering::Acquire) {
        tokio::select! {
            record = consumer.next() => match record {
                Some(Ok(record)) => log.push(ReadRecord {
                    partition: record.partition,
                    offset: record.offset,
                    value: String::from_utf8_lossy(&record.value).into_owned(),
                }),
                Some(Err(error)) => log.error(error.to_string()),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(())
}

/// The end offset (the next offset to be written) of each partition.
///
/// # Errors
/// A ListOffsets call failed after retries.
pub async fn end_offsets(
    client: &Client,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let admin = client.admin();
    let mut ends = BTreeMap::new();
    for partition in 0..partitions {
        let (end, _) = admin
            .list_offset(topic, partition, OffsetSpec::Latest)
            .await
            .with_context(|| format!("end offset of {topic}/{partition}"))?;
        ends.insert(partition, end);
    }
    Ok(ends)
}

/// Reads every partition of `topic` from offset 0 to its current end with a fresh standalone
/// consumer. Returns the records and the end offsets.
///
/// # Errors
/// The read did not reach every end within `deadline`, or the stream reported an error.
pub async fn read_everything(
    client: &Client,
    topic: &str,
    partitions: u32,
    deadline: Duration,
) -> anyhow::Result<(Vec<ReadRecord>, BTreeMap<u32, u64>)> {
    let ends = end_offsets(client, topic, partitions).await?;
    let mut consumer = client
        .consumer()
        .fetch_max_wait(Duration::from_millis(50))
        .build()
        .await?;
    let assignment: Vec<(String, u32)> = (0..partitions)
        .map(|partition| (topic.to_owned(), partition))
        .collect();
    consumer.assign(&assignment, Seek::Offset(0)).await?;
    let mut next: BTreeMap<u32, u64> = (0..partitions).map(|partition| (partition, 0)).collect();
    let mut records = Vec::new();
    let until = Instant::now() + deadline;
    while next.iter().any(|(partition, next)| *next < ends[partition]) {
        let remaining = until.saturating_duration_since(Instant::now());
        let record = match tokio::time::timeout(remaining, consumer.next()).await {
            Ok(Some(Ok(record))) => record,
            Ok(Some(Err(error))) => bail!("the final read failed: {error}"),
            Ok(None) => bail!("the final read's stream ended"),
            Err(_) => bail!(
                "the final read did not reach the end in {deadline:?}: at {next:?}, ends {ends:?}"
            ),
        };
        if record.offset >= ends[&record.partition] {
            continue; // written after the ends were taken
        }
        next.insert(record.partition, record.offset + 1);
        records.push(ReadRecord {
            partition: record.partition,
            offset: record.offset,
            value: String::from_utf8_lossy(&record.value).into_owned(),
        });
    }
    Ok((records, ends))
}

/// Adds acknowledgements to a history.
pub fn add_acknowledged(history: &mut History, topic: &str, acked: &[Acked]) {
    for record in acked {
        history.acknowledged(topic, record.partition, record.offset, &record.value);
    }
}

/// Adds an ordered reader's reads to a history.
pub fn add_reads(history: &mut History, reader: &str, topic: &str, reads: &[ReadRecord]) {
    for record in reads {
        history.read(
            reader,
            topic,
            record.partition,
            record.offset,
            &record.value,
        );
    }
}
