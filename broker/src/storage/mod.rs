//! The broker's storage: partitioned append-only logs in segment files.
//!
//! ```text
//! <data-dir>/topics/<topic>/<partition>/
//!     00000000000000000000.log        record batches, back to back, as producers built them
//!     00000000000000000000.index      sparse: relative offset u32 -> file position u32
//!     00000000000000000000.timeindex  sparse: max timestamp i64 -> relative offset u32
//!     recovery-point                  offset below which everything is known fsynced
//! ```
//!
//! Modules: [`fs`] the filesystem trait (the real disk, and [`faultfs`] for tests), [`log`] the
//! partition log, [`segment`] segment files and the bounded cache of open ones, [`index`] the
//! sparse indexes, [`recovery`] what happens on open, [`flusher`] fsync off the runtime,
//! [`group_commit`] the durability state machine that shares fsyncs between appenders, and
//! [`signal`] the high-watermark publish/notify protocol (both modelled with loom).
//!
//! [`Storage`] is what a broker holds: the filesystem, the flusher threads and the segment
//! cache shared by every [`PartitionLog`] it opens.

pub mod config;
pub mod error;
pub mod faultfs;
pub(crate) mod flusher;
pub mod fs;
pub(crate) mod group_commit;
pub mod index;
pub mod log;
pub(crate) mod recovery;
pub mod segment;
pub mod signal;
pub(crate) mod sync;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use config::{FsyncPolicy, LogConfig};
pub use error::StorageError;
pub use fs::{Fs, RealFs};
pub use log::{AppendInfo, IdempotentAppend, PartitionLog, ReadResult};

use flusher::Flusher;
use segment::SegmentCache;

use crate::producers::ProducerBudget;

/// Broker-wide storage settings.
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Background fsync policy for weak-ack data.
    pub fsync: FsyncPolicy,
    /// Threads running fsyncs. Default 2.
    pub flusher_threads: usize,
    /// Closed segments kept open at once, across all partitions. Default 256.
    pub open_segments_max: usize,
    /// How often each partition's recovery point is checkpointed. Default 60 s.
    pub recovery_checkpoint_ms: u64,
    /// Idempotent-producer states (one per producer and partition) held across every log.
    /// Default 100000.
    pub max_producers: usize,
    /// Idle time after which a producer's state in a partition may be dropped. Default 7 days.
    pub producer_expiry_ms: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            fsync: FsyncPolicy::default(),
            flusher_threads: 2,
            open_segments_max: 256,
            recovery_checkpoint_ms: 60_000,
            max_producers: 100_000,
            producer_expiry_ms: 7 * 24 * 60 * 60 * 1000,
        }
    }
}

/// Called after each fsync of a segment file with how long it took, whether it succeeded or
/// not (the broker's metrics). It runs on a flusher thread, and for recovery's fsyncs on the
/// thread opening the logs, so it must be quick and must not block; it is set once, before
/// any log is opened.
pub struct FsyncObserver(Box<dyn Fn(Duration) + Send + Sync>);

impl FsyncObserver {
    pub fn new(observe: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        FsyncObserver(Box::new(observe))
    }

    pub fn observe(&self, elapsed: Duration) {
        (self.0)(elapsed);
    }
}

impl std::fmt::Debug for FsyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsyncObserver")
    }
}

/// What every log of a broker shares.
#[derive(Debug)]
pub(crate) struct StorageShared {
    pub(crate) fs: Fs,
    pub(crate) fsync: FsyncPolicy,
    pub(crate) cache: SegmentCache,
    pub(crate) flusher: Flusher,
    pub(crate) fsync_observer: OnceLock<FsyncObserver>,
    pub(crate) producer_budget: Arc<ProducerBudget>,
    pub(crate) producer_expiry_ms: u64,
}

impl StorageShared {
    /// Reports one fsync to the observer, if there is one.
    pub(crate) fn observe_fsync(&self, elapsed: Duration) {
        if let Some(observer) = self.fsync_observer.get() {
            observer.observe(elapsed);
        }
    }
}

/// The storage engine of one broker.
#[derive(Debug)]
pub struct Storage {
    shared: Arc<StorageShared>,
}

impl Storage {
    /// Starts the flusher threads.
    pub fn new(fs: Fs, options: StorageOptions) -> Storage {
        let flusher = Flusher::start(
            options.flusher_threads,
            options.fsync,
            Duration::from_millis(options.recovery_checkpoint_ms.max(1)),
        );
        Storage {
            shared: Arc::new(StorageShared {
                fs,
                fsync: options.fsync,
                cache: SegmentCache::new(options.open_segments_max),
                flusher,
                fsync_observer: OnceLock::new(),
                producer_budget: ProducerBudget::new(options.max_producers),
                producer_expiry_ms: options.producer_expiry_ms,
            }),
        }
    }

    /// Sets what is told about every fsync of a segment file. Only the first call counts: set
    /// it before opening logs.
    pub fn observe_fsyncs(&self, observer: FsyncObserver) {
        if self.shared.fsync_observer.set(observer).is_err() {
            tracing::warn!("an fsync observer was set already; keeping the first");
        }
    }

    /// Opens the log in `dir`, recovering it, or creates it.
    pub fn open_log(
        &self,
        dir: &Path,
        config: LogConfig,
    ) -> Result<Arc<PartitionLog>, StorageError> {
        PartitionLog::open(Arc::clone(&self.shared), dir, config)
    }

    pub fn fs(&self) -> &Fs {
        &self.shared.fs
    }

    /// Idempotent-producer states held right now, across every log.
    pub fn producer_count(&self) -> usize {
        self.shared.producer_budget.used()
    }

    /// Closed segments open right now, across every log.
    pub fn open_segment_count(&self) -> usize {
        self.shared.cache.len()
    }

    /// Stops the flusher threads. Close the logs first (`PartitionLog::close`) to sync them.
    pub fn shutdown(&self) {
        self.shared.flusher.stop();
    }
}
