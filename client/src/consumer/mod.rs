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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use sluice_protocol::ErrorCode;
use sluice_protocol::Response;
use sluice_protocol::batch::RecordBatchRef;
use sluice_protocol::messages::{
    CommitOffsetsRequest, CommitPartition, CommitTopic, FetchOffsetsRequest, FetchPartition,
    FetchRequest, FetchTopic, LeaveGroupRequest, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsTopic, OffsetSpec,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::client::Client;
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

    /// Group session timeout. Default = 10 s.
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
            current: VecDeque::new(),
            last_yielded: None,
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
}

#[derive(Debug)]
struct State {
    partitions: BTreeMap<TopicPartition, PartitionState>,
    member: Option<MemberState>,
    next_generation: u64,
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

type Delivery = Result<(TopicPartition, u64, Vec<ConsumerRecord>)>;

/// A stream of records. Drop it or call [`Consumer::close`] to stop.
#[derive(Debug)]
pub struct Consumer {
    shared: Arc<Shared>,
    receiver: mpsc::Receiver<Delivery>,
    current: VecDeque<(TopicPartition, u64, ConsumerRecord)>,
    last_yielded: Option<(TopicPartition, u64)>,
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
        match (seek, &self.settings.group) {
            (Some(Seek::Offset(offset)), _) => {
                for partition in partitions {
                    positions.insert(partition.clone(), offset);
                }
            }
            (Some(Seek::Earliest), _) => {
                need_reset.extend(partitions.iter().map(|p| (p.clone(), OffsetSpec::Earliest)))
            }
            (Some(Seek::Latest), _) => {
                need_reset.extend(partitions.iter().map(|p| (p.clone(), OffsetSpec::Latest)))
            }
            (Some(Seek::Timestamp(at)), _) => need_reset.extend(
                partitions
                    .iter()
                    .map(|p| (p.clone(), OffsetSpec::Timestamp(at))),
            ),
            (None, Some(group)) => {
                let committed = self.committed(group, partitions).await?;
                for partition in partitions {
                    match committed.get(partition) {
                        Some(offset) => {
                            positions.insert(partition.clone(), *offset);
                        }
                        None => need_reset.push((partition.clone(), self.reset_spec(partition)?)),
                    }
                }
            }
            (None, None) => {
                for partition in partitions {
                    need_reset.push((partition.clone(), self.reset_spec(partition)?));
                }
            }
        }
        if !need_reset.is_empty() {
            positions.extend(self.list_offsets(&need_reset).await?);
        }
        Ok(positions)
    }

    fn reset_spec(&self, partition: &TopicPartition) -> Result<OffsetSpec> {
        match self.settings.reset {
            ResetPolicy::Earliest => Ok(OffsetSpec::Earliest),
            ResetPolicy::Latest => Ok(OffsetSpec::Latest),
            ResetPolicy::Error => Err(Error::Broker {
                code: ErrorCode::OffsetOutOfRange,
                message: Some(format!(
                    "no committed offset for {}/{} and the reset policy is error",
                    partition.0, partition.1
                )),
            }),
        }
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
            let generation = state.next_generation;
            state.next_generation += 1;
            state.partitions.insert(
                partition,
                PartitionState {
                    fetch_offset: offset,
                    generation,
                    yielded: None,
                    processed: None,
                    committed: None,
                },
            );
        }
        drop(state);
        self.assignment_changed.notify_one();
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
        let generation = state.next_generation;
        state.next_generation += 1;
        match state.partitions.get_mut(&key) {
            Some(entry) => {
                entry.fetch_offset = positions[&key];
                entry.generation = generation;
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

    /// Commits every record yielded so far (group mode). Returns how many partitions moved.
    pub async fn commit(&mut self) -> Result<usize> {
        self.mark_processed();
        self.shared.commit(None, true).await
    }

    fn mark_processed(&mut self) {
        if let Some((partition, next)) = self.last_yielded.take() {
            let mut state = self.shared.state();
            if let Some(entry) = state.partitions.get_mut(&partition) {
                entry.processed = entry.processed.max(Some(next));
            }
        }
    }

    /// Commits everything yielded (group mode), leaves the group and stops the tasks.
    pub async fn close(mut self) -> Result<()> {
        let committed = self.commit().await;
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
        committed.map(|_| ())
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
        // Asking for the next record means the previous one is processed.
        this.mark_processed();
        loop {
            while let Some((partition, generation, record)) = this.current.pop_front() {
                let mut state = this.shared.state();
                let Some(entry) = state.partitions.get_mut(&partition) else {
                    continue; // released or lost: the next owner gets it
                };
                if entry.generation != generation {
                    continue; // sought elsewhere since it was fetched
                }
                let next = record.offset + 1;
                entry.yielded = entry.yielded.max(Some(next));
                drop(state);
                this.last_yielded = Some((partition, next));
                return Poll::Ready(Some(Ok(record)));
            }
            match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(Ok((partition, generation, records)))) => {
                    this.current.extend(
                        records
                            .into_iter()
                            .map(|record| (partition.clone(), generation, record)),
                    );
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Decodes a fetched partition's batches into records at or after `from`.
fn decode(
    topic: &Arc<str>,
    partition: u32,
    records: &Bytes,
    from: u64,
) -> Result<(Vec<ConsumerRecord>, Option<u64>)> {
    let mut out = Vec::new();
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
        let bytes = records.slice(at..at + size);
        let view = RecordBatchRef::new(&bytes).map_err(Error::Protocol)?;
        // Check what came off the network before trusting it.
        view.validate().map_err(Error::Protocol)?;
        for record in view.records() {
            let record = record.map_err(Error::Protocol)?;
            let offset = record.offset(view.base_offset());
            if offset < from {
                continue;
            }
            let headers = record
                .headers()
                .filter_map(|header| header.ok())
                .map(|(name, value)| (name.to_owned(), bytes.slice_ref(value)))
                .collect();
            out.push(ConsumerRecord {
                topic: Arc::clone(topic),
                partition,
                offset,
                timestamp_ms: record.timestamp_ms,
                key: record.key.map(|key| bytes.slice_ref(key)),
                value: bytes.slice_ref(record.value),
                headers,
            });
        }
        next = Some(view.last_offset() + 1);
        at += size;
    }
    Ok((out, next))
}

async fn fetch_loop(shared: Arc<Shared>, sender: mpsc::Sender<Delivery>) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut topic_names: BTreeMap<String, Arc<str>> = BTreeMap::new();
    while !shared.closed.load(Ordering::Acquire) {
        let targets: Vec<(TopicPartition, u64, u64)> = shared
            .state()
            .partitions
            .iter()
            .map(|(partition, entry)| (partition.clone(), entry.fetch_offset, entry.generation))
            .collect();
        if targets.is_empty() {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                shared.assignment_changed.notified(),
            )
            .await;
            continue;
        }
        let mut topics: BTreeMap<&str, Vec<FetchPartition>> = BTreeMap::new();
        for ((topic, partition), offset, _) in &targets {
            topics.entry(topic).or_default().push(FetchPartition {
                partition: *partition,
                fetch_offset: *offset,
                partition_max_bytes: shared.settings.partition_max_bytes,
            });
        }
        let request = FetchRequest {
            max_wait_ms: u32::try_from(shared.settings.max_wait.as_millis()).unwrap_or(u32::MAX),
            min_bytes: 1,
            max_bytes: shared.settings.max_bytes,
            topics: topics
                .into_iter()
                .map(|(name, partitions)| FetchTopic {
                    name: name.to_owned(),
                    partitions,
                })
                .collect(),
        };
        let response = tokio::select! {
            response = shared.client.send(request) => response,
            // A new assignment should not wait for a long poll on the old one to end.
            _ = shared.assignment_changed.notified() => continue,
        };
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
        let mut out_of_range: BTreeSet<TopicPartition> = BTreeSet::new();
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
                    ErrorCode::None => {}
                    ErrorCode::OffsetOutOfRange => {
                        out_of_range.insert(key);
                        continue;
                    }
                    code => {
                        tracing::debug!(topic = %key.0, partition = key.1, %code, "fetch error");
                        continue;
                    }
                }
                if partition.records.is_empty() {
                    continue;
                }
                let decoded = decode(&name, partition.partition, &partition.records, from);
                let (records, next) = match decoded {
                    Ok(decoded) => decoded,
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
                if !records.is_empty() && sender.send(Ok((key, generation, records))).await.is_err()
                {
                    return;
                }
            }
        }
        if !out_of_range.is_empty() {
            match shared
                .resolve(&out_of_range, reset_seek(shared.settings.reset))
                .await
            {
                Ok(positions) => {
                    let mut state = shared.state();
                    for (partition, offset) in positions {
                        if let Some(entry) = state.partitions.get_mut(&partition) {
                            tracing::info!(topic = %partition.0, partition = partition.1, offset, "offset out of range: reset");
                            entry.fetch_offset = offset;
                        }
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    let mut state = shared.state();
                    for partition in &out_of_range {
                        state.partitions.remove(partition);
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
    while !shared.closed.load(Ordering::Acquire) {
        let request = match shared.state().member.as_ref() {
            Some(member) => member.heartbeat_request(),
            None => return,
        };
        let response = match shared.client.send(request).await {
            Ok(Response::ConsumerGroupHeartbeat(response)) => response,
            Ok(_) => continue,
            Err(error) => {
                tracing::debug!(%error, "heartbeat failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let actions = {
            let mut state = shared.state();
            let Some(member) = state.member.as_mut() else {
                return;
            };
            member.on_heartbeat(&response)
        };
        let actions = match actions {
            Ok(actions) => {
                backoff.reset();
                actions
            }
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
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let mut again_now = false;
        for action in actions {
            match action {
                MemberAction::Assign(partitions) => match shared.resolve(&partitions, None).await {
                    Ok(positions) => shared.start(positions),
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                    }
                },
                MemberAction::Release(partitions) => {
                    if let Err(error) = shared.commit(Some(&partitions), false).await {
                        tracing::warn!(%error, "commit before release failed; the next owner may see records again");
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
            if let Err(error) = shared.commit(None, false).await {
                tracing::debug!(%error, "auto commit failed");
            }
        }
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
