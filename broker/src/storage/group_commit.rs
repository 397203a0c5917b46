//! Group commit: the durability bookkeeping of one partition log, as a small state machine.
//!
//! ```text
//!  wait_durable(target) ──▶ register ── durable ≥ target? ──yes──▶ done
//!                              │ no: waiter (target) kept, requested = max(requested, target)
//!  request_sync(target) ──▶ request ─┤
//!                                    └─ not scheduled? ─▶ scheduled = true ─▶ schedule(): one
//!                                                                              sync job queued
//!  flusher: target = high watermark ─▶ fsync ─▶ synced(target, outcome)
//!     ok:     durable = max(durable, target); release every waiter ≤ durable;
//!             requested > durable and writable? ─▶ stay scheduled, run again ─▶ (flusher)
//!             requested > durable, not writable  ─▶ fail the waiters left (see below)
//!     failed: refuse(reason) (the partition refuses writes), fail every waiter
//! ```
//!
//! [`super::log::PartitionLog`] holds one [`GroupCommit`] and supplies the IO around it: the
//! high watermark it reads before an fsync, the fsync itself, the flusher's job queue
//! (`schedule`) and the partition's poisoned flag. Everything that decides who waits, who is
//! released and whether another fsync is due is here, behind one mutex, so that the loom
//! models at the bottom can run the same code against model threads standing in for appenders
//! and flusher workers, without files.
//!
//! # Invariants
//!
//! - *At most one sync job per partition* is queued or running: `scheduled` is set by whoever
//!   queues one and cleared only by the job that finds nothing more to do. Concurrent
//!   appenders therefore share fsyncs, and the job's rounds never overlap.
//! - *No waiter is released early*: a waiter is released with `Ok` only once the durable offset,
//!   which only a finished fsync raises (to the high watermark read before it started), covers
//!   its target.
//! - *No waiter is left behind*: while waiters remain, a job is queued or running, so one of
//!   its rounds releases or fails them. A waiter registers only after checking, under the same
//!   lock, that the partition is writable; a failed fsync marks the partition refused under that
//!   lock (`refuse`) before failing the waiters, so no waiter slips in between and waits for an
//!   fsync that will never be retried. A round that ends with waiters above the durable offset on
//!   a partition that refuses writes (poisoned by a corrupt read or a failed append meanwhile,
//!   or closed) fails them instead of leaving them waiting for a round that is not coming.

use tokio::sync::oneshot;

use super::sync::Mutex;

/// One `wait_durable` caller, told how its wait ended.
pub(crate) trait DurabilityWaiter {
    /// `Ok` once the target is fsynced; `Err(reason)` when it never will be.
    fn release(self, outcome: Result<(), String>);
}

impl DurabilityWaiter for oneshot::Sender<Result<(), String>> {
    fn release(self, outcome: Result<(), String>) {
        // The caller may have given up waiting (its request was cancelled): nothing to tell.
        let _ = self.send(outcome);
    }
}

/// What [`GroupCommit::register`] did.
#[derive(Debug)]
pub(crate) enum Registered<R> {
    /// The target was durable already; no waiter was kept.
    Durable,
    /// The waiter is kept; `R` is what the caller waits on.
    Waiting(R),
}

/// One partition's group-commit state. See the module documentation.
#[derive(Debug)]
pub(crate) struct GroupCommit<W> {
    state: Mutex<State<W>>,
}

#[derive(Debug)]
struct State<W> {
    /// Every offset below this is fsynced.
    durable_offset: u64,
    /// The highest offset someone asked to be fsynced.
    requested_offset: u64,
    /// A sync job is queued or running.
    scheduled: bool,
    /// Waiters and the offset each waits for (exclusive: every offset below it).
    waiters: Vec<(u64, W)>,
}

impl<W> State<W> {
    /// Raises the requested offset and queues a job unless one is queued or running.
    fn request(&mut self, target: u64, schedule: impl FnOnce()) {
        self.requested_offset = self.requested_offset.max(target);
        if !self.scheduled {
            self.scheduled = true;
            schedule();
        }
    }
}

impl<W: DurabilityWaiter> GroupCommit<W> {
    /// State of a log whose offsets below `durable_offset` are known fsynced (what recovery
    /// found).
    pub(crate) fn new(durable_offset: u64) -> Self {
        GroupCommit {
            state: Mutex::new(State {
                durable_offset,
                requested_offset: durable_offset,
                scheduled: false,
                waiters: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> impl std::ops::DerefMut<Target = State<W>> + '_ {
        self.state.lock().expect("durability lock poisoned")
    }

    /// Every offset below this is fsynced.
    pub(crate) fn durable_offset(&self) -> u64 {
        self.lock().durable_offset
    }

    /// Sync jobs queued or running (0 or 1), and waiters kept: for tests and assertions.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> (bool, usize) {
        let state = self.lock();
        (state.scheduled, state.waiters.len())
    }

    /// Waits for every offset below `target`: `Durable` when they are fsynced already;
    /// otherwise, if `writable()` allows, keeps the waiter `make_waiter` builds (and returns
    /// what the caller waits on), raises the requested offset and calls `schedule` when a sync
    /// job must be queued. All of it under the lock, so a concurrent fsync round either covers
    /// the new waiter or sees its request and runs again.
    ///
    /// # Errors
    /// What `writable()` returns when the partition refuses writes; nothing is kept then.
    pub(crate) fn register<R, E>(
        &self,
        target: u64,
        writable: impl FnOnce() -> Result<(), E>,
        make_waiter: impl FnOnce() -> (W, R),
        schedule: impl FnOnce(),
    ) -> Result<Registered<R>, E> {
        let mut state = self.lock();
        if state.durable_offset >= target {
            return Ok(Registered::Durable);
        }
        writable()?;
        let (waiter, receiver) = make_waiter();
        state.waiters.push((target, waiter));
        state.request(target, schedule);
        Ok(Registered::Waiting(receiver))
    }

    /// Asks for every offset below `target` to be fsynced, without waiting; calls `schedule`
    /// when a sync job must be queued.
    pub(crate) fn request(&self, target: u64, schedule: impl FnOnce()) {
        let mut state = self.lock();
        if state.durable_offset < target {
            state.request(target, schedule);
        }
    }

    /// The end of one fsync round, which covered every offset below `target` (the high
    /// watermark read before it started) when `outcome` is `Ok`. Releases the waiters it
    /// covers and returns whether the job must run again.
    ///
    /// On failure, `refuse(reason)` runs first, under the lock (the partition then refuses
    /// writes, so no new waiter registers), and every waiter fails with the reason. On success,
    /// `refusal()` says why the partition now refuses writes, if it does; waiters beyond the
    /// durable offset then fail with that reason, since no further round is run for them.
    pub(crate) fn synced(
        &self,
        target: u64,
        outcome: Result<(), String>,
        refuse: impl FnOnce(&str),
        refusal: impl FnOnce() -> Option<String>,
    ) -> bool {
        let mut state = self.lock();
        match outcome {
            Ok(()) => {
                state.durable_offset = state.durable_offset.max(target);
                let durable = state.durable_offset;
                let mut index = 0;
                while index < state.waiters.len() {
                    if state.waiters[index].0 <= durable {
                        let (_, waiter) = state.waiters.swap_remove(index);
                        waiter.release(Ok(()));
                    } else {
                        index += 1;
                    }
                }
                let wanted = state.requested_offset > durable;
                let refused = if wanted { refusal() } else { None };
                let again = wanted && refused.is_none();
                state.scheduled = again;
                if let Some(reason) = refused {
                    for (_, waiter) in state.waiters.drain(..) {
                        waiter.release(Err(reason.clone()));
                    }
                }
                again
            }
            Err(reason) => {
                refuse(&reason);
                state.scheduled = false;
                for (_, waiter) in state.waiters.drain(..) {
                    waiter.release(Err(reason.clone()));
                }
                false
            }
        }
    }

    /// Records that every offset below `offset` is fsynced (close, after its own fsync).
    pub(crate) fn mark_durable(&self, offset: u64) {
        let mut state = self.lock();
        state.durable_offset = state.durable_offset.max(offset);
    }
}

#[cfg(all(test, not(sluice_loom)))]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// Records how it was released.
    #[derive(Debug, Clone, Default)]
    struct Probe(Rc<RefCell<Option<Result<(), String>>>>);

    impl DurabilityWaiter for Probe {
        fn release(self, outcome: Result<(), String>) {
            assert!(self.0.borrow().is_none(), "released twice");
            *self.0.borrow_mut() = Some(outcome);
        }
    }

    fn register(commit: &GroupCommit<Probe>, target: u64, jobs: &mut u32) -> Option<Probe> {
        let probe = Probe::default();
        let registered = commit
            .register(
                target,
                || Ok::<(), ()>(()),
                || (probe.clone(), ()),
                || *jobs += 1,
            )
            .unwrap();
        matches!(registered, Registered::Waiting(())).then_some(probe)
    }

    #[test]
    fn concurrent_waiters_share_one_job_and_a_late_one_gets_a_second_round() {
        let commit = GroupCommit::new(0);
        let mut jobs = 0;
        let first = register(&commit, 1, &mut jobs).unwrap();
        let second = register(&commit, 2, &mut jobs).unwrap();
        assert_eq!(jobs, 1, "one job for both");
        // The round read the watermark (2) before a third append landed.
        let third = register(&commit, 3, &mut jobs).unwrap();
        assert_eq!(jobs, 1);
        let again = commit.synced(2, Ok(()), |_| panic!("no failure"), || None);
        assert!(again, "the third waiter needs another round");
        assert_eq!(*first.0.borrow(), Some(Ok(())));
        assert_eq!(*second.0.borrow(), Some(Ok(())));
        assert_eq!(*third.0.borrow(), None);
        assert!(!commit.synced(3, Ok(()), |_| panic!("no failure"), || None));
        assert_eq!(*third.0.borrow(), Some(Ok(())));
        assert_eq!(commit.pending(), (false, 0));
        assert_eq!(commit.durable_offset(), 3);
        assert!(register(&commit, 3, &mut jobs).is_none(), "durable already");
        assert_eq!(jobs, 1);
    }

    #[test]
    fn a_failed_fsync_refuses_first_then_fails_every_waiter() {
        let commit = GroupCommit::new(0);
        let mut jobs = 0;
        let waiter = register(&commit, 1, &mut jobs).unwrap();
        let refused = RefCell::new(None);
        let again = commit.synced(
            1,
            Err("EIO".into()),
            |reason| *refused.borrow_mut() = Some(reason.to_owned()),
            || unreachable!(),
        );
        assert!(!again);
        assert_eq!(refused.into_inner().as_deref(), Some("EIO"));
        assert_eq!(*waiter.0.borrow(), Some(Err("EIO".into())));
        assert_eq!(commit.durable_offset(), 0);
        assert_eq!(commit.pending(), (false, 0));
    }

    #[test]
    fn waiters_beyond_a_round_on_a_refusing_partition_fail_instead_of_waiting_for_ever() {
        let commit = GroupCommit::new(0);
        let mut jobs = 0;
        let covered = register(&commit, 1, &mut jobs).unwrap();
        let beyond = register(&commit, 2, &mut jobs).unwrap();
        // Meanwhile a corrupt read poisoned the partition: no further round will run.
        let again = commit.synced(1, Ok(()), |_| unreachable!(), || Some("corrupt".into()));
        assert!(!again);
        assert_eq!(*covered.0.borrow(), Some(Ok(())));
        assert_eq!(*beyond.0.borrow(), Some(Err("corrupt".into())));
        assert_eq!(commit.pending(), (false, 0));
    }

    #[test]
    fn a_request_without_waiters_schedules_once_and_nothing_when_durable() {
        let commit: GroupCommit<Probe> = GroupCommit::new(5);
        let mut jobs = 0;
        commit.request(5, || jobs += 1);
        assert_eq!(jobs, 0);
        commit.request(7, || jobs += 1);
        commit.request(9, || jobs += 1);
        assert_eq!(jobs, 1);
        assert!(commit.synced(7, Ok(()), |_| unreachable!(), || None));
        assert!(!commit.synced(9, Ok(()), |_| unreachable!(), || None));
        commit.mark_durable(4);
        assert_eq!(commit.durable_offset(), 9);
    }

    #[test]
    fn a_refusing_partition_keeps_no_waiter() {
        let commit: GroupCommit<Probe> = GroupCommit::new(0);
        let refused = commit.register(
            1,
            || Err("poisoned"),
            || -> (Probe, ()) { unreachable!() },
            || unreachable!(),
        );
        assert_eq!(refused.unwrap_err(), "poisoned");
        assert_eq!(commit.pending(), (false, 0));
    }
}

/// Loom models of group commit, run with
/// `RUSTFLAGS="--cfg sluice_loom" CARGO_TARGET_DIR=target/loom cargo test -p sluice-broker --release --lib loom_tests`.
///
/// Model threads stand in for the partition's appenders and for the flusher's worker threads
/// (`flusher::run_worker`: take a job, read the high watermark, fsync, [`GroupCommit::synced`],
/// queue the job again when asked). The "file" is an atomic counting the offsets written; an
/// fsync makes durable what was written before it started. A waiter that is never released
/// blocks its thread for ever, which loom reports as a deadlock; a waiter released early fails
/// an assertion.
#[cfg(all(test, sluice_loom))]
mod loom_tests {
    use loom::sync::atomic::{AtomicBool, AtomicU64};
    use loom::sync::{Arc, mpsc};
    use loom::thread;

    use super::super::sync::Ordering;
    use super::*;

    /// A waiter: the channel `wait_durable` awaits (a oneshot in the broker).
    struct Waiter(mpsc::Sender<Result<(), String>>);

    impl DurabilityWaiter for Waiter {
        fn release(self, outcome: Result<(), String>) {
            self.0.send(outcome).unwrap();
        }
    }

    enum Job {
        Sync,
        Stop,
    }

    /// What `PartitionLog` contributes around the state machine.
    struct Log {
        commit: GroupCommit<Waiter>,
        /// The writer's next offset (under the writer lock in the broker; appenders here
        /// take turns through `fetch_add`).
        next_offset: AtomicU64,
        /// The high watermark, published with `Release` after the write.
        high_watermark: AtomicU64,
        /// Everything below this has been fsynced, by the model's account.
        synced: AtomicU64,
        /// The partition refuses writes.
        poisoned: AtomicBool,
        /// A sync round is running (at most one at a time).
        running: AtomicBool,
        /// Fail the next fsync.
        fail_next_fsync: AtomicBool,
        jobs: mpsc::Sender<Job>,
    }

    impl Log {
        fn new(jobs: mpsc::Sender<Job>) -> Self {
            Log {
                commit: GroupCommit::new(0),
                next_offset: AtomicU64::new(0),
                high_watermark: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                poisoned: AtomicBool::new(false),
                running: AtomicBool::new(false),
                fail_next_fsync: AtomicBool::new(false),
                jobs,
            }
        }

        fn writable(&self) -> Result<(), String> {
            if self.poisoned.load(Ordering::Acquire) {
                Err("poisoned".into())
            } else {
                Ok(())
            }
        }

        /// Appends one record and publishes it; returns the offset after it.
        fn append(&self) -> u64 {
            let next = self.next_offset.fetch_add(1, Ordering::AcqRel) + 1;
            self.high_watermark.fetch_max(next, Ordering::AcqRel);
            next
        }

        /// `PartitionLog::wait_durable`.
        fn wait_durable(&self, target: u64) -> Result<(), String> {
            let registered = self.commit.register(
                target,
                || self.writable(),
                || {
                    let (sender, receiver) = mpsc::channel();
                    (Waiter(sender), receiver)
                },
                || self.jobs.send(Job::Sync).unwrap(),
            )?;
            match registered {
                Registered::Durable => Ok(()),
                Registered::Waiting(receiver) => receiver.recv().expect("a waiter was dropped"),
            }
            .inspect(|()| {
                let synced = self.synced.load(Ordering::Acquire);
                assert!(
                    synced >= target,
                    "released at {target} with only {synced} fsynced"
                );
            })
        }

        /// `PartitionLog::run_sync`.
        fn run_sync(&self) -> bool {
            assert!(
                !self.running.swap(true, Ordering::AcqRel),
                "two sync rounds of one partition at once"
            );
            let target = self.high_watermark.load(Ordering::Acquire);
            let outcome = if self.fail_next_fsync.swap(false, Ordering::AcqRel) {
                Err("EIO".to_owned())
            } else {
                // An fsync covers at least what was written before it started.
                self.synced.fetch_max(target, Ordering::AcqRel);
                Ok(())
            };
            self.running.store(false, Ordering::Release);
            self.commit.synced(
                target,
                outcome,
                |_| self.poisoned.store(true, Ordering::Release),
                || {
                    self.poisoned
                        .load(Ordering::Acquire)
                        .then(|| "poisoned".to_owned())
                },
            )
        }
    }

    /// A flusher worker: `flusher::run_worker` for one partition.
    fn spawn_worker(
        log: &Arc<Log>,
        jobs: Arc<loom::sync::Mutex<mpsc::Receiver<Job>>>,
    ) -> thread::JoinHandle<()> {
        let log = Arc::clone(log);
        thread::spawn(move || {
            loop {
                let job = jobs.lock().unwrap().recv().unwrap();
                match job {
                    Job::Sync => {
                        if log.run_sync() {
                            log.jobs.send(Job::Sync).unwrap();
                        }
                    }
                    Job::Stop => return,
                }
            }
        })
    }

    fn spawn_appender(log: &Arc<Log>) -> thread::JoinHandle<Result<(), String>> {
        let log = Arc::clone(log);
        thread::spawn(move || {
            let next = log.append();
            log.wait_durable(next)
        })
    }

    /// Stops the workers (after the jobs queued before) and checks nothing is left pending.
    fn stop(log: &Log, workers: Vec<thread::JoinHandle<()>>) {
        for _ in &workers {
            log.jobs.send(Job::Stop).unwrap();
        }
        for worker in workers {
            worker.join().unwrap();
        }
        assert_eq!(log.commit.pending().1, 0, "waiters left behind");
    }

    fn setup() -> (Arc<Log>, Arc<loom::sync::Mutex<mpsc::Receiver<Job>>>) {
        let (sender, receiver) = mpsc::channel();
        (
            Arc::new(Log::new(sender)),
            Arc::new(loom::sync::Mutex::new(receiver)),
        )
    }

    /// Two appenders wait for durability while one flusher worker runs the rounds: each is
    /// released once, after its offset is fsynced, whichever round covers it.
    #[test]
    fn every_waiter_is_released_once_its_offset_is_fsynced() {
        loom::model(|| {
            let (log, receiver) = setup();
            let worker = spawn_worker(&log, receiver);
            let other = spawn_appender(&log);
            let next = log.append();
            log.wait_durable(next).unwrap();
            other.join().unwrap().unwrap();
            stop(&log, vec![worker]);
            assert_eq!(log.commit.durable_offset(), 2);
        });
    }

    /// The interval ticker's `request_sync` races an appender's wait, with two flusher workers:
    /// the rounds of the partition never overlap and the waiter is released.
    #[test]
    fn a_request_and_a_waiter_share_one_job_across_two_workers() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let (log, receiver) = setup();
            let workers = vec![
                spawn_worker(&log, Arc::clone(&receiver)),
                spawn_worker(&log, receiver),
            ];
            let ticker = {
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    let target = log.high_watermark.load(Ordering::Acquire);
                    log.commit
                        .request(target, || log.jobs.send(Job::Sync).unwrap());
                })
            };
            let next = log.append();
            log.wait_durable(next).unwrap();
            ticker.join().unwrap();
            stop(&log, workers);
        });
    }

    /// The first fsync fails while a second appender registers: each appender either is
    /// refused or fails with the fsync's error; none is told its data is durable, none hangs.
    #[test]
    fn a_failed_fsync_fails_every_waiter_and_admits_no_new_one() {
        loom::model(|| {
            let (log, receiver) = setup();
            log.fail_next_fsync.store(true, Ordering::Release);
            let worker = spawn_worker(&log, receiver);
            let other = spawn_appender(&log);
            let next = log.append();
            let mine = log.wait_durable(next);
            let theirs = other.join().unwrap();
            stop(&log, vec![worker]);
            // The first round fails: whoever registered before it fails with EIO, whoever
            // comes after is refused. Only a waiter whose target was durable could pass, and
            // nothing ever becomes durable here.
            for outcome in [mine, theirs] {
                let error = outcome.expect_err("nothing was fsynced");
                assert!(error == "EIO" || error == "poisoned", "{error}");
            }
            assert_eq!(log.commit.durable_offset(), 0);
        });
    }

    /// The partition is poisoned by something other than an fsync (a corrupt read) after two
    /// appends registered their waits, while the flusher runs: a round that covers only the
    /// first append must fail the second waiter, not leave it waiting for a round that will
    /// not come (the partition refuses writes, so none is run).
    #[test]
    fn a_partition_poisoned_elsewhere_fails_the_waiters_no_round_will_cover() {
        loom::model(|| {
            let (log, receiver) = setup();
            let worker = spawn_worker(&log, receiver);
            let waits: Vec<_> = (0..2)
                .map(|_| {
                    let target = log.append();
                    let registered = log.commit.register(
                        target,
                        || log.writable(),
                        || {
                            let (sender, receiver) = mpsc::channel();
                            (Waiter(sender), receiver)
                        },
                        || log.jobs.send(Job::Sync).unwrap(),
                    );
                    // Durable already when a round that started after this append finished.
                    match registered.unwrap() {
                        Registered::Waiting(receiver) => (target, Some(receiver)),
                        Registered::Durable => (target, None),
                    }
                })
                .collect();
            log.poisoned.store(true, Ordering::Release);
            for (target, wait) in waits {
                let outcome =
                    wait.map_or(Ok(()), |wait| wait.recv().expect("a waiter was dropped"));
                match outcome {
                    Ok(()) => assert!(log.synced.load(Ordering::Acquire) >= target),
                    Err(error) => assert_eq!(error, "poisoned"),
                }
            }
            stop(&log, vec![worker]);
        });
    }
}
