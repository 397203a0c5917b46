//! The broker binary as a child process: started on a data directory and a fixed port,
//! SIGKILLed, and started again on the same directory and port.
//!
//! The port is chosen below the kernel's ephemeral range. A client that keeps reconnecting to a
//! port in that range while nothing listens there can be given that very port as its own source
//! port (a TCP self-connect), which then keeps the broker from binding it again.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Lines of the broker's stderr kept for a failure message.
const TAIL_LINES: usize = 200;
/// How long a start may take, recovery included.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the broker's log said, across every run of one [`BrokerProcess`].
#[derive(Debug, Default)]
pub struct BrokerLog {
    /// The last [`TAIL_LINES`] lines.
    tail: Mutex<VecDeque<String>>,
    /// Lines saying a partition refuses writes (corruption or a failed fsync).
    refusals: AtomicU64,
    /// Lines at ERROR level.
    errors: AtomicU64,
}

impl BrokerLog {
    fn record(&self, line: &str) {
        if line.contains("refuses writes") {
            self.refusals.fetch_add(1, Ordering::Relaxed);
        }
        if line.contains("ERROR") {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut tail = self.tail.lock().expect("broker log lock poisoned");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }

    /// Lines saying a partition refuses writes.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Lines logged at ERROR level.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The last lines, for a failure message.
    pub fn tail(&self) -> String {
        let tail = self.tail.lock().expect("broker log lock poisoned");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A broker child process. Dropping it kills the process.
#[derive(Debug)]
pub struct BrokerProcess {
    binary: PathBuf,
    data_dir: PathBuf,
    port: u16,
    environment: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<BrokerLog>,
    starts: u64,
}

impl BrokerProcess {
    /// Starts `binary` on `data_dir` and a free port below the ephemeral range, with extra
    /// environment variables (`SLUICE_...` configuration), and waits until it serves.
    ///
    /// # Errors
    /// The process could not start or did not log its address in time.
    pub fn start(
        binary: &Path,
        data_dir: &Path,
        environment: &[(&str, &str)],
    ) -> anyhow::Result<BrokerProcess> {
        let mut broker = BrokerProcess {
            binary: binary.to_owned(),
            data_dir: data_dir.to_owned(),
            port: free_port()?,
            environment: environment
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            child: None,
            log: Arc::default(),
            starts: 0,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// `tcp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What the broker logged so far, over all its runs.
    pub fn log(&self) -> &Arc<BrokerLog> {
        &self.log
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u64 {
        self.starts
    }

    /// SIGKILLs the process (no shutdown, no final fsync or checkpoint) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process if it runs, and starts it again on the same directory and port.
    ///
    /// # Errors
    /// As [`BrokerProcess::start`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        // A port in TIME_WAIT binds again (the listener sets SO_REUSEADDR); a few retries cover
        // a port another process took meanwhile only briefly.
        loop {
            match self.spawn_once() {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() < deadline => {
                    eprintln!("broker start failed, retrying: {error:#}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn spawn_once(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        // The test's own environment (SLUICE_RELIABILITY_LONG, RUST_LOG) must not reach the
        // broker's configuration: an unknown SLUICE_ variable is a configuration error.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SLUICE_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
            .env("SLUICE_LOGGING_FILTER", "info")
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .arg("--tcp")
            .arg(format!("127.0.0.1:{}", self.port))
            .args([
                "--http",
                "127.0.0.1:0",
                "--quic",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {}", self.binary.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (started, receiver) = mpsc::channel();
        let log = Arc::clone(&self.log);
        // Drains stderr for the life of the process: a full pipe would block the broker.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.record(&line);
                if line.contains("broker started") {
                    let _ = started.send(());
                }
            }
        });
        match receiver.recv_timeout(START_TIMEOUT) {
            Ok(()) => {
                self.child = Some(child);
                self.starts += 1;
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!(
                    "the broker did not start (exit {status:?}); its log:\n{}",
                    self.log.tail()
                )
            }
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port that is free now, below the kernel's ephemeral port range.
///
/// # Errors
/// None found after many tries.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_low / 2);
    let span = u64::from(ephemeral_low.saturating_sub(low).max(1));
    // Not from the workload seed alone: two tests of one process reproducing a failure with
    // the same SLUICE_RELIABILITY_SEED would probe the same ports in the same order.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let mut rng = crate::Rng::new(
        u64::from(std::process::id()) << 32
            ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(clock),
    );
    for _ in 0..1000 {
        let port = low + rng.below(span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {low} and {ephemeral_low}")
}
