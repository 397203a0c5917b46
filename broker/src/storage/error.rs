//! Storage errors.

use std::io;
use std::path::PathBuf;

use sluice_protocol::ErrorCode;

use crate::producers::ProducerError;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A filesystem call failed. For an append, nothing of the batch is visible.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The partition refuses writes after a failed fsync or write it could not undo, or after
    /// corruption found on recovery. It must be repaired by an operator; reads of what precedes
    /// the damage still work.
    #[error("partition refuses writes: {reason}")]
    Poisoned { reason: String },
    /// A write refused before anything of it was written, because the partition is
    /// [`Poisoned`](StorageError::Poisoned): unlike a failed write or fsync, the caller knows
    /// the batch is not in the log.
    #[error("partition refuses writes: {reason}")]
    Refused { reason: String },
    /// A read or lookup asked for an offset outside the log.
    #[error("offset {requested} is outside the log [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        requested: u64,
        log_start_offset: u64,
        log_end_offset: u64,
    },
    /// The batch is larger than the log's `max_message_bytes`.
    #[error("record batch of {size_bytes} bytes is over max_message_bytes {max_message_bytes}")]
    BatchTooLarge {
        size_bytes: u64,
        max_message_bytes: u64,
    },
    /// A stored batch failed its checks on read.
    #[error("corrupt data in {file} at position {position}: {detail}")]
    Corrupt {
        file: PathBuf,
        position: u64,
        detail: String,
    },
    /// The log was closed (topic deleted or broker stopping).
    #[error("the log is closed")]
    Closed,
    /// The idempotent-producer rules refused the batch; nothing of it was written.
    #[error(transparent)]
    Producer(#[from] ProducerError),
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }

    /// The wire error code a request failing this way gets.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            StorageError::BatchTooLarge { .. } => ErrorCode::MessageTooLarge,
            StorageError::Closed => ErrorCode::UnknownTopic,
            StorageError::Producer(error) => error.error_code(),
            StorageError::Refused { .. } => ErrorCode::PartitionReadOnly,
            StorageError::Io { .. }
            | StorageError::Poisoned { .. }
            | StorageError::Corrupt { .. } => ErrorCode::StorageError,
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
