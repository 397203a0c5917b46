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
            return ExitCode::from(1);
        }
    };
    let broker = match Broker::start(config).await {
        Ok(broker) => broker,
        Err(error) => {
            tracing::error!(%error, "broker failed to start");
            return ExitCode::from(1);
        }
    };
    signals.next().await;
    tracing::info!("signal received: shutting down (send another to exit at once)");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    broker.shutdown().await;
    ExitCode::SUCCESS
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
