//! The four workloads: `produce`, `consume`, `pubsub` and `latency`, on a fresh topic.
//!
//! ```text
//!            ┌ producer task (or paced thread) ─enqueue─▶ Producer ─▶ broker ─▶ consumer task
//! payload:   │   [send time: u64 nanoseconds since the meter's epoch][filler to message_size]
//! per record │   (sent_at, DeliveryFuture) ─chunks─▶ ack collector: send→ack latency
//!            └   consumer task: now − payload send time = produce→consume latency
//! ```
//!
//! Choices, so the numbers can be read right:
//! - Each producer and each consumer has a client, hence a connection, of its own.
//! - Producers are built (InitProducerId) and consumers have joined their group before the clock
//!   starts for `produce`, `pubsub` and `latency`. For `consume` the clock starts when the
//!   first records arrive, and the records that arrived with them are not counted: joining
//!   the group and the first fetch's round trip are reported apart, as startup.
//! - Unpaced producers hand the client `records_per_send` records (1,000 by default) per
//!   `Producer::enqueue_many` call, borrowed from one payload (the records of a call share a
//!   send time); with `--records-per-send 1` each record goes through `Producer::enqueue`.
//!   Consumers read with `Consumer::next_batch` and decode every record.
//! - Send→ack latency runs from handing the records to the producer (waiting for buffer space
//!   included) until their future is seen resolved. The futures reach the collector in chunks
//!   of at least 256 records or 100 µs, so a figure can be up to about 100 µs late under full
//!   load; paced producers hand over every record before sleeping.
//! - Throughput loops read the clock once per call (or every 16 records with one record per
//!   call) and after every wait; consumers once per batch and every 16 records while measuring
//!   latency: a time can be off by what 16 records' handling takes, microseconds.
//! - With `--rate`, each producer runs on a thread of its own and sleeps between sends:
//!   tokio's timer has millisecond granularity, far too coarse for 10,000 msgs/s. Its timer
//!   slack is 1 ns (Linux's default 50 µs would be added to every sleep). The time carried in
//!   the payload, and the start of send→ack, is when the record was due, not when it was sent:
//!   a sender held up sends late, and what it owed meanwhile shows the wait (no coordinated
//!   omission).
//! - With `acks=none` a delivery future resolves when its request is queued, so "send→ack"
//!   is send→queued, and the count is of records sent.

use std::collections::BTreeSet;
use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use bytes::{BufMut, Bytes, BytesMut};
use sluice_client::producer::{Acks, DeliveriesFuture, DeliveryFuture, Producer, Record};
use sluice_client::{CommitMode, Consumer, ResetPolicy};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::cli::{Settings, Stop, Workload};
use super::machine::{CpuCounters, CpuUse};
use super::metrics::{LatencyKind, LatencySummary, Meter, Sample, per_second_percentiles};
use super::progress::{Progressing, Sampler, bar};
use super::target::BenchBroker;

/// A chunk of delivery futures is handed to the collector at this many records...
const ACK_CHUNK_RECORDS: u64 = 256;
/// ...or when its oldest record is this old, whichever comes first.
const ACK_CHUNK_AGE: Duration = Duration::from_micros(100);
/// Chunks waiting for a collector; a producer that gets this far ahead waits.
const ACK_CHANNEL_CHUNKS: usize = 1024;
/// A throughput loop reads the clock once per this many records (and after any wait): a clock
/// read costs about 45 ns on the development VM, against a few hundred for a whole record.
const CLOCK_EVERY_RECORDS: u64 = 16;
/// Payloads are cut from buffers this big, so a message costs no allocation of its own.
const PAYLOAD_ARENA_BYTES: usize = 1 << 20;
/// Byte the payload is filled with after its send time.
const PAYLOAD_FILLER: u8 = 0x5a;
/// How long the group may take to assign every partition before the run gives up.
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the consumers may go without a record before the run gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Flags that turn out not to go together only once the run starts (the producer's own
/// checks): exit 2, as for any usage error.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// What a workload measured.
#[derive(Debug)]
pub struct RunResult {
    /// Messages measured: acknowledged (sent, with acks=none) for `produce`, consumed for the
    /// others.
    pub messages: u64,
    /// The measured phase's wall-clock time.
    pub elapsed: Duration,
    pub send_to_ack: Option<LatencySummary>,
    pub produce_to_consume: Option<LatencySummary>,
    /// The latency drawn per second in the chart, and its (second, p50 µs, p99 µs) points.
    pub headline: Option<LatencyKind>,
    pub latency_per_second: Vec<(u64, u64, u64)>,
    pub samples: Vec<Sample>,
    /// `consume` only: the unmeasured filling of the topic.
    pub fill: Option<FillResult>,
    /// The CPU the measured phase used.
    pub cpu: CpuUse,
    /// `consume` only: from starting the consumers to their first records (joining the group,
    /// being assigned), not measured.
    pub startup: Option<Duration>,
}

impl RunResult {
    pub fn messages_per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// How the topic of a `consume` run was filled.
#[derive(Debug)]
pub struct FillResult {
    pub messages: u64,
    pub elapsed: Duration,
    pub send_to_ack: Option<LatencySummary>,
}

/// Runs the workload of `settings` against its broker (started here when embedded).
///
/// # Errors
/// [`UsageError`] for settings the producer refuses; anything else that stops the run.
pub async fn run(settings: &Settings) -> Result<RunResult> {
    let broker = BenchBroker::start(settings).await?;
    let result = run_on(&broker, settings).await;
    broker.stop().await;
    result
}

async fn run_on(broker: &BenchBroker, settings: &Settings) -> Result<RunResult> {
    let admin_client = broker.client().await?;
    let admin = admin_client.admin();
    let topic: Arc<str> = Arc::from(unique_name(settings.workload.name()));
    admin
        .create_topic(&topic, settings.partitions, &[])
        .await
        .with_context(|| format!("cannot create topic {topic}"))?;
    let result = match settings.workload {
        Workload::Produce => produce(broker, settings, &topic).await,
        Workload::Consume => consume(broker, settings, &topic).await,
        Workload::Pubsub | Workload::Latency => pubsub(broker, settings, &topic).await,
    };
    // An external broker keeps no benchmark data behind; an embedded one is removed whole.
    if !broker.is_embedded() {
        let _ = admin.delete_topic(&topic).await;
    }
    admin_client.close().await;
    result
}

async fn produce(broker: &BenchBroker, settings: &Settings, topic: &Arc<str>) -> Result<RunResult> {
    let producers = build_producers(broker, settings).await?;
    let meter = Meter::new();
    let start = meter.epoch;
    let sampler = Sampler::start(
        Arc::clone(&meter),
        start,
        bar("produce", settings.stop),
        settings.stop,
        Progressing::Acked,
    );
    let cpu = CpuCounters::read();
    let produced = run_producers(producers, settings, topic, &meter, start).await;
    let elapsed = start.elapsed();
    let cpu = cpu_used(cpu, elapsed);
    let samples = sampler.finish().await;
    let produced = produced?;
    Ok(result_of(
        &meter,
        produced.measured(settings.acks),
        (elapsed, cpu),
        Some(LatencyKind::SendToAck),
        samples,
        None,
    ))
}

async fn consume(broker: &BenchBroker, settings: &Settings, topic: &Arc<str>) -> Result<RunResult> {
    let producers = build_producers(broker, settings).await?;
    let fill_meter = Meter::new();
    let fill_sampler = Sampler::start(
        Arc::clone(&fill_meter),
        fill_meter.epoch,
        bar("fill", settings.stop),
        settings.stop,
        Progressing::Acked,
    );
    let filled = run_producers(producers, settings, topic, &fill_meter, fill_meter.epoch).await;
    let fill_elapsed = fill_meter.epoch.elapsed();
    fill_sampler.finish().await;
    let expected = filled?.measured(settings.acks);
    let fill = FillResult {
        messages: expected,
        elapsed: fill_elapsed,
        send_to_ack: LatencySummary::of(&fill_meter.latencies(LatencyKind::SendToAck).total),
    };

    let meter = Meter::new();
    let start = meter.epoch;
    let reading = Stop::Messages(expected);
    let sampler = Sampler::start(
        Arc::clone(&meter),
        start,
        bar("consume", reading),
        reading,
        Progressing::Consumed,
    );
    let finish = Finish::new();
    let cpu = CpuCounters::read();
    let consumed = async {
        let consumers = build_consumers(broker, settings, topic).await?;
        let loops = spawn_consumer_loops(consumers, &meter, &finish, false);
        let waited = wait_until_consumed(&meter, &finish, expected).await;
        Ok::<_, anyhow::Error>((loops, waited))
    }
    .await;
    // Measured from the first records: joining the group and being assigned the partitions
    // is reported apart, as `startup`. The records that came with the first ones arrived
    // before the clock started and are not counted; when they were all there is (a run small
    // enough to arrive at once), the run is timed from the consumers' start instead.
    let before_the_clock = meter.consumed_before_the_clock();
    let all = Meter::count(&meter.consumed);
    let (first, cpu, measured) = match meter.first_consumed() {
        Some((first, cpu)) if all > before_the_clock => (first, cpu, all - before_the_clock),
        _ => (start, cpu, all),
    };
    let elapsed = first.elapsed();
    let cpu = cpu_used(cpu, elapsed);
    let startup = first.saturating_duration_since(start);
    finish.stop.send_replace(true);
    let samples = sampler.finish().await;
    let (loops, waited) = consumed?;
    let stopped = join_consumer_loops(loops).await;
    waited?;
    stopped?;
    let mut result = result_of(&meter, measured, (elapsed, cpu), None, samples, Some(fill));
    result.startup = Some(startup);
    Ok(result)
}

async fn pubsub(broker: &BenchBroker, settings: &Settings, topic: &Arc<str>) -> Result<RunResult> {
    let producers = build_producers(broker, settings).await?;
    let consumers = build_consumers(broker, settings, topic).await?;
    wait_for_assignment(&consumers, settings.partitions).await?;
    let meter = Meter::new();
    let start = meter.epoch;
    let finish = Finish::new();
    let loops = spawn_consumer_loops(consumers, &meter, &finish, true);
    let sampler = Sampler::start(
        Arc::clone(&meter),
        start,
        bar(settings.workload.name(), settings.stop),
        settings.stop,
        Progressing::Consumed,
    );
    let cpu = CpuCounters::read();
    let produced = run_producers(producers, settings, topic, &meter, start).await;
    let waited = match &produced {
        Ok(produced) => {
            wait_until_consumed(&meter, &finish, produced.measured(settings.acks)).await
        }
        Err(_) => Ok(()),
    };
    let elapsed = start.elapsed();
    let cpu = cpu_used(cpu, elapsed);
    finish.stop.send_replace(true);
    let stopped = join_consumer_loops(loops).await;
    let samples = sampler.finish().await;
    produced?;
    waited?;
    stopped?;
    Ok(result_of(
        &meter,
        Meter::count(&meter.consumed),
        (elapsed, cpu),
        Some(LatencyKind::ProduceToConsume),
        samples,
        None,
    ))
}

/// Reads the results off a meter whose recorders have all been dropped.
fn result_of(
    meter: &Meter,
    messages: u64,
    (elapsed, cpu): (Duration, CpuUse),
    headline: Option<LatencyKind>,
    samples: Vec<Sample>,
    fill: Option<FillResult>,
) -> RunResult {
    let send_to_ack = LatencySummary::of(&meter.latencies(LatencyKind::SendToAck).total);
    let produce_to_consume =
        LatencySummary::of(&meter.latencies(LatencyKind::ProduceToConsume).total);
    let latency_per_second = headline
        .map(|kind| per_second_percentiles(&meter.latencies(kind)))
        .unwrap_or_default();
    RunResult {
        messages,
        elapsed,
        send_to_ack,
        produce_to_consume,
        headline,
        latency_per_second,
        samples,
        fill,
        cpu,
        startup: None,
    }
}

/// The CPU used since `from`, `elapsed` ago.
fn cpu_used(from: CpuCounters, elapsed: Duration) -> CpuUse {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    from.used_until(&CpuCounters::read(), elapsed, cores)
}

/// `sluice-bench-<workload>-<pid>-<ms since the epoch>`: fresh on every run, and a valid topic
/// and group name.
fn unique_name(workload: &str) -> String {
    let milliseconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    format!(
        "sluice-bench-{workload}-{}-{milliseconds}",
        std::process::id()
    )
}

/// A client error as the run reports it: the producer's refusal of its settings is a usage
/// error.
fn from_client(error: sluice_client::Error) -> anyhow::Error {
    match error {
        sluice_client::Error::Usage(message) => anyhow!(UsageError(message)),
        other => anyhow!(other),
    }
}

// ---------------------------------------------------------------------------------------------
// Producers

async fn build_producers(broker: &BenchBroker, settings: &Settings) -> Result<Vec<Producer>> {
    let mut producers = Vec::with_capacity(settings.producers as usize);
    for _ in 0..settings.producers {
        let client = broker.client().await?;
        let producer = client
            .producer()
            .acks(settings.acks)
            // The broker's answer is what tells a retry from a first attempt; none, none.
            .idempotence(settings.acks != Acks::None)
            .batch_bytes(settings.batch_bytes as usize)
            .linger(settings.linger)
            .build()
            .await
            .map_err(from_client)
            .context("cannot start a producer")?;
        producers.push(producer);
    }
    Ok(producers)
}

/// When one producer is done.
#[derive(Clone, Copy, Debug)]
enum Quota {
    Messages(u64),
    Until(Instant),
}

impl Quota {
    fn is_reached(self, sent: u64, now: Instant) -> bool {
        match self {
            Quota::Messages(messages) => sent >= messages,
            Quota::Until(deadline) => now >= deadline,
        }
    }
}

/// `stop` shared out among `producers`: counts split as evenly as they go.
fn quotas(stop: Stop, producers: usize, start: Instant) -> Vec<Quota> {
    (0..producers as u64)
        .map(|index| match stop {
            Stop::Messages(messages) => {
                let count = producers as u64;
                Quota::Messages(messages / count + u64::from(index < messages % count))
            }
            Stop::After(duration) => Quota::Until(start + duration),
        })
        .collect()
}

/// What the producers of a phase did.
#[derive(Clone, Copy, Debug)]
struct Produced {
    sent: u64,
    acked: u64,
}

impl Produced {
    /// The records known to be in the topic: acknowledged ones, or with acks=none (no
    /// acknowledgements) the ones sent.
    fn measured(self, acks: Acks) -> u64 {
        if acks == Acks::None {
            self.sent
        } else {
            self.acked
        }
    }
}

/// Runs every producer to its quota, closes them and waits for every acknowledgement.
async fn run_producers(
    producers: Vec<Producer>,
    settings: &Settings,
    topic: &Arc<str>,
    meter: &Arc<Meter>,
    start: Instant,
) -> Result<Produced> {
    let message_size = settings.message_size as usize;
    let per_producer_rate = settings
        .rate
        .map(|rate| rate as f64 / f64::from(settings.producers));
    let quotas = quotas(settings.stop, producers.len(), start);
    let mut senders: Vec<JoinHandle<Result<u64>>> = Vec::new();
    let mut collectors = Vec::new();
    for (producer, quota) in producers.into_iter().zip(quotas) {
        let (chunks, chunks_received) = mpsc::channel(ACK_CHANNEL_CHUNKS);
        collectors.push(tokio::spawn(collect_acks(
            chunks_received,
            Arc::clone(meter),
        )));
        let job = SendJob {
            producer,
            topic: Arc::clone(topic),
            meter: Arc::clone(meter),
            payloads: Payloads::new(message_size),
            quota,
            records_per_send: u64::from(settings.records_per_send),
            chunks,
        };
        senders.push(match per_producer_rate {
            None => tokio::spawn(job.run_unpaced()),
            Some(rate) => {
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || job.run_paced(&runtime, rate, start))
            }
        });
    }
    let mut sent = 0;
    let mut first_error = None;
    for sender in senders {
        match sender.await {
            Ok(Ok(count)) => sent += count,
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(panic) => {
                first_error.get_or_insert(anyhow!("a producer task failed: {panic}"));
            }
        }
    }
    let mut first_rejection = None;
    for collector in collectors {
        if let Ok(Some(error)) = collector.await {
            first_rejection.get_or_insert(error);
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let failed = Meter::count(&meter.failed);
    if let Some(error) = first_rejection {
        return Err(anyhow!(error).context(format!("{failed} records were not acknowledged")));
    }
    Ok(Produced {
        sent,
        acked: Meter::count(&meter.acked),
    })
}

/// One producer call's records: when they were handed over, how many, and their future.
struct Sent {
    at: Instant,
    records: u64,
    future: Acknowledgement,
}

/// `Producer::enqueue`'s future for one record, `enqueue_many`'s for several.
enum Acknowledgement {
    One(DeliveryFuture),
    Many(DeliveriesFuture),
}

impl Acknowledgement {
    async fn outcome(self) -> Result<(), sluice_client::Error> {
        match self {
            Acknowledgement::One(future) => future.await.map(drop),
            Acknowledgement::Many(future) => future.await.map(drop),
        }
    }
}

type AckChunk = Vec<Sent>;

/// Awaits delivery futures in the order they were sent, recording send→ack latency. Returns
/// the first failure, if any.
async fn collect_acks(
    mut chunks: mpsc::Receiver<AckChunk>,
    meter: Arc<Meter>,
) -> Option<sluice_client::Error> {
    let mut recorder = meter.recorder(LatencyKind::SendToAck);
    let mut first_error = None;
    while let Some(chunk) = chunks.recv().await {
        let mut now = Instant::now();
        for sent in chunk {
            // A future already resolved was resolved by `now`; only one that has to be waited
            // for needs the clock read again.
            let mut outcome = pin!(sent.future.outcome());
            let delivered = match futures::poll!(outcome.as_mut()) {
                Poll::Ready(delivered) => delivered,
                Poll::Pending => {
                    let delivered = outcome.await;
                    now = Instant::now();
                    delivered
                }
            };
            match delivered {
                Ok(()) => {
                    recorder.record_n(sent.at, now, sent.records);
                    meter.acked.fetch_add(sent.records, Ordering::Relaxed);
                }
                Err(error) => {
                    meter.failed.fetch_add(sent.records, Ordering::Relaxed);
                    first_error.get_or_insert(error);
                }
            }
        }
    }
    first_error
}

/// Delivery futures waiting to be handed to the collector.
struct PendingAcks {
    chunk: AckChunk,
    records: u64,
}

impl PendingAcks {
    fn new() -> Self {
        PendingAcks {
            chunk: Vec::new(),
            records: 0,
        }
    }

    /// Adds a call's future; returns a chunk when one is due.
    fn push(&mut self, sent: Sent) -> Option<AckChunk> {
        let sent_at = sent.at;
        self.records += sent.records;
        self.chunk.push(sent);
        let oldest = self.chunk.first().map_or(sent_at, |oldest| oldest.at);
        if self.records >= ACK_CHUNK_RECORDS
            || sent_at.saturating_duration_since(oldest) >= ACK_CHUNK_AGE
        {
            Some(self.take())
        } else {
            None
        }
    }

    fn take(&mut self) -> AckChunk {
        self.records = 0;
        std::mem::take(&mut self.chunk)
    }
}

/// Message payloads, cut from shared buffers: the producer copies a value into its batch and
/// drops it, so a buffer is freed soon after its last payload is sent.
struct Payloads {
    arena: BytesMut,
    message_size: usize,
}

impl Payloads {
    fn new(message_size: usize) -> Self {
        assert!(message_size >= 8, "the send time needs 8 bytes");
        Payloads {
            arena: BytesMut::new(),
            message_size,
        }
    }

    fn next(&mut self, timestamp_nanos: u64) -> Bytes {
        if self.arena.capacity() < self.message_size {
            self.arena = BytesMut::with_capacity(PAYLOAD_ARENA_BYTES.max(self.message_size));
        }
        self.arena.put_u64(timestamp_nanos);
        self.arena.put_bytes(PAYLOAD_FILLER, self.message_size - 8);
        self.arena.split().freeze()
    }
}

/// The send time carried by a payload, if it is one of ours.
fn sent_at(meter: &Meter, value: &[u8]) -> Option<Instant> {
    let timestamp: [u8; 8] = value.get(..8)?.try_into().ok()?;
    Some(meter.instant_of(u64::from_be_bytes(timestamp)))
}

/// One producer's part of a phase.
struct SendJob {
    producer: Producer,
    topic: Arc<str>,
    meter: Arc<Meter>,
    payloads: Payloads,
    quota: Quota,
    /// Records per producer call (unpaced).
    records_per_send: u64,
    chunks: mpsc::Sender<AckChunk>,
}

impl SendJob {
    /// As fast as the producer takes records.
    async fn run_unpaced(mut self) -> Result<u64> {
        if self.records_per_send > 1 {
            return self.run_unpaced_many().await;
        }
        let mut pending = PendingAcks::new();
        let mut sent = 0u64;
        let mut now = Instant::now();
        let sending: Result<()> = loop {
            if sent.is_multiple_of(CLOCK_EVERY_RECORDS) {
                now = Instant::now();
            }
            if self.quota.is_reached(sent, now) {
                break Ok(());
            }
            let value = self.payloads.next(self.meter.timestamp_nanos(now));
            let sent_at = now;
            let mut enqueue = pin!(self.producer.enqueue(Record::new(&self.topic, value)));
            let enqueued = match futures::poll!(enqueue.as_mut()) {
                Poll::Ready(enqueued) => enqueued,
                Poll::Pending => {
                    let enqueued = enqueue.await;
                    // It waited for buffer space: the clock has moved on.
                    now = Instant::now();
                    enqueued
                }
            };
            let future = match enqueued {
                Ok(future) => future,
                Err(error) => break Err(from_client(error)),
            };
            sent += 1;
            let sent = Sent {
                at: sent_at,
                records: 1,
                future: Acknowledgement::One(future),
            };
            // The collector only stops early when the run is failing anyway.
            if !self.hand_over(&mut pending, sent).await {
                break Ok(());
            }
        };
        self.finish(pending, sending, sent).await
    }

    /// As fast as the producer takes them, `records_per_send` records per
    /// `Producer::enqueue_many` call: one clock read per call, whose time every record of the
    /// call carries.
    async fn run_unpaced_many(mut self) -> Result<u64> {
        let mut pending = PendingAcks::new();
        let mut sent = 0u64;
        let sending: Result<()> = loop {
            let now = Instant::now();
            if self.quota.is_reached(sent, now) {
                break Ok(());
            }
            let count = match self.quota {
                Quota::Messages(messages) => self.records_per_send.min(messages - sent),
                Quota::Until(_) => self.records_per_send,
            };
            // The records of one call carry the same send time, hence the same payload,
            // borrowed: the producer copies it into the batch.
            let payload = self.payloads.next(self.meter.timestamp_nanos(now));
            let records = (0..count).map(|_| Record::borrowed(&self.topic, &payload));
            let future = match self.producer.enqueue_many(records).await {
                Ok(future) => future,
                Err(error) => break Err(from_client(error)),
            };
            sent += count;
            let sent = Sent {
                at: now,
                records: count,
                future: Acknowledgement::Many(future),
            };
            // The collector only stops early when the run is failing anyway.
            if !self.hand_over(&mut pending, sent).await {
                break Ok(());
            }
        };
        self.finish(pending, sending, sent).await
    }

    /// Adds a call's future to the pending ones and hands a chunk to the collector when one
    /// is due; false once the collector is gone.
    async fn hand_over(&self, pending: &mut PendingAcks, sent: Sent) -> bool {
        match pending.push(sent) {
            Some(chunk) => self.chunks.send(chunk).await.is_ok(),
            None => true,
        }
    }

    /// Hands over what is pending, closes the producer (delivering what it holds) and reports
    /// how many records were sent, or why sending or closing failed.
    async fn finish(self, mut pending: PendingAcks, sending: Result<()>, sent: u64) -> Result<u64> {
        let _ = self.chunks.send(pending.take()).await;
        drop(self.chunks);
        let closed = self.producer.close().await.map_err(from_client);
        sending.context("a producer failed")?;
        closed.context("a producer failed to close")?;
        Ok(sent)
    }

    /// At `rate` messages per second from `start`, on a thread of its own.
    fn run_paced(
        mut self,
        runtime: &tokio::runtime::Handle,
        rate: f64,
        start: Instant,
    ) -> Result<u64> {
        let seconds_per_message = 1.0 / rate;
        let mut pending = PendingAcks::new();
        let mut sent = 0u64;
        precise_sleeps();
        let sending: Result<()> = loop {
            let due = start + Duration::from_secs_f64(sent as f64 * seconds_per_message);
            let mut now = Instant::now();
            if due > now {
                // Hand over what was sent before sleeping, so its acknowledgements are timed.
                if !pending.chunk.is_empty() && self.chunks.blocking_send(pending.take()).is_err() {
                    break Ok(());
                }
                std::thread::sleep(due - now);
                now = Instant::now();
            }
            // Ends with the last record due before the end, however late it is sent: a sender
            // stalled across the end still owes (and times) what fell due before it.
            if self.quota.is_reached(sent, due) {
                break Ok(());
            }
            // Timed from when the record was due, not from when this thread got to send it:
            // a sender held up (a stall, a full buffer) sends late, and the records it owed
            // meanwhile must show that wait, or the tail hides it (coordinated omission).
            let value = self.payloads.next(self.meter.timestamp_nanos(due));
            let future =
                match runtime.block_on(self.producer.enqueue(Record::new(&self.topic, value))) {
                    Ok(future) => future,
                    Err(error) => break Err(from_client(error)),
                };
            sent += 1;
            let sent = Sent {
                at: due,
                records: 1,
                future: Acknowledgement::One(future),
            };
            if let Some(chunk) = pending.push(sent)
                && self.chunks.blocking_send(chunk).is_err()
            {
                break Ok(());
            }
        };
        let _ = self.chunks.blocking_send(pending.take());
        drop(self.chunks);
        let closed = runtime.block_on(self.producer.close()).map_err(from_client);
        sending.context("a producer failed")?;
        closed.context("a producer failed to close")?;
        Ok(sent)
    }
}

// ---------------------------------------------------------------------------------------------
// Consumers

async fn build_consumers(
    broker: &BenchBroker,
    settings: &Settings,
    topic: &Arc<str>,
) -> Result<Vec<Consumer>> {
    let group = format!("{topic}-group");
    let mut consumers = Vec::with_capacity(settings.consumers as usize);
    for _ in 0..settings.consumers {
        let client = broker.client().await?;
        let consumer = client
            .consumer()
            .group(group.clone())
            .topics([topic.to_string()])
            .reset_policy(ResetPolicy::Earliest)
            // The run does not resume; committing more often would only add requests.
            .commit_mode(CommitMode::Auto(Duration::from_secs(5)))
            .build()
            .await
            .map_err(from_client)
            .context("cannot start a consumer")?;
        consumers.push(consumer);
    }
    Ok(consumers)
}

/// Waits until every partition is owned and as many members as can have one own some, so a
/// latency run does not time the group's rebalancing.
async fn wait_for_assignment(consumers: &[Consumer], partitions: u32) -> Result<()> {
    let deadline = Instant::now() + ASSIGNMENT_TIMEOUT;
    let members_expected = consumers.len().min(partitions as usize);
    loop {
        let assignments: Vec<BTreeSet<(String, u32)>> =
            consumers.iter().map(Consumer::assignment).collect();
        let owned: BTreeSet<u32> = assignments
            .iter()
            .flatten()
            .map(|(_, partition)| *partition)
            .collect();
        let members_owning = assignments.iter().filter(|owned| !owned.is_empty()).count();
        if owned.len() == partitions as usize && members_owning >= members_expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the consumer group owned {} of {partitions} partitions after {} s",
                owned.len(),
                ASSIGNMENT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the consumers learn they are done: the number of records to read (unknown, so
/// `u64::MAX`, until the producers finish), a wake-up when it is reached, and a stop signal.
#[derive(Debug)]
struct Finish {
    target: AtomicU64,
    reached: Notify,
    stop: watch::Sender<bool>,
    /// Per partition, the offset after the last record counted, across every consumer: a
    /// record read again (a partition moving between members) is not counted twice, and one
    /// past a gap fails the run.
    positions: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
}

impl Finish {
    fn new() -> Arc<Finish> {
        Arc::new(Finish {
            target: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
            positions: std::sync::Mutex::default(),
            stop: watch::channel(false).0,
        })
    }
}

fn spawn_consumer_loops(
    consumers: Vec<Consumer>,
    meter: &Arc<Meter>,
    finish: &Arc<Finish>,
    measure_latency: bool,
) -> Vec<JoinHandle<Result<()>>> {
    consumers
        .into_iter()
        .map(|consumer| {
            tokio::spawn(consume_loop(
                consumer,
                Arc::clone(meter),
                Arc::clone(finish),
                measure_latency,
            ))
        })
        .collect()
}

async fn consume_loop(
    mut consumer: Consumer,
    meter: Arc<Meter>,
    finish: Arc<Finish>,
    measure_latency: bool,
) -> Result<()> {
    let mut recorder = measure_latency.then(|| meter.recorder(LatencyKind::ProduceToConsume));
    let mut stop = finish.stop.subscribe();
    let mut result = Ok(());
    loop {
        // A fetched partition's records come out as one batch, borrowed from the fetched
        // bytes; the stop signal only matters once the consumer would wait.
        let next = tokio::select! {
            biased;
            next = consumer.next_batch() => next,
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(batch) = next else {
            break;
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                result = Err(from_client(error).context("a consumer failed"));
                break;
            }
        };
        // Every record is decoded and looked at; the clock is read once per batch (the
        // records of a batch arrive together) and every few records while they are handled.
        let mut now = Instant::now();
        let mut records = 0u64;
        let mut offsets = None;
        for record in batch.records() {
            records += 1;
            let offset = record.offset();
            offsets = Some(offsets.map_or((offset, offset), |(first, _)| (first, offset)));
            if let Some(recorder) = recorder.as_mut() {
                if records.is_multiple_of(CLOCK_EVERY_RECORDS) {
                    now = Instant::now();
                }
                if let Some(sent_at) = sent_at(&meter, record.value()) {
                    recorder.record(sent_at, now);
                }
            }
        }
        let Some((first, last)) = offsets else {
            continue;
        };
        // Counted once each, in order: the first records seen of a partition set where it
        // starts (a tailing consumer starts at the end).
        let records = {
            let mut positions = finish
                .positions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let next = positions.entry(batch.partition()).or_insert(first);
            if first > *next {
                result = Err(anyhow!(
                    "partition {}: records from offset {first} arrived after offset {} was the next due: {} records skipped",
                    batch.partition(),
                    *next,
                    first - *next
                ));
                break;
            }
            let new = (last + 1).saturating_sub(first.max(*next));
            *next = (*next).max(last + 1);
            new
        };
        meter.consumed_at(now, records);
        // SeqCst with the target's store in `wait_until_consumed`: either this sees the
        // target, or the waiter sees this count.
        let consumed = meter.consumed.fetch_add(records, Ordering::SeqCst) + records;
        if consumed >= finish.target.load(Ordering::SeqCst) {
            finish.reached.notify_one();
        }
    }
    drop(recorder);
    // Leaving the group is tidiness, not part of the measurement.
    let _ = consumer.close().await;
    result
}

/// Waits until `expected` records have been consumed, failing when the consumers make no
/// progress for [`STALL_TIMEOUT`].
async fn wait_until_consumed(meter: &Meter, finish: &Finish, expected: u64) -> Result<()> {
    finish.target.store(expected, Ordering::SeqCst);
    let mut last_count = Meter::count(&meter.consumed);
    let mut last_progress = Instant::now();
    loop {
        let consumed = meter.consumed.load(Ordering::SeqCst);
        if consumed >= expected {
            return Ok(());
        }
        if consumed != last_count {
            last_count = consumed;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= STALL_TIMEOUT {
            anyhow::bail!(
                "the consumers stalled at {consumed} of {expected} records for {} s",
                STALL_TIMEOUT.as_secs()
            );
        }
        tokio::select! {
            _ = finish.reached.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn join_consumer_loops(loops: Vec<JoinHandle<Result<()>>>) -> Result<()> {
    let mut first_error = None;
    for consumer_loop in loops {
        let outcome = consumer_loop
            .await
            .unwrap_or_else(|panic| Err(anyhow!("a consumer task failed: {panic}")));
        if let Err(error) = outcome {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Asks the kernel to wake this thread from its sleeps on time: Linux lets a sleep run up to
/// the thread's timer slack (50 µs by default) late, to batch wake-ups. Best effort.
pub(crate) fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and touches only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_counts_are_split_evenly() {
        let start = Instant::now();
        let counts: Vec<u64> = quotas(Stop::Messages(10), 3, start)
            .into_iter()
            .map(|quota| match quota {
                Quota::Messages(count) => count,
                Quota::Until(_) => panic!("a count"),
            })
            .collect();
        assert_eq!(counts, [4, 3, 3]);
        assert!(matches!(
            quotas(Stop::After(Duration::from_secs(2)), 2, start)[1],
            Quota::Until(deadline) if deadline == start + Duration::from_secs(2)
        ));
    }

    #[test]
    fn payloads_carry_their_send_time_and_size() {
        let meter = Meter::new();
        let mut payloads = Payloads::new(100);
        let at = meter.epoch + Duration::from_micros(42);
        let mut previous = None;
        // Across more than one arena.
        for _ in 0..(PAYLOAD_ARENA_BYTES / 100 + 10) {
            let payload = payloads.next(meter.timestamp_nanos(at));
            assert_eq!(payload.len(), 100);
            assert_eq!(sent_at(&meter, &payload), Some(at));
            assert!(payload[8..].iter().all(|byte| *byte == PAYLOAD_FILLER));
            previous = Some(payload);
        }
        assert!(previous.is_some());
        assert_eq!(sent_at(&meter, b"short"), None);
    }
}
