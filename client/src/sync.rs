//! The synchronisation primitives of the client's hand-synchronised structures.
//!
//! Normally these are the std types. Under `--cfg sluice_loom` they are loom's, so the loom
//! models (in [`crate::producer`]'s `delivery` module) explore every interleaving of the same
//! code that runs in production. The cfg is our own, as in the broker's `storage::sync`,
//! because loom's usual `--cfg loom` reaches tokio and quinn, which do not build under it
//! (DEPENDENCIES.md, pitfall 5). Loom's types panic outside `loom::model`, so under
//! `sluice_loom` only the loom models can run code built on these.

#[cfg(sluice_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(sluice_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
