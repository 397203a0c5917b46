//! Listeners: accept loops only. Each accepted TCP connection, and each stream of an accepted
//! QUIC connection, goes to [`crate::connection::serve`].

pub mod http;
pub mod quic;
pub mod tcp;
