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
    let broker = match Broker::start(config).await {
        Ok(broker) => broker,
        Err(error) => {
            tracing::error!(%error, "broker failed to start");
            return ExitCode::from(1);
        }
    };
    if let Err(error) = wait_for_signal().await {
        tracing::error!(%error, "cannot listen for signals");
        broker.shutdown().await;
        return ExitCode::from(1);
    }
    tracing::info!("signal received: shutting down (send another to exit at once)");
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second signal: exiting at once");
            std::process::exit(130);
        }
    });
    broker.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
