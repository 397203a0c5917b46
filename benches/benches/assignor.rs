//! Group assignment: the broker's assignors over 10 members and 1,000 partitions.
//! `cargo bench -p sluice-benches --bench assignor`
//!
//! Each strategy from scratch (every member new), and cooperative sticky in the two cases it
//! exists for: a member joining a balanced group of 9 (it takes a share, nothing else moves)
//! and a member leaving a balanced group of 10 (its partitions are dealt out). Partitions are
//! spread over 1 topic and over 10 topics of 100, since `range` works per topic.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_broker::groups::assignor::{Assignment, Assignor};

const MEMBERS: usize = 10;
const PARTITIONS: u32 = 1_000;

type Members = BTreeMap<String, BTreeSet<String>>;

/// `count` members, each subscribed to every topic of `partitions`.
fn members(count: usize, partitions: &BTreeMap<String, u32>) -> Members {
    let topics: BTreeSet<String> = partitions.keys().cloned().collect();
    (0..count)
        .map(|index| (format!("member-{index:04}"), topics.clone()))
        .collect()
}

/// 1,000 partitions over `topics` topics.
fn topics(topics: u32) -> BTreeMap<String, u32> {
    (0..topics)
        .map(|index| (format!("topic-{index:02}"), PARTITIONS / topics))
        .collect()
}

fn assign(c: &mut Criterion) {
    let mut group = c.benchmark_group("assign_10_members_1000_partitions");
    for topic_count in [1u32, 10] {
        let partitions = topics(topic_count);
        let all = members(MEMBERS, &partitions);
        let empty = Assignment::new();
        for assignor in [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ] {
            group.bench_function(
                format!("{assignor}_from_scratch_{topic_count}_topics"),
                |b| b.iter(|| black_box(assignor.assign(black_box(&all), &partitions, &empty))),
            );
        }

        let sticky = Assignor::CooperativeSticky;
        let nine = members(MEMBERS - 1, &partitions);
        let balanced_nine = sticky.assign(&nine, &partitions, &empty);
        group.bench_function(
            format!("cooperative-sticky_member_joins_{topic_count}_topics"),
            |b| b.iter(|| black_box(sticky.assign(&all, &partitions, black_box(&balanced_nine)))),
        );
        let balanced_ten = sticky.assign(&all, &partitions, &empty);
        let mut one_left = all.clone();
        one_left.remove("member-0003");
        group.bench_function(
            format!("cooperative-sticky_member_leaves_{topic_count}_topics"),
            |b| {
                b.iter(|| {
                    black_box(sticky.assign(&one_left, &partitions, black_box(&balanced_ten)))
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = assign
}
criterion_main!(benches);
