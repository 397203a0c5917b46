//! The idempotent-consumer helpers against a real broker and real SQLite files: dedup across a
//! member's crash, handler failures, and the inbox and outbox surviving a child process killed
//! (`std::process::abort`) between their steps.
//!
//! The crash tests re-execute this test binary as the child: `child_process` below does nothing
//! unless `SLUICE_TEST_CHILD` names a role, and then plays it against the parent's broker and
//! aborts at the point `SLUICE_TEST_ABORT` names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::idempotent::inbox::{Inbox, InboxConsumer};
use sluice_client::idempotent::outbox::{self, OUTBOX_ID_HEADER, OutboxMessage, OutboxRelay};
use sluice_client::idempotent::{
    BoxError, Error, IdempotentConsumer, InMemoryDedupStore, MESSAGE_ID_HEADER, MessageKey,
    Outcome, SqliteDedupStore,
};
use sluice_client::producer::Record;
use sluice_client::protocol::messages::OffsetSpec;
use sluice_client::{Client, CommitMode, Consumer, ConsumerRecord, Seek};

/// How long any wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);
/// Short enough that a crashed member's partitions move on quickly, long enough that a busy
/// machine does not expire a live member (heartbeats go every second).
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

fn config(data_dir: &Path) -> Config {
    let mut config = Config::on_loopback(data_dir);
    config.limits.group_min_session_timeout_ms = 1_000;
    config
}

async fn start(data_dir: &Path) -> (BrokerHandle, Client) {
    let broker = Broker::start(config(data_dir))
        .await
        .expect("broker starts");
    let client = Client::connect(&broker_url(&broker))
        .await
        .expect("connect");
    (broker, client)
}

fn broker_url(broker: &BrokerHandle) -> String {
    format!("tcp://{}", broker.tcp_addr)
}

async fn group_consumer(client: &Client, group: &str, topic: &str) -> Consumer {
    client
        .consumer()
        .group(group)
        .topics([topic])
        .commit_mode(CommitMode::Manual)
        .session_timeout(SESSION_TIMEOUT)
        .build()
        .await
        .expect("consumer")
}

/// Produces `(message id, value)` pairs to partition 0, in order.
async fn produce(client: &Client, topic: &str, messages: &[(Option<&str>, &str)]) {
    let producer = client.producer().build().await.unwrap();
    for (message_id, value) in messages {
        let mut record = Record::new(topic, value.to_string()).partition(0);
        if let Some(message_id) = message_id {
            record = record.header(MESSAGE_ID_HEADER, message_id.to_string());
        }
        producer.send(record).await.unwrap();
    }
    producer.close().await.unwrap();
}

/// The committed offset of `topic`/0 for `group`, if any.
async fn committed(client: &Client, group: &str, topic: &str) -> Option<u64> {
    let description = client.admin().describe_group(group).await.unwrap();
    description
        .offsets
        .iter()
        .find(|offset| offset.topic == topic && offset.partition == 0)
        .and_then(|offset| u64::try_from(offset.committed_offset).ok())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_runs_once_per_key_across_duplicates_and_a_crashed_member() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client
        .admin()
        .create_topic("payments", 1, &[])
        .await
        .unwrap();
    // pay-2 is sent twice (an application retrying after a lost answer); the last record has
    // no message id, so its position is its key.
    let messages = [
        (Some("pay-1"), "10"),
        (Some("pay-2"), "20"),
        (Some("pay-3"), "30"),
        (Some("pay-2"), "20"),
        (Some("pay-4"), "40"),
        (None, "50"),
    ];
    produce(&client, "payments", &messages).await;
    let store_path = directory.path().join("dedup.sqlite");
    // The handler's effect: the values it charged, in order.
    let charged = Arc::new(Mutex::new(Vec::<String>::new()));
    let charge = |charged: &Arc<Mutex<Vec<String>>>| {
        let charged = Arc::clone(charged);
        move |record: ConsumerRecord| async move {
            charged
                .lock()
                .unwrap()
                .push(String::from_utf8(record.value.to_vec()).unwrap());
            Ok::<(), BoxError>(())
        }
    };

    // The first member handles three records and crashes before committing any of them.
    let store = SqliteDedupStore::open(&store_path, "billing")
        .await
        .unwrap();
    let mut first =
        IdempotentConsumer::new(group_consumer(&client, "billing", "payments").await, store);
    for expected_offset in 0..3 {
        let handled = tokio::time::timeout(DEADLINE, first.handle_next(charge(&charged)))
            .await
            .expect("a record in time")
            .unwrap()
            .expect("stream open");
        assert_eq!(handled.record.offset, expected_offset);
        assert!(handled.was_processed());
    }
    drop(first);
    assert_eq!(
        committed(&client, "billing", "payments").await,
        None,
        "nothing was committed"
    );

    // A new member (a restarted process: the store is opened again) gets every record again.
    let store = SqliteDedupStore::open(&store_path, "billing")
        .await
        .unwrap();
    let mut second =
        IdempotentConsumer::new(group_consumer(&client, "billing", "payments").await, store);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while outcomes.len() < messages.len() {
        let handled =
            tokio::time::timeout(remaining(deadline), second.process_next(charge(&charged)))
                .await
                .expect("every record in time")
                .unwrap()
                .expect("stream open");
        outcomes.push((
            handled.record.offset,
            handled.key.to_string(),
            handled.outcome,
        ));
    }
    assert_eq!(
        outcomes,
        vec![
            (0, "message-id \"pay-1\"".to_owned(), Outcome::Duplicate),
            (1, "message-id \"pay-2\"".to_owned(), Outcome::Duplicate),
            (2, "message-id \"pay-3\"".to_owned(), Outcome::Duplicate),
            (3, "message-id \"pay-2\"".to_owned(), Outcome::Duplicate),
            (4, "message-id \"pay-4\"".to_owned(), Outcome::Processed(())),
            (5, "payments/0@5".to_owned(), Outcome::Processed(())),
        ]
    );
    assert_eq!(
        *charged.lock().unwrap(),
        ["10", "20", "30", "40", "50"],
        "one charge per message"
    );
    assert_eq!(
        committed(&client, "billing", "payments").await,
        Some(6),
        "committed after handling"
    );
    second.close().await.unwrap();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_keeps_its_record_and_nothing_past_it_is_committed() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("jobs", 1, &[]).await.unwrap();
    produce(
        &client,
        "jobs",
        &[
            (Some("job-0"), "a"),
            (Some("job-1"), "b"),
            (Some("job-2"), "c"),
        ],
    )
    .await;
    let mut consumer = IdempotentConsumer::new(
        group_consumer(&client, "workers", "jobs").await,
        InMemoryDedupStore::new(),
    );
    let succeed = |record: ConsumerRecord| async move { Ok::<u64, BoxError>(record.offset) };
    let handled = tokio::time::timeout(DEADLINE, consumer.process_next(succeed))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(handled.outcome, Outcome::Processed(0));
    assert_eq!(committed(&client, "workers", "jobs").await, Some(1));

    let fail = |_record: ConsumerRecord| async move {
        Err::<u64, BoxError>("payment service down".into())
    };
    let failed = consumer.process_next(fail).await;
    match failed {
        Err(Error::Handler { key, source }) => {
            assert_eq!(key.to_string(), "message-id \"job-1\"");
            assert_eq!(source.to_string(), "payment service down");
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert!(
        !consumer.commit().await.unwrap(),
        "nothing is committed while a record is unfinished"
    );
    assert_eq!(
        committed(&client, "workers", "jobs").await,
        Some(1),
        "the failed record stays uncommitted"
    );

    // The next call hands the same record over again, not the one after it.
    let retried = consumer.process_next(succeed).await.unwrap().unwrap();
    assert_eq!(retried.outcome, Outcome::Processed(1));
    assert_eq!(committed(&client, "workers", "jobs").await, Some(2));
    let last = consumer.process_next(succeed).await.unwrap().unwrap();
    assert_eq!(last.outcome, Outcome::Processed(2));
    consumer.close().await.unwrap();
    assert_eq!(committed(&client, "workers", "jobs").await, Some(3));
    broker.shutdown().await;
}

/// A consumer closed with a record unfinished (its handler failed) commits nothing of it and
/// leaves the group at once: the next member gets the partition and the record without
/// waiting for the first one's session to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_with_a_record_unfinished_hands_the_partition_on_at_once() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("jobs", 1, &[]).await.unwrap();
    produce(&client, "jobs", &[(Some("job-0"), "a")]).await;
    let long_session = || {
        client
            .consumer()
            .group("workers")
            .topics(["jobs"])
            .commit_mode(CommitMode::Manual)
            .session_timeout(Duration::from_secs(300))
            .build()
    };
    let mut first =
        IdempotentConsumer::new(long_session().await.unwrap(), InMemoryDedupStore::new());
    let fail = |_record: ConsumerRecord| async move { Err::<u64, BoxError>("down".into()) };
    let failed = tokio::time::timeout(DEADLINE, first.process_next(fail))
        .await
        .unwrap();
    assert!(matches!(failed, Err(Error::Handler { .. })), "{failed:?}");
    first.close().await.unwrap();
    // Well within the first member's 300 s session; offset 0 again: nothing was committed.
    let mut second =
        IdempotentConsumer::new(long_session().await.unwrap(), InMemoryDedupStore::new());
    let succeed = |record: ConsumerRecord| async move { Ok::<u64, BoxError>(record.offset) };
    let handled = tokio::time::timeout(DEADLINE, second.process_next(succeed))
        .await
        .expect("the partition moved on before the first member's session ended")
        .unwrap()
        .unwrap();
    assert_eq!(handled.outcome, Outcome::Processed(0));
    second.close().await.unwrap();
    broker.shutdown().await;
}

/// Runs this test binary as a child playing `role`; returns its stderr once it ended.
async fn run_child(
    role: &str,
    environment: &[(&str, String)],
) -> (std::process::ExitStatus, String) {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICE_TEST_CHILD", role)
        .envs(environment.iter().map(|(name, value)| (name, value)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("child starts");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the child ends in time")
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts the child died by `abort()` at `point`, not by finishing or failing elsewhere.
fn assert_aborted_at(status: std::process::ExitStatus, stderr: &str, point: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "the child should die of SIGABRT: {status:?}\n{stderr}"
        );
    }
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("aborting at {point}")),
        "the child did not reach {point}:\n{stderr}"
    );
}

fn child_setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("the child needs {name}"))
}

/// The child's side of the crash tests; a no-op in a normal test run.
#[test]
fn child_process() {
    let Ok(role) = std::env::var("SLUICE_TEST_CHILD") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match role.as_str() {
            "inbox" => inbox_child().await,
            "outbox" => outbox_child().await,
            other => panic!("unknown child role {other}"),
        }
    });
    panic!("the child should have aborted");
}

/// Credits each deposit to the account and writes a ledger row, through the inbox.
fn credit(
    transaction: &rusqlite::Transaction<'_>,
    record: &ConsumerRecord,
) -> Result<String, BoxError> {
    let message_id = record
        .headers
        .iter()
        .find(|(name, _)| name == MESSAGE_ID_HEADER)
        .map(|(_, value)| String::from_utf8(value.to_vec()))
        .transpose()?
        .ok_or("a deposit without a message id")?;
    let amount: i64 = std::str::from_utf8(&record.value)?.parse()?;
    transaction.execute(
        "UPDATE accounts SET balance = balance + ?1 WHERE name = 'alice'",
        [amount],
    )?;
    transaction.execute(
        "INSERT INTO ledger (message_id, amount) VALUES (?1, ?2)",
        rusqlite::params![message_id, amount],
    )?;
    Ok(message_id)
}

async fn inbox_child() {
    let client = Client::connect(&child_setting("SLUICE_TEST_BROKER"))
        .await
        .unwrap();
    let abort_point = child_setting("SLUICE_TEST_ABORT");
    let abort_message = child_setting("SLUICE_TEST_ABORT_MESSAGE");
    let inbox = Inbox::open(child_setting("SLUICE_TEST_DATABASE"), "ledger")
        .await
        .unwrap();
    let consumer = group_consumer(&client, "ledger", "deposits").await;
    let mut deposits = InboxConsumer::new(consumer, inbox);
    loop {
        let abort_in_transaction = abort_point == "in-transaction";
        let abort_message_in_handler = abort_message.clone();
        let handled = deposits
            .handle_next(move |transaction, record| {
                let message_id = credit(transaction, record)?;
                if abort_in_transaction && message_id == abort_message_in_handler {
                    // The handler's writes are done; the transaction that also holds the
                    // processed key has not committed.
                    eprintln!("aborting at in-transaction");
                    std::process::abort();
                }
                Ok::<String, BoxError>(message_id)
            })
            .await
            .unwrap()
            .expect("stream open");
        if abort_point == "before-offset-commit"
            && handled.outcome == Outcome::Processed(abort_message.clone())
        {
            // The inbox transaction committed; the consumer offset did not.
            eprintln!("aborting at before-offset-commit");
            std::process::abort();
        }
        deposits.commit().await.unwrap();
    }
}

async fn inbox_survives_a_crash_at(abort_point: &str) {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client
        .admin()
        .create_topic("deposits", 1, &[])
        .await
        .unwrap();
    let deposits = [
        (Some("deposit-1"), "10"),
        (Some("deposit-2"), "20"),
        (Some("deposit-3"), "30"),
        (Some("deposit-4"), "40"),
        (Some("deposit-5"), "50"),
    ];
    produce(&client, "deposits", &deposits).await;
    let database = directory.path().join("bank.sqlite");
    {
        let connection = rusqlite::Connection::open(&database).unwrap();
        connection
            .execute_batch(
                "CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER NOT NULL);
                 INSERT INTO accounts VALUES ('alice', 0);
                 CREATE TABLE ledger (message_id TEXT NOT NULL, amount INTEGER NOT NULL);",
            )
            .unwrap();
    }

    let (status, stderr) = run_child(
        "inbox",
        &[
            ("SLUICE_TEST_BROKER", broker_url(&broker)),
            ("SLUICE_TEST_DATABASE", database.display().to_string()),
            ("SLUICE_TEST_ABORT", abort_point.to_owned()),
            ("SLUICE_TEST_ABORT_MESSAGE", "deposit-3".to_owned()),
        ],
    )
    .await;
    assert_aborted_at(status, &stderr, abort_point);
    assert_eq!(
        committed(&client, "ledger", "deposits").await,
        Some(2),
        "deposit-3's offset was never committed"
    );

    // Restarted: the same database, the same group; deposit-3 is delivered again.
    let inbox = Inbox::open(&database, "ledger").await.unwrap();
    let mut restarted =
        InboxConsumer::new(group_consumer(&client, "ledger", "deposits").await, inbox);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while outcomes.len() < 3 {
        let handled = tokio::time::timeout(remaining(deadline), restarted.process_next(credit))
            .await
            .expect("the rest of the deposits in time")
            .unwrap()
            .expect("stream open");
        outcomes.push((handled.record.offset, handled.outcome));
    }
    let redelivered = if abort_point == "in-transaction" {
        // Rolled back by the crash: handled now, for the first time.
        Outcome::Processed("deposit-3".to_owned())
    } else {
        // Committed before the crash: the inbox knows it.
        Outcome::Duplicate
    };
    assert_eq!(
        outcomes,
        vec![
            (2, redelivered),
            (3, Outcome::Processed("deposit-4".to_owned())),
            (4, Outcome::Processed("deposit-5".to_owned())),
        ]
    );
    let (balance, ledger) = restarted
        .inbox()
        .with_connection(|connection| {
            let balance: i64 = connection.query_row(
                "SELECT balance FROM accounts WHERE name = 'alice'",
                [],
                |row| row.get(0),
            )?;
            let mut statement =
                connection.prepare("SELECT message_id FROM ledger ORDER BY rowid")?;
            let ledger = statement
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok((balance, ledger))
        })
        .await
        .unwrap();
    assert_eq!(
        ledger,
        [
            "deposit-1",
            "deposit-2",
            "deposit-3",
            "deposit-4",
            "deposit-5"
        ],
        "each deposit exactly once"
    );
    assert_eq!(balance, 150);
    assert_eq!(committed(&client, "ledger", "deposits").await, Some(5));
    restarted.close().await.unwrap();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_effect_happens_once_after_a_crash_inside_the_transaction() {
    inbox_survives_a_crash_at("in-transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_effect_happens_once_after_a_crash_before_the_offset_commit() {
    inbox_survives_a_crash_at("before-offset-commit").await;
}

/// Places `count` orders, each with its outbox row, one transaction per order.
fn place_orders(database: &Path, first: u32, count: u32) {
    let mut connection = rusqlite::Connection::open(database).unwrap();
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL)",
        )
        .unwrap();
    outbox::create_schema(&connection).unwrap();
    for order in first..first + count {
        let customer = format!("customer-{}", order % 3);
        let transaction = connection.transaction().unwrap();
        transaction
            .execute(
                "INSERT INTO orders (id, customer) VALUES (?1, ?2)",
                rusqlite::params![order, customer],
            )
            .unwrap();
        let message = OutboxMessage::new("orders", format!("order-{order}")).key(customer);
        outbox::insert(&transaction, &message).unwrap();
        transaction.commit().unwrap();
    }
}

async fn outbox_child() {
    let client = Client::connect(&child_setting("SLUICE_TEST_BROKER"))
        .await
        .unwrap();
    let mut relay = OutboxRelay::builder(
        &client,
        child_setting("SLUICE_TEST_DATABASE"),
        "orders-relay",
    )
    .max_batch_rows(4)
    .build()
    .await
    .unwrap();
    assert_eq!(
        relay.relay_once().await.unwrap(),
        4,
        "the first batch is published and marked"
    );
    let batch = relay.publish_pending().await.unwrap();
    assert_eq!(batch.rows.len(), 4);
    // Acknowledged by the broker (durably), not marked in the outbox.
    eprintln!("aborting at after-publish");
    std::process::abort();
}

/// Every record of `topic`, read from the start to the end of each partition.
async fn read_topic(client: &Client, topic: &str) -> Vec<ConsumerRecord> {
    let admin = client.admin();
    let mut ends = BTreeMap::new();
    for partition in 0..admin.partition_count(topic).await.unwrap() {
        let (end, _) = admin
            .list_offset(topic, partition, OffsetSpec::Latest)
            .await
            .unwrap();
        if end > 0 {
            ends.insert(partition, end);
        }
    }
    let mut consumer = client.consumer().build().await.unwrap();
    for partition in ends.keys() {
        consumer
            .assign(&[(topic.to_owned(), *partition)], Seek::Earliest)
            .await
            .unwrap();
    }
    let mut records = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !ends.is_empty() {
        let record = tokio::time::timeout(remaining(deadline), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("partitions {ends:?} not read to their end in time"))
            .expect("stream open")
            .unwrap();
        if ends.get(&record.partition) == Some(&(record.offset + 1)) {
            ends.remove(&record.partition);
        }
        records.push(record);
    }
    records
}

/// The outbox ids in `records`, as numbers, per partition in offset order.
fn outbox_ids(records: &[ConsumerRecord], relay: &str) -> BTreeMap<u32, Vec<i64>> {
    let mut ids: BTreeMap<u32, Vec<(u64, i64)>> = BTreeMap::new();
    for record in records {
        let header = record
            .headers
            .iter()
            .find(|(name, _)| name == OUTBOX_ID_HEADER)
            .map(|(_, value)| std::str::from_utf8(value).unwrap())
            .expect("every relayed record names its outbox row");
        let id = header
            .strip_prefix(&format!("{relay}:"))
            .unwrap()
            .parse()
            .unwrap();
        ids.entry(record.partition)
            .or_default()
            .push((record.offset, id));
    }
    ids.into_iter()
        .map(|(partition, mut entries)| {
            entries.sort();
            (partition, entries.into_iter().map(|(_, id)| id).collect())
        })
        .collect()
}

/// Asserts every outbox row 1..=count is in the topic exactly once, each partition in id order.
fn assert_each_row_once_in_order(records: &[ConsumerRecord], relay: &str, count: i64) {
    let by_partition = outbox_ids(records, relay);
    let mut all: Vec<i64> = by_partition.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=count).collect::<Vec<_>>(),
        "each row exactly once: {by_partition:?}"
    );
    for (partition, ids) in &by_partition {
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "partition {partition} out of order: {ids:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_reach_the_topic_once_and_in_order_after_a_crash_between_publish_and_mark() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 3, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 10);

    let (status, stderr) = run_child(
        "outbox",
        &[
            ("SLUICE_TEST_BROKER", broker_url(&broker)),
            ("SLUICE_TEST_DATABASE", database.display().to_string()),
        ],
    )
    .await;
    assert_aborted_at(status, &stderr, "after-publish");
    assert_eq!(
        read_topic(&client, "orders").await.len(),
        8,
        "two batches of 4 reached the topic"
    );

    // Restarted: the read-back finds rows 5 to 8 in the topic and marks them; only 9 and 10
    // are published.
    let mut relay = OutboxRelay::builder(&client, &database, "orders-relay")
        .max_batch_rows(4)
        .build()
        .await
        .unwrap();
    assert_eq!(
        relay.unsent_count().await.unwrap(),
        2,
        "the read-back marked the published rows"
    );
    assert_eq!(relay.relay_once().await.unwrap(), 2);
    assert_eq!(relay.relay_once().await.unwrap(), 0);
    relay.close().await.unwrap();

    let records = read_topic(&client, "orders").await;
    assert_eq!(records.len(), 10, "no duplicate in the topic");
    assert_each_row_once_in_order(&records, "orders-relay", 10);
    // The marks point at the records found in the topic.
    let connection = rusqlite::Connection::open(&database).unwrap();
    let mut statement = connection
        .prepare("SELECT id, sent_partition, sent_offset FROM sluice_outbox ORDER BY id")
        .unwrap();
    let marks: BTreeSet<(i64, u32, u64)> = statement
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? as u64))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let in_topic: BTreeSet<(i64, u32, u64)> = records
        .iter()
        .map(|record| {
            let ids = outbox_ids(std::slice::from_ref(record), "orders-relay");
            (ids[&record.partition][0], record.partition, record.offset)
        })
        .collect();
    assert_eq!(marks, in_topic);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_of_the_same_name_fences_the_first_and_nothing_is_duplicated() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 2, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 3);
    let mut first = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    let mut second = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    let fenced = first
        .relay_once()
        .await
        .expect_err("the older relay is fenced");
    assert!(fenced.to_string().contains("ProducerFenced"), "{fenced}");
    assert_eq!(second.relay_once().await.unwrap(), 3);

    // The first comes back: it takes the name over again and reads back before sending.
    place_orders(&database, 4, 3);
    assert_eq!(first.relay_once().await.unwrap(), 3);
    place_orders(&database, 7, 2);
    let fenced = second
        .relay_once()
        .await
        .expect_err("now the second is fenced");
    assert!(fenced.to_string().contains("ProducerFenced"), "{fenced}");
    assert_eq!(
        second.relay_once().await.unwrap(),
        2,
        "and takes over again"
    );
    assert_eq!(first.unsent_count().await.unwrap(), 0);

    let records = read_topic(&client, "orders").await;
    assert_eq!(records.len(), 8);
    assert_each_row_once_in_order(&records, "orders-relay", 8);
    // A relay under another name refuses the outbox.
    let other = OutboxRelay::builder(&client, &database, "another-relay")
        .build()
        .await;
    assert!(matches!(other, Err(Error::Usage(_))), "{other:?}");
    broker.shutdown().await;
}

/// A batch published but never marked sent (the mark failed, or the application published
/// again before marking) is not sent a second time: the next publish takes a new epoch and
/// finds those rows in the topic first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_published_but_not_marked_are_not_published_again() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 2, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 4);
    let mut relay = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    let published = relay.publish_pending().await.unwrap();
    assert_eq!(published.rows.len(), 4);
    // Not marked: the same relay publishes again.
    let again = relay.publish_pending().await.unwrap();
    assert!(again.rows.is_empty(), "{:?}", again.rows);
    assert_eq!(relay.unsent_count().await.unwrap(), 0, "found and marked");
    place_orders(&database, 5, 2);
    assert_eq!(relay.relay_once().await.unwrap(), 2);
    relay.close().await.unwrap();
    let records = read_topic(&client, "orders").await;
    assert_each_row_once_in_order(&records, "orders-relay", 6);
    broker.shutdown().await;
}

/// Rows whose records the broker served but never fsynced (the fsync failed) are not marked
/// sent by the next relay's read-back: after a power loss they are in no topic, and the relay
/// after that publishes them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_found_in_the_topic_but_not_fsynced_are_not_marked_sent() {
    use sluice_broker::storage::faultfs::{FaultFs, FaultKind};
    let directory = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let broker_config = Config::on_loopback(directory.path().join("broker"));
    let broker = Broker::start_with_fs(broker_config.clone(), Arc::new(fs.clone()))
        .await
        .unwrap();
    let client = Client::connect(&broker_url(&broker)).await.unwrap();
    client.admin().create_topic("orders", 1, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 3);
    let mut first = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    // The rows reach the log, but their fsync fails: the publish fails, nothing is marked.
    fs.fail_syncs(FaultKind::Eio);
    assert!(first.publish_pending().await.is_err());
    // Writes work again (the next relay's producer id is stored durably), but the partition
    // whose fsync failed counts nothing more as durable.
    fs.clear_faults();
    drop(first);
    let unsent = || {
        rusqlite::Connection::open(&database)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sluice_outbox WHERE sent_at_ms IS NULL",
                [],
                |row| row.get::<_, i64>(0),
            )
            .unwrap()
    };
    // The next relay finds them in the topic, but not on disk: it does not mark them.
    let second = OutboxRelay::builder(&client, &database, "orders-relay")
        .read_back_timeout(Duration::from_secs(1))
        .build()
        .await;
    assert!(
        second.is_err(),
        "the read-back trusted records never fsynced"
    );
    assert_eq!(unsent(), 3);
    // A power loss takes them; the relay after it publishes each row once.
    drop(client);
    broker.shutdown().await;
    fs.crash();
    let broker = Broker::start_with_fs(broker_config, Arc::new(fs.clone()))
        .await
        .unwrap();
    let client = Client::connect(&broker_url(&broker)).await.unwrap();
    let mut third = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    assert_eq!(third.relay_once().await.unwrap(), 3);
    third.close().await.unwrap();
    assert_eq!(unsent(), 0);
    let records = read_topic(&client, "orders").await;
    assert_each_row_once_in_order(&records, "orders-relay", 3);
    broker.shutdown().await;
}

/// Other writers' records in the partitions the relay's rows do not go to must not pile up in
/// front of the next read-back: with every row marked, the relay moves where a read-back
/// starts to the partitions' ends (before, a restart read everything written there since the
/// relay's own start, until its read-back could not finish within its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_back_does_not_fall_behind_partitions_the_rows_do_not_go_to() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 2, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 1);
    let mut relay = OutboxRelay::builder(&client, &database, "orders-relay")
        .scan_catch_up_every(Duration::ZERO)
        .build()
        .await
        .unwrap();
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    // The rows (keyed by customer) go to one partition; another writer fills the other.
    let records = read_topic(&client, "orders").await;
    let ours = records[0].partition;
    let other = 1 - ours;
    let producer = client.producer().build().await.unwrap();
    for index in 0..100 {
        let record = Record::new("orders", format!("other-{index}")).partition(other);
        producer.enqueue(record).await.unwrap();
    }
    producer.close().await.unwrap();
    // Order 4 is customer-1's, as order 1: the same key, the same partition.
    place_orders(&database, 4, 1);
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    let (other_end, _) = client
        .admin()
        .list_offset("orders", other, OffsetSpec::Latest)
        .await
        .unwrap();
    let scan_from: i64 = rusqlite::Connection::open(&database)
        .unwrap()
        .query_row(
            "SELECT scan_from_offset FROM sluice_outbox_scan WHERE topic = 'orders' AND partition = ?1",
            [other],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(
        scan_from as u64, other_end,
        "the other writer's records are behind it"
    );
    relay.close().await.unwrap();
    broker.shutdown().await;
}

/// A row whose own `message-id` header is empty still gets the relay's id: an empty id is no
/// id to a consumer's dedup store, which would key the record by its position and run its
/// handler again for a copy published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_an_empty_message_id_gets_the_relays() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 1, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    let connection = rusqlite::Connection::open(&database).unwrap();
    outbox::create_schema(&connection).unwrap();
    let message = OutboxMessage::new("orders", "order-1").header("message-id", "");
    let id = outbox::insert(&connection, &message).unwrap();
    let mut relay = OutboxRelay::builder(&client, &database, "orders-relay")
        .build()
        .await
        .unwrap();
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    relay.close().await.unwrap();
    let records = read_topic(&client, "orders").await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        MessageKey::of(&records[0]),
        MessageKey::MessageId(format!("orders-relay:{id}").into_bytes().into())
    );
    broker.shutdown().await;
}

/// Marking an older batch after a newer one was published must not hand the newer batch's
/// producer back: its rows are unmarked, and a publish on that producer (no new epoch, no
/// read-back) would send them a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_an_older_batch_does_not_skip_the_read_back_of_a_newer_one() {
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    client.admin().create_topic("orders", 2, &[]).await.unwrap();
    let database = directory.path().join("shop.sqlite");
    place_orders(&database, 1, 2);
    let mut relay = OutboxRelay::builder(&client, &database, "orders-relay")
        .max_batch_rows(1)
        .build()
        .await
        .unwrap();
    let older = relay.publish_pending().await.unwrap();
    assert_eq!(older.rows.len(), 1);
    // Published before `older` was marked: a new epoch, whose read-back marks row 1.
    let newer = relay.publish_pending().await.unwrap();
    assert_eq!(newer.rows.len(), 1);
    assert_eq!(relay.unsent_count().await.unwrap(), 1, "row 2 is unmarked");
    assert_eq!(relay.mark_sent(&older).await.unwrap(), 0, "marked already");
    assert_eq!(
        relay.relay_once().await.unwrap(),
        0,
        "row 2 is found in the topic, not published again"
    );
    assert_eq!(relay.unsent_count().await.unwrap(), 0);
    // The newer batch marked late changes nothing, and the relay goes on publishing.
    assert_eq!(relay.mark_sent(&newer).await.unwrap(), 0);
    place_orders(&database, 3, 1);
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    assert_eq!(relay.relay_once().await.unwrap(), 0);
    relay.close().await.unwrap();
    let records = read_topic(&client, "orders").await;
    assert_each_row_once_in_order(&records, "orders-relay", 3);
    broker.shutdown().await;
}

/// Two relays of different names starting together on a fresh outbox: exactly one may claim
/// it, or both would publish every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_relay_names_starting_together_exactly_one_claims_the_outbox() {
    const ROUNDS: usize = 20;
    let directory = tempfile::tempdir().unwrap();
    let (broker, client) = start(&directory.path().join("broker")).await;
    for round in 0..ROUNDS {
        let database = directory.path().join(format!("shop-{round}.sqlite"));
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let starts: Vec<_> = ["relay-a", "relay-b"]
            .into_iter()
            .map(|name| {
                let (client, database, barrier) =
                    (client.clone(), database.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    OutboxRelay::builder(&client, &database, name).build().await
                })
            })
            .collect();
        let mut claimed = Vec::new();
        let mut refused = 0;
        for start in starts {
            match tokio::time::timeout(DEADLINE, start)
                .await
                .expect("the relay starts in time")
                .unwrap()
            {
                Ok(relay) => claimed.push(relay),
                Err(Error::Usage(_)) => refused += 1,
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!(
            (claimed.len(), refused),
            (1, 1),
            "round {round}: exactly one relay name claims the outbox"
        );
        for relay in claimed {
            relay.close().await.unwrap();
        }
    }
    broker.shutdown().await;
}
