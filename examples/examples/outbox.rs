//! Transactional outbox: database changes published exactly once, even when the relay crashes.
//!
//! ```sh
//! cargo run -p sluice-examples --example outbox
//! ```
//!
//! The pattern: a service must both save an order and announce it. Writing to the database and
//! then publishing loses the event when the process dies in between; publishing first announces
//! orders that were never saved. Instead the service writes the order *and* an outbox row in
//! one SQLite transaction, and a relay publishes the outbox rows afterwards, with the
//! idempotent producer under a stable name, marking each row sent once the broker has it.
//!
//! A relay can die between publishing and marking. Its successor takes the same producer name
//! (which fences any instance still running), reads back what is in the topic since the last
//! mark, marks the rows it finds there, and publishes only the rest. So every row reaches the
//! topic once, in order.
//!
//! What to watch: the first relay publishes orders 1 to 3 and "crashes" before marking them
//! (`3 rows published, not marked`). The restarted relay finds all three in the topic
//! (`2 rows left to publish`), publishes orders 4 and 5, and the final read of the topic shows
//! orders 1 to 5, each once, in order: `each order once, in order`.

use sluice_client::Seek;
use sluice_client::idempotent::outbox::{self, OUTBOX_ID_HEADER, OutboxMessage, OutboxRelay};
use sluice_client::protocol::messages::OffsetSpec;
use sluice_examples::{deadline_in, header, next_record, text, unique_suffix};

/// The order service: saves an order and its announcement in one transaction.
fn place_order(
    connection: &mut rusqlite::Connection,
    topic: &str,
    order: u32,
    item: &str,
) -> anyhow::Result<()> {
    let transaction = connection.transaction()?;
    transaction.execute(
        "INSERT INTO orders (id, item) VALUES (?1, ?2)",
        rusqlite::params![order, item],
    )?;
    let event = OutboxMessage::new(topic, format!("order {order} placed: {item}")).key("shop-1");
    outbox::insert(&transaction, &event)?;
    // Both rows or neither.
    transaction.commit()?;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topic = format!("order-events-{suffix}");
    let relay_name = format!("order-outbox-{suffix}");
    client.admin().create_topic(&topic, 1, &[]).await?;

    let directory = tempfile::tempdir()?;
    let database = directory.path().join("shop.sqlite");
    let mut connection = rusqlite::Connection::open(&database)?;
    connection.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)")?;
    outbox::create_schema(&connection)?;
    for (order, item) in [(1, "kettle"), (2, "teapot"), (3, "mugs")] {
        place_order(&mut connection, &topic, order, item)?;
    }
    println!("placed orders 1-3 (order rows and outbox rows, one transaction each)");

    // The first relay publishes a batch and dies before marking it: dropped, never closed.
    let mut relay = OutboxRelay::builder(&client, &database, &relay_name)
        .build()
        .await?;
    let batch = relay.publish_pending().await?;
    for row in &batch.rows {
        println!(
            "relay published outbox row {} at partition {} offset {}",
            row.id, row.partition, row.offset
        );
    }
    drop(relay);
    println!(
        "relay crashed: {} rows published, not marked",
        batch.rows.len()
    );

    // Meanwhile the shop keeps taking orders.
    for (order, item) in [(4, "spoons"), (5, "sugar bowl")] {
        place_order(&mut connection, &topic, order, item)?;
    }
    println!("placed orders 4-5");

    // The restarted relay reads back the topic before publishing anything.
    let mut relay = OutboxRelay::builder(&client, &database, &relay_name)
        .build()
        .await?;
    let unsent = relay.unsent_count().await?;
    println!(
        "restarted relay read back the topic: {unsent} rows left to publish (orders 1-3 were found there)"
    );
    anyhow::ensure!(
        unsent == 2,
        "the read-back should have marked orders 1-3 sent"
    );
    let mut sent = 0;
    loop {
        let published = relay.relay_once().await?;
        if published == 0 {
            break;
        }
        sent += published;
    }
    relay.close().await?;
    println!("restarted relay published {sent} rows");

    // Read the whole topic: every order once, in order.
    let (end, _) = client
        .admin()
        .list_offset(&topic, 0, OffsetSpec::Latest)
        .await?;
    let mut reader = client.consumer().build().await?;
    reader.assign(&[(topic.clone(), 0)], Seek::Earliest).await?;
    let deadline = deadline_in(30);
    let mut outbox_ids = Vec::new();
    for _ in 0..end {
        let record = next_record(&mut reader, deadline, "the order events").await?;
        println!(
            "topic offset {}: {} ({OUTBOX_ID_HEADER} {})",
            record.offset,
            text(&record),
            header(&record, OUTBOX_ID_HEADER).unwrap_or_default()
        );
        outbox_ids.push(header(&record, OUTBOX_ID_HEADER).unwrap_or_default());
    }
    let expected: Vec<String> = (1..=5).map(|id| format!("{relay_name}:{id}")).collect();
    anyhow::ensure!(outbox_ids == expected, "topic holds {outbox_ids:?}");
    println!("topic holds {end} events: each order once, in order");
    Ok(())
}
