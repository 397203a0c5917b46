//! The workloads on a Redis stream, through the redis crate's multiplexed connection.
//!
//! ```text
//! producer ─pipeline of --batch × XADD peerbench * d <payload>─▶ redis-server (AOF per its config)
//! reader   ─XREAD COUNT --batch [BLOCK 100] STREAMS peerbench <last id>─▶ entries after last id
//! ```
//!
//! Choices, so the numbers can be read right:
//! - `produce` sends one pipeline of `--batch` XADDs and waits for its replies before the
//!   next: `--batch` acknowledgements outstanding, one round trip per batch. Send→ack latency
//!   of every entry in a pipeline runs from sending the pipeline to its last reply.
//! - Redis replies to a write only after it has been appended to the AOF buffer; with
//!   `appendfsync always` it fsyncs before replying, once per event-loop pass, so a pipeline
//!   shares one fsync (group commit), as Sluice's durable acks do.
//! - `latency` paces messages on a thread of its own into a channel; a sender task sends
//!   whatever has gathered (at most `--batch`) as one pipeline, waits for the replies, repeats.
//!   The reader has a connection of its own, since XREAD BLOCK holds its connection.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use crate::Settings;
use crate::measure::{DrainWatch, Latencies, LatencyKind, Outcome, Payloads};

/// The benchmark's stream key, deleted before and after each run.
const STREAM_KEY: &str = "peerbench";
/// The one field of each entry, holding the payload.
const FIELD: &str = "d";
/// How long one command or pipeline may take before the run fails.
const RESPONSE_LIMIT: Duration = Duration::from_secs(30);
/// How long the tailing reader's XREAD waits for new entries, in milliseconds.
const BLOCK_MS: u64 = 100;
/// Messages the paced producer may get ahead of the sender task.
const PACED_QUEUE_MESSAGES: usize = 100_000;

async fn connect(settings: &Settings) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(settings.url.as_str())
        .with_context(|| format!("bad Redis URL {}", settings.url))?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_LIMIT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("cannot connect to {}", settings.url))
}

/// The server's name and version, from INFO server.
async fn server_version(connection: &mut MultiplexedConnection) -> Result<String> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await
        .context("INFO server failed")?;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim();
    Ok(format!("redis-server {version}"))
}

async fn delete_stream(connection: &mut MultiplexedConnection) -> Result<()> {
    redis::cmd("DEL")
        .arg(STREAM_KEY)
        .query_async::<()>(connection)
        .await
        .with_context(|| format!("cannot delete {STREAM_KEY}"))
}

/// Sends `payloads` as one pipeline of XADDs and waits for every reply.
async fn add_pipelined(
    connection: &mut MultiplexedConnection,
    payloads: impl IntoIterator<Item = Bytes>,
) -> Result<()> {
    let mut pipeline = redis::pipe();
    for payload in payloads {
        pipeline
            .cmd("XADD")
            .arg(STREAM_KEY)
            .arg("*")
            .arg(FIELD)
            .arg(payload.as_ref())
            .ignore();
    }
    pipeline
        .query_async::<()>(connection)
        .await
        .context("XADD pipeline failed")
}

/// Adds `settings.messages` entries in pipelines of `settings.batch`; returns send→ack
/// latencies.
async fn add_all(
    connection: &mut MultiplexedConnection,
    settings: &Settings,
    payloads: Payloads,
) -> Result<Latencies> {
    let mut latencies = Latencies::new();
    let mut left = settings.messages;
    while left > 0 {
        let count = left.min(settings.batch as u64);
        let sent_at = Instant::now();
        add_pipelined(connection, (0..count).map(|_| payloads.stamped(sent_at))).await?;
        latencies.record(sent_at, Instant::now(), count);
        left -= count;
    }
    Ok(latencies)
}

pub async fn produce(settings: &Settings) -> Result<Outcome> {
    let mut connection = connect(settings).await?;
    let server = server_version(&mut connection).await?;
    delete_stream(&mut connection).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    let start = Instant::now();
    let latencies = add_all(&mut connection, settings, payloads).await?;
    let elapsed = start.elapsed();
    delete_stream(&mut connection).await?;
    Ok(Outcome {
        messages: settings.messages,
        elapsed,
        latency: latencies
            .summary()
            .map(|summary| (LatencyKind::SendToAck, summary)),
        server,
    })
}

pub async fn consume(settings: &Settings) -> Result<Outcome> {
    let mut connection = connect(settings).await?;
    let server = server_version(&mut connection).await?;
    delete_stream(&mut connection).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    add_all(&mut connection, settings, payloads)
        .await
        .context("cannot fill the stream")?;

    let start = Instant::now();
    let mut last_id = b"0-0".to_vec();
    let mut received = 0u64;
    while received < settings.messages {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(settings.batch)
            .arg("STREAMS")
            .arg(STREAM_KEY)
            .arg(&last_id)
            .query_async(&mut connection)
            .await
            .with_context(|| format!("XREAD failed after {received} entries"))?;
        let before = received;
        for_each_entry(&reply, |id, payload| {
            if payload.len() != settings.message_size_bytes {
                bail!(
                    "entry {received} has {} bytes, {} were sent",
                    payload.len(),
                    settings.message_size_bytes
                );
            }
            last_id.clear();
            last_id.extend_from_slice(id);
            received += 1;
            Ok(())
        })?;
        if received == before {
            bail!(
                "the stream ended after {received} of {} entries",
                settings.messages
            );
        }
    }
    let elapsed = start.elapsed();
    delete_stream(&mut connection).await?;
    Ok(Outcome {
        messages: received,
        elapsed,
        latency: None,
        server,
    })
}

pub async fn latency(settings: &Settings) -> Result<Outcome> {
    let mut connection = connect(settings).await?;
    let server = server_version(&mut connection).await?;
    delete_stream(&mut connection).await?;
    let payloads = Payloads::new(settings.message_size_bytes);
    let (sent_sender, mut drain) = DrainWatch::new();

    // The tailing reader, on a connection of its own (XREAD BLOCK holds it).
    let mut reader_connection = connect(settings).await?;
    let batch = settings.batch;
    let tail = tokio::spawn(async move {
        let mut latencies = Latencies::new();
        let mut last_id = b"0-0".to_vec();
        let mut received = 0u64;
        while !drain.is_done(received)? {
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(batch)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(STREAM_KEY)
                .arg(&last_id)
                .query_async(&mut reader_connection)
                .await
                .with_context(|| format!("XREAD failed after {received} entries"))?;
            let read_at = Instant::now();
            for_each_entry(&reply, |id, payload| {
                let sent_at = payloads
                    .sent_at(payload)
                    .ok_or_else(|| anyhow!("entry {received} is too short to carry a send time"))?;
                latencies.record(sent_at, read_at, 1);
                last_id.clear();
                last_id.extend_from_slice(id);
                received += 1;
                Ok(())
            })?;
        }
        Ok::<_, anyhow::Error>((received, latencies))
    });

    // The sender task: whatever the paced thread has queued, as one pipeline per round trip.
    let (queue, mut queued) = mpsc::channel::<Bytes>(PACED_QUEUE_MESSAGES);
    let sender = tokio::spawn(async move {
        let mut pipeline_payloads = Vec::with_capacity(batch);
        while let Some(first) = queued.recv().await {
            pipeline_payloads.push(first);
            while pipeline_payloads.len() < batch {
                match queued.try_recv() {
                    Ok(payload) => pipeline_payloads.push(payload),
                    Err(_) => break,
                }
            }
            add_pipelined(&mut connection, pipeline_payloads.drain(..)).await?;
        }
        Ok::<_, anyhow::Error>(connection)
    });

    // The paced producer, on a thread of its own (see measure::run_paced).
    let (rate, duration) = (settings.rate_per_second, settings.duration);
    let start = Instant::now();
    let producer = tokio::task::spawn_blocking(move || {
        crate::measure::run_paced(rate, duration, |now| {
            queue
                .blocking_send(payloads.stamped(now))
                .map_err(|_| anyhow!("the sender task stopped"))
        })
    });
    let produced = producer.await.context("the producer failed")?;
    let elapsed = start.elapsed();
    // The sender's error, when there is one, says why producing stopped.
    let mut connection = sender.await.context("the sender task failed")??;
    let sent = produced?;
    let _ = sent_sender.send(Some(sent));
    let (received, latencies) = tail.await.context("the reader failed")??;
    delete_stream(&mut connection).await?;
    Ok(Outcome {
        messages: received,
        elapsed,
        latency: latencies
            .summary()
            .map(|summary| (LatencyKind::ProduceToConsume, summary)),
        server,
    })
}

/// Calls `visit(id, payload)` for each entry of an XREAD reply, in order. A nil reply (no
/// entries) visits nothing.
///
/// The reply is `[[key, [[id, [field, value, ...]], ...]], ...]` in RESP2, or a map from key
/// to the same entries in RESP3; entries are walked in place, without converting them.
///
/// # Errors
/// The reply has another shape, or `visit` failed.
fn for_each_entry(reply: &Value, mut visit: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
    let shape_error = || anyhow!("unexpected XREAD reply shape");
    let streams: Vec<&Value> = match reply {
        Value::Nil => return Ok(()),
        Value::Array(streams) => streams
            .iter()
            .map(|stream| match stream {
                Value::Array(key_and_entries) => key_and_entries.get(1).ok_or_else(shape_error),
                _ => Err(shape_error()),
            })
            .collect::<Result<_>>()?,
        Value::Map(streams) => streams.iter().map(|(_, entries)| entries).collect(),
        _ => return Err(shape_error()),
    };
    for entries in streams {
        let Value::Array(entries) = entries else {
            return Err(shape_error());
        };
        for entry in entries {
            let Value::Array(id_and_fields) = entry else {
                return Err(shape_error());
            };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) =
                (id_and_fields.first(), id_and_fields.get(1))
            else {
                return Err(shape_error());
            };
            // The fields alternate name, value; the payload is the value of FIELD.
            let payload = fields
                .chunks(2)
                .find_map(|pair| match pair {
                    [Value::BulkString(name), Value::BulkString(value)]
                        if name.as_slice() == FIELD.as_bytes() =>
                    {
                        Some(value.as_slice())
                    }
                    _ => None,
                })
                .ok_or_else(|| anyhow!("an entry has no field {FIELD}"))?;
            visit(id, payload)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(bytes: &[u8]) -> Value {
        Value::BulkString(bytes.to_vec())
    }

    fn entry(id: &[u8], payload: &[u8]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(vec![bulk(FIELD.as_bytes()), bulk(payload)]),
        ])
    }

    fn visited(reply: &Value) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut seen = Vec::new();
        for_each_entry(reply, |id, payload| {
            seen.push((id.to_vec(), payload.to_vec()));
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn walks_resp2_and_resp3_replies() {
        let entries = Value::Array(vec![entry(b"1-0", b"a"), entry(b"1-1", b"bc")]);
        let expected = vec![
            (b"1-0".to_vec(), b"a".to_vec()),
            (b"1-1".to_vec(), b"bc".to_vec()),
        ];
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk(b"peerbench"),
            entries.clone(),
        ])]);
        assert_eq!(visited(&resp2).unwrap(), expected);
        let resp3 = Value::Map(vec![(bulk(b"peerbench"), entries)]);
        assert_eq!(visited(&resp3).unwrap(), expected);
        assert!(visited(&Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn refuses_other_shapes() {
        assert!(visited(&Value::Int(3)).is_err());
        assert!(visited(&Value::Array(vec![Value::Int(3)])).is_err());
        let no_field = Value::Array(vec![Value::Array(vec![
            bulk(b"peerbench"),
            Value::Array(vec![Value::Array(vec![bulk(b"1-0"), Value::Array(vec![])])]),
        ])]);
        assert!(visited(&no_field).is_err());
    }
}
