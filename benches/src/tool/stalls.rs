//! The machine's own stalls: a thread per core spins reading the clock, and every gap between
//! two reads longer than [`STALL_THRESHOLD`] is a time that core ran nothing of ours: an
//! interrupt, the kernel, another process, or (on a virtual machine) the host not running the
//! virtual CPU at all. No message can be faster than the machine is there, so the latency rows'
//! tail is read beside these: on the development VM the host stops one virtual CPU or the other
//! for 0.56-1.6 ms on a 100 ms beat, a few times a second, and the messages in flight then wait.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::progress::group_digits;

/// A gap between two clock reads at least this long counts as a stall. Reading the clock takes
/// tens of nanoseconds; a scheduler tick's interrupt a few microseconds.
pub const STALL_THRESHOLD: Duration = Duration::from_micros(100);
/// Stalls this long or longer are counted apart: as long as several messages' whole trip.
pub const LONG_STALL: Duration = Duration::from_micros(500);

/// What the probe saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stalls {
    /// Cores probed, each by a thread of its own.
    pub cores: usize,
    /// How long each core was probed.
    pub duration: Duration,
    /// Stalls of at least [`STALL_THRESHOLD`], on all cores.
    pub count: u64,
    /// Those of at least [`LONG_STALL`].
    pub long_count: u64,
    /// The longest one.
    pub longest: Duration,
    /// All of them together, on all cores.
    pub total: Duration,
}

impl Stalls {
    /// The share of the probed cores' time spent stalled, 0 to 1.
    pub fn stalled_share(&self) -> f64 {
        let probed = self.duration.as_secs_f64() * self.cores as f64;
        if probed == 0.0 {
            0.0
        } else {
            (self.total.as_secs_f64() / probed).min(1.0)
        }
    }

    /// One line: how many stalls, how long the longest, what share of the time.
    pub fn summary(&self) -> String {
        format!(
            "machine stalls, {} cores spinning {} s: {} of {}+ µs, {} of {}+ µs, longest {} µs, {:.2} % of the time",
            self.cores,
            self.duration.as_secs(),
            group_digits(self.count),
            STALL_THRESHOLD.as_micros(),
            group_digits(self.long_count),
            LONG_STALL.as_micros(),
            group_digits(u64::try_from(self.longest.as_micros()).unwrap_or(u64::MAX)),
            self.stalled_share() * 100.0
        )
    }

    fn add(&mut self, core: &CoreStalls) {
        self.count += core.count;
        self.long_count += core.long_count;
        self.longest = self.longest.max(core.longest);
        self.total += core.total;
    }
}

/// One core's stalls, summed as they come (a machine that stalls all the time costs the probe
/// no memory): the gaps between consecutive clock reads at or over the threshold.
#[derive(Debug)]
pub struct CoreStalls {
    threshold: Duration,
    last: Instant,
    count: u64,
    long_count: u64,
    longest: Duration,
    total: Duration,
}

impl CoreStalls {
    pub fn new(threshold: Duration, start: Instant) -> CoreStalls {
        CoreStalls {
            threshold,
            last: start,
            count: 0,
            long_count: 0,
            longest: Duration::ZERO,
            total: Duration::ZERO,
        }
    }

    /// The clock read `now`, after the previous read.
    pub fn observe(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last);
        self.last = now;
        if gap < self.threshold {
            return;
        }
        self.count += 1;
        self.long_count += u64::from(gap >= LONG_STALL);
        self.longest = self.longest.max(gap);
        self.total += gap;
    }
}

/// Spins a thread on every core (pinned where the system lets it) for `duration`, and returns
/// the stalls they saw. Blocking, and it keeps every core busy: run it alone.
///
/// # Errors
/// A probe thread that could not be started or panicked.
pub fn measure(duration: Duration) -> Result<Stalls> {
    let allowed = allowed_cpus();
    let cores = if allowed.is_empty() {
        thread::available_parallelism().map_or(1, usize::from)
    } else {
        allowed.len()
    };
    let probes = (0..cores)
        .map(|index| {
            let cpu = allowed.get(index).copied();
            thread::Builder::new()
                .name(format!("stall-probe-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    let start = Instant::now();
                    let deadline = start + duration;
                    let mut stalls = CoreStalls::new(STALL_THRESHOLD, start);
                    loop {
                        let now = Instant::now();
                        stalls.observe(now);
                        if now >= deadline {
                            return stalls;
                        }
                    }
                })
                .map_err(|error| anyhow!("cannot start a stall probe thread: {error}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stalls = Stalls {
        cores,
        duration,
        ..Stalls::default()
    };
    for probe in probes {
        let core = probe
            .join()
            .map_err(|_| anyhow!("a stall probe thread panicked"))?;
        stalls.add(&core);
    }
    Ok(stalls)
}

/// The CPUs this process may run on (its affinity mask: a container's CPU set, `taskset`),
/// in order; empty when the mask cannot be read.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a live cpu_set_t whose size is passed with it; pid 0 is this thread,
    // which has the process's mask (no thread here has changed its own yet).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Keeps the calling thread on `cpu`, so each allowed CPU gets one probe; where that is
/// refused, the thread runs where the scheduler puts it.
fn pin_to(cpu: usize) {
    // SAFETY: `set` is a live cpu_set_t, zeroed then given one CPU, and its size is passed with
    // it; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_at_or_over_the_threshold_are_stalls() {
        let start = Instant::now();
        let mut core = CoreStalls::new(Duration::from_micros(100), start);
        let mut at = start;
        for gap_us in [1, 99, 100, 5, 700, 2, 250] {
            at += Duration::from_micros(gap_us);
            core.observe(at);
        }
        let mut stalls = Stalls {
            cores: 1,
            duration: Duration::from_millis(10),
            ..Stalls::default()
        };
        stalls.add(&core);
        assert_eq!(stalls.count, 3, "100, 700 and 250 µs");
        assert_eq!(stalls.long_count, 1, "700 µs");
        assert_eq!(stalls.longest, Duration::from_micros(700));
        assert_eq!(stalls.total, Duration::from_micros(1050));
        assert!((stalls.stalled_share() - 0.105).abs() < 1e-9);
    }

    #[test]
    fn cores_add_up() {
        let start = Instant::now();
        let mut first = CoreStalls::new(Duration::from_micros(100), start);
        first.observe(start + Duration::from_micros(300));
        let mut second = CoreStalls::new(Duration::from_micros(100), start);
        second.observe(start + Duration::from_micros(900));
        second.observe(start + Duration::from_micros(950));
        let mut stalls = Stalls {
            cores: 2,
            duration: Duration::from_millis(1),
            ..Stalls::default()
        };
        stalls.add(&first);
        stalls.add(&second);
        assert_eq!(stalls.count, 2);
        assert_eq!(stalls.long_count, 1);
        assert_eq!(stalls.longest, Duration::from_micros(900));
        assert_eq!(stalls.total, Duration::from_micros(1200));
        assert!((stalls.stalled_share() - 0.6).abs() < 1e-9);
    }

    #[test]
    fn a_short_probe_covers_every_core() {
        let stalls = measure(Duration::from_millis(50)).unwrap();
        // available_parallelism counts the CPUs of the affinity mask too (and any cgroup
        // quota below them).
        assert!(stalls.cores >= thread::available_parallelism().map_or(1, usize::from));
        let allowed = allowed_cpus();
        if !allowed.is_empty() {
            assert_eq!(stalls.cores, allowed.len(), "a probe per allowed CPU");
        }
        assert!(stalls.long_count <= stalls.count);
        assert!(stalls.longest <= stalls.total);
        assert!((0.0..=1.0).contains(&stalls.stalled_share()));
    }
}
