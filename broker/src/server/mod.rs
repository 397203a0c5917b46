//! Listeners: accept loops only. Each accepted connection goes to [`crate::connection::serve`].

pub mod tcp;
