//! What the client's integration tests share: brokers on fixed ports, for tests that restart
//! one while a client keeps reconnecting to it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_broker::{Broker, BrokerHandle, Config};

/// The broker's defaults on loopback, with the TCP listener on `tcp`.
pub fn config(data_dir: &Path, tcp: SocketAddr) -> Config {
    let mut config = Config::on_loopback(data_dir);
    config.listeners.tcp = tcp;
    config
}

/// A TCP port free now, below the kernel's ephemeral port range (as the testkit's
/// `process::free_port`). A client that keeps reconnecting to a port in that range while no
/// broker listens there can be given that very port as its own source port (a TCP
/// self-connect), which then keeps the broker from binding it again; ports below the range are
/// never handed out as source ports.
pub fn free_port_below_the_ephemeral_range() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral_low / 2);
    let span = u64::from(ephemeral_low.saturating_sub(low).max(1));
    // xorshift64, seeded from the clock and the process id.
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5eed, |elapsed| elapsed.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32)
        | 1;
    for _ in 0..1000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = low + (state % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {low} and {ephemeral_low}")
}

/// How long a broker start on a fixed port keeps retrying: another process may hold the port
/// for a moment.
const START_RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// Starts a broker on a port below the ephemeral range; a port taken between the probe and the
/// broker's bind is given up for another.
pub async fn start_on_a_fixed_port(data_dir: &Path) -> BrokerHandle {
    let deadline = Instant::now() + START_RETRY_DEADLINE;
    loop {
        let tcp = SocketAddr::from(([127, 0, 0, 1], free_port_below_the_ephemeral_range()));
        match Broker::start(config(data_dir, tcp)).await {
            Ok(broker) => return broker,
            Err(error) if Instant::now() < deadline => {
                eprintln!("broker start on {tcp} failed, trying another port: {error}");
            }
            Err(error) => panic!("the broker did not start: {error}"),
        }
    }
}

/// Starts a broker again on the same data directory and TCP port, retrying until a deadline:
/// something else may hold the port for a moment.
pub async fn restart(data_dir: &Path, tcp: SocketAddr) -> BrokerHandle {
    let deadline = Instant::now() + START_RETRY_DEADLINE;
    loop {
        match Broker::start(config(data_dir, tcp)).await {
            Ok(broker) => return broker,
            Err(error) if Instant::now() < deadline => {
                eprintln!("broker restart on {tcp} failed, retrying: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the broker did not restart on {tcp}: {error}"),
        }
    }
}
