//! Coordinator tests over simulated time: the members are small client state machines that
//! own what they are told, release what they are told, and report it.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

const TOPIC: &str = "t";

fn counts(topic: &str) -> Option<u32> {
    (topic == TOPIC).then_some(12)
}

/// A simulated client.
#[derive(Debug, Default)]
struct Client {
    id: String,
    epoch: u32,
    holds: BTreeSet<TopicPartition>,
}

struct Simulation {
    group: Group,
    settings: GroupSettings,
    now_ms: u64,
    clients: BTreeMap<usize, Client>,
    next: usize,
}

impl Simulation {
    fn new() -> Simulation {
        Simulation {
            group: Group::new("g", "test"),
            settings: GroupSettings::default(),
            now_ms: 0,
            clients: BTreeMap::new(),
            next: 0,
        }
    }

    fn join(&mut self) -> usize {
        let answer = self
            .group
            .heartbeat(
                Heartbeat {
                    topics: Some(vec![TOPIC.into()]),
                    ..Heartbeat::default()
                },
                self.now_ms,
                &self.settings,
                &counts,
            )
            .unwrap();
        let key = self.next;
        self.next += 1;
        let mut client = Client {
            id: answer.member_id.clone(),
            epoch: answer.member_epoch,
            holds: BTreeSet::new(),
        };
        client.holds.extend(answer.assignment);
        self.clients.insert(key, client);
        self.check_exclusive();
        key
    }

    /// One heartbeat from `key`: report holdings, apply the answer.
    fn beat(&mut self, key: usize) {
        let client = &self.clients[&key];
        let answer = self
            .group
            .heartbeat(
                Heartbeat {
                    member_id: client.id.clone(),
                    member_epoch: client.epoch,
                    owned: Some(client.holds.clone()),
                    ..Heartbeat::default()
                },
                self.now_ms,
                &self.settings,
                &counts,
            )
            .unwrap();
        let client = self.clients.get_mut(&key).unwrap();
        client.epoch = answer.member_epoch;
        for partition in &answer.release {
            client.holds.remove(partition);
        }
        client.holds.extend(answer.assignment);
        self.check_exclusive();
    }

    /// Heartbeats from everyone until nothing changes.
    fn settle(&mut self) {
        for _ in 0..10 {
            let keys: Vec<usize> = self.clients.keys().copied().collect();
            for key in keys {
                self.beat(key);
            }
            if self.group.state() == "stable" {
                return;
            }
        }
        panic!("group did not settle: {:?}", self.group.state());
    }

    fn leave(&mut self, key: usize) {
        let client = self.clients.remove(&key).unwrap();
        self.group.leave(&client.id, &counts).unwrap();
    }

    /// No partition is held by two clients at any instant (clients' own view).
    fn check_exclusive(&self) {
        let mut seen = BTreeSet::new();
        for client in self.clients.values() {
            for partition in &client.holds {
                assert!(seen.insert(partition.clone()), "{partition:?} held twice");
            }
        }
    }

    fn sizes(&self) -> Vec<usize> {
        self.clients
            .values()
            .map(|client| client.holds.len())
            .collect()
    }

    fn holdings(&self) -> BTreeMap<usize, BTreeSet<TopicPartition>> {
        self.clients
            .iter()
            .map(|(key, client)| (*key, client.holds.clone()))
            .collect()
    }
}

fn moved(
    before: &BTreeMap<usize, BTreeSet<TopicPartition>>,
    after: &BTreeMap<usize, BTreeSet<TopicPartition>>,
) -> usize {
    after
        .iter()
        .map(|(key, set)| {
            set.iter()
                .filter(|partition| !before.get(key).is_some_and(|old| old.contains(*partition)))
                .count()
        })
        .sum()
}

#[test]
fn join_and_leave_one_five_two() {
    let mut simulation = Simulation::new();
    let first = simulation.join();
    simulation.settle();
    assert_eq!(simulation.sizes(), [12]);
    let mut keys = vec![first];
    for _ in 0..4 {
        keys.push(simulation.join());
        simulation.settle();
    }
    assert_eq!(simulation.sizes().iter().sum::<usize>(), 12);
    assert!(
        simulation.sizes().iter().all(|size| (2..=3).contains(size)),
        "{:?}",
        simulation.sizes()
    );
    for key in keys.drain(..3) {
        simulation.leave(key);
        simulation.settle();
    }
    assert_eq!(simulation.sizes(), [6, 6]);
    assert_eq!(simulation.group.state(), "stable");
}

#[test]
fn cooperative_sticky_moves_the_minimum_3_4_3() {
    let mut simulation = Simulation::new();
    for _ in 0..3 {
        simulation.join();
    }
    simulation.settle();
    assert_eq!(simulation.sizes(), [4, 4, 4]);
    let before = simulation.holdings();
    let fourth = simulation.join();
    simulation.settle();
    assert_eq!(simulation.sizes(), [3, 3, 3, 3]);
    assert_eq!(moved(&before, &simulation.holdings()), 3);
    let before = simulation.holdings();
    simulation.leave(fourth);
    simulation.settle();
    assert_eq!(simulation.sizes(), [4, 4, 4]);
    assert_eq!(moved(&before, &simulation.holdings()), 3);
}

#[test]
fn a_partition_waits_for_its_previous_owner_to_release_it() {
    let mut simulation = Simulation::new();
    let first = simulation.join();
    simulation.settle();
    let second = simulation.join();
    // The newcomer gets nothing until the first member has released its surplus.
    assert!(simulation.clients[&second].holds.is_empty());
    simulation.beat(second);
    assert!(simulation.clients[&second].holds.is_empty());
    simulation.beat(first); // told to release six
    assert_eq!(simulation.clients[&first].holds.len(), 6);
    simulation.beat(second); // still held by first in the coordinator's view until it reports
    simulation.beat(first); // reports the release
    simulation.beat(second);
    assert_eq!(simulation.clients[&second].holds.len(), 6);
}

#[test]
fn expired_members_lose_their_partitions_and_zombies_are_fenced() {
    let mut simulation = Simulation::new();
    let a = simulation.join();
    let b = simulation.join();
    simulation.settle();
    // b stops heartbeating; a keeps going past b's session timeout.
    for _ in 0..12 {
        simulation.now_ms += 1000;
        simulation.beat(a);
        let expired = simulation.group.expire(simulation.now_ms, &counts);
        if !expired.is_empty() {
            assert_eq!(expired, [simulation.clients[&b].id.clone()]);
            break;
        }
    }
    let zombie = simulation.clients.remove(&b).unwrap();
    simulation.settle();
    assert_eq!(simulation.sizes(), [12]);
    // The zombie's heartbeat and commit are refused; nothing it says changes the group.
    let error = simulation
        .group
        .heartbeat(
            Heartbeat {
                member_id: zombie.id.clone(),
                member_epoch: zombie.epoch,
                owned: Some(zombie.holds.clone()),
                ..Heartbeat::default()
            },
            simulation.now_ms,
            &simulation.settings,
            &counts,
        )
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownMember);
    let partition = zombie.holds.iter().next().unwrap().clone();
    assert_eq!(
        simulation
            .group
            .check_commit(&zombie.id, zombie.epoch, &partition),
        Err(ErrorCode::UnknownMember)
    );
    // The live member may commit what it holds, and only with a current epoch.
    let live = &simulation.clients[&a];
    assert_eq!(
        simulation
            .group
            .check_commit(&live.id, live.epoch, &partition),
        Ok(())
    );
    assert_eq!(
        simulation
            .group
            .check_commit(&live.id, live.epoch.wrapping_sub(5), &partition),
        Err(ErrorCode::FencedMemberEpoch)
    );
}

#[test]
fn stale_epochs_are_fenced_on_heartbeat() {
    let mut simulation = Simulation::new();
    let a = simulation.join();
    simulation.settle();
    simulation.join();
    simulation.settle();
    simulation.join();
    simulation.settle();
    let client = &simulation.clients[&a];
    let error = simulation
        .group
        .heartbeat(
            Heartbeat {
                member_id: client.id.clone(),
                member_epoch: 0,
                ..Heartbeat::default()
            },
            simulation.now_ms,
            &simulation.settings,
            &counts,
        )
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::FencedMemberEpoch);
}

#[test]
fn session_timeout_outside_bounds_is_refused() {
    let mut group = Group::new("g", "test");
    let error = group
        .heartbeat(
            Heartbeat {
                topics: Some(vec![TOPIC.into()]),
                session_timeout_ms: 10,
                ..Heartbeat::default()
            },
            0,
            &GroupSettings::default(),
            &counts,
        )
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidSessionTimeout);
    assert!(group.members.is_empty());
}

/// A member fenced for a stale epoch drops its partitions and joins again under a new id (as
/// the client does): its old entry goes at once, so its partitions move now instead of waiting
/// for a session timeout with nobody reading them.
#[test]
fn a_fenced_member_gives_its_partitions_up_at_once() {
    let mut simulation = Simulation::new();
    let keys: Vec<usize> = (0..3).map(|_| simulation.join()).collect();
    simulation.settle();
    assert_eq!(simulation.sizes(), [4, 4, 4]);
    let fenced = simulation.clients.remove(&keys[0]).unwrap();
    let refused = simulation
        .group
        .heartbeat(
            Heartbeat {
                member_id: fenced.id.clone(),
                member_epoch: fenced.epoch + 5,
                owned: Some(fenced.holds.clone()),
                ..Heartbeat::default()
            },
            simulation.now_ms,
            &simulation.settings,
            &counts,
        )
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::FencedMemberEpoch);
    assert!(!simulation.group.members.contains_key(&fenced.id));
    // Its replacement joins; the group settles without waiting for any session to expire.
    simulation.join();
    simulation.settle();
    assert_eq!(simulation.sizes().iter().sum::<usize>(), 12);
}
