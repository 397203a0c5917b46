//! Power loss: the whole broker, in-process, over the fault-injecting filesystem
//! ([`FaultFs`]), with the plug pulled at random moments while producers send.
//!
//! A power loss here is instantaneous: a kill switch in front of the filesystem makes every
//! file operation of the running broker fail from that moment on (as if the machine had
//! stopped), [`FaultFs::crash`] then drops everything not fsynced, and only afterwards are the
//! dead broker's runtime and flusher threads torn down. A new broker then recovers the same
//! filesystem on the same port.
//!
//! - `acks=durable`: producers live through every power loss (the idempotent producer resends
//!   what was not acknowledged) and nothing acknowledged is ever lost.
//! - `acks=leader` with `fsync=interval`: what is lost is confined to the unsynced window: only
//!   offsets at or above the partition's durable offset at the moment of the loss. The loss is
//!   reported, with how long before the loss the oldest lost record was acknowledged (about one
//!   interval; not asserted, as a wall-clock bound on a busy machine proves nothing).
//!
//! In both, recovery never refuses writes on any partition, and every record that a restarted
//! broker served (read right after each restart, through the partition log, CRC-checked)
//! survives every later power loss with the same value: the history checker runs over all of it.
//!
//! A storage-level test also pins down one contract exactly: an append acknowledged as durable
//! just after a segment roll survives a power loss even when nothing else synced the directory.
//!
//! Short: 12 cycles per mode. Long (150), with the rest of the suite:
//!
//! ```text
//! SLUICE_RELIABILITY_LONG=1 cargo test -p sluice-broker --release --test crash_loop \
//!     --test power_loss --test storage_faults --test group_churn -- --nocapture --test-threads=1
//! ```

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use sluice_broker::storage::faultfs::{FaultFs, FaultKind};
use sluice_broker::storage::fs::{FileHandle, FileSystem, StorageFile};
use sluice_broker::storage::{Fs, FsyncPolicy, LogConfig, PartitionLog, Storage, StorageOptions};
use sluice_broker::{Broker, BrokerHandle, BrokerState, Config};
use sluice_client::producer::Acks;
use sluice_protocol::RecordBatchBuilder;
use sluice_protocol::batch::split_batches;
use sluice_testkit::history::History;
use sluice_testkit::workload::{self, Acked, Log, ProducerSettings, ReadRecord};
use sluice_testkit::{Rng, scale, seed};

const TOPIC: &str = "power";
const PARTITIONS: u32 = 4;
const PRODUCERS: usize = 4;
/// `fsync=interval:<this>` in the `acks=leader` loop.
const FSYNC_INTERVAL_MS: u64 = 250;

const EIO: i32 = 5;

/// A filesystem in front of a [`FaultFs`] that stops working, for good, at [`KillSwitch::pull`]:
/// every call after it fails with EIO, and the pull waits for calls in progress, so nothing the
/// dead broker does reaches the disk after the power went out.
#[derive(Debug)]
struct KillSwitchFs {
    inner: FaultFs,
    switch: KillSwitch,
}

#[derive(Clone, Debug, Default)]
struct KillSwitch(Arc<RwLock<bool>>);

impl KillSwitch {
    /// Holds off a pull while a call runs; fails once pulled.
    fn enter(&self) -> io::Result<RwLockReadGuard<'_, bool>> {
        let pulled = self.0.read().expect("kill switch lock poisoned");
        if *pulled {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(pulled)
    }

    fn pull(&self) {
        *self.0.write().expect("kill switch lock poisoned") = true;
    }
}

#[derive(Debug)]
struct KillSwitchFile {
    inner: FileHandle,
    switch: KillSwitch,
}

impl StorageFile for KillSwitchFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let _alive = self.switch.enter()?;
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let _alive = self.switch.enter()?;
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.set_len(len)
    }
}

impl FileSystem for KillSwitchFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<FileHandle> {
        let _alive = self.switch.enter()?;
        Ok(Arc::new(KillSwitchFile {
            inner: self.inner.open(path, create)?,
            switch: self.switch.clone(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let _alive = self.switch.enter()?;
        self.inner.read_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.remove_dir_all(path)
    }

    fn exists(&self, path: &Path) -> bool {
        self.switch.enter().is_ok() && self.inner.exists(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let _alive = self.switch.enter()?;
        self.inner.sync_dir(path)
    }
}

/// One life of the broker: its own runtime, so that its death stops every task it has.
struct Incarnation {
    /// Taken when the incarnation dies; dropped without waiting otherwise (a failing test).
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<BrokerHandle>,
    state: Arc<BrokerState>,
    switch: KillSwitch,
}

impl Drop for Incarnation {
    fn drop(&mut self) {
        drop(self.handle.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn broker_config(dir: &Path, port: u16, fsync: FsyncPolicy) -> Config {
    let mut config = Config::on_loopback(dir);
    config.listeners.tcp = SocketAddr::from(([127, 0, 0, 1], port));
    config.storage.fsync = fsync;
    // Checkpoints often, so recoveries begin from recovery points all over the log.
    config.storage.recovery_checkpoint_ms = 300;
    config
}

impl Incarnation {
    async fn start(fs: &FaultFs, config: Config) -> anyhow::Result<Incarnation> {
        let switch = KillSwitch::default();
        let filesystem: Fs = Arc::new(KillSwitchFs {
            inner: fs.clone(),
            switch: switch.clone(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("broker-under-test")
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The port of the previous life may take a moment to be free again.
        let handle = loop {
            let started = runtime
                .spawn(Broker::start_with_fs(
                    config.clone(),
                    Arc::clone(&filesystem),
                ))
                .await?;
            match started {
                Ok(handle) => break handle,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("broker start failed, retrying: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        let state = Arc::clone(handle.state());
        Ok(Incarnation {
            runtime: Some(runtime),
            handle: Some(handle),
            state,
            switch,
        })
    }

    /// Pulls the plug. The network goes first: the broker's runtime stops, so no answer
    /// leaves after the disk stopped (an answer sent before it is the truth: the disk still
    /// worked). Then no file operation completes any more, unsynced data is gone, and the
    /// flusher threads are cleared away. Returns when the power went out and each partition's
    /// durable offset at that moment.
    async fn power_loss(mut self, fs: &FaultFs) -> (Instant, Vec<u64>) {
        let handle = self.handle.take();
        let runtime = self.runtime.take();
        tokio::task::spawn_blocking(move || {
            drop(handle);
            if let Some(runtime) = runtime {
                runtime.shutdown_timeout(Duration::from_secs(10));
            }
        })
        .await
        .expect("stop the broker's runtime");
        self.switch.pull();
        let at = Instant::now();
        let durable_offsets = self.logs().iter().map(|log| log.durable_offset()).collect();
        fs.crash();
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || state.storage.shutdown())
            .await
            .expect("stop the dead broker's flushers");
        (at, durable_offsets)
    }

    fn logs(&self) -> Vec<Arc<PartitionLog>> {
        self.state
            .topics
            .get(TOPIC)
            .map(|topic| topic.partitions.clone())
            .unwrap_or_default()
    }

    /// Partitions of every topic that refuse writes, with why.
    fn refusals(&self) -> Vec<String> {
        self.state
            .topics
            .list()
            .iter()
            .flat_map(|topic| topic.partitions.iter())
            .filter_map(|log| {
                log.poison_reason()
                    .map(|reason| format!("{}: {reason}", log.dir().display()))
            })
            .collect()
    }
}

/// Every record of the topic now, read through the partition logs (each batch CRC-checked by
/// the read and validated here), and each partition's end.
fn read_logs(logs: &[Arc<PartitionLog>]) -> anyhow::Result<(Vec<ReadRecord>, BTreeMap<u32, u64>)> {
    let mut records = Vec::new();
    let mut ends = BTreeMap::new();
    for (partition, log) in logs.iter().enumerate() {
        let partition = partition as u32;
        let end = log.latest_offset();
        let mut offset = log.earliest_offset();
        while offset < end {
            let read = log.read(offset, 1 << 20)?;
            anyhow::ensure!(
                !read.records.is_empty(),
                "empty read at {offset} below {end}"
            );
            for batch in split_batches(&read.records) {
                let batch = batch?;
                batch.validate()?;
                for record in batch.records() {
                    let record = record?;
                    let record_offset = record.offset(batch.base_offset());
                    if record_offset >= offset && record_offset < end {
                        records.push(ReadRecord {
                            partition,
                            offset: record_offset,
                            value: String::from_utf8_lossy(record.value).into_owned(),
                        });
                    }
                }
                offset = batch.last_offset() + 1;
            }
        }
        ends.insert(partition, end);
    }
    Ok((records, ends))
}

/// The producers' runtime of one life under acks=leader: they die with the broker.
struct ClientRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What one loop found.
#[derive(Debug, Default)]
struct Outcome {
    cycles: u64,
    acknowledged: usize,
    lost: usize,
    /// The oldest lost record's age at the power loss.
    lost_oldest_ms: u128,
    report_summary: String,
}

/// The loop both modes share: produce, pull the plug at a random moment, recover, check.
async fn power_loss_loop(acks: Acks, fsync: FsyncPolicy, cycles: u64) -> anyhow::Result<Outcome> {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mode = format!("acks={acks:?} fsync={fsync}");
    println!("power loss ({mode}): {cycles} cycles, seed {seed}");
    let fs = FaultFs::new();
    let dir = tempfile::tempdir()?;
    let port = sluice_testkit::process::free_port()?;
    let config = broker_config(dir.path(), port, fsync);
    let url = format!("tcp://127.0.0.1:{port}");
    let mut broker = Incarnation::start(&fs, config.clone()).await?;
    let admin = workload::connect(&url).await?;
    admin
        .admin()
        .create_topic(
            TOPIC,
            PARTITIONS,
            &[("segment_bytes", "16384"), ("max_message_bytes", "16384")],
        )
        .await?;

    // Under acks=durable the producers live through every power loss; under acks=leader a
    // loss makes them fail for good (the broker no longer has sequences they had sent), so
    // each life gets new ones, on a runtime that dies with the broker.
    let durable = acks == Acks::Durable;
    let settings = |index: usize, cycle: u64| ProducerSettings {
        topic: TOPIC.into(),
        name: format!("c{cycle}p{index}"),
        acks,
        window: 16,
        pause: Duration::from_millis(2),
        padding_bytes: 40,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<Arc<Log<Acked>>> = (0..PRODUCERS).map(|_| Arc::default()).collect();
    let mut survivors = Vec::new();
    if durable {
        for (index, log) in logs.iter().enumerate() {
            let client = workload::connect(&url).await?;
            survivors.push(tokio::spawn(workload::produce(
                client,
                settings(index, 0),
                Arc::clone(&stop),
                Arc::clone(log),
            )));
        }
    }

    let mut history = History::default();
    // Acknowledgements not yet checked against a recovered log, and those checked.
    let mut taken: Vec<usize> = vec![0; PRODUCERS];
    let mut outcome = Outcome {
        cycles,
        ..Outcome::default()
    };
    for cycle in 0..cycles {
        let client_runtime = if durable {
            None
        } else {
            let guard = ClientRuntime(Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?,
            ));
            let runtime = guard.0.as_ref().expect("just built");
            for (index, log) in logs.iter().enumerate() {
                let client = runtime.spawn({
                    let url = url.clone();
                    async move { workload::connect(&url).await }
                });
                let client = client.await??;
                runtime.spawn(workload::produce(
                    client,
                    settings(index, cycle),
                    Arc::new(AtomicBool::new(false)),
                    Arc::clone(log),
                ));
            }
            Some(guard)
        };
        tokio::time::sleep(rng.millis(300, 1500)).await;

        // Under acks=leader the producers die first, so every acknowledgement they logged
        // came from this life of the broker. Then the plug is pulled; what each partition had
        // fsynced by then bounds what may be lost.
        if let Some(mut runtime) = client_runtime
            && let Some(runtime) = runtime.0.take()
        {
            tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5)))
                .await?;
        }
        let (crashed_at, durable_at_crash) = broker.power_loss(&fs).await;
        broker = Incarnation::start(&fs, config.clone()).await?;
        let refusals = broker.refusals();
        anyhow::ensure!(
            refusals.is_empty(),
            "{mode}, cycle {cycle}, seed {seed}: recovery refused writes: {refusals:?}"
        );

        // Right after recovery: every partition at least as long as it was durable, and every
        // record acknowledged before the loss either there or, under acks=leader, lost above
        // the durable offset only.
        let (records, ends) = read_logs(&broker.logs())?;
        for (partition, durable_offset) in durable_at_crash.iter().enumerate() {
            let end = ends[&(partition as u32)];
            anyhow::ensure!(
                end >= *durable_offset,
                "{mode}, cycle {cycle}, seed {seed}: partition {partition} recovered to {end}, below its durable offset {durable_offset}"
            );
        }
        let mut cycle_history = History::default();
        let mut acknowledged_before = Vec::new();
        for (index, log) in logs.iter().enumerate() {
            let entries = log.entries();
            let fresh: Vec<Acked> = entries[taken[index]..]
                .iter()
                .take_while(|acked| acked.at < crashed_at)
                .cloned()
                .collect();
            taken[index] += fresh.len();
            acknowledged_before.extend(fresh);
        }
        workload::add_acknowledged(&mut cycle_history, TOPIC, &acknowledged_before);
        workload::add_reads(&mut cycle_history, "recovered", TOPIC, &records);
        for (partition, end) in &ends {
            cycle_history.log_end(TOPIC, *partition, *end);
        }
        let report = cycle_history.check();
        for (position, value) in &report.lost {
            let durable_offset = durable_at_crash[position.partition as usize];
            anyhow::ensure!(
                !durable && position.offset >= durable_offset,
                "{mode}, cycle {cycle}, seed {seed}: lost {value:?} at {position}, below the durable offset {durable_offset}\n{report}"
            );
            let acked = acknowledged_before
                .iter()
                .find(|acked| acked.value == *value)
                .expect("a lost record was acknowledged");
            let age = crashed_at.duration_since(acked.at).as_millis();
            outcome.lost_oldest_ms = outcome.lost_oldest_ms.max(age);
        }
        outcome.lost += report.lost.len();
        anyhow::ensure!(
            report.inconsistent.is_empty()
                && report.duplicated.is_empty()
                && report.nonmonotonic.is_empty()
                && report.skipped.is_empty(),
            "{mode}, cycle {cycle}, seed {seed}: {report}"
        );
        // What survived joins the whole run's history, with this read of the recovered log.
        let lost: std::collections::BTreeSet<&str> = report
            .lost
            .iter()
            .map(|(_, value)| value.as_str())
            .collect();
        let survived: Vec<Acked> = acknowledged_before
            .iter()
            .filter(|acked| !lost.contains(acked.value.as_str()))
            .cloned()
            .collect();
        workload::add_acknowledged(&mut history, TOPIC, &survived);
        workload::add_reads(
            &mut history,
            &format!("after-loss-{cycle}"),
            TOPIC,
            &records,
        );
        outcome.acknowledged += survived.len() + lost.len();
    }

    // The end: the survivors deliver what they still hold, and one last read.
    stop.store(true, Ordering::Release);
    for producer in survivors {
        producer.await??;
    }
    let (records, ends) = read_logs(&broker.logs())?;
    for (index, log) in logs.iter().enumerate() {
        let rest = &log.entries()[taken[index]..];
        outcome.acknowledged += rest.len();
        workload::add_acknowledged(&mut history, TOPIC, rest);
    }
    workload::add_reads(&mut history, "final", TOPIC, &records);
    for (partition, end) in &ends {
        history.log_end(TOPIC, *partition, *end);
    }
    let report = history.check();
    outcome.report_summary = report.summary();
    anyhow::ensure!(
        report.is_valid() && report.unread.is_empty(),
        "{mode}, seed {seed}: {report}"
    );
    let errors: Vec<String> = logs.iter().flat_map(|log| log.errors()).collect();
    if durable {
        anyhow::ensure!(
            errors.is_empty(),
            "{mode}, seed {seed}: records failed: {:?}",
            &errors[..errors.len().min(10)]
        );
    }
    anyhow::ensure!(outcome.acknowledged > 0, "{mode}: nothing was acknowledged");
    broker.power_loss(&fs).await;
    Ok(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_never_loses_a_durable_acknowledgement() -> anyhow::Result<()> {
    let started = Instant::now();
    let cycles = scale(12, 150);
    let outcome = power_loss_loop(
        Acks::Durable,
        FsyncPolicy::Interval(Duration::from_secs(1)),
        cycles,
    )
    .await?;
    println!(
        "power loss (acks=durable): cycles={} acknowledged={} lost={} seconds={} checker: {}",
        outcome.cycles,
        outcome.acknowledged,
        outcome.lost,
        started.elapsed().as_secs(),
        outcome.report_summary
    );
    assert_eq!(outcome.lost, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_under_acks_leader_loses_only_the_unsynced_window() -> anyhow::Result<()> {
    let started = Instant::now();
    let cycles = scale(12, 150);
    let interval = Duration::from_millis(FSYNC_INTERVAL_MS);
    let outcome = power_loss_loop(Acks::Leader, FsyncPolicy::Interval(interval), cycles).await?;
    println!(
        "power loss (acks=leader, fsync=interval:{FSYNC_INTERVAL_MS}): cycles={} acknowledged={} lost={} oldest_lost_ms={} seconds={} checker: {}",
        outcome.cycles,
        outcome.acknowledged,
        outcome.lost,
        outcome.lost_oldest_ms,
        started.elapsed().as_secs(),
        outcome.report_summary
    );
    // Every lost record lay at or above its partition's durable offset at the loss (checked
    // in each cycle, with the history); how long before the loss it was acknowledged is
    // reported above, not bounded: that is wall-clock time on a shared machine.
    Ok(())
}

/// A segment created by a roll must be durably linked into its directory before anything in
/// it is acknowledged as durable. Here the background writes that would otherwise sync the
/// directory by the way (the closed segment's index, the producer snapshot) fail on a full disk,
/// while the append itself fits: the disk refuses every write but those to segment files, since
/// the flusher writes the closed segment's index while the append writes its bytes, in either
/// order.
#[tokio::test]
async fn an_append_acknowledged_durable_just_after_a_roll_survives_power_loss() {
    let fs = FaultFs::new();
    let storage = Storage::new(
        Arc::new(fs.clone()),
        StorageOptions {
            fsync: FsyncPolicy::Never,
            flusher_threads: 1,
            ..StorageOptions::default()
        },
    );
    let config = LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        max_message_bytes: 4096,
        retention_ms: None,
        ..LogConfig::default()
    };
    let dir = PathBuf::from("/data/topics/t/0");
    let log = storage.open_log(&dir, config.clone()).unwrap();
    let batch = |tag: u64| {
        let mut builder = RecordBatchBuilder::new();
        builder.append(0, None, &tag.to_be_bytes().repeat(40), &[]);
        builder.build()
    };
    let batch_bytes = batch(0).size_bytes() as u64;
    let per_segment = config.segment_bytes / batch_bytes;
    let mut tag = 0;
    // Up to the first roll, every append acknowledged durable (the first segment's index and
    // the snapshot written at the roll sync the directory on their way).
    while log.segment_count() == 1 {
        let info = log.append(batch(tag)).unwrap();
        tag += 1;
        log.wait_durable(info.last_offset + 1).await.unwrap();
        if log.segment_count() == 1 {
            log.checkpoint_recovery_point().unwrap();
        }
    }
    // The second segment holds one batch: fill it.
    for _ in 1..per_segment {
        log.append(batch(tag)).unwrap();
        tag += 1;
    }
    assert_eq!(log.segment_count(), 2);
    // The next append rolls, on a disk with room for its bytes and nothing else.
    let last = batch(tag);
    fs.fail_writes_sparing(FaultKind::Enospc, |path| {
        path.extension().is_some_and(|extension| extension == "log")
    });
    let info = log.append(last).unwrap();
    assert_eq!(log.segment_count(), 3, "the append rolled");
    log.wait_durable(info.last_offset + 1)
        .await
        .expect("the data itself could be fsynced");
    fs.crash();
    fs.clear_faults();
    drop(log);
    let log = storage.open_log(&dir, config).unwrap();
    assert!(log.poison_reason().is_none(), "{:?}", log.poison_reason());
    assert!(
        log.latest_offset() > info.last_offset,
        "offset {} was acknowledged as durable, but the log recovered to {} (segment files: {:?})",
        info.last_offset,
        log.latest_offset(),
        log.segment_base_offsets()
    );
    storage.shutdown();
}
