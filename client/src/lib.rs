//! The Sluice client library.
//!
//! Built so far: [`Connection`], one multiplexed connection to a broker. Producers, consumers,
//! group members and admin calls arrive with the client issue.

#![deny(unsafe_code)]

pub mod connection;
pub mod error;

pub use sluice_protocol as protocol;
