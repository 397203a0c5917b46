//! Test support for Sluice's reliability suite; the tests themselves are in `broker/tests/`.
//!
//! ```text
//! history     what producers acknowledged + what consumers read ──▶ Report (lost, inconsistent,
//!             non-monotonic, skipped, duplicated; unread, redelivered)
//! process     the broker binary as a child process: start, SIGKILL, restart on the same
//!             data directory and port
//! workload    producers and consumers that log what was acknowledged and read; a final read
//! member      a consumer-group member, run as a child process, that logs what it processed
//!
//! broker/tests/  crash_loop (SIGKILL), power_loss (FaultFs), storage_faults, group_churn
//! ```
//!
//! # Short and long runs
//!
//! `cargo test --workspace` runs the short version of every test (each under a minute). The
//! long versions run with one command:
//!
//! ```text
//! SLUICE_RELIABILITY_LONG=1 cargo test -p sluice-broker --release --test crash_loop \
//!     --test power_loss --test storage_faults --test group_churn -- --nocapture --test-threads=1
//! ```
//!
//! Each test prints one summary line (`cycles=... acknowledged=... lost=... duplicated=...`) and
//! its random seed; `SLUICE_RELIABILITY_SEED=<seed>` replays a run's choices.

pub mod history;
pub mod member;
pub mod process;
pub mod workload;

use std::time::Duration;

use sluice_client::ClientOptions;
use sluice_client::resilience::BreakerOptions;

/// Set to run the long versions.
pub const LONG_VARIABLE: &str = "SLUICE_RELIABILITY_LONG";
/// Set to replay a run's random choices.
pub const SEED_VARIABLE: &str = "SLUICE_RELIABILITY_SEED";

/// True when the long versions were asked for.
pub fn is_long() -> bool {
    std::env::var_os(LONG_VARIABLE).is_some_and(|value| !value.is_empty() && value != "0")
}

/// `short` normally, `long` under [`LONG_VARIABLE`].
pub fn scale<T>(short: T, long: T) -> T {
    if is_long() { long } else { short }
}

/// A test's length or count: the environment variable `variable` when it is set to a number,
/// else [`scale`]`(short, long)`.
pub fn scale_or<T: std::str::FromStr>(variable: &str, short: T, long: T) -> T {
    std::env::var(variable)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| scale(short, long))
}

/// The run's seed: [`SEED_VARIABLE`] when set, else from the clock.
pub fn seed() -> u64 {
    std::env::var(SEED_VARIABLE)
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x5eed, |elapsed| elapsed.as_nanos() as u64)
        })
}

/// xorshift64*: random choices that a seed replays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Zero is xorshift's one fixed point.
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "Rng::below(0)");
        self.next_u64() % bound
    }

    /// Uniform in `low..high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high.saturating_sub(low).max(1)))
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }
}

/// Client settings for brokers that die and come back within a second: retries start at
/// 20 ms and back off to 250 ms at most, and the circuit breaker opens only for 100 ms, so a
/// restarted broker is found again at once.
pub fn restart_tolerant_client_options() -> ClientOptions {
    let mut options = ClientOptions::default()
        .retry_deadline(Duration::from_secs(60))
        .breaker(BreakerOptions {
            failure_threshold: 5,
            open_for: Duration::from_millis(100),
        });
    options.retry_initial_backoff = Duration::from_millis(20);
    options.retry_max_backoff = Duration::from_millis(250);
    options.connection.connect_timeout = Duration::from_secs(2);
    options
}
