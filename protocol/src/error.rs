//! Errors: the wire error codes that travel in responses, and the decoding errors that never
//! leave this process.

use std::fmt;

/// The error code carried by every response header and every per-partition result.
///
/// The numbers are part of the wire format: a number is never reused, even when its variant is
/// retired. A code this build does not know decodes as [`ErrorCode::UnknownServerError`], so an
/// older client still fails cleanly against a newer broker.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum ErrorCode {
    /// Success.
    #[default]
    None = 0,
    /// The broker hit an error it has no better code for.
    UnknownServerError = 1,
    /// A record batch failed validation (CRC, magic, counts, lengths): nothing of it was written.
    CorruptMessage = 2,
    /// A frame, batch or record is over its configured size limit.
    MessageTooLarge = 3,
    /// The topic does not exist.
    UnknownTopic = 4,
    /// The topic exists but has no such partition.
    UnknownPartition = 5,
    /// The requested offset is below the log start or above the log end.
    OffsetOutOfRange = 6,
    /// The api key is known but not at this version.
    UnsupportedVersion = 7,
    /// The api key is not known to this broker.
    UnknownApiKey = 8,
    /// The request is malformed (a body that does not decode, a field out of range).
    InvalidRequest = 9,
    /// A topic of that name exists already.
    TopicAlreadyExists = 10,
    /// The topic name breaks the naming rules (`[A-Za-z0-9._-]{1,249}`, not `.`/`..`/`__*`).
    InvalidTopicName = 11,
    /// The partition count is zero or over the configured maximum.
    InvalidPartitions = 12,
    /// A configuration value or override is invalid.
    InvalidConfig = 13,
    /// The request breaks a broker policy.
    PolicyViolation = 14,
    /// This broker is not the coordinator of the group.
    NotCoordinator = 15,
    /// The group is rebalancing; retry after the next heartbeat.
    RebalanceInProgress = 16,
    /// The member epoch is stale: the member was fenced.
    FencedMemberEpoch = 17,
    /// The member is not (or no longer) part of the group.
    UnknownMember = 18,
    /// A producer sequence skipped ahead of the next expected one.
    OutOfOrderSequence = 19,
    /// The batch was written before; the response carries its original offsets.
    DuplicateSequence = 20,
    /// A newer instance with the same producer id holds a higher epoch.
    ProducerFenced = 21,
    /// The producer id is not known (expired or never issued).
    UnknownProducerId = 22,
    /// The caller is not allowed to do this.
    Unauthorized = 23,
    /// The caller is over a quota or a limit that frees up with time; retry later.
    Throttled = 24,
    /// A disk error: a write or fsync failed (the batch may or may not be on disk, and the
    /// partition now refuses writes), or a read found damaged data.
    StorageError = 25,
    /// The request did not complete within its timeout.
    RequestTimedOut = 26,
    /// A configured limit was reached (connections, in-flight requests, topics, producers...).
    LimitExceeded = 27,
    /// The broker is shutting down.
    BrokerShuttingDown = 28,
    /// The group does not exist.
    UnknownGroup = 29,
    /// The session timeout is outside the broker's configured range.
    InvalidSessionTimeout = 30,
    /// The partition refuses writes since a disk error or corruption (named in the broker's
    /// log) and nothing of this request's batch was written; reads go on. Until an operator
    /// repairs the partition and restarts the broker, sending again is refused the same way.
    PartitionReadOnly = 31,
}

impl ErrorCode {
    /// Every code, in numeric order. Tests use it to check that numbers round-trip.
    pub const ALL: [ErrorCode; 32] = [
        ErrorCode::None,
        ErrorCode::UnknownServerError,
        ErrorCode::CorruptMessage,
        ErrorCode::MessageTooLarge,
        ErrorCode::UnknownTopic,
        ErrorCode::UnknownPartition,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownApiKey,
        ErrorCode::InvalidRequest,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidTopicName,
        ErrorCode::InvalidPartitions,
        ErrorCode::InvalidConfig,
        ErrorCode::PolicyViolation,
        ErrorCode::NotCoordinator,
        ErrorCode::RebalanceInProgress,
        ErrorCode::FencedMemberEpoch,
        ErrorCode::UnknownMember,
        ErrorCode::OutOfOrderSequence,
        ErrorCode::DuplicateSequence,
        ErrorCode::ProducerFenced,
        ErrorCode::UnknownProducerId,
        ErrorCode::Unauthorized,
        ErrorCode::Throttled,
        ErrorCode::StorageError,
        ErrorCode::RequestTimedOut,
        ErrorCode::LimitExceeded,
        ErrorCode::BrokerShuttingDown,
        ErrorCode::UnknownGroup,
        ErrorCode::InvalidSessionTimeout,
        ErrorCode::PartitionReadOnly,
    ];

    /// The stable wire number.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The variant for a wire number; an unknown number is [`ErrorCode::UnknownServerError`].
    pub fn from_code(code: u16) -> ErrorCode {
        ErrorCode::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or(ErrorCode::UnknownServerError)
    }

    /// True when the same request may succeed if sent again later, unchanged.
    pub const fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotCoordinator
                | ErrorCode::RebalanceInProgress
                | ErrorCode::Throttled
                | ErrorCode::RequestTimedOut
                | ErrorCode::LimitExceeded
                | ErrorCode::BrokerShuttingDown
                | ErrorCode::UnknownServerError
        )
    }

    /// True for [`ErrorCode::None`].
    pub const fn is_ok(self) -> bool {
        matches!(self, ErrorCode::None)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.code())
    }
}

/// Why bytes did not decode. Never sent on the wire: the broker maps it to an [`ErrorCode`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended inside a field. Inside a complete frame this means the frame is malformed.
    #[error("truncated input: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    /// A frame's length prefix is over the configured `max_frame_bytes`.
    #[error("frame of {length} bytes is over the limit of {max_frame_bytes} bytes")]
    FrameTooLarge { length: u64, max_frame_bytes: u32 },
    /// A value is outside what the format allows.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    /// A record batch failed `validate()`.
    #[error("corrupt record batch: {0}")]
    CorruptBatch(String),
    /// A request for an api key this build does not know.
    #[error("unknown api key {0}")]
    UnknownApiKey(u16),
    /// A known api key at a version this build does not speak.
    #[error("unsupported version {version} of api key {api_key}")]
    UnsupportedVersion { api_key: u16, version: u16 },
    /// Bytes were left over after the body was decoded.
    #[error("{0} trailing bytes after the message body")]
    TrailingBytes(usize),
}

impl WireError {
    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        WireError::Invalid {
            what,
            detail: detail.into(),
        }
    }

    /// The error code a broker answers with when a request fails to decode this way.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::MessageTooLarge,
            WireError::CorruptBatch(_) => ErrorCode::CorruptMessage,
            WireError::UnknownApiKey(_) => ErrorCode::UnknownApiKey,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::Truncated { .. }
            | WireError::Invalid { .. }
            | WireError::TrailingBytes(_) => ErrorCode::InvalidRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_dense_and_round_trip() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(
                usize::from(code.code()),
                index,
                "{code:?} out of place in ALL"
            );
            assert_eq!(ErrorCode::from_code(code.code()), *code);
        }
        assert_eq!(ErrorCode::from_code(999), ErrorCode::UnknownServerError);
    }

    #[test]
    fn stable_numbers_are_pinned() {
        // These numbers are on the wire: changing one breaks every deployed client.
        assert_eq!(ErrorCode::CorruptMessage.code(), 2);
        assert_eq!(ErrorCode::UnknownTopic.code(), 4);
        assert_eq!(ErrorCode::OffsetOutOfRange.code(), 6);
        assert_eq!(ErrorCode::OutOfOrderSequence.code(), 19);
        assert_eq!(ErrorCode::ProducerFenced.code(), 21);
        assert_eq!(ErrorCode::StorageError.code(), 25);
        assert_eq!(ErrorCode::InvalidSessionTimeout.code(), 30);
    }

    #[test]
    fn retriable_split() {
        assert!(ErrorCode::NotCoordinator.is_retriable());
        assert!(ErrorCode::Throttled.is_retriable());
        assert!(!ErrorCode::CorruptMessage.is_retriable());
        assert!(!ErrorCode::ProducerFenced.is_retriable());
        assert!(!ErrorCode::None.is_retriable());
    }
}
