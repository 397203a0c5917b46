//! The results of a workload: the table printed at the end, and the JSON line of `--json`.
//!
//! Throughput in MB/s counts payload bytes only (`message_size` × messages, 1 MB = 10^6 bytes),
//! so it compares directly with the raw baselines. Latencies are in microseconds.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use super::cli::{Settings, Stop};
use super::machine::Machine;
use super::metrics::{LatencyKind, LatencySummary};
use super::progress::group_digits;
use super::workloads::RunResult;

/// The result of one run with everything needed to read it.
#[derive(Debug)]
pub struct Report<'a> {
    pub settings: &'a Settings,
    pub machine: &'a Machine,
    pub result: &'a RunResult,
}

impl Report<'_> {
    pub fn megabytes_per_second(&self) -> f64 {
        self.result.messages_per_second() * f64::from(self.settings.message_size) / 1e6
    }

    /// The latency the top-level `p50_us` ... fields of the JSON stand for: produce→consume
    /// when a consumer ran alongside the producers, send→ack for `produce`, none for
    /// `consume` (its records were written before the read began).
    fn headline_latency(&self) -> Option<LatencySummary> {
        match self.result.headline? {
            LatencyKind::SendToAck => self.result.send_to_ack,
            LatencyKind::ProduceToConsume => self.result.produce_to_consume,
        }
    }

    /// The labels every result carries.
    pub fn labels(&self) -> String {
        let settings = self.settings;
        let rate = settings
            .rate
            .map_or_else(|| "unlimited".to_owned(), group_digits);
        format!(
            "acks={} fsync={} transport={} broker={}\n\
             message_size={} B batch_bytes={} linger_ms={} records_per_send={} producers={} consumers={} partitions={} rate={}",
            settings.acks_name(),
            settings.fsync_label,
            settings.transport.name(),
            settings.broker_label(),
            settings.message_size,
            settings.batch_bytes,
            settings.linger.as_millis(),
            settings.records_per_send,
            settings.producers,
            settings.consumers,
            settings.partitions,
            rate,
        )
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let result = self.result;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sluice-bench {}: {} messages of {} B in {:.2} s",
            self.settings.workload.name(),
            group_digits(result.messages),
            self.settings.message_size,
            result.elapsed.as_secs_f64(),
        );
        for line in self.labels().lines() {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(out, "  machine: {}", self.machine);
        if let Some(fill) = &result.fill {
            let rate = fill.messages as f64 / fill.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
            let _ = writeln!(
                out,
                "  filled first (not measured): {} messages in {:.2} s, {} msgs/s",
                group_digits(fill.messages),
                fill.elapsed.as_secs_f64(),
                group_digits(rate.round() as u64),
            );
        }
        if let Some(startup) = result.startup {
            let _ = writeln!(
                out,
                "  consumers joined and got their first records in {:.0} ms (not measured)",
                startup.as_secs_f64() * 1000.0
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "  {:<22}{:>14}{:>12}", "", "msgs/s", "MB/s");
        let _ = writeln!(
            out,
            "  {:<22}{:>14}{:>12.1}",
            "throughput",
            group_digits(result.messages_per_second().round() as u64),
            self.megabytes_per_second(),
        );
        let _ = writeln!(out, "  {:<22}{}", "cpu", result.cpu);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<22}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (µs)", "p50", "p90", "p99", "p99.9", "max"
        );
        let send_to_ack_label = if self.settings.acks == sluice_client::producer::Acks::None {
            "send→queued (acks=none)"
        } else {
            "send→ack"
        };
        let mut rows = vec![(send_to_ack_label, result.send_to_ack)];
        if let Some(fill) = &result.fill {
            rows[0] = ("send→ack (fill)", fill.send_to_ack);
        }
        rows.push(("produce→consume", result.produce_to_consume));
        for (label, summary) in rows {
            let _ = match summary {
                Some(summary) => writeln!(
                    out,
                    "  {:<22}{:>10}{:>10}{:>10}{:>10}{:>10}",
                    label,
                    group_digits(summary.p50_us),
                    group_digits(summary.p90_us),
                    group_digits(summary.p99_us),
                    group_digits(summary.p999_us),
                    group_digits(summary.max_us),
                ),
                None => writeln!(
                    out,
                    "  {label:<22}{:>10}{:>10}{:>10}{:>10}{:>10}",
                    "-", "-", "-", "-", "-"
                ),
            };
        }
        out
    }

    /// The JSON object of `--json`: the figures, then the labels, flat so `jq` reads them
    /// directly.
    pub fn to_json(&self) -> Value {
        let settings = self.settings;
        let result = self.result;
        let headline = self.headline_latency();
        let summary_json = |summary: Option<LatencySummary>| {
            summary.map_or(Value::Null, |summary| summary.to_json())
        };
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let mut object = Map::new();
        let mut put = |key: &str, value: Value| {
            object.insert(key.to_owned(), value);
        };
        put("workload", json!(settings.workload.name()));
        put("messages", json!(result.messages));
        put("message_size", json!(settings.message_size));
        put("duration_s", json!(result.elapsed.as_secs_f64()));
        put("msgs_per_s", json!(result.messages_per_second()));
        put("mb_per_s", json!(self.megabytes_per_second()));
        put("process_cpu_cores", json!(result.cpu.process_cores));
        put("machine_busy_cores", json!(result.cpu.machine_busy_cores));
        put("stolen_cores", json!(result.cpu.stolen_cores));
        put(
            "latency",
            json!(match result.headline {
                // With acks=none a future resolves when its request is queued.
                Some(LatencyKind::SendToAck)
                    if settings.acks == sluice_client::producer::Acks::None =>
                {
                    "send_to_queued"
                }
                Some(LatencyKind::SendToAck) => "send_to_ack",
                Some(LatencyKind::ProduceToConsume) => "produce_to_consume",
                None => "none",
            }),
        );
        put("p50_us", json!(headline.map(|summary| summary.p50_us)));
        put("p90_us", json!(headline.map(|summary| summary.p90_us)));
        put("p99_us", json!(headline.map(|summary| summary.p99_us)));
        put("p999_us", json!(headline.map(|summary| summary.p999_us)));
        put("max_us", json!(headline.map(|summary| summary.max_us)));
        put("send_to_ack_us", summary_json(result.send_to_ack));
        put(
            "produce_to_consume_us",
            summary_json(result.produce_to_consume),
        );
        put(
            "fill",
            result.fill.as_ref().map_or(Value::Null, |fill| {
                json!({
                    "messages": fill.messages,
                    "duration_s": fill.elapsed.as_secs_f64(),
                    "send_to_ack_us": summary_json(fill.send_to_ack),
                })
            }),
        );
        put(
            "startup_s",
            json!(result.startup.map(|startup| startup.as_secs_f64())),
        );
        put("acks", json!(settings.acks_name()));
        put("fsync", json!(settings.fsync_label));
        put("transport", json!(settings.transport.name()));
        put("broker", json!(settings.broker_label()));
        put("batch_bytes", json!(settings.batch_bytes));
        put("linger_ms", json!(settings.linger.as_millis() as u64));
        put("records_per_send", json!(settings.records_per_send));
        put("producers", json!(settings.producers));
        put("consumers", json!(settings.consumers));
        put("partitions", json!(settings.partitions));
        put("rate", json!(settings.rate));
        put(
            "stop",
            match settings.stop {
                Stop::Messages(messages) => json!({ "messages": messages }),
                Stop::After(duration) => json!({ "duration_s": duration.as_secs() }),
            },
        );
        put("machine", self.machine.to_json());
        put(
            "samples",
            Value::Array(
                result
                    .samples
                    .iter()
                    .map(|sample| {
                        json!({
                            "at_s": sample.at_seconds,
                            "acked_per_s": sample.acked_per_second,
                            "consumed_per_s": sample.consumed_per_second,
                        })
                    })
                    .collect(),
            ),
        );
        put("unix_time", json!(unix_time));
        put("version", json!(env!("CARGO_PKG_VERSION")));
        Value::Object(object)
    }
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
    // One write of the whole line, so concurrent runs appending to one file do not interleave.
    let mut line = value.to_string();
    line.push('\n');
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
