//! Samples (one per metric, path and round) and their summary: per-path medians, and ratios
//! computed inside each round then reduced to their median, oriented so that > 1 favours the
//! numerator (our path, or the path against the ceiling D).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Mode, PathId, load::Figures};

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub mode: Mode,
    pub round: u32,
    /// `tcp1`, `tcp4`, `rr`, `crr_pod`, `crr_out`, `udp`, `scale<N>_tcp1`, `scale<N>_rr`,
    /// `propagation<N>`.
    pub metric: String,
    pub path: PathId,
    pub figures: Figures,
    /// Raw values behind the figures (propagation: every change's time in ms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<f64>,
    /// The load generator's command line.
    pub command: String,
}

/// How a figure reads.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FigureDef {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_better: bool,
}

const fn fig(key: &'static str, label: &'static str, higher_better: bool) -> FigureDef {
    FigureDef {
        key,
        label,
        higher_better,
    }
}

/// The figures reported for `metric`, in table order.
pub fn figure_defs(metric: &str) -> &'static [FigureDef] {
    const TCP: &[FigureDef] = &[
        fig("gbps", "Gbit/s", true),
        fig("cpu_s_per_gb", "CPU core-s per GB", false),
    ];
    const RR: &[FigureDef] = &[
        fig("tps", "transactions/s", true),
        fig("p50_us", "p50 µs", false),
        fig("p99_us", "p99 µs", false),
    ];
    const CRR: &[FigureDef] = &[
        fig("cps", "connections/s", true),
        fig("cpu_us_per_conn", "CPU µs per connection", false),
    ];
    const UDP: &[FigureDef] = &[
        fig("pps", "datagrams/s delivered", true),
        fig("cpu_ns_per_pkt", "CPU ns per datagram", false),
    ];
    const PROP: &[FigureDef] = &[
        fig("p50_ms", "p50 ms", false),
        fig("p99_ms", "p99 ms", false),
    ];
    if metric.starts_with("propagation") {
        PROP
    } else if metric.ends_with("tcp1") || metric.ends_with("tcp4") {
        TCP
    } else if metric.ends_with("rr") && !metric.starts_with("crr") {
        RR
    } else if metric.starts_with("crr") {
        CRR
    } else if metric == "udp" {
        UDP
    } else {
        &[]
    }
}

/// The metric whose D figure is `metric`'s ceiling (the outside host is not reachable on D, so
/// pod → outside compares with D's pod → pod: the same endpoints' socket work without NAT).
pub fn ceiling_metric(metric: &str) -> &str {
    if metric == "crr_out" {
        "crr_pod"
    } else {
        metric
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// The `q`-quantile (0..=1) by nearest rank.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// `a` against `b`, oriented so that > 1 means `a` is better.
pub fn ratio(a: f64, b: f64, higher_better: bool) -> Option<f64> {
    let r = if higher_better { a / b } else { b / a };
    (r.is_finite() && r > 0.0).then_some(r)
}

/// One figure of one metric in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct FigureSummary {
    pub def: FigureDef,
    /// Median over rounds, per path.
    pub median: BTreeMap<PathId, f64>,
    /// Rounds per path.
    pub rounds: BTreeMap<PathId, usize>,
    /// Median over rounds of (path vs D in that round), oriented (1 = the ceiling).
    pub of_d: BTreeMap<PathId, f64>,
    /// The same against R, the no-NAT ceiling, where R was measured (the connection rates).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub of_r: BTreeMap<PathId, f64>,
    /// Median over rounds of E vs K, and of EH vs H (> 1: ours is better).
    pub e_k: Option<f64>,
    pub eh_h: Option<f64>,
}

/// Every figure of one metric in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct MetricSummary {
    pub mode: Mode,
    pub metric: String,
    pub figures: Vec<FigureSummary>,
}

/// Summaries for every (mode, metric) present in `samples`, in first-seen order.
pub fn summarize(samples: &[Sample]) -> Vec<MetricSummary> {
    let mut keys: Vec<(Mode, String)> = Vec::new();
    for s in samples {
        let k = (s.mode, s.metric.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(mode, metric)| {
            let figures = figure_defs(&metric)
                .iter()
                .map(|def| summarize_figure(samples, mode, &metric, *def))
                .collect();
            MetricSummary {
                mode,
                metric,
                figures,
            }
        })
        .collect()
}

fn summarize_figure(samples: &[Sample], mode: Mode, metric: &str, def: FigureDef) -> FigureSummary {
    // value[path][round]
    let values = |metric: &str| -> BTreeMap<PathId, BTreeMap<u32, f64>> {
        let mut m: BTreeMap<PathId, BTreeMap<u32, f64>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.mode == mode && s.metric == metric)
        {
            if let Some(v) = s.figures.get(def.key) {
                m.entry(s.path).or_default().insert(s.round, *v);
            }
        }
        m
    };
    let own = values(metric);
    let ceiling = values(ceiling_metric(metric));
    let per_round_ratio = |a: &BTreeMap<u32, f64>, b: &BTreeMap<u32, f64>| -> Option<f64> {
        let r: Vec<f64> = a
            .iter()
            .filter_map(|(round, x)| b.get(round).and_then(|y| ratio(*x, *y, def.higher_better)))
            .collect();
        median(&r)
    };
    let mut out = FigureSummary {
        def,
        median: BTreeMap::new(),
        rounds: BTreeMap::new(),
        of_d: BTreeMap::new(),
        of_r: BTreeMap::new(),
        e_k: None,
        eh_h: None,
    };
    for (path, rounds) in &own {
        let v: Vec<f64> = rounds.values().copied().collect();
        if let Some(m) = median(&v) {
            out.median.insert(*path, m);
        }
        out.rounds.insert(*path, v.len());
        if let Some(d) = ceiling.get(&PathId::D)
            && let Some(r) = per_round_ratio(rounds, d)
        {
            out.of_d.insert(*path, r);
        }
        if let Some(r) = own.get(&PathId::R)
            && let Some(x) = per_round_ratio(rounds, r)
        {
            out.of_r.insert(*path, x);
        }
    }
    let pair = |a: PathId, b: PathId| per_round_ratio(own.get(&a)?, own.get(&b)?);
    out.e_k = pair(PathId::E, PathId::K);
    out.eh_h = pair(PathId::EH, PathId::H);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, metric: &str, path: PathId, key: &str, v: f64) -> Sample {
        Sample {
            mode: Mode::Veth,
            round,
            metric: metric.to_owned(),
            path,
            figures: [(key.to_owned(), v)].into_iter().collect(),
            series: Vec::new(),
            command: String::new(),
        }
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
    }

    #[test]
    fn ratios_are_per_round_and_oriented() {
        // Round 0: the machine is fast; round 1: slow. Per-round ratios stay 0.5 and 2.0.
        let s = vec![
            sample(0, "tcp1", PathId::K, "gbps", 10.0),
            sample(0, "tcp1", PathId::E, "gbps", 5.0),
            sample(0, "tcp1", PathId::D, "gbps", 20.0),
            sample(1, "tcp1", PathId::K, "gbps", 2.0),
            sample(1, "tcp1", PathId::E, "gbps", 1.0),
            sample(1, "tcp1", PathId::D, "gbps", 4.0),
            sample(0, "rr", PathId::K, "p50_us", 40.0),
            sample(0, "rr", PathId::E, "p50_us", 20.0),
            sample(0, "crr_pod", PathId::D, "cps", 1000.0),
            sample(0, "crr_out", PathId::K, "cps", 500.0),
            sample(0, "crr_out", PathId::E, "cps", 570.0),
            sample(0, "crr_out", PathId::R, "cps", 600.0),
        ];
        let sum = summarize(&s);
        let tcp = &sum[0].figures[0];
        assert_eq!(tcp.def.key, "gbps");
        assert_eq!(tcp.e_k, Some(0.5));
        assert_eq!(tcp.of_d[&PathId::K], 0.5);
        assert_eq!(tcp.of_d[&PathId::D], 1.0);
        assert_eq!(tcp.median[&PathId::E], 3.0);
        assert_eq!(tcp.eh_h, None);
        let rr = sum.iter().find(|m| m.metric == "rr").unwrap();
        let p50 = rr.figures.iter().find(|f| f.def.key == "p50_us").unwrap();
        assert_eq!(p50.e_k, Some(2.0), "half the latency is twice as good");
        let out = sum.iter().find(|m| m.metric == "crr_out").unwrap();
        assert_eq!(
            out.figures[0].of_d[&PathId::K],
            0.5,
            "ceiling is D's pod → pod"
        );
        assert_eq!(out.figures[0].of_r[&PathId::E], 0.95, "against R's crr_out");
        assert!(tcp.of_r.is_empty(), "R measures connection rates only");
    }
}
