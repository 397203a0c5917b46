//! The Sluice broker: configuration, listeners, request handlers, storage, topics, consumer
//! groups and producer state (see DESIGN.md).
//!
//! Built so far: [`storage`]. The server lands with the broker issues.

pub mod storage;
