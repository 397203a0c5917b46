//! Assignment strategies: which member of a group should own which partition.
//!
//! Each takes the members (with their subscriptions), the partition count of every subscribed
//! topic, and the previous target, and returns the new target. They are pure functions: the
//! coordinator decides when to run them and how to hand partitions over safely.
//!
//! - `range`: per topic, the subscribed members in id order get contiguous ranges; the first
//!   `partitions % members` get one more. Moves many partitions when membership changes.
//! - `round-robin`: every (topic, partition) in order, dealt to the subscribed members in turn.
//! - `cooperative-sticky` (default): keep every partition where it is when that keeps the
//!   group balanced; take only the surplus from members over their share, and give orphaned
//!   and surplus partitions to the members with the fewest. Only moved partitions are revoked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// A topic and a partition.
pub type TopicPartition = (String, u32);

/// member id → partitions.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// The strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Assignor {
    Range,
    RoundRobin,
    #[default]
    CooperativeSticky,
}

impl FromStr for Assignor {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "range" => Ok(Assignor::Range),
            "round-robin" => Ok(Assignor::RoundRobin),
            "cooperative-sticky" => Ok(Assignor::CooperativeSticky),
            other => Err(format!(
                "unknown assignor {other:?} (known: range, round-robin, cooperative-sticky)"
            )),
        }
    }
}

impl fmt::Display for Assignor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "round-robin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        })
    }
}

impl Assignor {
    /// The target assignment. `members` maps member id → subscribed topics; `partitions`
    /// maps topic → partition count (topics absent from it are not assigned).
    pub fn assign(
        self,
        members: &BTreeMap<String, BTreeSet<String>>,
        partitions: &BTreeMap<String, u32>,
        previous: &Assignment,
    ) -> Assignment {
        let mut target: Assignment = members
            .keys()
            .map(|id| (id.clone(), BTreeSet::new()))
            .collect();
        match self {
            Assignor::Range => range(members, partitions, &mut target),
            Assignor::RoundRobin => round_robin(members, partitions, &mut target),
            Assignor::CooperativeSticky => sticky(members, partitions, previous, &mut target),
        }
        target
    }
}

/// Subscribed members of each topic, in id order.
fn subscribers<'a>(
    members: &'a BTreeMap<String, BTreeSet<String>>,
    topic: &str,
) -> Vec<&'a String> {
    members
        .iter()
        .filter(|(_, topics)| topics.contains(topic))
        .map(|(id, _)| id)
        .collect()
}

fn range(
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    target: &mut Assignment,
) {
    for (topic, count) in partitions {
        let owners = subscribers(members, topic);
        if owners.is_empty() {
            continue;
        }
        let per = *count as usize / owners.len();
        let extra = *count as usize % owners.len();
        let mut next = 0u32;
        for (index, owner) in owners.iter().enumerate() {
            let take = per + usize::from(index < extra);
            let set = target.get_mut(*owner).expect("member in target");
            for _ in 0..take {
                set.insert((topic.clone(), next));
                next += 1;
            }
        }
    }
}

fn round_robin(
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    target: &mut Assignment,
) {
    let ids: Vec<&String> = members.keys().collect();
    if ids.is_empty() {
        return;
    }
    let mut turn = 0usize;
    for (topic, count) in partitions {
        for partition in 0..*count {
            // The next member in turn that subscribes to this topic.
            for step in 0..ids.len() {
                let id = ids[(turn + step) % ids.len()];
                if members[id].contains(topic) {
                    target
                        .get_mut(id)
                        .expect("member in target")
                        .insert((topic.clone(), partition));
                    turn = (turn + step + 1) % ids.len();
                    break;
                }
            }
        }
    }
}

fn sticky(
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
    target: &mut Assignment,
) {
    let exists = |(topic, partition): &TopicPartition| {
        partitions.get(topic).is_some_and(|count| partition < count)
    };
    // Keep what each remaining member had, where it still exists and is still subscribed.
    let mut unassigned: BTreeSet<TopicPartition> = partitions
        .iter()
        .flat_map(|(topic, count)| (0..*count).map(move |partition| (topic.clone(), partition)))
        .filter(|(topic, _)| members.values().any(|topics| topics.contains(topic)))
        .collect();
    for (id, owned) in previous {
        let (Some(topics), Some(set)) = (members.get(id), target.get_mut(id)) else {
            continue;
        };
        for partition in owned {
            if exists(partition) && topics.contains(&partition.0) && unassigned.remove(partition) {
                set.insert(partition.clone());
            }
        }
    }
    // Each member's fair share among the members that can take a partition.
    let total = target.values().map(BTreeSet::len).sum::<usize>() + unassigned.len();
    let eligible = members
        .values()
        .filter(|topics| !topics.is_empty())
        .count()
        .max(1);
    let ceiling = total.div_ceil(eligible);
    let floor = total / eligible;
    let mut at_ceiling_allowed = total - floor * eligible;
    // Members over their share give up their highest partitions.
    let mut by_size: Vec<String> = target.keys().cloned().collect();
    by_size.sort_by_key(|id| std::cmp::Reverse(target[id].len()));
    for id in &by_size {
        let set = target.get_mut(id).expect("member in target");
        let allowed = if set.len() >= ceiling && at_ceiling_allowed > 0 && ceiling > floor {
            at_ceiling_allowed -= 1;
            ceiling
        } else {
            floor
        };
        while set.len() > allowed {
            let surplus = set.iter().next_back().cloned().expect("non-empty");
            set.remove(&surplus);
            unassigned.insert(surplus);
        }
    }
    // Orphaned and surplus partitions go to the eligible member with the fewest.
    for partition in unassigned {
        let taker = target
            .iter()
            .filter(|(id, _)| members[*id].contains(&partition.0))
            .min_by_key(|(id, set)| (set.len(), (*id).clone()))
            .map(|(id, _)| id.clone());
        if let Some(id) = taker {
            target
                .get_mut(&id)
                .expect("member in target")
                .insert(partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str], topics: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        ids.iter()
            .map(|id| {
                (
                    id.to_string(),
                    topics.iter().map(|topic| topic.to_string()).collect(),
                )
            })
            .collect()
    }

    fn counts(topics: &[(&str, u32)]) -> BTreeMap<String, u32> {
        topics
            .iter()
            .map(|(topic, count)| (topic.to_string(), *count))
            .collect()
    }

    fn check_complete(target: &Assignment, partitions: &BTreeMap<String, u32>) {
        let mut seen = BTreeSet::new();
        for set in target.values() {
            for partition in set {
                assert!(
                    seen.insert(partition.clone()),
                    "{partition:?} assigned twice"
                );
            }
        }
        let all: usize = partitions.values().map(|count| *count as usize).sum();
        assert_eq!(seen.len(), all, "every partition assigned once");
    }

    fn sizes(target: &Assignment) -> Vec<usize> {
        target.values().map(BTreeSet::len).collect()
    }

    fn moved(before: &Assignment, after: &Assignment) -> usize {
        after
            .iter()
            .map(|(id, set)| {
                set.iter()
                    .filter(|partition| !before.get(id).is_some_and(|old| old.contains(*partition)))
                    .count()
            })
            .sum()
    }

    #[test]
    fn range_gives_contiguous_ranges() {
        let partitions = counts(&[("t", 7)]);
        let target = Assignor::Range.assign(
            &members(&["a", "b", "c"], &["t"]),
            &partitions,
            &Assignment::new(),
        );
        check_complete(&target, &partitions);
        assert_eq!(sizes(&target), [3, 2, 2]);
        assert!(target["a"].contains(&("t".into(), 0)) && target["a"].contains(&("t".into(), 2)));
    }

    #[test]
    fn round_robin_deals_in_turn() {
        let partitions = counts(&[("t", 5), ("u", 2)]);
        let target = Assignor::RoundRobin.assign(
            &members(&["a", "b"], &["t", "u"]),
            &partitions,
            &Assignment::new(),
        );
        check_complete(&target, &partitions);
        assert_eq!(sizes(&target), [4, 3]);
    }

    #[test]
    fn sticky_moves_the_minimum_for_12_partitions_3_4_3() {
        let partitions = counts(&[("t", 12)]);
        let three = Assignor::CooperativeSticky.assign(
            &members(&["a", "b", "c"], &["t"]),
            &partitions,
            &Assignment::new(),
        );
        check_complete(&three, &partitions);
        assert_eq!(sizes(&three), [4, 4, 4]);
        let four = Assignor::CooperativeSticky.assign(
            &members(&["a", "b", "c", "d"], &["t"]),
            &partitions,
            &three,
        );
        check_complete(&four, &partitions);
        assert_eq!(sizes(&four), [3, 3, 3, 3]);
        assert_eq!(moved(&three, &four), 3, "only d's three partitions move");
        let back = Assignor::CooperativeSticky.assign(
            &members(&["a", "b", "c"], &["t"]),
            &partitions,
            &four,
        );
        check_complete(&back, &partitions);
        assert_eq!(sizes(&back), [4, 4, 4]);
        assert_eq!(
            moved(&four, &back),
            3,
            "only d's three partitions move back"
        );
    }

    #[test]
    fn sticky_with_uneven_counts_and_different_subscriptions() {
        let partitions = counts(&[("t", 5), ("u", 3)]);
        let mut group = members(&["a", "b"], &["t", "u"]);
        group.insert("c".into(), ["u".to_string()].into());
        let target = Assignor::CooperativeSticky.assign(&group, &partitions, &Assignment::new());
        check_complete(&target, &partitions);
        assert!(target["c"].iter().all(|(topic, _)| topic == "u"));
    }

    #[test]
    fn names_parse() {
        for assignor in [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ] {
            assert_eq!(assignor.to_string().parse::<Assignor>().unwrap(), assignor);
        }
        assert!("eager".parse::<Assignor>().is_err());
    }
}
