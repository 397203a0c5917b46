//! `peer-bench table`: the comparison of one mode's results, as markdown.
//!
//! Input: JSON lines as written by `sluice-bench --json` and `peer-bench --json`, one file per
//! system; each holds every workload and round of that system. Output: one table whose cells
//! are the medians over the rounds, and the ratios Sluice/peer.
//!
//! ```text
//! | workload | figure | Sluice | NATS JetStream | Redis Streams | Sluice/NATS | Sluice/Redis |
//! | produce  | msgs/s | ...    | ...            | ...           | 1.23        | 0.87         |
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct TableArgs {
    /// Sluice's results (sluice-bench --json). A missing file counts as no results.
    #[arg(long, value_name = "FILE")]
    sluice: PathBuf,

    /// NATS JetStream's results (peer-bench --json). A missing file counts as no results.
    #[arg(long, value_name = "FILE")]
    nats: PathBuf,

    /// Redis Streams' results (peer-bench --json). A missing file counts as no results.
    #[arg(long, value_name = "FILE")]
    redis: PathBuf,

    /// A heading printed above the table.
    #[arg(long, value_name = "TEXT")]
    title: Option<String>,
}

/// One row of the table: a figure of one workload.
struct Row {
    workload: &'static str,
    label: &'static str,
    field: &'static str,
    format: fn(f64) -> String,
}

const ROWS: [Row; 7] = [
    Row {
        workload: "produce",
        label: "msgs/s",
        field: "msgs_per_s",
        format: whole,
    },
    Row {
        workload: "produce",
        label: "MB/s",
        field: "mb_per_s",
        format: one_decimal,
    },
    Row {
        workload: "consume",
        label: "msgs/s",
        field: "msgs_per_s",
        format: whole,
    },
    Row {
        workload: "consume",
        label: "MB/s",
        field: "mb_per_s",
        format: one_decimal,
    },
    Row {
        workload: "latency",
        label: "p50 µs",
        field: "p50_us",
        format: whole,
    },
    Row {
        workload: "latency",
        label: "p99 µs",
        field: "p99_us",
        format: whole,
    },
    Row {
        workload: "latency",
        label: "p99.9 µs",
        field: "p999_us",
        format: whole,
    },
];

/// The results of one system: every JSON line of its file.
struct Results {
    lines: Vec<Value>,
}

impl Results {
    fn read(path: &Path) -> Result<Results> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let lines = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                serde_json::from_str(line).with_context(|| {
                    format!("{} line {}: not a JSON object", path.display(), index + 1)
                })
            })
            .collect::<Result<Vec<Value>>>()?;
        Ok(Results { lines })
    }

    /// The numbers `field` takes in the results of `workload`, one per round.
    fn values(&self, workload: &str, field: &str) -> Vec<f64> {
        self.lines
            .iter()
            .filter(|line| line.get("workload").and_then(Value::as_str) == Some(workload))
            .filter_map(|line| line.get(field).and_then(Value::as_f64))
            .collect()
    }

    fn rounds(&self, workload: &str) -> usize {
        self.values(workload, "msgs_per_s").len()
    }
}

/// The median of `values`: the middle one, or the mean of the two middle ones.
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if !values.len().is_multiple_of(2) {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    })
}

fn whole(value: f64) -> String {
    group_digits(value.round() as u64)
}

fn one_decimal(value: f64) -> String {
    format!("{value:.1}")
}

/// 1234567 → "1,234,567".
fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn ratio(sluice: Option<f64>, peer: Option<f64>) -> String {
    match (sluice, peer) {
        (Some(sluice), Some(peer)) if peer > 0.0 => format!("{:.2}", sluice / peer),
        _ => "–".to_owned(),
    }
}

/// The markdown table of `sluice`, `nats` and `redis`.
fn render(sluice: &Results, nats: &Results, redis: &Results) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | figure | Sluice | NATS JetStream | Redis Streams | Sluice/NATS | Sluice/Redis |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    for row in &ROWS {
        let cell = |results: &Results| median(&mut results.values(row.workload, row.field));
        let (s, n, r) = (cell(sluice), cell(nats), cell(redis));
        let shown = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), row.format);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.workload,
            row.label,
            shown(s),
            shown(n),
            shown(r),
            ratio(s, n),
            ratio(s, r),
        ));
    }
    let mut counts = Vec::new();
    for workload in ["produce", "consume", "latency"] {
        counts.push(format!(
            "{workload} {}/{}/{}",
            sluice.rounds(workload),
            nats.rounds(workload),
            redis.rounds(workload)
        ));
    }
    out.push_str(&format!(
        "\nMedians over rounds (rounds with a result, Sluice/NATS/Redis: {}). \
         Ratios above 1 favour Sluice for msgs/s and MB/s, below 1 for latency. \
         Latency is produce→consume at a fixed rate.\n",
        counts.join(", ")
    ));
    out
}

/// Reads the three files and prints their table.
///
/// # Errors
/// A file exists but cannot be read, or holds a line that is not JSON.
pub fn print(args: &TableArgs) -> Result<()> {
    let sluice = Results::read(&args.sluice)?;
    let nats = Results::read(&args.nats)?;
    let redis = Results::read(&args.redis)?;
    if sluice.lines.is_empty() && nats.lines.is_empty() && redis.lines.is_empty() {
        bail!("no results in any of the three files");
    }
    if let Some(title) = &args.title {
        println!("{title}\n");
    }
    print!("{}", render(&sluice, &nats, &redis));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn digits_are_grouped() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
    }

    #[test]
    fn table_has_medians_and_ratios() {
        let produce =
            |msgs: f64| json!({"workload": "produce", "msgs_per_s": msgs, "mb_per_s": msgs / 1e4});
        let sluice = Results {
            lines: vec![produce(300.0), produce(100.0), produce(200.0)],
        };
        let nats = Results {
            lines: vec![produce(100.0)],
        };
        let redis = Results { lines: vec![] };
        let table = render(&sluice, &nats, &redis);
        assert!(
            table.contains("| produce | msgs/s | 200 | 100 | – | 2.00 | – |"),
            "{table}"
        );
        assert!(table.contains("produce 3/1/0"), "{table}");
    }
}
