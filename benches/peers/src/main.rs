//! `peer-bench`: sluice-bench's produce / consume / latency workloads, run against NATS
//! JetStream (async-nats) and Redis Streams (the redis crate), so the three systems can be
//! compared on one machine with the same message counts, sizes and rates.
//!
//! ```text
//! main.rs            command line, dispatch, result line and --json
//! measure.rs         stamped payloads, latency histograms, fixed-rate pacing, JSON
//! nats_jetstream.rs  the workloads on a JetStream stream (file storage) through a pull consumer
//! redis_streams.rs   the workloads on a Redis stream: pipelined XADD, XREAD COUNT / BLOCK
//! table.rs           `peer-bench table`: medians of the rounds, ratios Sluice/peer, markdown
//! ```
//!
//! Workloads (each on a fresh stream, deleted at the end):
//! - `produce`: one publisher sends `--messages` messages of `--message-size` bytes, keeping
//!   about `--batch` acknowledgements outstanding; msgs/s and send→ack latency.
//! - `consume`: the stream is filled first (not measured), then one reader reads it from the
//!   start; only the read is timed, from creating the reader to the last message.
//! - `latency`: one publisher at `--rate` msgs/s for `--duration` seconds and a tailing reader
//!   in the same process; produce→consume percentiles from the send time in each payload.
//!
//! `peer-bench table` reads the JSON lines of sluice-bench and peer-bench and prints the
//! comparison (see table.rs).
//!
//! Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error.

mod measure;
mod nats_jetstream;
mod redis_streams;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use crate::measure::{Labels, Outcome};

/// The largest payload accepted: below NATS's default 1 MiB max_payload with room for headers.
const MAX_MESSAGE_SIZE_BYTES: u64 = 1_000_000;

/// sluice-bench's produce / consume / latency workloads against NATS JetStream or Redis Streams,
/// and the comparison table of their results.
///
/// Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "peer-bench", version)]
enum Cli {
    /// One publisher sends --messages as fast as --batch outstanding acks allow; msgs/s and
    /// send->ack latency.
    Produce(RunArgs),
    /// Fill a fresh stream with --messages (not measured), then read it all back from the
    /// start; the read is measured.
    Consume(RunArgs),
    /// One publisher at --rate for --duration and a tailing reader in the same process;
    /// produce->consume latency percentiles.
    Latency(RunArgs),
    /// Print the markdown comparison of JSON result files (medians of the rounds, ratios
    /// Sluice/peer).
    Table(table::TableArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The system to measure.
    #[arg(long, value_enum)]
    system: System,

    /// Server URL. Default nats://127.0.0.1:4222 or redis://127.0.0.1:6379.
    #[arg(long, value_name = "URL")]
    url: Option<String>,

    /// Messages to send (produce) or to fill and read back (consume); latency runs by time.
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,

    /// Payload bytes per message; the first 8 carry the send time.
    #[arg(long, value_name = "BYTES", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(measure::STAMP_BYTES as u64..=MAX_MESSAGE_SIZE_BYTES))]
    message_size: u64,

    /// Messages per pipelined batch: Redis XADDs per round trip and XREAD COUNT, JetStream
    /// acknowledgements outstanding and messages per pull.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch: u64,

    /// Messages per second sent by `latency`.
    #[arg(long, value_name = "MSGS_PER_S", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: u64,

    /// Seconds `latency` sends for.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: u64,

    /// Label the result "durable" instead of "page-cache". Only a label: how the server syncs
    /// is its own configuration (see benches/peers/run).
    #[arg(long)]
    durable: bool,

    /// Append one JSON object (one line) with the result and its labels to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Produce,
    Consume,
    Latency,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::Latency => "latency",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Nats,
    Redis,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Nats => "nats",
            System::Redis => "redis",
        }
    }

    fn default_url(self) -> &'static str {
        match self {
            System::Nats => "nats://127.0.0.1:4222",
            System::Redis => "redis://127.0.0.1:6379",
        }
    }
}

/// What a workload needs to know, with the command line's checks already made.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: String,
    pub messages: u64,
    pub message_size_bytes: usize,
    pub batch: usize,
    pub rate_per_second: u64,
    pub duration: Duration,
}

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2.
    let result = match Cli::parse() {
        Cli::Produce(args) => run(Workload::Produce, &args),
        Cli::Consume(args) => run(Workload::Consume, &args),
        Cli::Latency(args) => run(Workload::Latency, &args),
        Cli::Table(args) => table::print(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, joined.
            eprintln!("peer-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(workload: Workload, args: &RunArgs) -> Result<()> {
    let settings = Settings {
        url: args
            .url
            .clone()
            .unwrap_or_else(|| args.system.default_url().to_owned()),
        messages: args.messages,
        // Both were range-checked by clap, so they fit.
        message_size_bytes: usize::try_from(args.message_size)?,
        batch: usize::try_from(args.batch)?,
        rate_per_second: args.rate,
        duration: Duration::from_secs(args.duration),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome: Outcome = runtime.block_on(async {
        match (args.system, workload) {
            (System::Nats, Workload::Produce) => nats_jetstream::produce(&settings).await,
            (System::Nats, Workload::Consume) => nats_jetstream::consume(&settings).await,
            (System::Nats, Workload::Latency) => nats_jetstream::latency(&settings).await,
            (System::Redis, Workload::Produce) => redis_streams::produce(&settings).await,
            (System::Redis, Workload::Consume) => redis_streams::consume(&settings).await,
            (System::Redis, Workload::Latency) => redis_streams::latency(&settings).await,
        }
    })?;
    // Leave the clients' background tasks behind rather than wait for them to notice.
    runtime.shutdown_timeout(Duration::from_secs(1));

    let labels = Labels {
        system: args.system.name(),
        workload: workload.name(),
        message_size_bytes: settings.message_size_bytes,
        batch: settings.batch,
        rate: (workload == Workload::Latency).then_some(settings.rate_per_second),
        durability: if args.durable {
            "durable"
        } else {
            "page-cache"
        },
    };
    println!("{}", measure::to_text(&labels, &outcome));
    if let Some(path) = &args.json {
        measure::append_json_line(path, &measure::to_json(&labels, &outcome))?;
    }
    Ok(())
}
