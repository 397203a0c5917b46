//! The broker's configuration: one serde struct per section of `sluice.toml`, the command line,
//! and how the two meet the environment.
//!
//! ```text
//! defaults ──▶ --config FILE ──▶ SLUICE_<SECTION>_<KEY> ──▶ SLUICE_TCP … ──▶ --tcp … ──▶ validate()
//! (Default)    (TOML, [section]   (every option, parsed     (clap's short   (flags win)
//!               key = value)       as a TOML value)          variables)
//! ```
//!
//! Precedence is flags > environment > file > defaults. Every option has a dotted name,
//! `section.key` (`limits.max_frame_bytes`), or just `key` for the top-level `data_dir`; the same
//! name is the key in the file and, upper-cased with `_` for `.`, the environment variable
//! (`SLUICE_LIMITS_MAX_FRAME_BYTES`). A few options also have a flag and a short variable of
//! their own (see [`Cli`]). `sluice.example.toml` at the repository root documents every key.
//!
//! Every error is a [`ConfigError`] whose `Display` is one line naming the option (and the file
//! or variable it came from), so `main` can print `sluice-broker: <error>` and exit 2.
//!
//! Choices made here:
//! - No file is read unless `--config`/`SLUICE_CONFIG` names one: a file found by accident in the
//!   working directory should not change how the broker runs.
//! - An environment value is read as a TOML value (`1048576`, `-1`, `true`, `["a", "b"]`); when
//!   that does not fit the option it is taken as a plain string, then as a comma-separated list,
//!   so `SLUICE_STORAGE_FSYNC=always` and `SLUICE_LISTENERS_TLS_NAMES=a.example,b.example` work
//!   without quotes. An empty value is an error, as clap makes it for its own variables: it is
//!   more often `SLUICE_X=$UNSET_VARIABLE` than a wish for an empty setting.
//! - An unknown `SLUICE_*` variable is an error, so a typo cannot silently do nothing. The
//!   variables of the other tools (`SLUICE_BROKER`, `SLUICE_CA_FILE`, `SLUICE_BENCH_DIR`) are
//!   ignored.
//! - When both the short variable (`SLUICE_TCP`) and the long one (`SLUICE_LISTENERS_TCP`) are
//!   set, the short one wins: clap turns it into a flag value.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer};
use sluice_protocol::frame::{DEFAULT_MAX_FRAME_BYTES, REQUEST_HEADER_BYTES};
use toml::{Table, Value};
use tracing_subscriber::EnvFilter;

use crate::storage::{FsyncPolicy, LogConfig, StorageOptions};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
const MIB: u32 = 1024 * 1024;

/// Longest topic name, in bytes (DESIGN.md: `[A-Za-z0-9._-]{1,249}`).
const MAX_TOPIC_NAME_BYTES: u32 = crate::topics::MAX_TOPIC_NAME_BYTES as u32;

/// Bytes a produce request adds around one record batch for one partition of a topic with the
/// longest possible name: request header, `acks u8`, `timeout_ms u32`, topic count `u32`, name
/// (`u16` length + 249 bytes), partition count `u32`, `partition u32` and the batch's `u32`
/// length: with [`FETCH_FRAMING_BYTES`], it makes [`BATCH_FRAMING_BYTES`].
pub const PRODUCE_FRAMING_BYTES: u32 =
    REQUEST_HEADER_BYTES as u32 + 1 + 4 + 4 + 2 + MAX_TOPIC_NAME_BYTES + 4 + 4 + 4;

/// Bytes a fetch response adds around one record batch of one partition of a topic with the
/// longest possible name: response header, topic count `u32`, name (`u16` length + 249 bytes),
/// partition count `u32`, and the partition's `partition u32`, `error_code u16`, high
/// watermark and log start offset `u64`s and the records' `u32` length. A consumer must be
/// able to fetch any batch the broker accepted.
pub const FETCH_FRAMING_BYTES: u32 = sluice_protocol::frame::RESPONSE_HEADER_BYTES as u32
    + 4
    + 2
    + MAX_TOPIC_NAME_BYTES
    + 4
    + (4 + 2 + 8 + 8 + 4);

/// Framing around the largest batch, in a request or an answer: `limits.max_batch_bytes` plus
/// this must fit in `limits.max_frame_bytes`.
pub const BATCH_FRAMING_BYTES: u32 = if PRODUCE_FRAMING_BYTES > FETCH_FRAMING_BYTES {
    PRODUCE_FRAMING_BYTES
} else {
    FETCH_FRAMING_BYTES
};

/// Smallest `limits.max_frame_bytes` accepted: below it not even metadata responses fit.
pub const MIN_FRAME_BYTES: u32 = 1024;

/// Environment variables that start with `SLUICE_` but belong to other tools: the client's
/// broker URL and CA file, and the storage benchmark's directory. The broker ignores them.
pub const FOREIGN_VARIABLES: [&str; 3] = ["SLUICE_BROKER", "SLUICE_CA_FILE", "SLUICE_BENCH_DIR"];

/// The variable naming the configuration file (the `--config` flag's).
pub const CONFIG_VARIABLE: &str = "SLUICE_CONFIG";

/// Short variables clap reads for the flags, and the option each one sets. `data_dir`'s short
/// and long forms are the same name, `SLUICE_DATA_DIR`.
pub const FLAG_VARIABLES: [(&str, &str); 6] = [
    ("SLUICE_DATA_DIR", "data_dir"),
    ("SLUICE_TCP", "listeners.tcp"),
    ("SLUICE_QUIC", "listeners.quic"),
    ("SLUICE_HTTP", "listeners.http"),
    ("SLUICE_FSYNC", "storage.fsync"),
    ("SLUICE_LOG_FORMAT", "logging.format"),
];

const ENVIRONMENT_PREFIX: &str = "SLUICE_";

const LONG_ABOUT: &str = "\
The Sluice message broker: serves the Sluice protocol over TCP and QUIC, and /livez, /readyz and \
/metrics over HTTP.

Every option has a default. Options are set, from weakest to strongest, by:
  1. the TOML file named by --config or SLUICE_CONFIG (no file is read without one; \
sluice.example.toml documents every key),
  2. environment variables SLUICE_<SECTION>_<KEY>, e.g. SLUICE_LIMITS_MAX_FRAME_BYTES=1048576, \
SLUICE_STORAGE_FSYNC=always, SLUICE_LOGGING_FILTER=debug (an unknown SLUICE_ variable is an \
error),
  3. the short variables below (SLUICE_TCP, ...),
  4. the flags below.
RUST_LOG, when set, replaces logging.filter.

Exit codes: 0 success, 1 runtime error, 2 usage or configuration error.";

/// The command line of `sluice-broker`. Every flag is optional and has no clap default, so
/// [`load`] can tell "not given" from "given the default value" and a flag never hides what the
/// file or the environment set. clap folds each flag's own environment variable in.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Parser)]
#[command(
    name = "sluice-broker",
    version,
    about = "The Sluice message broker",
    long_about = LONG_ABOUT
)]
pub struct Cli {
    /// TOML configuration file. Without it no file is read.
    #[arg(long, env = "SLUICE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Directory holding topics, offsets and certificates (data_dir). Default ./sluice-data.
    #[arg(long, env = "SLUICE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TCP listen address, IP:PORT (listeners.tcp). Default 127.0.0.1:7171.
    #[arg(long, env = "SLUICE_TCP", value_name = "ADDR", value_parser = clap::value_parser!(SocketAddr))]
    pub tcp: Option<SocketAddr>,
    /// QUIC (UDP) listen address, IP:PORT (listeners.quic). Default 127.0.0.1:7171.
    #[arg(long, env = "SLUICE_QUIC", value_name = "ADDR", value_parser = clap::value_parser!(SocketAddr))]
    pub quic: Option<SocketAddr>,
    /// HTTP admin listen address, IP:PORT (listeners.http). Default 127.0.0.1:7172.
    #[arg(long, env = "SLUICE_HTTP", value_name = "ADDR", value_parser = clap::value_parser!(SocketAddr))]
    pub http: Option<SocketAddr>,
    /// Background fsync of data written with acks weaker than durable (storage.fsync).
    /// Default interval:1000.
    #[arg(long, env = "SLUICE_FSYNC", value_name = "always|interval:MS|never", value_parser = clap::value_parser!(FsyncPolicy))]
    pub fsync: Option<FsyncPolicy>,
    /// Log line format (logging.format). Default text.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_name = "text|json", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The whole broker configuration. `Config::default()` is what runs when nothing is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding topics, consumer offsets, producer state and the self-signed
    /// certificate. Default `./sluice-data`.
    pub data_dir: PathBuf,
    /// `[listeners]`: where the broker listens.
    pub listeners: Listeners,
    /// `[storage]`: broker-wide storage engine settings.
    pub storage: Storage,
    /// `[log]`: defaults of every topic's partition logs, which topics may override.
    pub log: LogDefaults,
    /// `[limits]`: bounds on what clients can make the broker hold or do.
    pub limits: Limits,
    /// `[logging]`: the broker's own log lines.
    pub logging: Logging,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./sluice-data"),
            listeners: Listeners::default(),
            storage: Storage::default(),
            log: LogDefaults::default(),
            limits: Limits::default(),
            logging: Logging::default(),
        }
    }
}

/// `[listeners]`: listen addresses and the QUIC certificate.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// TCP address of the Sluice protocol. Port 0 picks a free port. Default `127.0.0.1:7171`.
    pub tcp: SocketAddr,
    /// UDP address of the Sluice protocol over QUIC (ALPN `sluice/1`); it may share the TCP
    /// port number, since it is another protocol. Default `127.0.0.1:7171`.
    pub quic: SocketAddr,
    /// TCP address of the HTTP admin endpoints `/livez`, `/readyz`, `/metrics`.
    /// Default `127.0.0.1:7172`.
    pub http: SocketAddr,
    /// PEM certificate chain for QUIC. Without it the broker creates a self-signed certificate
    /// at `<data_dir>/tls/cert.pem`. Set together with `tls_key`. Default: none.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Default: none.
    pub tls_key: Option<PathBuf>,
    /// Names added to the self-signed certificate's subject alternative names, besides
    /// `localhost`, `127.0.0.1` and `::1`. Default: none.
    pub tls_names: Vec<String>,
}

impl Default for Listeners {
    fn default() -> Self {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Listeners {
            tcp: SocketAddr::new(localhost, 7171),
            quic: SocketAddr::new(localhost, 7171),
            http: SocketAddr::new(localhost, 7172),
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
        }
    }
}

/// `[storage]`: settings of the storage engine shared by every partition.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// Background fsync of data written with acks weaker than `durable`: `always`,
    /// `interval:<ms>` or `never` (see [`FsyncPolicy`]). Default `interval:1000`.
    #[serde(deserialize_with = "deserialize_fsync_policy")]
    pub fsync: FsyncPolicy,
    /// Threads running fsyncs off the async runtime. Default 2.
    pub flusher_threads: usize,
    /// Closed segment files kept open at once, across all partitions. Default 256.
    pub open_segments_max: usize,
    /// How often each partition's recovery point is checkpointed, in milliseconds. At most
    /// 86400000. Default 60000.
    pub recovery_checkpoint_ms: u64,
    /// How often retention looks for segments to delete, in milliseconds. At most 86400000.
    /// Default 300000.
    pub retention_check_ms: u64,
}

impl Default for Storage {
    fn default() -> Self {
        let options = StorageOptions::default();
        Storage {
            fsync: options.fsync,
            flusher_threads: options.flusher_threads,
            open_segments_max: options.open_segments_max,
            recovery_checkpoint_ms: options.recovery_checkpoint_ms,
            retention_check_ms: 300_000,
        }
    }
}

impl Storage {
    /// The options the storage engine takes. `retention_check_ms` is not among them: the
    /// broker's retention task reads it from here.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            fsync: self.fsync,
            flusher_threads: self.flusher_threads,
            open_segments_max: self.open_segments_max,
            recovery_checkpoint_ms: self.recovery_checkpoint_ms,
            ..StorageOptions::default()
        }
    }

    /// `retention_check_ms` as a duration.
    pub fn retention_check_interval(&self) -> Duration {
        Duration::from_millis(self.retention_check_ms)
    }
}

/// `[log]`: the defaults of every topic's partition logs. A topic may override each of them
/// when it is created. Defaults are [`LogConfig::default()`]'s.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogDefaults {
    /// Roll the active segment when the next batch would take it past this size, in bytes.
    /// Default 1073741824 (1 GiB).
    pub segment_bytes: u64,
    /// Roll the active segment when its first batch is this old, in milliseconds.
    /// Default 604800000 (7 days).
    pub segment_ms: u64,
    /// Bytes of log between two entries of the sparse offset index. Default 4096.
    pub index_interval_bytes: u64,
    /// Delete the oldest closed segments while a partition is larger than this, in bytes.
    /// `None` (`-1` or absent in the file) is unlimited. Default unlimited.
    #[serde(deserialize_with = "deserialize_unlimited")]
    pub retention_bytes: Option<u64>,
    /// Delete closed segments whose newest record is older than this, in milliseconds.
    /// `None` (`-1` in the file) is unlimited. Default 604800000 (7 days).
    #[serde(deserialize_with = "deserialize_unlimited")]
    pub retention_ms: Option<u64>,
    /// Largest record batch a partition accepts, in bytes; at most `limits.max_batch_bytes`.
    /// Default 1048576 (1 MiB).
    pub max_message_bytes: u64,
}

impl Default for LogDefaults {
    fn default() -> Self {
        LogDefaults::from(LogConfig::default())
    }
}

impl From<LogConfig> for LogDefaults {
    fn from(config: LogConfig) -> Self {
        LogDefaults {
            segment_bytes: config.segment_bytes,
            segment_ms: config.segment_ms,
            index_interval_bytes: config.index_interval_bytes,
            retention_bytes: config.retention_bytes,
            retention_ms: config.retention_ms,
            max_message_bytes: config.max_message_bytes,
        }
    }
}

impl LogDefaults {
    /// The log configuration new topics start from.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            index_interval_bytes: self.index_interval_bytes,
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// `[limits]`: every bound a client can run into. Crossing one gets the client an error
/// response; it never takes the broker down or grows its memory without bound.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted or sent, in bytes, counted after the length prefix. A longer
    /// frame is refused before anything is allocated for it, and its connection closed.
    /// At least 1024. Default 8388608 (8 MiB).
    pub max_frame_bytes: u32,
    /// Largest record batch in a produce request, in bytes. It plus
    /// [`BATCH_FRAMING_BYTES`] must fit in `max_frame_bytes`. Default 1048576 (1 MiB).
    pub max_batch_bytes: u32,
    /// Client connections open at once, TCP and QUIC together; more are refused. A QUIC
    /// connection's slot covers one stream: each stream open beside it takes a slot too (or is
    /// reset when none is free). Default 1024.
    pub max_connections: usize,
    /// Requests of one connection (or QUIC stream) being handled at once; the broker stops
    /// reading from it until one completes. At most 65536. Default 256.
    pub max_in_flight_requests: usize,
    /// Bidirectional streams a QUIC client may open on one connection. At most 4096. Default 64.
    pub max_quic_streams: u32,
    /// Partitions one topic may have. Default 1024.
    pub max_partitions_per_topic: u32,
    /// Topics the broker holds. Default 10000.
    pub max_topics: usize,
    /// Idempotent-producer states the broker keeps, counted per (producer, partition) across
    /// all partitions; also the number of producer names it remembers. A new producer over it
    /// gets `LimitExceeded` once no state is idle past `producer_expiry_ms`. Default 100000.
    pub max_producers: usize,
    /// Longest a fetch may wait for data, in milliseconds; a fetch asking for more waits this
    /// long. 0 answers every fetch at once. A `u32`, like the request's own `max_wait_ms`.
    /// Default 30000.
    pub fetch_max_wait_ms: u32,
    /// Bytes held for fetch responses at once, broker-wide; fetches wait for room (or get
    /// `Throttled`). At least `max_frame_bytes`. Default 268435456 (256 MiB).
    pub fetch_response_budget_bytes: u64,
    /// Longest a fetch's read ahead (the connection's likely next fetch, read while the last
    /// answer goes out) holds its share of the budget waiting to be asked for, in
    /// milliseconds. 0 reads nothing ahead. At most 86400000. Default 500.
    pub fetch_read_ahead_ms: u64,
    /// Longest a partially received frame may take to arrive, in milliseconds; a slower
    /// sender is cut off. At most 86400000 (a day). Default 30000.
    pub frame_read_timeout_ms: u64,
    /// Longest the broker waits to write one answer to a connection that does not read it, in
    /// milliseconds; the connection is then closed, and the fetch budget its unsent answers
    /// held goes back to everyone else. At most 86400000 (a day). Default 60000.
    pub response_write_timeout_ms: u64,
    /// Shortest session timeout a consumer-group member may ask for, in milliseconds.
    /// Default 6000.
    pub group_min_session_timeout_ms: u64,
    /// Longest session timeout a consumer-group member may ask for, in milliseconds. At most
    /// 86400000. Default 300000.
    pub group_max_session_timeout_ms: u64,
    /// Idle time after which an idempotent producer's state is forgotten, in milliseconds.
    /// At most 31536000000 (a year). Default 604800000 (7 days).
    pub producer_expiry_ms: u64,
    /// How long a consumer group's committed offsets are kept after the group was last seen
    /// with a member or committed, in milliseconds (Kafka's `offsets.retention.minutes`).
    /// At most 31536000000 (a year). Default 604800000 (7 days).
    pub group_offsets_retention_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_batch_bytes: MIB,
            max_connections: 1024,
            max_in_flight_requests: 256,
            max_quic_streams: 64,
            max_partitions_per_topic: 1024,
            max_topics: 10_000,
            max_producers: 100_000,
            fetch_max_wait_ms: 30_000,
            fetch_response_budget_bytes: 256 * u64::from(MIB),
            fetch_read_ahead_ms: 500,
            frame_read_timeout_ms: 30_000,
            response_write_timeout_ms: 60_000,
            group_min_session_timeout_ms: 6_000,
            group_max_session_timeout_ms: 300_000,
            producer_expiry_ms: 7 * DAY_MS,
            group_offsets_retention_ms: 7 * DAY_MS,
        }
    }
}

/// Format of the broker's log lines on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// `[logging]`: the broker's own log lines, written to stderr.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Logging {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// Which lines to write: a tracing `EnvFilter` directive such as `info` or
    /// `warn,sluice_broker=debug`. `RUST_LOG`, when set and not empty, replaces it.
    /// Default `info`.
    pub filter: String,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// A configuration that cannot be used. `Display` is one line naming the option, and the file
/// or environment variable it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("config file {}: {source}", path.display())]
    ReadFile {
        /// The file, as given.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("config file {}:{line}:{column}: {message}", path.display())]
    Syntax {
        /// The file, as given.
        path: PathBuf,
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error, in characters from 1.
        column: usize,
        /// What is wrong there.
        message: String,
    },
    /// A key of the configuration file is unknown or has a value that does not fit.
    #[error("{option}: {message} (config file {})", path.display())]
    File {
        /// The file, as given.
        path: PathBuf,
        /// The dotted option name, e.g. `limits.max_frame_bytes`.
        option: String,
        /// What is wrong with it.
        message: String,
    },
    /// A `SLUICE_*` environment variable is unknown or has a value that does not fit.
    #[error("{variable}: {message}")]
    Environment {
        /// The variable's name.
        variable: String,
        /// The option it sets, when it names one.
        option: Option<String>,
        /// What is wrong with it.
        message: String,
    },
    /// The options parse but break a rule.
    #[error("{option}: {message}")]
    Invalid {
        /// The dotted option name, e.g. `limits.max_frame_bytes`.
        option: String,
        /// The rule it breaks.
        message: String,
    },
    /// The tracing subscriber could not be installed.
    #[error("logging: {message}")]
    Tracing {
        /// Why not.
        message: String,
    },
}

impl ConfigError {
    /// The dotted name of the option at fault, when there is one.
    pub fn option(&self) -> Option<&str> {
        match self {
            ConfigError::File { option, .. } | ConfigError::Invalid { option, .. } => Some(option),
            ConfigError::Environment { option, .. } => option.as_deref(),
            ConfigError::ReadFile { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::Tracing { .. } => None,
        }
    }

    fn invalid(option: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            option: option.to_owned(),
            message: one_line(&message.into()),
        }
    }
}

/// Builds the configuration from defaults, the file named by `--config` (or `SLUICE_CONFIG`),
/// the `SLUICE_*` variables of `env` and the flags, strongest last, then validates it.
///
/// `env` is the environment to read, passed in so tests control it; the broker passes
/// [`process_environment()`]. The short variables clap reads (`SLUICE_TCP`, ...) are applied from
/// `env` too, above the long forms, so a `Cli` without flags plus `env` gives the same result as
/// clap reading that environment itself.
///
/// # Errors
/// A one-line [`ConfigError`]: the file is missing or not TOML, a key or `SLUICE_*` variable is
/// unknown, a value does not parse, or [`Config::validate`] refuses the result.
pub fn load(
    cli: &Cli,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut variables: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENVIRONMENT_PREFIX))
        .collect();
    // Sorted, so that which of two bad variables is reported does not depend on hash order.
    variables.sort();

    let config_path = cli.config.clone().or_else(|| {
        variables
            .iter()
            // An empty one is reported with the other variables, below.
            .find(|(name, value)| name == CONFIG_VARIABLE && !value.is_empty())
            .map(|(_, value)| PathBuf::from(value))
    });
    let mut tree = match &config_path {
        Some(path) => read_file(path)?,
        None => Table::new(),
    };
    apply_environment(&mut tree, &variables)?;

    let mut config = Config::deserialize(tree).map_err(|error| ConfigError::Invalid {
        // Every leaf was checked on the way in, so this is not expected; keep the message anyway.
        option: "config".to_owned(),
        message: one_line(&error.to_string()),
    })?;
    apply_flags(&mut config, cli);
    config.validate()?;
    Ok(config)
}

/// The process environment as `(name, value)` pairs for [`load`]. Unlike
/// `std::env::vars()` it does not panic on a variable that is not UTF-8: such a value is
/// converted lossily, so a `SLUICE_*` one is reported as a bad value rather than skipped.
pub fn process_environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

fn apply_flags(config: &mut Config, cli: &Cli) {
    if let Some(data_dir) = &cli.data_dir {
        config.data_dir.clone_from(data_dir);
    }
    if let Some(tcp) = cli.tcp {
        config.listeners.tcp = tcp;
    }
    if let Some(quic) = cli.quic {
        config.listeners.quic = quic;
    }
    if let Some(http) = cli.http {
        config.listeners.http = http;
    }
    if let Some(fsync) = cli.fsync {
        config.storage.fsync = fsync;
    }
    if let Some(format) = cli.log_format {
        config.logging.format = format;
    }
}

impl Config {
    /// The defaults, with `data_dir` and every listener (TCP, QUIC, HTTP) on loopback at a port
    /// the system picks: for a broker embedded in another program or a test, several side by
    /// side. The addresses bound are on the [`BrokerHandle`](crate::BrokerHandle).
    pub fn on_loopback(data_dir: impl Into<PathBuf>) -> Config {
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = Config {
            data_dir: data_dir.into(),
            ..Config::default()
        };
        config.listeners.tcp = any_port;
        config.listeners.quic = any_port;
        config.listeners.http = any_port;
        config
    }

    /// The storage engine's options: [`Storage::storage_options`] of `[storage]`, with the
    /// producer-state limits of `[limits]`.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            max_producers: self.limits.max_producers,
            producer_expiry_ms: self.limits.producer_expiry_ms,
            ..self.storage.storage_options()
        }
    }

    /// The log configuration new topics start from: [`LogDefaults::log_config`] of `[log]`.
    pub fn log_config(&self) -> LogConfig {
        self.log.log_config()
    }

    /// Checks the rules that span fields or need more than a type: nonzero limits, a batch
    /// fitting in a frame, session timeouts in order, the log defaults valid.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first offending option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        self.listeners.validate()?;
        self.storage.validate()?;
        self.limits.validate()?;
        self.logging.validate()?;

        if let Err(message) = self.log.log_config().validate() {
            // LogConfig speaks of "config <key>: ..."; name the key as it is spelled here.
            let (key, detail) = message
                .strip_prefix("config ")
                .and_then(|rest| rest.split_once(": "))
                .unwrap_or(("", message.as_str()));
            let option = if key.is_empty() {
                "log".to_owned()
            } else {
                format!("log.{key}")
            };
            return Err(ConfigError::invalid(&option, detail));
        }
        if self.log.max_message_bytes > u64::from(self.limits.max_batch_bytes) {
            return Err(ConfigError::invalid(
                "log.max_message_bytes",
                format!(
                    "{} is more than limits.max_batch_bytes ({}), so no batch that large could \
                     be produced; raise limits.max_batch_bytes too",
                    self.log.max_message_bytes, self.limits.max_batch_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl Listeners {
    fn validate(&self) -> Result<(), ConfigError> {
        // Both are TCP; port 0 asks the OS for a free port, so only fixed ports can collide.
        if self.tcp == self.http && self.tcp.port() != 0 {
            return Err(ConfigError::invalid(
                "listeners.http",
                format!("{} is also listeners.tcp", self.http),
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "listeners.tls_key",
                    "must be set when listeners.tls_cert is",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "listeners.tls_cert",
                    "must be set when listeners.tls_key is",
                ));
            }
            _ => {}
        }
        if self.tls_names.iter().any(|name| name.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "listeners.tls_names",
                "names must not be empty",
            ));
        }
        Ok(())
    }
}

impl Storage {
    fn validate(&self) -> Result<(), ConfigError> {
        if let FsyncPolicy::Interval(every) = self.fsync
            && (every < Duration::from_millis(1) || every > Duration::from_millis(MAX_TIMEOUT_MS))
        {
            return Err(ConfigError::invalid(
                "storage.fsync",
                format!("the interval must be 1 to {MAX_TIMEOUT_MS} ms"),
            ));
        }
        at_least_one("storage.flusher_threads", self.flusher_threads as u64)?;
        // Each is a thread, started at once; past this many they only contend for the disk.
        at_most("storage.flusher_threads", self.flusher_threads as u64, 256)?;
        at_least_one("storage.open_segments_max", self.open_segments_max as u64)?;
        in_range(
            "storage.recovery_checkpoint_ms",
            self.recovery_checkpoint_ms,
            MAX_TIMEOUT_MS,
        )?;
        in_range(
            "storage.retention_check_ms",
            self.retention_check_ms,
            MAX_TIMEOUT_MS,
        )
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_bytes < MIN_FRAME_BYTES {
            return Err(ConfigError::invalid(
                "limits.max_frame_bytes",
                format!("must be at least {MIN_FRAME_BYTES}"),
            ));
        }
        at_least_one("limits.max_batch_bytes", u64::from(self.max_batch_bytes))?;
        let largest_frame = u64::from(self.max_batch_bytes) + u64::from(BATCH_FRAMING_BYTES);
        if largest_frame > u64::from(self.max_frame_bytes) {
            return Err(ConfigError::invalid(
                "limits.max_batch_bytes",
                format!(
                    "{} plus {BATCH_FRAMING_BYTES} bytes of request or answer framing does not \
                     fit in limits.max_frame_bytes ({})",
                    self.max_batch_bytes, self.max_frame_bytes
                ),
            ));
        }
        at_least_one("limits.max_connections", self.max_connections as u64)?;
        in_range(
            "limits.max_in_flight_requests",
            self.max_in_flight_requests as u64,
            MAX_IN_FLIGHT_REQUESTS,
        )?;
        in_range(
            "limits.max_quic_streams",
            u64::from(self.max_quic_streams),
            MAX_QUIC_STREAMS,
        )?;
        at_least_one(
            "limits.max_partitions_per_topic",
            u64::from(self.max_partitions_per_topic),
        )?;
        at_least_one("limits.max_topics", self.max_topics as u64)?;
        at_least_one("limits.max_producers", self.max_producers as u64)?;
        // One fetch response may be a whole frame; a smaller budget could never serve it.
        if self.fetch_response_budget_bytes < u64::from(self.max_frame_bytes) {
            return Err(ConfigError::invalid(
                "limits.fetch_response_budget_bytes",
                format!(
                    "{} is less than limits.max_frame_bytes ({}), the size of one response",
                    self.fetch_response_budget_bytes, self.max_frame_bytes
                ),
            ));
        }
        in_range(
            "limits.frame_read_timeout_ms",
            self.frame_read_timeout_ms,
            MAX_TIMEOUT_MS,
        )?;
        in_range(
            "limits.response_write_timeout_ms",
            self.response_write_timeout_ms,
            MAX_TIMEOUT_MS,
        )?;
        at_least_one(
            "limits.group_min_session_timeout_ms",
            self.group_min_session_timeout_ms,
        )?;
        in_range(
            "limits.group_max_session_timeout_ms",
            self.group_max_session_timeout_ms,
            MAX_TIMEOUT_MS,
        )?;
        // 0 is allowed: nothing is read ahead.
        at_most(
            "limits.fetch_read_ahead_ms",
            self.fetch_read_ahead_ms,
            MAX_TIMEOUT_MS,
        )?;
        if self.group_min_session_timeout_ms > self.group_max_session_timeout_ms {
            return Err(ConfigError::invalid(
                "limits.group_min_session_timeout_ms",
                format!(
                    "{} is more than limits.group_max_session_timeout_ms ({})",
                    self.group_min_session_timeout_ms, self.group_max_session_timeout_ms
                ),
            ));
        }
        in_range(
            "limits.producer_expiry_ms",
            self.producer_expiry_ms,
            MAX_PRODUCER_EXPIRY_MS,
        )?;
        in_range(
            "limits.group_offsets_retention_ms",
            self.group_offsets_retention_ms,
            MAX_PRODUCER_EXPIRY_MS,
        )
    }
}

impl Logging {
    fn validate(&self) -> Result<(), ConfigError> {
        EnvFilter::try_new(&self.filter).map(drop).map_err(|error| {
            ConfigError::invalid("logging.filter", format!("{:?}: {error}", self.filter))
        })
    }
}

/// The longest connection timeout (a day): a deadline this far off is as good as none, and
/// one much further would overflow the clock's arithmetic.
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// The most requests one connection may have in flight (each holds a semaphore permit and a
/// response slot).
const MAX_IN_FLIGHT_REQUESTS: u64 = 65_536;
/// The most concurrent streams a QUIC connection may open: quinn keeps state for each one a
/// connection is allowed from its start.
const MAX_QUIC_STREAMS: u64 = 4_096;
/// The longest an idle producer's state may be kept (a year): past that a deadline in
/// milliseconds is as good as none.
const MAX_PRODUCER_EXPIRY_MS: u64 = 365 * DAY_MS;

fn in_range(option: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    at_least_one(option, value)?;
    at_most(option, value, max)
}

fn at_most(option: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::invalid(
            option,
            format!("must be at most {max}"),
        ));
    }
    Ok(())
}

fn at_least_one(option: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(option, "must be at least 1"));
    }
    Ok(())
}

/// Installs the global tracing subscriber: lines to stderr in `logging.format`, filtered by
/// `RUST_LOG` when it is set and not empty, else by `logging.filter`.
///
/// # Errors
/// A filter that does not parse, or a global subscriber already installed (a second call).
pub fn init_tracing(logging: &Logging) -> Result<(), ConfigError> {
    let rust_log = match std::env::var("RUST_LOG") {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ConfigError::Environment {
                variable: "RUST_LOG".to_owned(),
                option: Some("logging.filter".to_owned()),
                message: "not valid UTF-8".to_owned(),
            });
        }
    };
    let filter = tracing_filter(logging, rust_log.as_deref())?;
    // Colours only for a terminal: log files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(io::stderr);
    let installed = match logging.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| ConfigError::Tracing {
        message: one_line(&error.to_string()),
    })
}

/// The filter [`init_tracing`] installs: `rust_log` (the value of `RUST_LOG`) when it is given
/// and not empty, else `logging.filter`.
///
/// # Errors
/// The chosen directive does not parse; the error names `RUST_LOG` or `logging.filter`.
pub fn tracing_filter(logging: &Logging, rust_log: Option<&str>) -> Result<EnvFilter, ConfigError> {
    match rust_log.filter(|directive| !directive.trim().is_empty()) {
        Some(directive) => {
            EnvFilter::try_new(directive).map_err(|error| ConfigError::Environment {
                variable: "RUST_LOG".to_owned(),
                option: Some("logging.filter".to_owned()),
                message: one_line(&error.to_string()),
            })
        }
        None => EnvFilter::try_new(&logging.filter).map_err(|error| {
            ConfigError::invalid("logging.filter", format!("{:?}: {error}", logging.filter))
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The option tree: the file and the environment are both merged into one TOML table, which
// serde then turns into a `Config`. Each leaf is checked as it goes in, so an error can name
// the file or variable it came from; serde's own error would know neither.

/// A `[section]` of the file and the `Config` field it fills.
struct Section {
    name: &'static str,
    keys: fn() -> &'static [&'static str],
}

/// The sections, in file order. Their keys come from the serde derives themselves (see
/// [`field_names`]), so adding a field to a section struct is all it takes to make it settable
/// from the file and the environment.
const SECTIONS: [Section; 5] = [
    Section {
        name: "listeners",
        keys: field_names::<Listeners>,
    },
    Section {
        name: "storage",
        keys: field_names::<Storage>,
    },
    Section {
        name: "log",
        keys: field_names::<LogDefaults>,
    },
    Section {
        name: "limits",
        keys: field_names::<Limits>,
    },
    Section {
        name: "logging",
        keys: field_names::<Logging>,
    },
];

fn section(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|section| section.name == name)
}

/// Keys of `Config` that are options themselves rather than sections (`data_dir`).
fn top_level_keys() -> impl Iterator<Item = &'static str> {
    field_names::<Config>()
        .iter()
        .copied()
        .filter(|key| section(key).is_none())
}

/// Every option's dotted name, in file order: `data_dir`, `listeners.tcp`, ...
pub fn option_names() -> Vec<String> {
    top_level_keys()
        .map(str::to_owned)
        .chain(SECTIONS.iter().flat_map(|section| {
            (section.keys)()
                .iter()
                .map(|key| format!("{}.{key}", section.name))
        }))
        .collect()
}

/// The environment variable that sets an option: `limits.max_frame_bytes` →
/// `SLUICE_LIMITS_MAX_FRAME_BYTES`.
pub fn environment_variable(option: &str) -> String {
    format!(
        "{ENVIRONMENT_PREFIX}{}",
        option.replace('.', "_").to_uppercase()
    )
}

/// The field names serde's derive declares for `T`: it passes them to `deserialize_struct`, and
/// this deserializer does nothing but catch them. That keeps one list of keys per section, the
/// struct itself.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct FieldCatcher(Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for &mut FieldCatcher {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(serde::de::Error::custom("field names caught"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut catcher = FieldCatcher(None);
    // The error is the point: deserialization stops as soon as the names are caught.
    let _ = T::deserialize(&mut catcher);
    catcher
        .0
        .expect("config sections are structs deriving Deserialize")
}

/// Where an option lives in the tree: `["data_dir"]` or `["limits", "max_frame_bytes"]`.
type OptionPath = (Option<&'static str>, String);

fn dotted(path: &OptionPath) -> String {
    match path {
        (Some(section), key) => format!("{section}.{key}"),
        (None, key) => key.clone(),
    }
}

/// Checks that `value` is acceptable for the option at `path`, by deserializing a `Config` that
/// sets only it (every other field takes its default).
fn check_option(path: &OptionPath, value: &Value) -> Result<(), String> {
    let mut tree = Table::new();
    insert_option(&mut tree, path, value.clone());
    Config::deserialize(tree)
        .map(drop)
        .map_err(|error| one_line(error.message()))
}

/// [`check_option`] for a value from the file, whose message also shows the value.
fn check_file_option(path: &OptionPath, value: &Value) -> Result<(), String> {
    check_option(path, value).map_err(|message| format!("bad value {value}: {message}"))
}

fn insert_option(tree: &mut Table, path: &OptionPath, value: Value) {
    match path {
        (None, key) => {
            tree.insert(key.clone(), value);
        }
        (Some(section), key) => {
            let entry = tree
                .entry((*section).to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            if !entry.is_table() {
                *entry = Value::Table(Table::new());
            }
            if let Value::Table(section) = entry {
                section.insert(key.clone(), value);
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let tree: Table = text.parse().map_err(|error: toml::de::Error| {
        let (line, column) = error
            .span()
            .map_or((1, 1), |span| line_and_column(&text, span.start));
        ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: one_line(error.message()),
        }
    })?;
    let file_error = |option: String, message: String| ConfigError::File {
        path: path.to_owned(),
        option,
        message: one_line(&message),
    };
    for (key, value) in &tree {
        if let Some(section) = section(key) {
            let Value::Table(entries) = value else {
                return Err(file_error(
                    key.clone(),
                    format!("must be a table, written [{key}]"),
                ));
            };
            for (entry_key, entry_value) in entries {
                let path = (Some(section.name), entry_key.clone());
                if !(section.keys)().contains(&entry_key.as_str()) {
                    return Err(file_error(dotted(&path), unknown_key_message(section)));
                }
                check_file_option(&path, entry_value)
                    .map_err(|message| file_error(dotted(&path), message))?;
            }
        } else if top_level_keys().any(|known| known == key) {
            check_file_option(&(None, key.clone()), value)
                .map_err(|message| file_error(key.clone(), message))?;
        } else {
            return Err(file_error(key.clone(), unknown_top_level_message()));
        }
    }
    Ok(tree)
}

fn unknown_key_message(section: &Section) -> String {
    format!(
        "unknown option; [{}] has {}",
        section.name,
        (section.keys)().join(", ")
    )
}

fn unknown_top_level_message() -> String {
    let top_level: Vec<&str> = top_level_keys().collect();
    let sections: Vec<String> = SECTIONS
        .iter()
        .map(|section| format!("[{}]", section.name))
        .collect();
    format!(
        "unknown option; the top level has {} and the sections {}",
        top_level.join(", "),
        sections.join(", ")
    )
}

/// Line and column (both from 1, the column in characters) of a byte offset into `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before
        .get(line_start..)
        .map_or(0, |rest| rest.chars().count())
        + 1;
    (line, column)
}

/// Applies the `SLUICE_*` variables (already filtered to that prefix) to the tree: long forms
/// first, then the short ones clap also reads, so those win.
fn apply_environment(tree: &mut Table, variables: &[(String, String)]) -> Result<(), ConfigError> {
    let mut short_forms = Vec::new();
    for (name, value) in variables {
        if FOREIGN_VARIABLES.contains(&name.as_str()) {
            continue;
        }
        if value.is_empty() {
            return Err(ConfigError::Environment {
                variable: name.clone(),
                option: None,
                message: "empty value; unset the variable to leave the option as it is".to_owned(),
            });
        }
        if name == CONFIG_VARIABLE {
            continue;
        }
        if let Some((_, option)) = FLAG_VARIABLES.iter().find(|(short, _)| short == name) {
            short_forms.push((name, *option, value));
            continue;
        }
        let path = option_for_variable(name).ok_or_else(|| ConfigError::Environment {
            variable: name.clone(),
            option: None,
            message: unknown_variable_message(name),
        })?;
        apply_variable(tree, name, path, value)?;
    }
    for (name, option, value) in short_forms {
        let path = option_path(option).expect("FLAG_VARIABLES names known options");
        apply_variable(tree, name, path, value)?;
    }
    Ok(())
}

/// Where the option with this dotted name lives, if there is one.
fn option_path(option: &str) -> Option<OptionPath> {
    match option.split_once('.') {
        Some((section_name, key)) => {
            let section = section(section_name)?;
            let key = (section.keys)().iter().find(|known| **known == key)?;
            Some((Some(section.name), (*key).to_owned()))
        }
        None => top_level_keys()
            .find(|key| *key == option)
            .map(|key| (None, key.to_owned())),
    }
}

/// The option a long-form variable names: `SLUICE_LIMITS_MAX_FRAME_BYTES` →
/// `limits.max_frame_bytes`, `SLUICE_DATA_DIR` → `data_dir`.
fn option_for_variable(name: &str) -> Option<OptionPath> {
    let rest = name.strip_prefix(ENVIRONMENT_PREFIX)?.to_lowercase();
    if let Some(key) = top_level_keys().find(|key| *key == rest) {
        return Some((None, key.to_owned()));
    }
    SECTIONS.iter().find_map(|section| {
        let key = rest.strip_prefix(section.name)?.strip_prefix('_')?;
        (section.keys)()
            .contains(&key)
            .then(|| (Some(section.name), key.to_owned()))
    })
}

fn unknown_variable_message(name: &str) -> String {
    let rest = name
        .strip_prefix(ENVIRONMENT_PREFIX)
        .unwrap_or(name)
        .to_lowercase();
    if let Some(section) = SECTIONS.iter().find(|section| {
        rest.strip_prefix(section.name)
            .is_some_and(|key| key.starts_with('_'))
    }) {
        return format!(
            "unknown variable: [{}] has no such option; it has {}",
            section.name,
            (section.keys)().join(", ")
        );
    }
    let sections: Vec<String> = SECTIONS
        .iter()
        .map(|section| section.name.to_uppercase())
        .collect();
    format!(
        "unknown variable: options are set as SLUICE_<SECTION>_<KEY> with SECTION one of {}, \
         or SLUICE_DATA_DIR, {CONFIG_VARIABLE} and the flags' variables ({})",
        sections.join(", "),
        FLAG_VARIABLES
            .iter()
            .map(|(short, _)| *short)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Reads `raw` as a TOML value, else as a plain string, else as a comma-separated list of
/// strings, and inserts the first reading the option accepts. So numbers, `-1`, booleans and
/// arrays need no quoting, and neither do strings.
fn apply_variable(
    tree: &mut Table,
    name: &str,
    path: OptionPath,
    raw: &str,
) -> Result<(), ConfigError> {
    let mut readings = Vec::with_capacity(3);
    if let Ok(value) = raw.parse::<Value>() {
        readings.push(value);
    }
    readings.push(Value::String(raw.to_owned()));
    readings.push(Value::Array(
        raw.split(',')
            .map(|item| Value::String(item.trim().to_owned()))
            .collect(),
    ));
    let mut first_error = None;
    for value in readings {
        match check_option(&path, &value) {
            Ok(()) => {
                insert_option(tree, &path, value);
                return Ok(());
            }
            Err(message) => {
                first_error.get_or_insert(message);
            }
        }
    }
    let option = dotted(&path);
    Err(ConfigError::Environment {
        variable: name.to_owned(),
        message: format!(
            "bad value {raw:?} for {option}: {}",
            first_error.unwrap_or_default()
        ),
        option: Some(option),
    })
}

/// Folds a message onto one line: the error contract is one line per error.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn deserialize_fsync_policy<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<FsyncPolicy, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// `-1` is unlimited (`None`); any other value must be a non-negative integer.
fn deserialize_unlimited<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    match i64::deserialize(deserializer)? {
        -1 => Ok(None),
        value => u64::try_from(value).map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{value} is neither -1 (unlimited) nor a non-negative integer"
            ))
        }),
    }
}
