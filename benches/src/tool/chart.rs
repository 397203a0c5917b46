//! `--chart FILE.svg`: throughput and latency over time, one point per second, drawn with
//! plotters' SVG backend (no font or system library needed).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::full_palette::GREEN_800;

use super::metrics::{LatencyKind, Sample};
use super::workloads::RunResult;

const WIDTH_PIXELS: u32 = 1000;
const HEIGHT_PIXELS: u32 = 720;

/// A line of the chart: its legend, its colour, and how it reads a point.
type Series<Point> = (&'static str, RGBColor, fn(&Point) -> f64);
/// (second, p50 µs, p99 µs).
type SecondPercentiles = (u64, u64, u64);

/// Draws `result` into `path`, titled `title` (the workload and its labels).
///
/// # Errors
/// The file cannot be written.
pub fn draw(path: &Path, title: &str, result: &RunResult) -> Result<()> {
    draw_into(path, title, result).with_context(|| format!("cannot draw {}", path.display()))
}

fn draw_into(path: &Path, title: &str, result: &RunResult) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH_PIXELS, HEIGHT_PIXELS)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 16))?;
    let (upper, lower) = root.split_vertically(HEIGHT_PIXELS / 2 - 20);

    let last_second = result
        .samples
        .iter()
        .map(|sample| sample.at_seconds)
        .chain(
            result
                .latency_per_second
                .iter()
                .map(|(second, _, _)| *second as f64 + 1.0),
        )
        .fold(1.0_f64, f64::max);

    let highest_rate = result
        .samples
        .iter()
        .map(|sample| sample.acked_per_second.max(sample.consumed_per_second))
        .fold(1.0_f64, f64::max);
    let mut throughput = ChartBuilder::on(&upper)
        .caption("throughput (msgs/s, each second)", ("sans-serif", 14))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..last_second, 0.0..highest_rate * 1.1)?;
    throughput
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msgs/s")
        .y_label_formatter(&|rate| format!("{rate:.0}"))
        .draw()?;
    let series: [Series<Sample>; 2] = [
        ("acknowledged", BLUE, |sample| sample.acked_per_second),
        ("consumed", RED, |sample| sample.consumed_per_second),
    ];
    for (label, color, rate) in series {
        if result.samples.iter().all(|sample| rate(sample) == 0.0) {
            continue;
        }
        throughput
            .draw_series(LineSeries::new(
                result
                    .samples
                    .iter()
                    .map(|sample| (sample.at_seconds, rate(sample))),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    throughput
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let latency_name = match result.headline {
        Some(LatencyKind::SendToAck) => "send→ack",
        Some(LatencyKind::ProduceToConsume) => "produce→consume",
        None => "no per-message latency in this workload",
    };
    let highest_latency = result
        .latency_per_second
        .iter()
        .map(|(_, _, p99)| *p99 as f64)
        .fold(1.0_f64, f64::max);
    let mut latency = ChartBuilder::on(&lower)
        .caption(
            format!("{latency_name} latency (µs, each second)"),
            ("sans-serif", 14),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..last_second, 0.0..highest_latency * 1.1)?;
    latency
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("µs")
        .y_label_formatter(&|microseconds| format!("{microseconds:.0}"))
        .draw()?;
    if !result.latency_per_second.is_empty() {
        // A second's percentiles are drawn at its end, like the throughput samples.
        let percentiles: [Series<SecondPercentiles>; 2] = [
            ("p50", GREEN_800, |(_, p50, _)| *p50 as f64),
            ("p99", MAGENTA, |(_, _, p99)| *p99 as f64),
        ];
        for (label, color, value) in percentiles {
            latency
                .draw_series(LineSeries::new(
                    result
                        .latency_per_second
                        .iter()
                        .map(|point| (point.0 as f64 + 1.0, value(point))),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        latency
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
