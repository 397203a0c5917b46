//! `sluice-broker`: the broker binary.
//!
//! A placeholder until the broker issue lands: it accepts DESIGN.md's flags (so scripts and the
//! README's command keep working), reports the configuration it would serve with, and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The Sluice message broker.
#[derive(Debug, Parser)]
#[command(name = "sluice-broker", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Directory holding topics, offsets and certificates.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    data_dir: PathBuf,
    /// TCP listen address.
    #[arg(long, env = "SLUICE_TCP", default_value = "127.0.0.1:7171")]
    tcp: String,
    /// QUIC (UDP) listen address.
    #[arg(long, env = "SLUICE_QUIC", default_value = "127.0.0.1:7171")]
    quic: String,
    /// HTTP admin listen address (/livez, /readyz, /metrics).
    #[arg(long, env = "SLUICE_HTTP", default_value = "127.0.0.1:7172")]
    http: String,
    /// Background fsync policy for data written with weaker acks than durable:
    /// always | interval:MS | never.
    #[arg(long, env = "SLUICE_FSYNC", default_value = "interval:1000")]
    fsync: String,
    /// Log format: text | json.
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            // clap exits 0 for --help/--version and 2 for usage errors, as DESIGN.md asks.
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    eprintln!(
        "sluice-broker {}: placeholder build, no listeners yet (the broker lands with issue 4); \
         configured data dir {}, tcp {}, quic {}, http {}, fsync {}, log format {}{}",
        env!("CARGO_PKG_VERSION"),
        args.data_dir.display(),
        args.tcp,
        args.quic,
        args.http,
        args.fsync,
        args.log_format,
        args.config
            .map(|path| format!(", config {}", path.display()))
            .unwrap_or_default(),
    );
    ExitCode::SUCCESS
}
