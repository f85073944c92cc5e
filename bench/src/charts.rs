//! PNG charts of the summary (plotters, bitmap backend): grouped bars per path for each metric
//! and mode, and lines over the peer count for scale.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{coord::Shift, prelude::*};

use crate::{Mode, PathId, Plan, report::num, run::Results, stats::MetricSummary};

fn color(p: PathId) -> RGBColor {
    match p {
        PathId::D => RGBColor(150, 150, 150),
        PathId::K => RGBColor(31, 119, 180),
        PathId::H => RGBColor(140, 190, 230),
        PathId::E => RGBColor(214, 39, 40),
        PathId::EH => RGBColor(255, 150, 60),
        PathId::R => RGBColor(90, 90, 90),
    }
}

/// A bar chart: file, title, unit, and the (metric, figure, label) of each group per mode.
type BarSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str, &'static str)],
);

/// A group of bars: its label and one value per path.
type Group = (String, Vec<(PathId, f64)>);

fn median_of(r: &Results, mode: Mode, metric: &str, key: &str) -> Vec<(PathId, f64)> {
    r.summary
        .iter()
        .find(|m: &&MetricSummary| m.mode == mode && m.metric == metric)
        .and_then(|m| m.figures.iter().find(|f| f.def.key == key))
        .map(|f| f.median.iter().map(|(p, v)| (*p, *v)).collect())
        .unwrap_or_default()
}

fn modes(r: &Results) -> Vec<Mode> {
    let mut v: Vec<Mode> = r.summary.iter().map(|m| m.mode).collect();
    v.sort();
    v.dedup();
    v
}

/// Draws every chart there is data for; returns (file, title) of each, in report order.
pub fn write(plan: &Plan, r: &Results) -> Result<Vec<(&'static str, &'static str)>> {
    let mut written = Vec::new();
    let specs: [BarSpec; 5] = [
        (
            "throughput.png",
            "TCP throughput, pod → remote pod (median)",
            "Gbit/s",
            &[("tcp1", "gbps", "1 stream"), ("tcp4", "gbps", "4 streams")],
        ),
        (
            "cpu.png",
            "CPU per GB moved (lower is better)",
            "core-seconds per GB",
            &[
                ("tcp1", "cpu_s_per_gb", "1 stream"),
                ("tcp4", "cpu_s_per_gb", "4 streams"),
            ],
        ),
        (
            "latency.png",
            "TCP request/response latency (lower is better)",
            "µs",
            &[("rr", "p50_us", "p50"), ("rr", "p99_us", "p99")],
        ),
        (
            "connections.png",
            "Connection rate (connect, 1 request, close)",
            "connections/s",
            &[
                ("crr_pod", "cps", "pod → pod"),
                ("crr_out", "cps", "pod → outside (NAT)"),
            ],
        ),
        (
            "udp.png",
            "64-byte UDP datagrams delivered",
            "datagrams/s",
            &[("udp", "pps", "pod → pod")],
        ),
    ];
    for (file, title, unit, series) in specs {
        let mut groups: Vec<Group> = Vec::new();
        for mode in modes(r) {
            for (metric, key, label) in series {
                let values = median_of(r, mode, metric, key);
                if !values.is_empty() {
                    groups.push((format!("{}: {label}", mode.name()), values));
                }
            }
        }
        if groups.is_empty() {
            continue;
        }
        bars(&plan.out.join(file), title, unit, &groups)?;
        written.push((file, title));
    }
    let levels = crate::report::scale_levels(r);
    if levels.iter().any(|l| {
        r.summary
            .iter()
            .any(|m| m.metric == format!("scale{l}_tcp1"))
    }) {
        scale(&plan.out.join("scale.png"), r, &levels)?;
        written.push((
            "scale.png",
            "Scale: throughput and latency over the peer count",
        ));
    }
    Ok(written)
}

/// An axis label: like the tables' numbers, but a plain 0.
fn axis(v: f64) -> String {
    if v == 0.0 { "0".to_owned() } else { num(v) }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

fn bars(file: &Path, title: &str, unit: &str, groups: &[Group]) -> Result<()> {
    let root = BitMapBackend::new(file, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = groups
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.18;
    #[expect(clippy::cast_precision_loss, reason = "a handful of groups")]
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(unit)
        .y_label_formatter(&|v| axis(*v))
        .draw()
        .map_err(err)?;
    let mut legend_done = Vec::new();
    for (g, (label, values)) in groups.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a handful of groups and paths")]
        let (g, k) = (g as f64, values.len().max(1) as f64);
        let width = 0.8 / k;
        for (i, (path, v)) in values.iter().enumerate() {
            #[expect(clippy::cast_precision_loss, reason = "at most five paths")]
            let x0 = g + 0.1 + width * i as f64;
            let c = color(*path);
            let series = chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.92, *v)],
                    c.filled(),
                )))
                .map_err(err)?;
            if !legend_done.contains(path) {
                legend_done.push(*path);
                series.label(path.name()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled())
                });
            }
            let (px, py) = chart.backend_coord(&(x0 + width * 0.46, *v));
            root.draw(&Text::new(
                num(*v),
                (px - 14, py - 16),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(err)?;
        }
        let (px, py) = chart.backend_coord(&(g + 0.5, 0.0));
        let style = ("sans-serif", 16).into_font();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_possible_wrap,
            reason = "a short label's width in pixels"
        )]
        let half = (label.chars().count() * 4) as i32;
        root.draw(&Text::new(label.clone(), (px - half, py + 12), style))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn scale(file: &Path, r: &Results, levels: &[u32]) -> Result<()> {
    let root = BitMapBackend::new(file, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 2));
    let mode = r
        .summary
        .iter()
        .find(|m| m.metric.starts_with("scale"))
        .map_or(Mode::Veth, |m| m.mode);
    line_panel(
        &panels[0],
        r,
        mode,
        levels,
        "tcp1",
        "gbps",
        "1-stream Gbit/s vs peers",
    )?;
    line_panel(
        &panels[1],
        r,
        mode,
        levels,
        "rr",
        "p50_us",
        "RR p50 µs vs peers",
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn line_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    r: &Results,
    mode: Mode,
    levels: &[u32],
    suffix: &str,
    key: &str,
    title: &str,
) -> Result<()> {
    let series: Vec<(PathId, Vec<(f64, f64)>)> = [PathId::K, PathId::H, PathId::E, PathId::EH]
        .into_iter()
        .map(|p| {
            let pts = levels
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    median_of(r, mode, &format!("scale{l}_{suffix}"), key)
                        .into_iter()
                        .find(|(q, _)| *q == p)
                        .map(|(_, v)| {
                            #[expect(clippy::cast_precision_loss, reason = "a level index")]
                            let x = i as f64;
                            (x, v)
                        })
                })
                .collect();
            (p, pts)
        })
        .filter(|(_, pts): &(PathId, Vec<(f64, f64)>)| !pts.is_empty())
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.2;
    #[expect(clippy::cast_precision_loss, reason = "a handful of levels")]
    let n = levels.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{title} ({} mode)", mode.name()),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3..(n - 0.7), 0.0..ymax)
        .map_err(err)?;
    let labels: Vec<String> = levels.iter().map(ToString::to_string).collect();
    chart
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&|x| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "an index"
            )]
            let i = x.round() as usize;
            if (x - x.round()).abs() < 1e-6 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("peers")
        .y_label_formatter(&|v| axis(*v))
        .draw()
        .map_err(err)?;
    for (p, pts) in series {
        let c = color(p);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
            .map_err(err)?
            .label(p.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(3)));
        chart
            .draw_series(pts.iter().map(|pt| Circle::new(*pt, 4, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
