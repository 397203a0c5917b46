//! The `sluice-broker` binary: exit codes, configuration errors, serving, signals.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_client::Connection;
use sluice_protocol::Response;
use sluice_protocol::messages::*;

fn broker() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-broker"));
    // The tests' own environment must not leak into the broker's configuration.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SLUICE_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn bad_flag_and_bad_config_exit_2_with_one_line() {
    let output = broker().arg("--fsync").arg("sometimes").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--fsync"));

    let output = broker()
        .env("SLUICE_LIMITS_MAX_FRAME_BYTES", "lots")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("limits.max_frame_bytes"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    std::fs::write(&file, "[storage]\nfsink = \"always\"\n").unwrap();
    let output = broker().arg("--config").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fsink"));
}

/// Starts the binary on an ephemeral port and returns it with the address it logged.
fn spawn(data_dir: &std::path::Path, extra: &[&str]) -> (Child, String, mpsc::Receiver<String>) {
    let (child, address, _seen, lines) = spawn_logging(data_dir, extra);
    (child, address, lines)
}

/// As [`spawn`], with QUIC on `quic` (an address a restart can take again).
fn spawn_on_quic(data_dir: &std::path::Path, quic: &str) -> Child {
    let (child, _address, _seen, _lines) = spawn_listening(data_dir, quic, &[]);
    child
}

/// As [`spawn`], also returning the lines read up to the start line, that one included.
fn spawn_logging(
    data_dir: &std::path::Path,
    extra: &[&str],
) -> (Child, String, Vec<String>, mpsc::Receiver<String>) {
    spawn_listening(data_dir, "127.0.0.1:0", extra)
}

fn spawn_listening(
    data_dir: &std::path::Path,
    quic: &str,
    extra: &[&str],
) -> (Child, String, Vec<String>, mpsc::Receiver<String>) {
    let mut child = broker()
        .args([
            "--tcp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--quic",
            quic,
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, receiver) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let address = loop {
        let Ok(line) = receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            break None;
        };
        seen.push(line.clone());
        if line.contains("broker started") {
            break line
                .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                .find_map(|word| {
                    word.trim_start_matches("tcp_addr=")
                        .parse::<std::net::SocketAddr>()
                        .ok()
                });
        }
    };
    match address {
        Some(address) => (child, address.to_string(), seen, receiver),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker did not log its address");
        }
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn serves_produce_and_fetch_then_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, _lines) = spawn(dir.path(), &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connection = Connection::connect(&format!("tcp://{address}"))
            .await
            .unwrap();
        connection
            .send(CreateTopicsRequest {
                topics: vec![CreateTopic {
                    name: "cli".into(),
                    partitions: 1,
                    configs: vec![],
                }],
                validate_only: false,
            })
            .await
            .unwrap();
        let mut builder = sluice_protocol::RecordBatchBuilder::new();
        builder.append(1, None, b"hello", &[]);
        let Response::Produce(produced) = connection
            .send(ProduceRequest {
                acks: Acks::Durable,
                timeout_ms: 10_000,
                topics: vec![ProduceTopic {
                    name: "cli".into(),
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
            produced.topics[0].partitions[0].error_code,
            sluice_protocol::ErrorCode::None
        );
        let Response::Fetch(fetched) = connection
            .send(FetchRequest {
                max_wait_ms: 0,
                min_bytes: 1,
                max_bytes: 1 << 20,
                topics: vec![FetchTopic {
                    name: "cli".into(),
                    partitions: vec![FetchPartition {
                        partition: 0,
                        fetch_offset: 0,
                        partition_max_bytes: 1 << 20,
                    }],
                }],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert!(!fetched.topics[0].partitions[0].records.is_empty());
    });
    terminate(&child);
    let status =
        wait_with_deadline(&mut child, Duration::from_secs(30)).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    // Shutdown checkpointed the partition.
    assert!(dir.path().join("topics/cli/0/recovery-point").exists());
}

#[test]
fn json_log_format_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _address, mut all, lines) =
        spawn_logging(dir.path(), &["--log-format", "json"]);
    terminate(&child);
    let status = wait_with_deadline(&mut child, Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0));
    // Everything the broker wrote to stderr: the reader stops at its end, once the process
    // has exited.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => all.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("stderr did not end after the exit; read so far: {all:#?}")
            }
        }
    }
    for line in &all {
        assert!(is_json_object(line), "not a JSON object: {line}");
    }
    // From the start to the end of the run: the start line, and the last line of a shutdown.
    for message in ["broker started", "broker stopped"] {
        assert!(
            all.iter()
                .any(|line| line.contains(&format!("\"message\":\"{message}\""))),
            "no {message:?} line in {all:#?}"
        );
    }
}

/// Whether `text` is exactly one JSON object.
fn is_json_object(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|value| value.is_object())
}

#[test]
fn committed_offsets_survive_kill_9() {
    use sluice_protocol::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut child, address, _lines) = spawn(dir.path(), &[]);
    runtime.block_on(async {
        let connection = Connection::connect(&format!("tcp://{address}"))
            .await
            .unwrap();
        connection
            .send(CreateTopicsRequest {
                topics: vec![CreateTopic {
                    name: "k".into(),
                    partitions: 1,
                    configs: vec![],
                }],
                validate_only: false,
            })
            .await
            .unwrap();
        let Response::ConsumerGroupHeartbeat(member) = connection
            .send(ConsumerGroupHeartbeatRequest {
                group_id: "g".into(),
                topics: Some(vec!["k".into()]),
                ..Default::default()
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(member.error_code, ErrorCode::None);
        let Response::CommitOffsets(committed) = connection
            .send(CommitOffsetsRequest {
                group_id: "g".into(),
                member_id: member.member_id.clone(),
                member_epoch: member.member_epoch,
                topics: vec![CommitTopic {
                    name: "k".into(),
                    partitions: vec![CommitPartition {
                        partition: 0,
                        offset: 1234,
                        metadata: None,
                    }],
                }],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            committed.topics[0].partitions[0].error_code,
            ErrorCode::None
        );
    });
    // No shutdown, no checkpoint: the acknowledged commit must already be on disk.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, address, _lines) = spawn(dir.path(), &[]);
    runtime.block_on(async {
        let connection = Connection::connect(&format!("tcp://{address}"))
            .await
            .unwrap();
        let Response::FetchOffsets(offsets) = connection
            .send(FetchOffsetsRequest {
                group_id: "g".into(),
                topics: Some(vec![TopicPartitions {
                    topic: "k".into(),
                    partitions: vec![0],
                }]),
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(offsets.topics[0].partitions[0].committed_offset, 1234);
    });
    terminate(&child);
    let status = wait_with_deadline(&mut child, Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// A QUIC client whose broker was killed and started again is told at once that its
/// connection is gone (a stateless reset the restarted broker can sign, its key being kept in
/// the data directory), and reconnects, instead of waiting out the 30 s idle timeout.
#[test]
fn a_quic_client_reconnects_at_once_to_a_broker_killed_and_restarted() {
    use sluice_client::{Client, ClientOptions, ConnectionOptions};
    let dir = tempfile::tempdir().unwrap();
    // Below the ephemeral range, where no other socket of the run takes it between the kill
    // and the restart.
    let port = sluice_testkit::process::free_port().unwrap();
    let quic = format!("127.0.0.1:{port}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut child = spawn_on_quic(dir.path(), &quic);
    let certificate = sluice_broker::tls::self_signed_certificate_path(dir.path());
    let options = ClientOptions::default().connection(
        ConnectionOptions::default()
            .ca_file(certificate)
            .request_timeout(Duration::from_secs(60)),
    );
    let client = runtime
        .block_on(Client::connect_with(
            &format!("quic://localhost:{port}"),
            options,
        ))
        .unwrap();
    runtime.block_on(client.send(ListTopicsRequest {})).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let mut child = spawn_on_quic(dir.path(), &quic);
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered = runtime.block_on(async {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, client.send(ListTopicsRequest {})).await {
                Ok(Ok(_)) => return true,
                // The old connection, reset: the next call reconnects.
                Ok(Err(_)) if Instant::now() < deadline => continue,
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    });
    terminate(&child);
    let _ = wait_with_deadline(&mut child, Duration::from_secs(30));
    assert!(
        answered,
        "the client did not get through to the restarted broker within 10 s"
    );
}
