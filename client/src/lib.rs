//! The Sluice client library. Producers, consumers, group members and admin calls arrive with
//! the client issue; today it re-exports the wire format, which is what a client builds batches
//! with.

#![deny(unsafe_code)]

pub use sluice_protocol as protocol;
