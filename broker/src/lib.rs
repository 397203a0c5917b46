//! The Sluice broker: configuration, listeners, request handlers, storage, topics, consumer
//! groups and producer state (see DESIGN.md).
//!
//! Only the command line exists so far; the server lands with the broker issues.
