//! Idempotent consumer: a payment the broker delivers again is skipped, not charged again.
//!
//! ```sh
//! cargo run -p sluice-examples --example idempotent_consumer
//! ```
//!
//! The pattern: consumer groups deliver at least once. A member that crashes after handling
//! records but before committing their offsets hands them, uncommitted, to the next member;
//! and a producer that retried after a lost answer may have written the same message twice.
//! `IdempotentConsumer` keys each record by its `message-id` header (its position when it has
//! none), skips keys its `DedupStore` remembers, runs the handler for the others, remembers
//! them, and only then commits the offset. Here the store is a SQLite file, so it survives the
//! crash of the member that wrote it.
//!
//! The key is written after the handler returned: a process that dies between the charge and
//! that write charges the payment again when it is delivered again. Outside that window each
//! payment is charged once. An effect that is a write to a SQLite database has no such window
//! with the inbox (`sluice_client::idempotent::inbox::InboxConsumer`), which commits the write
//! and the key in one transaction. Member A below stops only after its keys are written.
//!
//! What to watch: member A charges three payments and crashes without committing. Member B
//! (after the 6 s session timeout moves the partition) gets those three again and prints
//! `skipped ... already processed`, skips the second copy of pay-3 too, and charges only what
//! is new. It ends with `charged 5 payments, each once`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_client::idempotent::{
    BoxError, IdempotentConsumer, MESSAGE_ID_HEADER, Outcome, SqliteDedupStore,
};
use sluice_client::producer::Record;
use sluice_client::{Client, CommitMode, Consumer, ConsumerRecord};
use sluice_examples::{deadline_in, text, unique_suffix};

async fn member(client: &Client, group: &str, topic: &str) -> anyhow::Result<Consumer> {
    Ok(client
        .consumer()
        .group(group)
        .topics([topic])
        .commit_mode(CommitMode::Manual)
        // The shortest a default broker allows: how long member A's partition stays with it.
        .session_timeout(Duration::from_secs(6))
        .build()
        .await?)
}

/// The payment service's side effect: "charges" the card by appending to `charges`.
fn charge_card(charges: &Mutex<Vec<String>>, member: &str, record: &ConsumerRecord) {
    let payment = text(record);
    println!("member {member} charged {payment}");
    charges.lock().expect("charges lock").push(payment);
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topic = format!("payments-{suffix}");
    let group = format!("payment-service-{suffix}");
    client.admin().create_topic(&topic, 1, &[]).await?;

    let producer = client.producer().build().await?;
    let payments = [
        ("pay-1", "pay-1: alice 12.50"),
        ("pay-2", "pay-2: bob 7.00"),
        ("pay-3", "pay-3: carol 30.00"),
        // The application did not get the answer for pay-3 and sent it again.
        ("pay-3", "pay-3: carol 30.00"),
        ("pay-4", "pay-4: dave 4.20"),
        ("pay-5", "pay-5: erin 99.99"),
    ];
    for (message_id, payment) in payments {
        producer
            .send(Record::new(&topic, payment).header(MESSAGE_ID_HEADER, message_id))
            .await?;
    }
    producer.close().await?;
    println!(
        "produced {} records for 5 payments (pay-3 twice)",
        payments.len()
    );

    let directory = tempfile::tempdir()?;
    let store_path = directory.path().join("processed.sqlite");
    let charges = Arc::new(Mutex::new(Vec::new()));

    // Member A handles three records and dies before committing any offset.
    let store = SqliteDedupStore::open(&store_path, &group).await?;
    let mut member_a = IdempotentConsumer::new(member(&client, &group, &topic).await?, store);
    for _ in 0..3 {
        let charges = Arc::clone(&charges);
        let handler = move |record: ConsumerRecord| async move {
            charge_card(&charges, "A", &record);
            Ok::<(), BoxError>(())
        };
        let handled = tokio::time::timeout(Duration::from_secs(30), member_a.handle_next(handler))
            .await??
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
        anyhow::ensure!(
            handled.was_processed(),
            "member A saw {} before",
            handled.key
        );
    }
    drop(member_a);
    println!("member A crashed before committing: its 3 records will be delivered again");

    // Member B: a new process, the same group, the same store file.
    let store = SqliteDedupStore::open(&store_path, &group).await?;
    let mut member_b = IdempotentConsumer::new(member(&client, &group, &topic).await?, store);
    let mut skipped = 0;
    let deadline = deadline_in(60);
    for _ in 0..payments.len() {
        let charges = Arc::clone(&charges);
        let handler = move |record: ConsumerRecord| async move {
            charge_card(&charges, "B", &record);
            Ok::<(), BoxError>(())
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let handled = tokio::time::timeout(left, member_b.process_next(handler))
            .await
            .map_err(|_| anyhow::anyhow!("timed out waiting for the payments"))??
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
        if handled.outcome == Outcome::Duplicate {
            skipped += 1;
            println!(
                "member B skipped offset {} ({}): already processed",
                handled.record.offset, handled.key
            );
        }
    }
    member_b.close().await?;

    let charges = charges.lock().expect("charges lock").clone();
    let distinct: std::collections::BTreeSet<&String> = charges.iter().collect();
    anyhow::ensure!(
        charges.len() == 5 && distinct.len() == 5,
        "charges: {charges:?}"
    );
    println!(
        "member B delivered {} records and skipped {skipped}",
        payments.len()
    );
    println!("charged 5 payments, each once");
    Ok(())
}
