//! The broker a run talks to: one started in this process on a temporary data directory
//! (`--embedded`), or one running elsewhere (`--broker URL`). Every producer and consumer gets a
//! [`Client`] of its own, so each has its own connection, as separate processes would.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::{Client, ClientOptions, ConnectionOptions};

use super::cli::{Settings, Target, Transport};
use super::workloads::UsageError;

/// Where the embedded broker's data directory goes: `$SLUICE_BENCH_DIR` (as for the storage
/// benchmark), else the system temporary directory. It should be the disk being measured, not
/// a tmpfs.
pub fn scratch_base() -> PathBuf {
    std::env::var_os("SLUICE_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

/// A broker to benchmark.
#[derive(Debug)]
pub struct BenchBroker {
    pub url: String,
    ca_file: Option<PathBuf>,
    embedded: Option<Embedded>,
}

#[derive(Debug)]
struct Embedded {
    handle: BrokerHandle,
    /// Removed with everything in it when dropped, after the broker has stopped.
    directory: tempfile::TempDir,
}

impl BenchBroker {
    /// Starts the embedded broker, or only remembers the URL of an external one.
    ///
    /// # Errors
    /// The temporary directory cannot be made, or the broker cannot start.
    pub async fn start(settings: &Settings) -> Result<BenchBroker> {
        let fsync = match &settings.target {
            Target::External { url, ca_file } => {
                return Ok(BenchBroker {
                    url: url.clone(),
                    ca_file: ca_file.clone(),
                    embedded: None,
                });
            }
            Target::Embedded { fsync } => *fsync,
        };
        let base = scratch_base();
        let directory = tempfile::Builder::new()
            .prefix("sluice-bench-")
            .tempdir_in(&base)
            .with_context(|| format!("cannot make a data directory in {}", base.display()))?;
        let mut config = Config::on_loopback(directory.path().join("data"));
        config.storage.fsync = fsync;
        let data_dir = config.data_dir.clone();
        let handle = Broker::start(config)
            .await
            .context("cannot start the embedded broker")?;
        let (url, ca_file) = match (settings.transport, handle.quic_addr) {
            (Transport::Tcp, _) => (format!("tcp://{}", handle.tcp_addr), None),
            (Transport::Quic, Some(quic)) => (
                format!("quic://{quic}"),
                Some(data_dir.join("tls").join("cert.pem")),
            ),
            (Transport::Quic, None) => {
                handle.shutdown().await;
                anyhow::bail!("the embedded broker does not serve QUIC");
            }
        };
        Ok(BenchBroker {
            url,
            ca_file,
            embedded: Some(Embedded { handle, directory }),
        })
    }

    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// A new client, with a connection of its own.
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn client(&self) -> Result<Client> {
        let mut connection = ConnectionOptions::default();
        if let Some(ca_file) = &self.ca_file {
            connection = connection.ca_file(ca_file);
        }
        Client::connect_with(&self.url, ClientOptions::default().connection(connection))
            .await
            .map_err(|error| match error {
                // A URL that cannot be used (a quic:// one without --ca-file, say) is a
                // configuration error: exit 2.
                sluice_client::Error::InvalidUrl(message) => anyhow!(UsageError(message)),
                other => anyhow!(other),
            })
            .with_context(|| format!("cannot reach the broker at {}", self.url))
    }

    /// Stops the embedded broker and removes its data directory; nothing for an external one.
    pub async fn stop(self) {
        if let Some(embedded) = self.embedded {
            embedded.handle.shutdown().await;
            // Removing gigabytes of segments blocks: off the runtime.
            let directory = embedded.directory;
            let _ = tokio::task::spawn_blocking(move || drop(directory)).await;
        }
    }
}
