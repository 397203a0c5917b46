//! The consumer: a `futures::Stream` of records, standalone (assign partitions, seek) or as a
//! member of a consumer group (the broker assigns partitions; offsets are committed).
//!
//! ```text
//! heartbeat task ──▶ MemberState ──Assign/Release/Rejoin──▶ shared partition table
//!                                                               │ (fetch offset, generation)
//! fetch task ──long-poll Fetch──▶ batches ──bounded channel──▶ Stream::poll_next ──▶ application
//!                                                               ▲
//!                                 processed positions ──────────┘ (auto commit, release, close)
//! ```
//!
//! # At-least-once, exactly which offsets are committed when
//! A record counts as *processed* once the application asks the stream for the next record,
//! or calls [`Consumer::commit`]. What is committed is always a processed position: the offset
//! after the last processed record of each partition.
//! - With auto commit (the default, every 5 s) the processed positions are committed at that
//!   interval.
//! - Before a partition is released to another member, its processed position is committed.
//! - [`Consumer::commit`] commits every record yielded so far (the application says it is done
//!   with them). [`Consumer::close`] does the same, then leaves the group.
//! - A record yielded but not processed when the member crashes, is fenced or releases its
//!   partition is delivered again to the partition's next owner. Nothing is committed for a
//!   fenced member (its commits would be refused anyway).
//!
//! Without a committed offset a partition starts from the reset policy: `earliest` (default),
//! `latest`, or `error`. A fetch outside the log (`OffsetOutOfRange`, e.g. after retention)
//! applies the same policy.

pub mod group;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use sluice_protocol::ErrorCode;
use sluice_protocol::Response;
use sluice_protocol::batch::RecordBatchRef;
use sluice_protocol::messages::{
    CommitOffsetsRequest, CommitPartition, CommitTopic, FetchOffsetsRequest, FetchPartition,
    FetchRequest, FetchResponse, FetchTopic, LeaveGroupRequest, ListOffsetsPartition,
    ListOffsetsRequest, ListOffsetsTopic, OffsetSpec,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::connection::{PendingResponse, duration_ms};
use crate::error::{Error, Result};
use crate::resilience::Backoff;
use group::{MemberAction, MemberState, TopicPartition};

/// One record, with its key, value and headers as zero-copy slices of the fetched batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

/// Where a partition starts when no offset is committed, or after `OffsetOutOfRange`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetPolicy {
    /// The first offset still in the log. The default.
    #[default]
    Earliest,
    /// The offset the next record will get: only new records.
    Latest,
    /// Fail the stream with an error.
    Error,
}

/// Where to read a standalone partition from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    Earliest,
    Latest,
    Offset(u64),
    /// The first record at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

/// How offsets are committed in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitMode {
    /// Commit processed positions at this interval (and before releasing, and on close).
    Auto(Duration),
    /// Only [`Consumer::commit`] (and releasing, and close) commit.
    Manual,
}

/// Builds a [`Consumer`]. Get one from [`Client::consumer`].
#[derive(Clone, Debug)]
pub struct ConsumerBuilder {
    client: Client,
    group: Option<String>,
    topics: Vec<String>,
    reset: ResetPolicy,
    uncommitted_start: Option<Seek>,
    commit: CommitMode,
    max_wait: Duration,
    max_bytes: u32,
    partition_max_bytes: u32,
    buffer_batches: usize,
    session_timeout: Duration,
    assignor: Option<String>,
}

impl ConsumerBuilder {
    pub(crate) fn new(client: Client) -> Self {
        ConsumerBuilder {
            client,
            group: None,
            topics: Vec::new(),
            reset: ResetPolicy::default(),
            uncommitted_start: None,
            commit: CommitMode::Auto(Duration::from_secs(5)),
            max_wait: Duration::from_millis(500),
            max_bytes: 8 << 20,
            partition_max_bytes: 1 << 20,
            buffer_batches: 64,
            session_timeout: Duration::from_secs(10),
            assignor: None,
        }
    }

    /// Consume as a member of this group. Default = none (standalone).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Topics to subscribe to in group mode.
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Default = [`ResetPolicy::Earliest`].
    pub fn reset_policy(mut self, reset: ResetPolicy) -> Self {
        self.reset = reset;
        self
    }

    /// Group mode: where a partition the group has no committed offset for starts (an offset,
    /// a timestamp, the earliest or the latest). A start outside the log is then reset by the
    /// reset policy. Default = by the reset policy.
    pub fn start_without_commit(mut self, start: Seek) -> Self {
        self.uncommitted_start = Some(start);
        self
    }

    /// Default = `CommitMode::Auto(5 s)`.
    pub fn commit_mode(mut self, commit: CommitMode) -> Self {
        self.commit = commit;
        self
    }

    /// Longest a fetch waits at the broker for data. Default = 500 ms.
    pub fn fetch_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Most bytes per partition per fetch. Default = 1 MiB.
    pub fn partition_max_bytes(mut self, bytes: u32) -> Self {
        self.partition_max_bytes = bytes;
        self
    }

    /// Fetched batches buffered ahead of the application. Default = 64.
    pub fn buffer_batches(mut self, batches: usize) -> Self {
        self.buffer_batches = batches.max(1);
        self
    }

    /// Group session timeout: the broker expires a member it has not heard from for this
    /// long, and a member whose heartbeats go unanswered for this long drops its partitions
    /// and joins again. At least 1 ms (the broker's bounds apply too). Default = 10 s.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// `range`, `round-robin` or `cooperative-sticky` (the broker's default).
    pub fn assignor(mut self, assignor: impl Into<String>) -> Self {
        self.assignor = Some(assignor.into());
        self
    }

    /// Starts the consumer's tasks. In group mode it joins the group at once.
    ///
    /// # Errors
    /// `Usage` for a group without topics.
    pub async fn build(self) -> Result<Consumer> {
        if self.group.is_some() && self.topics.is_empty() {
            return Err(Error::Usage(
                "a group consumer needs at least one topic".into(),
            ));
        }
        if self.session_timeout < Duration::from_millis(1) {
            return Err(Error::Usage("session_timeout must be at least 1 ms".into()));
        }
        let (sender, receiver) = mpsc::channel(self.buffer_batches);
        let member = self.group.as_ref().map(|group| {
            MemberState::new(
                group,
                self.topics.clone(),
                u32::try_from(self.session_timeout.as_millis()).unwrap_or(u32::MAX),
                self.assignor.clone(),
            )
        });
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            settings: self.clone(),
            state: Mutex::new(State {
                partitions: BTreeMap::new(),
                member,
                next_generation: 1,
                unreported_parked: BTreeSet::new(),
            }),
            assignment_changed: Notify::new(),
            heartbeat_now: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let mut tasks = vec![tokio::spawn(fetch_loop(
            Arc::clone(&shared),
            sender.clone(),
        ))];
        if self.group.is_some() {
            tasks.push(tokio::spawn(heartbeat_loop(Arc::clone(&shared), sender)));
        }
        Ok(Consumer {
            shared,
            receiver,
            current: None,
            tasks,
        })
    }
}

impl Client {
    /// A consumer builder on this client.
    pub fn consumer(&self) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone())
    }
}

#[derive(Debug)]
struct PartitionState {
    /// Next offset to fetch.
    fetch_offset: u64,
    /// Changes whenever the partition is (re)assigned or sought, so stale batches are dropped.
    generation: u64,
    /// Offset after the last record handed to the application.
    yielded: Option<u64>,
    /// Offset after the last record the application finished with.
    processed: Option<u64>,
    /// Last committed position.
    committed: Option<u64>,
    /// Pushes the partition's next fetch back after failed ones, and when it may go out.
    fetch_backoff: Backoff,
    retry_at: Option<Instant>,
    /// Assigned with no committed offset under `ResetPolicy::Error`: not fetched until the
    /// application seeks it.
    needs_seek: bool,
}

#[derive(Debug)]
struct State {
    partitions: BTreeMap<TopicPartition, PartitionState>,
    member: Option<MemberState>,
    next_generation: u64,
    /// Parked partitions whose notice did not fit in the stream's buffer yet.
    unreported_parked: BTreeSet<TopicPartition>,
}

impl State {
    /// A generation no partition has had: a partition (re)started under it drops whatever
    /// was fetched under its old one.
    fn take_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }
}

#[derive(Debug)]
struct Shared {
    client: Client,
    settings: ConsumerBuilder,
    state: Mutex<State>,
    assignment_changed: Notify,
    heartbeat_now: Notify,
    closed: AtomicBool,
}

type Delivery = Result<(TopicPartition, u64, Fetched)>;

/// The validated batches of one partition from one fetch.
#[derive(Debug)]
struct Fetched {
    topic: Arc<str>,
    /// Whole batches, back to back, each checked (CRC, structure).
    batches: Bytes,
    /// Records below this offset are not handed out (a batch may start before the fetch
    /// offset).
    from: u64,
    /// The offset after the last record.
    next: u64,
}

/// The records of one partition from one fetch being handed out, with the generation they
/// were fetched in. The stream decodes one batch at a time; `next_batch` hands out the rest
/// undecoded.
#[derive(Debug)]
struct Chunk {
    partition: TopicPartition,
    generation: u64,
    fetched: Fetched,
    /// Where the batches not yet decoded start.
    at: usize,
    /// The decoded records of the batch at `decoded_at` not yet yielded.
    decoded: std::vec::IntoIter<ConsumerRecord>,
    decoded_at: usize,
    /// The position after the last record handed out from this chunk, until it is marked
    /// processed (when the next record or batch is asked for).
    unprocessed: Option<u64>,
}

impl Chunk {
    fn new(partition: TopicPartition, generation: u64, fetched: Fetched) -> Chunk {
        Chunk {
            partition,
            generation,
            fetched,
            at: 0,
            decoded: Vec::new().into_iter(),
            decoded_at: 0,
            unprocessed: None,
        }
    }

    /// Decodes the next batch for the stream; false when none is left.
    fn decode_next_batch(&mut self) -> bool {
        let batches = &self.fetched.batches;
        let Some(size) = sluice_protocol::batch::batch_size(&batches[self.at..])
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| self.at + size <= batches.len())
        else {
            return false;
        };
        let batch = batches.slice(self.at..self.at + size);
        self.decoded = decode_batch(
            &self.fetched.topic,
            self.partition.1,
            &batch,
            self.fetched.from,
        )
        .into_iter();
        self.decoded_at = self.at;
        self.at += size;
        true
    }
}

/// The records of one partition from one fetch, as [`Consumer::next_batch`] hands them out:
/// the fetched batches themselves, checked but not decoded or copied. Iterating borrows the
/// records from them, with no allocation or reference count per record.
#[derive(Clone, Debug)]
pub struct ConsumerBatch {
    topic: Arc<str>,
    partition: u32,
    batches: Bytes,
    from: u64,
    next: u64,
}

impl ConsumerBatch {
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The offset after the last record: where the partition's next batch starts.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// The records in offset order.
    pub fn records(&self) -> impl Iterator<Item = RecordView<'_>> + '_ {
        let from = self.from;
        // Every batch was validated when it was fetched, so nothing here fails.
        sluice_protocol::batch::split_batches(&self.batches)
            .map_while(std::result::Result::ok)
            .flat_map(move |batch| {
                let base_offset = batch.base_offset();
                batch
                    .records()
                    .map_while(std::result::Result::ok)
                    .map(move |record| RecordView {
                        offset: record.offset(base_offset),
                        record,
                    })
            })
            .filter(move |view| view.offset >= from)
    }

    /// The number of records (from the batch headers: nothing is decoded).
    pub fn len(&self) -> usize {
        sluice_protocol::batch::split_batches(&self.batches)
            .map_while(std::result::Result::ok)
            .map(|batch| {
                let first = batch.base_offset().max(self.from);
                (batch.last_offset() + 1).saturating_sub(first) as usize
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A record of a [`ConsumerBatch`], borrowed from the fetched bytes.
#[derive(Clone, Debug)]
pub struct RecordView<'a> {
    offset: u64,
    record: sluice_protocol::batch::Record<'a>,
}

impl<'a> RecordView<'a> {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.record.timestamp_ms
    }

    pub fn key(&self) -> Option<&'a [u8]> {
        self.record.key
    }

    pub fn value(&self) -> &'a [u8] {
        self.record.value
    }

    /// The headers in order (names that are not UTF-8 are left out, as the stream does).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.record.headers().filter_map(std::result::Result::ok)
    }
}

/// A stream of records. Drop it or call [`Consumer::close`] to stop.
#[derive(Debug)]
pub struct Consumer {
    shared: Arc<Shared>,
    receiver: mpsc::Receiver<Delivery>,
    /// The records of one fetched partition being yielded.
    current: Option<Chunk>,
    tasks: Vec<JoinHandle<()>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("consumer lock poisoned")
    }

    /// Resolves where to start reading each partition.
    async fn resolve(
        &self,
        partitions: &BTreeSet<TopicPartition>,
        seek: Option<Seek>,
    ) -> Result<BTreeMap<TopicPartition, u64>> {
        let mut positions = BTreeMap::new();
        let mut need_reset: Vec<(TopicPartition, OffsetSpec)> = Vec::new();
        let mut start_at = |partition: &TopicPartition, seek: Seek| {
            let spec = match seek {
                Seek::Offset(offset) => {
                    positions.insert(partition.clone(), offset);
                    return;
                }
                Seek::Earliest => OffsetSpec::Earliest,
                Seek::Latest => OffsetSpec::Latest,
                Seek::Timestamp(at) => OffsetSpec::Timestamp(at),
            };
            need_reset.push((partition.clone(), spec));
        };
        match (seek, &self.settings.group) {
            (Some(seek), _) => {
                for partition in partitions {
                    start_at(partition, seek);
                }
            }
            (None, Some(group)) => {
                let committed = self.committed(group, partitions).await?;
                for partition in partitions {
                    match (committed.get(partition), self.settings.uncommitted_start) {
                        (Some(offset), _) => start_at(partition, Seek::Offset(*offset)),
                        (None, Some(start)) => start_at(partition, start),
                        // Under `ResetPolicy::Error`, left out: the caller parks it until the
                        // application seeks, while the others start.
                        (None, None) => {
                            if let Some(seek) = reset_seek(self.settings.reset) {
                                start_at(partition, seek);
                            }
                        }
                    }
                }
            }
            (None, None) => {
                if let Some(seek) = reset_seek(self.settings.reset) {
                    for partition in partitions {
                        start_at(partition, seek);
                    }
                }
            }
        }
        if !need_reset.is_empty() {
            positions.extend(self.list_offsets(&need_reset).await?);
        }
        Ok(positions)
    }

    async fn committed(
        &self,
        group: &str,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<BTreeMap<TopicPartition, u64>> {
        let response = self
            .client
            .send_with_retry(FetchOffsetsRequest {
                group_id: group.to_owned(),
                topics: Some(sluice_protocol::messages::TopicPartitions::group(
                    partitions,
                )),
            })
            .await?;
        let Response::FetchOffsets(response) = response else {
            return Err(Error::Usage("unexpected response to FetchOffsets".into()));
        };
        Ok(response
            .topics
            .into_iter()
            .flat_map(|topic| {
                let name = topic.name;
                topic
                    .partitions
                    .into_iter()
                    .filter(|partition| partition.committed_offset >= 0)
                    .map(move |partition| {
                        (
                            (name.clone(), partition.partition),
                            partition.committed_offset as u64,
                        )
                    })
            })
            .collect())
    }

    async fn list_offsets(
        &self,
        specs: &[(TopicPartition, OffsetSpec)],
    ) -> Result<BTreeMap<TopicPartition, u64>> {
        let mut topics: BTreeMap<&str, Vec<ListOffsetsPartition>> = BTreeMap::new();
        for ((topic, partition), spec) in specs {
            topics.entry(topic).or_default().push(ListOffsetsPartition {
                partition: *partition,
                spec: *spec,
            });
        }
        let request = ListOffsetsRequest {
            topics: topics
                .into_iter()
                .map(|(name, partitions)| ListOffsetsTopic {
                    name: name.to_owned(),
                    partitions,
                })
                .collect(),
        };
        let Response::ListOffsets(response) = self.client.send_with_retry(request).await? else {
            return Err(Error::Usage("unexpected response to ListOffsets".into()));
        };
        let mut out = BTreeMap::new();
        for topic in response.topics {
            for partition in topic.partitions {
                if partition.error_code != ErrorCode::None {
                    return Err(Error::Broker {
                        code: partition.error_code,
                        message: Some(format!(
                            "list offsets of {}/{}",
                            topic.name, partition.partition
                        )),
                    });
                }
                out.insert((topic.name.clone(), partition.partition), partition.offset);
            }
        }
        Ok(out)
    }

    /// Starts fetching these partitions from these positions.
    fn start(&self, positions: BTreeMap<TopicPartition, u64>) {
        let mut state = self.state();
        for (partition, offset) in positions {
            let generation = state.take_generation();
            state
                .partitions
                .insert(partition, PartitionState::new(offset, generation, false));
        }
        drop(state);
        self.assignment_changed.notify_one();
    }

    /// Takes these partitions without fetching them: they have no committed offset and the
    /// reset policy is `Error`, so the application says where to start with a seek. Each is
    /// reported on the stream once (see [`Shared::report_parked`]).
    fn park(&self, partitions: &BTreeSet<TopicPartition>, sender: &mpsc::Sender<Delivery>) {
        let mut state = self.state();
        for partition in partitions {
            let generation = state.take_generation();
            state
                .partitions
                .insert(partition.clone(), PartitionState::new(0, generation, true));
        }
        state.unreported_parked.extend(partitions.iter().cloned());
        drop(state);
        self.report_parked(sender);
    }

    /// Tells the stream of each parked partition not told yet, still waiting for a seek.
    /// Without waiting: a stream the application is behind on must not hold back the
    /// heartbeats, which call this again until every notice got in.
    fn report_parked(&self, sender: &mpsc::Sender<Delivery>) {
        let mut state = self.state();
        let unreported = std::mem::take(&mut state.unreported_parked);
        for partition in unreported {
            if !state
                .partitions
                .get(&partition)
                .is_some_and(|entry| entry.needs_seek)
            {
                continue; // sought or released since
            }
            let notice = Err(Error::Broker {
                code: ErrorCode::OffsetOutOfRange,
                message: Some(format!(
                    "no committed offset for {}/{} and the reset policy is Error; seek to go on",
                    partition.0, partition.1
                )),
            });
            if sender.try_send(notice).is_err() {
                state.unreported_parked.insert(partition);
            }
        }
    }

    /// Commits processed positions (or yielded ones when `everything_yielded`) of the given
    /// partitions, or of all when `None`. Returns how many partitions were committed.
    async fn commit(
        &self,
        only: Option<&BTreeSet<TopicPartition>>,
        everything_yielded: bool,
    ) -> Result<usize> {
        let (group, member_id, member_epoch, wanted) = {
            let mut state = self.state();
            let Some(member) = state.member.as_ref() else {
                return Ok(0);
            };
            if !member.is_joined() {
                return Ok(0);
            }
            let (group, member_id, member_epoch) = (
                member.group_id.clone(),
                member.member_id.clone(),
                member.member_epoch,
            );
            let mut wanted: Vec<(TopicPartition, u64)> = Vec::new();
            for (partition, entry) in state.partitions.iter_mut() {
                if only.is_some_and(|only| !only.contains(partition)) {
                    continue;
                }
                if everything_yielded {
                    entry.processed = entry.processed.max(entry.yielded);
                }
                if let Some(position) = entry.processed
                    && entry.committed != Some(position)
                {
                    wanted.push((partition.clone(), position));
                }
            }
            (group, member_id, member_epoch, wanted)
        };
        if wanted.is_empty() {
            return Ok(0);
        }
        let mut topics: BTreeMap<&str, Vec<CommitPartition>> = BTreeMap::new();
        for ((topic, partition), offset) in &wanted {
            topics.entry(topic).or_default().push(CommitPartition {
                partition: *partition,
                offset: *offset,
                metadata: None,
            });
        }
        let request = CommitOffsetsRequest {
            group_id: group,
            member_id,
            member_epoch,
            topics: topics
                .into_iter()
                .map(|(name, partitions)| CommitTopic {
                    name: name.to_owned(),
                    partitions,
                })
                .collect(),
        };
        let Response::CommitOffsets(response) = self.client.send_with_retry(request).await? else {
            return Err(Error::Usage("unexpected response to CommitOffsets".into()));
        };
        let mut committed = 0;
        let mut first_error = None;
        {
            let mut state = self.state();
            for topic in response.topics {
                for partition in topic.partitions {
                    let key = (topic.name.clone(), partition.partition);
                    if partition.error_code == ErrorCode::None {
                        committed += 1;
                        if let Some(position) =
                            wanted.iter().find(|(p, _)| *p == key).map(|(_, o)| *o)
                            && let Some(entry) = state.partitions.get_mut(&key)
                        {
                            entry.committed = Some(position);
                        }
                    } else if first_error.is_none() {
                        first_error = Some(Error::Broker {
                            code: partition.error_code,
                            message: Some(format!("commit of {}/{}", key.0, key.1)),
                        });
                    }
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(committed),
        }
    }
}

impl Consumer {
    /// Standalone: consume these partitions from `seek`.
    ///
    /// # Errors
    /// `Usage` in group mode (the group assigns partitions).
    pub async fn assign(&self, partitions: &[(String, u32)], seek: Seek) -> Result<()> {
        if self.shared.settings.group.is_some() {
            return Err(Error::Usage(
                "a group consumer's partitions are assigned by the group".into(),
            ));
        }
        let set: BTreeSet<TopicPartition> = partitions.iter().cloned().collect();
        let positions = self.shared.resolve(&set, Some(seek)).await?;
        self.shared.start(positions);
        Ok(())
    }

    /// Moves an assigned partition (standalone or group) to `seek`.
    pub async fn seek(&self, topic: &str, partition: u32, seek: Seek) -> Result<()> {
        let key = (topic.to_owned(), partition);
        let set: BTreeSet<TopicPartition> = [key.clone()].into();
        let positions = self.shared.resolve(&set, Some(seek)).await?;
        let mut state = self.shared.state();
        let generation = state.take_generation();
        match state.partitions.get_mut(&key) {
            Some(entry) => {
                entry.fetch_offset = positions[&key];
                entry.generation = generation;
                // What is committed follows the new position, backwards too: what was handed
                // out or processed before the seek no longer counts.
                entry.yielded = None;
                entry.processed = None;
                // A new position is fetched at once, whatever the old one's failures.
                entry.fetch_again_at_once();
                entry.needs_seek = false;
            }
            None => return Err(Error::Usage(format!("{topic}/{partition} is not assigned"))),
        }
        drop(state);
        self.shared.assignment_changed.notify_one();
        Ok(())
    }

    /// Partitions being consumed now.
    pub fn assignment(&self) -> BTreeSet<(String, u32)> {
        self.shared.state().partitions.keys().cloned().collect()
    }

    /// The member id, in group mode once joined.
    pub fn member_id(&self) -> Option<String> {
        self.shared
            .state()
            .member
            .as_ref()
            .filter(|member| member.is_joined())
            .map(|member| member.member_id.clone())
    }

    /// Commits these positions (group mode): per partition, the offset of the next record
    /// to process. For a consumer that knows better than the stream what it finished with,
    /// such as one whose output is buffered. Later records the stream yields move the
    /// positions on again as usual. Returns how many partitions moved.
    ///
    /// # Errors
    /// `Usage` for a partition not assigned to this consumer (nothing is committed then).
    pub async fn commit_offsets(&mut self, offsets: &[(String, u32, u64)]) -> Result<usize> {
        let only = {
            let mut state = self.shared.state();
            let mut only = BTreeSet::new();
            for (topic, partition, _) in offsets {
                let key = (topic.clone(), *partition);
                if !state.partitions.contains_key(&key) {
                    return Err(Error::Usage(format!("{topic}/{partition} is not assigned")));
                }
                only.insert(key);
            }
            for (topic, partition, offset) in offsets {
                if let Some(entry) = state.partitions.get_mut(&(topic.clone(), *partition)) {
                    entry.processed = Some(*offset);
                }
            }
            only
        };
        if only.is_empty() {
            return Ok(0);
        }
        self.shared.commit(Some(&only), false).await
    }

    /// Commits every record yielded so far (group mode). Returns how many partitions moved.
    pub async fn commit(&mut self) -> Result<usize> {
        self.mark_processed();
        self.shared.commit(None, true).await
    }

    /// The next records of one partition, as fetched: the fast way to read, with no
    /// allocation or decoding per record (see [`ConsumerBatch`]). Mixes with the stream: a
    /// batch starts after the last record the stream yielded. Asking for the next batch (or
    /// record) marks this one processed, as for records.
    ///
    /// `None` once the consumer has stopped.
    pub async fn next_batch(&mut self) -> Option<Result<ConsumerBatch>> {
        std::future::poll_fn(|cx| self.poll_next_batch(cx)).await
    }

    fn poll_next_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ConsumerBatch>>> {
        loop {
            if let Some(chunk) = &mut self.current {
                // A batch the stream has begun goes out with the rest, from the next record.
                let start = if chunk.decoded.len() > 0 {
                    chunk.decoded_at
                } else {
                    chunk.at
                };
                if start < chunk.fetched.batches.len() {
                    let from = chunk
                        .decoded
                        .as_slice()
                        .first()
                        .map_or(chunk.fetched.from, |record| record.offset);
                    let batch = ConsumerBatch {
                        topic: Arc::clone(&chunk.fetched.topic),
                        partition: chunk.partition.1,
                        batches: chunk.fetched.batches.slice(start..),
                        from,
                        next: chunk.fetched.next,
                    };
                    chunk.at = chunk.fetched.batches.len();
                    chunk.decoded = Vec::new().into_iter();
                    if !self.hand_out(batch.next) {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(batch)));
                }
            }
            if let Err(end) = ready!(self.next_chunk(cx)) {
                return Poll::Ready(end);
            }
        }
    }

    /// The current chunk (if any) is used up: marks what it handed out processed (the next
    /// record or batch is being asked for) and takes the next fetched chunk. `Err` carries what
    /// the stream yields instead: the fetch task's error, or its end.
    fn next_chunk<T>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Option<Result<T>>>> {
        self.mark_processed();
        self.current = None;
        Poll::Ready(match ready!(self.receiver.poll_recv(cx)) {
            Some(Ok((partition, generation, fetched))) => {
                self.current = Some(Chunk::new(partition, generation, fetched));
                Ok(())
            }
            Some(Err(error)) => Err(Some(Err(error))),
            None => Err(None),
        })
    }

    /// Under one lock: marks what was handed out before from the current chunk processed,
    /// then records that everything before `next` is handed out now, if the partition is
    /// still this consumer's as fetched. When it is not (released, lost, or sought
    /// elsewhere), drops the chunk and returns false: its records are not handed out.
    fn hand_out(&mut self, next: u64) -> bool {
        let Some(chunk) = &mut self.current else {
            return false;
        };
        let mut state = self.shared.state();
        let Some(entry) = state.partitions.get_mut(&chunk.partition) else {
            drop(state);
            self.current = None; // released or lost: the next owner gets it
            return false;
        };
        if entry.generation != chunk.generation {
            drop(state);
            self.current = None; // sought elsewhere since it was fetched
            return false;
        }
        if let Some(processed) = chunk.unprocessed.take() {
            entry.processed = entry.processed.max(Some(processed));
        }
        entry.yielded = entry.yielded.max(Some(next));
        drop(state);
        chunk.unprocessed = Some(next);
        true
    }

    fn mark_processed(&mut self) {
        let Some(chunk) = &mut self.current else {
            return;
        };
        if let Some(next) = chunk.unprocessed.take() {
            let mut state = self.shared.state();
            // Not after a seek: the position is the new one's.
            if let Some(entry) = state
                .partitions
                .get_mut(&chunk.partition)
                .filter(|entry| entry.generation == chunk.generation)
            {
                entry.processed = entry.processed.max(Some(next));
            }
        }
    }

    /// Commits everything yielded (group mode), leaves the group and stops the tasks.
    pub async fn close(mut self) -> Result<()> {
        let committed = self.commit().await;
        self.leave().await;
        committed.map(|_| ())
    }

    /// Leaves the group and stops the tasks without committing: what was yielded since the
    /// last commit is delivered again, to whichever member owns its partition next. For a
    /// consumer that could not finish processing what it was given (its output failed).
    pub async fn close_without_commit(mut self) {
        self.leave().await;
    }

    async fn leave(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.assignment_changed.notify_one();
        self.shared.heartbeat_now.notify_one();
        let leave = {
            let state = self.shared.state();
            state
                .member
                .as_ref()
                .filter(|member| member.is_joined())
                .map(|member| LeaveGroupRequest {
                    group_id: member.group_id.clone(),
                    member_id: member.member_id.clone(),
                })
        };
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(leave) = leave {
            let _ = self.shared.client.send(leave).await;
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(chunk) = &mut this.current {
                if let Some(record) = chunk.decoded.next() {
                    // One lock per record: the previous record becomes processed (asking for
                    // the next one means so), and this one is yielded only while the partition
                    // is still this consumer's, as fetched.
                    let next = record.offset + 1;
                    if !this.hand_out(next) {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(record)));
                }
                if chunk.decode_next_batch() {
                    continue;
                }
            }
            if let Err(end) = ready!(this.next_chunk(cx)) {
                return Poll::Ready(end);
            }
        }
    }
}

/// Walks a fetched partition's batches and returns the offset after the last one: `None` when
/// there is no batch. With `check`, every batch is checked (CRC and structure, every record)
/// before anything of it is trusted; without, only that the batches are whole and their
/// headers readable.
fn walk_fetched(records: &Bytes, check: bool) -> Result<Option<u64>> {
    let mut next = None;
    let mut at = 0usize;
    while at < records.len() {
        let size = sluice_protocol::batch::batch_size(&records[at..])
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| at + size <= records.len())
            .ok_or_else(|| {
                Error::Protocol(sluice_protocol::WireError::CorruptBatch(
                    "partial batch in fetch".into(),
                ))
            })?;
        let view = RecordBatchRef::new(&records[at..at + size]).map_err(Error::Protocol)?;
        if check {
            view.validate().map_err(Error::Protocol)?;
        }
        next = Some(view.last_offset() + 1);
        at += size;
    }
    Ok(next)
}

/// Decodes one validated batch into records at or after `from`: key, value and headers are
/// slices of the batch's bytes.
fn decode_batch(topic: &Arc<str>, partition: u32, batch: &Bytes, from: u64) -> Vec<ConsumerRecord> {
    let Ok(view) = RecordBatchRef::new(batch) else {
        return Vec::new();
    };
    let base_offset = view.base_offset();
    view.records()
        .map_while(std::result::Result::ok)
        .filter(|record| record.offset(base_offset) >= from)
        .map(|record| ConsumerRecord {
            topic: Arc::clone(topic),
            partition,
            offset: record.offset(base_offset),
            timestamp_ms: record.timestamp_ms,
            key: record.key.map(|key| batch.slice_ref(key)),
            value: batch.slice_ref(record.value),
            headers: record
                .headers()
                .filter_map(std::result::Result::ok)
                .map(|(name, value)| (name.to_owned(), batch.slice_ref(value)))
                .collect(),
        })
        .collect()
}

/// A fetch request on the wire: its answer to come, and the offsets it asked from.
struct InFlightFetch {
    pending: PendingResponse,
    /// (partition, fetch offset, generation) as the state said when the request was built.
    targets: Vec<(TopicPartition, u64, u64)>,
}

/// The assigned partitions and where to fetch them from, as the state says now; a partition
/// whose last fetch failed waits out its backoff first.
fn fetch_targets(shared: &Shared) -> Vec<(TopicPartition, u64, u64)> {
    let now = Instant::now();
    shared
        .state()
        .partitions
        .iter()
        .filter(|(_, entry)| {
            !entry.needs_seek && entry.retry_at.is_none_or(|retry_at| retry_at <= now)
        })
        .map(|(partition, entry)| (partition.clone(), entry.fetch_offset, entry.generation))
        .collect()
}

/// First and longest wait before a partition whose fetch failed is fetched again.
const FETCH_RETRY_FIRST: Duration = Duration::from_millis(50);
const FETCH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Records how a partition's fetch went: a failure pushes its next fetch back (doubling, up to
/// [`FETCH_RETRY_MAX`]) so a partition the broker cannot serve is not asked again at once, over
/// and over; a success clears that. Only for the partition as fetched.
fn fetch_went(shared: &Shared, key: &TopicPartition, generation: u64, failed: bool) {
    let mut state = shared.state();
    let Some(entry) = state.partitions.get_mut(key) else {
        return;
    };
    if entry.generation != generation {
        return;
    }
    if failed {
        entry.retry_at = Some(Instant::now() + entry.fetch_backoff.next_ceiling());
    } else {
        entry.fetch_again_at_once();
    }
}

impl PartitionState {
    /// A partition just taken on, to be fetched from `fetch_offset` (or, with `needs_seek`,
    /// once the application seeks it).
    fn new(fetch_offset: u64, generation: u64, needs_seek: bool) -> PartitionState {
        PartitionState {
            fetch_offset,
            generation,
            yielded: None,
            processed: None,
            committed: None,
            fetch_backoff: Backoff::new(FETCH_RETRY_FIRST, FETCH_RETRY_MAX),
            retry_at: None,
            needs_seek,
        }
    }

    /// Forgets the partition's failed fetches: the next goes out at once.
    fn fetch_again_at_once(&mut self) {
        self.fetch_backoff.reset();
        self.retry_at = None;
    }
}

/// The records a fetch may ask for: `max_bytes`, less when the answer would not fit in a
/// frame the connection accepts (a frame over the limit closes the connection, and the same
/// fetch would be asked again and again).
fn fetch_max_bytes(
    max_bytes: u32,
    max_frame_bytes: u32,
    topics: &BTreeMap<&str, Vec<FetchPartition>>,
) -> u32 {
    let overhead = FetchResponse::overhead_bytes(
        topics
            .iter()
            .map(|(name, partitions)| (*name, partitions.len())),
    );
    let room = u64::from(max_frame_bytes).saturating_sub(overhead);
    max_bytes
        .min(u32::try_from(room).unwrap_or(u32::MAX))
        .max(1)
}

/// Queues a fetch of `targets` on the connection (it goes out at once; the answer is awaited
/// later).
async fn queue_fetch(
    shared: &Shared,
    targets: Vec<(TopicPartition, u64, u64)>,
) -> Result<InFlightFetch> {
    let mut topics: BTreeMap<&str, Vec<FetchPartition>> = BTreeMap::new();
    for ((topic, partition), offset, _) in &targets {
        topics.entry(topic).or_default().push(FetchPartition {
            partition: *partition,
            fetch_offset: *offset,
            partition_max_bytes: shared.settings.partition_max_bytes,
        });
    }
    let frame_limit = shared.client.options().connection.max_frame_bytes;
    let request = FetchRequest {
        max_wait_ms: u32::try_from(shared.settings.max_wait.as_millis()).unwrap_or(u32::MAX),
        min_bytes: 1,
        max_bytes: fetch_max_bytes(shared.settings.max_bytes, frame_limit, &topics),
        topics: topics
            .into_iter()
            .map(|(name, partitions)| FetchTopic {
                name: name.to_owned(),
                partitions,
            })
            .collect(),
    };
    let pending = shared.client.enqueue(request).await?;
    Ok(InFlightFetch { pending, targets })
}

/// Fetches the assigned partitions and hands their batches to the application's side.
///
/// Two stages overlap: as soon as an answer arrives, its batch headers say where each partition
/// goes on, and the next fetch is queued from there; only then are the answer's batches checked
/// (CRC, every record) and handed over. So the broker reads and sends the next answer while this
/// task checks the last one. A batch that fails the check is not handed out: the partition is
/// fetched again from where that answer started, and the request already queued is dropped.
async fn fetch_loop(shared: Arc<Shared>, sender: mpsc::Sender<Delivery>) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut topic_names: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut prefetched: Option<InFlightFetch> = None;
    while !shared.closed.load(Ordering::Acquire) {
        let fetch = match prefetched.take() {
            Some(fetch) => fetch,
            None => {
                let targets = fetch_targets(&shared);
                if targets.is_empty() {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        shared.assignment_changed.notified(),
                    )
                    .await;
                    continue;
                }
                match queue_fetch(&shared, targets).await {
                    Ok(fetch) => fetch,
                    Err(error) => {
                        tracing::debug!(%error, "fetch failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
        };
        let InFlightFetch { pending, targets } = fetch;
        let response = tokio::select! {
            response = pending.response() => response,
            // A new assignment should not wait for a long poll on the old one to end.
            _ = shared.assignment_changed.notified() => continue,
        };
        shared.client.record_outcome(&response);
        let response = match response {
            Ok(Response::Fetch(response)) => {
                backoff.reset();
                response
            }
            Ok(_) => continue,
            Err(error) => {
                tracing::debug!(%error, "fetch failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        // First stage: where each partition's batches end, from their headers.
        let mut arrived: Vec<(TopicPartition, u64, Fetched)> = Vec::new();
        // With the generation each was fetched under: a seek or a new assignment since then
        // moved the partition on, and its new position is not to be reset.
        let mut out_of_range: BTreeMap<TopicPartition, u64> = BTreeMap::new();
        for topic in response.topics {
            let name = Arc::clone(
                topic_names
                    .entry(topic.name.clone())
                    .or_insert_with(|| Arc::from(topic.name.as_str())),
            );
            for partition in topic.partitions {
                let key = (topic.name.clone(), partition.partition);
                let Some((_, from, generation)) =
                    targets.iter().find(|(p, _, _)| *p == key).cloned()
                else {
                    continue;
                };
                match partition.error_code {
                    ErrorCode::None => fetch_went(&shared, &key, generation, false),
                    ErrorCode::OffsetOutOfRange => {
                        out_of_range.insert(key, generation);
                        continue;
                    }
                    code => {
                        tracing::debug!(topic = %key.0, partition = key.1, %code, "fetch error");
                        fetch_went(&shared, &key, generation, true);
                        // Damaged data in the broker's log: the application hears of it (the
                        // partition is retried, never skipped). Other codes are passing states
                        // (a leader moving, a topic being created) retried quietly.
                        if matches!(code, ErrorCode::StorageError | ErrorCode::CorruptMessage) {
                            let error = Error::Broker {
                                code,
                                message: Some(format!(
                                    "fetching {} partition {} from offset {from}",
                                    key.0, key.1
                                )),
                            };
                            let _ = sender.send(Err(error)).await;
                        }
                        continue;
                    }
                }
                if partition.records.is_empty() {
                    continue;
                }
                let next = match walk_fetched(&partition.records, false) {
                    Ok(next) => next,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        continue;
                    }
                };
                {
                    let mut state = shared.state();
                    match state.partitions.get_mut(&key) {
                        Some(entry)
                            if entry.generation == generation && entry.fetch_offset == from =>
                        {
                            if let Some(next) = next {
                                entry.fetch_offset = next;
                            }
                        }
                        _ => continue,
                    }
                }
                let Some(next) = next.filter(|next| *next > from) else {
                    continue; // nothing at or after the fetch offset
                };
                let fetched = Fetched {
                    topic: Arc::clone(&name),
                    batches: partition.records,
                    from,
                    next,
                };
                arrived.push((key, generation, fetched));
            }
        }
        // The next fetch goes out now; an out-of-range partition is resolved first.
        if out_of_range.is_empty() && !shared.closed.load(Ordering::Acquire) {
            let targets = fetch_targets(&shared);
            if !targets.is_empty() {
                prefetched = queue_fetch(&shared, targets).await.ok();
                // Let the connection's writer send it before the checks below: woken from
                // here it waits in this worker's next-task slot, which no other worker takes.
                tokio::task::yield_now().await;
            }
        }
        // Second stage: check every batch, then hand it over.
        for (key, generation, fetched) in arrived {
            if let Err(error) = walk_fetched(&fetched.batches, true) {
                {
                    let mut state = shared.state();
                    if let Some(entry) = state.partitions.get_mut(&key)
                        && entry.generation == generation
                        && entry.fetch_offset == fetched.next
                    {
                        entry.fetch_offset = fetched.from;
                    }
                }
                // It asked from past the batches that failed.
                prefetched = None;
                let _ = sender.send(Err(error)).await;
                continue;
            }
            if sender.send(Ok((key, generation, fetched))).await.is_err() {
                return;
            }
        }
        // Handing over (above) and resolving wait, for the stream's room and for the broker:
        // only the partitions still at the position found out of range are reset.
        {
            let state = shared.state();
            out_of_range.retain(|partition, generation| {
                state
                    .partitions
                    .get(partition)
                    .is_some_and(|entry| entry.generation == *generation)
            });
        }
        if !out_of_range.is_empty() {
            let Some(seek) = reset_seek(shared.settings.reset) else {
                // `ResetPolicy::Error`: the application is told, and decides (a seek moves the
                // partition on). Until then the partition is fetched again only after a
                // backoff, and told again: resolving "where to start" anew would find the
                // group's committed offset, the very one out of range, and ask it again and
                // again without a word.
                for (partition, generation) in &out_of_range {
                    let _ = sender
                        .send(Err(Error::Broker {
                            code: ErrorCode::OffsetOutOfRange,
                            message: Some(format!(
                                "{}/{}: the position is outside the log and the reset policy is Error; seek to go on",
                                partition.0, partition.1
                            )),
                        }))
                        .await;
                    fetch_went(&shared, partition, *generation, true);
                }
                continue;
            };
            let partitions: BTreeSet<TopicPartition> = out_of_range.keys().cloned().collect();
            match shared.resolve(&partitions, Some(seek)).await {
                Ok(positions) => {
                    let mut state = shared.state();
                    let generation = state.take_generation();
                    for (partition, offset) in positions {
                        // Checked again under the lock: a seek may have come meanwhile.
                        if let Some(entry) = state.partitions.get_mut(&partition)
                            && out_of_range.get(&partition) == Some(&entry.generation)
                        {
                            tracing::info!(topic = %partition.0, partition = partition.1, offset, "offset out of range: reset");
                            // As a seek: what was handed out or processed before no longer
                            // counts (the log was truncated or the topic created again), so
                            // nothing of it is committed over the new position.
                            entry.fetch_offset = offset;
                            entry.generation = generation;
                            entry.yielded = None;
                            entry.processed = None;
                        }
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    let mut state = shared.state();
                    // Checked again under the lock: a seek may have come meanwhile.
                    let partitions: BTreeSet<TopicPartition> = out_of_range
                        .into_iter()
                        .filter(|(partition, generation)| {
                            state
                                .partitions
                                .get(partition)
                                .is_some_and(|entry| entry.generation == *generation)
                        })
                        .map(|(partition, _)| partition)
                        .collect();
                    for partition in &partitions {
                        state.partitions.remove(partition);
                    }
                    // No longer consumed here: the group may give them to someone (this
                    // member too) and where to start is found again.
                    if let Some(member) = state.member.as_mut() {
                        member.released(&partitions);
                    }
                }
            }
        }
    }
}

fn reset_seek(reset: ResetPolicy) -> Option<Seek> {
    match reset {
        ResetPolicy::Earliest => Some(Seek::Earliest),
        ResetPolicy::Latest => Some(Seek::Latest),
        ResetPolicy::Error => None,
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, sender: mpsc::Sender<Delivery>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut last_commit = Instant::now();
    // What the loop waits for (a heartbeat's answer, finding where to start, committing) is
    // cut off well within the session timeout: a member that stops heartbeating is expired
    // while it goes on handing out records, which its partitions' next owner reads again.
    let session_timeout = shared.settings.session_timeout;
    let within_session = session_timeout / 3;
    // When the last heartbeat the broker accepted was sent (or the member started), no later
    // than the broker heard it: once a whole session timeout has passed since, the broker has
    // expired the member.
    let mut last_accepted = Instant::now();
    while !shared.closed.load(Ordering::Acquire) {
        let request = match shared.state().member.as_ref() {
            Some(member) => member.heartbeat_request(),
            None => return,
        };
        // A join is not cut short: the broker may have made the member and given it partitions,
        // and a member that never learns its id leaves them held by a ghost for a session.
        let joining = request.member_id.is_empty();
        let sent_at = Instant::now();
        // A member's heartbeat, connecting included, is not awaited past the session's end:
        // from then on the broker has expired the member, whatever the answer.
        let session_end = last_accepted + session_timeout;
        let within =
            (!joining).then(|| within_session.min(session_end.saturating_duration_since(sent_at)));
        let sent = match within {
            Some(within) if within.is_zero() => Err(Error::Timeout {
                timeout_ms: duration_ms(session_timeout),
            }),
            within => shared.client.send_within(request, within).await,
        };
        let answered = match sent {
            Ok(Response::ConsumerGroupHeartbeat(response)) => Some(response),
            Ok(other) => {
                tracing::debug!(api = ?other.api_key(), "heartbeat answered with another api; retrying");
                None
            }
            Err(error) => {
                tracing::debug!(%error, "heartbeat failed; retrying");
                None
            }
        };
        let accepted = match &answered {
            Some(response) => {
                let outcome = {
                    let mut state = shared.state();
                    let Some(member) = state.member.as_mut() else {
                        return;
                    };
                    member.on_heartbeat(response)
                };
                match outcome {
                    Ok(actions) => Some(actions),
                    Err(code) => {
                        if matches!(
                            code,
                            ErrorCode::InvalidSessionTimeout | ErrorCode::InvalidRequest
                        ) {
                            let _ = sender
                                .send(Err(Error::Broker {
                                    code,
                                    message: response.error_message.clone(),
                                }))
                                .await;
                            return;
                        }
                        tracing::debug!(%code, "heartbeat refused; retrying");
                        None
                    }
                }
            }
            None => None,
        };
        let actions = match accepted {
            Some(actions) => {
                backoff.reset();
                last_accepted = sent_at;
                actions
            }
            None => {
                let lost = if last_accepted.elapsed() >= session_timeout {
                    shared
                        .state()
                        .member
                        .as_mut()
                        .and_then(MemberState::session_lost)
                } else {
                    None
                };
                match lost {
                    Some(lost) => {
                        tracing::warn!(
                            session_timeout_ms = duration_ms(session_timeout),
                            "no heartbeat accepted for a whole session timeout: the broker has expired this member; its partitions are dropped without committing and it joins again"
                        );
                        vec![lost]
                    }
                    None => {
                        // Not past the session's end, which then ends the membership.
                        let mut delay = backoff.next_delay();
                        if !joining {
                            delay =
                                delay.min(session_end.saturating_duration_since(Instant::now()));
                        }
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            }
        };
        let mut again_now = false;
        for action in actions {
            match action {
                MemberAction::Assign(partitions) => {
                    match tokio::time::timeout(within_session, shared.resolve(&partitions, None))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::Timeout {
                                timeout_ms: duration_ms(within_session),
                            })
                        }) {
                        Ok(positions) => {
                            let parked: BTreeSet<TopicPartition> = partitions
                                .iter()
                                .filter(|partition| !positions.contains_key(*partition))
                                .cloned()
                                .collect();
                            shared.start(positions);
                            if !parked.is_empty() {
                                shared.park(&parked, &sender);
                            }
                        }
                        Err(error) => {
                            // Not owned after all: the next heartbeat says so, and the broker
                            // assigns them again, so they are tried again instead of never read.
                            if let Some(member) = shared.state().member.as_mut() {
                                member.released(&partitions);
                            }
                            tracing::warn!(%error, partitions = partitions.len(), "could not find where to start reading assigned partitions; they will be assigned again");
                            // Told without waiting: a stream the application is behind on must
                            // not hold back the heartbeats.
                            let _ = sender.try_send(Err(error));
                        }
                    }
                }
                MemberAction::Release(partitions) => {
                    let committed = tokio::time::timeout(
                        within_session,
                        shared.commit(Some(&partitions), false),
                    )
                    .await;
                    if !matches!(committed, Ok(Ok(_))) {
                        tracing::warn!(
                            ?committed,
                            "commit before release failed or took too long; the next owner may see records again"
                        );
                    }
                    let mut state = shared.state();
                    for partition in &partitions {
                        state.partitions.remove(partition);
                    }
                    if let Some(member) = state.member.as_mut() {
                        member.released(&partitions);
                    }
                    again_now = true;
                }
                MemberAction::Rejoin(lost) => {
                    tracing::info!(
                        partitions = lost.len(),
                        "left the group unexpectedly (fenced or expired); rejoining"
                    );
                    let mut state = shared.state();
                    for partition in &lost {
                        state.partitions.remove(partition);
                    }
                    again_now = true;
                }
            }
        }
        if let CommitMode::Auto(interval) = shared.settings.commit
            && last_commit.elapsed() >= interval
        {
            last_commit = Instant::now();
            match tokio::time::timeout(within_session, shared.commit(None, false)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::debug!(%error, "auto commit failed"),
                Err(_) => tracing::debug!("auto commit took too long; trying again later"),
            }
        }
        shared.report_parked(&sender);
        if again_now {
            continue;
        }
        let interval = shared
            .state()
            .member
            .as_ref()
            .map_or(1000, |member| member.heartbeat_interval_ms);
        let _ = tokio::time::timeout(
            Duration::from_millis(u64::from(interval)),
            shared.heartbeat_now.notified(),
        )
        .await;
    }
}
