//! The progress bar (indicatif, on stderr, hidden when stderr is not a terminal) and the
//! sampler task behind it, which also records the once-a-second throughput samples the chart
//! and the JSON output are drawn from.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cli::Stop;
use super::metrics::{Meter, Sample};

/// How often the bar moves.
const TICK: Duration = Duration::from_millis(250);
/// How often a sample is taken.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Which counter the bar follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progressing {
    Acked,
    Consumed,
}

/// A progress bar for one phase, hidden when stderr is not a terminal (tests, pipes, CI).
pub fn bar(label: &str, stop: Stop) -> ProgressBar {
    let (length, template) = match stop {
        Stop::Messages(messages) => (
            messages,
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {msg}",
        ),
        // The position is milliseconds of the duration; the message carries the count.
        Stop::After(duration) => (
            u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {msg}",
        ),
    };
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let style = ProgressStyle::with_template(template)
        .expect("constant template is valid")
        .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(length), target).with_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// A running sampler; [`Sampler::finish`] stops it and returns its samples.
#[derive(Debug)]
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Samples `meter` from `start` on, moving `bar` along the `progressing` counter.
    pub fn start(
        meter: Arc<Meter>,
        start: Instant,
        bar: ProgressBar,
        stop_condition: Stop,
        progressing: Progressing,
    ) -> Sampler {
        let (stop, mut stopped) = watch::channel(false);
        // Read now, not when the task first runs: the phase may be well under way by then.
        let mut last_acked = Meter::count(&meter.acked);
        let mut last_consumed = Meter::count(&meter.consumed);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(TICK);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last_sample_at = start;
            let mut rate_text = String::new();
            loop {
                let stopping = tokio::select! {
                    _ = ticker.tick() => false,
                    _ = stopped.wait_for(|stop| *stop) => true,
                };
                let now = Instant::now();
                let acked = Meter::count(&meter.acked);
                let consumed = Meter::count(&meter.consumed);
                let since_sample = now.saturating_duration_since(last_sample_at);
                // A last partial second is kept only when long enough to mean something.
                if since_sample >= SAMPLE_EVERY || (stopping && since_sample >= SAMPLE_EVERY / 5) {
                    let seconds = since_sample.as_secs_f64();
                    let sample = Sample {
                        at_seconds: now.saturating_duration_since(start).as_secs_f64(),
                        acked_per_second: (acked - last_acked) as f64 / seconds,
                        consumed_per_second: (consumed - last_consumed) as f64 / seconds,
                    };
                    let rate = match progressing {
                        Progressing::Acked => sample.acked_per_second,
                        Progressing::Consumed => sample.consumed_per_second,
                    };
                    rate_text = format!("{} msgs/s", group_digits(rate.round() as u64));
                    samples.push(sample);
                    last_sample_at = now;
                    last_acked = acked;
                    last_consumed = consumed;
                }
                let count = match progressing {
                    Progressing::Acked => acked,
                    Progressing::Consumed => consumed,
                };
                match stop_condition {
                    Stop::Messages(_) => {
                        bar.set_position(count);
                        bar.set_message(rate_text.clone());
                    }
                    Stop::After(_) => {
                        let elapsed = now.saturating_duration_since(start).as_millis();
                        bar.set_position(u64::try_from(elapsed).unwrap_or(u64::MAX));
                        bar.set_message(format!("{} msgs  {rate_text}", group_digits(count)));
                    }
                }
                if stopping {
                    bar.finish_and_clear();
                    return samples;
                }
            }
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Vec<Sample> {
        self.stop.send_replace(true);
        // The sampler cannot fail; a panic in it loses only the samples.
        self.task.await.unwrap_or_default()
    }
}

/// `1234567` → `1,234,567`.
pub fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped_in_threes() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000), "1,000");
        assert_eq!(group_digits(1_234_567), "1,234,567");
    }

    #[tokio::test]
    async fn the_sampler_keeps_a_final_partial_second() {
        let meter = Meter::new();
        // Started 600 ms ago and finished at once: long enough for a partial sample (200 ms),
        // short of a full one unless this thread stalls 400 ms. No sleep to overrun.
        let sampler = Sampler::start(
            Arc::clone(&meter),
            Instant::now() - Duration::from_millis(600),
            ProgressBar::hidden(),
            Stop::Messages(10),
            Progressing::Acked,
        );
        meter
            .acked
            .fetch_add(10, std::sync::atomic::Ordering::Relaxed);
        let samples = sampler.finish().await;
        assert_eq!(samples.len(), 1);
        assert!(samples[0].acked_per_second > 0.0);
    }
}
