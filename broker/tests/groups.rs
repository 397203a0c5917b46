//! Consumer groups against a real broker: membership, assignment, commits, fencing, lag,
//! and committed offsets surviving a restart and a kill -9.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::Connection;
use sluice_protocol::messages::*;
use sluice_protocol::{ErrorCode, RecordBatchBuilder, Response};
use support::{create_topic, delete_topic};

async fn start(data_dir: &Path) -> (BrokerHandle, Connection) {
    let broker = Broker::start(Config::on_loopback(data_dir))
        .await
        .expect("broker starts");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    (broker, connection)
}

async fn produce(connection: &Connection, topic: &str, partition: u32, count: usize) {
    let mut builder = RecordBatchBuilder::new();
    for index in 0..count {
        builder.append(index as i64, None, b"v", &[]);
    }
    let Response::Produce(response) = connection
        .send(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition,
                    records: builder.build().into_bytes(),
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(response.topics[0].partitions[0].error_code, ErrorCode::None);
}

async fn heartbeat(
    connection: &Connection,
    request: ConsumerGroupHeartbeatRequest,
) -> ConsumerGroupHeartbeatResponse {
    let Response::ConsumerGroupHeartbeat(response) = connection.send(request).await.unwrap() else {
        panic!()
    };
    response
}

fn join(group: &str, topic: &str) -> ConsumerGroupHeartbeatRequest {
    ConsumerGroupHeartbeatRequest {
        group_id: group.into(),
        topics: Some(vec![topic.into()]),
        ..Default::default()
    }
}

fn partitions(list: &[TopicPartitions]) -> BTreeSet<(String, u32)> {
    list.iter()
        .flat_map(|entry| entry.partitions.iter().map(|p| (entry.topic.clone(), *p)))
        .collect()
}

async fn commit(
    connection: &Connection,
    group: &str,
    member: &ConsumerGroupHeartbeatResponse,
    topic: &str,
    partition: u32,
    offset: u64,
) -> ErrorCode {
    let Response::CommitOffsets(response) = connection
        .send(CommitOffsetsRequest {
            group_id: group.into(),
            member_id: member.member_id.clone(),
            member_epoch: member.member_epoch,
            topics: vec![CommitTopic {
                name: topic.into(),
                partitions: vec![CommitPartition {
                    partition,
                    offset,
                    metadata: None,
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    response.topics[0].partitions[0].error_code
}

async fn committed(connection: &Connection, group: &str, topic: &str, partition: u32) -> i64 {
    let Response::FetchOffsets(response) = connection
        .send(FetchOffsetsRequest {
            group_id: group.into(),
            topics: Some(vec![TopicPartitions {
                topic: topic.into(),
                partitions: vec![partition],
            }]),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    response.topics[0].partitions[0].committed_offset
}

#[tokio::test]
async fn two_members_split_partitions_commit_and_describe_lag() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "orders", 4).await;
    produce(&connection, "orders", 0, 10).await;

    let first = heartbeat(&connection, join("billing", "orders")).await;
    assert_eq!(first.error_code, ErrorCode::None);
    assert_eq!(partitions(&first.assignment).len(), 4);
    let second = heartbeat(&connection, join("billing", "orders")).await;
    assert_eq!(second.error_code, ErrorCode::None);
    assert!(
        second.assignment.is_empty(),
        "nothing is free until the first member releases"
    );

    // The first member is told to release half; it reports the release.
    let told = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "billing".into(),
            member_id: first.member_id.clone(),
            member_epoch: first.member_epoch,
            owned: Some(first.assignment.clone()),
            ..Default::default()
        },
    )
    .await;
    let release = partitions(&told.release);
    assert_eq!(release.len(), 2);
    let keep = partitions(&told.assignment);
    let kept: Vec<TopicPartitions> = keep
        .iter()
        .map(|(topic, partition)| TopicPartitions {
            topic: topic.clone(),
            partitions: vec![*partition],
        })
        .collect();
    // Commit on a partition it still holds before releasing it: accepted.
    let (_, released_partition) = release.iter().next().unwrap().clone();
    assert_eq!(
        commit(
            &connection,
            "billing",
            &told,
            "orders",
            released_partition,
            3
        )
        .await,
        ErrorCode::None
    );
    let after = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "billing".into(),
            member_id: first.member_id.clone(),
            member_epoch: told.member_epoch,
            owned: Some(kept),
            ..Default::default()
        },
    )
    .await;
    assert!(after.release.is_empty());
    let second_now = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "billing".into(),
            member_id: second.member_id.clone(),
            member_epoch: second.member_epoch,
            owned: Some(vec![]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(partitions(&second_now.assignment), release);

    // The first member no longer holds the released partition: its commit there is fenced,
    // and nothing is stored.
    assert_eq!(
        commit(
            &connection,
            "billing",
            &after,
            "orders",
            released_partition,
            9
        )
        .await,
        ErrorCode::FencedMemberEpoch
    );
    assert_eq!(
        committed(&connection, "billing", "orders", released_partition).await,
        3
    );
    // A stranger's commit is refused.
    let stranger = ConsumerGroupHeartbeatResponse {
        member_id: "nobody".into(),
        ..Default::default()
    };
    assert_eq!(
        commit(&connection, "billing", &stranger, "orders", 0, 1).await,
        ErrorCode::UnknownMember
    );

    // The new owner commits partition 0's progress; describe shows lag = end - committed.
    if partitions(&second_now.assignment).contains(&("orders".to_owned(), 0)) {
        assert_eq!(
            commit(&connection, "billing", &second_now, "orders", 0, 4).await,
            ErrorCode::None
        );
    } else {
        assert_eq!(
            commit(&connection, "billing", &after, "orders", 0, 4).await,
            ErrorCode::None
        );
    }
    let Response::DescribeGroup(described) = connection
        .send(DescribeGroupRequest {
            group_id: "billing".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(described.error_code, ErrorCode::None);
    assert_eq!(described.members.len(), 2);
    let zero = described
        .offsets
        .iter()
        .find(|o| o.topic == "orders" && o.partition == 0)
        .unwrap();
    assert_eq!(
        (zero.committed_offset, zero.log_end_offset, zero.lag),
        (4, 10, 6)
    );

    let Response::ListGroups(list) = connection.send(ListGroupsRequest {}).await.unwrap() else {
        panic!()
    };
    assert_eq!(list.groups.len(), 1);
    assert_eq!(list.groups[0].members, 2);

    let Response::LeaveGroup(left) = connection
        .send(LeaveGroupRequest {
            group_id: "billing".into(),
            member_id: second.member_id.clone(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(left.error_code, ErrorCode::None);
    broker.shutdown().await;
}

#[tokio::test]
async fn committed_offsets_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "t", 2).await;
    let member = heartbeat(&connection, join("g", "t")).await;
    for round in 0..50u64 {
        assert_eq!(
            commit(&connection, "g", &member, "t", (round % 2) as u32, round).await,
            ErrorCode::None
        );
    }
    drop(connection);
    broker.shutdown().await;
    let (broker, connection) = start(dir.path()).await;
    assert_eq!(committed(&connection, "g", "t", 0).await, 48);
    assert_eq!(committed(&connection, "g", "t", 1).await, 49);
    assert_eq!(committed(&connection, "g", "t", 5).await, -1);
    // The member's session did not survive the restart: it must join again.
    let stale = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            member_id: member.member_id.clone(),
            member_epoch: member.member_epoch,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stale.error_code, ErrorCode::UnknownMember);
    broker.shutdown().await;
}

/// Deleting a topic deletes its committed offsets: a topic created again under the name is
/// read from where the reset policy says, not from the deleted topic's positions, also after
/// a restart. Other topics' commits stay.
#[tokio::test]
async fn a_deleted_topics_committed_offsets_go_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "t", 1).await;
    create_topic(&connection, "u", 1).await;
    let member = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            topics: Some(vec!["t".into(), "u".into()]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        commit(&connection, "g", &member, "t", 0, 7).await,
        ErrorCode::None
    );
    assert_eq!(
        commit(&connection, "g", &member, "u", 0, 9).await,
        ErrorCode::None
    );
    delete_topic(&connection, "t").await;
    assert_eq!(committed(&connection, "g", "t", 0).await, -1);
    // The member still holds t-0 until its next heartbeat tells it otherwise, and commits what
    // it processed before releasing it: refused, or the offset would outlive the topic.
    assert_eq!(
        commit(&connection, "g", &member, "t", 0, 8).await,
        ErrorCode::UnknownTopic
    );
    create_topic(&connection, "t", 1).await;
    assert_eq!(committed(&connection, "g", "t", 0).await, -1);
    assert_eq!(committed(&connection, "g", "u", 0).await, 9);
    // A group whose only offsets went with a deleted topic, and that has no members, is
    // forgotten.
    let lone = heartbeat(&connection, join("lone", "u")).await;
    assert_eq!(
        commit(&connection, "lone", &lone, "u", 0, 1).await,
        ErrorCode::None
    );
    leave(&connection, "lone", &lone).await;
    assert!(
        listed_groups(&connection)
            .await
            .contains(&"lone".to_owned())
    );
    delete_topic(&connection, "u").await;
    assert!(
        !listed_groups(&connection)
            .await
            .contains(&"lone".to_owned())
    );
    assert_eq!(listed_groups(&connection).await, ["g"], "g has a member");
    drop(connection);
    broker.shutdown().await;
    let (broker, connection) = start(dir.path()).await;
    assert_eq!(committed(&connection, "g", "t", 0).await, -1);
    assert_eq!(committed(&connection, "g", "u", 0).await, -1);
    broker.shutdown().await;
}

async fn leave(connection: &Connection, group: &str, member: &ConsumerGroupHeartbeatResponse) {
    let Response::LeaveGroup(left) = connection
        .send(LeaveGroupRequest {
            group_id: group.into(),
            member_id: member.member_id.clone(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(left.error_code, ErrorCode::None);
}

async fn listed_groups(connection: &Connection) -> Vec<String> {
    let Response::ListGroups(list) = connection.send(ListGroupsRequest {}).await.unwrap() else {
        panic!()
    };
    list.groups
        .into_iter()
        .map(|group| group.group_id)
        .collect()
}

/// A group's committed offsets expire once it has had no member and no commit for
/// `group_offsets_retention_ms`, as Kafka's do, and stay gone after a restart; a group whose
/// member stays keeps its offsets however old its commits.
#[tokio::test]
async fn an_idle_groups_committed_offsets_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.group_offsets_retention_ms = 1000;
    let broker = Broker::start(config.clone()).await.expect("broker starts");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    create_topic(&connection, "t", 1).await;
    let live = heartbeat(&connection, join("live", "t")).await;
    assert_eq!(
        commit(&connection, "live", &live, "t", 0, 5).await,
        ErrorCode::None
    );
    let gone = heartbeat(&connection, join("gone", "t")).await;
    assert_eq!(
        commit(&connection, "gone", &gone, "t", 0, 3).await,
        ErrorCode::None
    );
    leave(&connection, "gone", &gone).await;
    assert_eq!(committed(&connection, "gone", "t", 0).await, 3);

    // The live member heartbeats while the other group's offsets age out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut live = live;
    while committed(&connection, "gone", "t", 0).await != -1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle group's offsets did not expire"
        );
        let answer = heartbeat(
            &connection,
            ConsumerGroupHeartbeatRequest {
                group_id: "live".into(),
                member_id: live.member_id.clone(),
                member_epoch: live.member_epoch,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(answer.error_code, ErrorCode::None);
        live.member_epoch = answer.member_epoch;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed(&connection, "live", "t", 0).await, 5);
    assert_eq!(listed_groups(&connection).await, ["live"]);

    // Once its member leaves, the live group's offsets expire too.
    leave(&connection, "live", &live).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while committed(&connection, "live", "t", 0).await != -1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the left group's offsets did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed_groups(&connection).await.is_empty());
    drop(connection);
    broker.shutdown().await;

    let broker = Broker::start(config).await.expect("broker restarts");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    assert_eq!(committed(&connection, "gone", "t", 0).await, -1);
    assert_eq!(committed(&connection, "live", "t", 0).await, -1);
    assert!(listed_groups(&connection).await.is_empty());
    broker.shutdown().await;
}

/// A group whose last member leaves and that never committed is forgotten, so group ids that
/// come and go (a command line consumer's, a test's) do not pile up in the broker; one that
/// committed stays, listed with its offsets.
#[tokio::test]
async fn a_group_that_never_committed_is_forgotten_when_its_last_member_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    create_topic(&connection, "t", 1).await;
    let passing = heartbeat(&connection, join("passing", "t")).await;
    let staying = heartbeat(&connection, join("staying", "t")).await;
    assert_eq!(
        commit(&connection, "staying", &staying, "t", 0, 3).await,
        ErrorCode::None
    );
    assert_eq!(listed_groups(&connection).await, ["passing", "staying"]);
    leave(&connection, "passing", &passing).await;
    leave(&connection, "staying", &staying).await;
    assert_eq!(listed_groups(&connection).await, ["staying"]);
    assert_eq!(committed(&connection, "staying", "t", 0).await, 3);
    broker.shutdown().await;
}

/// A group forgotten (its last member expired, nothing committed) and created again never
/// hands out an id an earlier member may still hold: that member, back from a network cut past
/// its session, is told it is unknown instead of being taken for its successor and sharing its
/// partitions.
#[tokio::test]
async fn a_group_created_again_does_not_reuse_an_expired_members_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.group_min_session_timeout_ms = 100;
    let broker = Broker::start(config).await.expect("broker starts");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .expect("connect");
    create_topic(&connection, "t", 1).await;
    let short = |group: &str| ConsumerGroupHeartbeatRequest {
        session_timeout_ms: 100,
        ..join(group, "t")
    };
    let cut_off = heartbeat(&connection, short("g")).await;
    assert_eq!(cut_off.error_code, ErrorCode::None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while listed_groups(&connection).await.contains(&"g".to_owned()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the member never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let successor = heartbeat(&connection, short("g")).await;
    assert_eq!(successor.error_code, ErrorCode::None);
    assert_ne!(successor.member_id, cut_off.member_id);
    let back = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            member_id: cut_off.member_id.clone(),
            member_epoch: cut_off.member_epoch,
            session_timeout_ms: 100,
            topics: Some(vec!["t".into()]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(back.error_code, ErrorCode::UnknownMember);
    broker.shutdown().await;
}

#[tokio::test]
async fn bad_group_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, connection) = start(dir.path()).await;
    let no_topics = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            group_id: "g".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(no_topics.error_code, ErrorCode::InvalidRequest);
    let bad_timeout = heartbeat(
        &connection,
        ConsumerGroupHeartbeatRequest {
            session_timeout_ms: 5,
            ..join("g", "t")
        },
    )
    .await;
    assert_eq!(bad_timeout.error_code, ErrorCode::InvalidSessionTimeout);
    // A subscription no broker could serve: more topics than max_topics (10,000 by default),
    // or a name no topic can have. Nothing of it is kept.
    for topics in [
        (0..10_001).map(|index| format!("t{index}")).collect(),
        vec!["t".to_owned(), "n".repeat(250)],
        vec![String::new()],
    ] {
        let refused = heartbeat(
            &connection,
            ConsumerGroupHeartbeatRequest {
                topics: Some(topics),
                ..join("big", "t")
            },
        )
        .await;
        assert_eq!(refused.error_code, ErrorCode::InvalidRequest);
        assert!(refused.member_id.is_empty());
    }
    assert!(!listed_groups(&connection).await.contains(&"big".to_owned()));
    let Response::DescribeGroup(described) = connection
        .send(DescribeGroupRequest {
            group_id: "ghost".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(described.error_code, ErrorCode::UnknownGroup);
    broker.shutdown().await;
}

#[tokio::test]
async fn offsets_snapshot_bounds_the_log_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let small = || {
        let mut config = Config::on_loopback(dir.path());
        config.log.segment_bytes = 4096;
        config.log.max_message_bytes = 4096;
        config.limits.max_batch_bytes = 4096;
        config
    };
    let broker = Broker::start(small()).await.unwrap();
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    create_topic(&connection, "t", 4).await;
    let member = heartbeat(&connection, join("g", "t")).await;
    for round in 0..600u64 {
        assert_eq!(
            commit(&connection, "g", &member, "t", (round % 4) as u32, round).await,
            ErrorCode::None
        );
    }
    let offsets_dir = dir.path().join("topics/__consumer_offsets/0");
    let segments = std::fs::read_dir(&offsets_dir)
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|ext| ext == "log")
        })
        .count();
    assert!(
        segments <= 3,
        "{segments} offsets segments left: the snapshot should cover the rest"
    );
    assert!(dir.path().join("groups/offsets.snapshot").exists());
    drop(connection);
    broker.shutdown().await;

    let broker = Broker::start(small()).await.unwrap();
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    for partition in 0..4u32 {
        assert_eq!(
            committed(&connection, "g", "t", partition).await,
            596 + i64::from(partition)
        );
    }
    broker.shutdown().await;
}
