//! Retries with exponential backoff and jitter, and a circuit breaker: plain state machines
//! that take the time as input; [`crate::Client`] drives them.
//!
//! ```text
//!            failures >= threshold                    cool-down over
//!  Closed ───────────────────────────▶ Open ─────────────────────────▶ HalfOpen (one probe)
//!    ▲                                   ▲                                 │
//!    └──────────── probe succeeds ───────┼─────────── probe fails ─────────┘
//! ```
//!
//! While the breaker is open, calls fail at once with `Error::CircuitOpen` instead of waiting
//! for a connect timeout against a broker that is down; after the cool-down one call probes.

use std::time::{Duration, Instant};

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, initial * 2^n)]`, so many clients retrying at once spread out.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |elapsed| elapsed.as_nanos() as u64)
            | 1;
        Backoff {
            initial,
            max,
            attempt: 0,
            seed,
        }
    }

    /// The next delay (and counts the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next_ceiling();
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = (self.seed >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }

    /// The next delay without jitter, `min(max, initial * 2^n)` (and counts the attempt): for
    /// one party's retries of one thing, where there is no crowd to spread out.
    pub fn next_ceiling(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Circuit-breaker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Consecutive failures that open the breaker. Default = 5.
    pub failure_threshold: u32,
    /// How long it stays open before one probe is allowed. Default = 5 s.
    pub open_for: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        BreakerOptions {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A circuit breaker for one broker connection.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    options: BreakerOptions,
    state: BreakerState,
}

impl CircuitBreaker {
    pub fn new(options: BreakerOptions) -> Self {
        CircuitBreaker {
            options,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go ahead now. In half-open state only one probe at a time may.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::HalfOpen { probing: true } => false,
        }
    }

    /// A call let through by [`allow`](Self::allow) ended without an outcome (it was dropped
    /// or cancelled): a probe in half-open state is not under way any more, so the next call
    /// may probe.
    pub fn on_abandoned(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    /// A connection was made. That ends a half-open probe (the broker is back); otherwise it
    /// changes nothing, since only an answer shows the broker works: one that accepts
    /// connections and drops them still opens the breaker.
    pub fn on_connected(&mut self) {
        if matches!(self.state, BreakerState::HalfOpen { .. }) {
            self.state = BreakerState::Closed { failures: 0 };
        }
    }

    /// The broker answered.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// The broker could not be reached (or the connection broke).
    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.options.failure_threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            _ => BreakerState::Open {
                until: now + self.options.open_for,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        let mut ceilings_seen = Vec::new();
        for attempt in 0..12u32 {
            let delay = backoff.next_delay();
            let ceiling =
                Duration::from_millis(10 * (1u64 << attempt)).min(Duration::from_millis(500));
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
            ceilings_seen.push(ceiling);
        }
        assert_eq!(backoff.attempts(), 12);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
        // Jitter: not every delay is the same.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(100));
        let delays: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn ceilings_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| backoff.next_ceiling().as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert_eq!(backoff.next_ceiling(), Duration::from_millis(50));
    }

    #[test]
    fn a_probe_that_ends_without_an_outcome_lets_the_next_call_probe() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(BreakerOptions {
            failure_threshold: 1,
            open_for: Duration::from_secs(5),
        });
        breaker.on_failure(start);
        let later = start + Duration::from_secs(5);
        assert!(breaker.allow(later), "the probe");
        assert!(!breaker.allow(later), "one probe at a time");
        // The probe's call was dropped before it connected or failed.
        breaker.on_abandoned();
        assert!(breaker.allow(later), "the next call probes");
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        // Outside a probe it changes nothing.
        breaker.on_abandoned();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_probes_after_the_cool_down() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(BreakerOptions {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
        });
        for _ in 0..2 {
            assert!(breaker.allow(start));
            breaker.on_failure(start);
        }
        assert!(matches!(
            breaker.state(),
            BreakerState::Closed { failures: 2 }
        ));
        breaker.on_failure(start);
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        assert!(
            !breaker.allow(start + Duration::from_secs(1)),
            "fails fast while open"
        );
        assert!(
            breaker.allow(start + Duration::from_secs(5)),
            "one probe after the cool-down"
        );
        assert!(
            !breaker.allow(start + Duration::from_secs(5)),
            "only one probe at a time"
        );
        breaker.on_failure(start + Duration::from_secs(5));
        assert!(
            matches!(breaker.state(), BreakerState::Open { .. }),
            "a failed probe reopens"
        );
        assert!(breaker.allow(start + Duration::from_secs(10)));
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }
}
