//! Event sourcing and CQRS: a bank account whose state is its events, rebuilt by replaying its
//! topic from offset 0, and a read model kept up to date by a consumer group.
//!
//! ```sh
//! cargo run -p sluice-examples --example event_sourcing
//! ```
//!
//! The pattern: the topic is the system of record. An account is never stored as a row; it is
//! the fold of its events (`opened`, `deposited`, `withdrew`), keyed by account id so one
//! account's events share a partition and keep their order. To handle a command (withdraw 500)
//! the write side rebuilds the account by replaying that partition from offset 0, checks the
//! rule (no overdraft) against the rebuilt state, and appends the resulting event, or rejects
//! the command. The read side (the Q of CQRS) is separate: a consumer group projects every
//! event into a balance table built for queries, and catches up on its own.
//!
//! A real write side also needs one writer per account at a time (or a conditional append) so
//! two commands cannot both pass the check; this example handles commands one by one.
//!
//! What to watch: each command prints `rebuilt acc-1 by replaying N event(s)` with the balance
//! the replay gave; the 500.00 withdrawal is `rejected: insufficient funds`. At the end the
//! read model's balances match the replayed aggregates: `read model agrees with the event log`.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_client::producer::partitioner::partition_for_key;
use sluice_client::producer::{Producer, Record};
use sluice_client::protocol::messages::OffsetSpec;
use sluice_client::{Client, CommitMode, ConsumerRecord, Seek};
use sluice_examples::{deadline_in, next_record, text, unique_suffix};
use tokio::sync::watch;

const PARTITIONS: u32 = 2;

/// An account, as its events leave it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Account {
    owner: String,
    balance_cents: i64,
    /// Events applied: the account's version.
    version: u64,
}

impl Account {
    /// Applies one event (`opened ID OWNER`, `deposited ID CENTS`, `withdrew ID CENTS`).
    fn apply(&mut self, event: &str) {
        match event.split(' ').collect::<Vec<_>>().as_slice() {
            ["opened", _, owner] => self.owner = (*owner).to_owned(),
            ["deposited", _, cents] => self.balance_cents += cents.parse::<i64>().unwrap_or(0),
            ["withdrew", _, cents] => self.balance_cents -= cents.parse::<i64>().unwrap_or(0),
            _ => return,
        }
        self.version += 1;
    }

    /// The event a command produces, or why it is refused. The rules live here, on the state
    /// rebuilt from the events.
    fn decide(&self, id: &str, command: &Command) -> Result<String, String> {
        match command {
            Command::Open { owner } if self.version == 0 => Ok(format!("opened {id} {owner}")),
            Command::Open { .. } => Err("already open".into()),
            _ if self.version == 0 => Err("no such account".into()),
            Command::Deposit { cents } => Ok(format!("deposited {id} {cents}")),
            Command::Withdraw { cents } if *cents > self.balance_cents => Err(format!(
                "insufficient funds (balance {})",
                money(self.balance_cents)
            )),
            Command::Withdraw { cents } => Ok(format!("withdrew {id} {cents}")),
        }
    }
}

#[derive(Clone, Debug)]
enum Command {
    Open { owner: &'static str },
    Deposit { cents: i64 },
    Withdraw { cents: i64 },
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}

/// The read side's projection of one event into the balance table.
///
/// At least once: a real projection stores the applied offset with the row (or goes through
/// the inbox) so a redelivered event is not applied twice.
fn project(read_model: &watch::Sender<BTreeMap<String, Account>>, record: &ConsumerRecord) {
    let id = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
    read_model.send_modify(|accounts| accounts.entry(id).or_default().apply(&text(record)));
}

/// Rebuilds an account by replaying its partition from offset 0, keeping its own events.
async fn rebuild(client: &Client, topic: &str, id: &str) -> anyhow::Result<Account> {
    let partition = partition_for_key(id.as_bytes(), PARTITIONS);
    let (end, _) = client
        .admin()
        .list_offset(topic, partition, OffsetSpec::Latest)
        .await?;
    let mut account = Account::default();
    if end == 0 {
        return Ok(account);
    }
    let mut replay = client.consumer().build().await?;
    replay
        .assign(&[(topic.to_owned(), partition)], Seek::Offset(0))
        .await?;
    let deadline = deadline_in(30);
    loop {
        let record = next_record(&mut replay, deadline, "the account's events").await?;
        if record.key.as_deref() == Some(id.as_bytes()) {
            account.apply(&text(&record));
        }
        if record.offset + 1 >= end {
            return Ok(account);
        }
    }
}

/// The write side: rebuild, decide, append.
async fn handle(
    client: &Client,
    producer: &Producer,
    topic: &str,
    id: &str,
    command: Command,
) -> anyhow::Result<bool> {
    let account = rebuild(client, topic, id).await?;
    println!(
        "{command:?} on {id}: rebuilt {id} by replaying {} event(s): balance {}",
        account.version,
        money(account.balance_cents)
    );
    match account.decide(id, &command) {
        Ok(event) => {
            let delivery = producer
                .send(Record::new(topic, event.clone()).key(id.to_owned()))
                .await?;
            let offset = delivery.offset.expect("acks=durable reports the offset");
            println!(
                "  appended \"{event}\" at partition {} offset {offset}",
                delivery.partition
            );
            Ok(true)
        }
        Err(reason) => {
            println!("  rejected: {reason}");
            Ok(false)
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topic = format!("account-events-{suffix}");
    client.admin().create_topic(&topic, PARTITIONS, &[]).await?;

    // The read side: a consumer group projecting every event into a query table, from the
    // start of the topic, while the commands run.
    // A watch channel, so a reader can wait for the model to reach a state.
    let read_model = Arc::new(watch::Sender::new(BTreeMap::<String, Account>::new()));
    let (stop, mut stopped) = watch::channel(false);
    let mut projector = client
        .consumer()
        .group(format!("account-balances-{suffix}"))
        .topics([&topic])
        .commit_mode(CommitMode::Manual)
        .build()
        .await?;
    let projection = {
        let read_model = Arc::clone(&read_model);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    record = futures::StreamExt::next(&mut projector) => match record {
                        Some(Ok(record)) => {
                            project(&read_model, &record);
                            if let Err(error) = projector.commit().await {
                                eprintln!("projector: commit failed: {error}");
                            }
                        }
                        Some(Err(error)) => eprintln!("projector: {error}"),
                        None => break,
                    },
                }
            }
            projector.close().await
        })
    };

    let producer = client.producer().build().await?;
    let commands = [
        ("acc-1", Command::Open { owner: "alice" }),
        ("acc-2", Command::Open { owner: "bob" }),
        ("acc-1", Command::Deposit { cents: 10_000 }),
        ("acc-2", Command::Deposit { cents: 2_000 }),
        ("acc-1", Command::Withdraw { cents: 3_000 }),
        ("acc-1", Command::Deposit { cents: 5_000 }),
        ("acc-1", Command::Withdraw { cents: 50_000 }),
        ("acc-2", Command::Withdraw { cents: 500 }),
    ];
    let mut appended = 0;
    let mut rejected = 0;
    for (id, command) in commands {
        if handle(&client, &producer, &topic, id, command).await? {
            appended += 1;
        } else {
            rejected += 1;
        }
    }
    producer.close().await?;
    println!("{appended} events appended, {rejected} command rejected");

    // The aggregates, rebuilt once more from the log, are the truth the read model must reach.
    let mut truth = BTreeMap::new();
    for id in ["acc-1", "acc-2"] {
        truth.insert(id.to_owned(), rebuild(&client, &topic, id).await?);
    }
    let mut changes = read_model.subscribe();
    // `wait_for` returns a read guard on the model: let it go at once, or the projection's
    // next update would wait for it while this task waits for the projection.
    let caught_up = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        changes.wait_for(|accounts| *accounts == truth),
    )
    .await
    .is_ok_and(|changed| changed.is_ok());
    anyhow::ensure!(
        caught_up,
        "the read model did not catch up: {:?}",
        *read_model.borrow()
    );
    stop.send(true)?;
    projection.await??;
    for (id, account) in &truth {
        println!(
            "read model: {id} owner {} balance {} after {} events",
            account.owner,
            money(account.balance_cents),
            account.version
        );
    }
    anyhow::ensure!(
        truth["acc-1"].balance_cents == 12_000 && truth["acc-2"].balance_cents == 1_500,
        "balances: {truth:?}"
    );
    println!("read model agrees with the event log");
    Ok(())
}
