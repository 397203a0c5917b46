//! Quickstart: create a topic, produce to it, consume it as a group.
//!
//! ```sh
//! cargo run --release -p sluice-broker                  # in one terminal
//! cargo run -p sluice-examples --example quickstart     # in another
//! ```
//!
//! The pattern: a producer sends records with a key; records with the same key land on the
//! same partition, so each customer's orders stay in order. A consumer in a group gets the
//! partitions assigned by the broker and commits how far it got, so a second run of the same
//! group would continue where this one stopped.
//!
//! What to watch: every `produced` line shows the partition and offset the broker gave the
//! record (alice's orders share a partition), and the `consumed` lines come back per
//! partition in offset order. It ends with `quickstart done: 6 produced, 6 consumed`.

use sluice_client::CommitMode;
use sluice_client::producer::Record;
use sluice_examples::{deadline_in, next_record, text, unique_suffix};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topic = format!("quickstart-orders-{suffix}");
    client.admin().create_topic(&topic, 3, &[]).await?;
    println!("created topic {topic} with 3 partitions");

    // The producer is idempotent and waits for the broker to fsync (acks=durable) by default.
    let producer = client.producer().build().await?;
    let orders = [
        ("alice", "order-1: 2 coffees"),
        ("bob", "order-2: 1 tea"),
        ("alice", "order-3: 1 croissant"),
        ("carol", "order-4: 3 muffins"),
        ("bob", "order-5: 2 scones"),
        ("alice", "order-6: 1 juice"),
    ];
    for (customer, order) in orders {
        let delivery = producer
            .send(Record::new(&topic, order).key(customer))
            .await?;
        let offset = delivery.offset.expect("acks=durable reports the offset");
        println!(
            "produced {customer:<5} {order:<22} -> partition {} offset {offset}",
            delivery.partition
        );
    }
    producer.close().await?;

    // A group member reads every partition it is assigned (here all three: it is alone).
    let group = format!("quickstart-billing-{suffix}");
    let mut consumer = client
        .consumer()
        .group(&group)
        .topics([&topic])
        .commit_mode(CommitMode::Manual)
        .build()
        .await?;
    let deadline = deadline_in(30);
    for _ in 0..orders.len() {
        let record = next_record(&mut consumer, deadline, "the orders").await?;
        let customer = record
            .key
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        println!(
            "consumed partition {} offset {}: {customer:<5} {}",
            record.partition,
            record.offset,
            text(&record)
        );
    }
    // Commit what was consumed, then leave the group.
    consumer.commit().await?;
    consumer.close().await?;
    let description = client.admin().describe_group(&group).await?;
    let lag: i64 = description.offsets.iter().map(|offset| offset.lag).sum();
    println!("group {group} committed its offsets; lag {lag}");
    anyhow::ensure!(lag == 0, "the group should have caught up");
    println!(
        "quickstart done: {} produced, {} consumed",
        orders.len(),
        orders.len()
    );
    Ok(())
}
