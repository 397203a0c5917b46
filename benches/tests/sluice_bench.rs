//! `sluice-bench` as a user runs it: every subcommand against an embedded broker with small
//! counts, the `--json` line and the `--chart` file checked for shape and sanity, and the exit
//! codes of bad flags and unreachable brokers. No performance figure is asserted: the machine
//! is shared and the numbers are whatever they are.
//!
//! Counts stay at about one producer batch (2,000 × 100 B < 256 KiB) per partition: enough to
//! exercise every path, small enough that the suite runs in seconds.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn sluice_bench(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(arguments)
        // A broker URL or CA file from the environment must not leak into the tests.
        .env_remove("SLUICE_BROKER")
        .env_remove("SLUICE_CA_FILE")
        .output()
        .expect("sluice-bench runs")
}

fn succeeded(arguments: &[&str]) -> Output {
    let output = sluice_bench(arguments);
    assert!(
        output.status.success(),
        "sluice-bench {arguments:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

/// The JSON lines of `path`, parsed.
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("the --json file exists")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
        .collect()
}

fn number(object: &Value, key: &str) -> f64 {
    object[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {object}"))
}

/// The fields every result carries, with sane values.
fn check_result(object: &Value, workload: &str, message_size: u64) {
    assert_eq!(object["workload"], workload);
    assert_eq!(object["message_size"].as_u64(), Some(message_size));
    assert!(
        object["messages"]
            .as_u64()
            .is_some_and(|messages| messages > 0),
        "{object}"
    );
    assert!(number(object, "msgs_per_s") > 0.0, "{object}");
    assert!(number(object, "mb_per_s") > 0.0, "{object}");
    for label in ["acks", "fsync", "transport", "broker"] {
        assert!(object[label].is_string(), "{label} in {object}");
    }
    for label in [
        "producers",
        "consumers",
        "partitions",
        "batch_bytes",
        "linger_ms",
    ] {
        assert!(object[label].is_u64(), "{label} in {object}");
    }
    assert!(
        object["machine"]["cores"]
            .as_u64()
            .is_some_and(|cores| cores > 0)
    );
    assert!(object["machine"].get("memory_bytes").is_some());
    for label in ["cpu_model", "cpu_family", "cpu_model_number", "avx512"] {
        assert!(
            object["machine"].get(label).is_some(),
            "{label} in {object}"
        );
    }
    // On Linux the host's steal is known: zero or more cores' worth.
    assert!(
        object["stolen_cores"]
            .as_f64()
            .is_some_and(|cores| cores >= 0.0),
        "{object}"
    );
}

/// p50 ≤ p99 ≤ p99.9 ≤ max for the headline latency.
fn check_percentiles(object: &Value) {
    let p50 = number(object, "p50_us");
    let p99 = number(object, "p99_us");
    let p999 = number(object, "p999_us");
    let max = number(object, "max_us");
    assert!(p50 <= p99 && p99 <= p999 && p999 <= max, "{object}");
}

fn check_svg(path: &Path) {
    let svg = std::fs::read_to_string(path).expect("the --chart file exists");
    assert!(svg.contains("<svg"), "an SVG document");
    assert!(svg.contains("throughput"), "with the throughput panel");
}

#[test]
fn produce_reports_a_table_a_json_line_and_a_chart() {
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("results.jsonl");
    let chart = directory.path().join("produce.svg");
    let output = succeeded(&[
        "produce",
        "--embedded",
        "--messages",
        "2000",
        "--message-size",
        "64",
        "--acks",
        "leader",
        "--fsync",
        "never",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "msgs/s",
        "MB/s",
        "send→ack",
        "p99.9",
        "acks=leader",
        "fsync=never",
        "machine:",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }
    let lines = json_lines(&json);
    assert_eq!(lines.len(), 1);
    let result = &lines[0];
    check_result(result, "produce", 64);
    check_percentiles(result);
    assert_eq!(result["messages"].as_u64(), Some(2000));
    assert_eq!(result["latency"], "send_to_ack");
    assert_eq!(result["acks"], "leader");
    assert_eq!(result["fsync"], "never");
    assert_eq!(result["transport"], "tcp");
    assert!(result["produce_to_consume_us"].is_null());
    check_svg(&chart);

    // A second run appends a second line.
    succeeded(&[
        "produce",
        "--embedded",
        "--messages",
        "100",
        "--json",
        json.to_str().unwrap(),
    ]);
    let lines = json_lines(&json);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[1]["acks"], "durable",
        "the default is the client's: durable"
    );
}

#[test]
fn consume_reads_back_what_it_filled() {
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("results.jsonl");
    succeeded(&[
        "consume",
        "--embedded",
        "--messages",
        "2000",
        "--acks",
        "leader",
        "--json",
        json.to_str().unwrap(),
    ]);
    let result = &json_lines(&json)[0];
    check_result(result, "consume", 100);
    // All 2,000 were read back (the run fails otherwise); the rate counts those that arrived
    // after the first records started the clock, or all of them timed from the consumers'
    // start when they came at once.
    assert!(
        result["messages"]
            .as_u64()
            .is_some_and(|messages| (1..=2000).contains(&messages)),
        "{result}"
    );
    assert_eq!(result["fill"]["messages"].as_u64(), Some(2000));
    assert_eq!(
        result["latency"], "none",
        "records were written before the read"
    );
    assert!(result["p50_us"].is_null());
    assert_eq!(result["consumers"].as_u64(), Some(1));
}

#[test]
fn pubsub_measures_both_latencies_with_several_producers_and_members() {
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("results.jsonl");
    let chart = directory.path().join("pubsub.svg");
    succeeded(&[
        "pubsub",
        "--embedded",
        "--messages",
        "2000",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--partitions",
        "2",
        "--acks",
        "leader",
        "--linger-ms",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let result = &json_lines(&json)[0];
    check_result(result, "pubsub", 100);
    check_percentiles(result);
    assert!(
        result["messages"].as_u64().unwrap() >= 2000,
        "at least once"
    );
    assert_eq!(result["latency"], "produce_to_consume");
    assert!(result["send_to_ack_us"]["count"].as_u64() == Some(2000));
    assert_eq!(
        (
            result["producers"].as_u64(),
            result["consumers"].as_u64(),
            result["partitions"].as_u64()
        ),
        (Some(2), Some(2), Some(2))
    );
    check_svg(&chart);
}

#[test]
fn latency_runs_at_the_given_rate_for_the_given_time() {
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("results.jsonl");
    let chart = directory.path().join("latency.svg");
    succeeded(&[
        "latency",
        "--embedded",
        "--rate",
        "500",
        "--duration",
        "2",
        "--acks",
        "leader",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let result = &json_lines(&json)[0];
    check_result(result, "latency", 100);
    check_percentiles(result);
    assert_eq!(result["rate"].as_u64(), Some(500));
    assert_eq!(
        result["linger_ms"].as_u64(),
        Some(0),
        "latency lingers 0 by default"
    );
    // About 1,000 messages; the count depends on the clock, so only its order is checked.
    let messages = result["messages"].as_u64().unwrap();
    assert!((100..=1_100).contains(&messages), "{messages} messages");
    assert!(
        !result["samples"].as_array().unwrap().is_empty(),
        "a sample per second"
    );
    check_svg(&chart);
}

#[test]
fn produce_over_quic_is_labelled_quic() {
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("results.jsonl");
    succeeded(&[
        "produce",
        "--embedded",
        "--transport",
        "quic",
        "--messages",
        "2000",
        "--acks",
        "durable",
        "--fsync",
        "always",
        "--json",
        json.to_str().unwrap(),
    ]);
    let result = &json_lines(&json)[0];
    check_result(result, "produce", 100);
    check_percentiles(result);
    assert_eq!(result["transport"], "quic");
    assert_eq!(result["fsync"], "always");
}

#[test]
fn baseline_prints_the_limits_and_sluice_beside_them() {
    let output = succeeded(&[
        "baseline",
        "--messages",
        "300",
        "--message-size",
        "200",
        "--latency-duration",
        "1",
        "--batch-bytes",
        "8192",
    ]);
    let table = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "batches and writes of 8,192 B",
        "batch_bytes=8192",
        "raw loopback TCP, null sink",
        "page-cache file append",
        "write + fdatasync per batch",
        "write + fdatasync per message",
        "produce acks=leader",
        "produce acks=durable",
        "consume, group of 1",
        "× raw TCP",
        "machine:",
        "latency (µs) at 10,000 msgs/s for 1 s",
        "raw loopback TCP, 1 hop, 2 threads",
        "Sluice produce→consume, acks=leader",
        "Sluice ÷ raw TCP",
        "cores spinning 1 s:",
        "of 100+ µs,",
        "of 500+ µs, longest",
        "% of the time",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }
}

#[test]
fn stalls_prints_the_machines_stalls_in_one_line() {
    let output = succeeded(&["stalls", "--duration", "1"]);
    let line = String::from_utf8_lossy(&output.stdout);
    assert_eq!(line.lines().count(), 1, "{line}");
    for expected in [
        "machine stalls, ",
        "cores spinning 1 s: ",
        " of 100+ µs, ",
        " of 500+ µs, longest ",
        " % of the time",
    ] {
        assert!(line.contains(expected), "{expected:?} in {line}");
    }
}

#[test]
fn bad_flags_exit_2() {
    for arguments in [
        &["produce", "--embedded", "--bogus"][..],
        &["produce", "--embedded", "--message-size", "4"],
        &["produce", "--embedded", "--messages", "0"],
        &[
            "produce",
            "--embedded",
            "--messages",
            "10",
            "--duration",
            "1",
        ],
        &["produce", "--embedded", "--acks", "all"],
        &["produce", "--embedded", "--fsync", "sometimes"],
        &["produce", "--embedded", "--broker", "tcp://127.0.0.1:7171"],
        &["latency", "--embedded", "--rate", "0"],
        &["baseline", "--acks", "leader"],
        &["baseline", "--batch-bytes", "0"],
        &["stalls", "--duration", "0"],
        &["stalls", "--duration", "soon"],
        &["produce", "--embedded", "--batch-bytes", "10"],
        &["baseline", "--batch-bytes", "2000000"],
        &["bogus"],
        &[],
    ] {
        let output = sluice_bench(arguments);
        assert_eq!(output.status.code(), Some(2), "sluice-bench {arguments:?}");
    }
    // Refused after parsing: one line naming the problem.
    for arguments in [
        &[
            "produce",
            "--broker",
            "tcp://127.0.0.1:1",
            "--transport",
            "quic",
        ][..],
        &["produce", "--broker", "http://127.0.0.1:1"],
        // quic:// without a CA file is a configuration error.
        &[
            "produce",
            "--broker",
            "quic://127.0.0.1:1",
            "--messages",
            "10",
        ],
    ] {
        let output = sluice_bench(arguments);
        assert_eq!(output.status.code(), Some(2), "sluice-bench {arguments:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("sluice-bench: "), "{stderr}");
    }
}

#[test]
fn an_unreachable_broker_exits_1_with_one_line() {
    let output = sluice_bench(&[
        "produce",
        "--broker",
        "tcp://127.0.0.1:1",
        "--messages",
        "10",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}

#[test]
fn help_and_version_exit_0() {
    let help = sluice_bench(&["produce", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--broker",
        "--embedded",
        "--transport",
        "--producers",
        "--consumers",
        "--partitions",
        "--message-size",
        "--messages",
        "--duration",
        "--batch-bytes",
        "--linger-ms",
        "--acks",
        "--fsync",
        "--rate",
        "--json",
        "--chart",
    ] {
        assert!(text.contains(flag), "{flag} in\n{text}");
    }
    assert!(
        text.contains("only a label"),
        "--fsync with --broker is only a label"
    );
    assert_eq!(sluice_bench(&["--version"]).status.code(), Some(0));
}
