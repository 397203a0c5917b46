//! The flusher: fsync off the async runtime, with group commit.
//!
//! Appends land in the page cache on the caller's thread. Everything that must reach the disk
//! goes through here: a pool of threads takes sync jobs from a crossbeam channel, and a ticker
//! thread turns the `interval:<ms>` policy and the recovery-point checkpoints into jobs.
//!
//! Group commit is the state machine in [`super::group_commit`], one per
//! [`super::log::PartitionLog`]: while one fsync of a partition runs, every append that wants
//! durability registers a waiter and raises the partition's requested offset; when the fsync
//! returns, it releases every waiter it covered and, if some asked for more, runs once more for
//! all of them together. N concurrent appenders therefore cost about two fsyncs per round, not
//! N.

use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::config::FsyncPolicy;
use super::log::PartitionLog;
use super::segment::Segment;

pub(crate) enum Job {
    /// Sync this partition up to what it has requested.
    Sync(Arc<PartitionLog>),
    /// Write a closed segment's indexes.
    PersistIndex(Arc<PartitionLog>, Arc<Segment>),
    /// Write a producer-state snapshot taken at a roll: (log, offset, file contents).
    PersistSnapshot(Arc<PartitionLog>, u64, Vec<u8>),
    Stop,
}

pub(crate) enum Tick {
    /// The partition has weak-ack data to sync at the next interval.
    Dirty(Arc<PartitionLog>),
    /// Track this partition for periodic checkpoints.
    Register(Weak<PartitionLog>),
    Stop,
}

/// The threads behind [`super::Storage`].
#[derive(Debug)]
pub(crate) struct Flusher {
    jobs: Sender<Job>,
    ticks: Sender<Tick>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    worker_count: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Sync(log) => write!(f, "Sync({})", log.dir().display()),
            Job::PersistIndex(_, segment) => {
                write!(f, "PersistIndex({})", segment.paths.log.display())
            }
            Job::PersistSnapshot(log, offset, _) => {
                write!(f, "PersistSnapshot({}, {offset})", log.dir().display())
            }
            Job::Stop => f.write_str("Stop"),
        }
    }
}

impl Flusher {
    pub(crate) fn start(
        worker_count: usize,
        policy: FsyncPolicy,
        checkpoint_every: Duration,
    ) -> Flusher {
        let worker_count = worker_count.max(1);
        let (jobs, job_receiver) = crossbeam_channel::unbounded::<Job>();
        let (ticks, tick_receiver) = crossbeam_channel::unbounded::<Tick>();
        let mut threads = Vec::with_capacity(worker_count + 1);
        for index in 0..worker_count {
            let receiver = job_receiver.clone();
            let jobs = jobs.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sluice-flusher-{index}"))
                    .spawn(move || run_worker(&receiver, &jobs))
                    .expect("spawn flusher thread"),
            );
        }
        let sync_every = match policy {
            FsyncPolicy::Interval(every) => Some(every),
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        threads.push(
            std::thread::Builder::new()
                .name("sluice-flush-ticker".into())
                .spawn(move || run_ticker(&tick_receiver, sync_every, checkpoint_every))
                .expect("spawn ticker thread"),
        );
        Flusher {
            jobs,
            ticks,
            threads: Mutex::new(threads),
            worker_count,
        }
    }

    pub(crate) fn sync(&self, log: Arc<PartitionLog>) {
        // Send fails only after stop(): the log then fails its waiters itself.
        let _ = self.jobs.send(Job::Sync(log));
    }

    pub(crate) fn persist_index(&self, log: Arc<PartitionLog>, segment: Arc<Segment>) {
        let _ = self.jobs.send(Job::PersistIndex(log, segment));
    }

    pub(crate) fn persist_snapshot(&self, log: Arc<PartitionLog>, offset: u64, contents: Vec<u8>) {
        let _ = self.jobs.send(Job::PersistSnapshot(log, offset, contents));
    }

    pub(crate) fn mark_dirty(&self, log: Arc<PartitionLog>) {
        let _ = self.ticks.send(Tick::Dirty(log));
    }

    pub(crate) fn register(&self, log: Weak<PartitionLog>) {
        let _ = self.ticks.send(Tick::Register(log));
    }

    /// Stops the threads after the jobs already queued.
    pub(crate) fn stop(&self) {
        let _ = self.ticks.send(Tick::Stop);
        for _ in 0..self.worker_count {
            let _ = self.jobs.send(Job::Stop);
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("flusher lock poisoned"));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn run_worker(receiver: &Receiver<Job>, jobs: &Sender<Job>) {
    while let Ok(job) = receiver.recv() {
        match job {
            Job::Sync(log) => {
                if log.run_sync() {
                    // Someone asked for more while this fsync ran: one more for all of them.
                    let _ = jobs.send(Job::Sync(log));
                }
            }
            Job::PersistIndex(log, segment) => log.persist_index(&segment),
            Job::PersistSnapshot(log, offset, contents) => {
                log.persist_rolled_snapshot(offset, &contents);
            }
            Job::Stop => return,
        }
    }
}

fn run_ticker(receiver: &Receiver<Tick>, sync_every: Option<Duration>, checkpoint_every: Duration) {
    let mut dirty: Vec<Arc<PartitionLog>> = Vec::new();
    let mut registered: Vec<Weak<PartitionLog>> = Vec::new();
    let mut next_sync = sync_every.map(|every| Instant::now() + every);
    let mut next_checkpoint = Instant::now() + checkpoint_every;
    loop {
        let deadline = next_sync.map_or(next_checkpoint, |at| at.min(next_checkpoint));
        match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Tick::Dirty(log)) => dirty.push(log),
            Ok(Tick::Register(log)) => registered.push(log),
            Ok(Tick::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_sync, sync_every)
            && now >= at
        {
            for log in dirty.drain(..) {
                log.clear_dirty();
                log.request_sync(None);
            }
            next_sync = Some(now + every);
        }
        if now >= next_checkpoint {
            registered.retain(|log| match log.upgrade() {
                Some(log) => {
                    if let Err(error) = log.checkpoint_recovery_point() {
                        tracing::warn!(dir = %log.dir().display(), %error, "recovery-point checkpoint failed");
                    }
                    true
                }
                None => false,
            });
            next_checkpoint = now + checkpoint_every;
        }
    }
}
