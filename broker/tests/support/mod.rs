//! What broker tests share, the hostile-client, load and slow-consumer tests most: a broker
//! on ephemeral ports, raw TCP and QUIC clients for sending what no client would, the
//! process's resource use, and the switch between the short (CI) and long versions (the
//! testkit's `scale`).
//!
//! The broker runs in-process, so the resources measured are the test process's: its RSS
//! (`VmRSS` of `/proc/self/status`) and its open file descriptors (`/proc/self/fd`). The tests
//! of one binary take [`serial`] so that no other test's sockets are counted.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::{Connection, ConnectionOptions};
use sluice_protocol::messages::*;
use sluice_protocol::{ErrorCode, RecordBatchBuilder, Request, Response};
use sluice_testkit::Rng;

/// One test at a time per binary: the resource checks count the whole process. Async tests
/// hold `SERIAL.lock().await`, others `SERIAL.blocking_lock()`.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn start(config: Config) -> BrokerHandle {
    Broker::start(config).await.expect("broker starts")
}

pub fn tcp_url(broker: &BrokerHandle) -> String {
    format!("tcp://{}", broker.tcp_addr)
}

pub fn quic_url(broker: &BrokerHandle) -> String {
    format!("quic://{}", broker.quic_addr.expect("QUIC is served"))
}

/// Client options trusting the broker's self-signed certificate (for QUIC).
pub fn quic_options(data_dir: &Path) -> ConnectionOptions {
    ConnectionOptions::default().ca_file(certificate(data_dir))
}

pub fn certificate(data_dir: &Path) -> PathBuf {
    sluice_broker::tls::self_signed_certificate_path(data_dir)
}

/// The test process's resident memory and open file descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Resources {
    pub fn now() -> Resources {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in /proc/self/status");
        let fds = std::fs::read_dir("/proc/self/fd")
            .expect("list /proc/self/fd")
            .count();
        Resources { rss_kib, fds }
    }
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB, {} fds",
            self.rss_kib as f64 / 1024.0,
            self.fds
        )
    }
}

/// Open client connections the broker counts (TCP and QUIC).
pub fn open_connections(broker: &BrokerHandle) -> usize {
    let state = broker.state();
    state.config.limits.max_connections - state.connection_slots.available_permits()
}

/// Waits until the broker has closed all but `expected` connections.
pub async fn wait_for_connections(broker: &BrokerHandle, expected: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while open_connections(broker) > expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections still open, expected {expected}",
            open_connections(broker)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the process's file descriptors are back within `margin` of `baseline`, and
/// returns the count; fails after `within`.
pub async fn wait_for_fds(baseline: usize, margin: usize, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let fds = Resources::now().fds;
        if fds <= baseline + margin {
            return fds;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "file descriptors did not come back: {fds} open, {baseline} before (margin {margin})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `length` random bytes.
pub fn noise_bytes(rng: &mut Rng, length: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(length + 8);
    while out.len() < length {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(length);
    out
}

/// `total` bytes of frames with believable lengths (10 to 2 KiB), a random api key (known ones
/// and some that are not) and version, and random bodies.
pub fn noise_frames(rng: &mut Rng, total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total + 2048);
    while out.len() < total {
        let body = rng.below(2048) as usize;
        let length = 10 + body;
        out.extend_from_slice(&(length as u32).to_be_bytes());
        out.extend_from_slice(&(rng.below(24) as u16).to_be_bytes());
        out.extend_from_slice(&(rng.below(2) as u16).to_be_bytes());
        out.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&noise_bytes(rng, body));
    }
    out
}

/// A batch of `count` records of `value_bytes` each.
pub fn batch(count: usize, value_bytes: usize) -> Bytes {
    let mut builder = RecordBatchBuilder::new();
    let value = vec![b'v'; value_bytes];
    for index in 0..count {
        builder.append(1_700_000_000_000 + index as i64, None, &value, &[]);
    }
    builder.build().into_bytes()
}

pub async fn create_topic(connection: &Connection, name: &str, partitions: u32) {
    let response = connection
        .send(CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: name.into(),
                partitions,
                configs: vec![],
            }],
            validate_only: false,
        })
        .await
        .expect("create topics");
    let Response::CreateTopics(response) = response else {
        panic!("wrong response {response:?}")
    };
    assert_eq!(
        response.results[0].error_code,
        ErrorCode::None,
        "{response:?}"
    );
}

/// Deletes a topic, asserting the broker did.
pub async fn delete_topic(connection: &Connection, name: &str) {
    let response = connection
        .send(DeleteTopicsRequest {
            names: vec![name.into()],
        })
        .await
        .expect("delete topics");
    let Response::DeleteTopics(response) = response else {
        panic!("wrong response {response:?}")
    };
    assert_eq!(
        response.results[0].error_code,
        ErrorCode::None,
        "{response:?}"
    );
}

pub fn produce_request(topic: &str, partition: u32, records: Bytes, acks: Acks) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition { partition, records }],
        }],
    }
}

pub fn fetch_request(
    topic: &str,
    partition: u32,
    offset: u64,
    max_wait_ms: u32,
    max_bytes: u32,
) -> FetchRequest {
    FetchRequest {
        max_wait_ms,
        min_bytes: 1,
        max_bytes,
        topics: vec![FetchTopic {
            name: topic.into(),
            partitions: vec![FetchPartition {
                partition,
                fetch_offset: offset,
                partition_max_bytes: max_bytes,
            }],
        }],
    }
}

/// One partition's produce result.
pub async fn produce(
    connection: &Connection,
    topic: &str,
    partition: u32,
    records: Bytes,
) -> sluice_client::error::Result<ProducePartitionResponse> {
    let response = connection
        .send(produce_request(topic, partition, records, Acks::Leader))
        .await?;
    let Response::Produce(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    Ok(response.topics.remove(0).partitions.remove(0))
}

/// One partition's fetch result.
pub async fn fetch(
    connection: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
) -> sluice_client::error::Result<FetchPartitionResponse> {
    let response = connection
        .send(fetch_request(topic, partition, offset, 0, max_bytes))
        .await?;
    let Response::Fetch(mut response) = response else {
        panic!("wrong response {response:?}")
    };
    Ok(response.topics.remove(0).partitions.remove(0))
}

/// A well-behaved client is served: it produces a record and fetches it back.
pub async fn served_normally(connection: &Connection, topic: &str) {
    let produced = produce(connection, topic, 0, batch(1, 10))
        .await
        .expect("produce");
    assert_eq!(produced.error_code, ErrorCode::None);
    let fetched = fetch(connection, topic, 0, produced.base_offset, 1 << 20)
        .await
        .expect("fetch");
    assert_eq!(fetched.error_code, ErrorCode::None);
    assert!(!fetched.records.is_empty(), "the record just produced");
}

pub fn frame(correlation_id: u32, request: impl Into<Request>) -> BytesMut {
    let mut out = BytesMut::new();
    request.into().encode_frame(correlation_id, &mut out);
    out
}

/// A QUIC endpoint for raw connections to the broker, trusting its self-signed certificate.
pub struct RawQuic {
    pub endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    broker: std::net::SocketAddr,
}

impl RawQuic {
    pub fn new(broker: &BrokerHandle, data_dir: &Path) -> RawQuic {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(certificate(data_dir)).expect("the broker wrote its certificate");
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"sluice/1".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        RawQuic {
            endpoint,
            client_config,
            broker: broker.quic_addr.expect("QUIC is served"),
        }
    }

    /// A new connection (handshake done).
    pub async fn connect(&self) -> Result<quinn::Connection, String> {
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), self.broker, "127.0.0.1")
            .map_err(|error| error.to_string())?;
        connecting.await.map_err(|error| error.to_string())
    }

    /// Closes the endpoint once the broker has closed every connection but the two healthy
    /// clients'. Until then the endpoint answers the broker's keep-alives to connections it
    /// closed (a stateless reset), so a connection whose closing packet was lost (bursts of
    /// QUIC traffic overflow UDP receive buffers) ends within the keep-alive interval (10 s)
    /// instead of at the idle timeout (30 s).
    pub async fn close_after(self, broker: &BrokerHandle) {
        wait_for_connections(broker, 2, Duration::from_secs(60)).await;
        self.close().await;
    }

    /// Closes the endpoint and waits until its connections are gone.
    pub async fn close(self) {
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.endpoint.wait_idle()).await;
    }
}

/// Reads response frames until the stream ends; checks each is a whole, well-formed response
/// and returns their correlation ids and error codes.
pub fn parse_responses(bytes: &[u8]) -> Vec<(u32, ErrorCode)> {
    let mut responses = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "a torn length prefix: {rest:?}");
        let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(
            length >= 6 && rest.len() >= 4 + length,
            "a torn response frame ({length} bytes claimed, {} there)",
            rest.len() - 4
        );
        let (header, _) =
            sluice_protocol::decode_response_header(Bytes::copy_from_slice(&rest[4..4 + length]))
                .expect("a response header");
        responses.push((header.correlation_id, header.error_code));
        rest = &rest[4 + length..];
    }
    responses
}
