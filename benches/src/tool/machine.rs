//! The machine a result was measured on: cores, memory and CPU model, from the standard
//! library and `/proc`, and the CPU a run used. Anything unreadable is reported as unknown
//! rather than failing the run.

use std::fmt;
use std::time::Duration;

/// What every result is labelled with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Cores this process may run on.
    pub cores: usize,
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub memory_bytes: Option<u64>,
    /// The first `model name` of `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
}

impl Machine {
    pub fn detect() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| memory_total_bytes(&text)),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| cpu_model(&text)),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cores": self.cores,
            "memory_bytes": self.memory_bytes,
            "cpu_model": self.cpu_model,
        })
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cores, ", self.cores)?;
        match self.memory_bytes {
            Some(bytes) => write!(f, "{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))?,
            None => f.write_str("memory unknown")?,
        }
        write!(
            f,
            ", {}",
            self.cpu_model.as_deref().unwrap_or("CPU model unknown")
        )
    }
}

/// CPU time counters at one moment: this process's (every thread: the clients and, with
/// `--embedded`, the broker) and the machine's, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCounters {
    /// utime + stime of `/proc/self/stat`, in clock ticks.
    process_ticks: Option<u64>,
    /// (busy, total) of the `cpu` line of `/proc/stat`, in clock ticks, all cores.
    machine_ticks: Option<(u64, u64)>,
}

/// `/proc` counts CPU time in USER_HZ ticks, which Linux fixes at 100 per second.
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuCounters {
    pub fn read() -> CpuCounters {
        CpuCounters {
            process_ticks: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|text| process_ticks(&text)),
            machine_ticks: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|text| machine_ticks(&text)),
        }
    }

    /// The CPU used from these counters to `later`, `elapsed` apart, on `cores` cores.
    pub fn used_until(&self, later: &CpuCounters, elapsed: Duration, cores: usize) -> CpuUse {
        let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        CpuUse {
            process_cores: self
                .process_ticks
                .zip(later.process_ticks)
                .map(|(from, to)| to.saturating_sub(from) as f64 / TICKS_PER_SECOND / seconds),
            // What was not idle. A tickless kernel adds idle time up exactly as cores go idle
            // and wake, but busy time only at timer ticks, which a workload woken by timers (a
            // paced one) can keep missing: a latency run showed 0.10 cores busy machine-wide
            // beside 0.93 in this process when busy ticks were counted.
            machine_busy_cores: self.machine_ticks.zip(later.machine_ticks).map(
                |((busy_from, total_from), (busy_to, total_to))| {
                    let idle = (total_to - busy_to).saturating_sub(total_from - busy_from);
                    let cores = cores as f64;
                    (cores - idle as f64 / TICKS_PER_SECOND / seconds).clamp(0.0, cores)
                },
            ),
        }
    }
}

/// Cores' worth of CPU a measured phase used, on average.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    /// This process: the clients and, with `--embedded`, the broker.
    pub process_cores: Option<f64>,
    /// The whole machine busy (not idle nor waiting for I/O): an external broker, the kernel's
    /// writeback, anything else running.
    pub machine_busy_cores: Option<f64>,
}

impl fmt::Display for CpuUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cores = |value: Option<f64>| value.map_or("unknown".to_owned(), |v| format!("{v:.2}"));
        write!(
            f,
            "{} cores this process, {} cores busy machine-wide",
            cores(self.process_cores),
            cores(self.machine_busy_cores)
        )
    }
}

/// utime + stime of a `/proc/<pid>/stat` line: fields 14 and 15, counted after the command
/// name, which is in parentheses and may itself hold spaces and parentheses.
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so utime (14) is the 12th word and stime the 13th.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) ticks of the `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (guest time is already inside user); idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|value| value.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 8 {
        return None;
    }
    let total: u64 = values.iter().sum();
    Some((total - values[3] - values[4], total))
}

/// `MemTotal:       24567890 kB` → bytes.
fn memory_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let amount: u64 = words.next()?.parse().ok()?;
    let multiplier = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    amount.checked_mul(multiplier)
}

/// `model name<TAB>: Intel(R) Xeon(R) ...` → the text after the colon.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_owned())
        .filter(|model| !model.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_formats() {
        assert_eq!(
            memory_total_bytes("MemTotal:       2048 kB\nMemFree: 1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(memory_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(memory_total_bytes("MemTotal: lots kB\n"), None);
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\nflags\t: x\n"),
            Some("Example CPU @ 2.0GHz".to_owned())
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn reads_cpu_counters() {
        let stat = "4242 (tokio (x) y) S 1 2 3 4 5 6 7 8 9 10 150 35 0 0 20 0 9 0 100 1 2\n";
        assert_eq!(process_ticks(stat), Some(185));
        assert_eq!(process_ticks("4242 (short) S 1 2\n"), None);
        let proc_stat = "cpu  100 5 50 800 20 3 2 1 7 0\ncpu0 50 2 25 400 10 1 1 0 3 0\n";
        assert_eq!(machine_ticks(proc_stat), Some((161, 981)));
        assert_eq!(machine_ticks("cpu  1 2\n"), None);

        let before = CpuCounters {
            process_ticks: Some(1_000),
            machine_ticks: Some((5_000, 10_000)),
        };
        let after = CpuCounters {
            process_ticks: Some(1_300),
            machine_ticks: Some((5_300, 10_400)),
        };
        let used = before.used_until(&after, Duration::from_secs(2), 2);
        assert_eq!(used.process_cores, Some(1.5));
        assert_eq!(used.machine_busy_cores, Some(1.5));
        // Busy ticks missed: what was not idle is busy.
        let ticks_missed = CpuCounters {
            process_ticks: Some(1_300),
            machine_ticks: Some((5_010, 10_110)),
        };
        let used = before.used_until(&ticks_missed, Duration::from_secs(2), 2);
        assert_eq!(used.machine_busy_cores, Some(1.5));
        let unknown = CpuCounters::default().used_until(&after, Duration::from_secs(2), 2);
        assert_eq!(
            unknown.to_string(),
            "unknown cores this process, unknown cores busy machine-wide"
        );
    }

    #[test]
    fn unknowns_are_said_plainly() {
        let machine = Machine {
            cores: 2,
            memory_bytes: None,
            cpu_model: None,
        };
        assert_eq!(
            machine.to_string(),
            "2 cores, memory unknown, CPU model unknown"
        );
    }
}
