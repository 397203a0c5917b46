//! The Sluice broker: configuration, listeners, request handlers, storage, topics, consumer
//! groups and producer state (see DESIGN.md).
//!
//! ```text
//! Broker::start(Config) ─▶ Storage (flusher threads) ─▶ TopicRegistry (recovers every partition)
//!                       └▶ TCP listener ─▶ connection::serve ─▶ handlers ─▶ PartitionLog
//! ```
//!
//! [`Broker::start`] returns a [`BrokerHandle`] with the bound addresses (port 0 works) and
//! [`BrokerHandle::shutdown`]; `main.rs`, the tests, the examples and `sluice-bench --embedded`
//! all start the broker this way.

pub mod config;
pub mod connection;
pub mod handlers;
pub mod server;
pub mod storage;
pub mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;
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
    pub tcp_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl BrokerState {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
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
}

fn now_ms() -> u64 {
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
        let data_dir = config.data_dir.clone();
        let storage_options = config.storage_options();
        let log_config = config.log_config();
        let limits = TopicLimits {
            max_topics: config.limits.max_topics,
            max_partitions_per_topic: config.limits.max_partitions_per_topic,
        };
        // Recovery reads and fsyncs files: off the async runtime.
        let (storage, topics) = tokio::task::spawn_blocking(move || {
            let storage = Arc::new(Storage::new(Arc::new(RealFs), storage_options));
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
        let (shutdown, _) = watch::channel(false);
        let retention_every = Duration::from_millis(config.storage.retention_check_ms.max(1));
        let state = Arc::new(BrokerState {
            config,
            storage,
            topics,
            tcp_addr,
            shutdown,
        });
        tracing::info!(%tcp_addr, data_dir = %state.config.data_dir.display(), topics = state.topics.len(), "broker started");
        let mut tasks = vec![tokio::spawn(server::tcp::accept_loop(
            listener,
            Arc::clone(&state),
        ))];
        let retention_state = Arc::clone(&state);
        tasks.push(tokio::spawn(async move {
            let mut shutdown = retention_state.shutdown_receiver();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(retention_every) => {}
                    _ = shutdown.changed() => return,
                }
                let state = Arc::clone(&retention_state);
                let _ =
                    tokio::task::spawn_blocking(move || state.topics.enforce_retention(now_ms()))
                        .await;
            }
        }));
        Ok(BrokerHandle {
            tcp_addr,
            quic_addr: None,
            http_addr: None,
            state,
            tasks,
        })
    }
}

impl BrokerHandle {
    /// The shared state, for embedding and tests.
    pub fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish, syncs and checkpoints every partition.
    pub async fn shutdown(self) {
        tracing::info!("broker shutting down");
        self.state.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let state = Arc::clone(&self.state);
        let _ = tokio::task::spawn_blocking(move || {
            state.topics.close_all();
            state.storage.shutdown();
        })
        .await;
        tracing::info!("broker stopped");
    }
}
