//! The synchronisation primitives storage's lock-free protocols are built on.
//!
//! Normally these are the std types. Under `--cfg sluice_loom` they are loom's, so the loom
//! models in [`super::signal`] explore every interleaving and every permitted reordering of the
//! same code that runs in production. The cfg is our own rather than loom's usual `--cfg loom`
//! because that one reaches every crate and tokio, quinn and axum do not build under it (see
//! DEPENDENCIES.md, pitfall 5).
//!
//! Only what the protocols use is re-exported, so that an unused name does not warn. Loom's
//! types panic when used outside `loom::model`, so under `sluice_loom` only the loom models can
//! run code built on these.

#[cfg(sluice_loom)]
pub(crate) use loom::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

#[cfg(not(sluice_loom))]
pub(crate) use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
