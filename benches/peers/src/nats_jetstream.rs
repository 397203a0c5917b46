//! The workloads on NATS JetStream, through async-nats.
//!
//! ```text
//! publisher ─publish(peerbench.data)─▶ nats-server ─▶ stream PEERBENCH (file storage, 1 replica)
//!     │ PublishAckFuture ─bounded channel (--batch)─▶ acker task: awaits acks in order
//! pull consumer (ack policy none, deliver all) ◀─ pulls of --batch messages, kept ahead
//! ```
//!
//! Choices, so the numbers can be read right:
//! - The stream uses file storage, the JetStream default and the only persistent one; how
//!   often the server fsyncs is the server's configuration (`sync_interval`), not the client's.
//! - At most `--batch` (plus one) publish acknowledgements are outstanding: the publisher
//!   hands each ack future to a bounded channel whose other end awaits them in order, which is
//!   the order the server acknowledges in.
//! - The pull consumer acknowledges nothing (`AckPolicy::None`), the fastest way to read a
//!   stream; its pulls ask for `--batch` messages and are renewed before they run out.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::Settings;
use crate::measure::{DrainWatch, Latencies, LatencyKind, Outcome, Payloads};

/// The benchmark's stream, deleted and created afresh by each run.
const STREAM_NAME: &str = "PEERBENCH";
/// The subject the stream captures.
const SUBJECT: &str = "peerbench.data";
/// How long a read may wait for the next message before the run is declared stuck.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// A connection and its JetStream context.
struct Connection {
    context: jetstream::Context,
    server: String,
}

async fn connect(settings: &Settings) -> Result<Connection> {
    let client = async_nats::connect(settings.url.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", settings.url))?;
    let server = format!("nats-server {}", client.server_info().version);
    // Room for the publisher's window plus the acker's: the window is what bounds publishing,
    // not the context.
    let context = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_ack_inflight(settings.batch.saturating_mul(2).saturating_add(16))
        .backpressure_on_inflight(true)
        .build(client);
    Ok(Connection { context, server })
}

/// Deletes the benchmark stream if a previous run left it, and creates it empty.
async fn fresh_stream(context: &jetstream::Context) -> Result<stream::Stream> {
    // Not found is the usual answer; any other failure shows up when creating.
    let _ = context.delete_stream(STREAM_NAME).await;
    context
        .create_stream(stream::Config {
            name: STREAM_NAME.to_owned(),
            subjects: vec![SUBJECT.to_owned()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|error| anyhow!("cannot create stream {STREAM_NAME}: {error}"))
}

async fn delete_stream(context: &jetstream::Context) -> Result<()> {
    context
        .delete_stream(STREAM_NAME)
        .await
        .map_err(|error| anyhow!("cannot delete stream {STREAM_NAME}: {error}"))?;
    Ok(())
}

/// A pull consumer reading the stream from its first message, acknowledging nothing.
async fn reader(stream: &stream::Stream, settings: &Settings) -> Result<consumer::pull::Stream> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|error| anyhow!("cannot create a pull consumer: {error}"))?;
    consumer
        .stream()
        .max_messages_per_batch(settings.batch)
        .messages()
        .await
        .map_err(|error| anyhow!("cannot start pulling: {error}"))
}

/// Publishes `settings.messages` messages as fast as `settings.batch` outstanding
/// acknowledgements allow; returns send→ack latencies.
async fn publish_all(
    context: &jetstream::Context,
    settings: &Settings,
    payloads: Payloads,
) -> Result<Latencies> {
    let (acks, mut pending) = mpsc::channel::<(Instant, PublishAckFuture)>(settings.batch);
    let acker = tokio::spawn(async move {
        let mut latencies = Latencies::new();
        while let Some((sent_at, ack)) = pending.recv().await {
            ack.await
                .map_err(|error| anyhow!("a publish was not acknowledged: {error}"))?;
            latencies.record(sent_at, Instant::now(), 1);
        }
        Ok::<_, anyhow::Error>(latencies)
    });
    for _ in 0..settings.messages {
        let sent_at = Instant::now();
        let ack = context
            .publish(SUBJECT, payloads.stamped(sent_at))
            .await
            .map_err(|error| anyhow!("cannot publish: {error}"))?;
        if acks.send((sent_at, ack)).await.is_err() {
            // The acker stopped on an error, which its result carries.
            break;
        }
    }
    drop(acks);
    acker.await.context("the ack task failed")?
}

pub async fn produce(settings: &Settings) -> Result<Outcome> {
    let connection = connect(settings).await?;
    fresh_stream(&connection.context).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    let start = Instant::now();
    let latencies = publish_all(&connection.context, settings, payloads).await?;
    let elapsed = start.elapsed();
    delete_stream(&connection.context).await?;
    Ok(Outcome {
        messages: settings.messages,
        elapsed,
        latency: latencies
            .summary()
            .map(|summary| (LatencyKind::SendToAck, summary)),
        server: connection.server,
    })
}

pub async fn consume(settings: &Settings) -> Result<Outcome> {
    let connection = connect(settings).await?;
    let stream = fresh_stream(&connection.context).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    publish_all(&connection.context, settings, payloads)
        .await
        .context("cannot fill the stream")?;

    // Creating the consumer is part of reading a backlog, as joining the group is for
    // sluice-bench's consume.
    let start = Instant::now();
    let mut messages = reader(&stream, settings).await?;
    let mut received = 0u64;
    while received < settings.messages {
        let message = next_message(&mut messages, received, settings.messages).await?;
        if message.payload.len() != settings.message_size_bytes {
            bail!(
                "message {received} has {} bytes, {} were sent",
                message.payload.len(),
                settings.message_size_bytes
            );
        }
        received += 1;
    }
    let elapsed = start.elapsed();
    drop(messages);
    delete_stream(&connection.context).await?;
    Ok(Outcome {
        messages: received,
        elapsed,
        latency: None,
        server: connection.server,
    })
}

/// The next message of a pull consumer, or an error naming how far the read got.
async fn next_message(
    messages: &mut consumer::pull::Stream,
    received: u64,
    expected: u64,
) -> Result<jetstream::Message> {
    match tokio::time::timeout(STALL_LIMIT, messages.next()).await {
        Ok(Some(Ok(message))) => Ok(message),
        Ok(Some(Err(error))) => bail!("pulling failed after {received} of {expected}: {error}"),
        Ok(None) => bail!("the pull consumer ended after {received} of {expected}"),
        Err(_) => bail!(
            "no message for {} s after {received} of {expected}",
            STALL_LIMIT.as_secs()
        ),
    }
}

pub async fn latency(settings: &Settings) -> Result<Outcome> {
    let connection = connect(settings).await?;
    let stream = fresh_stream(&connection.context).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    let mut messages = reader(&stream, settings).await?;
    let (sent_sender, mut drain) = DrainWatch::new();

    // The tailing reader: produce→consume latency of every message.
    let tail = tokio::spawn(async move {
        let mut latencies = Latencies::new();
        let mut received = 0u64;
        while !drain.is_done(received)? {
            // A short wait, so the end of the run is noticed soon after the last message.
            let Ok(next) = tokio::time::timeout(Duration::from_millis(100), messages.next()).await
            else {
                continue;
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => bail!("pulling failed after {received}: {error}"),
                None => bail!("the pull consumer ended after {received}"),
            };
            let read_at = Instant::now();
            let sent_at = payloads
                .sent_at(&message.payload)
                .ok_or_else(|| anyhow!("message {received} is too short to carry a send time"))?;
            latencies.record(sent_at, read_at, 1);
            received += 1;
        }
        Ok::<_, anyhow::Error>((received, latencies))
    });

    // The acker: every publish must be acknowledged, though only produce→consume is reported.
    let (acks, mut pending) = mpsc::channel::<PublishAckFuture>(settings.batch);
    let acker = tokio::spawn(async move {
        while let Some(ack) = pending.recv().await {
            ack.await
                .map_err(|error| anyhow!("a publish was not acknowledged: {error}"))?;
        }
        Ok::<_, anyhow::Error>(())
    });

    // The paced publisher, on a thread of its own (see measure::run_paced).
    let runtime = tokio::runtime::Handle::current();
    let context = connection.context.clone();
    let (rate, duration) = (settings.rate_per_second, settings.duration);
    let start = Instant::now();
    let publisher = tokio::task::spawn_blocking(move || {
        crate::measure::run_paced(rate, duration, |now| {
            let ack = runtime
                .block_on(context.publish(SUBJECT, payloads.stamped(now)))
                .map_err(|error| anyhow!("cannot publish: {error}"))?;
            acks.blocking_send(ack)
                .map_err(|_| anyhow!("the ack task stopped"))
        })
    });
    let sent = match publisher.await.context("the publisher failed")? {
        Ok(sent) => sent,
        // The acker's error, when there is one, says why publishing stopped.
        Err(error) => {
            return Err(acker
                .await
                .context("the ack task failed")?
                .err()
                .unwrap_or(error));
        }
    };
    let elapsed = start.elapsed();
    let _ = sent_sender.send(Some(sent));
    acker.await.context("the ack task failed")??;
    let (received, latencies) = tail.await.context("the reader failed")??;
    delete_stream(&connection.context).await?;
    Ok(Outcome {
        messages: received,
        elapsed,
        latency: latencies
            .summary()
            .map(|summary| (LatencyKind::ProduceToConsume, summary)),
        server: connection.server,
    })
}
