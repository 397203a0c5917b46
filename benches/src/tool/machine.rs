//! The machine a result was measured on: cores, memory and CPU model, from the standard
//! library and `/proc`. Anything unreadable is reported as unknown rather than failing the run.

use std::fmt;

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
