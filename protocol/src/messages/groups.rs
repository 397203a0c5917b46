//! Consumer-group messages (keys 10 to 15), KIP-848 style: the broker owns membership and
//! assignment; a member heartbeats and is told what to own and what to release.
//!
//! ```text
//! ConsumerGroupHeartbeat (10)
//!   request v0:   group_id string, member_id string (empty to join), member_epoch u32 (0 to join),
//!                 session_timeout_ms u32 (0 = broker default; read on join),
//!                 assignor nullable string (read on join),
//!                 topics nullable array { string }            (null = unchanged)
//!                 owned nullable array { TopicPartitions }    (null = unchanged)
//!   response v0:  error_code u16, error_message nullable string, member_id string,
//!                 member_epoch u32, group_epoch u32, heartbeat_interval_ms u32,
//!                 assignment array { TopicPartitions }  (what to own now)
//!                 release array { TopicPartitions }     (what to give up: commit, then stop)
//! LeaveGroup (11)
//!   request v0:   group_id string, member_id string
//!   response v0:  error_code u16
//! CommitOffsets (12)
//!   request v0:   group_id string, member_id string, member_epoch u32,
//!                 topics array { name string, partitions array { partition u32, offset u64,
//!                                                                metadata nullable string } }
//!   response v0:  error_code u16,
//!                 topics array { name string, partitions array { partition u32, error_code u16 } }
//! FetchOffsets (13)
//!   request v0:   group_id string, topics nullable array { TopicPartitions } (null = all)
//!   response v0:  error_code u16,
//!                 topics array { name string, partitions array { partition u32,
//!                                committed_offset i64 (-1 = none), metadata nullable string } }
//! DescribeGroup (14)
//!   request v0:   group_id string
//!   response v0:  error_code u16, group_id string, state string, group_epoch u32, assignor string,
//!                 members array { member_id string, member_epoch u32, topics array { string },
//!                                 assigned array { TopicPartitions }, owned array { TopicPartitions } }
//!                 offsets array { topic string, partition u32, committed_offset i64,
//!                                 log_end_offset u64, lag i64 (-1 = unknown) }
//! ListGroups (15)
//!   request v0:   (empty)
//!   response v0:  groups array { group_id string, state string, members u32 }
//!
//! TopicPartitions: topic string, partitions array { u32 }
//! ```
//!
//! A committed offset is the next offset to read.

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_nullable_count, put_nullable_string, put_string};

#[cfg(test)]
use crate::messages::test_support::name as test_name;

/// Some partitions of one topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopicPartitions {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub topic: String,
    #[cfg_attr(test, proptest(strategy = "proptest::collection::vec(0u32..64, 0..5)"))]
    pub partitions: Vec<u32>,
}

impl TopicPartitions {
    /// Groups a sorted set of (topic, partition) pairs by topic, in order.
    pub fn group(set: &std::collections::BTreeSet<(String, u32)>) -> Vec<TopicPartitions> {
        let mut out: Vec<TopicPartitions> = Vec::new();
        for (topic, partition) in set {
            match out.last_mut() {
                Some(last) if last.topic == *topic => last.partitions.push(*partition),
                _ => out.push(TopicPartitions {
                    topic: topic.clone(),
                    partitions: vec![*partition],
                }),
            }
        }
        out
    }

    /// The (topic, partition) pairs of a list, as a set.
    pub fn flatten(list: &[TopicPartitions]) -> std::collections::BTreeSet<(String, u32)> {
        list.iter()
            .flat_map(|entry| {
                entry
                    .partitions
                    .iter()
                    .map(|partition| (entry.topic.clone(), *partition))
            })
            .collect()
    }
}

fn put_topic_partitions(dst: &mut BytesMut, list: &[TopicPartitions]) {
    put_count(dst, list.len());
    for entry in list {
        put_string(dst, &entry.topic);
        put_count(dst, entry.partitions.len());
        for partition in &entry.partitions {
            dst.put_u32(*partition);
        }
    }
}

fn topic_partitions(src: &mut Reader) -> Result<TopicPartitions, WireError> {
    Ok(TopicPartitions {
        topic: src.string("topic")?,
        partitions: src.array("partitions", 4, |src| src.u32("partition"))?,
    })
}

fn get_topic_partitions(src: &mut Reader) -> Result<Vec<TopicPartitions>, WireError> {
    src.array("topic partitions", 6, topic_partitions)
}

fn put_strings(dst: &mut BytesMut, list: &[String]) {
    put_count(dst, list.len());
    for item in list {
        put_string(dst, item);
    }
}

fn nullable<T>(
    src: &mut Reader,
    what: &'static str,
    min: usize,
    mut item: impl FnMut(&mut Reader) -> Result<T, WireError>,
) -> Result<Option<Vec<T>>, WireError> {
    match src.nullable_array_count(what, min)? {
        None => Ok(None),
        Some(count) => (0..count)
            .map(|_| item(src))
            .collect::<Result<Vec<T>, _>>()
            .map(Some),
    }
}

#[cfg(test)]
fn strings_strategy() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    proptest::collection::vec(crate::messages::test_support::name(), 0..4)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConsumerGroupHeartbeatRequest {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub member_id: String,
    pub member_epoch: u32,
    pub session_timeout_ms: u32,
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(test_name())"))]
    pub assignor: Option<String>,
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(strings_strategy())"))]
    pub topics: Option<Vec<String>>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::option::of(proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3))"
        )
    )]
    pub owned: Option<Vec<TopicPartitions>>,
}

impl Body for ConsumerGroupHeartbeatRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.group_id);
        put_string(dst, &self.member_id);
        dst.put_u32(self.member_epoch);
        dst.put_u32(self.session_timeout_ms);
        put_nullable_string(dst, self.assignor.as_deref());
        put_nullable_count(dst, self.topics.as_ref().map(Vec::len));
        for topic in self.topics.iter().flatten() {
            put_string(dst, topic);
        }
        match &self.owned {
            None => put_nullable_count(dst, None),
            Some(owned) => put_topic_partitions(dst, owned),
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ConsumerGroupHeartbeatRequest {
            group_id: src.string("group_id")?,
            member_id: src.string("member_id")?,
            member_epoch: src.u32("member_epoch")?,
            session_timeout_ms: src.u32("session_timeout_ms")?,
            assignor: src.nullable_string("assignor")?,
            topics: nullable(src, "topics", 2, |src| src.string("topic"))?,
            owned: nullable(src, "owned", 6, topic_partitions)?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConsumerGroupHeartbeatResponse {
    pub error_code: ErrorCode,
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(test_name())"))]
    pub error_message: Option<String>,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub member_id: String,
    pub member_epoch: u32,
    pub group_epoch: u32,
    pub heartbeat_interval_ms: u32,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3)"
        )
    )]
    pub assignment: Vec<TopicPartitions>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3)"
        )
    )]
    pub release: Vec<TopicPartitions>,
}

impl Body for ConsumerGroupHeartbeatResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_nullable_string(dst, self.error_message.as_deref());
        put_string(dst, &self.member_id);
        dst.put_u32(self.member_epoch);
        dst.put_u32(self.group_epoch);
        dst.put_u32(self.heartbeat_interval_ms);
        put_topic_partitions(dst, &self.assignment);
        put_topic_partitions(dst, &self.release);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ConsumerGroupHeartbeatResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            error_message: src.nullable_string("error_message")?,
            member_id: src.string("member_id")?,
            member_epoch: src.u32("member_epoch")?,
            group_epoch: src.u32("group_epoch")?,
            heartbeat_interval_ms: src.u32("heartbeat_interval_ms")?,
            assignment: get_topic_partitions(src)?,
            release: get_topic_partitions(src)?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LeaveGroupRequest {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub member_id: String,
}

impl Body for LeaveGroupRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.group_id);
        put_string(dst, &self.member_id);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(LeaveGroupRequest {
            group_id: src.string("group_id")?,
            member_id: src.string("member_id")?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LeaveGroupResponse {
    pub error_code: ErrorCode,
}

impl Body for LeaveGroupResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(LeaveGroupResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommitPartition {
    pub partition: u32,
    /// The next offset to read.
    pub offset: u64,
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(test_name())"))]
    pub metadata: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommitTopic {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CommitPartition>(), 0..4)"
        )
    )]
    pub partitions: Vec<CommitPartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommitOffsetsRequest {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub member_id: String,
    pub member_epoch: u32,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CommitTopic>(), 0..3)"
        )
    )]
    pub topics: Vec<CommitTopic>,
}

impl Body for CommitOffsetsRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.group_id);
        put_string(dst, &self.member_id);
        dst.put_u32(self.member_epoch);
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u64(partition.offset);
                put_nullable_string(dst, partition.metadata.as_deref());
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(CommitOffsetsRequest {
            group_id: src.string("group_id")?,
            member_id: src.string("member_id")?,
            member_epoch: src.u32("member_epoch")?,
            topics: src.array("topics", 6, |src| {
                Ok(CommitTopic {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 14, |src| {
                        Ok(CommitPartition {
                            partition: src.u32("partition")?,
                            offset: src.u64("offset")?,
                            metadata: src.nullable_string("metadata")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PartitionResult {
    pub partition: u32,
    pub error_code: ErrorCode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopicResults {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<PartitionResult>(), 0..4)"
        )
    )]
    pub partitions: Vec<PartitionResult>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommitOffsetsResponse {
    pub error_code: ErrorCode,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicResults>(), 0..3)"
        )
    )]
    pub topics: Vec<TopicResults>,
}

impl Body for CommitOffsetsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u16(partition.error_code.code());
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(CommitOffsetsResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            topics: src.array("topics", 6, |src| {
                Ok(TopicResults {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 6, |src| {
                        Ok(PartitionResult {
                            partition: src.u32("partition")?,
                            error_code: ErrorCode::from_code(src.u16("error_code")?),
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchOffsetsRequest {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::option::of(proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3))"
        )
    )]
    pub topics: Option<Vec<TopicPartitions>>,
}

impl Body for FetchOffsetsRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.group_id);
        match &self.topics {
            None => put_nullable_count(dst, None),
            Some(topics) => put_topic_partitions(dst, topics),
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(FetchOffsetsRequest {
            group_id: src.string("group_id")?,
            topics: nullable(src, "topics", 6, topic_partitions)?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommittedPartition {
    pub partition: u32,
    /// The next offset to read, or -1 when nothing is committed.
    pub committed_offset: i64,
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(test_name())"))]
    pub metadata: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CommittedTopic {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CommittedPartition>(), 0..4)"
        )
    )]
    pub partitions: Vec<CommittedPartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchOffsetsResponse {
    pub error_code: ErrorCode,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CommittedTopic>(), 0..3)"
        )
    )]
    pub topics: Vec<CommittedTopic>,
}

impl Body for FetchOffsetsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_i64(partition.committed_offset);
                put_nullable_string(dst, partition.metadata.as_deref());
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(FetchOffsetsResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            topics: src.array("topics", 6, |src| {
                Ok(CommittedTopic {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 14, |src| {
                        Ok(CommittedPartition {
                            partition: src.u32("partition")?,
                            committed_offset: src.i64("committed_offset")?,
                            metadata: src.nullable_string("metadata")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DescribeGroupRequest {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
}

impl Body for DescribeGroupRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.group_id);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DescribeGroupRequest {
            group_id: src.string("group_id")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GroupMemberDescription {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub member_id: String,
    pub member_epoch: u32,
    #[cfg_attr(test, proptest(strategy = "strings_strategy()"))]
    pub topics: Vec<String>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3)"
        )
    )]
    pub assigned: Vec<TopicPartitions>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicPartitions>(), 0..3)"
        )
    )]
    pub owned: Vec<TopicPartitions>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GroupOffsetDescription {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub topic: String,
    pub partition: u32,
    /// -1 when nothing is committed.
    pub committed_offset: i64,
    pub log_end_offset: u64,
    /// `log_end_offset - committed_offset`, or -1 when nothing is committed.
    pub lag: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DescribeGroupResponse {
    pub error_code: ErrorCode,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub state: String,
    pub group_epoch: u32,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub assignor: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<GroupMemberDescription>(), 0..3)"
        )
    )]
    pub members: Vec<GroupMemberDescription>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<GroupOffsetDescription>(), 0..3)"
        )
    )]
    pub offsets: Vec<GroupOffsetDescription>,
}

impl Body for DescribeGroupResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_string(dst, &self.group_id);
        put_string(dst, &self.state);
        dst.put_u32(self.group_epoch);
        put_string(dst, &self.assignor);
        put_count(dst, self.members.len());
        for member in &self.members {
            put_string(dst, &member.member_id);
            dst.put_u32(member.member_epoch);
            put_strings(dst, &member.topics);
            put_topic_partitions(dst, &member.assigned);
            put_topic_partitions(dst, &member.owned);
        }
        put_count(dst, self.offsets.len());
        for offset in &self.offsets {
            put_string(dst, &offset.topic);
            dst.put_u32(offset.partition);
            dst.put_i64(offset.committed_offset);
            dst.put_u64(offset.log_end_offset);
            dst.put_i64(offset.lag);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DescribeGroupResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            group_id: src.string("group_id")?,
            state: src.string("state")?,
            group_epoch: src.u32("group_epoch")?,
            assignor: src.string("assignor")?,
            members: src.array("members", 18, |src| {
                Ok(GroupMemberDescription {
                    member_id: src.string("member_id")?,
                    member_epoch: src.u32("member_epoch")?,
                    topics: src.array("topics", 2, |src| src.string("topic"))?,
                    assigned: get_topic_partitions(src)?,
                    owned: get_topic_partitions(src)?,
                })
            })?,
            offsets: src.array("offsets", 30, |src| {
                Ok(GroupOffsetDescription {
                    topic: src.string("topic")?,
                    partition: src.u32("partition")?,
                    committed_offset: src.i64("committed_offset")?,
                    log_end_offset: src.u64("log_end_offset")?,
                    lag: src.i64("lag")?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListGroupsRequest {}

impl Body for ListGroupsRequest {
    fn encode(&self, _dst: &mut BytesMut) {}

    fn decode(_src: &mut Reader) -> Result<Self, WireError> {
        Ok(ListGroupsRequest {})
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GroupListing {
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub group_id: String,
    #[cfg_attr(test, proptest(strategy = "test_name()"))]
    pub state: String,
    pub members: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListGroupsResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<GroupListing>(), 0..4)"
        )
    )]
    pub groups: Vec<GroupListing>,
}

impl Body for ListGroupsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.groups.len());
        for group in &self.groups {
            put_string(dst, &group.group_id);
            put_string(dst, &group.state);
            dst.put_u32(group.members);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ListGroupsResponse {
            groups: src.array("groups", 8, |src| {
                Ok(GroupListing {
                    group_id: src.string("group_id")?,
                    state: src.string("state")?,
                    members: src.u32("members")?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(
        heartbeat_request: ConsumerGroupHeartbeatRequest,
        heartbeat_response: ConsumerGroupHeartbeatResponse,
        leave_request: LeaveGroupRequest,
        leave_response: LeaveGroupResponse,
        commit_request: CommitOffsetsRequest,
        commit_response: CommitOffsetsResponse,
        fetch_offsets_request: FetchOffsetsRequest,
        fetch_offsets_response: FetchOffsetsResponse,
        describe_request: DescribeGroupRequest,
        describe_response: DescribeGroupResponse,
        list_request: ListGroupsRequest,
        list_response: ListGroupsResponse,
    );

    #[test]
    fn exact_heartbeat_request_bytes() {
        let request = ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            member_id: String::new(),
            member_epoch: 0,
            session_timeout_ms: 10_000,
            assignor: None,
            topics: Some(vec!["t".into()]),
            owned: None,
        };
        assert_eq!(
            encoded(&request),
            [
                0, 1, b'g', 0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x10, 0xff, 0xff, //
                0, 0, 0, 1, 0, 1, b't', 0xff, 0xff, 0xff, 0xff,
            ]
        );
    }

    #[test]
    fn exact_commit_and_small_request_bytes() {
        let request = CommitOffsetsRequest {
            group_id: "g".into(),
            member_id: "m".into(),
            member_epoch: 2,
            topics: vec![CommitTopic {
                name: "t".into(),
                partitions: vec![CommitPartition {
                    partition: 1,
                    offset: 9,
                    metadata: None,
                }],
            }],
        };
        assert_eq!(
            encoded(&request),
            [
                0, 1, b'g', 0, 1, b'm', 0, 0, 0, 2, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 1, //
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0xff, 0xff,
            ]
        );
        assert_eq!(
            encoded(&LeaveGroupRequest {
                group_id: "g".into(),
                member_id: "m".into()
            }),
            [0, 1, b'g', 0, 1, b'm']
        );
        assert_eq!(
            encoded(&FetchOffsetsRequest {
                group_id: "g".into(),
                topics: None
            }),
            [0, 1, b'g', 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            encoded(&DescribeGroupRequest {
                group_id: "g".into()
            }),
            [0, 1, b'g']
        );
        assert!(encoded(&ListGroupsRequest {}).is_empty());
    }
}
