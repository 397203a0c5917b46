//! Log configuration: broker-wide defaults, per-topic overrides, and the fsync policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How data written with acks weaker than `durable` reaches the disk. Appends with
/// `acks=durable` are always answered only after their bytes are fsynced, whatever the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Schedule an fsync after every append, as soon as the flusher can take it. Nothing
    /// acknowledged is lost on power failure once that fsync completes; throughput is bounded
    /// by the disk's fsync rate (group commit still shares one fsync between many appends).
    Always,
    /// fsync dirty partitions at most every this often. A power loss can lose up to this much of
    /// data acknowledged with `acks=leader` (never data acknowledged with `acks=durable`).
    Interval(Duration),
    /// Leave weak-ack data to the operating system's writeback; fsync only for `acks=durable`,
    /// when a segment rolls (once per segment, which closes its file) and at shutdown. A power
    /// loss can lose any weak-ack data not yet written back.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval(Duration::from_millis(1000))
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `always`, `never` or `interval:<ms>` (ms ≥ 1).
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let milliseconds = text
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| {
                        format!("invalid fsync policy {text:?}: expected always, never or interval:<ms> with ms >= 1")
                    })?;
                Ok(FsyncPolicy::Interval(Duration::from_millis(milliseconds)))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(every) => write!(f, "interval:{}", every.as_millis()),
        }
    }
}

/// Settings of one partition log. Topics override any of them (see
/// [`LogConfig::with_overrides`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll the active segment when the next batch would take it past this size.
    /// Default 1 GiB.
    pub segment_bytes: u64,
    /// Roll the active segment when its first batch is this old. Default 7 days.
    pub segment_ms: u64,
    /// Bytes between two entries of the sparse offset index. Default 4 KiB.
    pub index_interval_bytes: u64,
    /// Delete the oldest closed segments while the log is larger than this. Default: unlimited.
    pub retention_bytes: Option<u64>,
    /// Delete closed segments whose newest record is older than this. Default 7 days.
    pub retention_ms: Option<u64>,
    /// Largest record batch the log accepts. Default 1 MiB.
    pub max_message_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        const DAY_MS: u64 = 24 * 60 * 60 * 1000;
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * DAY_MS,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: Some(7 * DAY_MS),
            max_message_bytes: 1 << 20,
        }
    }
}

/// Keys a topic may override, as they appear in CreateTopics and topic metadata.
pub const OVERRIDABLE_KEYS: [&str; 6] = [
    "segment_bytes",
    "segment_ms",
    "index_interval_bytes",
    "retention_bytes",
    "retention_ms",
    "max_message_bytes",
];

impl LogConfig {
    /// This configuration with per-topic overrides applied. `retention_bytes` and
    /// `retention_ms` accept `-1` for unlimited.
    ///
    /// # Errors
    /// One line naming the key, for an unknown key or a value out of range.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<LogConfig, String> {
        let mut config = self.clone();
        for (key, value) in overrides {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("config {key}: {value:?} is not a non-negative integer"))
            };
            let optional = || {
                if value == "-1" {
                    Ok(None)
                } else {
                    number().map(Some)
                }
            };
            match key {
                "segment_bytes" => config.segment_bytes = number()?,
                "segment_ms" => config.segment_ms = number()?,
                "index_interval_bytes" => config.index_interval_bytes = number()?,
                "retention_bytes" => config.retention_bytes = optional()?,
                "retention_ms" => config.retention_ms = optional()?,
                "max_message_bytes" => config.max_message_bytes = number()?,
                other => {
                    return Err(format!(
                        "unknown topic config {other:?} (known: {})",
                        OVERRIDABLE_KEYS.join(", ")
                    ));
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules.
    ///
    /// # Errors
    /// One line naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        // Segment positions are stored as u32 in the offset index.
        if !(1024..=u64::from(u32::MAX)).contains(&self.segment_bytes) {
            return Err(format!(
                "config segment_bytes: {} is outside 1024..={}",
                self.segment_bytes,
                u32::MAX
            ));
        }
        if self.segment_ms == 0 {
            return Err("config segment_ms: must be at least 1".to_owned());
        }
        if self.index_interval_bytes == 0 {
            return Err("config index_interval_bytes: must be at least 1".to_owned());
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > self.segment_bytes {
            return Err(format!(
                "config max_message_bytes: {} must be between 1 and segment_bytes ({})",
                self.max_message_bytes, self.segment_bytes
            ));
        }
        Ok(())
    }

    /// The effective configuration as key/value pairs, for DescribeTopic.
    pub fn entries(&self) -> Vec<(String, String)> {
        let optional =
            |value: Option<u64>| value.map_or("-1".to_owned(), |value| value.to_string());
        vec![
            ("segment_bytes".into(), self.segment_bytes.to_string()),
            ("segment_ms".into(), self.segment_ms.to_string()),
            (
                "index_interval_bytes".into(),
                self.index_interval_bytes.to_string(),
            ),
            ("retention_bytes".into(), optional(self.retention_bytes)),
            ("retention_ms".into(), optional(self.retention_ms)),
            (
                "max_message_bytes".into(),
                self.max_message_bytes.to_string(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for text in ["always", "never", "interval:250"] {
            assert_eq!(text.parse::<FsyncPolicy>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "sometimes",
            "interval:",
            "interval:0",
            "interval:-5",
            "interval:x",
        ] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(FsyncPolicy::default().to_string(), "interval:1000");
    }

    #[test]
    fn overrides_apply_and_errors_name_the_key() {
        let base = LogConfig::default();
        let config = base
            .with_overrides([
                ("retention_ms", "-1"),
                ("segment_bytes", "4096"),
                ("max_message_bytes", "2048"),
            ])
            .unwrap();
        assert_eq!(config.retention_ms, None);
        assert_eq!(config.segment_bytes, 4096);
        let error = base
            .with_overrides([("segment_bytes", "lots")])
            .unwrap_err();
        assert!(error.contains("segment_bytes"), "{error}");
        let error = base.with_overrides([("colour", "blue")]).unwrap_err();
        assert!(error.contains("colour"), "{error}");
        let error = base.with_overrides([("segment_bytes", "10")]).unwrap_err();
        assert!(error.contains("segment_bytes"), "{error}");
    }

    #[test]
    fn entries_round_trip_through_overrides() {
        let config = LogConfig {
            retention_bytes: Some(1 << 20),
            ..LogConfig::default()
        };
        let entries = config.entries();
        let again = LogConfig::default()
            .with_overrides(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .unwrap();
        assert_eq!(again, config);
    }
}
