//! Consumer-group churn: 8 members over 16 partitions, each a child process (this test binary
//! started again as a member, see `sluice_testkit::member`), while 2 idempotent producers send
//! with `acks=durable` to the broker binary, itself a child process:
//!
//! - every few seconds one member is SIGKILLed (no commit, no leave) and started again;
//! - one member is frozen past its session timeout (its whole runtime stops, as in a long GC
//!   pause) and then commits at once: the broker must refuse that commit, and the member logs
//!   the refusal it got back from `Consumer::commit`;
//! - the broker is SIGKILLed and restarted while the group rebalances (right after a member
//!   joined, once DescribeGroup says "reconciling").
//!
//! Every acknowledged record must be processed at least once; the history checker runs over
//! what was acknowledged and what the members' logs say they processed, and the duplicate rate
//! (records processed more than once, as at-least-once allows) is reported.
//!
//! Short: 30 s of churn. Long (300 s, a freeze every 60 s and a broker restart every 90 s), with
//! the rest of the suite:
//!
//! ```text
//! SLUICE_RELIABILITY_LONG=1 cargo test -p sluice-broker --release --test crash_loop \
//!     --test power_loss --test storage_faults --test group_churn -- --nocapture --test-threads=1
//! ```
//!
//! `SLUICE_CHURN_SECS=<n>` sets the churn's length directly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_client::producer::Acks;
use sluice_testkit::history::History;
use sluice_testkit::member::{ARGUMENTS_VARIABLE, encode_arguments, run_if_asked};
use sluice_testkit::process::BrokerProcess;
use sluice_testkit::workload::{self, Acked, Log, ProducerSettings};
use sluice_testkit::{Rng, scale, scale_or, seed};

const BROKER: &str = env!("CARGO_BIN_EXE_sluice-broker");
const TOPIC: &str = "churn";
const GROUP: &str = "churn";
const PARTITIONS: u32 = 16;
const MEMBERS: usize = 8;
const PRODUCERS: usize = 2;
const SESSION_TIMEOUT_MS: u64 = 3000;
/// How long a frozen member stays frozen: well past its session timeout and the broker's
/// expiry check (every 250 ms).
const FREEZE_MS: u64 = SESSION_TIMEOUT_MS + 2000;
/// How long a broker restart waits for DescribeGroup to say "reconciling" after a member was
/// replaced, before the test fails: generous, for a new member process starting slowly on a
/// busy machine (the rebalance itself lasts about a session timeout).
const RECONCILING_DEADLINE: Duration = Duration::from_secs(30);
/// The name of the test function a member process runs.
const MEMBER_TEST: &str = "group_member_process";

/// Not a test on its own: when `spawn_member` starts this binary as a group member, this runs
/// the member (and never returns); otherwise it returns at once.
#[test]
fn group_member_process() {
    run_if_asked();
}

/// One member process.
struct Member {
    child: Child,
    stdin: ChildStdin,
    log: PathBuf,
    /// Asked to freeze: not to be killed before it has logged its commit after the freeze.
    frozen: bool,
}

impl Member {
    fn spawn(url: &str, logs: &Path, index: usize, incarnation: u64) -> anyhow::Result<Member> {
        let log = logs.join(format!("member-{index}-{incarnation}.log"));
        let arguments: Vec<String> = [
            "--broker",
            url,
            "--group",
            GROUP,
            "--topic",
            TOPIC,
            "--log",
            &log.to_string_lossy(),
            "--session-timeout-ms",
            &SESSION_TIMEOUT_MS.to_string(),
            "--commit-every-ms",
            "200",
        ]
        .iter()
        .map(|word| (*word).to_owned())
        .collect();
        let mut child = Command::new(std::env::current_exe()?)
            .args([MEMBER_TEST, "--exact", "--nocapture", "--test-threads", "1"])
            .env(ARGUMENTS_VARIABLE, encode_arguments(&arguments))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        Ok(Member {
            child,
            stdin,
            log,
            frozen: false,
        })
    }

    /// Whether it may be killed now: not while a freeze is under way.
    fn killable(&self) -> bool {
        !self.frozen
            || std::fs::read_to_string(&self.log).is_ok_and(|text| text.contains("stall-commit"))
    }

    /// SIGKILL: no commit, no leave.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the member logs say.
#[derive(Debug, Default)]
struct Processed {
    /// (partition, offset, value) of every record processed, in no meaningful order.
    records: Vec<(u32, u64, String)>,
    stream_errors: Vec<String>,
    commit_errors: usize,
    stall_commits: Vec<String>,
}

fn read_member_logs(logs: &Path) -> anyhow::Result<Processed> {
    let mut processed = Processed::default();
    for entry in std::fs::read_dir(logs)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            let mut words = line.splitn(4, ' ');
            match words.next() {
                Some("record") => {
                    let (Some(partition), Some(offset), Some(value)) =
                        (words.next(), words.next(), words.next())
                    else {
                        continue; // the last line of a killed member, cut short
                    };
                    if let (Ok(partition), Ok(offset)) = (partition.parse(), offset.parse()) {
                        processed
                            .records
                            .push((partition, offset, value.to_owned()));
                    }
                }
                Some("stream-error") => processed.stream_errors.push(line.to_owned()),
                Some("commit-error") => processed.commit_errors += 1,
                Some("stall-commit") => processed.stall_commits.push(line.to_owned()),
                _ => {}
            }
        }
    }
    Ok(processed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_killed_frozen_and_a_broker_restart_lose_no_acknowledged_record()
-> anyhow::Result<()> {
    let seconds: u64 = scale_or("SLUICE_CHURN_SECS", 30, 300);
    let seed = seed();
    let mut rng = Rng::new(seed);
    println!("group churn: {seconds} s, seed {seed}");
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let logs = dir.path().join("members");
    std::fs::create_dir_all(&logs)?;
    let mut broker = BrokerProcess::start(
        Path::new(BROKER),
        &data,
        &[("SLUICE_LIMITS_GROUP_MIN_SESSION_TIMEOUT_MS", "1000")],
    )?;
    let url = broker.url();
    let admin = workload::connect(&url).await?;
    admin.admin().create_topic(TOPIC, PARTITIONS, &[]).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Vec<Arc<Log<Acked>>> = (0..PRODUCERS).map(|_| Arc::default()).collect();
    let mut producers = Vec::new();
    for (index, log) in acknowledged.iter().enumerate() {
        let client = workload::connect(&url).await?;
        producers.push(tokio::spawn(workload::produce(
            client,
            ProducerSettings {
                topic: TOPIC.into(),
                name: format!("p{index}"),
                acks: Acks::Durable,
                window: 16,
                pause: Duration::from_millis(5),
                padding_bytes: 0,
            },
            Arc::clone(&stop),
            Arc::clone(log),
        )));
    }

    let mut incarnation = 0u64;
    let mut members = Vec::new();
    for index in 0..MEMBERS {
        members.push(Member::spawn(&url, &logs, index, incarnation)?);
        incarnation += 1;
    }
    // Every broker restart happens while DescribeGroup says "reconciling": the test fails
    // rather than restart the broker outside a rebalance.
    let (mut kills, mut freezes, mut broker_restarts) = (0u64, 0u64, 0u64);
    let mut frozen_logs = Vec::new();
    let freeze_every = Duration::from_secs(scale(seconds / 3, 60).max(1));
    let restart_every = Duration::from_secs(scale(seconds * 2 / 3, 90).max(1));
    let mut next_freeze = Instant::now() + freeze_every;
    let mut next_restart = Instant::now() + restart_every;
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tokio::time::sleep(rng.millis(2000, 4000)).await;
        let now = Instant::now();
        // No freeze so late that the member may see no record after it (it freezes on its
        // next record when it holds none uncommitted).
        let freeze_fits = now + Duration::from_millis(2 * FREEZE_MS) < until;
        if now >= next_freeze && freeze_fits {
            next_freeze = now + freeze_every;
            let index = rng.below(MEMBERS as u64) as usize;
            let member = &mut members[index];
            writeln!(member.stdin, "stall {FREEZE_MS}")?;
            member.stdin.flush()?;
            member.frozen = true;
            frozen_logs.push(member.log.clone());
            freezes += 1;
            continue;
        }
        // A member dies and comes back.
        let candidates: Vec<usize> = (0..MEMBERS)
            .filter(|index| members[*index].killable())
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let index = candidates[rng.below(candidates.len() as u64) as usize];
        members[index].kill();
        members[index] = Member::spawn(&url, &logs, index, incarnation)?;
        incarnation += 1;
        kills += 1;
        if now >= next_restart {
            next_restart = now + restart_every;
            // The new member's join starts a rebalance: kill the broker in the middle of it.
            // The killed member stays in the group until its session times out, so the group
            // reconciles for seconds once the new member has joined (or the old one expired);
            // the deadline only covers a slow start of the new member's process.
            let deadline = Instant::now() + RECONCILING_DEADLINE;
            loop {
                let last_seen = match admin.admin().describe_group(GROUP).await {
                    Ok(group) if group.state == "reconciling" => break,
                    Ok(group) => format!("state {:?}", group.state),
                    Err(error) => format!("error {error}"),
                };
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "seed {seed}: the group was not seen reconciling within {RECONCILING_DEADLINE:?} \
                     of member {index} being replaced (last: {last_seen}), so the broker restart \
                     would not be mid-rebalance"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            broker.kill();
            broker.restart()?;
            broker_restarts += 1;
        }
    }

    // Producers deliver what they hold; then every acknowledged record must show up in the
    // members' logs.
    stop.store(true, Ordering::Release);
    for producer in producers {
        producer.await??;
    }
    let mut history = History::default();
    let mut producer_errors = Vec::new();
    let mut acknowledged_values = std::collections::HashSet::new();
    for log in &acknowledged {
        let entries = log.entries();
        acknowledged_values.extend(entries.iter().map(|acked| acked.value.clone()));
        workload::add_acknowledged(&mut history, TOPIC, &entries);
        producer_errors.extend(log.errors());
    }
    let catch_up = Instant::now() + Duration::from_secs(60);
    let processed = loop {
        let processed = read_member_logs(&logs)?;
        let seen: std::collections::HashSet<&str> = processed
            .records
            .iter()
            .map(|(_, _, value)| value.as_str())
            .collect();
        let missing = acknowledged_values
            .iter()
            .filter(|value| !seen.contains(value.as_str()))
            .count();
        if missing == 0 || Instant::now() >= catch_up {
            break processed;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A frozen member logs its commit after the freeze; give the last one time to.
    let deadline = Instant::now() + Duration::from_millis(4 * FREEZE_MS);
    while Instant::now() < deadline
        && !frozen_logs
            .iter()
            .all(|log| std::fs::read_to_string(log).is_ok_and(|text| text.contains("stall-commit")))
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(members);
    for (partition, offset, value) in &processed.records {
        history.read_unordered("group", TOPIC, *partition, *offset, value);
    }
    for (partition, end) in workload::end_offsets(&admin, TOPIC, PARTITIONS).await? {
        history.log_end(TOPIC, partition, end);
    }
    let report = history.check();
    let refused_freezes = processed
        .stall_commits
        .iter()
        .filter(|line| line.contains("refused"))
        .count();
    let duplicate_rate = if report.distinct_values_read == 0 {
        0.0
    } else {
        100.0 * report.redelivered as f64 / report.distinct_values_read as f64
    };
    println!(
        "group churn: seconds={seconds} members={MEMBERS} partitions={PARTITIONS} kills={kills} freezes={freezes} refused_commits_after_freeze={refused_freezes} broker_restarts={broker_restarts} (all mid-rebalance) acknowledged={} processed={} lost={} duplicated_in_log={} redelivered={} duplicate_rate={duplicate_rate:.2}% commit_errors={} stream_errors={} elapsed={}s seed={seed}",
        report.acknowledged,
        processed.records.len(),
        report.lost.len() + report.unread.len(),
        report.duplicated.len(),
        report.redelivered,
        processed.commit_errors,
        processed.stream_errors.len(),
        started.elapsed().as_secs(),
    );
    assert!(
        report.is_valid() && report.unread.is_empty(),
        "seed {seed}: {report}"
    );
    assert!(report.acknowledged > 0, "nothing was acknowledged");
    assert!(
        producer_errors.is_empty(),
        "seed {seed}: records failed: {:?}",
        &producer_errors[..producer_errors.len().min(10)]
    );
    assert!(
        processed.stream_errors.is_empty(),
        "seed {seed}: members saw errors: {:?}",
        processed.stream_errors
    );
    assert!(broker_restarts > 0 && freezes > 0, "the schedule ran");
    // Each frozen member's commit after the freeze was refused, as its commit result says.
    for log in &frozen_logs {
        let text = std::fs::read_to_string(log)?;
        let outcome = text
            .lines()
            .find(|line| line.starts_with("stall-commit"))
            .unwrap_or("no stall-commit line");
        assert!(
            outcome == "stall-commit refused UnknownMember"
                || outcome == "stall-commit refused FencedMemberEpoch",
            "seed {seed}: a member frozen past its session timeout committed: {outcome:?} ({})",
            log.display()
        );
    }
    assert_eq!(
        broker.log().refusals(),
        0,
        "seed {seed}: a partition refused writes:\n{}",
        broker.log().tail()
    );
    Ok(())
}
