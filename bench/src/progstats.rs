//! `--prog-stats`: what our eBPF programs cost per run, from the kernel's own accounting.
//!
//! With `BPF_ENABLE_STATS` (run time) held open for the run, the kernel adds up for every BPF
//! program how often it ran and for how long (`run_cnt`, `run_time_ns`, as `bpftool prog`
//! shows them). Around each load of one of our paths the bench reads both for every loaded
//! program with one of our names; during a load only that path's topology carries traffic, so
//! the differences are its programs' work. They go into the load's sample as extra figures
//! (`bpf:<program>:runs`, `bpf:<program>:ns_per_run`, summed over the nodes), which the report
//! turns into a table. Unlike `perf` samples this needs no symbol attribution and has no
//! sampling noise: it is the figure to watch when changing a program.

use std::{collections::BTreeMap, fmt::Write as _, os::fd::OwnedFd};

use anyhow::{Context, Result};
use aya::programs::loaded_programs;
use overlay_common::names;

use crate::{
    run::Results,
    stats::{Sample, median},
};

/// Our programs, by the name the kernel keeps (at most 15 bytes: `BPF_OBJ_NAME_LEN` − 1).
const PROGRAMS: [&str; 6] = [
    names::UNDERLAY_XDP,
    names::UNDERLAY_INGRESS,
    names::POD_PORT_EGRESS,
    names::POD_EGRESS,
    names::HOST_EGRESS,
    names::UNDERLAY_EGRESS,
];
const KERNEL_NAME_LEN: usize = 15;

/// Turns the kernel's run-time statistics on until the returned descriptor is dropped.
pub fn enable() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on BPF run-time statistics (BPF_ENABLE_STATS) for --prog-stats")
}

/// Runs and run time (ns) of each of our loaded programs, by program id.
#[derive(Default)]
pub struct Snapshot(BTreeMap<u32, (&'static str, u64, u64)>);

impl Snapshot {
    pub fn take() -> Self {
        let mut programs = BTreeMap::new();
        for info in loaded_programs().filter_map(Result::ok) {
            let Some(name) = info.name_as_str() else {
                continue;
            };
            let Some(ours) = PROGRAMS
                .iter()
                .find(|p| p.get(..KERNEL_NAME_LEN).unwrap_or(p) == name)
            else {
                continue;
            };
            let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            programs.insert(info.id(), (*ours, info.run_count(), ns));
        }
        Self(programs)
    }

    /// What ran since `before`, as figures: per program name, runs and mean ns per run (a
    /// program loaded in between counts from zero).
    pub fn figures_since(&self, before: &Self) -> BTreeMap<String, f64> {
        let mut per_name: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (id, (name, runs, ns)) in &self.0 {
            let (runs0, ns0) = before.0.get(id).map_or((0, 0), |(_, r, n)| (*r, *n));
            let e = per_name.entry(name).or_default();
            e.0 += runs.saturating_sub(runs0);
            e.1 += ns.saturating_sub(ns0);
        }
        let mut figures = BTreeMap::new();
        for (name, (runs, ns)) in per_name.into_iter().filter(|(_, (runs, _))| *runs > 0) {
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let (runs, ns) = (runs as f64, ns as f64);
            figures.insert(format!("bpf:{name}:runs"), runs);
            figures.insert(format!("bpf:{name}:ns_per_run"), ns / runs);
        }
        figures
    }
}

/// `(program, figure)` of a `bpf:` figure key.
fn split_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix("bpf:")?.split_once(':')
}

/// The report's table: per mode, path, load and program, the medians over rounds of the runs
/// per load and of the mean run time.
pub fn section(s: &mut String, r: &Results) {
    type Key<'a> = (&'a str, &'a str, &'a str, &'a str);
    let mut values: BTreeMap<Key<'_>, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for sample in &r.samples {
        let Sample {
            mode,
            metric,
            path,
            figures,
            ..
        } = sample;
        for (key, value) in figures {
            let Some((program, figure)) = split_key(key) else {
                continue;
            };
            let e = values
                .entry((mode.name(), path.name(), metric.as_str(), program))
                .or_default();
            match figure {
                "runs" => e.0.push(*value),
                "ns_per_run" => e.1.push(*value),
                _ => {}
            }
        }
    }
    if values.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Our programs' run time (`--prog-stats`)\n\nFrom the kernel's BPF run-time statistics \
         (`BPF_ENABLE_STATS`), read around each load: how often each of our programs ran during \
         the load (both nodes together) and its mean run time, helpers included; medians over \
         the rounds. The statistics themselves add two clock reads to every run, included here \
         and in this run's other figures of E and EH.\n\n\
         | mode | path | load | program | runs per load | ns per run |\n\
         |---|---|---|---|---:|---:|"
    );
    for ((mode, path, metric, program), (runs, ns)) in &values {
        let _ = writeln!(
            s,
            "| {mode} | {path} | {metric} | `{program}` | {:.0} | {:.0} |",
            median(runs).unwrap_or(f64::NAN),
            median(ns).unwrap_or(f64::NAN)
        );
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_differences_summed_per_program_name() {
        let before = Snapshot(BTreeMap::from([
            (10, (names::POD_PORT_EGRESS, 100, 50_000)),
            (11, (names::POD_PORT_EGRESS, 7, 9_000)),
            (12, (names::UNDERLAY_EGRESS, 5, 1_000)),
        ]));
        let after = Snapshot(BTreeMap::from([
            (10, (names::POD_PORT_EGRESS, 300, 150_000)),
            (11, (names::POD_PORT_EGRESS, 7, 9_000)),
            // Loaded during the load: counts from zero.
            (13, (names::POD_PORT_EGRESS, 100, 100_000)),
            // Did not run: left out.
            (12, (names::UNDERLAY_EGRESS, 5, 1_000)),
        ]));
        let f = after.figures_since(&before);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f["bpf:pod_port_egress:runs"], 300.0);
        assert_eq!(f["bpf:pod_port_egress:ns_per_run"], 200_000.0 / 300.0);
    }

    #[test]
    fn kernel_names_are_matched_truncated() {
        assert_eq!(
            names::UNDERLAY_INGRESS.get(..KERNEL_NAME_LEN),
            Some("underlay_ingres")
        );
        assert!(PROGRAMS.iter().all(|p| !p.is_empty()));
        assert_eq!(
            split_key("bpf:underlay_ingress:runs"),
            Some(("underlay_ingress", "runs"))
        );
        assert_eq!(split_key("gbps"), None);
    }
}
