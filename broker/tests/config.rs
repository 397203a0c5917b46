//! The broker configuration through its public API: defaults, the example file, precedence of
//! flags > environment > file > defaults, every option settable from the environment, one-line
//! errors naming the option, and `validate()`'s rules.
//!
//! The environment is always passed to `load` explicitly, and `Cli` values are built from
//! explicit flags (or `Cli::default()`), so nothing here depends on the real process
//! environment, and no test sets it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use sluice_broker::config::{
    self, BATCH_FRAMING_BYTES, Cli, Config, ConfigError, LogFormat, Logging,
};
use sluice_broker::storage::{FsyncPolicy, LogConfig, StorageOptions};
use sluice_protocol::frame::DEFAULT_MAX_FRAME_BYTES;

fn address(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn env<const N: usize>(pairs: [(&str, &str); N]) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

/// A config file in a fresh temporary directory; keep the directory alive while using it.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn cli_with_file(path: &Path) -> Cli {
    Cli {
        config: Some(path.to_owned()),
        ..Cli::default()
    }
}

fn load_file(text: &str) -> Result<Config, ConfigError> {
    let (_dir, path) = config_file(text);
    config::load(&cli_with_file(&path), no_env())
}

fn example_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml")
}

/// Checks the error contract: one line, naming `needle` (an option or a variable).
#[track_caller]
fn assert_one_line_naming(error: &ConfigError, needle: &str) {
    let message = error.to_string();
    assert!(!message.contains('\n'), "more than one line: {message:?}");
    assert!(
        message.contains(needle),
        "{message:?} does not name {needle}"
    );
}

#[test]
fn defaults_are_the_designed_ones() {
    let config = Config::default();
    assert_eq!(config.data_dir, PathBuf::from("./sluice-data"));
    assert_eq!(config.listeners.tcp, address("127.0.0.1:7171"));
    assert_eq!(config.listeners.quic, address("127.0.0.1:7171"));
    assert_eq!(config.listeners.http, address("127.0.0.1:7172"));
    assert_eq!(config.listeners.tls_cert, None);
    assert_eq!(config.listeners.tls_key, None);
    assert!(config.listeners.tls_names.is_empty());
    assert_eq!(
        config.storage.fsync,
        FsyncPolicy::Interval(Duration::from_millis(1000))
    );
    assert_eq!(config.storage.fsync.to_string(), "interval:1000");
    assert_eq!(config.storage.retention_check_ms, 300_000);
    assert_eq!(config.log_config(), LogConfig::default());
    assert_eq!(config.limits.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(config.limits.max_batch_bytes, 1 << 20);
    assert_eq!(config.limits.max_quic_streams, 64);
    assert_eq!(config.limits.fetch_response_budget_bytes, 256 << 20);
    assert_eq!(config.limits.producer_expiry_ms, 7 * 24 * 60 * 60 * 1000);
    assert_eq!(
        config.limits.group_offsets_retention_ms,
        7 * 24 * 60 * 60 * 1000
    );
    assert_eq!(config.logging.format, LogFormat::Text);
    assert_eq!(config.logging.filter, "info");
    config.validate().unwrap();

    // The storage engine sees its own defaults.
    let options = config.storage_options();
    let engine_defaults = StorageOptions::default();
    assert_eq!(options.fsync, engine_defaults.fsync);
    assert_eq!(options.flusher_threads, engine_defaults.flusher_threads);
    assert_eq!(options.open_segments_max, engine_defaults.open_segments_max);
    assert_eq!(
        options.recovery_checkpoint_ms,
        engine_defaults.recovery_checkpoint_ms
    );
}

#[test]
fn nothing_set_gives_the_defaults() {
    assert_eq!(
        config::load(&Cli::default(), no_env()).unwrap(),
        Config::default()
    );
    // Variables of other programs are none of the broker's business.
    let others = env([
        ("PATH", "/usr/bin"),
        ("RUST_LOG", "debug"),
        ("HOME", "/root"),
    ]);
    assert_eq!(
        config::load(&Cli::default(), others).unwrap(),
        Config::default()
    );
}

#[test]
fn example_file_loads_and_equals_the_defaults() {
    let loaded = config::load(&cli_with_file(&example_file()), no_env()).unwrap();
    assert_eq!(loaded, Config::default());
}

#[test]
fn example_file_documents_every_option() {
    let text = std::fs::read_to_string(example_file()).unwrap();
    for option in config::option_names() {
        let key = option.rsplit('.').next().unwrap();
        // Options without a default value (tls_cert, tls_key) appear commented out.
        let set = text.lines().any(|line| {
            line.trim_start_matches("# ")
                .starts_with(&format!("{key} = "))
        });
        assert!(set, "sluice.example.toml does not show {option}");
    }
    for section in ["[listeners]", "[storage]", "[log]", "[limits]", "[logging]"] {
        assert!(
            text.contains(&format!("\n{section}\n")),
            "missing {section}"
        );
    }
}

#[test]
fn option_names_and_their_variables() {
    let names = config::option_names();
    assert_eq!(names.first().map(String::as_str), Some("data_dir"));
    assert!(names.contains(&"limits.max_frame_bytes".to_owned()));
    assert!(names.contains(&"logging.filter".to_owned()));
    assert_eq!(
        config::environment_variable("limits.max_frame_bytes"),
        "SLUICE_LIMITS_MAX_FRAME_BYTES"
    );
    assert_eq!(config::environment_variable("data_dir"), "SLUICE_DATA_DIR");
}

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let (_dir, path) = config_file(
        r#"
        data_dir = "/from/file"
        [listeners]
        tcp = "127.0.0.1:1001"
        quic = "127.0.0.1:2001"
        [storage]
        fsync = "never"
        [logging]
        format = "json"
        filter = "warn"
        "#,
    );
    let file_only = config::load(&cli_with_file(&path), no_env()).unwrap();
    assert_eq!(file_only.data_dir, PathBuf::from("/from/file"));
    assert_eq!(file_only.listeners.tcp, address("127.0.0.1:1001"));
    assert_eq!(file_only.listeners.quic, address("127.0.0.1:2001"));
    assert_eq!(file_only.storage.fsync, FsyncPolicy::Never);
    assert_eq!(file_only.logging.format, LogFormat::Json);
    // Not in the file: still the default.
    assert_eq!(file_only.listeners.http, address("127.0.0.1:7172"));

    let environment = env([
        ("SLUICE_LISTENERS_TCP", "127.0.0.1:1002"),
        ("SLUICE_STORAGE_FSYNC", "always"),
        ("SLUICE_LOGGING_FILTER", "debug"),
    ]);
    let with_env = config::load(&cli_with_file(&path), environment.clone()).unwrap();
    assert_eq!(with_env.listeners.tcp, address("127.0.0.1:1002"));
    assert_eq!(with_env.storage.fsync, FsyncPolicy::Always);
    assert_eq!(with_env.logging.filter, "debug");
    // Set only in the file: the environment leaves it alone.
    assert_eq!(with_env.listeners.quic, address("127.0.0.1:2001"));
    assert_eq!(with_env.logging.format, LogFormat::Json);

    let path_text = path.to_str().unwrap();
    let cli = Cli::try_parse_from([
        "sluice-broker",
        "--config",
        path_text,
        "--tcp",
        "127.0.0.1:1003",
        "--fsync",
        "interval:250",
        // The default value, given explicitly, still beats the file's json.
        "--log-format",
        "text",
        "--data-dir",
        "/from/flag",
    ])
    .unwrap();
    let with_flags = config::load(&cli, environment).unwrap();
    assert_eq!(with_flags.listeners.tcp, address("127.0.0.1:1003"));
    assert_eq!(
        with_flags.storage.fsync,
        FsyncPolicy::Interval(Duration::from_millis(250))
    );
    assert_eq!(with_flags.logging.format, LogFormat::Text);
    assert_eq!(with_flags.data_dir, PathBuf::from("/from/flag"));
    assert_eq!(with_flags.logging.filter, "debug");
    assert_eq!(with_flags.listeners.quic, address("127.0.0.1:2001"));
}

#[test]
fn short_variables_apply_and_beat_the_long_forms() {
    let environment = env([
        ("SLUICE_LISTENERS_TCP", "127.0.0.1:1002"),
        ("SLUICE_TCP", "127.0.0.1:1004"),
        ("SLUICE_QUIC", "127.0.0.1:1005"),
        ("SLUICE_HTTP", "127.0.0.1:1006"),
        ("SLUICE_FSYNC", "never"),
        ("SLUICE_LOG_FORMAT", "json"),
        ("SLUICE_DATA_DIR", "/from/env"),
    ]);
    let config = config::load(&Cli::default(), environment).unwrap();
    assert_eq!(config.listeners.tcp, address("127.0.0.1:1004"));
    assert_eq!(config.listeners.quic, address("127.0.0.1:1005"));
    assert_eq!(config.listeners.http, address("127.0.0.1:1006"));
    assert_eq!(config.storage.fsync, FsyncPolicy::Never);
    assert_eq!(config.logging.format, LogFormat::Json);
    assert_eq!(config.data_dir, PathBuf::from("/from/env"));
}

#[test]
fn config_variable_names_the_file_and_the_flag_beats_it() {
    let (_dir, from_variable) = config_file("[limits]\nmax_topics = 7\n");
    let (_other_dir, from_flag) = config_file("[limits]\nmax_topics = 8\n");
    let environment = env([("SLUICE_CONFIG", from_variable.to_str().unwrap())]);
    let config = config::load(&Cli::default(), environment.clone()).unwrap();
    assert_eq!(config.limits.max_topics, 7);
    let config = config::load(&cli_with_file(&from_flag), environment).unwrap();
    assert_eq!(config.limits.max_topics, 8);
}

#[test]
fn empty_variables_are_errors() {
    // clap refuses an empty value for its own variables; the long forms do the same.
    for variable in ["SLUICE_LOGGING_FILTER", "SLUICE_CONFIG", "SLUICE_TCP"] {
        let error = config::load(&Cli::default(), env([(variable, "")])).unwrap_err();
        assert!(
            matches!(error, ConfigError::Environment { .. }),
            "{error:?}"
        );
        assert_one_line_naming(&error, variable);
        assert_one_line_naming(&error, "empty value");
    }
    // Those of other tools stay none of the broker's business.
    assert_eq!(
        config::load(&Cli::default(), env([("SLUICE_BROKER", "")])).unwrap(),
        Config::default()
    );
}

/// One non-default value per option, as an environment variable would carry it, and how to
/// see it arrived. `every_option_is_settable_from_the_environment` checks the list is complete.
type Setting = (&'static str, &'static str, fn(&Config) -> bool);

const SETTINGS: &[Setting] = &[
    ("data_dir", "/var/lib/sluice", |c| {
        c.data_dir == Path::new("/var/lib/sluice")
    }),
    ("listeners.tcp", "0.0.0.0:9001", |c| {
        c.listeners.tcp == address("0.0.0.0:9001")
    }),
    ("listeners.quic", "[::1]:9002", |c| {
        c.listeners.quic == address("[::1]:9002")
    }),
    ("listeners.http", "127.0.0.1:9003", |c| {
        c.listeners.http == address("127.0.0.1:9003")
    }),
    // tls_cert and tls_key are only valid together; the other one is set alongside.
    ("listeners.tls_cert", "/etc/sluice/cert.pem", |c| {
        c.listeners.tls_cert.as_deref() == Some(Path::new("/etc/sluice/cert.pem"))
    }),
    ("listeners.tls_key", "/etc/sluice/key.pem", |c| {
        c.listeners.tls_key.as_deref() == Some(Path::new("/etc/sluice/key.pem"))
    }),
    ("listeners.tls_names", "broker.example, 10.0.0.7", |c| {
        c.listeners.tls_names == ["broker.example", "10.0.0.7"]
    }),
    ("storage.fsync", "interval:5", |c| {
        c.storage.fsync == FsyncPolicy::Interval(Duration::from_millis(5))
    }),
    ("storage.flusher_threads", "3", |c| {
        c.storage.flusher_threads == 3
    }),
    ("storage.open_segments_max", "17", |c| {
        c.storage.open_segments_max == 17
    }),
    ("storage.recovery_checkpoint_ms", "1234", |c| {
        c.storage.recovery_checkpoint_ms == 1234
    }),
    ("storage.retention_check_ms", "4321", |c| {
        c.storage.retention_check_ms == 4321
    }),
    ("log.segment_bytes", "2097152", |c| {
        c.log.segment_bytes == 2 << 20
    }),
    ("log.segment_ms", "3600000", |c| {
        c.log.segment_ms == 3_600_000
    }),
    ("log.index_interval_bytes", "512", |c| {
        c.log.index_interval_bytes == 512
    }),
    ("log.retention_bytes", "1000000", |c| {
        c.log.retention_bytes == Some(1_000_000)
    }),
    ("log.retention_ms", "-1", |c| c.log.retention_ms.is_none()),
    ("log.max_message_bytes", "1000", |c| {
        c.log.max_message_bytes == 1000
    }),
    ("limits.max_frame_bytes", "2097152", |c| {
        c.limits.max_frame_bytes == 2 << 20
    }),
    ("limits.max_batch_bytes", "2000000", |c| {
        c.limits.max_batch_bytes == 2_000_000
    }),
    ("limits.max_connections", "10", |c| {
        c.limits.max_connections == 10
    }),
    ("limits.max_in_flight_requests", "11", |c| {
        c.limits.max_in_flight_requests == 11
    }),
    ("limits.max_quic_streams", "12", |c| {
        c.limits.max_quic_streams == 12
    }),
    ("limits.max_partitions_per_topic", "13", |c| {
        c.limits.max_partitions_per_topic == 13
    }),
    ("limits.max_topics", "14", |c| c.limits.max_topics == 14),
    ("limits.max_producers", "15", |c| {
        c.limits.max_producers == 15
    }),
    ("limits.fetch_max_wait_ms", "0", |c| {
        c.limits.fetch_max_wait_ms == 0
    }),
    ("limits.fetch_response_budget_bytes", "16777216", |c| {
        c.limits.fetch_response_budget_bytes == 16 << 20
    }),
    ("limits.fetch_read_ahead_ms", "0", |c| {
        c.limits.fetch_read_ahead_ms == 0
    }),
    ("limits.frame_read_timeout_ms", "5000", |c| {
        c.limits.frame_read_timeout_ms == 5000
    }),
    ("limits.response_write_timeout_ms", "5000", |c| {
        c.limits.response_write_timeout_ms == 5000
    }),
    ("limits.group_min_session_timeout_ms", "1", |c| {
        c.limits.group_min_session_timeout_ms == 1
    }),
    ("limits.group_max_session_timeout_ms", "6000", |c| {
        c.limits.group_max_session_timeout_ms == 6000
    }),
    ("limits.producer_expiry_ms", "60000", |c| {
        c.limits.producer_expiry_ms == 60_000
    }),
    ("limits.group_offsets_retention_ms", "60000", |c| {
        c.limits.group_offsets_retention_ms == 60_000
    }),
    ("logging.format", "json", |c| {
        c.logging.format == LogFormat::Json
    }),
    ("logging.filter", "warn,sluice_broker=debug", |c| {
        c.logging.filter == "warn,sluice_broker=debug"
    }),
];

/// Options that are only valid alongside another one.
fn companion(option: &str) -> Option<(&'static str, &'static str)> {
    match option {
        "listeners.tls_cert" => Some(("SLUICE_LISTENERS_TLS_KEY", "/etc/sluice/key.pem")),
        "listeners.tls_key" => Some(("SLUICE_LISTENERS_TLS_CERT", "/etc/sluice/cert.pem")),
        _ => None,
    }
}

#[test]
fn every_option_is_settable_from_the_environment() {
    let listed: Vec<&str> = SETTINGS.iter().map(|(option, _, _)| *option).collect();
    assert_eq!(
        listed,
        config::option_names(),
        "SETTINGS must list every option, in order"
    );
    for (option, raw, arrived) in SETTINGS {
        let variable = config::environment_variable(option);
        let mut environment = vec![(variable.clone(), (*raw).to_owned())];
        if let Some((name, value)) = companion(option) {
            environment.push((name.to_owned(), value.to_owned()));
        }
        let config = config::load(&Cli::default(), environment)
            .unwrap_or_else(|error| panic!("{variable}={raw}: {error}"));
        assert!(arrived(&config), "{variable}={raw} did not set {option}");
        assert_ne!(
            config,
            Config::default(),
            "{variable}={raw} changed nothing"
        );
    }
}

#[test]
fn every_option_is_settable_from_the_file() {
    // The same values, written as TOML: strings quoted, numbers and lists as they are.
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    let mut top_level = Vec::new();
    for (option, raw, _) in SETTINGS {
        let value = if raw.parse::<i64>().is_ok() {
            (*raw).to_owned()
        } else if *option == "listeners.tls_names" {
            let names: Vec<String> = raw.split(',').map(|n| format!("{:?}", n.trim())).collect();
            format!("[{}]", names.join(", "))
        } else {
            format!("{raw:?}")
        };
        match option.split_once('.') {
            Some((section, key)) => {
                let line = format!("{key} = {value}");
                match sections.iter_mut().find(|(name, _)| *name == section) {
                    Some((_, lines)) => lines.push(line),
                    None => sections.push((section, vec![line])),
                }
            }
            None => top_level.push(format!("{option} = {value}")),
        }
    }
    let mut text = top_level.join("\n");
    for (section, lines) in sections {
        text.push_str(&format!("\n[{section}]\n{}\n", lines.join("\n")));
    }
    let config = load_file(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
    for (option, raw, arrived) in SETTINGS {
        assert!(
            arrived(&config),
            "{option} = {raw} did not arrive from the file"
        );
    }
}

#[test]
fn lists_from_the_environment_take_toml_or_commas() {
    for raw in [r#"["a.example", "10.0.0.7"]"#, "a.example,10.0.0.7"] {
        let config =
            config::load(&Cli::default(), env([("SLUICE_LISTENERS_TLS_NAMES", raw)])).unwrap();
        assert_eq!(
            config.listeners.tls_names,
            ["a.example", "10.0.0.7"],
            "{raw}"
        );
    }
    // A string option keeps a value that happens to be TOML of another type.
    let config = config::load(&Cli::default(), env([("SLUICE_DATA_DIR", "2024")])).unwrap();
    assert_eq!(config.data_dir, PathBuf::from("2024"));
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let error = config::load(&cli_with_file(&path), no_env()).unwrap_err();
    assert!(matches!(error, ConfigError::ReadFile { .. }), "{error:?}");
    assert_one_line_naming(&error, "absent.toml");
}

#[test]
fn syntax_error_names_the_line() {
    let error = load_file("[limits]\nmax_topics = 5\nmax_connections = = 3\n").unwrap_err();
    assert!(
        matches!(error, ConfigError::Syntax { line: 3, .. }),
        "{error:?}"
    );
    assert_one_line_naming(&error, "sluice.toml:3:");
}

#[test]
fn unknown_keys_in_the_file_are_named() {
    for (text, option) in [
        ("[limits]\ncolour = 5\n", "limits.colour"),
        ("[limit]\nmax_topics = 5\n", "limit"),
        ("colour = 5\n", "colour"),
        ("[limits.nested]\nmax_topics = 5\n", "limits.nested"),
        // A key of another section.
        ("[limits]\nfsync = \"always\"\n", "limits.fsync"),
    ] {
        let error = load_file(text).unwrap_err();
        assert!(matches!(error, ConfigError::File { .. }), "{error:?}");
        assert_eq!(error.option(), Some(option), "{text}");
        assert_one_line_naming(&error, option);
        assert_one_line_naming(&error, "unknown option");
    }
}

#[test]
fn bad_values_in_the_file_are_named() {
    for (text, option) in [
        (
            "[limits]\nmax_frame_bytes = \"big\"\n",
            "limits.max_frame_bytes",
        ),
        ("[limits]\nmax_frame_bytes = -1\n", "limits.max_frame_bytes"),
        (
            "[limits]\nmax_frame_bytes = 4294967296\n",
            "limits.max_frame_bytes",
        ),
        ("[storage]\nfsync = \"sometimes\"\n", "storage.fsync"),
        ("[storage]\nfsync = \"interval:0\"\n", "storage.fsync"),
        ("[log]\nretention_ms = -2\n", "log.retention_ms"),
        ("[listeners]\ntcp = \"localhost\"\n", "listeners.tcp"),
        ("[logging]\nformat = \"xml\"\n", "logging.format"),
        ("data_dir = 5\n", "data_dir"),
        ("limits = 5\n", "limits"),
    ] {
        let error = load_file(text).unwrap_err();
        assert!(
            matches!(error, ConfigError::File { .. }),
            "{text}: {error:?}"
        );
        assert_eq!(error.option(), Some(option), "{text}");
        assert_one_line_naming(&error, option);
    }
}

/// Limits the broker's own arithmetic cannot take (a deadline past what the clock adds up, more
/// permits than a semaphore holds) are refused by name instead of panicking later.
#[test]
fn out_of_range_limits_are_named() {
    for (text, option) in [
        (
            "[limits]\nframe_read_timeout_ms = 100000000000\n",
            "limits.frame_read_timeout_ms",
        ),
        (
            "[limits]\nresponse_write_timeout_ms = 0\n",
            "limits.response_write_timeout_ms",
        ),
        (
            "[limits]\nmax_in_flight_requests = 10000000000\n",
            "limits.max_in_flight_requests",
        ),
        // Cast to u32 for the coordinator: 2^32 became 0 and every join was refused.
        (
            "[limits]\ngroup_max_session_timeout_ms = 4294967296\n",
            "limits.group_max_session_timeout_ms",
        ),
        // quinn keeps state for every stream a connection may open.
        (
            "[limits]\nmax_quic_streams = 4294967295\n",
            "limits.max_quic_streams",
        ),
        // One thread each, started at once: ten million ended in a panic, not a message.
        (
            "[storage]\nflusher_threads = 10000000\n",
            "storage.flusher_threads",
        ),
        (
            "[limits]\nfetch_read_ahead_ms = 100000000000000000\n",
            "limits.fetch_read_ahead_ms",
        ),
        (
            "[limits]\nproducer_expiry_ms = 100000000000000000\n",
            "limits.producer_expiry_ms",
        ),
        (
            "[limits]\ngroup_offsets_retention_ms = 100000000000000000\n",
            "limits.group_offsets_retention_ms",
        ),
        (
            "[storage]\nrecovery_checkpoint_ms = 100000000000000000\n",
            "storage.recovery_checkpoint_ms",
        ),
        (
            "[storage]\nretention_check_ms = 100000000000000000\n",
            "storage.retention_check_ms",
        ),
        (
            "[storage]\nfsync = \"interval:100000000000000000\"\n",
            "storage.fsync",
        ),
    ] {
        let error = load_file(text).unwrap_err();
        assert_eq!(error.option(), Some(option), "{text}");
        assert_one_line_naming(&error, option);
    }
}

#[test]
fn unknown_variables_are_named() {
    for variable in [
        "SLUICE_LIMITS_COLOUR",
        "SLUICE_LIMIT_MAX_TOPICS",
        "SLUICE_COLOUR",
        "SLUICE_LOG_FILTER",
        "SLUICE_LISTENERS",
    ] {
        let error = config::load(&Cli::default(), env([(variable, "5")])).unwrap_err();
        assert!(
            matches!(error, ConfigError::Environment { .. }),
            "{error:?}"
        );
        assert_one_line_naming(&error, variable);
        assert_one_line_naming(&error, "unknown variable");
    }
}

#[test]
fn variables_of_other_tools_are_ignored() {
    let environment = env([
        ("SLUICE_BROKER", "quic://127.0.0.1:7171"),
        ("SLUICE_CA_FILE", "/tmp/cert.pem"),
        ("SLUICE_BENCH_DIR", "/tmp"),
    ]);
    assert_eq!(
        config::load(&Cli::default(), environment).unwrap(),
        Config::default()
    );
}

#[test]
fn bad_values_in_the_environment_name_variable_and_option() {
    for (variable, raw, option) in [
        (
            "SLUICE_LIMITS_MAX_FRAME_BYTES",
            "lots",
            "limits.max_frame_bytes",
        ),
        (
            "SLUICE_LIMITS_MAX_FRAME_BYTES",
            "-5",
            "limits.max_frame_bytes",
        ),
        ("SLUICE_STORAGE_FSYNC", "sometimes", "storage.fsync"),
        ("SLUICE_LOG_RETENTION_BYTES", "-7", "log.retention_bytes"),
        ("SLUICE_LISTENERS_TCP", "127.0.0.1", "listeners.tcp"),
        ("SLUICE_TCP", "nowhere", "listeners.tcp"),
        ("SLUICE_FSYNC", "interval:", "storage.fsync"),
        ("SLUICE_LOG_FORMAT", "xml", "logging.format"),
    ] {
        let error = config::load(&Cli::default(), env([(variable, raw)])).unwrap_err();
        assert!(
            matches!(error, ConfigError::Environment { .. }),
            "{error:?}"
        );
        assert_eq!(error.option(), Some(option), "{variable}={raw}");
        assert_one_line_naming(&error, variable);
        assert_one_line_naming(&error, option);
    }
}

#[test]
fn load_validates_the_result() {
    let environment = env([
        ("SLUICE_LIMITS_GROUP_MIN_SESSION_TIMEOUT_MS", "9000"),
        ("SLUICE_LIMITS_GROUP_MAX_SESSION_TIMEOUT_MS", "8000"),
    ]);
    let error = config::load(&Cli::default(), environment).unwrap_err();
    assert!(matches!(error, ConfigError::Invalid { .. }), "{error:?}");
    assert_one_line_naming(&error, "limits.group_min_session_timeout_ms");
}

#[test]
fn validate_names_the_option_that_breaks_a_rule() {
    type Breakage = (&'static str, fn(&mut Config));
    let breakages: &[Breakage] = &[
        ("data_dir", |c| c.data_dir = PathBuf::new()),
        ("listeners.http", |c| c.listeners.http = c.listeners.tcp),
        ("listeners.tls_key", |c| {
            c.listeners.tls_cert = Some("cert.pem".into());
        }),
        ("listeners.tls_cert", |c| {
            c.listeners.tls_key = Some("key.pem".into());
        }),
        ("listeners.tls_names", |c| {
            c.listeners.tls_names = vec![" ".into()];
        }),
        ("storage.fsync", |c| {
            c.storage.fsync = FsyncPolicy::Interval(Duration::ZERO);
        }),
        ("storage.flusher_threads", |c| c.storage.flusher_threads = 0),
        ("storage.open_segments_max", |c| {
            c.storage.open_segments_max = 0;
        }),
        ("storage.recovery_checkpoint_ms", |c| {
            c.storage.recovery_checkpoint_ms = 0;
        }),
        ("storage.retention_check_ms", |c| {
            c.storage.retention_check_ms = 0;
        }),
        ("log.segment_bytes", |c| c.log.segment_bytes = 10),
        ("log.segment_ms", |c| c.log.segment_ms = 0),
        ("log.index_interval_bytes", |c| {
            c.log.index_interval_bytes = 0
        }),
        ("log.max_message_bytes", |c| c.log.max_message_bytes = 0),
        ("log.max_message_bytes", |c| {
            c.log.max_message_bytes = u64::from(c.limits.max_batch_bytes) + 1;
        }),
        ("limits.max_frame_bytes", |c| {
            c.limits.max_frame_bytes = 1023
        }),
        ("limits.max_batch_bytes", |c| c.limits.max_batch_bytes = 0),
        ("limits.max_batch_bytes", |c| {
            c.limits.max_batch_bytes = c.limits.max_frame_bytes - BATCH_FRAMING_BYTES + 1;
        }),
        ("limits.max_connections", |c| c.limits.max_connections = 0),
        ("limits.max_in_flight_requests", |c| {
            c.limits.max_in_flight_requests = 0;
        }),
        ("limits.max_quic_streams", |c| c.limits.max_quic_streams = 0),
        ("limits.max_partitions_per_topic", |c| {
            c.limits.max_partitions_per_topic = 0;
        }),
        ("limits.max_topics", |c| c.limits.max_topics = 0),
        ("limits.max_producers", |c| c.limits.max_producers = 0),
        ("limits.fetch_response_budget_bytes", |c| {
            c.limits.fetch_response_budget_bytes = u64::from(c.limits.max_frame_bytes) - 1;
        }),
        ("limits.frame_read_timeout_ms", |c| {
            c.limits.frame_read_timeout_ms = 0;
        }),
        ("limits.group_min_session_timeout_ms", |c| {
            c.limits.group_min_session_timeout_ms = 0;
        }),
        ("limits.group_min_session_timeout_ms", |c| {
            c.limits.group_min_session_timeout_ms = c.limits.group_max_session_timeout_ms + 1;
        }),
        ("limits.producer_expiry_ms", |c| {
            c.limits.producer_expiry_ms = 0
        }),
        ("limits.group_offsets_retention_ms", |c| {
            c.limits.group_offsets_retention_ms = 0
        }),
        ("logging.filter", |c| c.logging.filter = "info,[".into()),
    ];
    for (option, breakage) in breakages {
        let mut config = Config::default();
        breakage(&mut config);
        let error = config
            .validate()
            .expect_err(&format!("breaking {option} was accepted"));
        assert!(matches!(error, ConfigError::Invalid { .. }), "{error:?}");
        assert_eq!(error.option(), Some(*option), "{error}");
        assert_one_line_naming(&error, option);
    }
}

#[test]
fn validate_accepts_the_edges() {
    let mut config = Config::default();
    // The largest batch that still fits in a frame.
    config.limits.max_frame_bytes = 1024;
    config.limits.max_batch_bytes = 1024 - BATCH_FRAMING_BYTES;
    config.log.max_message_bytes = u64::from(config.limits.max_batch_bytes);
    config.log.segment_bytes = 1024;
    config.limits.fetch_response_budget_bytes = 1024;
    config.limits.group_min_session_timeout_ms = 5000;
    config.limits.group_max_session_timeout_ms = 5000;
    config.limits.fetch_max_wait_ms = 0;
    // Port 0 twice is two different ephemeral ports.
    config.listeners.tcp = address("127.0.0.1:0");
    config.listeners.http = address("127.0.0.1:0");
    config.listeners.tls_cert = Some("cert.pem".into());
    config.listeners.tls_key = Some("key.pem".into());
    config.log.retention_bytes = Some(0);
    config.validate().unwrap();
}

#[test]
fn cli_parses_the_designed_flags() {
    Cli::command().debug_assert();
    let cli = Cli::try_parse_from([
        "sluice-broker",
        "--config",
        "sluice.toml",
        "--data-dir",
        "/data",
        "--tcp",
        "0.0.0.0:7171",
        "--quic",
        "[::]:7171",
        "--http",
        "0.0.0.0:7172",
        "--fsync",
        "always",
        "--log-format",
        "json",
    ])
    .unwrap();
    assert_eq!(
        cli,
        Cli {
            config: Some("sluice.toml".into()),
            data_dir: Some("/data".into()),
            tcp: Some(address("0.0.0.0:7171")),
            quic: Some(address("[::]:7171")),
            http: Some(address("0.0.0.0:7172")),
            fsync: Some(FsyncPolicy::Always),
            log_format: Some(LogFormat::Json),
        }
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    for args in [
        ["sluice-broker", "--fsync", "sometimes"],
        ["sluice-broker", "--fsync", "interval:0"],
        ["sluice-broker", "--tcp", "localhost"],
        ["sluice-broker", "--quic", "7171"],
        ["sluice-broker", "--http", "127.0.0.1:http"],
        ["sluice-broker", "--log-format", "xml"],
    ] {
        let error = Cli::try_parse_from(args).expect_err(&format!("{args:?} was accepted"));
        // ValueValidation from a value parser, InvalidValue from the text|json choice.
        assert!(
            matches!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
            ),
            "{args:?}: {error}"
        );
        // Usage errors go to stderr and exit 2.
        assert!(error.use_stderr());
        assert_eq!(error.exit_code(), 2);
    }
    let error = Cli::try_parse_from(["sluice-broker", "--colour", "blue"]).unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
}

#[test]
fn long_help_explains_precedence() {
    let help = Cli::command().render_long_help().to_string();
    for needle in [
        "SLUICE_CONFIG",
        "SLUICE_<SECTION>_<KEY>",
        "RUST_LOG",
        "--fsync",
        "always|interval:MS|never",
    ] {
        assert!(help.contains(needle), "long help lacks {needle}:\n{help}");
    }
}

#[test]
fn rust_log_replaces_the_configured_filter() {
    let logging = Logging {
        filter: "warn".into(),
        ..Logging::default()
    };
    let filter = config::tracing_filter(&logging, None).unwrap();
    assert_eq!(filter.to_string(), "warn");
    let filter = config::tracing_filter(&logging, Some("debug")).unwrap();
    assert_eq!(filter.to_string(), "debug");
    let filter = config::tracing_filter(&logging, Some("  ")).unwrap();
    assert_eq!(filter.to_string(), "warn");

    let error = config::tracing_filter(&logging, Some("info,[")).unwrap_err();
    assert_one_line_naming(&error, "RUST_LOG");
    let broken = Logging {
        filter: "info,[".into(),
        ..Logging::default()
    };
    let error = config::tracing_filter(&broken, None).unwrap_err();
    assert_one_line_naming(&error, "logging.filter");
}

#[test]
fn init_tracing_twice_is_an_error_not_a_panic() {
    // This test binary installs no other subscriber; whatever the first call does (it reads
    // the real RUST_LOG), the second one finds a subscriber in place.
    let _ = config::init_tracing(&Logging::default());
    let error = config::init_tracing(&Logging::default()).unwrap_err();
    assert!(!error.to_string().contains('\n'), "{error}");
}
