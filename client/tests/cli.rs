//! The `sluice` command line against a real broker.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use sluice_broker::{Broker, BrokerHandle, Config};
use sluice_client::Client;
use sluice_client::protocol::messages::*;
use sluice_client::protocol::{RecordBatchBuilder, Response};

mod support;

/// Runs `sluice` with the given arguments and stdin, on a blocking thread so the in-process
/// broker keeps running.
async fn sluice(broker: &BrokerHandle, args: &[&str], stdin: &[u8]) -> Output {
    let url = format!("tcp://{}", broker.tcp_addr);
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env_remove("SLUICE_CA_FILE")
            .env("SLUICE_BROKER", url)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&stdin).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_consume_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .unwrap();

    let created = sluice(
        &broker,
        &["topic", "create", "events", "--partitions", "2"],
        b"",
    )
    .await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let again = sluice(&broker, &["topic", "create", "events"], b"").await;
    assert_eq!(again.status.code(), Some(1));
    let stderr = text(&again.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TopicAlreadyExists"), "{stderr}");

    let listed = sluice(&broker, &["topic", "list"], b"").await;
    assert_eq!(text(&listed.stdout), "events\t2\n");

    // Records produced directly, consumed by the CLI.
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    let mut builder = RecordBatchBuilder::new();
    builder.append(
        1_700_000_000_000,
        Some(b"k1"),
        b"hello",
        &[("trace", b"t1")],
    );
    builder.append(1_700_000_000_001, None, b"world", &[]);
    let Response::Produce(_) = client
        .send(ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: "events".into(),
                partitions: vec![ProducePartition {
                    partition: 1,
                    records: builder.build().into_bytes(),
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!()
    };

    let consumed = sluice(
        &broker,
        &["consume", "events", "--group", "cli", "--count", "2"],
        b"",
    )
    .await;
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    assert!(text(&consumed.stderr).contains("consumed 2 records"));
    let lines: Vec<serde_json::Value> = text(&consumed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["topic"], "events");
    assert_eq!(lines[0]["partition"], 1);
    assert_eq!(lines[0]["offset"], 0);
    assert_eq!(lines[0]["timestamp"], 1_700_000_000_000i64);
    assert_eq!(lines[0]["key"], "k1");
    assert_eq!(lines[0]["value"], "hello");
    assert_eq!(lines[0]["headers"]["trace"], "t1");
    assert_eq!(lines[1]["key"], serde_json::Value::Null);

    // The group committed what it printed: a second run has nothing left and times out.
    let rest = sluice(
        &broker,
        &["consume", "events", "--group", "cli", "--timeout-ms", "300"],
        b"",
    )
    .await;
    assert!(rest.status.success(), "{}", text(&rest.stderr));
    assert!(text(&rest.stderr).contains("consumed 0 records"));
    assert!(rest.stdout.is_empty());

    // Standalone from an offset, value format.
    let values = sluice(
        &broker,
        &[
            "consume",
            "events",
            "--from",
            "1",
            "--format",
            "value",
            "--timeout-ms",
            "300",
        ],
        b"",
    )
    .await;
    assert_eq!(text(&values.stdout), "world\n");

    let groups = sluice(&broker, &["group", "list"], b"").await;
    assert!(
        text(&groups.stdout).starts_with("cli\t"),
        "{}",
        text(&groups.stdout)
    );
    let described = sluice(&broker, &["group", "describe", "cli"], b"").await;
    let described = text(&described.stdout);
    assert!(described.contains("events\t1\t2\t2\t0"), "{described}");

    let deleted = sluice(&broker, &["topic", "delete", "events"], b"").await;
    assert!(deleted.status.success());
    let gone = sluice(&broker, &["topic", "describe", "events"], b"").await;
    assert_eq!(gone.status.code(), Some(1));
    broker.shutdown().await;
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_broker_exits_1() {
    let usage = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["topic", "explode"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let bad_acks = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["produce", "t", "--acks", "maybe"])
        .output()
        .unwrap();
    assert_eq!(bad_acks.status.code(), Some(2));
    // Nothing listens on port 1.
    let unreachable = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--broker", "tcp://127.0.0.1:1", "topic", "list"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = text(&unreachable.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("sluice: "), "{stderr}");
    // quic:// without a CA file is a configuration error.
    let no_ca = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_remove("SLUICE_CA_FILE")
        .args(["--broker", "quic://127.0.0.1:1", "topic", "list"])
        .output()
        .unwrap();
    assert_eq!(no_ca.status.code(), Some(2));
    let no_partitions = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--broker",
            "tcp://127.0.0.1:1",
            "topic",
            "create",
            "x",
            "--partitions",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(no_partitions.status.code(), Some(2));
    // A bad --from is a usage error found before connecting.
    let bad_from = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--broker",
            "tcp://127.0.0.1:1",
            "consume",
            "t",
            "--from",
            "bogus",
        ])
        .output()
        .unwrap();
    assert_eq!(
        bad_from.status.code(),
        Some(2),
        "{}",
        text(&bad_from.stderr)
    );
    assert!(
        text(&no_ca.stderr).contains("ca-file"),
        "{}",
        text(&no_ca.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keyed_lines_round_trip_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let created = sluice(
        &broker,
        &["topic", "create", "lines", "--partitions", "4"],
        b"",
    )
    .await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let mut input = String::new();
    for index in 0..10_000 {
        input.push_str(&format!("user-{}|line {index}: a=b|c\n", index % 37));
    }
    let produced = sluice(
        &broker,
        &["produce", "lines", "--key-separator", "|"],
        input.as_bytes(),
    )
    .await;
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    assert!(
        text(&produced.stderr).contains("sent 10000 records, 10000 acknowledged"),
        "{}",
        text(&produced.stderr)
    );

    let consumed = sluice(
        &broker,
        &["consume", "lines", "--group", "readers", "--count", "10000"],
        b"",
    )
    .await;
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    assert!(text(&consumed.stderr).contains("consumed 10000 records"));
    let mut seen = std::collections::BTreeSet::new();
    let mut partition_of_key = std::collections::BTreeMap::new();
    let mut last_offset = std::collections::BTreeMap::new();
    for line in text(&consumed.stdout).lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = record["key"].as_str().unwrap().to_owned();
        let value = record["value"].as_str().unwrap().to_owned();
        let partition = record["partition"].as_u64().unwrap();
        let offset = record["offset"].as_u64().unwrap();
        // The text after the first separator is the value, separators and all.
        let index: usize = value
            .strip_prefix("line ")
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(key, format!("user-{}", index % 37));
        assert!(value.ends_with(": a=b|c"));
        assert!(seen.insert(index), "duplicate {index}");
        // One key, one partition; offsets rise within a partition.
        assert_eq!(*partition_of_key.entry(key).or_insert(partition), partition);
        if let Some(previous) = last_offset.insert(partition, offset) {
            assert!(offset > previous);
        }
    }
    assert_eq!(seen.len(), 10_000);
    broker.shutdown().await;
}

/// Produces `values` to partition 0 of `topic`, one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_that_are_not_utf8_are_produced_as_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let created = sluice(&broker, &["topic", "create", "raw"], b"").await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    // A Latin-1 value, a key that is not UTF-8, a CRLF ending, and a last line with no ending.
    let produced = sluice(
        &broker,
        &["produce", "raw", "--key-separator", ":"],
        b"caf\xe9\n\xff\xfe:v\r\nplain",
    )
    .await;
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    assert!(
        text(&produced.stderr).contains("sent 3 records, 3 acknowledged"),
        "{}",
        text(&produced.stderr)
    );
    let consumed = sluice(&broker, &["consume", "raw", "--count", "3"], b"").await;
    assert!(consumed.status.success(), "{}", text(&consumed.stderr));
    let lines: Vec<serde_json::Value> = text(&consumed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["key"], serde_json::Value::Null);
    assert_eq!(lines[0]["value"]["base64"], "Y2Fm6Q==");
    assert_eq!(lines[1]["key"]["base64"], "//4=");
    assert_eq!(lines[1]["value"], "v");
    assert_eq!(lines[2]["value"], "plain");

    // An empty separator is a usage error, found before connecting.
    let empty = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--broker",
            "tcp://127.0.0.1:1",
            "produce",
            "raw",
            "--key-separator",
            "",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(2), "{}", text(&empty.stderr));
    broker.shutdown().await;
}

/// A broker on a fresh directory (kept while the first value lives), a client of it, and
/// topic `t` of one partition.
async fn broker_with_topic_t() -> (tempfile::TempDir, BrokerHandle, Client) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let client = Client::connect(&format!("tcp://{}", broker.tcp_addr))
        .await
        .unwrap();
    client.admin().create_topic("t", 1, &[]).await.unwrap();
    (dir, broker, client)
}

async fn produce_values(client: &Client, topic: &str, values: &[String]) {
    let mut builder = RecordBatchBuilder::new();
    for value in values {
        builder.append(1_700_000_000_000, None, value.as_bytes(), &[]);
    }
    let Response::Produce(response) = client
        .send(ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 10_000,
            topics: vec![ProduceTopic {
                name: topic.into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: builder.build().into_bytes(),
                }],
            }],
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        response.topics[0].partitions[0].error_code,
        sluice_client::protocol::ErrorCode::None
    );
}

/// `sluice consume` shows records as they arrive (it does not hold them until its output
/// buffer fills or it exits), and a reader that goes away (`| head -1`) ends it as `--count`
/// would: the group commits what the reader took, leaves, and the command exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_shows_records_as_they_come_and_ends_cleanly_when_its_reader_goes() {
    use std::io::{BufRead, BufReader};
    let (_dir, broker, client) = broker_with_topic_t().await;
    produce_values(&client, "t", &["first".to_owned()]).await;
    let url = format!("tcp://{}", broker.tcp_addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_remove("SLUICE_CA_FILE")
        .env("SLUICE_BROKER", url)
        .args(["consume", "t", "--group", "g", "--format", "value"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The first record is printed while the command runs on, waiting for more.
    let first = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            (line, lines)
        }),
    )
    .await
    .expect("the first record shows while the command runs")
    .unwrap();
    assert_eq!(first.0, "first\n");
    // The reader goes away; the next record's write fails and the command ends.
    drop(first.1);
    let values: Vec<String> = (0..1_000).map(|index| format!("later-{index}")).collect();
    produce_values(&client, "t", &values).await;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("consumed"), "{stderr}");
    // What the reader took is committed; what was still buffered when it went is not.
    assert_eq!(committed_offset(&client, "g", "t").await, 1);
    broker.shutdown().await;
}

async fn committed_offset(client: &Client, group: &str, topic: &str) -> i64 {
    let Response::FetchOffsets(offsets) = client
        .send(FetchOffsetsRequest {
            group_id: group.into(),
            topics: Some(vec![TopicPartitions {
                topic: topic.into(),
                partitions: vec![0],
            }]),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    offsets.topics[0].partitions[0].committed_offset
}

/// A group consume whose output fails (here a full disk) must not commit the records it
/// could not print: they are delivered again to the next run, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consume_whose_output_fails_commits_nothing_it_did_not_print() {
    let (_dir, broker, client) = broker_with_topic_t().await;
    let values: Vec<String> = (0..10).map(|index| format!("v{index}")).collect();
    produce_values(&client, "t", &values).await;
    let url = format!("tcp://{}", broker.tcp_addr);
    let full = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env_remove("SLUICE_CA_FILE")
            .env("SLUICE_BROKER", url)
            .args(["consume", "t", "--group", "g", "--count", "10"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = text(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("sluice: writing the records failed"),
        "{stderr}"
    );
    assert_eq!(
        committed_offset(&client, "g", "t").await,
        -1,
        "nothing committed"
    );
    // The next run prints all ten and commits them.
    let again = sluice(
        &broker,
        &[
            "consume", "t", "--group", "g", "--count", "10", "--format", "value",
        ],
        b"",
    )
    .await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), values.join("\n") + "\n");
    assert_eq!(committed_offset(&client, "g", "t").await, 10);
    broker.shutdown().await;
}

/// In a group, `--from OFFSET` is where partitions without a committed offset start; once the
/// group has committed, the commit wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consume_from_an_offset_starts_there_only_without_a_commit() {
    let (_dir, broker, client) = broker_with_topic_t().await;
    let values: Vec<String> = (0..10).map(|index| format!("v{index}")).collect();
    produce_values(&client, "t", &values).await;
    let args = [
        "consume",
        "t",
        "--group",
        "g",
        "--format",
        "value",
        "--timeout-ms",
        "1000",
    ];
    let first = sluice(&broker, &[&args[..], &["--from", "6"]].concat(), b"").await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout), "v6\nv7\nv8\nv9\n");
    assert_eq!(committed_offset(&client, "g", "t").await, 10);
    let more: Vec<String> = vec!["v10".into()];
    produce_values(&client, "t", &more).await;
    let second = sluice(&broker, &[&args[..], &["--from", "2"]].concat(), b"").await;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert_eq!(text(&second.stdout), "v10\n");
    // An offset past the log's end is reset to the earliest, as any out-of-range position.
    let third = sluice(
        &broker,
        &[
            "consume", "t", "--group", "h", "--format", "value", "--count", "1", "--from", "1000",
        ],
        b"",
    )
    .await;
    assert_eq!(third.status.code(), Some(0), "{}", text(&third.stderr));
    assert_eq!(text(&third.stdout), "v0\n");
    broker.shutdown().await;
}

/// A closed stderr (`2>&1 | head -1`, or a closed descriptor) is no reason to crash: the
/// exit code still says what happened.
#[test]
fn a_closed_stderr_does_not_turn_an_error_into_a_crash() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_remove("SLUICE_CA_FILE")
        .args(["--broker", "tcp://127.0.0.1:1", "topic", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_create_takes_per_topic_overrides_and_acks_none_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(dir.path()))
        .await
        .unwrap();
    let created = sluice(
        &broker,
        &[
            "topic",
            "create",
            "short",
            "--config",
            "retention_ms=60000",
            "--config",
            "segment_bytes=1048576",
        ],
        b"",
    )
    .await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let described = sluice(&broker, &["topic", "describe", "short"], b"").await;
    let described = text(&described.stdout);
    assert!(described.contains("retention_ms=60000"), "{described}");
    assert!(described.contains("segment_bytes=1048576"), "{described}");
    // A key the broker does not know is its error (exit 1); no KEY=VALUE is a usage error.
    let unknown = sluice(
        &broker,
        &["topic", "create", "x", "--config", "colour=red"],
        b"",
    )
    .await;
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown.stderr));
    let malformed = sluice(
        &broker,
        &["topic", "create", "x", "--config", "colour"],
        b"",
    )
    .await;
    assert_eq!(
        malformed.status.code(),
        Some(2),
        "{}",
        text(&malformed.stderr)
    );

    // With acks=none the broker answers nothing, so nothing is counted as acknowledged.
    let produced = sluice(
        &broker,
        &["produce", "short", "--acks", "none"],
        b"a\nb\nc\n",
    )
    .await;
    assert!(produced.status.success(), "{}", text(&produced.stderr));
    assert!(
        text(&produced.stderr).contains("sent 3 records, 0 acknowledged (acks=none)"),
        "{}",
        text(&produced.stderr)
    );
    broker.shutdown().await;
}

/// `consume` retries quietly while its broker is away, as a live tail should, but says so on
/// stderr once the client has given up on the broker for now, and says when it is back; the
/// records produced after are printed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_says_when_the_broker_goes_away_and_comes_back() {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let broker = support::start_on_a_fixed_port(dir.path()).await;
    let address = broker.tcp_addr;
    let client = Client::connect(&format!("tcp://{address}")).await.unwrap();
    client.admin().create_topic("t", 1, &[]).await.unwrap();
    produce_values(&client, "t", &["first".to_owned()]).await;
    /// The command, killed when the test ends, however it ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env_remove("SLUICE_CA_FILE")
            .env("SLUICE_BROKER", format!("tcp://{address}"))
            .args(["consume", "t", "--format", "value"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Both streams, a line at a time, through channels read with a deadline.
    let lines = |stream: Box<dyn std::io::Read + Send>| {
        let (sender, receiver) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        receiver
    };
    let stdout = lines(Box::new(child.0.stdout.take().unwrap()));
    let stderr = lines(Box::new(child.0.stderr.take().unwrap()));
    let wait_for = |receiver: &mpsc::Receiver<String>, wanted: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match receiver.recv_timeout(left) {
                Ok(line) if line.contains(wanted) => return,
                Ok(_) => {}
                Err(error) => panic!("no line with {wanted:?}: {error}"),
            }
        }
    };
    tokio::task::block_in_place(|| wait_for(&stdout, "first"));
    drop(client);
    broker.shutdown().await;
    tokio::task::block_in_place(|| wait_for(&stderr, "the broker is unreachable"));

    let broker = support::restart(dir.path(), address).await;
    tokio::task::block_in_place(|| wait_for(&stderr, "the broker is reachable again"));
    let client = Client::connect(&format!("tcp://{address}")).await.unwrap();
    produce_values(&client, "t", &["second".to_owned()]).await;
    tokio::task::block_in_place(|| wait_for(&stdout, "second"));
    drop(child);
    broker.shutdown().await;
}
