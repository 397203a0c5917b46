//! Consumer group: three members share a topic's partitions; one dies, the others take over.
//!
//! ```sh
//! cargo run -p sluice-examples --example consumer_group
//! ```
//!
//! The pattern: members of one group each get a share of the partitions, assigned by the
//! broker. A member that stops heartbeating (here its task is aborted: no goodbye, no last
//! commit, as in a crash) is expired after its session timeout, and its partitions are given to
//! the members still alive. They resume from its last committed offsets, so every record is
//! processed at least once: a record the dead member processed but had not committed yet is
//! processed again by its successor (an idempotent consumer would skip it; see the
//! `idempotent_consumer` example).
//!
//! What to watch: the three `member-N owns` lines (two partitions each), `killed member-3`,
//! then after about the session timeout (6 s) the survivors' lines showing they own three
//! partitions each, and finally `every record processed: 120 of 120`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sluice_client::producer::Record;
use sluice_client::{Client, CommitMode};
use sluice_examples::{deadline_in, text, unique_suffix};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const PARTITIONS: u32 = 6;
/// The shortest session timeout a default broker accepts: how long a dead member keeps its
/// partitions.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Who owns what, as each member last saw it; a watch channel, so waiting for the group to
/// settle wakes on each change.
type Assignments = Arc<watch::Sender<BTreeMap<String, BTreeSet<u32>>>>;

/// Starts a member: it processes every record it gets (reporting it on `processed`) and
/// commits after each, as an at-least-once worker does. It leaves the group cleanly when `stop`
/// changes.
async fn start_member(
    client: &Client,
    name: &str,
    group: &str,
    topic: &str,
    assignments: &Assignments,
    processed: mpsc::UnboundedSender<(String, String)>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut consumer = client
        .consumer()
        .group(group)
        .topics([topic])
        .commit_mode(CommitMode::Manual)
        .session_timeout(SESSION_TIMEOUT)
        .build()
        .await?;
    let name = name.to_owned();
    let assignments = Arc::clone(assignments);
    Ok(tokio::spawn(async move {
        loop {
            let owned: BTreeSet<u32> = consumer
                .assignment()
                .into_iter()
                .map(|(_, partition)| partition)
                .collect();
            assignments.send_if_modified(|owners| {
                owners.insert(name.clone(), owned.clone()) != Some(owned)
            });
            // The consumer has no assignment-change event: wake up now and then even without
            // records, to report the assignment.
            let next = tokio::select! {
                _ = stop.changed() => {
                    if let Err(error) = consumer.close().await {
                        eprintln!("{name}: close failed: {error}");
                    }
                    return;
                }
                next = tokio::time::timeout(Duration::from_millis(200), consumer.next()) => next,
            };
            match next {
                Err(_idle) => continue,
                Ok(None) => return,
                Ok(Some(Err(error))) => eprintln!("{name}: {error}"),
                Ok(Some(Ok(record))) => {
                    if processed.send((name.clone(), text(&record))).is_err() {
                        return;
                    }
                    if let Err(error) = consumer.commit().await {
                        eprintln!(
                            "{name}: commit failed ({error}); the next owner will see the record again"
                        );
                    }
                }
            }
        }
    }))
}

fn owned_by(assignments: &Assignments, name: &str) -> BTreeSet<u32> {
    assignments.borrow().get(name).cloned().unwrap_or_default()
}

/// Waits until `members` own all partitions between them, each its fair share.
async fn wait_for_balance(
    assignments: &Assignments,
    members: &[&str],
    per_member: usize,
) -> anyhow::Result<()> {
    let balanced = |owners: &BTreeMap<String, BTreeSet<u32>>| {
        let owned: Vec<BTreeSet<u32>> = members
            .iter()
            .map(|name| owners.get(*name).cloned().unwrap_or_default())
            .collect();
        let all: BTreeSet<u32> = owned.iter().flatten().copied().collect();
        owned.iter().all(|set| set.len() == per_member) && all.len() == PARTITIONS as usize
    };
    let mut changes = assignments.subscribe();
    // `wait_for` returns a read guard on the map: let it go at once. Held while `borrow`
    // takes a second read lock, a member's update waiting between the two blocks both forever.
    let settled = tokio::time::timeout(Duration::from_secs(60), changes.wait_for(balanced))
        .await
        .is_ok_and(|changed| changed.is_ok());
    anyhow::ensure!(
        settled,
        "the group did not settle: {:?}",
        *assignments.borrow()
    );
    for name in members {
        println!("{name} owns partitions {:?}", owned_by(assignments, name));
    }
    Ok(())
}

async fn produce(
    client: &Client,
    topic: &str,
    round: &str,
    per_partition: u32,
) -> anyhow::Result<BTreeSet<String>> {
    let producer = client.producer().build().await?;
    let mut values = BTreeSet::new();
    for partition in 0..PARTITIONS {
        for index in 0..per_partition {
            let value = format!("{round}-p{partition}-{index}");
            producer
                .enqueue(Record::new(topic, value.clone()).partition(partition))
                .await?;
            values.insert(value);
        }
    }
    producer.close().await?;
    Ok(values)
}

/// Takes processed records until every one of `expected` was seen.
async fn wait_for_all(
    processed: &mut mpsc::UnboundedReceiver<(String, String)>,
    expected: &BTreeSet<String>,
    seen: &mut BTreeMap<String, Vec<String>>,
) -> anyhow::Result<()> {
    let deadline = deadline_in(60);
    while !expected.iter().all(|value| seen.contains_key(value)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (member, value) = tokio::time::timeout(left, processed.recv())
            .await
            .map_err(|_| anyhow::anyhow!("records were not all processed in time"))?
            .ok_or_else(|| anyhow::anyhow!("every member stopped"))?;
        seen.entry(value).or_default().push(member);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topic = format!("group-demo-{suffix}");
    let group = format!("group-demo-workers-{suffix}");
    client.admin().create_topic(&topic, PARTITIONS, &[]).await?;
    println!("created topic {topic} with {PARTITIONS} partitions");

    let assignments: Assignments = Arc::new(watch::Sender::new(BTreeMap::new()));
    let (processed_sender, mut processed) = mpsc::unbounded_channel();
    let (stop, stop_receiver) = watch::channel(false);
    let mut members = BTreeMap::new();
    for name in ["member-1", "member-2", "member-3"] {
        let task = start_member(
            &client,
            name,
            &group,
            &topic,
            &assignments,
            processed_sender.clone(),
            stop_receiver.clone(),
        )
        .await?;
        members.insert(name, task);
    }
    drop(processed_sender);
    wait_for_balance(&assignments, &["member-1", "member-2", "member-3"], 2).await?;

    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut expected = produce(&client, &topic, "first", 10).await?;
    wait_for_all(&mut processed, &expected, &mut seen).await?;
    println!(
        "first round: {} records processed by three members",
        expected.len()
    );

    // A crash: the task is aborted, its consumer dropped without leaving the group or
    // committing. The broker notices only when the session times out.
    let victim = "member-3";
    let orphaned = owned_by(&assignments, victim);
    members.remove(victim).expect("member-3 runs").abort();
    assignments.send_modify(|owners| {
        owners.remove(victim);
    });
    println!("killed {victim}, which owned partitions {orphaned:?}");

    // Records keep arriving on every partition, the dead member's included.
    expected.extend(produce(&client, &topic, "second", 10).await?);
    wait_for_balance(&assignments, &["member-1", "member-2"], 3).await?;
    wait_for_all(&mut processed, &expected, &mut seen).await?;
    let takers: BTreeSet<&str> = ["member-1", "member-2"]
        .into_iter()
        .filter(|name| !owned_by(&assignments, name).is_disjoint(&orphaned))
        .collect();
    println!("partitions {orphaned:?} of {victim} taken over by {takers:?}");
    let by_victim_after = seen
        .iter()
        .filter(|(value, members)| {
            value.starts_with("second") && members.iter().any(|member| member == victim)
        })
        .count();
    anyhow::ensure!(
        by_victim_after == 0,
        "the dead member processed {by_victim_after} records"
    );
    let again = seen.values().filter(|members| members.len() > 1).count();
    println!(
        "every record processed: {} of {} ({again} processed twice: at-least-once)",
        expected
            .iter()
            .filter(|value| seen.contains_key(*value))
            .count(),
        expected.len()
    );
    // The survivors leave the group cleanly: commit, then LeaveGroup.
    stop.send(true)?;
    for (_, task) in members {
        task.await?;
    }
    println!("consumer_group done");
    Ok(())
}
