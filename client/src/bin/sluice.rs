//! `sluice`: the command line for topics, producing, consuming and groups (DESIGN.md,
//! "Command line"). Exit codes: 0 success, 1 runtime error (one line on stderr), 2 usage.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use sluice_client::producer::{DeliveryFuture, Record};
use sluice_client::protocol::messages::Acks;
use sluice_client::resilience::BreakerState;
use sluice_client::{
    Client, ClientOptions, CommitMode, ConnectionOptions, ConsumerRecord, ResetPolicy, Seek,
};

/// Sluice command line: topics, produce, consume, groups.
#[derive(Debug, Parser)]
#[command(name = "sluice", version)]
struct Cli {
    /// Broker URL: tcp://host:port or quic://host:port.
    #[arg(
        long,
        env = "SLUICE_BROKER",
        default_value = "tcp://127.0.0.1:7171",
        global = true
    )]
    broker: String,
    /// CA certificate (PEM) to trust for quic://, e.g. the broker's `<data-dir>/tls/cert.pem`.
    #[arg(long, env = "SLUICE_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Produce stdin, one message per line.
    Produce {
        /// The topic to produce to.
        topic: String,
        /// The text before the first SEP is the key; without it, lines have no key.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        key_separator: Option<String>,
        /// When a record counts as sent: none (not acknowledged), leader (written by the
        /// broker) or durable (fsynced first).
        #[arg(long, value_enum, default_value_t = AcksArg::Durable)]
        acks: AcksArg,
    },
    /// Consume records and print them to stdout.
    Consume {
        /// The topic to consume, every partition of it.
        topic: String,
        /// Consume as a member of this group (offsets are committed).
        #[arg(long)]
        group: Option<String>,
        /// Where to start when no committed offset exists: earliest, latest or an offset. An
        /// offset applies to every partition (in a group, to those the group has not committed
        /// yet); a partition whose log ends before it, or starts after it, is read from its
        /// start.
        #[arg(long, default_value = "earliest", value_parser = parse_from)]
        from: StartFrom,
        /// Exit after N records.
        #[arg(long)]
        count: Option<u64>,
        /// Exit after MS with no new record.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// json: one object per line (topic, partition, offset, timestamp, key, value,
        /// headers); value: each record's value alone, one per line.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// List and describe consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// The topic's name: 1-249 characters of [a-zA-Z0-9._-].
        topic: String,
        /// How many partitions the topic has (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: u32,
        /// A per-topic override of a `[log]` setting, KEY=VALUE (retention_ms, retention_bytes,
        /// segment_bytes, segment_ms, max_message_bytes, index_interval_bytes); repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Partitions, offsets, sizes and configuration of a topic.
    Describe { topic: String },
    /// Delete a topic and its data.
    Delete { topic: String },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// List consumer groups.
    List,
    /// Members, assignment, committed offsets and lag of a group.
    Describe { group: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AcksArg {
    None,
    Leader,
    Durable,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Json,
    Value,
}

/// `consume --from`.
#[derive(Clone, Copy, Debug)]
enum StartFrom {
    Earliest,
    Latest,
    Offset(u64),
}

/// Parsed with the other flags, so a bad value is a usage error before anything connects.
fn parse_config(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, setting)) if !key.is_empty() => Ok((key.to_owned(), setting.to_owned())),
        _ => Err(format!("{value:?}: expected KEY=VALUE")),
    }
}

fn parse_from(value: &str) -> Result<StartFrom, String> {
    match value {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        offset => offset
            .parse()
            .map(StartFrom::Offset)
            .map_err(|_| format!("{offset:?}: expected earliest, latest or an offset")),
    }
}

/// A failure: one line on stderr, exit 1 (runtime) or 2 (usage or configuration).
struct Failure(String, u8);

impl Failure {
    fn runtime(message: impl Into<String>) -> Failure {
        Failure(message.into(), 1)
    }

    fn usage(message: impl Into<String>) -> Failure {
        Failure(message.into(), 2)
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::runtime(error.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            report(format_args!("sluice: cannot start the runtime: {error}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            report(format_args!(
                "sluice: {}",
                message.lines().next().unwrap_or("failed")
            ));
            ExitCode::from(code)
        }
    }
}

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let mut connection = ConnectionOptions::default().request_timeout(Duration::from_secs(30));
    if let Some(ca_file) = &cli.ca_file {
        connection = connection.ca_file(ca_file.clone());
    }
    let options = ClientOptions::default()
        .connection(connection)
        .retry_deadline(Duration::from_secs(10));
    Client::connect_with(&cli.broker, options)
        .await
        .map_err(|error| match error {
            // A malformed URL or a missing CA file is a configuration error, not a runtime one.
            sluice_client::Error::InvalidUrl(_) => Failure::usage(error.to_string()),
            error => Failure::runtime(format!("cannot reach {}: {error}", cli.broker)),
        })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let client = connect(&cli).await?;
    let result = match &cli.command {
        Command::Topic(command) => topic(&client, command).await,
        Command::Produce {
            topic,
            key_separator,
            acks,
        } => produce(&client, topic, key_separator.as_deref(), *acks).await,
        Command::Consume {
            topic,
            group,
            from,
            count,
            timeout_ms,
            format,
        } => {
            consume(
                &client,
                topic,
                group.as_deref(),
                *from,
                *count,
                *timeout_ms,
                *format,
            )
            .await
        }
        Command::Group(command) => group(&client, command).await,
    };
    client.close().await;
    result
}

async fn topic(client: &Client, command: &TopicCommand) -> Result<(), Failure> {
    let admin = client.admin();
    let mut out = Vec::new();
    match command {
        TopicCommand::Create {
            topic,
            partitions,
            configs,
        } => {
            let configs: Vec<(&str, &str)> = configs
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            admin.create_topic(topic, *partitions, &configs).await?;
            writeln!(out, "created topic {topic} with {partitions} partition(s)")?;
        }
        TopicCommand::List => {
            for topic in admin.list_topics().await? {
                writeln!(out, "{}\t{}", topic.name, topic.partitions)?;
            }
        }
        TopicCommand::Describe { topic } => {
            let described = admin.describe_topic(topic).await?;
            writeln!(
                out,
                "topic {} ({} partitions)",
                described.name,
                described.partitions.len()
            )?;
            writeln!(out, "partition\tstart\tend\tbytes\tsegments")?;
            for partition in &described.partitions {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}",
                    partition.partition,
                    partition.log_start_offset,
                    partition.high_watermark,
                    partition.size_bytes,
                    partition.segment_count
                )?;
            }
            for (key, value) in &described.configs {
                writeln!(out, "{key}={value}")?;
            }
        }
        TopicCommand::Delete { topic } => {
            admin.delete_topic(topic).await?;
            writeln!(out, "deleted topic {topic}")?;
        }
    }
    print(&out)
}

/// Writes a command's whole output to stdout. A reader that went away (`| head -1`) ends the
/// command as having printed it, as `consume` does.
fn print(out: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(Failure::runtime(format!(
            "writing the output failed: {error}"
        ))),
        Ok(()) => Ok(()),
    }
}

async fn group(client: &Client, command: &GroupCommand) -> Result<(), Failure> {
    let admin = client.admin();
    let mut out = Vec::new();
    match command {
        GroupCommand::List => {
            for group in admin.list_groups().await? {
                writeln!(
                    out,
                    "{}\t{}\t{} member(s)",
                    group.group_id, group.state, group.members
                )?;
            }
        }
        GroupCommand::Describe { group } => {
            let described = admin.describe_group(group).await?;
            writeln!(
                out,
                "group {} state {} epoch {} assignor {}",
                described.group_id, described.state, described.group_epoch, described.assignor
            )?;
            writeln!(out, "members:")?;
            for member in &described.members {
                let assigned: Vec<String> = member
                    .assigned
                    .iter()
                    .flat_map(|entry| {
                        entry
                            .partitions
                            .iter()
                            .map(move |p| format!("{}/{p}", entry.topic))
                    })
                    .collect();
                writeln!(
                    out,
                    "  {} epoch {} topics {} assigned [{}]",
                    member.member_id,
                    member.member_epoch,
                    member.topics.join(","),
                    assigned.join(" ")
                )?;
            }
            writeln!(out, "topic\tpartition\tcommitted\tend\tlag")?;
            for offset in &described.offsets {
                let committed = if offset.committed_offset < 0 {
                    "-".to_owned()
                } else {
                    offset.committed_offset.to_string()
                };
                let lag = if offset.lag < 0 {
                    "-".to_owned()
                } else {
                    offset.lag.to_string()
                };
                writeln!(
                    out,
                    "{}\t{}\t{committed}\t{}\t{lag}",
                    offset.topic, offset.partition, offset.log_end_offset
                )?;
            }
        }
    }
    print(&out)
}

/// A progress line on stderr, only for a terminal, at most a few times a second.
struct Progress {
    enabled: bool,
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    fn update(&mut self, what: &str, count: u64) {
        if self.enabled && self.last.elapsed() >= Duration::from_millis(250) {
            self.last = Instant::now();
            let _ = write!(std::io::stderr(), "\r{what} {count} records");
        }
    }

    fn finish(&self) {
        if self.enabled {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

async fn produce(
    client: &Client,
    topic: &str,
    key_separator: Option<&str>,
    acks: AcksArg,
) -> Result<(), Failure> {
    produce_with_producer(client, topic, key_separator, acks).await
}

async fn consume(
    client: &Client,
    topic: &str,
    group: Option<&str>,
    from: StartFrom,
    count: Option<u64>,
    timeout_ms: Option<u64>,
    format: Format,
) -> Result<(), Failure> {
    // In a group, --from says where a partition without a committed offset starts.
    let (reset, seek) = match from {
        StartFrom::Earliest => (ResetPolicy::Earliest, Seek::Earliest),
        StartFrom::Latest => (ResetPolicy::Latest, Seek::Latest),
        StartFrom::Offset(offset) => (ResetPolicy::Earliest, Seek::Offset(offset)),
    };
    let partitions = client.admin().partition_count(topic).await?;
    let builder = client
        .consumer()
        .reset_policy(reset)
        .commit_mode(CommitMode::Manual);
    let mut consumer = match group {
        Some(group) => {
            let builder = builder.group(group).topics([topic]);
            match seek {
                // A start outside the log then resets to the earliest offset.
                Seek::Offset(_) => builder.start_without_commit(seek),
                _ => builder,
            }
            .build()
            .await?
        }
        None => {
            let consumer = builder.build().await?;
            let all: Vec<(String, u32)> = (0..partitions)
                .map(|partition| (topic.to_owned(), partition))
                .collect();
            consumer.assign(&all, seek).await?;
            consumer
        }
    };
    let mut out = Printed::new();
    let mut consumed = 0u64;
    let mut failure = None;
    let mut progress = Progress::new();
    let idle = timeout_ms.map(Duration::from_millis);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut reachability = Reachability::default();
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    // A wait on the output (a paused pager) must not be followed by a burst of checks.
    every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let outcome: std::io::Result<()> = 'records: loop {
        if count.is_some_and(|count| consumed >= count) {
            break Ok(());
        }
        let next = async {
            match idle {
                Some(idle) => tokio::time::timeout(idle, consumer.next()).await.ok(),
                None => Some(consumer.next().await),
            }
        };
        tokio::pin!(next);
        // What is printed shows as soon as no further record is ready: a live tail is seen
        // as it comes, a backlog is written in large writes.
        // An interrupt stops the loop before it takes a record, never after: a record the
        // stream handed out is printed (close commits it as processed).
        if futures::poll!(&mut interrupted).is_ready() {
            break Ok(());
        }
        let record = match futures::poll!(next.as_mut()) {
            std::task::Poll::Ready(record) => record,
            std::task::Poll::Pending => {
                if let Err(error) = out.flush() {
                    break Err(error);
                }
                // While it waits, a broker gone away is said once, and its return: the
                // consumer retries quietly, and a live tail would otherwise look idle.
                loop {
                    tokio::select! {
                        record = &mut next => break record,
                        _ = &mut interrupted => break 'records Ok(()),
                        _ = every_second.tick() => reachability.check(client, &progress),
                    }
                }
            }
        };
        match record {
            None => break Ok(()),       // idle timeout
            Some(None) => break Ok(()), // stream ended
            Some(Some(Err(error))) => {
                failure = Some(Failure::runtime(error.to_string()));
                break Ok(());
            }
            Some(Some(Ok(record))) => {
                if let Err(error) = out.print(&record, format) {
                    break Err(error);
                }
                consumed += 1;
                progress.update("consumed", consumed);
            }
        }
    };
    let output = outcome.and_then(|()| out.flush());
    progress.finish();
    match output {
        // Everything printed is processed: close commits it (in a group) before exiting.
        Ok(()) => {
            let closed = consumer.close().await;
            if let Some(failure) = failure {
                return Err(failure);
            }
            closed?;
        }
        // The records still buffered did not reach the output (a write failed, or its
        // reader went away): a group commits only those written, and delivers the others
        // again rather than lose them.
        Err(error) => {
            let committed = if group.is_some() {
                // Of the partitions still this member's: a commit for one the group moved to
                // another member would be refused.
                let assigned = consumer.assignment();
                let written: Vec<_> = (out.written().into_iter())
                    .filter(|(topic, partition, _)| assigned.contains(&(topic.clone(), *partition)))
                    .collect();
                consumer.commit_offsets(&written).await.map(|_| ())
            } else {
                Ok(())
            };
            consumer.close_without_commit().await;
            written(error)?;
            committed?;
        }
    }
    report(format_args!("consumed {consumed} records"));
    Ok(())
}

fn text_or_base64(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "base64": base64(bytes) }),
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let value = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[((value >> (18 - 6 * index)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether the client's circuit breaker has given up on the broker for now, as last said.
#[derive(Default)]
struct Reachability {
    unreachable: bool,
}

impl Reachability {
    /// Says on stderr when the broker became unreachable (the breaker opened after repeated
    /// failures), and when it answers again.
    fn check(&mut self, client: &Client, progress: &Progress) {
        match client.breaker_state() {
            BreakerState::Open { .. } if !self.unreachable => {
                self.unreachable = true;
                progress.finish();
                report(format_args!(
                    "sluice: the broker is unreachable; retrying until it is back"
                ));
            }
            BreakerState::Closed { .. } if self.unreachable => {
                self.unreachable = false;
                progress.finish();
                report(format_args!("sluice: the broker is reachable again"));
            }
            _ => {}
        }
    }
}

/// One line on stderr. A closed stderr is not worth failing over (and `eprintln!` would
/// panic on it).
fn report(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Consumed records on their way to stdout, through one buffer, and the positions of those
/// that have left it: when a write fails, a group commits only what the output took.
struct Printed {
    out: std::io::StdoutLock<'static>,
    buffer: Vec<u8>,
    /// Per partition, the offset after its last record in `buffer`.
    buffered: BTreeMap<(Arc<str>, u32), u64>,
    /// Per partition, the offset after its last record written out.
    written: BTreeMap<(Arc<str>, u32), u64>,
}

impl Printed {
    /// A backlog goes out in writes of about this many bytes.
    const WRITE_BYTES: usize = 64 * 1024;

    fn new() -> Printed {
        Printed {
            out: std::io::stdout().lock(),
            buffer: Vec::with_capacity(Self::WRITE_BYTES * 2),
            buffered: BTreeMap::new(),
            written: BTreeMap::new(),
        }
    }

    fn print(&mut self, record: &ConsumerRecord, format: Format) -> std::io::Result<()> {
        print_record(&mut self.buffer, record, format)?;
        self.buffered.insert(
            (Arc::clone(&record.topic), record.partition),
            record.offset + 1,
        );
        if self.buffer.len() >= Self::WRITE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.write_all(&self.buffer)?;
        self.out.flush()?;
        self.buffer.clear();
        self.written.append(&mut self.buffered);
        Ok(())
    }

    fn written(&self) -> Vec<(String, u32, u64)> {
        self.written
            .iter()
            .map(|((topic, partition), offset)| (topic.to_string(), *partition, *offset))
            .collect()
    }
}

/// A failed write of consumed records: the reader of the output went away (`| head`) ends
/// the command as reaching `--count` would; any other error fails it.
fn written(error: std::io::Error) -> Result<(), Failure> {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "writing the records failed: {error}"
        )))
    }
}

fn print_record(
    out: &mut impl Write,
    record: &ConsumerRecord,
    format: Format,
) -> std::io::Result<()> {
    match format {
        Format::Value => {
            out.write_all(&record.value)?;
            out.write_all(b"\n")?;
        }
        Format::Json => {
            let headers: serde_json::Map<String, serde_json::Value> = record
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), text_or_base64(value)))
                .collect();
            let object = serde_json::json!({
                "topic": &*record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp_ms,
                "key": record.key.as_deref().map(text_or_base64),
                "value": text_or_base64(&record.value),
                "headers": headers,
            });
            serde_json::to_writer(&mut *out, &object).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Reads stdin lines and yields (key, value) pairs.
/// Splits a line at the first `key_separator` into key and value. Lines are bytes, not text:
/// a value need not be UTF-8 (`consume --format json` shows such a one as base64).
fn split_line(line: &[u8], key_separator: Option<&str>) -> (Option<Vec<u8>>, Vec<u8>) {
    let separator = key_separator.map(str::as_bytes).filter(|s| !s.is_empty());
    let at = separator.and_then(|separator| {
        line.windows(separator.len())
            .position(|window| window == separator)
            .map(|at| (at, separator.len()))
    });
    match at {
        Some((at, length)) => (Some(line[..at].to_vec()), line[at + length..].to_vec()),
        None => (None, line.to_vec()),
    }
}

/// Reads stdin's lines as bytes on this (blocking) thread into `lines`, each without its
/// `\n` or `\r\n`, as `BufRead::lines` would end them.
fn read_lines(lines: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>) {
    let mut stdin = std::io::stdin().lock();
    loop {
        let mut line = Vec::new();
        let line = match stdin.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                Ok(line)
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => Err(error),
        };
        let failed = line.is_err();
        if lines.blocking_send(line).is_err() || failed {
            return;
        }
    }
}

async fn produce_with_producer(
    client: &Client,
    topic: &str,
    key_separator: Option<&str>,
    acks: AcksArg,
) -> Result<(), Failure> {
    // Fail early and clearly on an unknown topic instead of per record.
    client.admin().partition_count(topic).await?;
    let (acks, idempotence) = match acks {
        AcksArg::None => (Acks::None, false),
        AcksArg::Leader => (Acks::Leader, true),
        AcksArg::Durable => (Acks::Durable, true),
    };
    let producer = client
        .producer()
        .acks(acks)
        .idempotence(idempotence)
        .build()
        .await?;
    // Deliveries are counted as they complete, so memory stays flat however long stdin is.
    let (deliveries, mut completed) = tokio::sync::mpsc::channel::<DeliveryFuture>(4096);
    let counter = tokio::spawn(async move {
        let mut acknowledged = 0u64;
        let mut first_error: Option<String> = None;
        while let Some(delivery) = completed.recv().await {
            match delivery.await {
                Ok(_) => acknowledged += 1,
                Err(error) => {
                    first_error.get_or_insert_with(|| error.to_string());
                }
            }
        }
        (acknowledged, first_error)
    });
    // stdin is read on a blocking thread and handed over line by line.
    let (lines_sender, mut lines) = tokio::sync::mpsc::channel(4096);
    std::thread::spawn(move || read_lines(lines_sender));
    let mut sent = 0u64;
    let mut progress = Progress::new();
    let mut failure = None;
    while let Some(line) = lines.recv().await {
        let line = match line {
            Ok(line) => line,
            Err(error) => {
                failure = Some(Failure::runtime(format!("reading stdin: {error}")));
                break;
            }
        };
        let (key, value) = split_line(&line, key_separator);
        let mut record = Record::new(topic, value);
        if let Some(key) = key {
            record = record.key(key);
        }
        match producer.enqueue(record).await {
            Ok(delivery) => {
                sent += 1;
                if deliveries.send(delivery).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                failure = Some(Failure::runtime(error.to_string()));
                break;
            }
        }
        progress.update("sent", sent);
    }
    let closed = producer.close().await;
    drop(deliveries);
    let (acknowledged, first_error) = counter
        .await
        .map_err(|error| Failure::runtime(error.to_string()))?;
    progress.finish();
    // With acks=none nothing is acknowledged: a delivery completes when its request is queued,
    // whatever the broker then does with it.
    let unacknowledged = matches!(acks, Acks::None);
    if unacknowledged {
        report(format_args!(
            "sent {sent} records, 0 acknowledged (acks=none)"
        ));
    } else {
        report(format_args!(
            "sent {sent} records, {acknowledged} acknowledged"
        ));
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    closed?;
    if let Some(error) = first_error {
        return Err(Failure::runtime(format!(
            "{} of {sent} records not {}: {error}",
            sent - acknowledged,
            if unacknowledged {
                "sent"
            } else {
                "acknowledged"
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_answers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn key_separator_splits_at_the_first() {
        assert_eq!(
            split_line(b"a:b:c", Some(":")),
            (Some(b"a".to_vec()), b"b:c".to_vec())
        );
        assert_eq!(
            split_line(b"k=>v=>w", Some("=>")),
            (Some(b"k".to_vec()), b"v=>w".to_vec())
        );
        assert_eq!(split_line(b"abc", Some(":")), (None, b"abc".to_vec()));
        assert_eq!(split_line(b"a:b", None), (None, b"a:b".to_vec()));
        assert_eq!(split_line(b"a:b", Some("")), (None, b"a:b".to_vec()));
        assert_eq!(
            split_line(b"\xff:\xfe", Some(":")),
            (Some(vec![0xff]), vec![0xfe])
        );
    }
}
