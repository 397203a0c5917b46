//! Crash loop: the broker binary is SIGKILLed at random moments while 4 idempotent producers
//! send with `acks=durable` and 2 standalone consumers read; it restarts on the same data
//! directory and port, again and again. The producers and consumers live through every death
//! (the idempotent producer resends unacknowledged batches with their sequence numbers, and the
//! broker answers the ones it already has with their original offsets). At the end a fresh
//! consumer reads every partition from offset 0 and the history checker compares everything
//! read with everything acknowledged: nothing lost, nothing inconsistent, nothing duplicated,
//! no consumer saw an error (a batch failing its CRC, say), no partition refused writes.
//!
//! Short: 20 cycles of about a second. Long (200 cycles), with the rest of the suite:
//!
//! ```text
//! SLUICE_RELIABILITY_LONG=1 cargo test -p sluice-broker --release --test crash_loop \
//!     --test power_loss --test storage_faults --test group_churn -- --nocapture --test-threads=1
//! ```
//!
//! `SLUICE_CRASH_CYCLES=<n>` sets the number of cycles directly.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_client::producer::Acks;
use sluice_testkit::history::History;
use sluice_testkit::process::BrokerProcess;
use sluice_testkit::workload::{self, Acked, Log, ProducerSettings, ReadRecord};
use sluice_testkit::{Rng, scale_or, seed};

const BROKER: &str = env!("CARGO_BIN_EXE_sluice-broker");
const TOPIC: &str = "crash-loop";
const PARTITIONS: u32 = 6;
const PRODUCERS: usize = 4;
const CONSUMERS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_broker_loses_no_acknowledged_record() -> anyhow::Result<()> {
    let cycles: u64 = scale_or("SLUICE_CRASH_CYCLES", 20, 200);
    let seed = seed();
    let mut rng = Rng::new(seed);
    println!("crash loop: {cycles} cycles, seed {seed}");
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    // Checkpoints often, so restarts begin from recovery points all over the log.
    let mut broker = BrokerProcess::start(
        Path::new(BROKER),
        dir.path(),
        &[("SLUICE_STORAGE_RECOVERY_CHECKPOINT_MS", "300")],
    )?;
    let url = broker.url();
    let admin = workload::connect(&url).await?;
    // Small segments: the kills land before, during and just after segment rolls.
    admin
        .admin()
        .create_topic(
            TOPIC,
            PARTITIONS,
            &[("segment_bytes", "32768"), ("max_message_bytes", "32768")],
        )
        .await?;

    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let acknowledged: Vec<Arc<Log<Acked>>> = (0..PRODUCERS).map(|_| Arc::default()).collect();
    let reads: Vec<Arc<Log<ReadRecord>>> = (0..CONSUMERS).map(|_| Arc::default()).collect();
    let mut producers = Vec::new();
    for (index, log) in acknowledged.iter().enumerate() {
        let settings = ProducerSettings {
            topic: TOPIC.into(),
            name: format!("p{index}"),
            acks: Acks::Durable,
            window: 32,
            pause: Duration::from_millis(2),
            padding_bytes: 40,
        };
        let client = workload::connect(&url).await?;
        producers.push(tokio::spawn(workload::produce(
            client,
            settings,
            Arc::clone(&stop_producers),
            Arc::clone(log),
        )));
    }
    let mut consumers = Vec::new();
    for log in &reads {
        let client = workload::connect(&url).await?;
        consumers.push(tokio::spawn(workload::consume(
            client,
            TOPIC.into(),
            PARTITIONS,
            Arc::clone(&stop_consumers),
            Arc::clone(log),
        )));
    }

    for cycle in 0..cycles {
        tokio::time::sleep(rng.millis(300, 1200)).await;
        broker.kill();
        if rng.chance(1, 3) {
            // Sometimes the clients find nobody home for a while.
            tokio::time::sleep(rng.millis(0, 300)).await;
        }
        if let Err(error) = broker.restart() {
            panic!("restart {cycle} failed (seed {seed}): {error:#}");
        }
    }

    // Let everything outstanding be acknowledged, then read the whole topic once more.
    stop_producers.store(true, Ordering::Release);
    for producer in producers {
        producer.await??;
    }
    let (final_reads, ends) =
        workload::read_everything(&admin, TOPIC, PARTITIONS, Duration::from_secs(60)).await?;
    // The live consumers get the time to catch up to the same ends.
    let catch_up = Instant::now() + Duration::from_secs(30);
    while Instant::now() < catch_up {
        let caught_up = reads.iter().all(|log| {
            let entries = log.entries();
            ends.iter().all(|(partition, end)| {
                *end == 0
                    || entries
                        .iter()
                        .any(|read| read.partition == *partition && read.offset + 1 == *end)
            })
        });
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_consumers.store(true, Ordering::Release);
    for consumer in consumers {
        consumer.await??;
    }

    let mut history = History::default();
    let mut producer_errors = Vec::new();
    for log in &acknowledged {
        workload::add_acknowledged(&mut history, TOPIC, &log.entries());
        producer_errors.extend(log.errors());
    }
    let mut consumer_errors = Vec::new();
    for (index, log) in reads.iter().enumerate() {
        workload::add_reads(
            &mut history,
            &format!("consumer-{index}"),
            TOPIC,
            &log.entries(),
        );
        consumer_errors.extend(log.errors());
    }
    workload::add_reads(&mut history, "final", TOPIC, &final_reads);
    for (partition, end) in &ends {
        history.log_end(TOPIC, *partition, *end);
    }
    let report = history.check();
    println!(
        "crash loop: cycles={cycles} acknowledged={} lost={} duplicated={} inconsistent={} nonmonotonic={} skipped={} unread={} consumer_errors={} producer_errors={} refusals={} records_in_log={} seconds={} seed={seed}",
        report.acknowledged,
        report.lost.len(),
        report.duplicated.len(),
        report.inconsistent.len(),
        report.nonmonotonic.len(),
        report.skipped.len(),
        report.unread.len(),
        consumer_errors.len(),
        producer_errors.len(),
        broker.log().refusals(),
        final_reads.len(),
        started.elapsed().as_secs(),
    );
    assert!(
        report.is_valid() && report.unread.is_empty(),
        "seed {seed}: {report}"
    );
    assert!(report.acknowledged > 0, "nothing was acknowledged");
    assert!(
        consumer_errors.is_empty(),
        "seed {seed}: consumers saw errors: {consumer_errors:?}"
    );
    assert!(
        producer_errors.is_empty(),
        "seed {seed}: records failed: {:?}",
        &producer_errors[..producer_errors.len().min(10)]
    );
    assert_eq!(
        broker.log().refusals(),
        0,
        "seed {seed}: a partition refused writes:\n{}",
        broker.log().tail()
    );
    // Idempotence: every record in the log was acknowledged exactly once, so the log holds
    // exactly the acknowledged records and nothing else.
    assert_eq!(
        final_reads.len(),
        report.acknowledged,
        "seed {seed}: the log holds records nobody acknowledged"
    );
    Ok(())
}
