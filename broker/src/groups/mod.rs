//! Consumer groups: broker-side assignment with at-least-once delivery (see DESIGN.md).
//!
//! [`coordinator`] is the state machine (no IO), [`assignor`] the strategies, [`offsets`] the
//! committed offsets in `__consumer_offsets`. [`GroupManager`] drives them: it supplies the
//! time and the topics' partition counts, expires sessions from a background task, and turns
//! protocol requests into coordinator inputs and back.
//!
//! Committed offsets expire as Kafka's do (`offsets.retention.minutes`): a group's offsets are
//! deleted once the group has had no member and no commit for `group_offsets_retention_ms`.
//! Membership is not persisted, so a broker start counts as activity of every group, plus
//! the longest session timeout for its members to come back.

pub mod assignor;
pub mod coordinator;
pub mod offsets;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sluice_protocol::ErrorCode;
use sluice_protocol::messages::{
    CommitOffsetsRequest, CommitOffsetsResponse, CommittedPartition, CommittedTopic,
    ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, DescribeGroupRequest,
    DescribeGroupResponse, FetchOffsetsRequest, FetchOffsetsResponse, GroupListing,
    GroupMemberDescription, GroupOffsetDescription, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsResponse, PartitionResult, TopicPartitions, TopicResults,
};

use crate::storage::StorageError;
use crate::topics::{MAX_TOPIC_NAME_BYTES, TopicRegistry};
use assignor::TopicPartition;
use coordinator::{Group, GroupSettings, Heartbeat};
use offsets::{CommitEntry, OffsetStore};

/// Every group of a broker.
#[derive(Debug)]
pub struct GroupManager {
    groups: Mutex<HashMap<String, Group>>,
    settings: GroupSettings,
    offsets: OffsetStore,
    /// Distinguishes member ids of this broker run from earlier ones.
    incarnation: String,
    /// Groups created in this run: part of each group's member ids, so that a group forgotten
    /// and created again never hands out an id one of its earlier members may still hold (a
    /// member cut off past its session would otherwise be taken for its successor).
    groups_created: std::sync::atomic::AtomicU64,
    started: Instant,
    /// The wall clock at start, milliseconds since the epoch.
    started_wall_ms: u64,
    /// When each group was last seen with a member; taken after `groups`.
    activity: Mutex<Activity>,
}

/// What offset expiry needs beyond the groups themselves.
#[derive(Debug, Default)]
struct Activity {
    /// Wall-clock milliseconds each group was last seen with a member in this run.
    seen_with_members: HashMap<String, u64>,
    /// When committed offsets were last checked for expiry.
    last_check_ms: Option<u64>,
}

/// Commits a request carries that passed the coordinator's checks, waiting to be made durable.
#[derive(Debug)]
pub struct PendingCommit {
    pub group: String,
    pub entries: Vec<CommitEntry>,
    pub next_offset: u64,
    pub first_position: u64,
}

impl GroupManager {
    pub fn new(settings: GroupSettings, offsets: OffsetStore) -> GroupManager {
        let incarnation = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_micros())
        );
        GroupManager {
            groups: Mutex::new(HashMap::new()),
            settings,
            offsets,
            incarnation,
            groups_created: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
            started_wall_ms: crate::now_ms(),
            activity: Mutex::new(Activity::default()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn offsets(&self) -> &OffsetStore {
        &self.offsets
    }

    fn partition_count(topics: &TopicRegistry) -> impl Fn(&str) -> Option<u32> + '_ {
        move |name: &str| {
            topics
                .get(name)
                .filter(|topic| !topic.internal)
                .map(|topic| topic.partitions.len() as u32)
        }
    }

    pub fn heartbeat(
        &self,
        request: ConsumerGroupHeartbeatRequest,
        topics: &TopicRegistry,
    ) -> ConsumerGroupHeartbeatResponse {
        if request.group_id.is_empty() {
            return ConsumerGroupHeartbeatResponse {
                error_code: ErrorCode::InvalidRequest,
                error_message: Some("group id must not be empty".into()),
                ..Default::default()
            };
        }
        if let Some(problem) = request
            .topics
            .as_deref()
            .and_then(|names| subscription_problem(names, topics.max_topics()))
        {
            return ConsumerGroupHeartbeatResponse {
                error_code: ErrorCode::InvalidRequest,
                error_message: Some(problem),
                ..Default::default()
            };
        }
        let now_ms = self.now_ms();
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        let group = groups.entry(request.group_id.clone()).or_insert_with(|| {
            let serial = self
                .groups_created
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Group::new(&request.group_id, &format!("{}.{serial}", self.incarnation))
        });
        let heartbeat = Heartbeat {
            member_id: request.member_id,
            member_epoch: request.member_epoch,
            session_timeout_ms: request.session_timeout_ms,
            assignor: request.assignor,
            topics: request.topics,
            owned: request.owned.as_deref().map(TopicPartitions::flatten),
        };
        let count = Self::partition_count(topics);
        match group.heartbeat(heartbeat, now_ms, &self.settings, &count) {
            Ok(answer) => {
                self.note_active(&request.group_id);
                ConsumerGroupHeartbeatResponse {
                    error_code: ErrorCode::None,
                    error_message: None,
                    member_id: answer.member_id,
                    member_epoch: answer.member_epoch,
                    group_epoch: answer.group_epoch,
                    heartbeat_interval_ms: answer.heartbeat_interval_ms,
                    assignment: TopicPartitions::group(&answer.assignment),
                    release: TopicPartitions::group(&answer.release),
                }
            }
            Err(error) => {
                if group.members.is_empty() && !self.offsets.has_group(&group.id) {
                    groups.remove(&request.group_id);
                }
                ConsumerGroupHeartbeatResponse {
                    error_code: error.code,
                    error_message: Some(error.message),
                    ..Default::default()
                }
            }
        }
    }

    pub fn leave(&self, request: LeaveGroupRequest, topics: &TopicRegistry) -> LeaveGroupResponse {
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        let count = Self::partition_count(topics);
        let error_code = match groups.get_mut(&request.group_id) {
            None => ErrorCode::UnknownMember,
            Some(group) => match group.leave(&request.member_id, &count) {
                Ok(()) => {
                    tracing::info!(group = %request.group_id, member = %request.member_id, "member left");
                    self.note_active(&request.group_id);
                    if group.members.is_empty() && !self.offsets.has_group(&group.id) {
                        groups.remove(&request.group_id);
                    }
                    ErrorCode::None
                }
                Err(error) => error.code,
            },
        };
        LeaveGroupResponse { error_code }
    }

    /// Expires members whose session ran out, in every group.
    pub fn expire(&self, topics: &TopicRegistry) {
        let now_ms = self.now_ms();
        let count = Self::partition_count(topics);
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        // A group whose last member went, and that never committed, is forgotten: group ids
        // that come and go must not pile up.
        groups.retain(|_, group| {
            let expired = group.expire(now_ms, &count);
            for member in &expired {
                tracing::info!(group = %group.id, %member, "member session expired");
            }
            expired.is_empty() || !group.members.is_empty() || self.offsets.has_group(&group.id)
        });
        self.expire_offsets(&mut groups, crate::now_ms());
    }

    /// Notes that `group` has a member now (a heartbeat, or a member leaving). Taken under the
    /// groups lock.
    fn note_active(&self, group: &str) {
        let now_ms = crate::now_ms();
        let mut activity = self.activity.lock().expect("activity lock poisoned");
        match activity.seen_with_members.get_mut(group) {
            Some(seen) => *seen = (*seen).max(now_ms),
            None => {
                activity.seen_with_members.insert(group.to_owned(), now_ms);
            }
        }
    }

    /// Deletes the committed offsets of every group that has had no member and no commit for
    /// the retention period, as of `now_ms` (wall clock). Checks at most every quarter of the
    /// period (every minute at most). A group with members now is never expired; when one was
    /// last seen with a member, its heartbeats and leaves say (`note_active`).
    fn expire_offsets(&self, groups: &mut HashMap<String, Group>, now_ms: u64) {
        let mut activity = self.activity.lock().expect("activity lock poisoned");
        let retention_ms = self.settings.offsets_retention_ms;
        let check_every_ms = (retention_ms / 4).clamp(1, 60_000);
        // A clock set back since the last check does not put the next off until it catches up.
        if activity
            .last_check_ms
            .is_some_and(|last| (last..last.saturating_add(check_every_ms)).contains(&now_ms))
        {
            return;
        }
        activity.last_check_ms = Some(now_ms);
        // A group not seen with a member in this run may have members on their way back.
        let since_start = self
            .started_wall_ms
            .saturating_add(u64::from(self.settings.max_session_timeout_ms));
        let expired = self.offsets.expire_groups(|group, latest_commit| {
            if groups
                .get(group)
                .is_some_and(|group| !group.members.is_empty())
            {
                return false;
            }
            let seen = activity.seen_with_members.get(group).copied();
            let active_ms = latest_commit.max(seen.unwrap_or(since_start));
            now_ms.saturating_sub(active_ms) >= retention_ms
        });
        match expired {
            Ok(expired) => {
                for (group, count) in &expired {
                    tracing::info!(%group, count, retention_ms, "committed offsets expired: the group had no member and no commit for the retention period");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "expiring committed offsets failed; trying again later");
            }
        }
        let committed = self.offsets.groups();
        groups.retain(|id, group| !group.members.is_empty() || committed.contains(id));
        activity
            .seen_with_members
            .retain(|id, _| groups.contains_key(id) || committed.contains(id));
    }

    /// Forgets every group's committed offsets on `topic`, which was just deleted (see
    /// [`OffsetStore::forget_topic`]); returns the offset to wait for durability of. Under the
    /// groups lock, as commits are checked and appended: a commit checked while the topic
    /// still existed is appended before the tombstones (which then cover it), and one checked
    /// after finds no topic. A group left with no members and no offsets is forgotten.
    ///
    /// # Errors
    /// The tombstones could not be appended.
    pub fn forget_topic(&self, topic: &str) -> Result<Option<u64>, StorageError> {
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        let forgotten = self.offsets.forget_topic(topic)?;
        groups.retain(|_, group| !group.members.is_empty() || self.offsets.has_group(&group.id));
        Ok(forgotten)
    }

    /// Checks each partition's commit against the group's membership and appends the accepted
    /// ones. The response carries a code per partition; the accepted commits are acknowledged
    /// once [`GroupManager::finish_commit`] has made them durable and visible.
    ///
    /// A partition its topic no longer has (deleted, say, while the member still held it) is
    /// refused: its offset would outlive the topic and apply to one created again under the
    /// name.
    pub fn start_commit(
        &self,
        request: CommitOffsetsRequest,
        topics: &TopicRegistry,
    ) -> (CommitOffsetsResponse, Option<PendingCommit>) {
        let mut entries = Vec::new();
        let mut response = CommitOffsetsResponse {
            error_code: ErrorCode::None,
            topics: Vec::with_capacity(request.topics.len()),
        };
        // The groups lock is held until the accepted commits are appended: a member expired
        // after its check must not have its commit land after its successor's.
        let groups = self.groups.lock().expect("groups lock poisoned");
        {
            let group = groups.get(&request.group_id);
            for topic in request.topics {
                let mut results = Vec::with_capacity(topic.partitions.len());
                let partition_count = topics
                    .get(&topic.name)
                    .map(|existing| existing.partitions.len());
                for partition in topic.partitions {
                    let verdict = match (group, partition_count) {
                        (_, None) => Err(ErrorCode::UnknownTopic),
                        (_, Some(count)) if partition.partition as usize >= count => {
                            Err(ErrorCode::UnknownPartition)
                        }
                        (None, _) => Err(ErrorCode::UnknownMember),
                        (Some(group), _) => group.check_commit(
                            &request.member_id,
                            request.member_epoch,
                            &(topic.name.clone(), partition.partition),
                        ),
                    };
                    let error_code = match verdict {
                        Ok(()) => {
                            entries.push(CommitEntry {
                                topic: topic.name.clone(),
                                partition: partition.partition,
                                offset: partition.offset,
                                metadata: partition.metadata,
                            });
                            ErrorCode::None
                        }
                        Err(code) => code,
                    };
                    results.push(PartitionResult {
                        partition: partition.partition,
                        error_code,
                    });
                }
                response.topics.push(TopicResults {
                    name: topic.name,
                    partitions: results,
                });
            }
        }
        if entries.is_empty() {
            return (response, None);
        }
        let appended = self.offsets.append(&request.group_id, &entries);
        drop(groups);
        match appended {
            Ok((next_offset, first_position)) => (
                response,
                Some(PendingCommit {
                    group: request.group_id,
                    entries,
                    next_offset,
                    first_position,
                }),
            ),
            Err(error) => {
                tracing::error!(%error, "appending commits failed");
                mark_accepted(&mut response, error.error_code());
                (response, None)
            }
        }
    }

    /// Waits for a commit's durability, then makes it visible; on failure the accepted
    /// partitions get the storage error and nothing is applied.
    pub async fn finish_commit(
        self: &Arc<Self>,
        mut response: CommitOffsetsResponse,
        pending: PendingCommit,
    ) -> CommitOffsetsResponse {
        match self.offsets.wait_durable(pending.next_offset).await {
            Ok(()) => {
                let manager = Arc::clone(self);
                let applied = tokio::task::spawn_blocking(move || {
                    manager
                        .offsets
                        .apply(&pending.group, &pending.entries, pending.first_position);
                })
                .await;
                if applied.is_err() {
                    mark_accepted(&mut response, ErrorCode::UnknownServerError);
                }
            }
            Err(error) => {
                self.offsets.abandon(pending.first_position);
                mark_accepted(&mut response, error.error_code());
            }
        }
        response
    }

    pub fn fetch_offsets(&self, request: FetchOffsetsRequest) -> FetchOffsetsResponse {
        let topics = match request.topics {
            Some(topics) => topics
                .into_iter()
                .map(|topic| CommittedTopic {
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|partition| {
                            let committed =
                                self.offsets
                                    .get(&request.group_id, &topic.topic, *partition);
                            CommittedPartition {
                                partition: *partition,
                                committed_offset: committed
                                    .as_ref()
                                    .map_or(-1, |entry| entry.offset as i64),
                                metadata: committed.and_then(|entry| entry.metadata),
                            }
                        })
                        .collect(),
                    name: topic.topic,
                })
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<CommittedPartition>> = BTreeMap::new();
                for (topic, partition, committed) in self.offsets.group_offsets(&request.group_id) {
                    by_topic.entry(topic).or_default().push(CommittedPartition {
                        partition,
                        committed_offset: committed.offset as i64,
                        metadata: committed.metadata,
                    });
                }
                by_topic
                    .into_iter()
                    .map(|(name, partitions)| CommittedTopic { name, partitions })
                    .collect()
            }
        };
        FetchOffsetsResponse {
            error_code: ErrorCode::None,
            topics,
        }
    }

    pub fn describe(
        &self,
        request: DescribeGroupRequest,
        topics: &TopicRegistry,
    ) -> DescribeGroupResponse {
        let groups = self.groups.lock().expect("groups lock poisoned");
        let group = groups.get(&request.group_id);
        let committed = self.offsets.group_offsets(&request.group_id);
        if group.is_none() && committed.is_empty() {
            return DescribeGroupResponse {
                error_code: ErrorCode::UnknownGroup,
                group_id: request.group_id,
                ..Default::default()
            };
        }
        let mut partitions: BTreeMap<TopicPartition, i64> = committed
            .into_iter()
            .map(|(topic, partition, entry)| ((topic, partition), entry.offset as i64))
            .collect();
        let mut members = Vec::new();
        if let Some(group) = group {
            for member in group.members.values() {
                let assigned = group.target.get(&member.id).cloned().unwrap_or_default();
                for partition in &assigned {
                    partitions.entry(partition.clone()).or_insert(-1);
                }
                members.push(GroupMemberDescription {
                    member_id: member.id.clone(),
                    member_epoch: member.epoch,
                    topics: member.topics.iter().cloned().collect(),
                    assigned: TopicPartitions::group(&assigned),
                    owned: TopicPartitions::group(&member.given),
                });
            }
        }
        let offsets = partitions
            .into_iter()
            .map(|((topic, partition), committed_offset)| {
                let log_end_offset = topics
                    .get(&topic)
                    .and_then(|entry| entry.partition(partition).map(|log| log.latest_offset()))
                    .unwrap_or(0);
                let lag = if committed_offset < 0 {
                    -1
                } else {
                    (log_end_offset as i64 - committed_offset).max(0)
                };
                GroupOffsetDescription {
                    topic,
                    partition,
                    committed_offset,
                    log_end_offset,
                    lag,
                }
            })
            .collect();
        DescribeGroupResponse {
            error_code: ErrorCode::None,
            group_id: request.group_id,
            state: group.map_or("empty", Group::state).to_owned(),
            group_epoch: group.map_or(0, |group| group.epoch),
            assignor: group.map_or_else(
                || assignor::Assignor::default().to_string(),
                |group| group.assignor.to_string(),
            ),
            members,
            offsets,
        }
    }

    pub fn list(&self) -> ListGroupsResponse {
        let groups = self.groups.lock().expect("groups lock poisoned");
        let mut listed: BTreeMap<String, GroupListing> = self
            .offsets
            .groups()
            .into_iter()
            .map(|group_id| {
                (
                    group_id.clone(),
                    GroupListing {
                        group_id,
                        state: "empty".into(),
                        members: 0,
                    },
                )
            })
            .collect();
        for group in groups.values() {
            listed.insert(
                group.id.clone(),
                GroupListing {
                    group_id: group.id.clone(),
                    state: group.state().into(),
                    members: group.members.len() as u32,
                },
            );
        }
        ListGroupsResponse {
            groups: listed.into_values().collect(),
        }
    }

    /// Lag per (group, topic, partition) for every committed offset, for metrics.
    pub fn lags(&self, topics: &TopicRegistry) -> Vec<(String, String, u32, u64)> {
        let mut out = Vec::new();
        for group in self.offsets.groups() {
            for (topic, partition, committed) in self.offsets.group_offsets(&group) {
                if let Some(log) = topics
                    .get(&topic)
                    .and_then(|entry| entry.partition(partition).cloned())
                {
                    out.push((
                        group.clone(),
                        topic,
                        partition,
                        log.latest_offset().saturating_sub(committed.offset),
                    ));
                }
            }
        }
        out
    }
}

fn mark_accepted(response: &mut CommitOffsetsResponse, code: ErrorCode) {
    for topic in &mut response.topics {
        for partition in &mut topic.partitions {
            if partition.error_code == ErrorCode::None {
                partition.error_code = code;
            }
        }
    }
}

/// Why a member's subscription is refused, if it is: more topics than the broker may ever
/// hold, or a name no topic can have. A member keeps its subscription for its whole session and
/// every heartbeat and rebalance walks it under the groups lock, so one member listing
/// hundreds of thousands of names would slow every group on the broker.
fn subscription_problem(names: &[String], max_topics: usize) -> Option<String> {
    if names.len() > max_topics {
        return Some(format!(
            "a subscription of {} topics is over max_topics ({max_topics})",
            names.len()
        ));
    }
    names
        .iter()
        .find(|name| name.is_empty() || name.len() > MAX_TOPIC_NAME_BYTES)
        .map(|name| {
            format!(
                "subscribed topic name of {} bytes: names are 1 to {MAX_TOPIC_NAME_BYTES}",
                name.len()
            )
        })
}

#[cfg(test)]
mod expiry_tests {
    use std::path::Path;

    use super::*;
    use crate::storage::faultfs::FaultFs;
    use crate::storage::fs::Fs;
    use crate::storage::{LogConfig, Storage, StorageOptions};

    /// Offsets of a group not seen with a member since the broker started are kept for the
    /// retention period after the start plus the longest session (its members may be on their
    /// way back); a group seen in this run expires a retention period after it was last seen
    /// or committed, whichever is later.
    #[tokio::test]
    async fn a_broker_start_counts_as_activity_plus_the_longest_session() {
        let fs: Fs = Arc::new(FaultFs::new());
        let storage = Storage::new(Arc::clone(&fs), StorageOptions::default());
        let log = storage
            .open_log(
                Path::new("/data/topics/__consumer_offsets/0"),
                LogConfig::default(),
            )
            .unwrap();
        let store = OffsetStore::open(Arc::clone(&fs), "/data/groups".into(), log).unwrap();
        for group in ["old", "seen"] {
            let entries = [CommitEntry {
                topic: "t".into(),
                partition: 0,
                offset: 4,
                metadata: None,
            }];
            let (next, first) = store.append(group, &entries).unwrap();
            store.wait_durable(next).await.unwrap();
            store.apply(group, &entries, first);
        }
        let settings = GroupSettings {
            max_session_timeout_ms: 6_000,
            offsets_retention_ms: 1_000,
            ..GroupSettings::default()
        };
        let manager = GroupManager::new(settings, store);
        let start = manager.started_wall_ms;
        // Commits made "before the start" as far as the clock below is concerned.
        manager
            .activity
            .lock()
            .unwrap()
            .seen_with_members
            .insert("seen".into(), start + 2_000);
        let expire_at = |now_ms: u64| {
            let mut groups = manager.groups.lock().unwrap();
            manager.expire_offsets(&mut groups, now_ms);
            manager.activity.lock().unwrap().last_check_ms = None;
        };
        let has = |group: &str| manager.offsets.has_group(group);

        expire_at(start + 2_999);
        assert!(has("seen") && has("old"));
        expire_at(start + 3_000);
        assert!(!has("seen"), "a retention period after it was last seen");
        assert!(has("old"));
        expire_at(start + 6_999);
        assert!(has("old"), "within the start's grace");
        expire_at(start + 7_000);
        assert!(!has("old"));

        // A check far ahead, then the clock set back: the next check is not put off until the
        // clock is past the first again.
        let check_at = |now_ms: u64| {
            let mut groups = manager.groups.lock().unwrap();
            manager.expire_offsets(&mut groups, now_ms);
        };
        check_at(start + 3_600_000);
        let entries = [CommitEntry {
            topic: "t".into(),
            partition: 0,
            offset: 5,
            metadata: None,
        }];
        let (next, first) = manager.offsets.append("late", &entries).unwrap();
        manager.offsets.wait_durable(next).await.unwrap();
        manager.offsets.apply("late", &entries, first);
        assert!(has("late"));
        check_at(crate::now_ms() + 60_000);
        assert!(!has("late"), "checked after the clock went back");
        drop(manager);
        storage.shutdown();
    }
}
