//! `overlay-bench run`: per mode, build every path, measure in interleaved rounds, then scale
//! and propagation; write the artifacts (also when some measurements failed, which then makes
//! the run exit non-zero).

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Context, Result, bail};
use overlay_tests::cmd;
use serde::{Deserialize, Serialize};

use crate::{
    Metric, Mode, PathId, Plan,
    load::{self, Measured, Profile},
    progstats::Snapshot,
    scale,
    stats::{Sample, quantile},
    topo::PathTopo,
};

/// Everything `results.json` holds.
#[derive(Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    pub samples: Vec<Sample>,
    /// Summaries, as in report.md (recomputed from the samples when read back).
    pub summary: Vec<crate::stats::MetricSummary>,
    /// Failed measurements: what, and the error.
    pub failures: Vec<String>,
}

/// What [`rerender`] reads back from `results.json`.
#[derive(Deserialize)]
struct Stored {
    meta: Meta,
    samples: Vec<Sample>,
    failures: Vec<String>,
}

/// `overlay-bench report`: report.md and the charts from an earlier run's results.json.
pub fn rerender(results: &std::path::Path, out: Option<std::path::PathBuf>) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("reading {}", results.display()))?;
    let stored: Stored = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a results.json of overlay-bench",
            results.display()
        )
    })?;
    let mut plan: Plan =
        serde_json::from_value(stored.meta.plan.clone()).context("results.json: meta.plan")?;
    plan.out = out.unwrap_or_else(|| {
        results
            .parent()
            .map_or_else(|| ".".into(), std::path::Path::to_path_buf)
    });
    std::fs::create_dir_all(&plan.out)?;
    let summary = crate::stats::summarize(&stored.samples);
    let r = Results {
        meta: stored.meta,
        samples: stored.samples,
        summary,
        failures: stored.failures,
    };
    let charts = crate::charts::write(&plan, &r)?;
    crate::report::write_markdown(&plan, &r, &charts)?;
    println!("wrote {}/report.md and the charts", plan.out.display());
    Ok(())
}

/// Offload features (`ethtool -k`: feature → on/off) per device label.
pub type DeviceOffloads = BTreeMap<String, BTreeMap<String, String>>;

/// One load of a metric: its sample name and how to run it (with an optional profile).
type Load<'a> = (
    &'static str,
    Box<dyn Fn(Option<&Profile>) -> Result<Measured> + 'a>,
);

/// The machine and the run, so a reader can judge fairness.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Meta {
    pub date_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub git_commit: String,
    pub tools: BTreeMap<String, String>,
    pub plan: serde_json::Value,
    pub elapsed_s: f64,
    /// Steal over the whole run, core-seconds, and as a share of all CPU time.
    pub steal_s: f64,
    pub steal_share: f64,
    /// Offload settings per mode, path and device: feature → value.
    pub offloads: BTreeMap<String, BTreeMap<String, DeviceOffloads>>,
    /// Kernel state of the stock paths (iptables-save, routes, fdb on one node).
    pub stock_state: BTreeMap<String, String>,
    /// How each path's nodes are built.
    pub paths: BTreeMap<String, String>,
    /// Our agents' counters at the end of each mode (mode → path → node → name → packets):
    /// which hooks did the work (see `report::counters_section`).
    #[serde(default)]
    pub counters: BTreeMap<String, BTreeMap<String, NodeCounters>>,
}

/// One path's agents' counters: node → counter name → packets.
pub type NodeCounters = BTreeMap<String, BTreeMap<String, u64>>;

const BASE: [Metric; 5] = [
    Metric::Tcp1,
    Metric::Tcp4,
    Metric::Rr,
    Metric::Crr,
    Metric::Udp,
];

pub fn run(plan: &Plan) -> Result<()> {
    overlay_tests::require_root();
    check_tools(plan)?;
    if let Err(e) = overlay_tests::cleanup_leftovers() {
        eprintln!("overlay-bench: warning: {e:#}");
    }
    if matches!(plan.profile, Some(Metric::Scale | Metric::Propagation)) {
        bail!("--profile takes one of tcp1, tcp4, rr, crr, udp");
    }
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating {}", plan.out.display()))?;
    if plan.profile.is_some() {
        std::fs::create_dir_all(plan.out.join("profile"))?;
    }
    let _prog_stats = plan.prog_stats.then(crate::progstats::enable).transpose()?;
    let started = Instant::now();
    let cpu_start = load::CpuTimes::now()?;
    let mut meta = Meta::collect(plan)?;
    let mut samples = Vec::new();
    let mut failures = Vec::new();

    for &mode in &plan.modes {
        println!(
            "== mode {}: building {} paths",
            mode.name(),
            plan.paths.len()
        );
        let mut topos = Vec::new();
        for &id in &plan.paths {
            let t = Instant::now();
            let topo = PathTopo::build(id, mode)
                .with_context(|| format!("building path {} in mode {}", id.name(), mode.name()))?;
            println!(
                "   {:<2} ready in {:.1?}: {}",
                id.name(),
                t.elapsed(),
                id.describe()
            );
            record_offloads(&mut meta, mode, &topo);
            if !topo.state.is_empty() {
                meta.stock_state
                    .entry(id.name().to_owned())
                    .or_insert_with(|| topo.state.clone());
            }
            topos.push(topo);
        }
        for round in 0..plan.rounds {
            let all: Vec<&PathTopo> = topos.iter().collect();
            let order = rotated(&all, round);
            for metric in BASE.iter().filter(|m| plan.has(**m)) {
                for topo in &order {
                    measure_base(
                        plan,
                        mode,
                        round,
                        *metric,
                        topo,
                        &mut samples,
                        &mut failures,
                    );
                }
            }
        }
        if mode == plan.scale_mode && (plan.has(Metric::Scale) || plan.has(Metric::Propagation)) {
            run_scale(plan, mode, &topos, &mut samples, &mut failures)?;
        }
        record_counters(&mut meta, mode, &topos);
        println!("== mode {}: removing the topologies", mode.name());
        drop(topos);
    }

    let cpu = load::CpuTimes::now()?.since(cpu_start);
    meta.elapsed_s = started.elapsed().as_secs_f64();
    meta.steal_s = cpu.steal;
    let online = meta.cpus.max(1);
    #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
    let all = meta.elapsed_s * online as f64;
    meta.steal_share = if all > 0.0 { cpu.steal / all } else { 0.0 };
    let summary = crate::stats::summarize(&samples);
    let results = Results {
        meta,
        samples,
        summary,
        failures,
    };
    let charts = crate::charts::write(plan, &results)?;
    crate::report::write(plan, &results, &charts)?;
    println!(
        "== wrote {}/report.md, results.json and charts in {:.0?}",
        plan.out.display(),
        started.elapsed()
    );
    if !results.failures.is_empty() {
        bail!(
            "{} measurement(s) failed (listed in the report):\n{}",
            results.failures.len(),
            results.failures.join("\n")
        );
    }
    Ok(())
}

/// The paths in round-robin order starting at `round` (so no path always runs first).
fn rotated<T: Copy>(items: &[T], round: u32) -> Vec<T> {
    let n = items.len().max(1);
    let start = round as usize % n;
    items[start..]
        .iter()
        .chain(&items[..start])
        .copied()
        .collect()
}

/// A load measured at every scale level.
type ScaleLoad = fn(&PathTopo, &Plan) -> Result<Measured>;

fn profile_for(
    plan: &Plan,
    mode: Mode,
    round: u32,
    metric: Metric,
    name: &str,
    path: PathId,
) -> Option<Profile> {
    (plan.profile == Some(metric) && round == 0).then(|| Profile {
        stem: load::profile_stem(&plan.out, mode.name(), name, path.name()),
    })
}

fn measure_base(
    plan: &Plan,
    mode: Mode,
    round: u32,
    metric: Metric,
    topo: &PathTopo,
    samples: &mut Vec<Sample>,
    failures: &mut Vec<String>,
) {
    if !topo.id.measures(metric) {
        return;
    }
    let runs: Vec<Load<'_>> = match metric {
        Metric::Tcp1 => vec![("tcp1", Box::new(|p| load::tcp(topo, plan, 1, p)))],
        Metric::Tcp4 => vec![("tcp4", Box::new(|p| load::tcp(topo, plan, 4, p)))],
        Metric::Rr => vec![("rr", Box::new(|p| load::rr(topo, plan, p)))],
        Metric::Udp => vec![("udp", Box::new(|p| load::udp(topo, plan, p)))],
        Metric::Crr => {
            // A new port each round: flows of earlier rounds may still hold NAT state.
            let port = 7000 + u16::try_from(round % 1000).unwrap_or(0);
            let mut v: Vec<Load<'_>> = vec![(
                "crr_pod",
                Box::new(move |p| load::crr(topo, plan, &topo.server, topo.server_ip, port, p)),
            )];
            if let Some((ns, ip)) = &topo.outside {
                v.push((
                    "crr_out",
                    Box::new(move |p| load::crr(topo, plan, ns, *ip, port, p)),
                ));
            }
            v
        }
        Metric::Scale | Metric::Propagation => return,
    };
    // Our programs' work during the load (`--prog-stats`); other paths have none of them.
    let prog_stats = plan.prog_stats && matches!(topo.id, PathId::E | PathId::EH);
    for (name, f) in runs {
        let profile = profile_for(plan, mode, round, metric, name, topo.id);
        let before = prog_stats.then(Snapshot::take);
        let mut result = f(profile.as_ref());
        if let (Some(before), Ok(m)) = (before, &mut result) {
            m.figures.extend(Snapshot::take().figures_since(&before));
        }
        record(samples, failures, mode, round, name, topo.id, result);
    }
}

fn record(
    samples: &mut Vec<Sample>,
    failures: &mut Vec<String>,
    mode: Mode,
    round: u32,
    metric: &str,
    path: PathId,
    result: Result<Measured>,
) {
    match result {
        Ok(m) => {
            let shown: Vec<String> = crate::stats::figure_defs(metric)
                .iter()
                .filter_map(|d| m.figures.get(d.key).map(|v| format!("{} {v:.3}", d.label)))
                .collect();
            println!(
                "   {} round {round} {metric:<14} {:<2} {}",
                mode.name(),
                path.name(),
                shown.join(", ")
            );
            samples.push(Sample {
                mode,
                round,
                metric: metric.to_owned(),
                path,
                figures: m.figures,
                series: Vec::new(),
                command: m.command,
            });
        }
        Err(e) => {
            let what = format!(
                "{} round {round} {metric} {}: {e:#}",
                mode.name(),
                path.name()
            );
            eprintln!("   FAILED {what}");
            failures.push(what);
        }
    }
}

fn run_scale(
    plan: &Plan,
    mode: Mode,
    topos: &[PathTopo],
    samples: &mut Vec<Sample>,
    failures: &mut Vec<String>,
) -> Result<()> {
    let scaled: Vec<&PathTopo> = topos.iter().filter(|t| t.id.has_peers()).collect();
    if scaled.is_empty() {
        println!("== scale: no path with nodes selected");
        return Ok(());
    }
    // Each topology starts with one peer (the other node).
    let mut fakes = 0;
    for &level in &plan.scale_peers {
        let want = level - 1;
        println!(
            "== scale: {level} peers (adding {} fake leases per path)",
            want - fakes
        );
        for topo in &scaled {
            let t = Instant::now();
            scale::add_peers(topo, fakes, want)
                .with_context(|| format!("adding peers to {}", topo.id.name()))?;
            println!(
                "   {:<2} has {level} peers ({:.1?})",
                topo.id.name(),
                t.elapsed()
            );
        }
        fakes = want;
        if plan.has(Metric::Scale) {
            for round in 0..plan.rounds {
                let loads: [(&str, ScaleLoad); 2] = [
                    ("tcp1", |t, p| load::tcp(t, p, 1, None)),
                    ("rr", |t, p| load::rr(t, p, None)),
                ];
                for (suffix, f) in loads {
                    for topo in rotated(&scaled, round) {
                        let name = format!("scale{level}_{suffix}");
                        let r = f(topo, plan);
                        record(samples, failures, mode, round, &name, topo.id, r);
                    }
                }
            }
        }
        if plan.has(Metric::Propagation) {
            for topo in scaled.iter().filter(|t| t.id.is_ours()) {
                let name = format!("propagation{level}");
                let result = scale::propagation(topo, plan.changes).map(|times| {
                    let q = |x: f64| quantile(&times, x).unwrap_or(f64::NAN);
                    let figures: load::Figures =
                        [("p50_ms", q(0.5)), ("p99_ms", q(0.99)), ("max_ms", q(1.0))]
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect();
                    (figures, times)
                });
                match result {
                    Ok((figures, times)) => {
                        println!(
                            "   {} {name} {:<2} p50 {:.2} ms, p99 {:.2} ms over {} changes",
                            mode.name(),
                            topo.id.name(),
                            figures["p50_ms"],
                            figures["p99_ms"],
                            times.len()
                        );
                        samples.push(Sample {
                            mode,
                            round: 0,
                            metric: name,
                            path: topo.id,
                            figures,
                            series: times,
                            command: "etcd put of a new lease (JSON gateway), then poll every node's pinned ROUTE_V4".to_owned(),
                        });
                    }
                    Err(e) => {
                        let what = format!("{} {name} {}: {e:#}", mode.name(), topo.id.name());
                        eprintln!("   FAILED {what}");
                        failures.push(what);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Our agents' counters (`overlay-agent counters`) after a mode's loads, per node of E and EH;
/// warns when the pods' packets were not picked up at their veths or not delivered straight
/// into the pods, i.e. when the run did not measure the path it means to.
fn record_counters(meta: &mut Meta, mode: Mode, topos: &[PathTopo]) {
    for topo in topos {
        let Some(cluster) = topo
            .cluster()
            .filter(|_| matches!(topo.id, PathId::E | PathId::EH))
        else {
            continue;
        };
        let mut nodes = BTreeMap::new();
        for node in cluster.nodes() {
            match node
                .agent_cmd(&["counters"])
                .and_then(|out| overlay_tests::checks::parse_counters(&out))
            {
                Ok(counters) => {
                    nodes.insert(node.name().to_owned(), counters);
                }
                Err(e) => eprintln!(
                    "overlay-bench: warning: counters of {} ({}): {e:#}",
                    node.name(),
                    topo.id.name()
                ),
            }
        }
        // No load goes through a Service or a published port, so no connection is the
        // kernel's: one filed as such had its packets left to the kernel's forwarding.
        for (node, counters) in &nodes {
            if let Some(n) = counters.get("kernel_flow_new").filter(|n| **n > 0) {
                eprintln!(
                    "overlay-bench: warning: {} {} mode, {node}: {n} connection(s) filed as the kernel's (kernel_flow_new), {} packet(s) left to it (to_stack_kernel_flow)",
                    topo.id.name(),
                    mode.name(),
                    counters.get("to_stack_kernel_flow").copied().unwrap_or(0)
                );
            }
        }
        if let Some(share) = crate::report::FastPathShare::of(&nodes) {
            for (what, value) in [
                ("picked up at the pods' veths", share.picked_up),
                ("delivered straight into the pods", share.delivered),
            ] {
                if value < 0.9 {
                    eprintln!(
                        "overlay-bench: warning: {} {} mode: only {:.0} % of the pods' packets {what}",
                        topo.id.name(),
                        mode.name(),
                        value * 100.0
                    );
                }
            }
        }
        meta.counters
            .entry(mode.name().to_owned())
            .or_default()
            .insert(topo.id.name().to_owned(), nodes);
    }
}

fn record_offloads(meta: &mut Meta, mode: Mode, topo: &PathTopo) {
    for (label, ns, dev) in &topo.devices {
        let features = load::offloads(ns, dev).unwrap_or_else(|e| {
            [("error".to_owned(), format!("{e:#}"))]
                .into_iter()
                .collect()
        });
        meta.offloads
            .entry(mode.name().to_owned())
            .or_default()
            .entry(topo.id.name().to_owned())
            .or_default()
            .insert(label.clone(), features);
    }
}

fn check_tools(plan: &Plan) -> Result<()> {
    let mut tools: Vec<(&str, &[&str], &str)> = vec![
        ("iperf3", &["--version"], "iperf3"),
        ("sockperf", &["--version"], "sockperf"),
        ("ethtool", &["--version"], "ethtool"),
        ("taskset", &["--version"], "util-linux"),
        ("ss", &["--version"], "iproute2"),
        ("iptables", &["--version"], "iptables"),
    ];
    if plan.profile.is_some() {
        tools.push(("perf", &["--version"], "linux-perf"));
    }
    let missing: Vec<String> = tools
        .iter()
        .filter(|(t, a, _)| !cmd::output(cmd::command(t, a)).is_ok_and(|o| o.status.success()))
        .map(|(t, _, p)| format!("`{t}` (Debian package {p})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; `cargo xtask setup` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

fn first_line(program: &str, args: &[&str]) -> String {
    cmd::output(cmd::command(program, args))
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("({e:#})"))
}

impl Meta {
    fn collect(plan: &Plan) -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let mut tools = BTreeMap::new();
        for (name, args) in [
            ("iperf3", &["--version"][..]),
            ("sockperf", &["--version"]),
            ("iptables", &["--version"]),
            ("etcd", &["--version"]),
            ("ip", &["-V"]),
        ] {
            tools.insert(name.to_owned(), first_line(name, args));
        }
        if let Ok(agent) = overlay_tests::agent_bin() {
            tools.insert("overlay-agent".to_owned(), agent.display().to_string());
        }
        let paths = PathId::ALL
            .iter()
            .map(|p| (p.name().to_owned(), p.describe().to_owned()))
            .collect();
        Ok(Self {
            date_utc: first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
            kernel: first_line("uname", &["-r"]),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            git_commit: first_line("git", &["describe", "--always", "--dirty"]),
            tools,
            plan: serde_json::to_value(plan)?,
            paths,
            ..Self::default()
        })
    }
}
