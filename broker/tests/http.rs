//! The HTTP admin port of a real broker: `/livez`, `/readyz`, `/metrics`, fetched with
//! hand-written HTTP/1.1 over a `TcpStream`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::Connection;
use sluice_protocol::messages::*;
use sluice_protocol::{ErrorCode, RecordBatchBuilder, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

/// Every wait in these tests is for a condition, bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start(data_dir: &Path) -> (BrokerHandle, SocketAddr) {
    let broker = Broker::start(Config::on_loopback(data_dir))
        .await
        .expect("broker starts");
    let http_addr = broker.http_addr.expect("the admin port is served");
    assert_ne!(http_addr.port(), 0);
    (broker, http_addr)
}

/// An HTTP answer: status, headers (lower-case names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// `GET path` over a fresh connection, HTTP/1.1 by hand, read to the end.
async fn get(address: SocketAddr, path: &str) -> Answer {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().expect("a status code");
    let headers: BTreeMap<String, String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("name: value");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        if let Some(length) = headers.get("content-length") {
            assert_eq!(body.len(), length.parse::<usize>().unwrap());
        }
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = rest[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after a chunk");
    }
}

/// One sample of an exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Suffixes a sample name may add to its family's name.
const SAMPLE_SUFFIXES: [&str; 5] = ["_total", "_bucket", "_count", "_sum", "_created"];

/// Checks the text exposition format line by line and returns its samples: every line is a
/// comment (`# HELP`, `# TYPE`, `# UNIT`, the final `# EOF`) or `name{labels} value` with a
/// float value, and every sample belongs to a family declared by an earlier `# TYPE`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.first().copied() {
                Some("TYPE") => {
                    assert_eq!(words.len(), 3, "{line}");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "unknown"
                        ]
                        .contains(&words[2]),
                        "{line}"
                    );
                    let fresh = families.insert(words[1].to_owned(), words[2].to_owned());
                    assert!(fresh.is_none(), "family declared twice: {line}");
                }
                Some("HELP" | "UNIT") => assert!(words.len() >= 2, "{line}"),
                Some("EOF") => assert_eq!(index, lines.len() - 1, "# EOF is the last line"),
                _ => panic!("unexpected comment: {line}"),
            }
            continue;
        }
        let sample = parse_sample(line);
        let family = std::iter::once(sample.name.as_str())
            .chain(
                SAMPLE_SUFFIXES
                    .iter()
                    .filter_map(|suffix| sample.name.strip_suffix(suffix)),
            )
            .find(|name| families.contains_key(*name));
        assert!(family.is_some(), "sample without a # TYPE: {line}");
        samples.push(sample);
    }
    assert!(!samples.is_empty());
    samples
}

fn is_name_character(character: char, first: bool) -> bool {
    character.is_ascii_alphabetic()
        || character == '_'
        || character == ':'
        || (!first && character.is_ascii_digit())
}

fn parse_sample(line: &str) -> Sample {
    let bytes = line.as_bytes();
    let name_end = line
        .char_indices()
        .find(|(index, character)| !is_name_character(*character, *index == 0))
        .map_or(line.len(), |(index, _)| index);
    assert!(name_end > 0, "no metric name: {line}");
    let mut at = name_end;
    let mut labels = BTreeMap::new();
    if bytes.get(at) == Some(&b'{') {
        at += 1;
        while bytes.get(at) != Some(&b'}') {
            let equals = at + line[at..].find('=').expect("label=");
            let label = &line[at..equals];
            assert!(
                !label.is_empty()
                    && label
                        .char_indices()
                        .all(|(index, character)| is_name_character(character, index == 0)),
                "bad label name {label:?}: {line}"
            );
            assert_eq!(bytes.get(equals + 1), Some(&b'"'), "quoted value: {line}");
            at = equals + 2;
            // The value, with \\, \" and \n escapes.
            let mut value = String::new();
            loop {
                let character = line[at..].chars().next().expect("unterminated value");
                at += character.len_utf8();
                match character {
                    '"' => break,
                    '\\' => {
                        let escaped = line[at..].chars().next().expect("an escape");
                        at += escaped.len_utf8();
                        value.push(match escaped {
                            'n' => '\n',
                            '\\' | '"' => escaped,
                            other => panic!("bad escape \\{other}: {line}"),
                        });
                    }
                    other => value.push(other),
                }
            }
            labels.insert(label.to_owned(), value);
            match bytes.get(at) {
                Some(b',') => at += 1,
                Some(b'}') => {}
                other => panic!("expected , or }} after a label, got {other:?}: {line}"),
            }
        }
        at += 1;
    }
    let value = line[at..]
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("a space before the value: {line}"));
    let float = |text: &str| match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{number:?} is not a float: {line}")),
    };
    // The value, and optionally a timestamp; nothing else.
    let words: Vec<&str> = value.split(' ').collect();
    assert!(words.len() <= 2, "trailing text after the value: {line}");
    if let Some(timestamp) = words.get(1) {
        float(timestamp);
    }
    let value = float(words[0]);
    Sample {
        name: line[..name_end].to_owned(),
        labels,
        value,
    }
}

#[test]
fn the_exposition_checker_refuses_what_is_not_the_text_format() {
    let good = "# HELP a_total A.\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\n# EOF\n";
    let samples = parse_exposition(good);
    assert_eq!(samples[0].labels["y"], "q\"uote");
    assert_eq!(samples[0].value, 3.0);
    for bad in [
        "# TYPE a counter\na_total 1 2 3x\n",
        "# TYPE a counter\na_total{x=\"1\" 1\n",
        "b 1\n",
        "# TYPE a counter\na_total one\n",
        "# EOF\n# TYPE a counter\na_total 1\n",
    ] {
        let result = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(result.is_err(), "accepted {bad:?}");
    }
}

/// The value of the sample with this name and these labels (a subset match).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(value))
        })
        .map(|sample| sample.value)
}

fn batch(values: &[&str]) -> bytes::Bytes {
    let mut builder = RecordBatchBuilder::new();
    for (index, value) in values.iter().enumerate() {
        builder.append(
            1_700_000_000_000 + index as i64,
            None,
            value.as_bytes(),
            &[],
        );
    }
    builder.build().into_bytes()
}

/// Produces one batch of `values` with `acks=leader`, checking it was taken.
async fn produce_values(connection: &Connection, topic: &str, partition: u32, values: &[&str]) {
    let produced = support::produce(connection, topic, partition, batch(values))
        .await
        .expect("produce");
    assert_eq!(produced.error_code, ErrorCode::None);
}

/// The value of one unlabelled metric, scraped now.
async fn scrape(http: SocketAddr, name: &str) -> f64 {
    let answer = get(http, "/metrics").await;
    value(&parse_exposition(&answer.body), name, &[])
        .unwrap_or_else(|| panic!("{name} missing:\n{}", answer.body))
}

/// Recovery's fsyncs at start (each partition's scanned files) count in `sluice_fsyncs_total`,
/// before any request has made the broker sync anything.
#[tokio::test]
async fn recovery_fsyncs_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = start(dir.path()).await;
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    support::create_topic(&connection, "t", 3).await;
    produce_values(&connection, "t", 0, &["a", "b"]).await;
    connection.close().await;
    broker.shutdown().await;

    let (broker, http) = start(dir.path()).await;
    let fsyncs = scrape(http, "sluice_fsyncs_total").await;
    // At least one per partition of t, whose active segments recovery scanned.
    assert!(
        fsyncs >= 3.0,
        "sluice_fsyncs_total {fsyncs} after a restart"
    );
    broker.shutdown().await;
}

/// A fetch that returned records reads the connection's likely next fetch ahead: the next
/// fetch is answered from it, and one nobody asks for gives its fetch budget back on its own,
/// with the connection still open.
#[tokio::test]
async fn fetches_read_ahead_and_an_unclaimed_read_gives_its_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    // Long enough that a slow test machine still asks in time, short enough to wait out.
    config.limits.fetch_read_ahead_ms = 5_000;
    let broker = Broker::start(config).await.expect("broker starts");
    let http = broker.http_addr.expect("the admin port is served");
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    support::create_topic(&connection, "t", 1).await;
    for values in [["a", "b"], ["c", "d"], ["e", "f"]] {
        produce_values(&connection, "t", 0, &values).await;
    }
    // One whole batch per fetch (limits of one byte), and where it ends.
    let fetch = |offset: u64| {
        let connection = connection.clone();
        async move {
            let partition = support::fetch(&connection, "t", 0, offset, 1)
                .await
                .expect("fetch");
            assert_eq!(partition.error_code, ErrorCode::None);
            sluice_protocol::batch::split_batches(&partition.records)
                .map(|batch| batch.unwrap().last_offset() + 1)
                .last()
                .expect("a batch")
        }
    };
    let answered = "sluice_fetch_read_ahead_answers_total";
    let in_use = "sluice_fetch_response_budget_in_use_bytes";
    assert_eq!(fetch(0).await, 2);
    assert_eq!(scrape(http, answered).await, 0.0);
    assert_eq!(fetch(2).await, 4, "the fetch read ahead, answered");
    assert_eq!(scrape(http, answered).await, 1.0);
    // A seek elsewhere is read for itself.
    assert_eq!(fetch(0).await, 2);
    assert_eq!(scrape(http, answered).await, 1.0);
    // The read ahead from 2 holds its budget until it gives it back unasked.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while scrape(http, in_use).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an unclaimed read ahead kept its fetch budget"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Given back, it is not answered from either: the fetch reads for itself.
    assert_eq!(fetch(2).await, 4);
    assert_eq!(scrape(http, answered).await, 1.0);
    connection.close().await;
    broker.shutdown().await;
}

/// A long poll that found too little is not read again at every append: the bytes appended
/// since are counted, and it reads again once they may make up its `min_bytes`.
#[tokio::test]
async fn a_long_poll_reads_again_only_once_enough_may_have_been_appended() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    // No read ahead after the answer: every read counted is the long poll's.
    config.limits.fetch_read_ahead_ms = 0;
    let broker = Broker::start(config).await.expect("broker starts");
    let http = broker.http_addr.expect("the admin port is served");
    let url = format!("tcp://{}", broker.tcp_addr);
    let connection = Connection::connect(&url).await.unwrap();
    let poller = Connection::connect(&url).await.unwrap();
    support::create_topic(&connection, "t", 1).await;
    let reads = "sluice_fetch_reads_total";
    let before = scrape(http, reads).await;
    let mut request = support::fetch_request("t", 0, 0, 20_000, 1 << 20);
    request.min_bytes = 64 * 1024;
    let long_poll = tokio::spawn(async move { poller.send(request).await });
    // Its first read, which finds nothing.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while scrape(http, reads).await < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetch never read"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Forty small batches, about 8 KB in all: each wakes the poll, none makes its 64 KiB.
    let small = "s".repeat(100);
    for _ in 0..40 {
        produce_values(&connection, "t", 0, &[small.as_str()]).await;
    }
    assert!(
        !long_poll.is_finished(),
        "answered with less than min_bytes"
    );
    let big = "b".repeat(64 * 1024);
    produce_values(&connection, "t", 0, &[big.as_str()]).await;
    let answer = tokio::time::timeout(DEADLINE, long_poll)
        .await
        .expect("answered once min_bytes was there")
        .unwrap()
        .expect("fetch");
    let Response::Fetch(mut answer) = answer else {
        panic!("wrong response {answer:?}")
    };
    let partition = answer.topics.remove(0).partitions.remove(0);
    assert_eq!(partition.error_code, ErrorCode::None);
    let last = sluice_protocol::batch::split_batches(&partition.records)
        .map(|batch| batch.unwrap().last_offset())
        .last();
    assert_eq!(last, Some(40), "every batch in the answer");
    // The first read, and one once the big batch came: not one per small batch.
    let read = scrape(http, reads).await - before;
    assert!(read <= 3.0, "{read} reads for one long poll");
    connection.close().await;
    broker.shutdown().await;
}

/// A connection cut off for stalling mid-frame got an answer (`RequestTimedOut`), so it is
/// counted among the answered requests like any other.
#[tokio::test]
async fn a_frame_cut_off_for_stalling_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::on_loopback(dir.path());
    config.limits.frame_read_timeout_ms = 200;
    let broker = Broker::start(config).await.expect("broker starts");
    let http = broker.http_addr.expect("the admin port is served");
    let mut stalled = TcpStream::connect(broker.tcp_addr).await.unwrap();
    // Half of a frame's length prefix and header: then nothing.
    stalled.write_all(&[0, 0, 0, 40, 0, 18]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut answer))
        .await
        .expect("cut off in time")
        .unwrap();
    assert!(!answer.is_empty(), "answered before the close");
    let metrics = get(http, "/metrics").await;
    let samples = parse_exposition(&metrics.body);
    assert_eq!(
        value(
            &samples,
            "sluice_requests_total",
            &[("api", "unknown"), ("code", "request_timed_out")]
        ),
        Some(1.0),
        "{}",
        metrics.body
    );
    broker.shutdown().await;
}

/// Connections that never send a byte (or idle keep-alive ones) are closed after the idle
/// timeout: with every admin slot held by them, a probe would otherwise wait for ever.
#[tokio::test]
async fn silent_connections_holding_every_slot_do_not_lock_the_probes_out() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, http) = start(dir.path()).await;
    let mut silent = Vec::new();
    for _ in 0..sluice_broker::server::http::MAX_ADMIN_CONNECTIONS {
        silent.push(TcpStream::connect(http).await.unwrap());
    }
    // `get` waits up to DEADLINE (30 s) for its answer: three idle timeouts.
    let livez = get(http, "/livez").await;
    assert_eq!(livez.status, 200, "{livez:?}");
    // The silent ones were closed by the broker.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(DEADLINE, silent[0].read(&mut byte))
        .await
        .expect("closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn livez_and_readyz_answer_200_and_unknown_paths_404() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, http) = start(dir.path()).await;
    let livez = get(http, "/livez").await;
    assert_eq!(livez.status, 200, "{livez:?}");
    let readyz = get(http, "/readyz").await;
    assert_eq!(readyz.status, 200, "{readyz:?}");
    assert_eq!(get(http, "/nope").await.status, 404);
    broker.shutdown().await;
    // Stopped with the broker.
    assert!(TcpStream::connect(http).await.is_err());
}

#[tokio::test]
async fn metrics_are_valid_text_and_count_requests_fsyncs_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, http) = start(dir.path()).await;
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    let quic = Connection::connect_with(
        &support::quic_url(&broker),
        support::quic_options(dir.path()),
    )
    .await
    .unwrap();
    let Response::ApiVersions(_) = quic.send(ApiVersionsRequest {}).await.unwrap() else {
        panic!("wrong response")
    };
    support::create_topic(&connection, "orders", 2).await;
    // A durable produce is answered only after its fsync.
    let Response::Produce(produced) = connection
        .send(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: "orders".into(),
                partitions: vec![ProducePartition {
                    partition: 1,
                    records: batch(&["a", "b", "c"]),
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!("not a Produce answer")
    };
    assert_eq!(produced.topics[0].partitions[0].error_code, ErrorCode::None);
    // An unknown topic: still a successful response frame, counted under code none.
    connection
        .send(MetadataRequest {
            topics: Some(vec!["missing".into()]),
        })
        .await
        .unwrap();

    let answer = get(http, "/metrics").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.headers["content-type"].starts_with("application/openmetrics-text"),
        "{:?}",
        answer.headers
    );
    let samples = parse_exposition(&answer.body);

    let produce_requests = value(
        &samples,
        "sluice_requests_total",
        &[("api", "produce"), ("code", "none")],
    );
    assert_eq!(produce_requests, Some(1.0), "{}", answer.body);
    assert_eq!(
        value(
            &samples,
            "sluice_requests_total",
            &[("api", "create_topics"), ("code", "none")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "sluice_request_duration_seconds_count",
            &[("api", "produce")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "sluice_request_duration_seconds_bucket",
            &[("api", "produce"), ("le", "+Inf")]
        ),
        Some(1.0)
    );
    let fsyncs = value(&samples, "sluice_fsyncs_total", &[]).unwrap();
    assert!(fsyncs >= 1.0, "{}", answer.body);
    assert_eq!(
        value(&samples, "sluice_fsync_duration_seconds_count", &[]),
        Some(fsyncs)
    );
    assert_eq!(
        value(
            &samples,
            "sluice_partition_log_end_offset",
            &[("topic", "orders"), ("partition", "1")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &samples,
            "sluice_partition_log_end_offset",
            &[("topic", "orders"), ("partition", "0")]
        ),
        Some(0.0)
    );
    assert!(
        value(
            &samples,
            "sluice_partition_log_size_bytes",
            &[("topic", "orders"), ("partition", "1")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        value(&samples, "sluice_open_connections", &[("transport", "tcp")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "sluice_open_connections",
            &[("transport", "quic")]
        ),
        Some(1.0)
    );
    assert!(value(&samples, "sluice_network_received_bytes_total", &[]).unwrap() > 0.0);
    assert!(value(&samples, "sluice_network_sent_bytes_total", &[]).unwrap() > 0.0);
    assert_eq!(
        value(&samples, "sluice_fetch_response_budget_in_use_bytes", &[]),
        Some(0.0)
    );
    // Every family the broker documents is declared.
    let declared: BTreeSet<&str> = answer
        .body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split(' ').next())
        .collect();
    for family in [
        "sluice_requests",
        "sluice_request_duration_seconds",
        "sluice_network_received_bytes",
        "sluice_network_sent_bytes",
        "sluice_open_connections",
        "sluice_fsyncs",
        "sluice_fsync_duration_seconds",
        "sluice_partition_log_end_offset",
        "sluice_partition_log_size_bytes",
        "sluice_fetch_response_budget_in_use_bytes",
        "sluice_fetch_read_ahead_answers",
    ] {
        assert!(declared.contains(family), "{family} missing: {declared:?}");
    }

    // Consumer-group lag: log end minus committed offset, computed at scrape time.
    let Response::ConsumerGroupHeartbeat(member) = connection
        .send(ConsumerGroupHeartbeatRequest {
            group_id: "billing".into(),
            topics: Some(vec!["orders".into()]),
            ..Default::default()
        })
        .await
        .unwrap()
    else {
        panic!("wrong response")
    };
    let Response::CommitOffsets(committed) = connection
        .send(CommitOffsetsRequest {
            group_id: "billing".into(),
            member_id: member.member_id.clone(),
            member_epoch: member.member_epoch,
            topics: vec![CommitTopic {
                name: "orders".into(),
                partitions: vec![CommitPartition {
                    partition: 1,
                    offset: 0,
                    metadata: None,
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!("wrong response")
    };
    assert_eq!(
        committed.topics[0].partitions[0].error_code,
        ErrorCode::None
    );
    let samples = parse_exposition(&get(http, "/metrics").await.body);
    let end = value(
        &samples,
        "sluice_partition_log_end_offset",
        &[("topic", "orders"), ("partition", "1")],
    )
    .expect("log end offset of orders/1");
    assert!(end > 0.0);
    assert_eq!(
        value(
            &samples,
            "sluice_group_lag",
            &[
                ("group", "billing"),
                ("topic", "orders"),
                ("partition", "1")
            ]
        ),
        Some(end)
    );

    // A deleted topic's partitions are no longer reported.
    connection
        .send(DeleteTopicsRequest {
            names: vec!["orders".into()],
        })
        .await
        .unwrap();
    let samples = parse_exposition(&get(http, "/metrics").await.body);
    assert_eq!(
        value(
            &samples,
            "sluice_partition_log_end_offset",
            &[("topic", "orders")]
        ),
        None
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn readyz_answers_503_while_connections_drain_and_the_port_closes_after() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, http) = start(dir.path()).await;
    let connection = Connection::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    support::create_topic(&connection, "big", 1).await;
    let value = "v".repeat(900 * 1024);
    produce_values(&connection, "big", 0, &[&value]).await;

    // A consumer that asks for far more than the socket buffers hold and reads nothing keeps
    // its connection draining: shutdown waits for its answers to be written.
    let mut reader = TcpStream::connect(broker.tcp_addr).await.unwrap();
    let mut requests = bytes::BytesMut::new();
    for correlation_id in 0..64 {
        sluice_protocol::Request::from(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 1,
            max_bytes: 1 << 20,
            topics: vec![FetchTopic {
                name: "big".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    fetch_offset: 0,
                    partition_max_bytes: 1 << 20,
                }],
            }],
        })
        .encode_frame(correlation_id, &mut requests);
    }
    reader.write_all(&requests).await.unwrap();
    // Its first answer has started arriving, so the fetches are in.
    let mut first = [0u8; 4];
    reader.read_exact(&mut first).await.unwrap();

    let shutdown = tokio::spawn(broker.shutdown());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let readyz = get(http, "/readyz").await;
        if readyz.status == 503 {
            assert!(readyz.body.contains("shutting down"), "{readyz:?}");
            break;
        }
        assert_eq!(readyz.status, 200, "{readyz:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became unready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Alive all along.
    assert_eq!(get(http, "/livez").await.status, 200);

    // Reading the answers lets the connection drain; then the broker, and its admin port, stop.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut rest))
        .await
        .expect("the connection drains")
        .unwrap();
    assert!(rest.len() > 63 * 900 * 1024, "every answer was written");
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(TcpStream::connect(http).await.is_err());
}
