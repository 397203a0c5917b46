//! The topic registry: topics, their partitions' logs, and their metadata on disk.
//!
//! ```text
//! <data-dir>/topics/<topic>/topic.toml     partitions, internal flag, config overrides
//! <data-dir>/topics/<topic>/<partition>/   one PartitionLog each
//! ```
//!
//! `topic.toml` is the commit point of a creation: it is written durably after every
//! partition directory exists, and removed (durably) first on deletion. A topic directory
//! without it is the remains of a creation or deletion cut short, and is removed on start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sluice_protocol::ErrorCode;

use crate::storage::fs::write_file_durably;
use crate::storage::{LogConfig, PartitionLog, Storage, StorageError};

/// The metadata file in each topic directory.
pub const TOPIC_METADATA_FILE: &str = "topic.toml";

/// One topic: its partitions' logs and its effective configuration.
#[derive(Debug)]
pub struct Topic {
    pub name: String,
    pub internal: bool,
    /// The per-topic overrides as given at creation.
    pub overrides: BTreeMap<String, String>,
    /// Defaults with the overrides applied.
    pub config: LogConfig,
    pub partitions: Vec<Arc<PartitionLog>>,
}

impl Topic {
    pub fn partition(&self, index: u32) -> Option<&Arc<PartitionLog>> {
        self.partitions.get(index as usize)
    }
}

/// `topic.toml`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TopicMetadata {
    pub(crate) partitions: u32,
    #[serde(default)]
    pub(crate) internal: bool,
    #[serde(default)]
    pub(crate) config: BTreeMap<String, String>,
}

impl TopicMetadata {
    /// Reads a `topic.toml`. The partition count is checked before anything is sized by it: a
    /// damaged file claiming billions of partitions must not make the broker try to open them.
    /// A count over `max_partitions_per_topic` is refused rather than clamped, so the operator
    /// sees it (and may raise the limit if it was lowered after the topic was created).
    pub(crate) fn decode(bytes: &[u8], max_partitions_per_topic: u32) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|error| format!("not UTF-8: {error}"))?;
        let metadata: TopicMetadata =
            toml::from_str(text).map_err(|error| error.message().to_owned())?;
        if metadata.partitions == 0 || metadata.partitions > max_partitions_per_topic {
            return Err(format!(
                "{} partitions, outside 1 to {max_partitions_per_topic} \
                 (limits.max_partitions_per_topic)",
                metadata.partitions
            ));
        }
        Ok(metadata)
    }

    pub(crate) fn encode(&self) -> String {
        toml::to_string(self).expect("topic metadata serialises")
    }
}

/// Why a topic operation failed; carries its wire error code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TopicError {
    pub code: ErrorCode,
    pub message: String,
}

impl TopicError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TopicError {
            code,
            message: message.into(),
        }
    }
}

impl From<StorageError> for TopicError {
    fn from(error: StorageError) -> Self {
        TopicError::new(error.error_code(), error.to_string())
    }
}

/// Limits the registry enforces.
#[derive(Clone, Copy, Debug)]
pub struct TopicLimits {
    pub max_topics: usize,
    pub max_partitions_per_topic: u32,
}

/// Every topic of a broker.
#[derive(Debug)]
pub struct TopicRegistry {
    topics_dir: PathBuf,
    storage: Arc<Storage>,
    defaults: LogConfig,
    limits: TopicLimits,
    topics: DashMap<String, Arc<Topic>>,
    /// Serialises creations and deletions, which touch the disk in several steps.
    changes: Mutex<()>,
}

/// The longest topic name, in bytes.
pub const MAX_TOPIC_NAME_BYTES: usize = 249;

/// Checks a user topic name: `[A-Za-z0-9._-]{1,249}`, not `.` or `..`, not starting with `__`
/// (kept for internal topics).
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    let invalid = |why: &str| {
        Err(TopicError::new(
            ErrorCode::InvalidTopicName,
            format!("invalid topic name {name:?}: {why}"),
        ))
    };
    if name.is_empty() || name.len() > MAX_TOPIC_NAME_BYTES {
        return invalid("must be 1 to 249 characters");
    }
    if name == "." || name == ".." {
        return invalid("must not be . or ..");
    }
    if name.starts_with("__") {
        return invalid("names starting with __ are reserved for internal topics");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

impl TopicRegistry {
    /// Opens every topic under `<data_dir>/topics`, recovering each partition.
    pub fn open(
        data_dir: &Path,
        storage: Arc<Storage>,
        defaults: LogConfig,
        limits: TopicLimits,
    ) -> Result<TopicRegistry, TopicError> {
        let topics_dir = data_dir.join("topics");
        let fs = Arc::clone(storage.fs());
        fs.create_dir_all(&topics_dir).map_err(|error| {
            TopicError::new(
                ErrorCode::StorageError,
                format!("create {}: {error}", topics_dir.display()),
            )
        })?;
        let registry = TopicRegistry {
            topics_dir,
            storage,
            defaults,
            limits,
            topics: DashMap::new(),
            changes: Mutex::new(()),
        };
        let entries = fs.read_dir(&registry.topics_dir).map_err(|error| {
            TopicError::new(
                ErrorCode::StorageError,
                format!("list {}: {error}", registry.topics_dir.display()),
            )
        })?;
        for dir in entries {
            let Some(name) = dir
                .file_name()
                .and_then(|name| name.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            let metadata_path = dir.join(TOPIC_METADATA_FILE);
            let metadata = match crate::storage::fs::read_file(fs.as_ref(), &metadata_path) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotADirectory => continue,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(topic = %name, "removing a topic directory without metadata (creation or deletion cut short)");
                    let _ = fs.remove_dir_all(&dir);
                    continue;
                }
                Err(error) => {
                    return Err(TopicError::new(
                        ErrorCode::StorageError,
                        format!("read {}: {error}", metadata_path.display()),
                    ));
                }
            };
            let metadata =
                TopicMetadata::decode(&metadata, registry.limits.max_partitions_per_topic)
                    .map_err(|reason| {
                        TopicError::new(
                            ErrorCode::StorageError,
                            format!(
                                "unreadable topic metadata {}: {reason}",
                                metadata_path.display()
                            ),
                        )
                    })?;
            let config = registry
                .defaults
                .with_overrides(
                    metadata
                        .config
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                )
                .map_err(|error| {
                    TopicError::new(ErrorCode::InvalidConfig, format!("topic {name}: {error}"))
                })?;
            let mut partitions = Vec::with_capacity(metadata.partitions as usize);
            for partition in 0..metadata.partitions {
                partitions.push(
                    registry
                        .storage
                        .open_log(&dir.join(partition.to_string()), config.clone())?,
                );
            }
            tracing::info!(topic = %name, partitions = metadata.partitions, "opened topic");
            registry.topics.insert(
                name.clone(),
                Arc::new(Topic {
                    name,
                    internal: metadata.internal,
                    overrides: metadata.config,
                    config,
                    partitions,
                }),
            );
        }
        Ok(registry)
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &Path {
        self.topics_dir.parent().unwrap_or(&self.topics_dir)
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.get(name).map(|topic| Arc::clone(&topic))
    }

    /// Every topic, sorted by name.
    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut topics: Vec<Arc<Topic>> =
            self.topics.iter().map(|topic| Arc::clone(&topic)).collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        topics
    }

    /// The most topics this broker holds (`limits.max_topics`, internal ones aside).
    pub fn max_topics(&self) -> usize {
        self.limits.max_topics
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Creates a user topic. Blocking: it creates and fsyncs files.
    pub fn create(
        &self,
        name: &str,
        partitions: u32,
        overrides: &[(String, String)],
        validate_only: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        validate_topic_name(name)?;
        self.create_topic(name, partitions, overrides, validate_only, false)
    }

    /// Creates an internal topic (name starting with `__`) if it does not exist.
    pub fn ensure_internal(&self, name: &str, partitions: u32) -> Result<Arc<Topic>, TopicError> {
        if let Some(topic) = self.get(name) {
            return Ok(topic);
        }
        self.create_topic(name, partitions, &[], false, true)
    }

    fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: &[(String, String)],
        validate_only: bool,
        internal: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        if partitions == 0 || partitions > self.limits.max_partitions_per_topic {
            return Err(TopicError::new(
                ErrorCode::InvalidPartitions,
                format!(
                    "partitions must be 1 to {} (max_partitions_per_topic), got {partitions}",
                    self.limits.max_partitions_per_topic
                ),
            ));
        }
        let config = self
            .defaults
            .with_overrides(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|error| TopicError::new(ErrorCode::InvalidConfig, error))?;
        let _changes = self.changes.lock().expect("topic lock poisoned");
        if self.topics.contains_key(name) {
            return Err(TopicError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name} already exists"),
            ));
        }
        if self.topics.len() >= self.limits.max_topics {
            return Err(TopicError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the broker holds max_topics ({}) topics",
                    self.limits.max_topics
                ),
            ));
        }
        let overrides: BTreeMap<String, String> = overrides.iter().cloned().collect();
        if validate_only {
            return Ok(Arc::new(Topic {
                name: name.to_owned(),
                internal,
                overrides,
                config,
                partitions: Vec::new(),
            }));
        }
        let dir = self.topics_dir.join(name);
        let fs = Arc::clone(self.storage.fs());
        let fail = |error: std::io::Error| {
            TopicError::new(
                ErrorCode::StorageError,
                format!("create topic {name}: {error}"),
            )
        };
        fs.create_dir_all(&dir).map_err(fail)?;
        let mut logs = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            match self
                .storage
                .open_log(&dir.join(partition.to_string()), config.clone())
            {
                Ok(log) => logs.push(log),
                Err(error) => {
                    for log in &logs {
                        let _ = log.close();
                    }
                    let _ = fs.remove_dir_all(&dir);
                    return Err(error.into());
                }
            }
        }
        let metadata = TopicMetadata {
            partitions,
            internal,
            config: overrides.clone(),
        };
        let text = metadata.encode();
        write_file_durably(fs.as_ref(), &dir.join(TOPIC_METADATA_FILE), text.as_bytes())
            .map_err(fail)?;
        fs.sync_dir(&self.topics_dir).map_err(fail)?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            internal,
            overrides,
            config,
            partitions: logs,
        });
        self.topics.insert(name.to_owned(), Arc::clone(&topic));
        tracing::info!(topic = %name, partitions, "created topic");
        Ok(topic)
    }

    /// Deletes a topic and its data. Waiting fetches on it wake and see it gone. Blocking.
    pub fn delete(&self, name: &str) -> Result<(), TopicError> {
        let _changes = self.changes.lock().expect("topic lock poisoned");
        let Some((_, topic)) = self.topics.remove(name) else {
            return Err(TopicError::new(
                ErrorCode::UnknownTopic,
                format!("topic {name} does not exist"),
            ));
        };
        for log in &topic.partitions {
            let _ = log.close();
        }
        let dir = self.topics_dir.join(name);
        let fs = Arc::clone(self.storage.fs());
        let fail = |error: std::io::Error| {
            TopicError::new(
                ErrorCode::StorageError,
                format!("delete topic {name}: {error}"),
            )
        };
        // The metadata goes first and durably: from then on the topic is gone, whatever
        // happens to the rest of the directory.
        fs.remove_file(&dir.join(TOPIC_METADATA_FILE))
            .map_err(fail)?;
        fs.sync_dir(&dir).map_err(fail)?;
        fs.remove_dir_all(&dir).map_err(fail)?;
        fs.sync_dir(&self.topics_dir).map_err(fail)?;
        tracing::info!(topic = %name, "deleted topic");
        Ok(())
    }

    /// Closes every log: syncs and checkpoints.
    /// Returns how many partitions failed to close (their last fsync or checkpoint).
    pub fn close_all(&self) -> usize {
        let mut failed = 0;
        for topic in self.list() {
            for log in &topic.partitions {
                if let Err(error) = log.close() {
                    tracing::error!(dir = %log.dir().display(), %error, "closing partition failed");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// Applies retention to every partition of every topic but the internal ones, whose
    /// owners delete what they no longer need (the offsets store: what its snapshot covers).
    pub fn enforce_retention(&self, now_ms: u64) {
        for topic in self.list().into_iter().filter(|topic| !topic.internal) {
            for log in &topic.partitions {
                match log.enforce_retention(now_ms) {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::debug!(dir = %log.dir().display(), deleted, "retention")
                    }
                    Err(error) => {
                        tracing::warn!(dir = %log.dir().display(), %error, "retention failed")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rules() {
        for good in ["orders", "a", "A-b_c.d", &"x".repeat(249)] {
            validate_topic_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "__consumer_offsets",
            "with space",
            "slash/y",
            "é",
            &"x".repeat(250),
        ] {
            let error = validate_topic_name(bad).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidTopicName, "{bad:?}");
        }
    }
}
