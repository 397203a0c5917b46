//! What a sent record resolves to: [`Delivery`], through a [`DeliveryFuture`].
//!
//! Records share their batch's completion: one allocation per batch, none per record. A
//! [`DeliveryFuture`] is the batch's completion plus the record's index in the batch; its
//! offset is the batch's base offset plus that index.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::sync::{Mutex, MutexGuard};

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

    /// The partition of the batch.
    #[cfg(test)]
    pub(crate) fn partition(&self) -> u32 {
        self.partition
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

/// Resolves when every record of one [`Producer::enqueue_many`](super::Producer::enqueue_many)
/// call has been acknowledged, or when one of them has failed for good.
///
/// It holds one entry per run of consecutive records that went into the same batch (one
/// allocation for a whole call, nothing per record). Dropping it does not cancel the sends.
#[derive(Debug, Default)]
pub struct DeliveriesFuture {
    /// Per run of records in one batch: the future of its first record, and its length.
    runs: Vec<(DeliveryFuture, u32)>,
    /// Runs before this one have resolved, successfully.
    resolved: usize,
    /// Their deliveries.
    delivered: Vec<(Delivery, u32)>,
}

impl DeliveriesFuture {
    /// Adds the record at `index` of the batch behind `completion`: it extends the last run
    /// when it follows that run's last record in the same batch.
    pub(crate) fn push(&mut self, completion: &Arc<BatchCompletion>, index: u32) {
        if let Some((first, count)) = self.runs.last_mut()
            && Arc::ptr_eq(&first.completion, completion)
            && first.index + *count == index
        {
            *count += 1;
            return;
        }
        self.runs
            .push((DeliveryFuture::new(Arc::clone(completion), index), 1));
    }
}

impl Future for DeliveriesFuture {
    type Output = Result<Deliveries>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        while let Some((first, count)) = this.runs.get_mut(this.resolved) {
            match Pin::new(first).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(delivery)) => {
                    this.delivered.push((delivery, *count));
                    this.resolved += 1;
                }
            }
        }
        Poll::Ready(Ok(Deliveries {
            runs: std::mem::take(&mut this.delivered),
        }))
    }
}

/// Where the records of one [`Producer::enqueue_many`](super::Producer::enqueue_many) call
/// were written, in the order they were given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deliveries {
    /// Runs of records with consecutive offsets in one partition: the first one's delivery and
    /// the run's length.
    runs: Vec<(Delivery, u32)>,
}

impl Deliveries {
    /// The number of records.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|(_, count)| *count as usize).sum()
    }

    /// True when the call had no records.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Each record's delivery, in the order the records were given.
    pub fn iter(&self) -> impl Iterator<Item = Delivery> + '_ {
        self.runs.iter().flat_map(|(first, count)| {
            (0..u64::from(*count)).map(move |step| Delivery {
                partition: first.partition,
                offset: first.offset.map(|offset| offset + step),
            })
        })
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
    async fn deliveries_follow_the_records_across_batches() {
        let first_batch = BatchCompletion::new(1);
        let second_batch = BatchCompletion::new(2);
        let mut deliveries = DeliveriesFuture::default();
        for index in 5..8 {
            deliveries.push(&first_batch, index);
        }
        deliveries.push(&second_batch, 0);
        deliveries.push(&second_batch, 1);
        // Not consecutive: a run of its own, still in order.
        deliveries.push(&first_batch, 9);
        assert_eq!(deliveries.runs.len(), 3);
        let waiter = tokio::spawn(deliveries);
        second_batch.complete(Ok(Some(40)));
        first_batch.complete(Ok(Some(100)));
        let delivered = waiter.await.unwrap().unwrap();
        assert_eq!(delivered.len(), 6);
        let offsets: Vec<(u32, Option<u64>)> = delivered
            .iter()
            .map(|delivery| (delivery.partition, delivery.offset))
            .collect();
        assert_eq!(
            offsets,
            [
                (1, Some(105)),
                (1, Some(106)),
                (1, Some(107)),
                (2, Some(40)),
                (2, Some(41)),
                (1, Some(109)),
            ]
        );
    }

    #[tokio::test]
    async fn deliveries_fail_when_one_batch_fails() {
        let ok_batch = BatchCompletion::new(0);
        let failed_batch = BatchCompletion::new(1);
        let mut deliveries = DeliveriesFuture::default();
        deliveries.push(&ok_batch, 0);
        deliveries.push(&failed_batch, 0);
        ok_batch.complete(Ok(Some(7)));
        failed_batch.complete(Err(Arc::new(Error::ConnectionClosed)));
        assert!(matches!(deliveries.await, Err(Error::ConnectionClosed)));
        assert!(DeliveriesFuture::default().await.unwrap().is_empty());
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

/// Loom models of the completion shared by a batch's records, run with
/// `RUSTFLAGS="--cfg sluice_loom" CARGO_TARGET_DIR=target/loom cargo test -p sluice-client --release --lib loom_tests`.
///
/// The sender task completes a batch while the application's tasks, on other threads, poll the
/// records' futures. A future that registered its waker and is never woken leaves its thread
/// parked for ever, which loom reports as a deadlock.
///
/// The rest of the producer's accounting needs no model of its own: `buffer_bytes` is a tokio
/// `Semaphore` (one permit per byte; tokio's own loom suite covers it) whose permits a batch
/// takes before it is created and gives back exactly once, in `sender::finish`; the bytes a
/// call holds between the two are plain values owned by that call or by the batch under the
/// accumulator's mutex. The per-partition in-flight limit is state of the sender task alone
/// (`SenderState`), never shared between threads. `Progress` is a mutex-guarded set feeding a
/// tokio `watch` channel, whose `wait_for` checks the current value before it waits.
#[cfg(all(test, sluice_loom))]
mod loom_tests {
    use std::pin::pin;
    use std::task::Wake;

    use loom::thread;

    use super::*;

    /// Wakes a parked loom thread (as in the broker's `storage::signal` models).
    struct Unparker(thread::Thread);

    impl Wake for Unparker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls `future` on the current loom thread until it is ready, parking between polls.
    /// Loom remembers an unpark that comes before the park, so only a waker that is never
    /// called leaves the thread parked.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        let waker = Waker::from(Arc::new(Unparker(thread::current())));
        let mut context = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
            thread::park();
        }
    }

    fn offset(outcome: Result<Delivery>) -> Option<u64> {
        outcome.expect("the batch was acknowledged").offset
    }

    #[test]
    fn a_future_polled_before_the_answer_is_woken_by_it() {
        loom::model(|| {
            let completion = BatchCompletion::new(1);
            let record = DeliveryFuture::new(Arc::clone(&completion), 2);
            let application = thread::spawn(move || offset(block_on(record)));
            completion.complete(Ok(Some(100)));
            assert_eq!(application.join().unwrap(), Some(102));
        });
    }

    #[test]
    fn one_answer_wakes_two_records_awaited_on_two_threads() {
        loom::model(|| {
            let completion = BatchCompletion::new(1);
            let first = DeliveryFuture::new(Arc::clone(&completion), 0);
            let second = DeliveryFuture::new(Arc::clone(&completion), 1);
            let first = thread::spawn(move || offset(block_on(first)));
            let second = thread::spawn(move || offset(block_on(second)));
            completion.complete(Ok(Some(7)));
            assert_eq!(first.join().unwrap(), Some(7));
            assert_eq!(second.join().unwrap(), Some(8));
        });
    }

    /// The broker's answer and the delivery timeout race to complete the batch: whichever
    /// wins, every record sees that same outcome.
    #[test]
    fn the_first_outcome_wins_for_every_record() {
        loom::model(|| {
            let completion = BatchCompletion::new(0);
            let early = DeliveryFuture::new(Arc::clone(&completion), 0);
            let late = DeliveryFuture::new(Arc::clone(&completion), 0);
            let application = thread::spawn(move || block_on(early).ok().map(|d| d.offset));
            let answer = {
                let completion = Arc::clone(&completion);
                thread::spawn(move || completion.complete(Ok(Some(5))))
            };
            completion.complete(Err(Arc::new(Error::Timeout { timeout_ms: 1 })));
            answer.join().unwrap();
            let seen_early = application.join().unwrap();
            let seen_late = block_on(late).ok().map(|d| d.offset);
            assert_eq!(seen_early, seen_late, "records of one batch disagree");
        });
    }

    /// A future polled once by one task and then awaited by another (its waker changes): the
    /// answer wakes the task that polled last.
    #[test]
    fn a_future_moved_to_another_task_is_woken_there() {
        loom::model(|| {
            let completion = BatchCompletion::new(0);
            let mut record = DeliveryFuture::new(Arc::clone(&completion), 0);
            let application = thread::spawn(move || {
                let first = Pin::new(&mut record).poll(&mut Context::from_waker(Waker::noop()));
                match first {
                    Poll::Ready(outcome) => offset(outcome),
                    Poll::Pending => offset(block_on(record)),
                }
            });
            completion.complete(Ok(Some(3)));
            assert_eq!(application.join().unwrap(), Some(3));
        });
    }
}
