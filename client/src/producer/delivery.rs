//! What a sent record resolves to: [`Delivery`], through a [`DeliveryFuture`].
//!
//! Records share their batch's completion: one allocation per batch, none per record. A
//! [`DeliveryFuture`] is the batch's completion plus the record's index in the batch; its
//! offset is the batch's base offset plus that index.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};

/// Where an acknowledged record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// The partition the record went to.
    pub partition: u32,
    /// The record's offset in its partition. `None` with [`Acks::None`](super::Acks::None):
    /// the broker sends no answer, so the future resolves as soon as the request is queued on
    /// the connection, with no offset.
    pub offset: Option<u64>,
}

/// How a batch ended: the base offset (`None` under `acks = none`) or why it failed.
pub(crate) type BatchOutcome = std::result::Result<Option<u64>, Arc<Error>>;

/// The completion shared by every record of one batch.
#[derive(Debug)]
pub(crate) struct BatchCompletion {
    partition: u32,
    state: Mutex<CompletionState>,
}

#[derive(Debug, Default)]
struct CompletionState {
    outcome: Option<BatchOutcome>,
    /// The futures polled before the outcome was known.
    wakers: Vec<Waker>,
}

impl BatchCompletion {
    pub(crate) fn new(partition: u32) -> Arc<BatchCompletion> {
        Arc::new(BatchCompletion {
            partition,
            state: Mutex::new(CompletionState::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CompletionState> {
        // Nothing that can panic runs under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves every record of the batch. The first outcome wins; later ones are ignored.
    pub(crate) fn complete(&self, outcome: BatchOutcome) {
        let wakers = {
            let mut state = self.lock();
            if state.outcome.is_some() {
                return;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }
}

/// Resolves when the broker has acknowledged the record (or its delivery has failed for good).
///
/// Dropping it does not cancel the send: the record is delivered all the same, and the
/// outcome is not reported. That is the fire-and-forget path.
#[derive(Debug)]
pub struct DeliveryFuture {
    completion: Arc<BatchCompletion>,
    /// The record's position in its batch.
    index: u32,
    /// Where this future's waker sits in the completion's list, once registered.
    waker_slot: Option<usize>,
}

impl DeliveryFuture {
    pub(crate) fn new(completion: Arc<BatchCompletion>, index: u32) -> DeliveryFuture {
        DeliveryFuture {
            completion,
            index,
            waker_slot: None,
        }
    }

    /// The partition the record was assigned to (known before the broker answers).
    pub fn partition(&self) -> u32 {
        self.completion.partition
    }
}

impl Future for DeliveryFuture {
    type Output = Result<Delivery>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = this.completion.lock();
        match &state.outcome {
            Some(Ok(base_offset)) => Poll::Ready(Ok(Delivery {
                partition: this.completion.partition,
                offset: base_offset.map(|base| base + u64::from(this.index)),
            })),
            Some(Err(error)) => Poll::Ready(Err(copy_error(error))),
            None => {
                match this.waker_slot {
                    Some(slot) => {
                        if !state.wakers[slot].will_wake(cx.waker()) {
                            state.wakers[slot] = cx.waker().clone();
                        }
                    }
                    None => {
                        state.wakers.push(cx.waker().clone());
                        this.waker_slot = Some(state.wakers.len() - 1);
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// A copy of `error` for one of the many records it failed. `Error` is not `Clone` (it holds
/// `io::Error`s); I/O errors are copied as their kind and message.
#[allow(unreachable_patterns)] // the last arm is for variants added to `Error` later
pub(crate) fn copy_error(error: &Error) -> Error {
    let copy_io = |source: &io::Error| io::Error::new(source.kind(), source.to_string());
    match error {
        Error::InvalidUrl(message) => Error::InvalidUrl(message.clone()),
        Error::Connect { address, source } => Error::Connect {
            address: address.clone(),
            source: copy_io(source),
        },
        Error::ConnectionClosed => Error::ConnectionClosed,
        Error::Io(source) => Error::Io(copy_io(source)),
        Error::Timeout { timeout_ms } => Error::Timeout {
            timeout_ms: *timeout_ms,
        },
        Error::Protocol(wire) => Error::Protocol(wire.clone()),
        Error::Broker { code, message } => Error::Broker {
            code: *code,
            message: message.clone(),
        },
        Error::TooManyInFlight => Error::TooManyInFlight,
        Error::RequestTooLarge {
            frame_bytes,
            max_frame_bytes,
        } => Error::RequestTooLarge {
            frame_bytes: *frame_bytes,
            max_frame_bytes: *max_frame_bytes,
        },
        Error::CircuitOpen { broker } => Error::CircuitOpen {
            broker: broker.clone(),
        },
        Error::RetriesExhausted { attempts, last } => Error::RetriesExhausted {
            attempts: *attempts,
            last: Box::new(copy_error(last)),
        },
        Error::Usage(message) => Error::Usage(message.clone()),
        // A variant added later keeps at least its message.
        other => Error::Usage(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::ErrorCode;

    #[tokio::test]
    async fn every_record_of_a_batch_gets_its_own_offset() {
        let completion = BatchCompletion::new(3);
        let first = DeliveryFuture::new(Arc::clone(&completion), 0);
        let third = DeliveryFuture::new(Arc::clone(&completion), 2);
        let waiter = tokio::spawn(third);
        completion.complete(Ok(Some(100)));
        completion.complete(Ok(Some(999))); // ignored: the first outcome wins
        assert_eq!(
            first.await.unwrap(),
            Delivery {
                partition: 3,
                offset: Some(100)
            }
        );
        assert_eq!(waiter.await.unwrap().unwrap().offset, Some(102));
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_record_with_the_same_error() {
        let completion = BatchCompletion::new(0);
        let futures: Vec<_> = (0..3)
            .map(|index| DeliveryFuture::new(Arc::clone(&completion), index))
            .collect();
        completion.complete(Err(Arc::new(Error::Broker {
            code: ErrorCode::ProducerFenced,
            message: Some("fenced".into()),
        })));
        for future in futures {
            match future.await {
                Err(Error::Broker {
                    code: ErrorCode::ProducerFenced,
                    message: Some(message),
                }) => assert_eq!(message, "fenced"),
                other => panic!("expected ProducerFenced, got {other:?}"),
            }
        }
    }

    #[test]
    fn copies_keep_kind_and_message() {
        let error = Error::RetriesExhausted {
            attempts: 3,
            last: Box::new(Error::Io(io::Error::new(io::ErrorKind::BrokenPipe, "pipe"))),
        };
        assert_eq!(copy_error(&error).to_string(), error.to_string());
    }
}
