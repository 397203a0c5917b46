//! Orchestrated saga: an order goes through inventory, payment and shipping; when a step
//! fails, the steps already done are undone by their compensations, newest first.
//!
//! ```sh
//! cargo run -p sluice-examples --example saga
//! ```
//!
//! The pattern: no transaction spans three services, so the order is a saga, a sequence of
//! local steps each with a compensating step. An orchestrator sends each service a command
//! on the service's own topic and waits for the reply on a shared replies topic:
//!
//! ```text
//!  orchestrator ──reserve──▶ inventory ──reserved──▶ orchestrator ──charge──▶ payment ──charged──▶
//!  orchestrator ──ship──▶ shipping ──shipped──▶ orchestrator: COMPLETED
//!  payment declined  ─▶ release (inventory)                         ─▶ CANCELLED
//!  shipping failed   ─▶ refund (payment) ─▶ release (inventory)      ─▶ CANCELLED
//! ```
//!
//! Every service and the orchestrator is a consumer group member reading its topic through an
//! `IdempotentConsumer`, so a command or reply delivered twice (at-least-once) is acted on once:
//! each message carries a `message-id` of the form `order:step`. That is not the whole story:
//! a handler whose reply fails to send is run again on the same command, so each service
//! answers a repeated command as it did the first time (same reply, same `message-id`), and
//! the orchestrator acts only on the reply its saga waits for, ignoring late or repeated ones.
//!
//! What to watch: order-1 completes; order-2's card is declined, so its inventory reservation
//! is released; order-3 cannot be shipped, so its payment is refunded and then its inventory
//! released. The last lines show each order's status and the services' final state: nothing
//! stays reserved or charged for a cancelled order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sluice_client::idempotent::{
    BoxError, IdempotentConsumer, InMemoryDedupStore, MESSAGE_ID_HEADER,
};
use sluice_client::producer::{Producer, Record};
use sluice_client::{Client, CommitMode, ConsumerRecord};
use sluice_examples::{deadline_in, text, unique_suffix};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The order to run through the saga.
#[derive(Clone, Debug)]
struct Order {
    id: &'static str,
    quantity: u32,
    amount_cents: u64,
    address: &'static str,
}

const ORDERS: [Order; 3] = [
    Order {
        id: "order-1",
        quantity: 2,
        amount_cents: 2_500,
        address: "12 Main St",
    },
    // Over the card limit: payment fails.
    Order {
        id: "order-2",
        quantity: 1,
        amount_cents: 500_000,
        address: "3 Elm St",
    },
    // No route to the address: shipping fails.
    Order {
        id: "order-3",
        quantity: 4,
        amount_cents: 800,
        address: "nowhere",
    },
];

/// The topics, unique per run.
#[derive(Clone, Debug)]
struct Topics {
    inventory: String,
    payment: String,
    shipping: String,
    replies: String,
}

impl Topics {
    fn of_service(&self, service: &str) -> &str {
        match service {
            "inventory" => &self.inventory,
            "payment" => &self.payment,
            _ => &self.shipping,
        }
    }
}

/// Sends `text` to `topic`, keyed by the order (one order's messages stay in order) and named
/// `order:step` so a redelivery is recognised.
async fn send(
    producer: &Producer,
    topic: &str,
    order: &str,
    step: &str,
    text: String,
) -> Result<(), BoxError> {
    let record = Record::new(topic, text)
        .key(order.to_owned())
        .header(MESSAGE_ID_HEADER, format!("{order}:{step}"));
    producer.send(record).await?;
    Ok(())
}

/// Inventory: reservations per order, out of a fixed stock.
#[derive(Debug, Default)]
struct Inventory {
    reserved: BTreeMap<String, u32>,
}

fn inventory_service(command: &[&str], inventory: &mut Inventory) -> (String, String) {
    const STOCK: u32 = 10;
    match command {
        ["reserve", order, quantity] => {
            // Already reserved: this is the same command run again (its reply failed to
            // send). Answering from the stock would count the order's own reservation against
            // it and say "out-of-stock" while keeping the reservation.
            if let Some(held) = inventory.reserved.get(*order) {
                return (
                    "reserved".into(),
                    format!("inventory reserved {order} {held}"),
                );
            }
            let quantity: u32 = quantity.parse().unwrap_or(u32::MAX);
            let taken: u32 = inventory.reserved.values().sum();
            if taken + quantity <= STOCK {
                inventory.reserved.insert((*order).to_owned(), quantity);
                (
                    "reserved".into(),
                    format!("inventory reserved {order} {quantity}"),
                )
            } else {
                (
                    "out-of-stock".into(),
                    format!("inventory out-of-stock {order}"),
                )
            }
        }
        ["release", order] => {
            inventory.reserved.remove(*order);
            ("released".into(), format!("inventory released {order}"))
        }
        other => (
            "unknown".into(),
            format!("inventory unknown {}", other.join(" ")),
        ),
    }
}

/// Payment: charges per order, in cents.
#[derive(Debug, Default)]
struct Payments {
    charged: BTreeMap<String, u64>,
}

fn payment_service(command: &[&str], payments: &mut Payments) -> (String, String) {
    const CARD_LIMIT_CENTS: u64 = 100_000;
    match command {
        ["charge", order, amount] => {
            let amount: u64 = amount.parse().unwrap_or(u64::MAX);
            if amount <= CARD_LIMIT_CENTS {
                payments.charged.insert((*order).to_owned(), amount);
                (
                    "charged".into(),
                    format!("payment charged {order} {amount}"),
                )
            } else {
                (
                    "declined".into(),
                    format!("payment declined {order} card-limit"),
                )
            }
        }
        ["refund", order] => {
            payments.charged.remove(*order);
            ("refunded".into(), format!("payment refunded {order}"))
        }
        other => (
            "unknown".into(),
            format!("payment unknown {}", other.join(" ")),
        ),
    }
}

/// Shipping: shipments per order.
#[derive(Debug, Default)]
struct Shipping {
    shipments: BTreeMap<String, String>,
}

fn shipping_service(command: &[&str], shipping: &mut Shipping) -> (String, String) {
    match command {
        ["ship", order, address @ ..] => {
            let address = address.join(" ");
            if address == "nowhere" {
                ("failed".into(), format!("shipping failed {order} no-route"))
            } else {
                shipping.shipments.insert((*order).to_owned(), address);
                ("shipped".into(), format!("shipping shipped {order}"))
            }
        }
        other => (
            "unknown".into(),
            format!("shipping unknown {}", other.join(" ")),
        ),
    }
}

/// Runs a service: reads commands from `topic` as a group member, applies each once with
/// `apply`, and sends the reply.
///
/// `apply` changes the state before the reply is sent; when the send fails, the handler
/// fails and the same command is applied again. So `apply` must answer a command it already
/// applied as it did the first time, without applying it twice.
#[allow(clippy::too_many_arguments)]
async fn start_service<S: Send + 'static>(
    client: &Client,
    name: &'static str,
    topic: &str,
    replies: &str,
    suffix: &str,
    producer: &Producer,
    state: Arc<Mutex<S>>,
    apply: fn(&[&str], &mut S) -> (String, String),
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let consumer = client
        .consumer()
        .group(format!("saga-{name}-service-{suffix}"))
        .topics([topic])
        .commit_mode(CommitMode::Manual)
        .build()
        .await?;
    let mut commands = IdempotentConsumer::new(consumer, InMemoryDedupStore::new());
    let producer = producer.clone();
    let replies = replies.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            let (producer, replies, state) =
                (producer.clone(), replies.clone(), Arc::clone(&state));
            let handler = move |record: ConsumerRecord| async move {
                let command = text(&record);
                let words: Vec<&str> = command.split(' ').collect();
                let order = words.get(1).copied().unwrap_or_default().to_owned();
                let (step, reply) = apply(&words, &mut state.lock().expect("service state lock"));
                println!("  {name:<9} {command:<28} -> {reply}");
                send(
                    &producer,
                    &replies,
                    &order,
                    &format!("{name}-{step}"),
                    reply,
                )
                .await
            };
            tokio::select! {
                _ = stop.changed() => break,
                handled = commands.process_next(handler) => match handled {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(error) => eprintln!("{name}: {error}"),
                },
            }
        }
        if let Err(error) = commands.close().await {
            eprintln!("{name}: close failed: {error}");
        }
    }))
}

/// A command the orchestrator sends, whose reply a saga waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Reserve,
    Charge,
    Ship,
    Refund,
    Release,
}

/// Where one order's saga stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SagaState {
    /// Waiting for the reply to `awaiting`.
    Running {
        awaiting: Step,
    },
    Completed,
    /// Failed at a step; undoing the steps done, waiting for the reply to `awaiting`.
    Compensating {
        reason: String,
        awaiting: Step,
    },
    Cancelled {
        reason: String,
    },
}

impl SagaState {
    /// A saga whose first command, the reservation, was sent.
    const STARTED: SagaState = SagaState::Running {
        awaiting: Step::Reserve,
    };
}

/// What the orchestrator does with a reply: the next command to send, if any.
///
/// Only the reply the saga waits for moves it; any other is ignored. Replies come late or
/// twice (a service whose reply failed to send answers again), and acting on one regardless
/// of the state would, say, charge an order that was cancelled meanwhile.
fn next_step(
    order: &Order,
    reply: &[&str],
    state: &mut SagaState,
    compensations: &mut Vec<String>,
) -> Option<(&'static str, String)> {
    use SagaState::{Cancelled, Compensating, Completed, Running};
    let id = order.id;
    match (&*state, reply) {
        (
            Running {
                awaiting: Step::Reserve,
            },
            ["inventory", "reserved", ..],
        ) => {
            *state = Running {
                awaiting: Step::Charge,
            };
            Some(("payment", format!("charge {id} {}", order.amount_cents)))
        }
        (
            Running {
                awaiting: Step::Reserve,
            },
            ["inventory", "out-of-stock", ..],
        ) => {
            *state = Cancelled {
                reason: "out of stock".into(),
            };
            None
        }
        (
            Running {
                awaiting: Step::Charge,
            },
            ["payment", "charged", ..],
        ) => {
            *state = Running {
                awaiting: Step::Ship,
            };
            Some(("shipping", format!("ship {id} {}", order.address)))
        }
        (
            Running {
                awaiting: Step::Charge,
            },
            ["payment", "declined", _, reason],
        ) => {
            *state = Compensating {
                reason: format!("payment declined ({reason})"),
                awaiting: Step::Release,
            };
            compensations.push("release inventory".into());
            Some(("inventory", format!("release {id}")))
        }
        (
            Running {
                awaiting: Step::Ship,
            },
            ["shipping", "shipped", ..],
        ) => {
            *state = Completed;
            None
        }
        (
            Running {
                awaiting: Step::Ship,
            },
            ["shipping", "failed", _, reason],
        ) => {
            *state = Compensating {
                reason: format!("shipping failed ({reason})"),
                awaiting: Step::Refund,
            };
            compensations.push("refund payment".into());
            Some(("payment", format!("refund {id}")))
        }
        (
            Compensating {
                reason,
                awaiting: Step::Refund,
            },
            ["payment", "refunded", ..],
        ) => {
            *state = Compensating {
                reason: reason.clone(),
                awaiting: Step::Release,
            };
            compensations.push("release inventory".into());
            Some(("inventory", format!("release {id}")))
        }
        (
            Compensating {
                reason,
                awaiting: Step::Release,
            },
            ["inventory", "released", ..],
        ) => {
            *state = Cancelled {
                reason: reason.clone(),
            };
            None
        }
        _ => None,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_examples::finish(scenario()).await
}

async fn scenario() -> anyhow::Result<()> {
    let client = sluice_examples::connect().await?;
    let suffix = unique_suffix();
    let topics = Topics {
        inventory: format!("saga-inventory-{suffix}"),
        payment: format!("saga-payment-{suffix}"),
        shipping: format!("saga-shipping-{suffix}"),
        replies: format!("saga-replies-{suffix}"),
    };
    for topic in [
        &topics.inventory,
        &topics.payment,
        &topics.shipping,
        &topics.replies,
    ] {
        client.admin().create_topic(topic, 2, &[]).await?;
    }
    let producer = client.producer().build().await?;
    let (stop, stop_receiver) = watch::channel(false);

    let inventory = Arc::new(Mutex::new(Inventory::default()));
    let payments = Arc::new(Mutex::new(Payments::default()));
    let shipping = Arc::new(Mutex::new(Shipping::default()));
    let services = vec![
        start_service(
            &client,
            "inventory",
            &topics.inventory,
            &topics.replies,
            &suffix,
            &producer,
            Arc::clone(&inventory),
            inventory_service,
            stop_receiver.clone(),
        )
        .await?,
        start_service(
            &client,
            "payment",
            &topics.payment,
            &topics.replies,
            &suffix,
            &producer,
            Arc::clone(&payments),
            payment_service,
            stop_receiver.clone(),
        )
        .await?,
        start_service(
            &client,
            "shipping",
            &topics.shipping,
            &topics.replies,
            &suffix,
            &producer,
            Arc::clone(&shipping),
            shipping_service,
            stop_receiver.clone(),
        )
        .await?,
    ];

    // The orchestrator: starts each saga, then drives it from the replies.
    let consumer = client
        .consumer()
        .group(format!("saga-orchestrator-{suffix}"))
        .topics([&topics.replies])
        .commit_mode(CommitMode::Manual)
        .build()
        .await?;
    let mut replies = IdempotentConsumer::new(consumer, InMemoryDedupStore::new());
    let mut sagas: BTreeMap<&str, (SagaState, Vec<String>)> = BTreeMap::new();
    for order in &ORDERS {
        println!(
            "orchestrator starts the saga of {} ({} items, {} cents, to {})",
            order.id, order.quantity, order.amount_cents, order.address
        );
        sagas.insert(order.id, (SagaState::STARTED, Vec::new()));
        send(
            &producer,
            &topics.inventory,
            order.id,
            "reserve",
            format!("reserve {} {}", order.id, order.quantity),
        )
        .await
        .map_err(|error| anyhow::anyhow!(error))?;
    }
    let deadline = deadline_in(60);
    while sagas.values().any(|(state, _)| {
        matches!(
            state,
            SagaState::Running { .. } | SagaState::Compensating { .. }
        )
    }) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (producer, topics, sagas) = (&producer, &topics, &mut sagas);
        let handler = move |record: ConsumerRecord| async move {
            let reply = text(&record);
            let words: Vec<&str> = reply.split(' ').collect();
            let order = ORDERS
                .iter()
                .find(|order| words.get(2) == Some(&order.id))
                .ok_or("a reply for an unknown order")?;
            let (state, compensations) =
                sagas.get_mut(order.id).ok_or("an order without a saga")?;
            // Worked out on copies, kept once the command is sent: when the send fails, the
            // reply is handed over again and must find the saga still waiting for it.
            let (mut next_state, mut next_compensations) = (state.clone(), compensations.clone());
            if let Some((service, command)) =
                next_step(order, &words, &mut next_state, &mut next_compensations)
            {
                let step = command.split(' ').next().unwrap_or_default().to_owned();
                send(
                    producer,
                    topics.of_service(service),
                    order.id,
                    &step,
                    command,
                )
                .await?;
            }
            *state = next_state;
            *compensations = next_compensations;
            Ok::<(), BoxError>(())
        };
        let handled = tokio::time::timeout(left, replies.process_next(handler)).await;
        handled.map_err(|_| anyhow::anyhow!("the sagas did not finish in time"))??;
    }
    replies.close().await?;
    stop.send(true)?;
    for service in services {
        service.await?;
    }
    producer.close().await?;

    println!();
    for (order, (state, compensations)) in &sagas {
        match state {
            SagaState::Completed => println!("{order}: COMPLETED"),
            SagaState::Cancelled { reason } => {
                println!(
                    "{order}: CANCELLED, {reason}; compensations run: {}",
                    compensations.join(", ")
                )
            }
            other => println!("{order}: {other:?}"),
        }
    }
    let inventory = inventory.lock().expect("inventory lock");
    let payments = payments.lock().expect("payments lock");
    let shipping = shipping.lock().expect("shipping lock");
    println!("inventory reserved: {:?}", inventory.reserved);
    println!("payments charged:   {:?}", payments.charged);
    println!("shipments:          {:?}", shipping.shipments);
    anyhow::ensure!(
        sagas["order-1"].0 == SagaState::Completed,
        "order-1 should complete"
    );
    anyhow::ensure!(
        sagas["order-2"].1 == ["release inventory"],
        "order-2 should release its inventory"
    );
    anyhow::ensure!(
        sagas["order-3"].1 == ["refund payment", "release inventory"],
        "order-3 should refund, then release"
    );
    anyhow::ensure!(
        inventory.reserved.keys().eq(["order-1"]),
        "only order-1 keeps its reservation"
    );
    anyhow::ensure!(
        payments.charged.keys().eq(["order-1"]),
        "only order-1 stays charged"
    );
    anyhow::ensure!(
        shipping.shipments.keys().eq(["order-1"]),
        "only order-1 ships"
    );
    println!("saga done: 1 completed, 2 cancelled and compensated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands `reply` to the orchestrator; returns the command it sends, as `service: command`.
    fn on_reply(
        order: &Order,
        reply: &str,
        state: &mut SagaState,
        compensations: &mut Vec<String>,
    ) -> Option<String> {
        let words: Vec<&str> = reply.split(' ').collect();
        next_step(order, &words, state, compensations)
            .map(|(service, command)| format!("{service}: {command}"))
    }

    #[test]
    fn a_repeated_reserve_answers_as_the_first_did_and_reserves_once() {
        let mut inventory = Inventory::default();
        let first = inventory_service(&["reserve", "order-1", "8"], &mut inventory);
        assert_eq!(
            first,
            (
                "reserved".to_owned(),
                "inventory reserved order-1 8".to_owned()
            )
        );
        // The reply failed to send: the same command is applied again. The same step gives
        // the reply the same message id, so the orchestrator takes it once.
        let repeat = inventory_service(&["reserve", "order-1", "8"], &mut inventory);
        assert_eq!(repeat, first);
        assert_eq!(
            inventory.reserved,
            BTreeMap::from([("order-1".to_owned(), 8)])
        );
        // Other orders still see the stock order-1 holds.
        let over = inventory_service(&["reserve", "order-2", "3"], &mut inventory);
        assert_eq!(over.0, "out-of-stock");
        let fits = inventory_service(&["reserve", "order-2", "2"], &mut inventory);
        assert_eq!(fits.0, "reserved");
        assert_eq!(inventory.reserved.values().sum::<u32>(), 10);
    }

    #[test]
    fn a_late_reserved_reply_does_not_charge_a_cancelled_order() {
        let order = &ORDERS[1];
        let (mut state, mut compensations) = (SagaState::STARTED, Vec::new());
        assert_eq!(
            on_reply(
                order,
                "inventory reserved order-2 1",
                &mut state,
                &mut compensations
            ),
            Some("payment: charge order-2 500000".to_owned())
        );
        assert_eq!(
            on_reply(
                order,
                "payment declined order-2 card-limit",
                &mut state,
                &mut compensations
            ),
            Some("inventory: release order-2".to_owned())
        );
        assert_eq!(
            on_reply(
                order,
                "inventory released order-2",
                &mut state,
                &mut compensations
            ),
            None
        );
        let cancelled = SagaState::Cancelled {
            reason: "payment declined (card-limit)".into(),
        };
        assert_eq!(state, cancelled);
        for late in [
            "inventory reserved order-2 1",
            "payment charged order-2 500000",
            "shipping shipped order-2",
        ] {
            assert_eq!(
                on_reply(order, late, &mut state, &mut compensations),
                None,
                "{late}"
            );
        }
        assert_eq!(state, cancelled);
        assert_eq!(compensations, ["release inventory"]);
    }

    #[test]
    fn replies_out_of_turn_move_a_running_saga_nowhere() {
        let order = &ORDERS[0];
        let (mut state, mut compensations) = (SagaState::STARTED, Vec::new());
        // Not what the saga waits for: ignored.
        for early in ["payment charged order-1 2500", "shipping shipped order-1"] {
            assert_eq!(on_reply(order, early, &mut state, &mut compensations), None);
            assert_eq!(state, SagaState::STARTED, "{early}");
        }
        assert_eq!(
            on_reply(
                order,
                "inventory reserved order-1 2",
                &mut state,
                &mut compensations
            ),
            Some("payment: charge order-1 2500".to_owned())
        );
        // The same reply again (answered twice under another message id, say): charged once.
        assert_eq!(
            on_reply(
                order,
                "inventory reserved order-1 2",
                &mut state,
                &mut compensations
            ),
            None
        );
        assert_eq!(
            on_reply(
                order,
                "payment charged order-1 2500",
                &mut state,
                &mut compensations
            ),
            Some("shipping: ship order-1 12 Main St".to_owned())
        );
        assert_eq!(
            on_reply(
                order,
                "shipping shipped order-1",
                &mut state,
                &mut compensations
            ),
            None
        );
        assert_eq!(state, SagaState::Completed);
        assert_eq!(
            on_reply(
                order,
                "shipping failed order-1 no-route",
                &mut state,
                &mut compensations
            ),
            None,
            "a completed saga is not compensated"
        );
        assert_eq!(state, SagaState::Completed);
        assert!(compensations.is_empty());
    }

    #[test]
    fn a_failed_shipment_refunds_then_releases_once_each() {
        let order = &ORDERS[2];
        let (mut state, mut compensations) = (SagaState::STARTED, Vec::new());
        for (reply, command) in [
            (
                "inventory reserved order-3 4",
                Some("payment: charge order-3 800"),
            ),
            (
                "payment charged order-3 800",
                Some("shipping: ship order-3 nowhere"),
            ),
            (
                "shipping failed order-3 no-route",
                Some("payment: refund order-3"),
            ),
            (
                "payment refunded order-3",
                Some("inventory: release order-3"),
            ),
            // Refunded again while the release is awaited: not a second release.
            ("payment refunded order-3", None),
            ("inventory released order-3", None),
        ] {
            assert_eq!(
                on_reply(order, reply, &mut state, &mut compensations).as_deref(),
                command,
                "{reply}"
            );
        }
        assert_eq!(
            state,
            SagaState::Cancelled {
                reason: "shipping failed (no-route)".into()
            }
        );
        assert_eq!(compensations, ["refund payment", "release inventory"]);
    }
}
