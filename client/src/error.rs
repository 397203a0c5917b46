//! The client's error type: one enum for everything a call can fail with, and
//! [`Error::is_retriable`] to tell a caller (or a retry loop) whether trying again may help.

use std::io;

use sluice_protocol::{ErrorCode, WireError};

/// A client result.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker URL is not one this client can use; the text names the problem.
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),

    /// No connection could be opened to the broker (resolution, refusal, connect timeout).
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The `host:port` that was tried.
        address: String,
        #[source]
        source: io::Error,
    },

    /// The connection is closed: the broker went away, a read or write failed, or it was closed
    /// on purpose. A request that was in flight when it dropped may or may not have been carried
    /// out by the broker.
    #[error("the connection to the broker is closed")]
    ConnectionClosed,

    /// An I/O error outside of an open connection.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// No response arrived within the request timeout. The broker may still carry the request
    /// out; a late response is dropped.
    #[error("no response within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },

    /// The broker's response could not be decoded.
    #[error("undecodable response from the broker: {0}")]
    Protocol(#[from] WireError),

    /// The broker answered with an error code, for the whole request or for one partition.
    #[error("broker error {code}{}", message_suffix(.message))]
    Broker {
        code: ErrorCode,
        /// The broker's explanation, when it sent one.
        message: Option<String>,
    },

    /// More requests are in flight than the configured limit allows.
    #[error("too many requests in flight")]
    TooManyInFlight,

    /// The encoded request is larger than `max_frame_bytes`; it was not sent, because the
    /// broker would refuse it and close the connection for every other request too.
    #[error("request frame of {frame_bytes} bytes is over the limit of {max_frame_bytes} bytes")]
    RequestTooLarge {
        frame_bytes: u64,
        max_frame_bytes: u32,
    },

    /// The circuit breaker for this broker is open after repeated failures: the call failed at
    /// once instead of waiting on a broker that is down. A probe is allowed after the cool-down.
    #[error("circuit open for {broker}: failing fast after repeated failures")]
    CircuitOpen { broker: String },

    /// A call that retries gave up at its deadline; `last` is the last error seen.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: Box<Error> },

    /// The caller used the API wrongly (a closed producer, a bad option, ...).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// True when the same call may succeed if made again later, unchanged: lost or refused
    /// connections, timeouts, I/O errors and the broker codes that say "later"
    /// ([`ErrorCode::is_retriable`]). A malformed URL, an undecodable response or an oversized
    /// request fail the same way every time.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::ConnectionClosed
            | Error::Io(_)
            | Error::Timeout { .. }
            | Error::TooManyInFlight
            | Error::CircuitOpen { .. } => true,
            Error::Broker { code, .. } => code.is_retriable(),
            Error::InvalidUrl(_)
            | Error::Protocol(_)
            | Error::RequestTooLarge { .. }
            | Error::RetriesExhausted { .. }
            | Error::Usage(_) => false,
        }
    }
}

fn message_suffix(message: &Option<String>) -> String {
    match message {
        Some(message) => format!(": {message}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retriable_split() {
        let io_error = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let retriable = [
            Error::Connect {
                address: "127.0.0.1:7171".into(),
                source: io_error(),
            },
            Error::ConnectionClosed,
            Error::Io(io_error()),
            Error::Timeout { timeout_ms: 1 },
            Error::TooManyInFlight,
            Error::Broker {
                code: ErrorCode::NotCoordinator,
                message: None,
            },
        ];
        for error in &retriable {
            assert!(error.is_retriable(), "{error:?} should be retriable");
        }
        let fatal = [
            Error::InvalidUrl("x".into()),
            Error::Protocol(WireError::TrailingBytes(1)),
            Error::Broker {
                code: ErrorCode::ProducerFenced,
                message: None,
            },
            Error::RequestTooLarge {
                frame_bytes: 2,
                max_frame_bytes: 1,
            },
        ];
        for error in &fatal {
            assert!(!error.is_retriable(), "{error:?} should not be retriable");
        }
    }

    #[test]
    fn broker_error_shows_its_message_when_present() {
        let without = Error::Broker {
            code: ErrorCode::UnknownTopic,
            message: None,
        };
        assert_eq!(without.to_string(), "broker error UnknownTopic (4)");
        let with = Error::Broker {
            code: ErrorCode::UnknownTopic,
            message: Some("no topic \"orders\"".into()),
        };
        assert_eq!(
            with.to_string(),
            "broker error UnknownTopic (4): no topic \"orders\""
        );
    }
}
