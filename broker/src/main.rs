//! `sluice-broker`: flags, environment and file → `Config` → `Broker::start`; signals.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the broker cannot start or fails, 2 for a bad
//! flag or configuration (one line on stderr naming the option).

use std::process::ExitCode;

use clap::Parser;
use sluice_broker::Broker;
use sluice_broker::config::{self, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // clap's --help and --version are not errors.
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match config::load(&cli, config::process_environment()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sluice-broker: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = config::init_tracing(&config.logging) {
        eprintln!("sluice-broker: {error}");
        return ExitCode::from(2);
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice-broker: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: sluice_broker::Config) -> ExitCode {
    // Listen for signals before anything else: a SIGTERM that arrives while the broker starts
    // must shut it down cleanly, not kill it with the default action.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot listen for signals");
            eprintln!("sluice-broker: cannot listen for signals: {error}");
            return ExitCode::from(1);
        }
    };
    let broker = match Broker::start(config).await {
        Ok(broker) => broker,
        Err(error) => {
            tracing::error!(%error, "broker failed to start");
            // Also as the one line a script reads, whatever the log filter or format.
            eprintln!("sluice-broker: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    signals.next().await;
    tracing::info!("signal received: shutting down (send another to exit at once)");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second signal: exiting at once");
        eprintln!("sluice-broker: exited at once on a second signal; unsynced writes may be lost");
        std::process::exit(1);
    });
    match broker.shutdown_reporting().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice-broker: {error}");
            ExitCode::from(1)
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every partition keeps its active
/// segment open, and closed segments go through a bounded cache, so the broker needs more
/// descriptors than the usual soft default of 1024 but never an unbounded number.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own and pass by valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let previous = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the rlimit struct we own; raising the soft limit up to the hard
    // limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::info!(
            from = previous,
            to = limit.rlim_max,
            "raised the open-file limit"
        );
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
    }
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
