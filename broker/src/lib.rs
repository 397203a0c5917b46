//! The Sluice broker: configuration, listeners, request handlers, storage, topics, consumer
//! groups and producer state (see DESIGN.md).
//!
//! ```text
//! Broker::start(Config) ─▶ Storage (flusher threads) ─▶ TopicRegistry (recovers every partition)
//!                       ├▶ TCP listener ─▶ connection::serve ─▶ handlers ─▶ PartitionLog
//!                       └▶ QUIC endpoint ─▶ each stream: connection::serve (same handlers)
//! ```
//!
//! [`Broker::start`] returns a [`BrokerHandle`] with the bound addresses (port 0 works) and
//! [`BrokerHandle::shutdown`]; `main.rs`, the tests, the examples and `sluice-bench --embedded`
//! all start the broker this way.

pub mod config;
pub mod connection;
pub mod fetch_budget;
#[doc(hidden)]
pub mod fuzzing;
pub mod groups;
pub mod handlers;
pub mod metrics;
pub mod producers;
pub mod server;
pub mod storage;
pub mod tls;
pub mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

pub use config::Config;

use storage::{RealFs, Storage};
use topics::{TopicLimits, TopicRegistry};

/// What every connection and handler shares.
#[derive(Debug)]
pub struct BrokerState {
    pub config: Config,
    pub storage: Arc<Storage>,
    pub topics: TopicRegistry,
    pub groups: Arc<groups::GroupManager>,
    /// Idempotent-producer ids, epochs and names.
    pub producers: producers::ProducerRegistry,
    pub tcp_addr: SocketAddr,
    /// Open client connections, TCP and QUIC together: `limits.max_connections` permits.
    pub connection_slots: Arc<Semaphore>,
    /// The broker's metrics, served at `/metrics`.
    pub metrics: metrics::Metrics,
    /// `limits.fetch_response_budget_bytes`, shared by every fetch.
    pub fetch_budget: fetch_budget::FetchBudget,
    /// Set once recovery is done and every listener is up (`/readyz`).
    ready: AtomicBool,
    shutdown: watch::Sender<bool>,
}

impl BrokerState {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Recovery is done and the listeners are up (shutdown does not clear it).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Changes once, when shutdown starts.
    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot bind {what} {address}: {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the data directory {path}: {message}")]
    Storage { path: String, message: String },
    #[error("QUIC certificate: {0}")]
    Tls(#[from] tls::TlsError),
}

/// The broker.
#[derive(Debug)]
pub struct Broker;

/// A running broker.
#[derive(Debug)]
pub struct BrokerHandle {
    /// Where the TCP listener is bound.
    pub tcp_addr: SocketAddr,
    /// Where the QUIC endpoint is bound, once QUIC is served.
    pub quic_addr: Option<SocketAddr>,
    /// Where the HTTP admin port is bound, once it is served.
    pub http_addr: Option<SocketAddr>,
    state: Arc<BrokerState>,
    tasks: Vec<JoinHandle<()>>,
    /// Stopped last, so `/readyz` answers 503 while connections drain.
    http: server::http::HttpServer,
}

/// The wall clock in milliseconds since the epoch (0 before it, saturating far after).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

impl Broker {
    /// Opens the data directory (recovering every partition), binds the listeners and starts
    /// serving. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// An invalid configuration, an address that cannot be bound, or a data directory that
    /// cannot be opened.
    pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
        Self::start_with_fs(config, Arc::new(RealFs)).await
    }

    /// [`Broker::start`] with the storage engine over `fs` instead of the real disk: the
    /// reliability tests run the whole broker over `storage::faultfs::FaultFs` to pull the plug
    /// on it. The QUIC certificate still goes to the real `data_dir`.
    ///
    /// # Errors
    /// As [`Broker::start`].
    pub async fn start_with_fs(
        config: Config,
        fs: storage::Fs,
    ) -> Result<BrokerHandle, StartError> {
        config
            .validate()
            .map_err(|error| StartError::Config(error.to_string()))?;
        let listener = TcpListener::bind(config.listeners.tcp)
            .await
            .map_err(|source| StartError::Bind {
                what: "tcp",
                address: config.listeners.tcp,
                source,
            })?;
        let tcp_addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: "tcp",
            address: config.listeners.tcp,
            source,
        })?;
        let (quic_endpoint, quic_addr) = server::quic::bind(&config).await?;
        let http_listener = TcpListener::bind(config.listeners.http)
            .await
            .map_err(|source| StartError::Bind {
                what: "http",
                address: config.listeners.http,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "http",
                address: config.listeners.http,
                source,
            })?;
        let metrics = metrics::Metrics::new();
        let fsync_observer = metrics.fsync_observer();
        let data_dir = config.data_dir.clone();
        let storage_options = config.storage_options();
        let log_config = config.log_config();
        let limits = TopicLimits {
            max_topics: config.limits.max_topics,
            max_partitions_per_topic: config.limits.max_partitions_per_topic,
        };
        // Recovery reads and fsyncs files: off the async runtime.
        let (storage, topics) = tokio::task::spawn_blocking(move || {
            let storage = Arc::new(Storage::new(fs, storage_options));
            storage.observe_fsyncs(fsync_observer);
            let topics = TopicRegistry::open(&data_dir, Arc::clone(&storage), log_config, limits);
            (storage, topics)
        })
        .await
        .map_err(|error| StartError::Storage {
            path: config.data_dir.display().to_string(),
            message: error.to_string(),
        })?;
        let topics = topics.map_err(|error| {
            storage.shutdown();
            StartError::Storage {
                path: config.data_dir.display().to_string(),
                message: error.message,
            }
        })?;
        let group_settings = groups::coordinator::GroupSettings {
            min_session_timeout_ms: config.limits.group_min_session_timeout_ms as u32,
            max_session_timeout_ms: config.limits.group_max_session_timeout_ms as u32,
            offsets_retention_ms: config.limits.group_offsets_retention_ms,
            ..groups::coordinator::GroupSettings::default()
        };
        let (topics, groups) = tokio::task::spawn_blocking(move || {
            let groups = open_groups(&topics, group_settings);
            (topics, groups)
        })
        .await
        .map_err(|error| StartError::Storage {
            path: config.data_dir.display().to_string(),
            message: error.to_string(),
        })?;
        let groups = groups.map_err(|message| StartError::Storage {
            path: config.data_dir.display().to_string(),
            message,
        })?;
        let producers = {
            let (fs, data_dir) = (Arc::clone(storage.fs()), config.data_dir.clone());
            let max_names = config.limits.max_producers;
            tokio::task::spawn_blocking(move || {
                producers::ProducerRegistry::open(&data_dir, fs, max_names)
            })
            .await
            .map_err(|error| error.to_string())
            .and_then(|opened| opened.map_err(|error| error.message))
            .map_err(|message| StartError::Storage {
                path: config.data_dir.display().to_string(),
                message,
            })?
        };
        let (shutdown, _) = watch::channel(false);
        let retention_every = Duration::from_millis(config.storage.retention_check_ms.max(1));
        let connection_slots = Arc::new(Semaphore::new(
            config.limits.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let fetch_budget =
            fetch_budget::FetchBudget::new(config.limits.fetch_response_budget_bytes);
        let state = Arc::new(BrokerState {
            config,
            storage,
            topics,
            groups,
            producers,
            tcp_addr,
            connection_slots,
            metrics,
            fetch_budget,
            ready: AtomicBool::new(false),
            shutdown,
        });
        tracing::info!(%tcp_addr, data_dir = %state.config.data_dir.display(), topics = state.topics.len(), "broker started");
        let mut tasks = vec![tokio::spawn(server::tcp::accept_loop(
            listener,
            Arc::clone(&state),
        ))];
        tasks.push(tokio::spawn(server::quic::accept_loop(
            quic_endpoint,
            Arc::clone(&state),
        )));
        let expiry_state = Arc::clone(&state);
        tasks.push(tokio::spawn(async move {
            // Sessions are checked often enough that a member expires within a fraction of a
            // second of its deadline.
            let mut shutdown = expiry_state.shutdown_receiver();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                }
                expiry_state.groups.expire(&expiry_state.topics);
            }
        }));
        let retention_state = Arc::clone(&state);
        tasks.push(tokio::spawn(async move {
            let mut shutdown = retention_state.shutdown_receiver();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(retention_every) => {}
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                }
                let state = Arc::clone(&retention_state);
                let _ =
                    tokio::task::spawn_blocking(move || state.topics.enforce_retention(now_ms()))
                        .await;
            }
        }));
        let http = server::http::HttpServer::start(http_listener, http_addr, Arc::clone(&state));
        state.ready.store(true, Ordering::Release);
        Ok(BrokerHandle {
            tcp_addr,
            quic_addr: Some(quic_addr),
            http_addr: Some(http_addr),
            state,
            tasks,
            http,
        })
    }
}

/// Opens `__consumer_offsets` (creating it on first start) and the committed offsets in it.
fn open_groups(
    topics: &TopicRegistry,
    settings: groups::coordinator::GroupSettings,
) -> Result<Arc<groups::GroupManager>, String> {
    let topic = topics
        .ensure_internal(groups::offsets::OFFSETS_TOPIC, 1)
        .map_err(|error| error.message)?;
    let log = topic
        .partition(0)
        .cloned()
        .ok_or_else(|| format!("{} has no partition 0", groups::offsets::OFFSETS_TOPIC))?;
    let groups_dir = topics.data_dir().join("groups");
    let store =
        groups::offsets::OffsetStore::open(Arc::clone(topics.storage().fs()), groups_dir, log)?;
    Ok(Arc::new(groups::GroupManager::new(settings, store)))
}

impl BrokerHandle {
    /// The shared state, for embedding and tests.
    pub fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish, syncs and checkpoints every partition.
    pub async fn shutdown(self) {
        let _ = self.shutdown_reporting().await;
    }

    /// [`shutdown`](Self::shutdown), telling whether everything was closed cleanly: an error
    /// names how many partitions could not be fsynced or checkpointed at the end (what they
    /// held since their last fsync may be lost), or that closing them failed outright.
    ///
    /// # Errors
    /// As above; the broker is stopped either way.
    pub async fn shutdown_reporting(self) -> Result<(), String> {
        tracing::info!("broker shutting down");
        self.state.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.http.stop().await;
        let state = Arc::clone(&self.state);
        let closed = tokio::task::spawn_blocking(move || {
            let failed = state.topics.close_all();
            state.storage.shutdown();
            failed
        })
        .await;
        let outcome = match closed {
            Ok(0) => Ok(()),
            Ok(failed) => Err(format!(
                "{failed} partitions could not be fsynced or checkpointed at shutdown"
            )),
            Err(error) => Err(format!("closing the partitions failed: {error}")),
        };
        tracing::info!("broker stopped");
        outcome
    }
}
