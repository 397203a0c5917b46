//! What a run measures while it runs: counters that the progress bar and the per-second
//! samples read, and latency histograms (hdrhistogram, microseconds) kept whole and per second.
//!
//! ```text
//! ack collectors ──acked─▶ ┐                      ┌──▶ progress bar, samples (every second)
//!                          ├─ Meter (atomics) ────┤
//! consumer tasks ─consumed▶┘                      └──▶ final counts
//! ack collectors / consumers ── LatencyRecorder (one per task, no locks while recording)
//!                                   └─ on drop: merged into the Meter's histograms
//! ```
//!
//! Every recording task owns its recorder, so recording a latency takes no lock and no atomic;
//! the histograms meet only when a task ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::machine::CpuCounters;

/// Latencies above an hour are recorded as an hour.
const LATENCY_MAX_MICROSECONDS: u64 = 3_600_000_000;
/// Three significant digits for the totals (the reported percentiles), two for the per-second
/// histograms, which only feed the chart and would otherwise take 150 KiB each.
const TOTAL_SIGNIFICANT_DIGITS: u8 = 3;
const PER_SECOND_SIGNIFICANT_DIGITS: u8 = 2;

fn histogram(significant_digits: u8) -> Histogram<u64> {
    Histogram::new_with_max(LATENCY_MAX_MICROSECONDS, significant_digits)
        .expect("constant histogram bounds are valid")
}

/// Which latency a recorder measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyKind {
    /// From handing a record to the producer to its acknowledgement.
    SendToAck,
    /// From handing a record to the producer to a consumer receiving it.
    ProduceToConsume,
}

/// A latency histogram, whole and per second of the run.
#[derive(Debug)]
pub struct LatencyHistograms {
    pub total: Histogram<u64>,
    /// Second of the run (since the meter's epoch) → latencies recorded in it.
    pub per_second: BTreeMap<u64, Histogram<u64>>,
}

impl LatencyHistograms {
    fn new() -> Self {
        LatencyHistograms {
            total: histogram(TOTAL_SIGNIFICANT_DIGITS),
            per_second: BTreeMap::new(),
        }
    }

    fn merge_second(&mut self, second: u64, histogram_of_second: &Histogram<u64>) {
        let entry = self
            .per_second
            .entry(second)
            .or_insert_with(|| histogram(PER_SECOND_SIGNIFICANT_DIGITS));
        // Both were made with the same bounds, so adding cannot fail.
        let _ = entry.add(histogram_of_second);
    }
}

/// The counters and histograms of one phase of a run.
#[derive(Debug)]
pub struct Meter {
    /// Payload send times are nanoseconds since this instant, and per-second figures count
    /// seconds from it.
    pub epoch: Instant,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub consumed: AtomicU64,
    /// When the first records were consumed, the CPU counters then, and how many records
    /// arrived with them (they came before that instant, so a rate from it leaves them out).
    first_consumed: OnceLock<(Instant, CpuCounters, u64)>,
    send_to_ack: Mutex<LatencyHistograms>,
    produce_to_consume: Mutex<LatencyHistograms>,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter {
            epoch: Instant::now(),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            first_consumed: OnceLock::new(),
            send_to_ack: Mutex::new(LatencyHistograms::new()),
            produce_to_consume: Mutex::new(LatencyHistograms::new()),
        })
    }

    /// Notes that records were consumed at `at`, if none were before.
    /// Notes that `records` records were consumed at `at`: the first call starts the clock of
    /// a consume run.
    pub fn consumed_at(&self, at: Instant, records: u64) {
        if self.first_consumed.get().is_none() {
            let _ = self.first_consumed.set((at, CpuCounters::read(), records));
        }
    }

    /// When the first records were consumed, and the CPU counters then.
    pub fn first_consumed(&self) -> Option<(Instant, CpuCounters)> {
        self.first_consumed
            .get()
            .map(|(at, counters, _)| (*at, *counters))
    }

    /// The records that arrived with the first ones consumed, before the clock started.
    pub fn consumed_before_the_clock(&self) -> u64 {
        self.first_consumed
            .get()
            .map_or(0, |(_, _, records)| *records)
    }

    /// Nanoseconds from the epoch to `at`, as carried in a payload.
    pub fn timestamp_nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant a payload's timestamp stands for.
    pub fn instant_of(&self, timestamp_nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(timestamp_nanos)
    }

    pub fn recorder(self: &Arc<Self>, kind: LatencyKind) -> LatencyRecorder {
        LatencyRecorder {
            meter: Arc::clone(self),
            kind,
            total: histogram(TOTAL_SIGNIFICANT_DIGITS),
            second: 0,
            current: histogram(PER_SECOND_SIGNIFICANT_DIGITS),
        }
    }

    /// The histograms of `kind`, as merged so far (recorders merge when dropped).
    pub fn latencies(&self, kind: LatencyKind) -> MutexGuard<'_, LatencyHistograms> {
        let histograms = match kind {
            LatencyKind::SendToAck => &self.send_to_ack,
            LatencyKind::ProduceToConsume => &self.produce_to_consume,
        };
        // A panic while merging leaves at worst a partly merged histogram; the run has
        // failed by then anyway.
        histograms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Records latencies for one task; merges them into its [`Meter`] when dropped.
#[derive(Debug)]
pub struct LatencyRecorder {
    meter: Arc<Meter>,
    kind: LatencyKind,
    total: Histogram<u64>,
    /// The second `current` holds.
    second: u64,
    current: Histogram<u64>,
}

impl LatencyRecorder {
    /// Records that something begun at `begun` ended at `ended`.
    pub fn record(&mut self, begun: Instant, ended: Instant) {
        self.record_n(begun, ended, 1);
    }

    /// Records `count` things that began together at `begun` and ended at `ended`.
    pub fn record_n(&mut self, begun: Instant, ended: Instant, count: u64) {
        let microseconds =
            u64::try_from(ended.saturating_duration_since(begun).as_micros()).unwrap_or(u64::MAX);
        self.total.saturating_record_n(microseconds, count);
        let second = ended.saturating_duration_since(self.meter.epoch).as_secs();
        if second != self.second {
            self.flush_second();
            self.second = second;
        }
        self.current.saturating_record_n(microseconds, count);
    }

    fn flush_second(&mut self) {
        if self.current.is_empty() {
            return;
        }
        self.meter
            .latencies(self.kind)
            .merge_second(self.second, &self.current);
        self.current.reset();
    }
}

impl Drop for LatencyRecorder {
    fn drop(&mut self) {
        self.flush_second();
        let mut histograms = self.meter.latencies(self.kind);
        // Same bounds on both sides: adding cannot fail.
        let _ = histograms.total.add(&self.total);
    }
}

/// Percentiles of one latency, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    /// `None` when nothing was recorded.
    pub fn of(histogram: &Histogram<u64>) -> Option<LatencySummary> {
        if histogram.is_empty() {
            return None;
        }
        Some(LatencySummary {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "mean_us": self.mean_us,
        })
    }
}

/// One point of the time series: rates over the second before `at_seconds`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the measured phase began.
    pub at_seconds: f64,
    pub acked_per_second: f64,
    pub consumed_per_second: f64,
}

/// p50 and p99 of each second, for the chart.
pub fn per_second_percentiles(histograms: &LatencyHistograms) -> Vec<(u64, u64, u64)> {
    histograms
        .per_second
        .iter()
        .filter(|(_, histogram)| !histogram.is_empty())
        .map(|(second, histogram)| {
            (
                *second,
                histogram.value_at_quantile(0.50),
                histogram.value_at_quantile(0.99),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_merge_into_the_meter_when_dropped() {
        let meter = Meter::new();
        let begun = meter.epoch;
        {
            let mut first = meter.recorder(LatencyKind::SendToAck);
            let mut second = meter.recorder(LatencyKind::SendToAck);
            first.record(begun, begun + Duration::from_micros(100));
            first.record(begun, begun + Duration::from_millis(1_500));
            second.record(begun, begun + Duration::from_micros(300));
            assert!(meter.latencies(LatencyKind::SendToAck).total.is_empty());
        }
        let histograms = meter.latencies(LatencyKind::SendToAck);
        let summary = LatencySummary::of(&histograms.total).unwrap();
        assert_eq!(summary.count, 3);
        assert!(summary.p50_us <= summary.p99_us && summary.p99_us <= summary.max_us);
        assert!((1_499_000..=1_501_000).contains(&summary.max_us));
        assert_eq!(
            histograms.per_second.keys().copied().collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(histograms.per_second[&0].len(), 2);
        assert!(
            LatencySummary::of(&meter.latencies(LatencyKind::ProduceToConsume).total).is_none()
        );
    }

    #[test]
    fn payload_timestamps_round_trip() {
        let meter = Meter::new();
        let at = meter.epoch + Duration::from_micros(1_234);
        assert_eq!(meter.instant_of(meter.timestamp_nanos(at)), at);
        // Before the epoch counts as the epoch rather than wrapping.
        if let Some(before) = meter.epoch.checked_sub(Duration::from_secs(1)) {
            assert_eq!(meter.timestamp_nanos(before), 0);
        }
    }
}
