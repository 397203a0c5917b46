//! A consumer-group member meant to run as a child process the churn test can SIGKILL.
//!
//! A test binary starts itself again as a member (Cargo builds no binaries of a dev-only crate
//! for another package's tests): the test spawns `current_exe()` with a filter naming one
//! `#[test]` function, and the member's arguments in [`ARGUMENTS_VARIABLE`]; that function calls
//! [`run_if_asked`], which runs the member and exits. Arguments, one word each:
//!
//! ```text
//! --broker tcp://127.0.0.1:PORT --group G --topic T --log FILE
//! [--session-timeout-ms 3000] [--commit-every-ms 200]
//! ```
//!
//! Every record is *processed* by appending one line to the log file, written straight to the
//! file (no user-space buffer) before the next record is asked for, so a line survives a
//! SIGKILL whenever its offset could have been committed:
//!
//! ```text
//! record <partition> <offset> <value>
//! commit-error <error>                      a periodic commit failed
//! stream-error <error>                      the stream reported an error (CRC, decode, ...)
//! stall-commit refused <code> | accepted <partitions> | error <error>
//! ```
//!
//! Commands on standard input, one a line:
//! - `stall <ms>`: after the next record, freeze the member for `ms` milliseconds (the whole
//!   runtime stops: no heartbeat, no fetch, as in a long GC pause or a SIGSTOP), then commit
//!   at once, before any heartbeat can tell the member it was expired, and log the answer.
//!
//! The runtime is single-threaded so that the stall stops everything the member does.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sluice_client::{Client, CommitMode, Consumer, Error};

#[derive(Debug)]
struct Arguments {
    broker: String,
    group: String,
    topic: String,
    log: String,
    session_timeout: Duration,
    commit_every: Duration,
}

/// The environment variable holding a member's arguments, separated by newlines.
pub const ARGUMENTS_VARIABLE: &str = "SLUICE_TESTKIT_MEMBER";

/// When this process was started as a member ([`ARGUMENTS_VARIABLE`] is set), runs the member
/// and exits the process; otherwise returns at once.
pub fn run_if_asked() {
    let Some(arguments) = std::env::var_os(ARGUMENTS_VARIABLE) else {
        return;
    };
    let arguments: Vec<String> = arguments
        .to_string_lossy()
        .lines()
        .map(str::to_owned)
        .collect();
    match run_process(arguments) {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("member failed: {error:#}");
            std::process::exit(1);
        }
    }
}

/// [`ARGUMENTS_VARIABLE`]'s value for these arguments.
pub fn encode_arguments(arguments: &[String]) -> String {
    arguments.join("\n")
}

fn parse_arguments(words: Vec<String>) -> anyhow::Result<Arguments> {
    let mut arguments = Arguments {
        broker: String::new(),
        group: String::new(),
        topic: String::new(),
        log: String::new(),
        session_timeout: Duration::from_secs(3),
        commit_every: Duration::from_millis(200),
    };
    let mut words = words.into_iter();
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let millis = || -> anyhow::Result<Duration> {
            Ok(Duration::from_millis(
                value.parse().with_context(|| format!("{flag} {value}"))?,
            ))
        };
        match flag.as_str() {
            "--broker" => arguments.broker = value.clone(),
            "--group" => arguments.group = value.clone(),
            "--topic" => arguments.topic = value.clone(),
            "--log" => arguments.log = value.clone(),
            "--session-timeout-ms" => arguments.session_timeout = millis()?,
            "--commit-every-ms" => arguments.commit_every = millis()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if [
        &arguments.broker,
        &arguments.group,
        &arguments.topic,
        &arguments.log,
    ]
    .iter()
    .any(|value| value.is_empty())
    {
        bail!("--broker, --group, --topic and --log are required");
    }
    Ok(arguments)
}

/// Runs the member until its stream ends (or the process is killed).
///
/// # Errors
/// Bad arguments, a log file that cannot be written, a consumer that cannot start.
pub fn run_process(arguments: Vec<String>) -> anyhow::Result<()> {
    let arguments = parse_arguments(arguments)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(arguments))
}

/// Freezes for `duration` (past the session timeout, as a stopped process would), then commits
/// what it holds and logs the outcome as `stall-commit ...`.
async fn stall_and_commit(
    consumer: &mut Consumer,
    log: &mut File,
    duration: Duration,
) -> anyhow::Result<()> {
    // Blocks the only runtime thread: nothing of the member runs meanwhile.
    std::thread::sleep(duration);
    let outcome = match consumer.commit().await {
        Ok(partitions) => format!("accepted {partitions}"),
        Err(Error::Broker { code, .. }) => format!("refused {code:?}"),
        Err(error) => format!("error {error}"),
    };
    log_line(log, &format!("stall-commit {outcome}"))
}

/// Appends one line to the log, straight to the file.
fn log_line(log: &mut File, line: &str) -> anyhow::Result<()> {
    log.write_all(format!("{line}\n").as_bytes())
        .context("write the member log")
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&arguments.log)
        .with_context(|| format!("open {}", arguments.log))?;
    // Standard input on a thread of its own: reading it blocks. It ends with the test.
    let (commands, mut command_receiver) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if commands.send(line).is_err() {
                break;
            }
        }
    });
    let options = crate::restart_tolerant_client_options();
    let client = loop {
        match Client::connect_with(&arguments.broker, options.clone()).await {
            Ok(client) => break client,
            // The broker may be restarting.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut consumer = client
        .consumer()
        .group(arguments.group.clone())
        .topics([arguments.topic.clone()])
        .session_timeout(arguments.session_timeout)
        .commit_mode(CommitMode::Manual)
        .fetch_max_wait(Duration::from_millis(100))
        .build()
        .await?;
    let mut stall: Option<Duration> = None;
    let mut commands_open = true;
    let mut last_commit = Instant::now();
    let mut uncommitted = false;
    loop {
        tokio::select! {
            command = command_receiver.recv(), if commands_open => match command {
                Some(command) => {
                    let milliseconds = command
                        .strip_prefix("stall ")
                        .and_then(|ms| ms.trim().parse::<u64>().ok())
                        .with_context(|| format!("unknown command {command:?}"))?;
                    let duration = Duration::from_millis(milliseconds);
                    if uncommitted {
                        // Holding records it has not committed: freeze now.
                        stall_and_commit(&mut consumer, &mut log, duration).await?;
                        uncommitted = false;
                        last_commit = Instant::now();
                    } else {
                        // Freeze on the next record, so there is something to commit.
                        stall = Some(duration);
                    }
                }
                None => commands_open = false,
            },
            record = consumer.next() => match record {
                Some(Ok(record)) => {
                    let value = String::from_utf8_lossy(&record.value);
                    log_line(
                        &mut log,
                        &format!("record {} {} {value}", record.partition, record.offset),
                    )?;
                    uncommitted = true;
                    if let Some(duration) = stall.take() {
                        stall_and_commit(&mut consumer, &mut log, duration).await?;
                        uncommitted = false;
                        last_commit = Instant::now();
                    }
                }
                Some(Err(error)) => log_line(&mut log, &format!("stream-error {error}"))?,
                None => return Ok(()),
            },
            () = tokio::time::sleep(arguments.commit_every) => {}
        }
        if uncommitted && last_commit.elapsed() >= arguments.commit_every {
            if let Err(error) = consumer.commit().await {
                log_line(&mut log, &format!("commit-error {error}"))?;
            }
            uncommitted = false;
            last_commit = Instant::now();
        }
    }
}
