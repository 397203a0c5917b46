//! What every workload shares, whatever the system: payloads that carry their send time,
//! latency histograms, fixed-rate pacing, and the result line (text and JSON).
//!
//! ```text
//! payload:  [send time: u64 big-endian nanoseconds since the process epoch][filler to size]
//! latency:  consumer's now − (epoch + send time)   (one process, one monotonic clock)
//! ```

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use bytes::{BufMut as _, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// The bytes of a payload that carry its send time.
pub const STAMP_BYTES: usize = 8;

/// The byte the rest of a payload is filled with. Not zero, so nothing along the way can take
/// a shortcut for empty data.
const FILLER_BYTE: u8 = b'x';

/// The largest latency a histogram holds, in microseconds (one hour); above it values are
/// clamped to it rather than dropped.
const HIGHEST_LATENCY_US: u64 = 3_600_000_000;

/// The monotonic instant send times are counted from, and the maker of payloads.
#[derive(Clone, Copy, Debug)]
pub struct Payloads {
    epoch: Instant,
    message_size_bytes: usize,
}

impl Payloads {
    /// Payloads of `message_size_bytes` (at least [`STAMP_BYTES`]), stamped relative to now.
    pub fn new(message_size_bytes: usize) -> Payloads {
        assert!(
            message_size_bytes >= STAMP_BYTES,
            "the command line keeps message sizes at {STAMP_BYTES} bytes or more"
        );
        Payloads {
            epoch: Instant::now(),
            message_size_bytes,
        }
    }

    /// A payload whose first bytes say it was sent at `sent_at`.
    pub fn stamped(&self, sent_at: Instant) -> Bytes {
        let nanoseconds = u64::try_from(sent_at.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX);
        let mut payload = BytesMut::with_capacity(self.message_size_bytes);
        payload.put_u64(nanoseconds);
        payload.put_bytes(FILLER_BYTE, self.message_size_bytes - STAMP_BYTES);
        payload.freeze()
    }

    /// When the payload `payload` was sent; `None` when it is too short to say.
    pub fn sent_at(&self, payload: &[u8]) -> Option<Instant> {
        let stamp: [u8; STAMP_BYTES] = payload.get(..STAMP_BYTES)?.try_into().ok()?;
        self.epoch
            .checked_add(Duration::from_nanos(u64::from_be_bytes(stamp)))
    }
}

/// A histogram of latencies in microseconds.
#[derive(Debug)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> Latencies {
        // Three significant digits from 1 µs to an hour: fixed bounds, so creation cannot fail
        // on anything but a bug.
        let histogram = Histogram::new_with_bounds(1, HIGHEST_LATENCY_US, 3)
            .expect("constant histogram bounds are valid");
        Latencies { histogram }
    }

    /// Records `count` events that began at `begun` and ended at `ended`.
    pub fn record(&mut self, begun: Instant, ended: Instant, count: u64) {
        let microseconds =
            u64::try_from(ended.saturating_duration_since(begun).as_micros()).unwrap_or(u64::MAX);
        // Below 1 µs counts as 1 µs: the histogram's lowest bucket.
        let _ = self
            .histogram
            .record_n(microseconds.clamp(1, HIGHEST_LATENCY_US), count);
    }

    /// The percentiles, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.histogram.is_empty() {
            return None;
        }
        let at = |quantile| self.histogram.value_at_quantile(quantile);
        Some(LatencySummary {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: self.histogram.max(),
        })
    }
}

/// Percentiles of one latency, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Which latency a result's percentiles are of.
#[derive(Clone, Copy, Debug)]
pub enum LatencyKind {
    /// From handing a message to the client until the server's acknowledgement was seen.
    SendToAck,
    /// From the send time in the payload until the consumer in the same process read it.
    ProduceToConsume,
}

impl LatencyKind {
    fn name(self) -> &'static str {
        match self {
            LatencyKind::SendToAck => "send_to_ack",
            LatencyKind::ProduceToConsume => "produce_to_consume",
        }
    }
}

/// What one workload measured.
#[derive(Debug)]
pub struct Outcome {
    /// Messages acknowledged (produce, latency: consumed) or read (consume) in the measured
    /// phase.
    pub messages: u64,
    /// The measured phase's length.
    pub elapsed: Duration,
    /// The latency percentiles and what they are of; `None` for `consume`, whose messages
    /// were written before the read began.
    pub latency: Option<(LatencyKind, LatencySummary)>,
    /// The server's name and version, as it reported them.
    pub server: String,
}

impl Outcome {
    pub fn messages_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.messages as f64 / seconds
        } else {
            0.0
        }
    }
}

/// The settings a result is labelled with.
#[derive(Debug)]
pub struct Labels<'a> {
    pub system: &'a str,
    pub workload: &'a str,
    pub message_size_bytes: usize,
    pub batch: usize,
    pub rate: Option<u64>,
    pub durability: &'a str,
}

/// The JSON object of `--json`, flat so `jq` reads it directly; the field names match
/// sluice-bench's where they mean the same.
pub fn to_json(labels: &Labels<'_>, outcome: &Outcome) -> Value {
    let messages_per_second = outcome.messages_per_second();
    let latency = outcome.latency.map(|(_, summary)| summary);
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    json!({
        "system": labels.system,
        "workload": labels.workload,
        "messages": outcome.messages,
        "message_size": labels.message_size_bytes,
        "batch": labels.batch,
        "rate": labels.rate,
        "duration_s": outcome.elapsed.as_secs_f64(),
        "msgs_per_s": messages_per_second,
        "mb_per_s": messages_per_second * labels.message_size_bytes as f64 / 1e6,
        "latency": outcome.latency.map_or("none", |(kind, _)| kind.name()),
        "p50_us": latency.map(|summary| summary.p50_us),
        "p90_us": latency.map(|summary| summary.p90_us),
        "p99_us": latency.map(|summary| summary.p99_us),
        "p999_us": latency.map(|summary| summary.p999_us),
        "max_us": latency.map(|summary| summary.max_us),
        "durability": labels.durability,
        "server": outcome.server,
        "unix_time": unix_time,
    })
}

/// One human-readable line of the result.
pub fn to_text(labels: &Labels<'_>, outcome: &Outcome) -> String {
    let messages_per_second = outcome.messages_per_second();
    let mut line = format!(
        "{} {} ({}, {}): {} messages of {} B in {:.2} s = {:.0} msgs/s, {:.1} MB/s",
        labels.system,
        labels.workload,
        outcome.server,
        labels.durability,
        outcome.messages,
        labels.message_size_bytes,
        outcome.elapsed.as_secs_f64(),
        messages_per_second,
        messages_per_second * labels.message_size_bytes as f64 / 1e6,
    );
    if let Some((kind, summary)) = outcome.latency {
        line.push_str(&format!(
            "; {} µs p50 {} p90 {} p99 {} p99.9 {} max {}",
            kind.name(),
            summary.p50_us,
            summary.p90_us,
            summary.p99_us,
            summary.p999_us,
            summary.max_us
        ));
    }
    line
}

/// Appends `value` as one line to `path`, creating the file.
///
/// # Errors
/// The file cannot be opened or written.
pub fn append_json_line(path: &Path, value: &Value) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // One write of the whole line, so runs appending to the same file do not interleave.
    let mut line = value.to_string();
    line.push('\n');
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Calls `send` with the current instant at `rate_per_second` for `duration`, on the calling
/// thread (run it where blocking is allowed: `spawn_blocking`), and returns how many sends
/// were made.
///
/// tokio's timer has millisecond granularity, far too coarse to space 10,000 messages a second,
/// so this sleeps the thread instead. The instant handed to `send` is the actual send time, not
/// the scheduled one: a late send is timed from when it really happened.
///
/// # Errors
/// The first error `send` returns.
pub fn run_paced(
    rate_per_second: u64,
    duration: Duration,
    mut send: impl FnMut(Instant) -> Result<()>,
) -> Result<u64> {
    let seconds_per_message = 1.0 / rate_per_second as f64;
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let due = start + Duration::from_secs_f64(sent as f64 * seconds_per_message);
        let mut now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
            now = Instant::now();
        }
        if now.saturating_duration_since(start) >= duration {
            return Ok(sent);
        }
        send(now)?;
        sent += 1;
    }
}

/// How long a tailing reader may take, after the producer stopped, to read what it sent.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Tells a tailing reader when to stop: once the producer has finished and the reader has
/// read everything it sent.
#[derive(Debug)]
pub struct DrainWatch {
    sent: tokio::sync::watch::Receiver<Option<u64>>,
    deadline: Option<Instant>,
}

impl DrainWatch {
    /// A watch, and the sender through which the producer announces how many it sent.
    pub fn new() -> (tokio::sync::watch::Sender<Option<u64>>, DrainWatch) {
        let (sender, sent) = tokio::sync::watch::channel(None);
        (
            sender,
            DrainWatch {
                sent,
                deadline: None,
            },
        )
    }

    /// Whether a reader that has read `received` messages is done.
    ///
    /// # Errors
    /// The producer finished more than [`DRAIN_LIMIT`] ago and messages are still missing, or
    /// it failed without saying how many it sent.
    pub fn is_done(&mut self, received: u64) -> Result<bool> {
        if self.sent.has_changed().is_err() && self.sent.borrow().is_none() {
            anyhow::bail!("the producer stopped early");
        }
        let Some(sent) = *self.sent.borrow() else {
            return Ok(false);
        };
        if received >= sent {
            return Ok(true);
        }
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
        if Instant::now() > deadline {
            anyhow::bail!(
                "the reader had {received} of the {sent} messages sent {} s after the producer stopped",
                DRAIN_LIMIT.as_secs()
            );
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_send_time_and_size() {
        let payloads = Payloads::new(100);
        let sent_at = Instant::now() + Duration::from_millis(3);
        let payload = payloads.stamped(sent_at);
        assert_eq!(payload.len(), 100);
        let read = payloads.sent_at(&payload).unwrap();
        // Nanosecond precision, so the round trip is exact.
        assert_eq!(read, sent_at);
        assert_eq!(payloads.sent_at(&payload[..7]), None);
    }

    #[test]
    fn percentiles_are_ordered() {
        let mut latencies = Latencies::new();
        assert!(latencies.summary().is_none());
        let begun = Instant::now();
        for microseconds in 1..=1000 {
            latencies.record(begun, begun + Duration::from_micros(microseconds), 1);
        }
        let summary = latencies.summary().unwrap();
        assert!(summary.p50_us <= summary.p99_us && summary.p99_us <= summary.max_us);
        assert!((495..=505).contains(&summary.p50_us));
    }

    #[test]
    fn pacing_sends_about_rate_times_duration() {
        let sent = run_paced(1000, Duration::from_millis(100), |_| Ok(())).unwrap();
        assert!((90..=101).contains(&sent), "sent {sent}");
    }
}
