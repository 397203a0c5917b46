//! The broker's Prometheus metrics, one [`Registry`] per broker, served by the HTTP admin port
//! at `/metrics` in the OpenMetrics text format.
//!
//! ```text
//! connection.rs ─ RequestTimer::finish ─▶ sluice_requests_total{api,code}
//!                                        sluice_request_duration_seconds{api}     (histogram)
//!               ─ reads and writes ────▶ sluice_network_received_bytes_total
//!                                        sluice_network_sent_bytes_total
//! server/*.rs   ─ open_connection ─────▶ sluice_open_connections{transport}
//! storage       ─ FsyncObserver ───────▶ sluice_fsyncs_total
//!                                        sluice_fsync_duration_seconds            (histogram)
//! /metrics      ─ render, from topics ─▶ sluice_partition_log_end_offset{topic,partition}
//!                                        sluice_partition_log_size_bytes{topic,partition}
//!                                        sluice_fetch_response_budget_in_use_bytes
//! handlers/fetch.rs ─ read ahead used ─▶ sluice_fetch_read_ahead_answers_total
//!                   ─ each read pass ──▶ sluice_fetch_reads_total
//! /metrics      ─ render, group lags ──▶ sluice_group_lag{group,topic,partition}
//! ```
//!
//! Recording stays cheap on the request path: the counter and histogram of each (api, error
//! code) pair are looked up in the registry once, on first use, and cached in a table indexed
//! by the two numbers, so a request costs an `Instant::now`, a counter increment and a
//! histogram observation, with no allocation and no map lookup. Per-partition gauges are not
//! kept up to date on the hot path at all: [`Metrics::render`] reads them from the topic
//! registry at scrape time.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sluice_protocol::{ApiKey, ErrorCode};

use crate::fetch_budget::FetchBudget;
use crate::storage::FsyncObserver;
use crate::topics::TopicRegistry;

/// Upper bounds of the latency histograms' buckets, in seconds: 100 µs to 30 s in 1-2.5-5
/// steps, wide enough for a page-cache produce and for a long poll that waits its full
/// `fetch_max_wait_ms`.
pub const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The `transport` label of TCP connections.
pub const TRANSPORT_TCP: &str = "tcp";
/// The `transport` label of QUIC connections.
pub const TRANSPORT_QUIC: &str = "quic";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: u32,
}

/// Labels of [`Metrics::group_lag`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLagLabels {
    pub group: String,
    pub topic: String,
    pub partition: u32,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_SECONDS)
}

/// `MessageTooLarge` → `message_too_large`, for label values.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() {
            if index > 0 {
                out.push('_');
            }
            out.push(character.to_ascii_lowercase());
        } else {
            out.push(character);
        }
    }
    out
}

/// Request counters and latency histograms, with the cache of their handles.
#[derive(Debug)]
struct RequestMetrics {
    counts: Family<RequestLabels, Counter>,
    durations: Family<ApiLabels, Histogram>,
    /// One slot per api key number, and a last one for requests whose api is not known.
    api_slots: usize,
    /// `counts` handles at `api_slot * ErrorCode::ALL.len() + code`.
    count_handles: Box<[OnceLock<Counter>]>,
    /// `durations` handles at `api_slot`.
    duration_handles: Box<[OnceLock<Histogram>]>,
}

impl RequestMetrics {
    fn new() -> Self {
        let api_slots = ApiKey::ALL
            .iter()
            .map(|api| usize::from(api.code()) + 1)
            .max()
            .unwrap_or(0)
            + 1;
        RequestMetrics {
            counts: Family::default(),
            durations: Family::new_with_constructor(latency_histogram),
            api_slots,
            count_handles: (0..api_slots * ErrorCode::ALL.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration_handles: (0..api_slots).map(|_| OnceLock::new()).collect(),
        }
    }

    fn api_slot(&self, api: Option<ApiKey>) -> usize {
        api.map(|api| usize::from(api.code()))
            .filter(|slot| *slot + 1 < self.api_slots)
            .unwrap_or(self.api_slots - 1)
    }

    fn api_label(api: Option<ApiKey>) -> String {
        api.map_or_else(
            || "unknown".to_owned(),
            |api| snake_case(&format!("{api:?}")),
        )
    }

    fn count(&self, api: Option<ApiKey>, code: ErrorCode) {
        let code_slot = usize::from(code.code());
        let labels = || RequestLabels {
            api: Self::api_label(api),
            code: snake_case(&format!("{code:?}")),
        };
        if code_slot >= ErrorCode::ALL.len() {
            // A code missing from ErrorCode::ALL: slow path, but still counted.
            self.counts.get_or_create(&labels()).inc();
            return;
        }
        let slot = self.api_slot(api) * ErrorCode::ALL.len() + code_slot;
        self.count_handles[slot]
            .get_or_init(|| self.counts.get_or_create_owned(&labels()))
            .inc();
    }

    fn observe(&self, api: Option<ApiKey>, seconds: f64) {
        let slot = self.api_slot(api);
        self.duration_handles[slot]
            .get_or_init(|| {
                self.durations.get_or_create_owned(&ApiLabels {
                    api: Self::api_label(api),
                })
            })
            .observe(seconds);
    }
}

/// Times one request from the moment its frame decoded; [`RequestTimer::finish`] counts it
/// when its response is handed to the writer.
#[derive(Debug)]
#[must_use = "finish the timer when the response is handed to the writer"]
pub struct RequestTimer {
    requests: Arc<RequestMetrics>,
    api: ApiKey,
    started: Instant,
}

impl RequestTimer {
    /// Counts the request under the error code of its response header and records its
    /// latency.
    pub fn finish(self, code: ErrorCode) {
        self.requests.count(Some(self.api), code);
        self.requests
            .observe(Some(self.api), self.started.elapsed().as_secs_f64());
    }
}

/// Keeps one connection counted in `sluice_open_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    gauge: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Every metric of one broker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Arc<RequestMetrics>,
    received_bytes: Counter,
    sent_bytes: Counter,
    open_connections: Family<TransportLabels, Gauge>,
    fsyncs: Counter,
    fsync_duration: Histogram,
    log_end_offset: Family<PartitionLabels, Gauge>,
    log_size: Family<PartitionLabels, Gauge>,
    fetch_budget_in_use: Gauge,
    read_ahead_answers: Counter,
    fetch_reads: Counter,
    group_lag: Family<GroupLagLabels, Gauge>,
    /// Serialises scrapes: each clears and refills the per-partition gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric, all at zero, under the `sluice_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let requests = Arc::new(RequestMetrics::new());
        registry.register(
            "requests",
            "Requests answered, by api and by the error code of the response header",
            requests.counts.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's frame decoding to its response being handed to the writer",
            Unit::Seconds,
            requests.durations.clone(),
        );
        let received_bytes = Counter::default();
        registry.register_with_unit(
            "network_received",
            "Bytes read from client connections",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let sent_bytes = Counter::default();
        registry.register_with_unit(
            "network_sent",
            "Bytes of response frames written to client connections",
            Unit::Bytes,
            sent_bytes.clone(),
        );
        let open_connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Client connections open now, by transport",
            open_connections.clone(),
        );
        let fsyncs = Counter::default();
        registry.register(
            "fsyncs",
            "fsyncs of partition segment files",
            fsyncs.clone(),
        );
        let fsync_duration = latency_histogram();
        registry.register_with_unit(
            "fsync_duration",
            "Time one fsync of a partition segment file took",
            Unit::Seconds,
            fsync_duration.clone(),
        );
        let log_end_offset = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "partition_log_end_offset",
            "The offset the next record appended to the partition gets (its high watermark)",
            log_end_offset.clone(),
        );
        let log_size = Family::<PartitionLabels, Gauge>::default();
        registry.register_with_unit(
            "partition_log_size",
            "Bytes of the partition's segment files",
            Unit::Bytes,
            log_size.clone(),
        );
        let fetch_budget_in_use = Gauge::default();
        registry.register_with_unit(
            "fetch_response_budget_in_use",
            "Bytes of limits.fetch_response_budget_bytes held by fetches now",
            Unit::Bytes,
            fetch_budget_in_use.clone(),
        );
        let read_ahead_answers = Counter::default();
        registry.register(
            "fetch_read_ahead_answers",
            "Fetches answered with records read ahead, while the fetch before was on its way",
            read_ahead_answers.clone(),
        );
        let fetch_reads = Counter::default();
        registry.register(
            "fetch_reads",
            "Passes fetches made over their partitions' logs: one per fetch, one per read ahead, \
             and one each time a long poll reads again",
            fetch_reads.clone(),
        );
        let group_lag = Family::<GroupLagLabels, Gauge>::default();
        registry.register(
            "group_lag",
            "Records between a consumer group's committed offset and the partition's log end",
            group_lag.clone(),
        );
        Metrics {
            registry,
            requests,
            received_bytes,
            sent_bytes,
            open_connections,
            fsyncs,
            fsync_duration,
            log_end_offset,
            log_size,
            fetch_budget_in_use,
            read_ahead_answers,
            fetch_reads,
            group_lag,
            scrape: Mutex::new(()),
        }
    }

    /// Counts a fetch answered with records read ahead.
    pub fn count_read_ahead_answer(&self) {
        self.read_ahead_answers.inc();
    }

    /// Counts a fetch's pass over its partitions' logs.
    pub fn count_fetch_read(&self) {
        self.fetch_reads.inc();
    }

    /// Starts timing a request whose frame just decoded.
    pub fn start_request(&self, api: ApiKey) -> RequestTimer {
        RequestTimer {
            requests: Arc::clone(&self.requests),
            api,
            started: Instant::now(),
        }
    }

    /// Counts a request that failed before it decoded (no latency is recorded); `api` is
    /// `None` when its api key is not known.
    pub fn count_undecoded_request(&self, api: Option<ApiKey>, code: ErrorCode) {
        self.requests.count(api, code);
    }

    /// Bytes read from client connections.
    pub fn received_bytes(&self) -> &Counter {
        &self.received_bytes
    }

    /// Bytes written to client connections.
    pub fn sent_bytes(&self) -> &Counter {
        &self.sent_bytes
    }

    /// Counts a connection of `transport` ([`TRANSPORT_TCP`], [`TRANSPORT_QUIC`]) as open
    /// until the returned guard is dropped.
    pub fn open_connection(&self, transport: &'static str) -> OpenConnection {
        let gauge = self
            .open_connections
            .get_or_create_owned(&TransportLabels { transport });
        gauge.inc();
        OpenConnection { gauge }
    }

    /// What storage calls after each fsync: counts it and records how long it took.
    pub fn fsync_observer(&self) -> FsyncObserver {
        let fsyncs = self.fsyncs.clone();
        let durations = self.fsync_duration.clone();
        FsyncObserver::new(move |elapsed| {
            fsyncs.inc();
            durations.observe(elapsed.as_secs_f64());
        })
    }

    /// Consumer-group lag per (group, topic, partition): log end offset minus committed
    /// offset, as [`render`](Self::render) was last given it.
    pub fn group_lag(&self) -> &Family<GroupLagLabels, Gauge> {
        &self.group_lag
    }

    /// Refreshes the gauges read from the broker (partition offsets and sizes, the fetch
    /// budget, consumer-group lag as `(group, topic, partition, lag)`) and encodes every metric
    /// in the OpenMetrics text format. Lag is computed at scrape time from committed offsets
    /// and log ends, so it is never stale and costs nothing on the commit or produce path.
    ///
    /// # Errors
    /// Only if encoding into a `String` fails, which it does not.
    pub fn render(
        &self,
        topics: &TopicRegistry,
        fetch_budget: &FetchBudget,
        lags: Vec<(String, String, u32, u64)>,
    ) -> Result<String, std::fmt::Error> {
        // Held from the clearing of the gauges to the encoding, so a concurrent scrape cannot
        // clear them between another's refill and its encoding.
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // A group or partition gone since the last scrape disappears.
        self.group_lag.clear();
        for (group, topic, partition, lag) in lags {
            self.group_lag
                .get_or_create(&GroupLagLabels {
                    group,
                    topic,
                    partition,
                })
                .set(saturating_i64(lag));
        }
        // Cleared and refilled, so a deleted topic's partitions disappear.
        self.log_end_offset.clear();
        self.log_size.clear();
        for topic in topics.list() {
            for (index, log) in topic.partitions.iter().enumerate() {
                let labels = PartitionLabels {
                    topic: topic.name.clone(),
                    partition: u32::try_from(index).unwrap_or(u32::MAX),
                };
                self.log_end_offset
                    .get_or_create(&labels)
                    .set(saturating_i64(log.latest_offset()));
                self.log_size
                    .get_or_create(&labels)
                    .set(saturating_i64(log.size_bytes()));
            }
        }
        let in_use = fetch_budget
            .total_bytes()
            .saturating_sub(fetch_budget.available_bytes());
        self.fetch_budget_in_use
            .set(i64::try_from(in_use).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_snake_case() {
        assert_eq!(snake_case("MessageTooLarge"), "message_too_large");
        assert_eq!(snake_case("None"), "none");
        assert_eq!(snake_case("ApiVersions"), "api_versions");
    }

    #[test]
    fn requests_are_counted_by_api_and_code() {
        let metrics = Metrics::new();
        metrics
            .start_request(ApiKey::Produce)
            .finish(ErrorCode::None);
        metrics
            .start_request(ApiKey::Produce)
            .finish(ErrorCode::None);
        metrics
            .start_request(ApiKey::Fetch)
            .finish(ErrorCode::Throttled);
        metrics.count_undecoded_request(None, ErrorCode::UnknownApiKey);
        let text = metrics.render_registry_only();
        assert!(
            text.contains("sluice_requests_total{api=\"produce\",code=\"none\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_requests_total{api=\"fetch\",code=\"throttled\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_requests_total{api=\"unknown\",code=\"unknown_api_key\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_request_duration_seconds_count{api=\"produce\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn connections_and_fsyncs() {
        let metrics = Metrics::new();
        let first = metrics.open_connection(TRANSPORT_TCP);
        let second = metrics.open_connection(TRANSPORT_TCP);
        drop(first);
        let observer = metrics.fsync_observer();
        observer.observe(std::time::Duration::from_millis(2));
        let text = metrics.render_registry_only();
        assert!(
            text.contains("sluice_open_connections{transport=\"tcp\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("sluice_fsyncs_total 1\n"), "{text}");
        assert!(
            text.contains("sluice_fsync_duration_seconds_bucket{le=\"0.0025\"} 1\n"),
            "{text}"
        );
        drop(second);
        let text = metrics.render_registry_only();
        assert!(
            text.contains("sluice_open_connections{transport=\"tcp\"} 0\n"),
            "{text}"
        );
    }

    impl Metrics {
        fn render_registry_only(&self) -> String {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
            out
        }
    }
}
