//! The consumer-group coordinator: a state machine without IO. Inputs carry `now_ms`; the
//! caller (a task in [`super::GroupManager`]) supplies time and partition counts and persists
//! commits.
//!
//! Each group has an epoch that moves whenever membership, subscriptions or partition counts
//! change; then the assignor computes a new *target*. Partitions are handed over safely:
//!
//! ```text
//! heartbeat(M, owned) ─▶ given(M) ∩= owned          (what M stopped owning is free again)
//!                     ─▶ release = given(M) − target(M)      (M commits them, then reports)
//!                     ─▶ grant every p ∈ target(M) − given(M) that nobody holds
//!                     ─▶ answer: own given(M) ∩ target(M), release `release`
//! ```
//!
//! A partition is granted to its new owner only after the previous owner reported it released
//! or expired, so no partition is ever held by two members at once. A member's epoch catches
//! up with the group epoch once it holds exactly its target; a request carrying an older
//! epoch than the member's previous one is a zombie and is fenced.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sluice_protocol::ErrorCode;

use super::assignor::{Assignment, Assignor, TopicPartition};

/// Session and heartbeat settings.
#[derive(Clone, Copy, Debug)]
pub struct GroupSettings {
    pub heartbeat_interval_ms: u32,
    pub default_session_timeout_ms: u32,
    pub min_session_timeout_ms: u32,
    pub max_session_timeout_ms: u32,
    /// How long a group's committed offsets outlive its last member and its last commit.
    pub offsets_retention_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            heartbeat_interval_ms: 1000,
            default_session_timeout_ms: 10_000,
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 300_000,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// A heartbeat, as the coordinator sees it.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    /// Empty to join.
    pub member_id: String,
    pub member_epoch: u32,
    /// 0 = default.
    pub session_timeout_ms: u32,
    pub assignor: Option<String>,
    /// `None` = unchanged.
    pub topics: Option<Vec<String>>,
    /// `None` = unchanged.
    pub owned: Option<BTreeSet<TopicPartition>>,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    pub member_id: String,
    pub member_epoch: u32,
    pub group_epoch: u32,
    pub heartbeat_interval_ms: u32,
    /// Own these now.
    pub assignment: BTreeSet<TopicPartition>,
    /// Commit these, stop reading them, and report them gone.
    pub release: BTreeSet<TopicPartition>,
}

/// Why a group request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupError {
    pub code: ErrorCode,
    pub message: String,
}

fn error(code: ErrorCode, message: impl Into<String>) -> GroupError {
    GroupError {
        code,
        message: message.into(),
    }
}

#[derive(Clone, Debug)]
pub struct Member {
    pub id: String,
    pub epoch: u32,
    previous_epoch: u32,
    pub topics: BTreeSet<String>,
    session_timeout_ms: u32,
    deadline_ms: u64,
    /// Partitions handed to this member and not yet released.
    pub given: BTreeSet<TopicPartition>,
}

/// One consumer group.
#[derive(Clone, Debug)]
pub struct Group {
    pub id: String,
    pub epoch: u32,
    pub assignor: Assignor,
    pub members: BTreeMap<String, Member>,
    pub target: Assignment,
    owners: HashMap<TopicPartition, String>,
    /// Partition counts the target was computed with.
    partition_counts: BTreeMap<String, u32>,
    /// Makes member ids unique across broker restarts.
    incarnation: String,
    next_member: u64,
}

impl Group {
    pub fn new(id: &str, incarnation: &str) -> Group {
        Group {
            id: id.to_owned(),
            epoch: 0,
            assignor: Assignor::default(),
            members: BTreeMap::new(),
            target: Assignment::new(),
            owners: HashMap::new(),
            partition_counts: BTreeMap::new(),
            incarnation: incarnation.to_owned(),
            next_member: 0,
        }
    }

    /// `empty`, `stable` (every member holds exactly its target) or `reconciling`.
    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.members.values().all(|member| {
            member.epoch == self.epoch
                && self
                    .target
                    .get(&member.id)
                    .is_some_and(|target| *target == member.given)
        }) {
            "stable"
        } else {
            "reconciling"
        }
    }

    /// Every topic some member subscribes to.
    pub fn subscribed_topics(&self) -> BTreeSet<String> {
        self.members
            .values()
            .flat_map(|member| member.topics.iter().cloned())
            .collect()
    }

    /// Handles a heartbeat (a join when `member_id` is empty).
    ///
    /// # Errors
    /// `UnknownMember` for a member id the group does not have (expired or never joined),
    /// `FencedMemberEpoch` for a stale epoch, `InvalidSessionTimeout`, `InvalidRequest`.
    pub fn heartbeat(
        &mut self,
        request: Heartbeat,
        now_ms: u64,
        settings: &GroupSettings,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<HeartbeatAnswer, GroupError> {
        let mut changed = false;
        let member_id = if request.member_id.is_empty() {
            let topics = request.topics.clone().ok_or_else(|| {
                error(
                    ErrorCode::InvalidRequest,
                    "a joining member must list its topics",
                )
            })?;
            let session_timeout_ms = match request.session_timeout_ms {
                0 => settings.default_session_timeout_ms,
                timeout => timeout,
            };
            if !(settings.min_session_timeout_ms..=settings.max_session_timeout_ms)
                .contains(&session_timeout_ms)
            {
                return Err(error(
                    ErrorCode::InvalidSessionTimeout,
                    format!(
                        "session timeout {session_timeout_ms} ms is outside {}..={} ms",
                        settings.min_session_timeout_ms, settings.max_session_timeout_ms
                    ),
                ));
            }
            if let Some(name) = &request.assignor {
                let assignor = name
                    .parse::<Assignor>()
                    .map_err(|message| error(ErrorCode::InvalidRequest, message))?;
                if self.members.is_empty() {
                    self.assignor = assignor;
                }
            }
            self.next_member += 1;
            let id = format!("{}-{}", self.incarnation, self.next_member);
            self.members.insert(
                id.clone(),
                Member {
                    id: id.clone(),
                    epoch: 0,
                    previous_epoch: 0,
                    topics: topics.into_iter().collect(),
                    session_timeout_ms,
                    deadline_ms: now_ms + u64::from(session_timeout_ms),
                    given: BTreeSet::new(),
                },
            );
            changed = true;
            id
        } else {
            let member = self.members.get_mut(&request.member_id).ok_or_else(|| {
                error(
                    ErrorCode::UnknownMember,
                    format!("member {} is not in group {}", request.member_id, self.id),
                )
            })?;
            if request.member_epoch != member.epoch && request.member_epoch != member.previous_epoch
            {
                let fenced = error(
                    ErrorCode::FencedMemberEpoch,
                    format!(
                        "member epoch {} is stale (current {})",
                        request.member_epoch, member.epoch
                    ),
                );
                // A fenced member drops its partitions and joins again under a new id: its
                // old entry goes now, so its partitions move at once instead of staying with
                // nobody until its session would have expired.
                self.remove(&request.member_id);
                self.rebalance(partition_count);
                return Err(fenced);
            }
            member.deadline_ms = now_ms + u64::from(member.session_timeout_ms);
            if let Some(topics) = &request.topics {
                let topics: BTreeSet<String> = topics.iter().cloned().collect();
                if topics != member.topics {
                    member.topics = topics;
                    changed = true;
                }
            }
            if let Some(owned) = &request.owned {
                // What the member no longer reports owning, it has released.
                let released: Vec<TopicPartition> =
                    member.given.difference(owned).cloned().collect();
                for partition in released {
                    member.given.remove(&partition);
                    self.owners.remove(&partition);
                }
            }
            request.member_id.clone()
        };
        if changed || self.partition_counts_changed(partition_count) {
            self.rebalance(partition_count);
        }
        Ok(self.reconcile(&member_id, settings))
    }

    fn partition_counts_changed(&self, partition_count: &dyn Fn(&str) -> Option<u32>) -> bool {
        let now: BTreeMap<String, u32> = self
            .subscribed_topics()
            .into_iter()
            .filter_map(|topic| partition_count(&topic).map(|count| (topic, count)))
            .collect();
        now != self.partition_counts
    }

    /// A new group epoch and target.
    fn rebalance(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>) {
        self.partition_counts = self
            .subscribed_topics()
            .into_iter()
            .filter_map(|topic| partition_count(&topic).map(|count| (topic, count)))
            .collect();
        let subscriptions: BTreeMap<String, BTreeSet<String>> = self
            .members
            .values()
            .map(|member| (member.id.clone(), member.topics.clone()))
            .collect();
        self.target = self
            .assignor
            .assign(&subscriptions, &self.partition_counts, &self.target);
        self.epoch += 1;
    }

    fn reconcile(&mut self, member_id: &str, settings: &GroupSettings) -> HeartbeatAnswer {
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let epoch = self.epoch;
        let member = self
            .members
            .get_mut(member_id)
            .expect("reconciled member exists");
        for partition in target.difference(&member.given.clone()) {
            if !self.owners.contains_key(partition) {
                self.owners.insert(partition.clone(), member_id.to_owned());
                member.given.insert(partition.clone());
            }
        }
        let release: BTreeSet<TopicPartition> = member.given.difference(&target).cloned().collect();
        let assignment: BTreeSet<TopicPartition> =
            member.given.intersection(&target).cloned().collect();
        if release.is_empty() && assignment == target && member.epoch != epoch {
            member.previous_epoch = member.epoch;
            member.epoch = epoch;
        }
        HeartbeatAnswer {
            member_id: member_id.to_owned(),
            member_epoch: member.epoch,
            group_epoch: epoch,
            heartbeat_interval_ms: settings.heartbeat_interval_ms,
            assignment,
            release,
        }
    }

    /// Removes a member that leaves; its partitions are free at once.
    pub fn leave(
        &mut self,
        member_id: &str,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), GroupError> {
        if !self.members.contains_key(member_id) {
            return Err(error(
                ErrorCode::UnknownMember,
                format!("member {member_id} is not in group {}", self.id),
            ));
        }
        self.remove(member_id);
        self.rebalance(partition_count);
        Ok(())
    }

    fn remove(&mut self, member_id: &str) {
        if let Some(member) = self.members.remove(member_id) {
            for partition in member.given {
                self.owners.remove(&partition);
            }
        }
    }

    /// Expires members whose session ran out; returns their ids.
    pub fn expire(
        &mut self,
        now_ms: u64,
        partition_count: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|member| member.deadline_ms < now_ms)
            .map(|member| member.id.clone())
            .collect();
        for id in &expired {
            self.remove(id);
        }
        if !expired.is_empty() {
            self.rebalance(partition_count);
        }
        expired
    }

    /// Whether `member_id` at `member_epoch` may commit an offset for `partition`.
    pub fn check_commit(
        &self,
        member_id: &str,
        member_epoch: u32,
        partition: &TopicPartition,
    ) -> Result<(), ErrorCode> {
        let member = self
            .members
            .get(member_id)
            .ok_or(ErrorCode::UnknownMember)?;
        if member_epoch != member.epoch && member_epoch != member.previous_epoch {
            return Err(ErrorCode::FencedMemberEpoch);
        }
        if !member.given.contains(partition) {
            return Err(ErrorCode::FencedMemberEpoch);
        }
        Ok(())
    }

    /// Who holds each partition right now (for tests and checks).
    pub fn owners(&self) -> &HashMap<TopicPartition, String> {
        &self.owners
    }
}

#[cfg(test)]
#[path = "coordinator_test.rs"]
mod tests;
