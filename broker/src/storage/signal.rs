//! The high-watermark publish / notify protocol of a partition log.
//!
//! A partition has one writer. For each append it
//!
//! 1. writes the batch's bytes into the active segment file,
//! 2. publishes the new high watermark (the next offset to be assigned) with a `Release` store,
//!    and with it the bytes the log has appended through it,
//! 3. wakes every long-poll fetch that registered itself as waiting.
//!
//! Readers load the watermark with `Acquire` and then read only below it, with positional reads
//! that never block the writer. Long-poll fetches wait with [`HighWatermark::wait_beyond`] until
//! the watermark passes their fetch offset, and put their own deadline around it with
//! `tokio::time::timeout` (see the example on [`HighWatermark`]).
//!
//! # Why the orderings are right
//!
//! *Data before watermark.* The writer's file write is sequenced before its `Release` store of
//! the watermark. A reader whose `Acquire` load returns that value, or any later one (each later
//! store is itself a `Release` store sequenced after its own write), synchronises with that
//! store, so every write below the value it read happens before its reads. A reader therefore
//! never sees a watermark ahead of the bytes. With `Relaxed` on either side nothing in the
//! language orders the two. On the real disk the kernel's own locking around `pwrite` and
//! `pread` would probably hide that, but in-memory files (as in tests) would return missing
//! bytes, and the loom models below fail when either ordering is weakened.
//!
//! *No lost wake-up.* A waiter that finds the watermark too low takes the waiter lock, stores its
//! `Waker`, and checks the watermark again while still holding the lock. The writer stores the
//! watermark under the same lock, before it collects the wakers there (with the bytes appended
//! through it, so that [`HighWatermark::appended`] reads the two as a pair). The lock orders the two
//! critical sections: if the waiter's came first, its waker is in the list the writer collects
//! and wakes; if the writer's came first, the writer's unlock happens before the waiter's lock,
//! so the waiter's second check sees the new watermark and returns `Ready` instead of sleeping.
//! The mutex supplies this ordering, so the watermark itself needs nothing stronger than
//! `Release`/`Acquire`. [`HighWatermark::close`] uses the same pattern with its closed flag.
//!
//! A writer could skip the lock when nobody waits by keeping an atomic count of waiters, but
//! then the writer's "store watermark, load count" and the waiter's "bump count, load watermark"
//! would each need `SeqCst` (store-buffering), and an uncontended lock per append costs less than
//! getting that subtly wrong.
//!
//! *Bounded memory.* Each [`WaitBeyond`] future holds at most one registration, keyed by a
//! number it owns. The writer takes all registrations when it wakes them; a future removes its
//! own when it completes or is dropped (a fetch whose `timeout` elapsed, or whose connection
//! closed). So the registrations never outnumber the live, pending futures.
//!
//! The wakers are taken out under the lock and woken after it is released: a waker may run
//! arbitrary code, even poll its task inline, which would then deadlock on the lock; and a task
//! woken on another thread should not find the lock still held.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::PoisonError;
use std::task::{Context, Poll, Waker};

use super::sync::{AtomicBool, AtomicU64, Mutex, Ordering};

/// The partition log was closed (deleted, or the broker is shutting down) before its high
/// watermark passed the offset being waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the partition log was closed while waiting for new records")]
pub struct Closed;

/// A partition log's high watermark: the next offset to be assigned, so every offset below it
/// is in the log and readable. One writer publishes it; any number of readers load it or wait
/// for it to move.
///
/// A long-poll fetch puts its `max_wait_ms` around [`wait_beyond`](Self::wait_beyond) with
/// `tokio::time::timeout`; when the deadline passes, the dropped future removes its
/// registration.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use sluice_broker::storage::signal::{Closed, HighWatermark};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let watermark = Arc::new(HighWatermark::new(0));
///
/// // The writer appends offsets 0, 1 and 2 to the segment file, then publishes.
/// let writer = Arc::clone(&watermark);
/// tokio::spawn(async move { writer.publish(3, 3) });
///
/// // A fetch at offset 0 with max_wait_ms = 500.
/// let fetch_offset = 0;
/// let max_wait = Duration::from_millis(500);
/// match tokio::time::timeout(max_wait, watermark.wait_beyond(fetch_offset)).await {
///     // Read [fetch_offset, watermark.get()) from the segments.
///     Ok(Ok(())) => assert_eq!(watermark.get(), 3),
///     // The partition was deleted or the broker is stopping.
///     Ok(Err(Closed)) => unreachable!("nobody closes the log in this example"),
///     // Answer with an empty fetch.
///     Err(_elapsed) => unreachable!("the writer publishes well within the deadline"),
/// }
/// # }
/// ```
pub struct HighWatermark {
    /// The next offset to be assigned. Stored only by the writer.
    next_offset: AtomicU64,
    /// The bytes the log has appended (since it was opened) through `next_offset`. Stored only
    /// by the writer, after `next_offset` and under the waiter lock (see
    /// [`appended`](Self::appended) and [`appended_at_most`](Self::appended_at_most)).
    appended_bytes: AtomicU64,
    /// Set once, by [`close`](Self::close), and never cleared.
    closed: AtomicBool,
    /// The fetches waiting for the watermark to move.
    waiters: Mutex<Waiters>,
}

/// Registered wakers, keyed so that each [`WaitBeyond`] can find and remove its own.
#[derive(Default)]
struct Waiters {
    /// The key the next registration gets. A u64 does not wrap in the life of a broker.
    next_key: u64,
    /// A `BTreeMap` rather than a `HashMap` so that wake order does not depend on a random hash
    /// seed: loom replays each interleaving and needs the same operations in the same order.
    wakers: BTreeMap<u64, Waker>,
}

impl HighWatermark {
    /// A watermark at `initial`: the log end found when the partition was opened (after any
    /// recovery truncation), or 0 for a new partition.
    pub fn new(initial: u64) -> Self {
        Self {
            next_offset: AtomicU64::new(initial),
            appended_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Waiters::default()),
        }
    }

    /// The current high watermark. Every offset below it is in the log, and its bytes are
    /// visible to a read made after this call.
    pub fn get(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Publishes `next_offset` as the new high watermark and wakes every waiting fetch.
    /// `appended_bytes` is how many bytes the log has appended since it was opened, through
    /// `next_offset`; it only grows, and [`appended`](Self::appended) reads it paired with the
    /// watermark.
    ///
    /// Only the partition's writer calls this, after the bytes of every offset below
    /// `next_offset` are in the segment file. Publishing the current value again does nothing.
    ///
    /// # Panics
    ///
    /// If `next_offset` is below the current watermark: readers may already have served the
    /// offsets in between, so moving backwards is a bug in the writer. Truncation at recovery
    /// happens before there are readers; see [`reset`](Self::reset).
    pub fn publish(&self, next_offset: u64, appended_bytes: u64) {
        // The writer is the only thread that stores, so it reads back its own last store and
        // needs no ordering for that.
        let current = self.next_offset.load(Ordering::Relaxed);
        assert!(
            next_offset >= current,
            "high watermark moved backwards from {current} to {next_offset}"
        );
        if next_offset == current {
            // Every waiter that could have been satisfied by this value was woken when it was
            // first published, and later ones checked it while registering.
            return;
        }
        // Stored under the lock, before the wakers are taken: "No lost wake-up" (the module
        // documentation) holds, and `appended` reads the watermark paired with its byte count.
        self.wake_all_after(|| {
            // Release: the bytes written below `next_offset` become visible to any reader whose
            // Acquire load sees this value (see the module documentation).
            self.next_offset.store(next_offset, Ordering::Release);
            // After the watermark: see `appended_at_most`.
            self.appended_bytes.store(appended_bytes, Ordering::Release);
        });
    }

    /// The watermark and the bytes the log had appended through it, as one pair: both are
    /// read under the waiter lock they are stored under. A fetch that read too little takes
    /// this after a wake-up, to learn how much was appended since without reading it.
    pub fn appended(&self) -> Appended {
        let _waiters = self.waiters();
        Appended {
            next_offset: self.next_offset.load(Ordering::Acquire),
            bytes: self.appended_bytes.load(Ordering::Acquire),
        }
    }

    /// A watermark and bytes no more than the log had appended through it, without the lock:
    /// what a fetch takes before it reads, to count later appends from (never too few).
    ///
    /// The bytes are loaded first, then the watermark. Each publish stores the watermark
    /// before its bytes, so a load that sees a publish's bytes synchronises with it and the
    /// later watermark load sees that publish's watermark or a later one: the bytes belong to
    /// the watermark returned or to an earlier one.
    pub fn appended_at_most(&self) -> Appended {
        let bytes = self.appended_bytes.load(Ordering::Acquire);
        Appended {
            next_offset: self.next_offset.load(Ordering::Acquire),
            bytes,
        }
    }

    /// Closes the log: every pending and future [`wait_beyond`](Self::wait_beyond) that is not
    /// already satisfied returns [`Closed`]. Called when the partition is deleted or the broker
    /// shuts down. Closing twice is harmless.
    pub fn close(&self) {
        // The flag is stored before the waiter lock is taken, and the waiter checks it again
        // under the lock: the same argument as "No lost wake-up" in the module documentation.
        self.closed.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sets the watermark to any value, lower included. Taking `&mut self` proves that no
    /// reader or waiter holds a reference, which is what makes moving backwards safe: it is for
    /// truncating a torn tail at recovery, before the partition is shared. Prefer creating the
    /// watermark with the recovered log end when that is possible.
    pub fn reset(&mut self, next_offset: u64) {
        // Exclusive access: whoever shares the watermark later (an `Arc` handed to another
        // thread) orders this store before that thread's loads.
        self.next_offset.store(next_offset, Ordering::Relaxed);
    }

    /// A future that completes with `Ok(())` once the watermark is greater than `offset` (that
    /// is, once the record at `offset` is readable), or with `Err(Closed)` if the log is closed
    /// first. When the watermark has already passed `offset` it completes on its first poll
    /// without taking any lock, even after `close`.
    ///
    /// Dropping the future (a timeout, a cancelled fetch) removes its registration.
    pub fn wait_beyond(&self, offset: u64) -> WaitBeyond<'_> {
        WaitBeyond {
            watermark: self,
            offset,
            key: None,
        }
    }

    /// How many fetches are registered as waiting: at most the number of pending
    /// [`WaitBeyond`] futures. A future that was woken but not yet polled again is not counted,
    /// because the writer takes the registrations it wakes. For metrics and tests.
    pub fn waiter_count(&self) -> usize {
        self.waiters().wakers.len()
    }

    /// What a waiter does once the watermark is beyond `offset` or the log is closed, or `None`
    /// while it must keep waiting. The watermark is checked first so that records published
    /// before a close are still delivered.
    fn check(&self, offset: u64) -> Option<Result<(), Closed>> {
        if self.get() > offset {
            Some(Ok(()))
        } else if self.is_closed() {
            Some(Err(Closed))
        } else {
            None
        }
    }

    /// Wakes every registered waiter, removing their registrations.
    fn wake_all(&self) {
        self.wake_all_after(|| {});
    }

    /// Runs `update` under the waiter lock, then wakes every registered waiter, removing their
    /// registrations.
    fn wake_all_after(&self, update: impl FnOnce()) {
        // The guard is a temporary of this block, so the lock is released before any waker
        // runs.
        let wakers = {
            let mut waiters = self.waiters();
            update();
            std::mem::take(&mut waiters.wakers)
        };
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    fn waiters(&self) -> impl DerefMut<Target = Waiters> {
        // A panic while the lock was held can at worst leave a stale waker behind, which costs
        // one spurious wake-up, so a poisoned lock is still safe to use.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for HighWatermark {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately lock-free, so that formatting never contends with the writer.
        formatter
            .debug_struct("HighWatermark")
            .field("next_offset", &self.get())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// A high watermark and the bytes its log had appended (since it was opened) through it; see
/// [`HighWatermark::appended`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub next_offset: u64,
    pub bytes: u64,
}

/// The future returned by [`HighWatermark::wait_beyond`].
#[must_use = "futures do nothing unless polled or awaited"]
pub struct WaitBeyond<'a> {
    watermark: &'a HighWatermark,
    offset: u64,
    /// The key of this future's registration, while it may still be registered. It can be
    /// stale: the writer removes registrations when it wakes them, without telling the future.
    key: Option<u64>,
}

impl WaitBeyond<'_> {
    fn deregister(&mut self) {
        if let Some(key) = self.key.take() {
            self.watermark.waiters().wakers.remove(&key);
        }
    }
}

impl Future for WaitBeyond<'_> {
    type Output = Result<(), Closed>;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let watermark = this.watermark;

        // A consumer that is behind finds its data already there: answer without the lock.
        if let Some(result) = watermark.check(this.offset) {
            this.deregister();
            return Poll::Ready(result);
        }

        let mut waiters = watermark.waiters();
        match this.key.and_then(|key| waiters.wakers.get_mut(&key)) {
            // Still registered from an earlier poll: keep the entry, but a task may have moved
            // to another executor or been given another waker since.
            Some(registered) => {
                if !registered.will_wake(context.waker()) {
                    *registered = context.waker().clone();
                }
            }
            // First poll, or the writer took the registration when it woke us for a watermark
            // that was still too low.
            None => {
                let key = waiters.next_key;
                waiters.next_key += 1;
                waiters.wakers.insert(key, context.waker().clone());
                this.key = Some(key);
            }
        }

        // The second check, under the lock, closes the race with a publish that happened after
        // the first check (see "No lost wake-up" in the module documentation).
        if let Some(result) = watermark.check(this.offset) {
            if let Some(key) = this.key.take() {
                waiters.wakers.remove(&key);
            }
            return Poll::Ready(result);
        }
        Poll::Pending
    }
}

impl Drop for WaitBeyond<'_> {
    fn drop(&mut self) {
        self.deregister();
    }
}

impl fmt::Debug for WaitBeyond<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("WaitBeyond")
            .field("offset", &self.offset)
            .field("registered", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(sluice_loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Polls a future once, as an executor would, with a waker that does nothing.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Lets spawned tasks on the current-thread runtime run until `done` holds.
    async fn yield_until(mut done: impl FnMut() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached after 1000 yields");
    }

    #[test]
    fn the_types_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<HighWatermark>();
        // Fetch handlers run in spawned tasks, so the future they await must be Send.
        assert_send_sync::<WaitBeyond<'static>>();
    }

    #[test]
    fn appended_reads_the_watermark_with_the_bytes_published_with_it() {
        let watermark = HighWatermark::new(7);
        assert_eq!(
            watermark.appended(),
            Appended {
                next_offset: 7,
                bytes: 0
            }
        );
        watermark.publish(9, 300);
        watermark.publish(12, 1_000);
        // Publishing the current watermark again changes nothing, its bytes included.
        watermark.publish(12, 5_000);
        let pair = Appended {
            next_offset: 12,
            bytes: 1_000,
        };
        assert_eq!(watermark.appended(), pair);
        assert_eq!(watermark.appended_at_most(), pair);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_watermark_passes_its_offset() {
        let watermark = Arc::new(HighWatermark::new(3));
        let waiter = tokio::spawn({
            let watermark = Arc::clone(&watermark);
            async move { watermark.wait_beyond(4).await }
        });
        yield_until(|| watermark.waiter_count() == 1).await;

        // 4 is not beyond 4: the waiter is woken, finds it too low and registers again.
        watermark.publish(4, 4);
        yield_until(|| watermark.waiter_count() == 1).await;
        assert!(!waiter.is_finished());

        watermark.publish(5, 5);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(watermark.waiter_count(), 0);
    }

    #[tokio::test]
    async fn a_waiter_returns_at_once_when_the_watermark_is_already_beyond() {
        let watermark = HighWatermark::new(10);
        let mut already_there = watermark.wait_beyond(9);
        assert_eq!(poll_once(&mut already_there), Poll::Ready(Ok(())));
        assert_eq!(watermark.waiter_count(), 0);
        assert_eq!(watermark.wait_beyond(0).await, Ok(()));

        // The watermark is the next offset to be assigned, so offset 10 is not readable yet.
        let mut not_yet = watermark.wait_beyond(10);
        assert_eq!(poll_once(&mut not_yet), Poll::Pending);
        assert_eq!(watermark.waiter_count(), 1);
    }

    #[tokio::test]
    async fn close_wakes_waiters_with_closed() {
        let watermark = Arc::new(HighWatermark::new(0));
        let waiter = tokio::spawn({
            let watermark = Arc::clone(&watermark);
            async move { watermark.wait_beyond(0).await }
        });
        yield_until(|| watermark.waiter_count() == 1).await;

        watermark.close();
        assert_eq!(waiter.await.unwrap(), Err(Closed));
        assert_eq!(watermark.waiter_count(), 0);

        // Later waits end at once: closed beyond the watermark, served below it.
        assert_eq!(watermark.wait_beyond(0).await, Err(Closed));
        let watermark = HighWatermark::new(5);
        watermark.close();
        assert_eq!(watermark.wait_beyond(4).await, Ok(()));
        assert_eq!(watermark.wait_beyond(5).await, Err(Closed));
    }

    #[test]
    fn dropped_waiters_are_removed() {
        let watermark = HighWatermark::new(0);
        let mut waiters: Vec<_> = (0..100).map(|_| watermark.wait_beyond(7)).collect();
        for waiter in &mut waiters {
            assert_eq!(poll_once(waiter), Poll::Pending);
        }
        assert_eq!(watermark.waiter_count(), 100);

        // Polling again updates a registration rather than adding one.
        assert_eq!(poll_once(&mut waiters[0]), Poll::Pending);
        assert_eq!(watermark.waiter_count(), 100);

        waiters.truncate(40);
        assert_eq!(watermark.waiter_count(), 40);

        // A publish takes every registration; the woken futures register again when polled,
        // and dropping one whose registration was already taken is harmless.
        watermark.publish(3, 3);
        assert_eq!(watermark.waiter_count(), 0);
        for waiter in &mut waiters[..10] {
            assert_eq!(poll_once(waiter), Poll::Pending);
        }
        assert_eq!(watermark.waiter_count(), 10);
        drop(waiters);
        assert_eq!(watermark.waiter_count(), 0);
    }

    #[tokio::test]
    async fn registrations_stay_bounded_by_live_waiters_across_many_timeouts() {
        let watermark = HighWatermark::new(0);
        for _ in 0..1_000 {
            let mut waiter = watermark.wait_beyond(0);
            assert_eq!(poll_once(&mut waiter), Poll::Pending);
        }
        assert_eq!(watermark.waiter_count(), 0);
    }

    // The workspace's tokio is built without `test-util`, so `tokio::time::pause` is not
    // available; these use a short real deadline instead, which only costs its length because
    // the outcome does not depend on timing.
    #[tokio::test]
    async fn a_timeout_gives_up_and_leaves_no_registration() {
        let watermark = HighWatermark::new(5);
        let result =
            tokio::time::timeout(Duration::from_millis(20), watermark.wait_beyond(5)).await;
        assert!(
            result.is_err(),
            "nothing was published, so the wait must time out"
        );
        assert_eq!(watermark.waiter_count(), 0);
    }

    #[tokio::test]
    async fn a_publish_within_the_timeout_ends_the_wait() {
        let watermark = Arc::new(HighWatermark::new(5));
        let writer = Arc::clone(&watermark);
        tokio::spawn(async move { writer.publish(6, 6) });
        let result = tokio::time::timeout(Duration::from_secs(10), watermark.wait_beyond(5)).await;
        assert_eq!(result, Ok(Ok(())));
    }

    #[test]
    #[should_panic(expected = "high watermark moved backwards from 5 to 4")]
    fn publishing_a_lower_watermark_panics() {
        let watermark = HighWatermark::new(5);
        watermark.publish(4, 4);
    }

    #[test]
    fn reset_moves_the_watermark_before_it_is_shared() {
        let mut watermark = HighWatermark::new(9);
        watermark.reset(4);
        assert_eq!(watermark.get(), 4);
        watermark.publish(4, 4);
        watermark.publish(6, 6);
        assert_eq!(watermark.get(), 6);
    }

    /// Many waiters on two worker threads against a writer publishing one offset at a time:
    /// a lost wake-up would leave a waiter hanging until the outer deadline fails the test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_waiter_is_lost_under_concurrent_publishing() {
        const LAST_OFFSET: u64 = 2_000;
        let watermark = Arc::new(HighWatermark::new(0));
        let waiters: Vec<_> = (0..16)
            .map(|index| {
                let watermark = Arc::clone(&watermark);
                tokio::spawn(async move {
                    let mut offset = index;
                    while offset < LAST_OFFSET {
                        watermark.wait_beyond(offset).await.unwrap();
                        assert!(watermark.get() > offset);
                        offset = watermark.get() + index;
                    }
                })
            })
            .collect();
        let writer = tokio::spawn({
            let watermark = Arc::clone(&watermark);
            async move {
                for next_offset in 1..=LAST_OFFSET + 16 {
                    watermark.publish(next_offset, next_offset);
                    tokio::task::yield_now().await;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            writer.await.unwrap();
            for waiter in waiters {
                waiter.await.unwrap();
            }
        })
        .await
        .expect("a waiter missed its wake-up");
        assert_eq!(watermark.waiter_count(), 0);
    }
}

/// Loom models of the protocol, run with
/// `RUSTFLAGS="--cfg sluice_loom" CARGO_TARGET_DIR=target/loom cargo test -p sluice-broker --release --lib storage::signal`.
///
/// Loom runs each model under every interleaving of the threads' synchronisation operations, and
/// lets each `Relaxed` or `Acquire` load return any value the memory model allows. A waiter that
/// is never woken shows up as a deadlock, which loom reports as a failure.
#[cfg(all(test, sluice_loom))]
mod loom_tests {
    use std::pin::pin;
    use std::task::Wake;

    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64;
    use loom::thread;

    use super::*;

    /// Wakes a parked loom thread. Loom's unpark, like a real executor's queue, orders what
    /// the waking thread did before it ahead of what the woken thread does next.
    struct Unparker(thread::Thread);

    impl Wake for Unparker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Drives a future to completion on the current loom thread, parking between polls.
    /// (`loom::future::block_on` needs loom's `futures` feature, which the broker does not
    /// enable.) Loom's unpark is remembered when the thread is not parked yet, so a wake that
    /// lands between a `Pending` poll and the park is not lost; a waker that is never called
    /// leaves the thread parked for ever, which loom reports as a deadlock.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        let waker = Waker::from(std::sync::Arc::new(Unparker(thread::current())));
        let mut context = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
            thread::park();
        }
    }

    /// Stands in for a segment file: one slot per offset, zero until written. The slots are
    /// written and read with `Relaxed`, like plain memory, so that nothing but the watermark
    /// orders the reader's reads after the writer's writes. A `Mutex<Vec<u8>>` would order them
    /// by itself and hide a watermark ordering that is too weak.
    struct SegmentFile {
        slots: Vec<AtomicU64>,
    }

    impl SegmentFile {
        fn new(len: u64) -> Self {
            Self {
                slots: (0..len).map(|_| AtomicU64::new(UNWRITTEN)).collect(),
            }
        }

        fn append(&self, offset: u64) {
            self.slots[slot(offset)].store(record(offset), Ordering::Relaxed);
        }

        /// Reads everything below the watermark, as a fetch does, and checks it is all there.
        fn read_below(&self, watermark: &HighWatermark) {
            let end = watermark.get();
            assert!(
                slot(end) <= self.slots.len(),
                "watermark {end} past the file"
            );
            for offset in 0..end {
                let value = self.slots[slot(offset)].load(Ordering::Relaxed);
                assert_eq!(
                    value,
                    record(offset),
                    "offset {offset} is below watermark {end} but its record is not visible"
                );
            }
        }
    }

    const UNWRITTEN: u64 = 0;

    fn record(offset: u64) -> u64 {
        offset + 100
    }

    fn slot(offset: u64) -> usize {
        usize::try_from(offset).unwrap()
    }

    /// The writer: appends each record, then publishes the watermark just past it.
    fn spawn_writer(
        watermark: &Arc<HighWatermark>,
        file: &Arc<SegmentFile>,
        records: u64,
    ) -> thread::JoinHandle<()> {
        let watermark = Arc::clone(watermark);
        let file = Arc::clone(file);
        thread::spawn(move || {
            for offset in 0..records {
                file.append(offset);
                watermark.publish(offset + 1, offset + 1);
            }
        })
    }

    #[test]
    fn a_woken_reader_sees_every_record_below_the_watermark() {
        loom::model(|| {
            let watermark = Arc::new(HighWatermark::new(0));
            let file = Arc::new(SegmentFile::new(2));
            // Two appends, so the reader may find a later watermark than the one that woke it
            // and must see that one's record too.
            let writer = spawn_writer(&watermark, &file, 2);

            block_on(watermark.wait_beyond(0)).unwrap();
            file.read_below(&watermark);

            writer.join().unwrap();
            assert_eq!(watermark.waiter_count(), 0);
        });
    }

    /// The first publish wakes the reader for a watermark that is still too low, so it must
    /// register again without missing the second.
    #[test]
    fn a_reader_woken_too_early_waits_for_the_next_publish() {
        loom::model(|| {
            let watermark = Arc::new(HighWatermark::new(0));
            let file = Arc::new(SegmentFile::new(2));
            let writer = spawn_writer(&watermark, &file, 2);

            block_on(watermark.wait_beyond(1)).unwrap();
            assert_eq!(watermark.get(), 2);
            file.read_below(&watermark);

            writer.join().unwrap();
            assert_eq!(watermark.waiter_count(), 0);
        });
    }

    #[test]
    fn one_publish_wakes_two_readers() {
        loom::model(|| {
            let watermark = Arc::new(HighWatermark::new(0));
            let file = Arc::new(SegmentFile::new(1));
            let other_reader = {
                let watermark = Arc::clone(&watermark);
                let file = Arc::clone(&file);
                thread::spawn(move || {
                    block_on(watermark.wait_beyond(0)).unwrap();
                    file.read_below(&watermark);
                })
            };
            let writer = spawn_writer(&watermark, &file, 1);

            block_on(watermark.wait_beyond(0)).unwrap();
            file.read_below(&watermark);

            other_reader.join().unwrap();
            writer.join().unwrap();
            assert_eq!(watermark.waiter_count(), 0);
        });
    }

    #[test]
    fn close_wakes_a_waiting_reader() {
        loom::model(|| {
            let watermark = Arc::new(HighWatermark::new(0));
            let closer = {
                let watermark = Arc::clone(&watermark);
                thread::spawn(move || watermark.close())
            };

            assert_eq!(block_on(watermark.wait_beyond(0)), Err(Closed));

            closer.join().unwrap();
            assert_eq!(watermark.waiter_count(), 0);
        });
    }

    /// A fetch for offset 1 polls once and is then cancelled (its timeout fired) while the
    /// writer publishes only offset 0. Whether the publish takes the registration first or the
    /// drop has to remove it, none is left behind.
    #[test]
    fn a_cancelled_waiter_leaves_no_registration() {
        loom::model(|| {
            let watermark = Arc::new(HighWatermark::new(0));
            let file = Arc::new(SegmentFile::new(1));
            let writer = spawn_writer(&watermark, &file, 1);

            let mut waiter = watermark.wait_beyond(1);
            let polled = Pin::new(&mut waiter).poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(polled, Poll::Pending);
            drop(waiter);

            writer.join().unwrap();
            assert_eq!(watermark.waiter_count(), 0);
        });
    }
}
