//! The little the example programs share: where the broker is, names that do not collide
//! between runs, and waiting for a record with a deadline.
//!
//! The programs themselves are in `examples/` (run one with
//! `cargo run -p sluice-examples --example NAME`):
//!
//! | example               | pattern                                                           |
//! |-----------------------|-------------------------------------------------------------------|
//! | `quickstart`          | create a topic, produce, consume with a group                     |
//! | `consumer_group`      | three members share partitions; one dies, the others take over    |
//! | `idempotent_consumer` | duplicates and redeliveries skipped once their key is stored      |
//! | `outbox`              | database rows published exactly once, even across a relay crash   |
//! | `saga`                | an orchestrated order saga with compensations                     |
//! | `event_sourcing`      | an aggregate rebuilt from its events, and a CQRS read model       |
//!
//! Each takes the broker from `--broker URL` or `SLUICE_BROKER` (default
//! `tcp://127.0.0.1:7171`) and, for `quic://`, the CA file from `--ca-file PATH` or
//! `SLUICE_CA_FILE`, as the `sluice` tool does. It exits 0 once its scenario completed, 1 with
//! one line on stderr when it failed, 2 for a bad argument. `tests/examples.rs` runs every one
//! against a broker it starts.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use futures::{Stream, StreamExt};
use sluice_client::{Client, ClientOptions, ConnectionOptions, ConsumerRecord};

/// The broker every example talks to when neither `--broker` nor `SLUICE_BROKER` says.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:7171";

/// Where the broker is: `--broker URL` (or `--broker=URL`), else `SLUICE_BROKER`, else
/// [`DEFAULT_BROKER`]; and the CA file to trust for `quic://`: `--ca-file PATH`, else
/// `SLUICE_CA_FILE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub broker: String,
    pub ca_file: Option<PathBuf>,
}

/// A bad command line: the example exits 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (usage: [--broker URL] [--ca-file PATH])", self.0)
    }
}

impl std::error::Error for Usage {}

impl Target {
    /// From `arguments` (without the program name) and the environment variable `lookup`.
    ///
    /// # Errors
    /// [`Usage`] for an argument it does not know or a flag without its value.
    pub fn from(
        arguments: impl IntoIterator<Item = String>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Target, Usage> {
        let mut broker = None;
        let mut ca_file = None;
        let mut arguments = arguments.into_iter();
        while let Some(argument) = arguments.next() {
            let (flag, inline) = match argument.split_once('=') {
                Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
                None => (argument.clone(), None),
            };
            let slot = match flag.as_str() {
                "--broker" => &mut broker,
                "--ca-file" => &mut ca_file,
                _ => return Err(Usage(format!("unknown argument {argument:?}"))),
            };
            let value = inline
                .or_else(|| arguments.next())
                .filter(|value| !value.is_empty())
                .ok_or_else(|| Usage(format!("{flag} needs a value")))?;
            *slot = Some(value);
        }
        let non_empty = |name: &str| lookup(name).filter(|value| !value.is_empty());
        Ok(Target {
            broker: broker
                .or_else(|| non_empty("SLUICE_BROKER"))
                .unwrap_or_else(|| DEFAULT_BROKER.to_owned()),
            ca_file: ca_file
                .or_else(|| non_empty("SLUICE_CA_FILE"))
                .map(PathBuf::from),
        })
    }

    /// This process's command line and environment.
    ///
    /// # Errors
    /// As [`Target::from`].
    pub fn of_this_process() -> Result<Target, Usage> {
        Target::from(std::env::args().skip(1), |name| std::env::var(name).ok())
    }
}

/// A client for the broker this process was pointed at (see [`Target`]).
///
/// # Errors
/// [`Usage`] for a bad command line; the connection error otherwise.
pub async fn connect() -> anyhow::Result<Client> {
    let target = Target::of_this_process()?;
    let mut connection = ConnectionOptions::default();
    if let Some(ca_file) = &target.ca_file {
        connection = connection.ca_file(ca_file);
    }
    let options = ClientOptions::default().connection(connection);
    Client::connect_with(&target.broker, options)
        .await
        .with_context(|| format!("connecting to {}", target.broker))
}

/// Runs an example's scenario and turns its outcome into the exit code: 0, or 1 with the
/// error (and its causes) on one line on stderr, or 2 for a bad command line.
pub async fn finish(scenario: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    match scenario.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let program = std::env::args()
                .next()
                .and_then(|path| {
                    std::path::Path::new(&path)
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "example".to_owned());
            eprintln!("{program}: {error:#}");
            ExitCode::from(if error.is::<Usage>() { 2 } else { 1 })
        }
    }
}

/// A suffix for topic and group names, different for every run, so running an example again
/// against the same broker starts from empty topics and fresh groups.
pub fn unique_suffix() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    format!("{}-{}", std::process::id(), millis)
}

/// The next record of `stream`, or an error once `deadline` passed.
///
/// # Errors
/// The deadline passed, the stream ended, or it yielded an error.
pub async fn next_record<S>(
    stream: &mut S,
    deadline: Instant,
    waiting_for: &str,
) -> anyhow::Result<ConsumerRecord>
where
    S: Stream<Item = sluice_client::error::Result<ConsumerRecord>> + Unpin,
{
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, stream.next()).await {
        Err(_) => Err(anyhow!("timed out waiting for {waiting_for}")),
        Ok(None) => Err(anyhow!(
            "the consumer stopped while waiting for {waiting_for}"
        )),
        Ok(Some(record)) => record.with_context(|| format!("consuming {waiting_for}")),
    }
}

/// A deadline `seconds` from now: every wait in the examples has one, so a scenario that
/// cannot complete fails with a message instead of hanging.
pub fn deadline_in(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

/// The value of a record as text (the examples only send text).
pub fn text(record: &ConsumerRecord) -> String {
    String::from_utf8_lossy(&record.value).into_owned()
}

/// The value of header `name`, as text.
pub fn header(record: &ConsumerRecord, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(arguments: &[&str], environment: &[(&str, &str)]) -> Result<Target, Usage> {
        let environment: Vec<(String, String)> = environment
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Target::from(arguments.iter().map(|a| (*a).to_owned()), |name| {
            environment
                .iter()
                .find(|(variable, _)| variable == name)
                .map(|(_, value)| value.clone())
        })
    }

    #[test]
    fn flags_come_before_the_environment_and_the_default_last() {
        assert_eq!(
            target(&[], &[]).unwrap(),
            Target {
                broker: DEFAULT_BROKER.to_owned(),
                ca_file: None
            }
        );
        let from_environment = target(
            &[],
            &[
                ("SLUICE_BROKER", "quic://h:1"),
                ("SLUICE_CA_FILE", "/c.pem"),
            ],
        )
        .unwrap();
        assert_eq!(from_environment.broker, "quic://h:1");
        assert_eq!(from_environment.ca_file, Some(PathBuf::from("/c.pem")));
        let from_flags = target(
            &["--broker", "tcp://f:2", "--ca-file=/f.pem"],
            &[("SLUICE_BROKER", "quic://h:1")],
        )
        .unwrap();
        assert_eq!(from_flags.broker, "tcp://f:2");
        assert_eq!(from_flags.ca_file, Some(PathBuf::from("/f.pem")));
    }

    #[test]
    fn unknown_arguments_and_missing_values_are_usage_errors() {
        assert!(target(&["--colour"], &[]).is_err());
        assert!(target(&["--broker"], &[]).is_err());
        assert!(target(&["--broker="], &[]).is_err());
    }
}
