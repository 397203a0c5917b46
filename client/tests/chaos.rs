//! Consumer-group chaos: 3 producers and 4 group members on 12 partitions while members are
//! killed (dropped without committing or leaving, as a crash would) and restarted at random.
//! Every acknowledged record must be processed at least once; the duplicate count is printed.
//!
//! Runs for 30 s by default; `SLUICE_CHAOS_SECS=600 cargo test -p sluice-client --test chaos
//! -- --nocapture` runs the long version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_broker::{Broker, Config};
use sluice_client::protocol::messages::*;
use sluice_client::protocol::{ErrorCode, RecordBatchBuilder, Response};
use sluice_client::{Client, CommitMode};

const PARTITIONS: u32 = 12;
const GROUP: &str = "chaos";
const TOPIC: &str = "chaos";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// Processed record values, shared by every member.
type Seen = Arc<Mutex<BTreeMap<String, u32>>>;

/// Errors the members' streams yielded, shared by every member.
type Errors = Arc<Mutex<Vec<sluice_client::Error>>>;

fn spawn_member(client: &Client, seen: &Seen, errors: &Errors) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    let seen = Arc::clone(seen);
    let errors = Arc::clone(errors);
    tokio::spawn(async move {
        let mut consumer = client
            .consumer()
            .group(GROUP)
            .topics([TOPIC])
            .session_timeout(Duration::from_millis(1500))
            .commit_mode(CommitMode::Auto(Duration::from_millis(200)))
            .fetch_max_wait(Duration::from_millis(100))
            .build()
            .await
            .expect("consumer");
        while let Some(record) = consumer.next().await {
            let record = match record {
                Ok(record) => record,
                Err(error) => {
                    errors.lock().unwrap().push(error);
                    continue;
                }
            };
            let value = String::from_utf8(record.value.to_vec()).unwrap();
            *seen.lock().unwrap().entry(value).or_insert(0) += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_killed_at_random_lose_no_acknowledged_record() {
    let seconds: u64 = std::env::var("SLUICE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("chaos: {seconds} s, seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.group_min_session_timeout_ms = 500;
    let broker = Broker::start(config).await.unwrap();
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    let Response::CreateTopics(created) = client
        .send(CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: TOPIC.into(),
                partitions: PARTITIONS,
                configs: vec![],
            }],
            validate_only: false,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(created.results[0].error_code, ErrorCode::None);

    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    // Only members are killed: the broker stays up, so every produce must be acknowledged.
    let failed_produces: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for producer in 0..3u32 {
        let client = client.clone();
        let acknowledged = Arc::clone(&acknowledged);
        let failed_produces = Arc::clone(&failed_produces);
        let stop = Arc::clone(&stop);
        producers.push(tokio::spawn(async move {
            let mut sequence = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let partition = (sequence as u32 + producer) % PARTITIONS;
                let values: Vec<String> = (0..10)
                    .map(|index| format!("p{producer}-{sequence}-{index}"))
                    .collect();
                let mut builder = RecordBatchBuilder::new();
                for value in &values {
                    builder.append(0, None, value.as_bytes(), &[]);
                }
                let sent = client
                    .send(ProduceRequest {
                        acks: Acks::Durable,
                        timeout_ms: 10_000,
                        topics: vec![ProduceTopic {
                            name: TOPIC.into(),
                            partitions: vec![ProducePartition {
                                partition,
                                records: builder.build().into_bytes(),
                            }],
                        }],
                    })
                    .await;
                match sent {
                    Ok(Response::Produce(response))
                        if response.topics[0].partitions[0].error_code == ErrorCode::None =>
                    {
                        acknowledged.lock().unwrap().extend(values);
                    }
                    other => failed_produces.lock().unwrap().push(format!("{other:?}")),
                }
                sequence += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    let seen: Seen = Arc::default();
    let errors: Errors = Arc::default();
    let mut rng = Rng(seed);
    let mut members: Vec<tokio::task::JoinHandle<()>> = (0..4)
        .map(|_| spawn_member(&client, &seen, &errors))
        .collect();
    let mut kills = 0;
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1300))).await;
        let victim = rng.below(members.len() as u64) as usize;
        members[victim].abort(); // a crash: no commit, no leave
        kills += 1;
        members[victim] = spawn_member(&client, &seen, &errors);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for producer in producers {
        producer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let failed_produces = failed_produces.lock().unwrap().clone();
    assert!(
        failed_produces.is_empty(),
        "{} produces failed with the broker up, the first: {}",
        failed_produces.len(),
        failed_produces[0]
    );
    // At least a few seconds of 3 producers sending 10 records every few ms, and chaos.
    assert!(
        acknowledged.len() >= 1_000,
        "only {} records acknowledged",
        acknowledged.len()
    );
    assert!(kills > 0, "no member was killed");
    // With the chaos over, the surviving members must catch up on everything acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            acknowledged
                .iter()
                .filter(|value| !seen.contains_key(*value))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged records never processed (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A killed member's partitions move: a survivor may be told its fetch or commit came
    // from an old generation, and retries. A damaged or undecodable batch is never expected.
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    let damaged: Vec<_> = errors
        .iter()
        .filter(|error| matches!(error, sluice_client::Error::Protocol(_)))
        .collect();
    assert!(
        damaged.is_empty(),
        "members read damaged batches: {damaged:?}"
    );
    let duplicates: u32 = seen.lock().unwrap().values().map(|count| count - 1).sum();
    println!(
        "chaos: {} acknowledged records, all processed; {kills} members killed; {duplicates} duplicate deliveries; {} stream errors",
        acknowledged.len(),
        errors.len()
    );
    for member in members {
        member.abort();
    }
    broker.shutdown().await;
}
