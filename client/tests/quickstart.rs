//! The README's quickstart, run exactly as written (apart from `cargo install`, which the test
//! replaces with the freshly built `sluice`), against a real broker.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_broker::{Broker, Config};

fn quickstart_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("<!-- quickstart -->")
        .expect("quickstart marker");
    let end = readme
        .find("<!-- /quickstart -->")
        .expect("quickstart end marker");
    readme[start..end]
        .lines()
        .filter(|line| {
            !line.starts_with("```") && !line.starts_with("<!--") && !line.trim().is_empty()
        })
        .map(|line| line.split("  #").next().unwrap().trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_works_as_written() {
    let commands = quickstart_commands();
    assert!(commands[0].starts_with("cargo install"), "{commands:?}");
    let dir = tempfile::tempdir().unwrap();
    let config = Config::on_loopback(dir.path());
    let broker = Broker::start(config).await.unwrap();
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_sluice"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let broker_url = format!("tcp://{}", broker.tcp_addr);
    let outputs = tokio::task::spawn_blocking(move || {
        commands[1..]
            .iter()
            .map(|command| {
                let output = Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .env("PATH", &path)
                    .env("SLUICE_BROKER", &broker_url)
                    .env_remove("SLUICE_CA_FILE")
                    .output()
                    .unwrap();
                (command.clone(), output)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (command, output) in &outputs {
        assert!(
            output.status.success(),
            "`{command}` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stderr = |index: usize| String::from_utf8_lossy(&outputs[index].1.stderr).into_owned();
    let stdout = |index: usize| String::from_utf8_lossy(&outputs[index].1.stdout).into_owned();
    assert!(stdout(0).contains("created topic orders"));
    assert!(
        stderr(1).contains("sent 3 records, 3 acknowledged"),
        "{}",
        stderr(1)
    );
    assert!(stderr(2).contains("consumed 3 records"), "{}", stderr(2));
    let values: Vec<String> = stdout(2)
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["value"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut sorted = values.clone();
    sorted.sort();
    assert_eq!(sorted, ["order-1", "order-2", "order-3"]);
    assert!(stdout(3).contains("group billing"), "{}", stdout(3));
    broker.shutdown().await;
}
