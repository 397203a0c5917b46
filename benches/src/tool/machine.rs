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
    /// The first `cpu family`, `model` and `flags` of `/proc/cpuinfo`: a virtual machine's
    /// `model name` can be as bare as "AMD EPYC", and hosts of one machine type differ in
    /// generation and in instruction sets (AVX-512 changes which checksum code is fastest).
    pub cpu_generation: Option<CpuGeneration>,
}

/// Which CPU of a family a result came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuGeneration {
    pub family: u32,
    pub model: u32,
    /// `avx512f` among the flags.
    pub avx512: bool,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| memory_total_bytes(&text)),
            cpu_model: cpuinfo.as_deref().and_then(cpu_model),
            cpu_generation: cpuinfo.as_deref().and_then(cpu_generation),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cores": self.cores,
            "memory_bytes": self.memory_bytes,
            "cpu_model": self.cpu_model,
            "cpu_family": self.cpu_generation.map(|generation| generation.family),
            "cpu_model_number": self.cpu_generation.map(|generation| generation.model),
            "avx512": self.cpu_generation.map(|generation| generation.avx512),
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
        )?;
        if let Some(generation) = self.cpu_generation {
            write!(
                f,
                " (family {} model {}, {})",
                generation.family,
                generation.model,
                if generation.avx512 {
                    "AVX-512"
                } else {
                    "no AVX-512"
                }
            )?;
        }
        Ok(())
    }
}

/// CPU time counters at one moment: this process's (every thread: the clients and, with
/// `--embedded`, the broker) and the machine's, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCounters {
    /// utime + stime of `/proc/self/stat`, in clock ticks.
    process_ticks: Option<u64>,
    /// The `cpu` line of `/proc/stat`, all cores.
    machine_ticks: Option<MachineTicks>,
}

/// Clock ticks of the `cpu` line of `/proc/stat`, all cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MachineTicks {
    /// Neither idle nor waiting for I/O (steal included).
    busy: u64,
    total: u64,
    /// Time a core had work and the hypervisor ran something else instead.
    steal: u64,
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
            machine_busy_cores: self
                .machine_ticks
                .zip(later.machine_ticks)
                .map(|(from, to)| {
                    let idle = (to.total - to.busy).saturating_sub(from.total - from.busy);
                    let cores = cores as f64;
                    (cores - idle as f64 / TICKS_PER_SECOND / seconds).clamp(0.0, cores)
                }),
            stolen_cores: self
                .machine_ticks
                .zip(later.machine_ticks)
                .map(|(from, to)| {
                    to.steal.saturating_sub(from.steal) as f64 / TICKS_PER_SECOND / seconds
                }),
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
    /// Of that, time the machine's cores had work but the hypervisor ran something else (the
    /// `steal` of `/proc/stat`; 0 on bare metal): how much of the run a shared host took.
    pub stolen_cores: Option<f64>,
}

impl fmt::Display for CpuUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cores = |value: Option<f64>| value.map_or("unknown".to_owned(), |v| format!("{v:.2}"));
        write!(
            f,
            "{} cores this process, {} cores busy machine-wide, {} stolen by the host",
            cores(self.process_cores),
            cores(self.machine_busy_cores),
            cores(self.stolen_cores)
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

/// The ticks of the `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq steal
/// (guest time is already inside user); idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<MachineTicks> {
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
    Some(MachineTicks {
        busy: total - values[3] - values[4],
        total,
        steal: values[7],
    })
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

/// The value of the first `key<TAB>: value` line of `/proc/cpuinfo` with that key.
fn cpuinfo_value<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim() == key)
        .map(|(_, value)| value.trim())
}

/// `model name<TAB>: Intel(R) Xeon(R) ...` → the text after the colon.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo_value(cpuinfo, "model name")
        .filter(|model| !model.is_empty())
        .map(str::to_owned)
}

/// `cpu family`, `model` and whether `flags` has `avx512f`, of the first processor.
fn cpu_generation(cpuinfo: &str) -> Option<CpuGeneration> {
    Some(CpuGeneration {
        family: cpuinfo_value(cpuinfo, "cpu family")?.parse().ok()?,
        model: cpuinfo_value(cpuinfo, "model")?.parse().ok()?,
        avx512: cpuinfo_value(cpuinfo, "flags")?
            .split_whitespace()
            .any(|flag| flag == "avx512f"),
    })
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
        assert_eq!(
            machine_ticks(proc_stat),
            Some(MachineTicks {
                busy: 161,
                total: 981,
                steal: 1
            })
        );
        assert_eq!(machine_ticks("cpu  1 2\n"), None);

        let ticks = |busy, total, steal| Some(MachineTicks { busy, total, steal });
        let before = CpuCounters {
            process_ticks: Some(1_000),
            machine_ticks: ticks(5_000, 10_000, 70),
        };
        let after = CpuCounters {
            process_ticks: Some(1_300),
            machine_ticks: ticks(5_300, 10_400, 120),
        };
        let used = before.used_until(&after, Duration::from_secs(2), 2);
        assert_eq!(used.process_cores, Some(1.5));
        assert_eq!(used.machine_busy_cores, Some(1.5));
        assert_eq!(used.stolen_cores, Some(0.25));
        assert_eq!(
            used.to_string(),
            "1.50 cores this process, 1.50 cores busy machine-wide, 0.25 stolen by the host"
        );
        // Busy ticks missed: what was not idle is busy.
        let ticks_missed = CpuCounters {
            process_ticks: Some(1_300),
            machine_ticks: ticks(5_010, 10_110, 70),
        };
        let used = before.used_until(&ticks_missed, Duration::from_secs(2), 2);
        assert_eq!(used.machine_busy_cores, Some(1.5));
        let unknown = CpuCounters::default().used_until(&after, Duration::from_secs(2), 2);
        assert_eq!(
            unknown.to_string(),
            "unknown cores this process, unknown cores busy machine-wide, unknown stolen by the \
             host"
        );
    }

    #[test]
    fn reads_the_cpu_generation() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                       model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2 vpclmulqdq\n";
        let generation = cpu_generation(cpuinfo);
        assert_eq!(
            generation,
            Some(CpuGeneration {
                family: 25,
                model: 1,
                avx512: false
            })
        );
        let with_avx512 = cpuinfo.replace("avx2", "avx2 avx512f avx512vl");
        assert!(cpu_generation(&with_avx512).is_some_and(|generation| generation.avx512));
        // `avx512vl` alone is not `avx512f`, and no family means no generation.
        let only_vl = cpuinfo.replace("avx2", "avx512vl");
        assert!(cpu_generation(&only_vl).is_some_and(|generation| !generation.avx512));
        assert_eq!(cpu_generation("model name\t: X\nflags\t: avx512f\n"), None);
        let machine = Machine {
            cores: 2,
            memory_bytes: Some(2 << 30),
            cpu_model: cpu_model(cpuinfo),
            cpu_generation: generation,
        };
        assert_eq!(
            machine.to_string(),
            "2 cores, 2.0 GiB, AMD EPYC (family 25 model 1, no AVX-512)"
        );
    }

    #[test]
    fn unknowns_are_said_plainly() {
        let machine = Machine {
            cores: 2,
            memory_bytes: None,
            cpu_model: None,
            cpu_generation: None,
        };
        assert_eq!(
            machine.to_string(),
            "2 cores, memory unknown, CPU model unknown"
        );
    }
}
