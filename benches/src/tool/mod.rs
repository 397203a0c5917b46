//! `sluice-bench`: end-to-end throughput and latency of a Sluice broker (DESIGN.md, "Command
//! line"), and the machine's physical limits beside them.
//!
//! ```text
//! cli ──Settings──▶ workloads::run ──▶ target (embedded broker or URL) ──▶ producers / group
//!                        │                         ▲ progress (bar + per-second samples)
//!                        ▼                         │ metrics (counters, hdrhistograms)
//!                    RunResult ──▶ report (table, --json line) ──▶ chart (--chart SVG)
//! baseline: raw TCP / page cache / fdatasync (std threads), then three embedded Sluice runs
//! ```
//!
//! Modules: [`cli`] (flags, defaults, checks), [`target`] (the broker), [`workloads`] (the four
//! workloads), [`metrics`] and [`progress`] (what is measured while running), [`report`] and
//! [`chart`] (what is shown after), [`baseline`], [`machine`].
//!
//! Exit codes: 0 success, 1 runtime error, 2 usage or configuration error; a failure prints one
//! line, `sluice-bench: <what went wrong>`, on stderr.

pub mod baseline;
pub mod chart;
pub mod cli;
pub mod machine;
pub mod metrics;
pub mod progress;
pub mod report;
pub mod stalls;
pub mod target;
pub mod workloads;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, Settings, Workload};
use machine::Machine;
use report::Report;
use workloads::UsageError;

/// Why the tool stopped: a message and its exit code.
#[derive(Debug)]
struct Failure {
    message: String,
    exit_code: u8,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            exit_code: 2,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        // The whole chain of causes on one line, leaving out a cause its parent already
        // quoted (client errors print their source in their own message).
        let mut message = String::new();
        for cause in error.chain() {
            let text = cause.to_string();
            if message.contains(&text) {
                continue;
            }
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        let exit_code = if error.downcast_ref::<UsageError>().is_some() {
            2
        } else {
            1
        };
        Failure { message, exit_code }
    }
}

/// The whole tool; `src/bin/sluice-bench.rs` only calls this.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // --help and --version are not errors.
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let line = failure.message.lines().next().unwrap_or("failed");
            eprintln!("sluice-bench: {line}");
            ExitCode::from(failure.exit_code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let (workload, arguments) = match cli.command {
        Command::Baseline(arguments) => return baseline(&arguments),
        Command::Stalls(arguments) => {
            let stalls = stalls::measure(std::time::Duration::from_secs(arguments.duration))?;
            println!("  {}", stalls.summary());
            return Ok(());
        }
        Command::Produce(arguments) => (Workload::Produce, arguments),
        Command::Consume(arguments) => (Workload::Consume, arguments),
        Command::Pubsub(arguments) => (Workload::Pubsub, arguments),
        Command::Latency(arguments) => (Workload::Latency, arguments),
    };
    let settings = Settings::resolve(workload, arguments, std::env::var("SLUICE_BROKER").ok())
        .map_err(Failure::usage)?;
    let machine = Machine::detect();
    let result = runtime()?.block_on(workloads::run(&settings))?;
    let report = Report {
        settings: &settings,
        machine: &machine,
        result: &result,
    };
    print!("{}", report.table());
    if let Some(path) = &settings.json {
        report::append_json_line(path, &report.to_json())?;
    }
    if let Some(path) = &settings.chart {
        let title = format!(
            "sluice-bench {}: {}",
            workload.name(),
            report.labels().replace('\n', " ")
        );
        chart::draw(path, &title, &result)?;
    }
    Ok(())
}

fn baseline(arguments: &cli::BaselineArgs) -> Result<(), Failure> {
    let machine = Machine::detect();
    // The raw limits use plain threads and blocking calls: no runtime in the way. Latency
    // first, raw and Sluice's, before anything writes and frees gigabytes; then the machine's
    // own stalls, whose probe keeps every core busy (on a virtual machine whose host caps its
    // CPU time, that could cost the measurement after it).
    let tcp_latency = baseline::measure_latency_floor(arguments)?;
    let runtime = runtime()?;
    let latency = runtime.block_on(baseline::measure_sluice_latency(arguments))?;
    let stalls = stalls::measure(std::time::Duration::from_secs(arguments.latency_duration))?;
    let limits = baseline::measure_limits(arguments, tcp_latency, stalls)?;
    let ([produce_leader, produce_durable, consume], tcp_before) =
        runtime.block_on(baseline::measure_sluice(arguments))?;
    let measured = baseline::Baseline {
        limits,
        produce_leader,
        produce_durable,
        consume,
        tcp_before,
        latency,
    };
    print!("{}", measured.table(arguments, &machine));
    Ok(())
}

/// One multi-threaded runtime for the clients and, with `--embedded`, the broker: a worker per
/// core, as the broker binary has.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure {
            message: format!("cannot start the runtime: {error}"),
            exit_code: 1,
        })
}
