//! Reconnection and the circuit breaker against a real broker that goes away and comes back.

use std::time::{Duration, Instant};

use sluice_client::producer::Record;
use sluice_client::protocol::Response;
use sluice_client::protocol::messages::ListTopicsRequest;
use sluice_client::resilience::{BreakerOptions, BreakerState};
use sluice_client::{Client, ClientOptions, ConnectionOptions, Error};

mod support;

use support::{restart, start_on_a_fixed_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_while_the_broker_is_down_and_closes_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    // The client keeps reconnecting while the broker is down: a port below the ephemeral
    // range, which it can never take as its own source port.
    let broker = start_on_a_fixed_port(dir.path()).await;
    let address = broker.tcp_addr;
    let options = ClientOptions::default()
        .connection(ConnectionOptions::default().connect_timeout(Duration::from_secs(2)))
        .breaker(BreakerOptions {
            failure_threshold: 3,
            // Long enough that the checks right after it opens run while it is open, even on
            // a stalled machine; the reconnection below waits it out.
            open_for: Duration::from_secs(5),
        });
    let client = Client::connect_with(&format!("tcp://{address}"), options)
        .await
        .unwrap();
    client.send(ListTopicsRequest {}).await.unwrap();

    broker.shutdown().await;
    // Failures count up to the threshold; then calls fail fast without touching the network.
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.send(ListTopicsRequest {}).await {
            Err(Error::CircuitOpen { .. }) => break,
            Err(_) => failures += 1,
            Ok(_) => panic!("the broker is down"),
        }
        assert!(
            Instant::now() < deadline,
            "breaker never opened ({failures} failures)"
        );
    }
    assert!(failures >= 3, "opened after {failures} failures");
    assert!(matches!(client.breaker_state(), BreakerState::Open { .. }));
    assert!(matches!(
        client.send(ListTopicsRequest {}).await,
        Err(Error::CircuitOpen { .. })
    ));

    // The broker comes back on the same address; after the cool-down a probe gets through.
    let broker = restart(dir.path(), address).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if client.send(ListTopicsRequest {}).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the client never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.breaker_state(), BreakerState::Closed { failures: 0 });
    // send_with_retry rides out nothing more here, but must succeed at once.
    client.send_with_retry(ListTopicsRequest {}).await.unwrap();
    broker.shutdown().await;
}

/// A producer's answers close the breaker: failures seen once (a broker restart) do not add
/// up over the producer's life until the breaker opens on a healthy connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_answers_reset_the_breakers_failure_count() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_on_a_fixed_port(dir.path()).await;
    let address = broker.tcp_addr;
    let client = Client::connect(&format!("tcp://{address}")).await.unwrap();
    client.admin().create_topic("t", 1, &[]).await.unwrap();
    let producer = client.producer().build().await.unwrap();
    producer.send(Record::new("t", "before")).await.unwrap();

    broker.shutdown().await;
    assert!(client.send(ListTopicsRequest {}).await.is_err());
    assert!(
        matches!(client.breaker_state(), BreakerState::Closed { failures } if failures > 0),
        "{:?}",
        client.breaker_state()
    );
    let broker = restart(dir.path(), address).await;
    producer.send(Record::new("t", "after")).await.unwrap();
    assert_eq!(client.breaker_state(), BreakerState::Closed { failures: 0 });
    producer.close().await.unwrap();
    broker.shutdown().await;
}

/// A broker that takes connections and requests and answers nothing: once timeouts have
/// opened the breaker, calls fail at once with `CircuitOpen` instead of each waiting out the
/// request timeout on the connection that stayed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_stops_calls_on_a_connection_that_stays_up_but_never_answers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let options = ClientOptions::default()
        .connection(ConnectionOptions::default().request_timeout(Duration::from_millis(200)))
        .breaker(BreakerOptions {
            failure_threshold: 2,
            open_for: Duration::from_secs(600),
        });
    let client = Client::connect_with(&format!("tcp://{address}"), options)
        .await
        .unwrap();
    for _ in 0..2 {
        let error = client.send(ListTopicsRequest {}).await.unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    }
    assert!(matches!(client.breaker_state(), BreakerState::Open { .. }));
    // Not another Timeout: the call did not go out on the silent connection.
    let error = client.send(ListTopicsRequest {}).await.unwrap_err();
    assert!(matches!(error, Error::CircuitOpen { .. }), "{error:?}");
}

/// Of a comma-separated list, the first URL that connects is used: a broker down at the head
/// of the list does not make the client fail.
#[tokio::test]
async fn the_first_reachable_url_of_a_list_is_used() {
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(first_dir.path()))
        .await
        .unwrap();
    let second =
        sluice_broker::Broker::start(sluice_broker::Config::on_loopback(second_dir.path()))
            .await
            .unwrap();
    // Only the first reachable broker has this topic: the answer says which one is used.
    first
        .state()
        .topics
        .create("on-the-first", 1, &[], false)
        .unwrap();
    // Nothing listens on port 1.
    let client = Client::connect(&format!(
        "tcp://127.0.0.1:1,tcp://{},tcp://{}",
        first.tcp_addr, second.tcp_addr
    ))
    .await
    .expect("a URL after the dead one connects");
    let Response::ListTopics(topics) = client.send(ListTopicsRequest {}).await.unwrap() else {
        panic!("wrong response")
    };
    let names: Vec<&str> = topics
        .topics
        .iter()
        .map(|topic| topic.name.as_str())
        .collect();
    assert!(names.contains(&"on-the-first"), "{names:?}");
    first.shutdown().await;
    second.shutdown().await;
}

/// A broker that takes connections and drops them before answering (here: it is at
/// `max_connections`, so it answers LimitExceeded and closes) opens the breaker: connecting is
/// not answering, and the client stops reconnecting at once for every call.
#[tokio::test]
async fn a_broker_that_accepts_and_drops_every_connection_opens_the_breaker() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = sluice_broker::Config::on_loopback(dir.path());
    config.limits.max_connections = 1;
    let broker = sluice_broker::Broker::start(config).await.unwrap();
    let url = format!("tcp://{}", broker.tcp_addr);
    // The one slot, held.
    let holder = sluice_client::Connection::connect(&url).await.unwrap();
    holder
        .send(sluice_client::protocol::messages::ApiVersionsRequest {})
        .await
        .unwrap();
    let options = ClientOptions::default().breaker(BreakerOptions {
        failure_threshold: 2,
        open_for: Duration::from_secs(60),
    });
    let client = Client::connect_with(&url, options).await.unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        match client.send(ListTopicsRequest {}).await {
            Err(Error::CircuitOpen { .. }) => break,
            other => outcomes.push(format!("{other:?}")),
        }
    }
    assert!(
        matches!(client.breaker_state(), BreakerState::Open { .. }),
        "never opened: {outcomes:?}"
    );
    assert!(outcomes.len() <= 2, "{outcomes:?}");
    holder.close().await;
    broker.shutdown().await;
}

/// Calls that find the broker gone at once share one reconnection attempt: each waiting for
/// the one in progress takes its outcome, instead of making one more after it (the k-th caller
/// would wait k connect timeouts, far past its request timeout). Over QUIC, where an attempt to
/// a stopped broker lasts the whole connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_reconnection_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let broker = sluice_broker::Broker::start(sluice_broker::Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let quic = broker.quic_addr.expect("QUIC is served");
    let options = ClientOptions::default()
        .connection(
            ConnectionOptions::default()
                .ca_file(sluice_broker::tls::self_signed_certificate_path(dir.path()))
                .connect_timeout(Duration::from_millis(500)),
        )
        .breaker(BreakerOptions {
            failure_threshold: 100,
            open_for: Duration::from_secs(60),
        });
    let client = Client::connect_with(&format!("quic://localhost:{}", quic.port()), options)
        .await
        .unwrap();
    client.send(ListTopicsRequest {}).await.unwrap();
    broker.shutdown().await;
    // The old connection is found closed (the broker closed it on shutdown).
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.connection().await.is_ok() {
        assert!(Instant::now() < deadline, "the connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let BreakerState::Closed { failures: before } = client.breaker_state() else {
        panic!("the breaker opened")
    };
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send(ListTopicsRequest {}).await })
        })
        .collect();
    for call in calls {
        let outcome = call.await.unwrap();
        assert!(matches!(outcome, Err(Error::Connect { .. })), "{outcome:?}");
    }
    let BreakerState::Closed { failures: after } = client.breaker_state() else {
        panic!("the breaker opened")
    };
    // One attempt, two if a call came in just after it ended.
    assert!(
        after - before <= 2,
        "{} attempts for 5 calls",
        after - before
    );
}
