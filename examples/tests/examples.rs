//! Runs every example program against a broker started here, and checks that it exits 0 and
//! prints the lines its opening comment promises, so the examples never rot.
//!
//! The example binaries are built by a nested `cargo build --workspace --all-features
//! --examples` (once per test run). Cargo releases its build lock before it runs test binaries,
//! so this does not deadlock. Its flags select the same features as the README's
//! `cargo test --workspace --all-features`, so after that command built the examples the nested
//! build only checks they are fresh; after another selection (`cargo test -p sluice-examples`)
//! it builds the workspace crates once more with those features, once, and keeps both.
//! Building here, rather than looking in the target directory, also covers `--test examples`
//! alone, where the outer cargo leaves the examples missing or stale. Cargo's JSON messages say
//! where each binary is, whatever the target directory or profile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sluice_broker::{Broker, Config};

/// How long one example may run: the slowest waits out a 6 s session timeout.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the examples and returns each one's executable, by example name.
fn example_binaries() -> &'static BTreeMap<String, PathBuf> {
    static BINARIES: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("examples/ is in the workspace");
        let mut command = Command::new(env!("CARGO"));
        command
            .current_dir(workspace)
            .args([
                "build",
                "--workspace",
                "--all-features",
                "--examples",
                "--message-format=json-render-diagnostics",
            ])
            .stdin(Stdio::null());
        // Cargo gives this test process variables describing this package. Build scripts that
        // watch one of them (ring's watches CARGO_MANIFEST_DIR) would see it change between
        // the outer build and this one, and both would rebuild half the tree every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || matches!(
                    name.as_ref(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                command.env_remove(name.as_ref());
            }
        }
        // The examples are built with the profile this test was built with.
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let output = command.output().expect("cargo runs");
        assert!(
            output.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Shown with --nocapture: what the nested build had to do.
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        let mut binaries = BTreeMap::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let is_example = message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "example"));
            if message["reason"] == "compiler-artifact"
                && is_example
                && let (Some(name), Some(executable)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                )
            {
                binaries.insert(name.to_owned(), PathBuf::from(executable));
            }
        }
        binaries
    })
}

/// Runs example `name` against a fresh broker; asserts it exits 0 and that, for each of
/// `expected`, some line of its output starts with it. Returns the output.
async fn run_example(name: &str, expected: &[&str]) -> String {
    let binaries = tokio::task::spawn_blocking(example_binaries).await.unwrap();
    let binary = binaries
        .get(name)
        .unwrap_or_else(|| panic!("no example {name} was built; built: {:?}", binaries.keys()));

    let data_dir = tempfile::tempdir().unwrap();
    let config = Config::on_loopback(data_dir.path());
    let broker = Broker::start(config).await.expect("broker starts");

    let mut child = tokio::process::Command::new(binary)
        .env("SLUICE_BROKER", format!("tcp://{}", broker.tcp_addr))
        .env_remove("SLUICE_CA_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the example starts");
    // Read as it prints, so an example that hangs still shows how far it got.
    let stdout = collect(child.stdout.take().expect("stdout is piped"));
    let stderr = collect(child.stderr.take().expect("stderr is piped"));
    let status = tokio::time::timeout(EXAMPLE_TIMEOUT, child.wait()).await;
    let Ok(status) = status else {
        child.kill().await.expect("the example is killed");
        let (stdout, stderr) = (stdout.await.unwrap(), stderr.await.unwrap());
        panic!(
            "{name} did not finish within {} s\nstdout:\n{stdout}\nstderr:\n{stderr}",
            EXAMPLE_TIMEOUT.as_secs()
        );
    };
    let status = status.unwrap();
    broker.shutdown().await;
    let (stdout, stderr) = (stdout.await.unwrap(), stderr.await.unwrap());
    assert!(
        status.success(),
        "{name} failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in expected {
        assert!(
            stdout.lines().any(|printed| printed.starts_with(line)),
            "{name} did not print a line starting with {line:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    stdout
}

/// Reads a child's output to its end, as text.
fn collect(
    mut output: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        // A read error ends the output early; what was read is still shown.
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut output, &mut bytes).await;
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart() {
    let stdout = run_example("quickstart", &["quickstart done: 6 produced, 6 consumed"]).await;
    assert_eq!(
        stdout
            .lines()
            .filter(|line| line.starts_with("consumed partition"))
            .count(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group() {
    run_example(
        "consumer_group",
        &[
            "first round: 60 records processed by three members",
            "killed member-3",
            "every record processed: 120 of 120",
            "consumer_group done",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_consumer() {
    let stdout = run_example(
        "idempotent_consumer",
        &[
            "member A crashed before committing: its 3 records will be delivered again",
            "member B delivered 6 records and skipped 4",
            "charged 5 payments, each once",
        ],
    )
    .await;
    assert_eq!(
        stdout
            .lines()
            .filter(|line| line.contains(" charged pay-"))
            .count(),
        5,
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox() {
    run_example(
        "outbox",
        &[
            "relay crashed: 3 rows published, not marked",
            "restarted relay read back the topic: 2 rows left to publish",
            "restarted relay published 2 rows",
            "topic holds 5 events: each order once, in order",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga() {
    run_example(
        "saga",
        &[
            "order-1: COMPLETED",
            "order-2: CANCELLED, payment declined (card-limit); compensations run: release inventory",
            "order-3: CANCELLED, shipping failed (no-route); compensations run: refund payment, release inventory",
            "saga done: 1 completed, 2 cancelled and compensated",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sourcing() {
    run_example(
        "event_sourcing",
        &[
            "  rejected: insufficient funds (balance 120.00)",
            "7 events appended, 1 command rejected",
            "read model: acc-1 owner alice balance 120.00 after 4 events",
            "read model: acc-2 owner bob balance 15.00 after 3 events",
            "read model agrees with the event log",
        ],
    )
    .await;
}

/// An example takes the broker and its CA file from flags, as the `sluice` tool does (here the
/// quickstart over QUIC, trusting the broker's own certificate), and fails with one line: exit
/// 1 when the broker cannot be reached, 2 for an argument it does not know.
#[tokio::test]
async fn an_example_takes_broker_and_ca_file_flags_and_fails_in_one_line() {
    let binaries = tokio::task::spawn_blocking(example_binaries).await.unwrap();
    let quickstart = &binaries["quickstart"];
    let data_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::on_loopback(data_dir.path()))
        .await
        .expect("broker starts");
    let quic = broker.quic_addr.expect("QUIC is served");
    let certificate = sluice_broker::tls::self_signed_certificate_path(data_dir.path());
    let run = |arguments: Vec<String>| {
        let quickstart = quickstart.clone();
        async move {
            tokio::time::timeout(
                EXAMPLE_TIMEOUT,
                tokio::process::Command::new(quickstart)
                    .args(arguments)
                    .env_remove("SLUICE_BROKER")
                    .env_remove("SLUICE_CA_FILE")
                    .stdin(Stdio::null())
                    .output(),
            )
            .await
            .expect("the example finishes")
            .expect("the example runs")
        }
    };
    let over_quic = run(vec![
        "--broker".into(),
        format!("quic://localhost:{}", quic.port()),
        "--ca-file".into(),
        certificate.display().to_string(),
    ])
    .await;
    assert!(
        over_quic.status.success(),
        "{}",
        String::from_utf8_lossy(&over_quic.stderr)
    );
    broker.shutdown().await;

    // Nothing listens on port 1.
    let unreachable = run(vec!["--broker=tcp://127.0.0.1:1".into()]).await;
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("quickstart: connecting to tcp://127.0.0.1:1"),
        "{stderr}"
    );
    let usage = run(vec!["--colour".into()]).await;
    assert_eq!(usage.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&usage.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}
