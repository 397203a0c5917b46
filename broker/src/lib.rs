//! The Sluice broker: configuration, listeners, request handlers, storage, topics, consumer
//! groups and producer state (see DESIGN.md).

pub mod config;
pub mod storage;
