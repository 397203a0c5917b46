//! Idempotent producers: ids and epochs broker-wide, sequence state per partition.
//!
//! ```text
//! InitProducerId ─▶ registry.rs  id counter (blocks of ids reserved durably ahead)
//!                                name -> (id, epoch), persisted under <data-dir>/producers/
//!                        │ fence: the new epoch is pushed into every partition holding the id,
//!                        ▼        which reports where that partition's sequence continues
//! Produce ──────▶ PartitionLog::append_idempotent ── writer lock ──▶ state.rs check ─▶ append ─▶ record
//!                        (snapshot at each segment roll and at close; rebuilt on open from the
//!                         newest snapshot that matches the log, plus the batches after it)
//! ```
//!
//! # The rules
//!
//! - A producer without a name gets a fresh id and epoch 0. Ids are never handed out twice,
//!   even across crashes: a block of [`registry::ID_BLOCK_SIZE`] ids is reserved durably before
//!   any of them is used, and a restart skips what is left of the block.
//! - A producer with a name gets the name's id with the epoch bumped (persisted before it is
//!   answered). The bump fences every older instance at once: the new epoch is the floor the
//!   partition checks under its writer lock, so an older instance's next batch, on any
//!   partition, gets `ProducerFenced`.
//! - Sequences are per producer id and partition, and they **continue across epochs**: the new
//!   instance learns each partition's next sequence from InitProducerId and carries on there,
//!   so a restarted producer (an outbox relay, say) neither duplicates nor leaves a gap. A batch
//!   with a higher epoch than the partition has seen is accepted when its sequence continues.
//! - A partition keeps the last 5 batches of each producer. A batch equal to one of them (same
//!   epoch, first and last sequence) is a retry: it is not written again and is answered with
//!   error code `None` and the original base offset (under `acks=durable` only once the original
//!   is fsynced), so a client sees plain success with the original offsets.
//! - Any other sequence than last + 1 is `OutOfOrderSequence` and nothing is written. A
//!   producer the partition holds no state for must start at sequence 0; any other first
//!   sequence is `UnknownProducerId` (its state expired or never existed here: the client
//!   should start again with InitProducerId). A producer id the broker never issued, or an
//!   epoch above the one issued to a named producer, is `UnknownProducerId` too.
//! - State is bounded: `limits.max_producers` caps the (producer, partition) states held
//!   broker-wide (and, separately, the number of names). A new producer over the cap first
//!   makes its partition drop the producers idle longer than `producer_expiry_ms`; if that
//!   frees nothing it gets `LimitExceeded`. Idle producers are also dropped by the periodic
//!   retention pass, at each segment roll, and when retention deletes every batch they wrote.
//!   Idleness is measured by the broker's clock at the producer's last batch, not by the
//!   batch's own timestamps, which a producer replaying old events may set far in the past.

pub mod registry;
pub mod state;

pub use registry::{ProducerIdError, ProducerRegistry};
pub use state::{
    BatchMetadata, IncomingBatch, ProducerBudget, ProducerEntry, ProducerError, ProducerStateTable,
    RETAINED_BATCHES,
};
