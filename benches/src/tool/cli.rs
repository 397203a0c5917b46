//! The command line of `sluice-bench` (DESIGN.md, "Command line"), and its resolution into
//! [`Settings`]: defaults filled in, combinations checked. Everything refused here exits 2.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_broker::storage::FsyncPolicy;
use sluice_client::producer::Acks;

/// The smallest batch a producer takes: a header and one empty record.
const MIN_BATCH_BYTES: i64 = sluice_protocol::batch::HEADER_BYTES as i64 + 8;
/// The broker used when neither `--broker`, `--embedded` nor `SLUICE_BROKER` says otherwise.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:7171";
/// Messages sent when neither `--messages` nor `--duration` is given (latency: see below).
pub const DEFAULT_MESSAGES: u64 = 1_000_000;
/// How long `latency` runs when neither `--messages` nor `--duration` is given.
pub const DEFAULT_LATENCY_DURATION_SECONDS: u64 = 10;
/// The send rate of `latency` when `--rate` is not given.
pub const DEFAULT_LATENCY_RATE: u64 = 10_000;
/// The producer's own defaults, repeated here so every result can be labelled with them.
pub const DEFAULT_BATCH_BYTES: u32 = 256 * 1024;
pub const DEFAULT_LINGER_MS: u64 = 5;
/// Records a producer hands over per `Producer::enqueue_many` call, unpaced.
pub const DEFAULT_RECORDS_PER_SEND: u32 = 1_000;
/// Every payload starts with its send time (8 bytes), so it cannot be shorter.
pub const MIN_MESSAGE_BYTES: u32 = 8;
/// Leaves room for the batch and record headers inside the broker's default 1 MiB batch limit.
pub const MAX_MESSAGE_BYTES: u32 = 1_000_000;

const LONG_ABOUT: &str = "\
sluice-bench: end-to-end throughput and latency of a Sluice broker, and the machine's physical \
limits beside it.

Workloads (each on a fresh topic):
  produce   producers send as fast as they can (or at --rate); send->ack latency.
  consume   the topic is filled first (not measured), then a consumer group reads it all back;
            the read is measured, from the first records' arrival to the last record
            (those first records not counted; joining the group is reported as startup).
  pubsub    producers and a consumer group at once; send->ack and produce->consume latency.
  latency   producers at a fixed --rate (default 10000 msgs/s, linger 0) and a tailing group;
            produce->consume percentiles from the send time carried in each payload.
  baseline  raw loopback TCP, page-cache append and fdatasync on this machine, with Sluice's
            produce and consume figures beside them as ratios.

Every result is labelled with acks, fsync, transport, sizes, producers/consumers/partitions and \
the machine (cores, memory, CPU model): a number without its durability setting means nothing.

Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage or configuration error.";

/// End-to-end benchmarks of Sluice.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version, about = "End-to-end throughput and latency of Sluice", long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Producers write to a fresh topic; msgs/s and send->ack latency.
    Produce(WorkloadArgs),
    /// Fill a fresh topic, then a consumer group reads it back; the read is measured.
    Consume(WorkloadArgs),
    /// Producers and a consumer group at once; send->ack and produce->consume latency.
    Pubsub(WorkloadArgs),
    /// Producers at a fixed --rate and a tailing group; produce->consume percentiles.
    Latency(WorkloadArgs),
    /// Raw loopback TCP, page-cache append and fdatasync, with Sluice's figures as ratios.
    Baseline(BaselineArgs),
    /// The machine's own stalls: a thread per CPU spins on the clock; gaps of 100 µs and more.
    Stalls(StallsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AcksArgument {
    None,
    Leader,
    Durable,
}

impl From<AcksArgument> for Acks {
    fn from(acks: AcksArgument) -> Acks {
        match acks {
            AcksArgument::None => Acks::None,
            AcksArgument::Leader => Acks::Leader,
            AcksArgument::Durable => Acks::Durable,
        }
    }
}

/// The flags of `produce`, `consume`, `pubsub` and `latency`.
#[derive(Clone, Debug, Args)]
pub struct WorkloadArgs {
    /// Broker URL, tcp://HOST:PORT or quic://HOST:PORT. Default: $SLUICE_BROKER, else
    /// tcp://127.0.0.1:7171. The benchmark topic is deleted at the end.
    #[arg(long, value_name = "URL", conflicts_with = "embedded")]
    pub broker: Option<String>,
    /// Start a broker in this process, on a temporary data directory under $SLUICE_BENCH_DIR
    /// (default: the system temporary directory; put it on the disk you want to measure).
    #[arg(long)]
    pub embedded: bool,
    /// CA certificate (PEM) to trust for quic:// (not needed with --embedded).
    #[arg(long, env = "SLUICE_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Transport. With --broker it must match the URL's scheme; without one, it picks the
    /// default broker's (quic://127.0.0.1:7171 for quic). Default: the URL's, else tcp.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Producers, each with its own connection and producer id.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub producers: u32,
    /// Members of the consumer group, each with its own connection (consume, pubsub, latency).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub consumers: u32,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
    /// Payload bytes per message; the first 8 carry the send time.
    #[arg(long, value_name = "BYTES", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_MESSAGE_BYTES)..=i64::from(MAX_MESSAGE_BYTES)))]
    pub message_size: u32,
    /// Messages to send in all. Default 1000000 (latency: --duration 10).
    #[arg(long, value_name = "N", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,
    /// Send for this long instead of a number of messages (consume: fill for this long, then
    /// read everything back).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: Option<u64>,
    /// Size a producer's batch closes at (the producer's batch_bytes). Default 262144.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(MIN_BATCH_BYTES..))]
    pub batch_bytes: Option<u32>,
    /// How long a batch waits for more records (the producer's linger). Default 5, latency 0.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub linger_ms: Option<u64>,
    /// Records a producer hands to the client per call: 1 = `Producer::enqueue` per record,
    /// more = `Producer::enqueue_many` with that many (one lock, one clock read, one future
    /// per call). With --rate records are paced one at a time. Default 1000.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub records_per_send: Option<u32>,
    /// When the broker acknowledges: none (no answer), leader (in its page cache), durable
    /// (fsynced first).
    #[arg(long, value_enum, default_value_t = AcksArgument::Durable)]
    pub acks: AcksArgument,
    /// The broker's background fsync of data written with weaker acks. With --embedded it
    /// configures the broker (default interval:1000, the broker's default); with --broker it is
    /// only a label for the results (default: unstated) and changes nothing.
    #[arg(long, value_name = "always|interval:MS|never", value_parser = clap::value_parser!(FsyncPolicy))]
    pub fsync: Option<FsyncPolicy>,
    /// Total send rate of all producers, in messages per second. Default: as fast as possible
    /// (latency: 10000).
    #[arg(long, value_name = "MSGS_PER_S", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub rate: Option<u64>,
    /// Append one JSON object (one line) with the results and their labels to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write throughput and latency over time (one point per second) to FILE.svg.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
}

/// The flags of `baseline`.
#[derive(Clone, Debug, Args)]
pub struct BaselineArgs {
    /// Payload bytes per message.
    #[arg(long, value_name = "BYTES", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_MESSAGE_BYTES)..=i64::from(MAX_MESSAGE_BYTES)))]
    pub message_size: u32,
    /// Messages per measurement.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MESSAGES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Seconds each one-way latency measurement (raw TCP, then Sluice) sends for.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub latency_duration: u64,
    /// Size a producer's batch closes at, and the raw writes' size: 1048576 gives 1 KiB
    /// messages batches of about 1,000 records. At most 1048576, the embedded broker's
    /// max_batch_bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BATCH_BYTES,
          value_parser = clap::value_parser!(u32).range(MIN_BATCH_BYTES..=1024 * 1024))]
    pub batch_bytes: u32,
}

/// The flags of `stalls`.
#[derive(Clone, Debug, Args)]
pub struct StallsArgs {
    /// Seconds every CPU is probed for (all of them busy meanwhile).
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
}

/// Which workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Produce,
    Consume,
    Pubsub,
    Latency,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::Pubsub => "pubsub",
            Workload::Latency => "latency",
        }
    }

    /// Whether a consumer group runs in the measured phase.
    pub fn has_consumers(self) -> bool {
        self != Workload::Produce
    }
}

/// When the producers stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Messages(u64),
    After(Duration),
}

/// Where the broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Started in this process with this fsync policy.
    Embedded { fsync: FsyncPolicy },
    /// Running elsewhere, at this URL.
    External {
        url: String,
        ca_file: Option<PathBuf>,
    },
}

/// A workload's settings with every default filled in.
#[derive(Clone, Debug)]
pub struct Settings {
    pub workload: Workload,
    pub target: Target,
    pub transport: Transport,
    pub producers: u32,
    /// 0 for `produce`.
    pub consumers: u32,
    pub partitions: u32,
    pub message_size: u32,
    pub stop: Stop,
    pub batch_bytes: u32,
    pub linger: Duration,
    /// Records per producer call when unpaced (1 with a rate).
    pub records_per_send: u32,
    pub acks: Acks,
    /// The fsync label: the embedded broker's policy, or what the user said of an external one.
    pub fsync_label: String,
    pub rate: Option<u64>,
    pub json: Option<PathBuf>,
    pub chart: Option<PathBuf>,
}

impl Settings {
    /// Fills in defaults and checks the flags together. `broker_from_environment` is
    /// `$SLUICE_BROKER`, passed in so tests need not touch the environment.
    ///
    /// # Errors
    /// A one-line message for flags that do not go together (exit 2).
    pub fn resolve(
        workload: Workload,
        arguments: WorkloadArgs,
        broker_from_environment: Option<String>,
    ) -> Result<Settings, String> {
        let (target, transport) = if arguments.embedded {
            let fsync = arguments.fsync.unwrap_or_default();
            (
                Target::Embedded { fsync },
                arguments.transport.unwrap_or(Transport::Tcp),
            )
        } else {
            // Without a URL, the default broker address over the transport asked for.
            let url = arguments
                .broker
                .or(broker_from_environment.filter(|url| !url.is_empty()))
                .unwrap_or_else(|| match arguments.transport {
                    Some(Transport::Quic) => DEFAULT_BROKER.replacen("tcp://", "quic://", 1),
                    _ => DEFAULT_BROKER.to_owned(),
                });
            let scheme = if url.starts_with("tcp://") {
                Transport::Tcp
            } else if url.starts_with("quic://") {
                Transport::Quic
            } else {
                return Err(format!(
                    "broker URL {url:?} must start with tcp:// or quic://"
                ));
            };
            if let Some(transport) = arguments.transport
                && transport != scheme
            {
                return Err(format!(
                    "--transport {} does not match the broker URL {url}",
                    transport.name()
                ));
            }
            (
                Target::External {
                    url,
                    ca_file: arguments.ca_file,
                },
                scheme,
            )
        };
        let fsync_label = match (&target, arguments.fsync) {
            (Target::Embedded { fsync }, _) => fsync.to_string(),
            (Target::External { .. }, Some(fsync)) => format!("{fsync} (stated)"),
            (Target::External { .. }, None) => "unstated".to_owned(),
        };
        let stop = match (arguments.messages, arguments.duration) {
            (Some(messages), _) => Stop::Messages(messages),
            (None, Some(seconds)) => Stop::After(Duration::from_secs(seconds)),
            (None, None) if workload == Workload::Latency => {
                Stop::After(Duration::from_secs(DEFAULT_LATENCY_DURATION_SECONDS))
            }
            (None, None) => Stop::Messages(DEFAULT_MESSAGES),
        };
        let rate = match (workload, arguments.rate) {
            (Workload::Latency, None) => Some(DEFAULT_LATENCY_RATE),
            (_, rate) => rate,
        };
        let default_linger_ms = if workload == Workload::Latency {
            0
        } else {
            DEFAULT_LINGER_MS
        };
        let acks = Acks::from(arguments.acks);
        Ok(Settings {
            workload,
            target,
            transport,
            producers: arguments.producers,
            consumers: if workload.has_consumers() {
                arguments.consumers
            } else {
                0
            },
            partitions: arguments.partitions,
            message_size: arguments.message_size,
            stop,
            batch_bytes: arguments.batch_bytes.unwrap_or(DEFAULT_BATCH_BYTES),
            linger: Duration::from_millis(arguments.linger_ms.unwrap_or(default_linger_ms)),
            records_per_send: if rate.is_some() {
                1
            } else {
                arguments
                    .records_per_send
                    .unwrap_or(DEFAULT_RECORDS_PER_SEND)
            },
            acks,
            fsync_label,
            rate,
            json: arguments.json,
            chart: arguments.chart,
        })
    }

    /// `none`, `leader` or `durable`.
    pub fn acks_name(&self) -> &'static str {
        match self.acks {
            Acks::None => "none",
            Acks::Leader => "leader",
            Acks::Durable => "durable",
        }
    }

    /// `embedded` or the URL.
    pub fn broker_label(&self) -> String {
        match &self.target {
            Target::Embedded { .. } => "embedded".to_owned(),
            Target::External { url, .. } => url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice-bench").chain(line.iter().copied()))
    }

    fn settings(line: &[&str], environment: Option<&str>) -> Result<Settings, String> {
        let cli = parse(line).expect("parses");
        let (workload, arguments) = match cli.command {
            Command::Produce(arguments) => (Workload::Produce, arguments),
            Command::Consume(arguments) => (Workload::Consume, arguments),
            Command::Pubsub(arguments) => (Workload::Pubsub, arguments),
            Command::Latency(arguments) => (Workload::Latency, arguments),
            Command::Baseline(_) | Command::Stalls(_) => panic!("not a workload"),
        };
        Settings::resolve(workload, arguments, environment.map(str::to_owned))
    }

    #[test]
    fn defaults_are_filled_in() {
        let produce = settings(&["produce", "--embedded"], None).unwrap();
        assert_eq!(produce.stop, Stop::Messages(DEFAULT_MESSAGES));
        assert_eq!(produce.consumers, 0);
        assert_eq!(produce.fsync_label, "interval:1000");
        assert_eq!(produce.linger, Duration::from_millis(DEFAULT_LINGER_MS));
        assert_eq!(produce.rate, None);
        let latency = settings(&["latency", "--embedded"], None).unwrap();
        assert_eq!(
            latency.stop,
            Stop::After(Duration::from_secs(DEFAULT_LATENCY_DURATION_SECONDS))
        );
        assert_eq!(latency.rate, Some(DEFAULT_LATENCY_RATE));
        assert_eq!(latency.linger, Duration::ZERO);
        assert_eq!(latency.consumers, 1);
    }

    #[test]
    fn the_broker_comes_from_the_flag_then_the_environment() {
        let flag = settings(&["produce", "--broker", "quic://h:1"], Some("tcp://e:2")).unwrap();
        assert_eq!(flag.broker_label(), "quic://h:1");
        assert_eq!(flag.transport, Transport::Quic);
        assert_eq!(flag.fsync_label, "unstated");
        let environment = settings(&["produce"], Some("tcp://e:2")).unwrap();
        assert_eq!(environment.broker_label(), "tcp://e:2");
        let default = settings(&["produce", "--fsync", "always"], None).unwrap();
        assert_eq!(default.broker_label(), DEFAULT_BROKER);
        assert_eq!(default.fsync_label, "always (stated)");
        // Without a URL, --transport picks the default broker over that transport.
        let quic = settings(&["produce", "--transport", "quic"], None).unwrap();
        assert_eq!(quic.broker_label(), "quic://127.0.0.1:7171");
        assert_eq!(quic.transport, Transport::Quic);
    }

    #[test]
    fn flags_that_do_not_go_together_are_refused() {
        assert!(
            settings(
                &["produce", "--broker", "tcp://h:1", "--transport", "quic"],
                None
            )
            .is_err()
        );
        assert!(settings(&["produce", "--broker", "http://h:1"], None).is_err());
        assert!(parse(&["produce", "--embedded", "--broker", "tcp://h:1"]).is_err());
        assert!(parse(&["produce", "--messages", "5", "--duration", "5"]).is_err());
        assert!(parse(&["produce", "--message-size", "4"]).is_err());
        assert!(parse(&["produce", "--fsync", "sometimes"]).is_err());
        assert!(parse(&["produce", "--acks", "all"]).is_err());
        assert!(parse(&["baseline", "--acks", "leader"]).is_err());
    }
}
