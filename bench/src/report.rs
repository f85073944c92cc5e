//! `report.md` (a table per metric and mode) and `results.json` (every round's raw figures).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};

use crate::{
    Mode, PathId, Plan,
    run::{NodeCounters, Results},
    stats::{FigureSummary, MetricSummary},
    topo::{PLAIN_MTU, VXLAN_MTU, flannel_rule_commands},
};

/// A number with about three significant digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |r| format!("**{r:.2}**"))
}

/// The section title of a base metric.
pub fn title(metric: &str) -> &'static str {
    match metric {
        "tcp1" => "TCP throughput, 1 stream, pod → remote pod",
        "tcp4" => "TCP throughput, 4 streams, pod → remote pod",
        "rr" => "TCP request/response, pod → remote pod",
        "crr_pod" => "Connection rate, pod → remote pod",
        "crr_out" => "Connection rate, pod → outside host through masquerade",
        "udp" => "64-byte UDP datagrams, pod → remote pod",
        _ => "",
    }
}

pub fn write(plan: &Plan, r: &Results, charts: &[(&str, &str)]) -> Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    let path = plan.out.join("results.json");
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    write_markdown(plan, r, charts)
}

/// Only `report.md`.
pub fn write_markdown(plan: &Plan, r: &Results, charts: &[(&str, &str)]) -> Result<()> {
    let md = markdown(plan, r, charts);
    let path = plan.out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn markdown(plan: &Plan, r: &Results, charts: &[(&str, &str)]) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmark: this data path against flannel's kernel paths\n"
    );
    let _ = writeln!(
        s,
        "Measured {} on kernel {}, {} × {} (steal {:.1} core-s over the run, {:.2} % of CPU time), \
         commit `{}`, in {:.0} min. Modes: {}; {} round(s) of {} s loads; client on CPU {}, \
         server on CPU {}.{}\n",
        m.date_utc,
        m.kernel,
        m.cpus,
        m.cpu_model,
        m.steal_s,
        m.steal_share * 100.0,
        m.git_commit,
        m.elapsed_s / 60.0,
        plan.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", "),
        plan.rounds,
        plan.secs,
        plan.client_cpu,
        plan.server_cpu,
        if plan.quick {
            " **Quick run: one short round, figures only show that everything works.**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Reproduce: `cargo xtask bench` (this report: both modes, defaults), `cargo xtask bench \
         --quick`, or pick `--paths`, `--metrics`, `--modes`, `--rounds`, `--secs`, `--out` \
         (see `cargo xtask bench --help`). How to read: every figure is the median over rounds; \
         **E/K** and **EH/H** are medians of ratios taken inside each round, oriented so that \
         > 1 means ours is better (higher throughput/rate, lower CPU/latency); *of D* is each \
         path against the ceiling D in the same round, oriented the same way (1 = as good as \
         two namespaces joined by one veth); *of R*, for the connection rates, is each path \
         against R, the same hops with nothing but kernel routing (no NAT). CPU figures are \
         the whole machine's busy time (user + system + irq + softirq from `/proc/stat`, steal \
         apart) during the load, divided by what was delivered: for UDP that includes the \
         sender's work on datagrams dropped on the way.\n"
    );
    paths_section(&mut s);
    headline(&mut s, r);
    against_hand(&mut s, r);
    for metric in ["tcp1", "tcp4", "rr", "crr_pod", "crr_out", "udp"] {
        let sums: Vec<&MetricSummary> = r.summary.iter().filter(|x| x.metric == metric).collect();
        if sums.is_empty() {
            continue;
        }
        let _ = writeln!(s, "## {}\n", title(metric));
        for sum in sums {
            let _ = writeln!(s, "{} mode:\n", sum.mode.name());
            metric_table(&mut s, sum);
        }
    }
    scale_section(&mut s, r);
    counters_section(&mut s, r);
    crate::progstats::section(&mut s, r);
    if !charts.is_empty() {
        let _ = writeln!(s, "## Charts\n");
        for (file, title) in charts {
            let _ = writeln!(s, "![{title}]({file})\n");
        }
    }
    fairness_section(&mut s, r);
    if !r.failures.is_empty() {
        let _ = writeln!(s, "## Failed measurements\n");
        for f in &r.failures {
            let _ = writeln!(s, "- {f}");
        }
        s.push('\n');
    }
    s
}

/// How much of the pods' traffic our fast paths carried, from the agents' counters summed over
/// the nodes of one path: the pods' forwarded packets picked up at their veths in front of the
/// bridge, and the packets for pods delivered straight into them rather than by the bridge.
pub struct FastPathShare {
    /// `pod_port` of `encap_pod` + `direct_pod` + `nat_snat`.
    pub picked_up: f64,
    /// `*_endpoint` of everything delivered to pods.
    pub delivered: f64,
    /// The pods' packets forwarded (the denominator of `picked_up`).
    pub forwarded: u64,
    /// Frames `underlay_xdp` decapsulated.
    pub xdp_frames: u64,
}

impl FastPathShare {
    /// `None` when the counters show no pod traffic either way.
    pub fn of(nodes: &NodeCounters) -> Option<Self> {
        let sum = |names: &[&str]| -> u64 {
            nodes
                .values()
                .flat_map(|c| names.iter().filter_map(|n| c.get(*n)))
                .sum()
        };
        let forwarded = sum(&["encap_pod", "direct_pod", "nat_snat"]);
        let into_pods = sum(&[
            "decap_endpoint",
            "decap_pod",
            "deliver_direct_endpoint",
            "deliver_direct_pod",
            "nat_rev",
        ]);
        if forwarded == 0 || into_pods == 0 {
            return None;
        }
        let straight = sum(&[
            "decap_endpoint",
            "deliver_direct_endpoint",
            "nat_rev_endpoint",
        ]);
        #[expect(clippy::cast_precision_loss, reason = "packet counts, for a share")]
        Some(Self {
            picked_up: sum(&["pod_port"]) as f64 / forwarded as f64,
            delivered: straight as f64 / into_pods as f64,
            forwarded,
            xdp_frames: sum(&["xdp_decap"]),
        })
    }
}

fn counters_section(s: &mut String, r: &Results) {
    let rows: Vec<(&String, &String, FastPathShare)> = r
        .meta
        .counters
        .iter()
        .flat_map(|(mode, paths)| {
            paths
                .iter()
                .filter_map(move |(path, nodes)| Some((mode, path, FastPathShare::of(nodes)?)))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Where our data path did the work\n\nThe agents' counters at the end of each mode \
         (every metric and round), summed over both nodes: of the pods' packets forwarded \
         (`encap_pod` + `direct_pod` + `nat_snat`), the share picked up at the pods' veths in \
         front of the bridge (`pod_port`); of the packets for pods, the share delivered \
         straight into them (`decap_endpoint`, `deliver_direct_endpoint`, `nat_rev_endpoint`) \
         rather than by the bridge; and the frames XDP decapsulated before GRO. The fast paths \
         start at a pod's first packets, so a share just under 1 is the connections' first \
         packets; well under 1 means the run did not measure the path it names.\n\n\
         | mode | path | pods' packets forwarded | picked up at their veths | delivered straight | XDP frames |\n\
         |---|---|---:|---:|---:|---:|"
    );
    for (mode, path, share) in rows {
        let _ = writeln!(
            s,
            "| {mode} | {path} | {} | {:.3} | {:.3} | {} |",
            share.forwarded, share.picked_up, share.delivered, share.xdp_frames
        );
    }
    s.push('\n');
}

fn paths_section(s: &mut String) {
    let _ = writeln!(
        s,
        "## Paths\n\nSame topology and pod addresses for every path: client pod 172.16.1.2 on \
         node n0, server pod 172.16.2.2 on node n1 (cluster network 172.16.0.0/12, /24 leases), \
         nodes 198.18.0.1 and .2 on an underlay bridge, an outside host 198.19.0.1 routed by the \
         underlay namespace; pods behind a `cni0` bridge; `iptables -P FORWARD DROP` on every \
         node as Docker leaves it (not on R's, which has no netfilter state). MTU as flannel \
         chooses it: {VXLAN_MTU} for vxlan (K, E), {PLAIN_MTU} for host-gw (H, EH), D and R. \
         R runs the connection rates only.\n"
    );
    let _ = writeln!(s, "| path | what |\n|---|---|");
    for p in PathId::ALL {
        let _ = writeln!(s, "| {} | {} |", p.name(), p.describe());
    }
    s.push('\n');
}

/// One line per mode with the ratios that matter most.
fn headline(s: &mut String, r: &Results) {
    let picks = [
        ("tcp1", "gbps", "1-stream Gbit/s"),
        ("tcp1", "cpu_s_per_gb", "CPU per GB (1 stream)"),
        ("tcp4", "gbps", "4-stream Gbit/s"),
        ("rr", "p50_us", "RR p50"),
        ("rr", "p99_us", "RR p99"),
        ("crr_pod", "cps", "conn/s pod → pod"),
        ("crr_out", "cps", "conn/s pod → outside"),
        ("udp", "pps", "UDP datagrams/s"),
    ];
    let find = |mode: Mode, metric: &str, key: &str| -> Option<&FigureSummary> {
        r.summary
            .iter()
            .find(|m| m.mode == mode && m.metric == metric)?
            .figures
            .iter()
            .find(|f| f.def.key == key)
    };
    let modes: Vec<Mode> = {
        let mut v: Vec<Mode> = r.summary.iter().map(|m| m.mode).collect();
        v.sort();
        v.dedup();
        v
    };
    if modes.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Headline: our paths against flannel's (> 1 is better for us)\n\n| figure | {} |\n|---|{}",
        modes
            .iter()
            .map(|m| format!("E/K {0} | EH/H {0}", m.name()))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|---|".repeat(modes.len())
    );
    for (metric, key, label) in picks {
        let cells: Vec<String> = modes
            .iter()
            .map(|&mode| {
                let f = find(mode, metric, key);
                format!(
                    "{} | {}",
                    ratio(f.and_then(|f| f.e_k)),
                    ratio(f.and_then(|f| f.eh_h))
                )
            })
            .collect();
        if cells.iter().all(|c| c == "– | –") {
            continue;
        }
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    s.push('\n');
}

/// The hand measurements of `../shared/datapath-speed.md` (same kind of VM, same paths), as
/// (mode, metric, figure, E/K (true) or EH/H (false), the ratio by hand, oriented as here).
const HAND: [(Mode, &str, &str, bool, f64); 9] = [
    (Mode::Veth, "tcp1", "gbps", true, 0.38),
    (Mode::Veth, "tcp1", "gbps", false, 17.8 / 15.2),
    (Mode::Veth, "tcp1", "cpu_s_per_gb", true, 2.13 / 4.78),
    (Mode::Veth, "tcp1", "cpu_s_per_gb", false, 1.79 / 1.57),
    (Mode::Nic, "tcp1", "gbps", true, 0.70),
    (Mode::Nic, "tcp1", "gbps", false, 6.91 / 6.56),
    (Mode::Veth, "crr_pod", "cps", true, 1.52),
    (Mode::Veth, "crr_out", "cps", true, 1.06),
    (Mode::Veth, "udp", "pps", true, 1.64),
];

/// This run's ratios beside the hand measurements, and whether they point the same way.
fn against_hand(s: &mut String, r: &Results) {
    let mut rows = Vec::new();
    for (mode, metric, key, e_k, hand) in HAND {
        let Some(f) = r
            .summary
            .iter()
            .find(|m| m.mode == mode && m.metric == metric)
            .and_then(|m| m.figures.iter().find(|f| f.def.key == key))
        else {
            continue;
        };
        let Some(now) = (if e_k { f.e_k } else { f.eh_h }) else {
            continue;
        };
        let same = (now >= 1.0) == (hand >= 1.0);
        rows.push(format!(
            "| {} | {} {} | {} | {hand:.2} | {now:.2} | {} |",
            mode.name(),
            title(metric),
            f.def.label,
            if e_k { "E/K" } else { "EH/H" },
            if same { "yes" } else { "**no**" }
        ));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Against the hand measurements\n\nThe ratios measured by hand on one of these VMs \
         before this benchmark existed (`shared/datapath-speed.md`; CRR pod → pod is the middle \
         of its 1.45–1.59) beside this run's; *same direction* means both favour the same \
         side.\n\n| mode | figure | ratio | by hand | this run | same direction |\n|---|---|---|---:|---:|---|"
    );
    for row in rows {
        let _ = writeln!(s, "{row}");
    }
    s.push('\n');
}

fn metric_table(s: &mut String, sum: &MetricSummary) {
    // R, the no-NAT ceiling, is measured for the connection rates only.
    let with_r = sum.figures.iter().any(|f| !f.of_r.is_empty());
    let mut header = "| path |".to_owned();
    let mut rule = "|---|".to_owned();
    for f in &sum.figures {
        let _ = write!(header, " {} | of D |", f.def.label);
        rule.push_str("---:|---:|");
        if with_r {
            header.push_str(" of R |");
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for p in PathId::ALL {
        if !sum.figures.iter().any(|f| f.median.contains_key(&p)) {
            continue;
        }
        let cells: Vec<String> = sum
            .figures
            .iter()
            .map(|f| {
                let of = |m: &BTreeMap<PathId, f64>| {
                    m.get(&p).map_or("–".to_owned(), |v| format!("{v:.2}"))
                };
                let mut cell = format!(
                    "{} | {}",
                    f.median.get(&p).map_or("–".to_owned(), |v| num(*v)),
                    of(&f.of_d)
                );
                if with_r {
                    let _ = write!(cell, " | {}", of(&f.of_r));
                }
                cell
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", p.name(), cells.join(" | "));
    }
    for (label, get) in [
        (
            "E/K",
            (|f: &FigureSummary| f.e_k) as fn(&FigureSummary) -> Option<f64>,
        ),
        ("EH/H", |f: &FigureSummary| f.eh_h),
    ] {
        if sum.figures.iter().all(|f| get(f).is_none()) {
            continue;
        }
        let cells: Vec<String> = sum
            .figures
            .iter()
            .map(|f| format!("{} | {}", ratio(get(f)), if with_r { " | " } else { "" }))
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    s.push('\n');
}

/// Scale levels present in the summary, ascending.
pub fn scale_levels(r: &Results) -> Vec<u32> {
    let mut v: Vec<u32> = r
        .summary
        .iter()
        .filter_map(|m| {
            m.metric
                .strip_prefix("scale")
                .and_then(|rest| rest.split('_').next())
                .or_else(|| m.metric.strip_prefix("propagation"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn scale_section(s: &mut String, r: &Results) {
    let levels = scale_levels(r);
    if levels.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## Scale: peer leases\n\nThe same loads with 10, 1,000, … peers: fake leases in etcd \
         that our agents turn into map entries (E, EH), and for the stock paths the kernel \
         state flanneld would build for them (K: neigh + fdb + route on flannel.1 per peer; H: \
         a route per peer, `onlink` because the fake PublicIPs lie outside the nodes' /24; the \
         lookup is the same). Each count includes the real peer. Scale runs in one mode only \
         (`--scale-mode`): per-peer lookups do not depend on how frames cross the underlay.\n"
    );
    let rows: [(&str, &str, &str); 4] = [
        ("tcp1", "gbps", "1-stream Gbit/s"),
        ("tcp1", "cpu_s_per_gb", "CPU core-s per GB"),
        ("rr", "p50_us", "RR p50 µs"),
        ("rr", "p99_us", "RR p99 µs"),
    ];
    for (suffix, key, label) in rows {
        let sums: Vec<(u32, &MetricSummary)> = levels
            .iter()
            .filter_map(|l| {
                let name = format!("scale{l}_{suffix}");
                r.summary.iter().find(|m| m.metric == name).map(|m| (*l, m))
            })
            .collect();
        if sums.is_empty() {
            continue;
        }
        let mode = sums[0].1.mode.name();
        let _ = writeln!(
            s,
            "{label} ({mode} mode):\n\n| path | {} |\n|---|{}",
            sums.iter()
                .map(|(l, _)| format!("{l} peers"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(sums.len())
        );
        let fig = |m: &MetricSummary| m.figures.iter().find(|f| f.def.key == key).cloned();
        for p in PathId::ALL {
            let cells: Vec<String> = sums
                .iter()
                .map(|(_, m)| {
                    fig(m)
                        .and_then(|f| f.median.get(&p).copied())
                        .map_or("–".to_owned(), num)
                })
                .collect();
            if cells.iter().all(|c| c == "–") {
                continue;
            }
            let _ = writeln!(s, "| {} | {} |", p.name(), cells.join(" | "));
        }
        for (name, pick) in [
            (
                "E/K",
                (|f: &FigureSummary| f.e_k) as fn(&FigureSummary) -> Option<f64>,
            ),
            ("EH/H", |f: &FigureSummary| f.eh_h),
        ] {
            let cells: Vec<String> = sums
                .iter()
                .map(|(_, m)| ratio(fig(m).and_then(|f| pick(&f))))
                .collect();
            let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
        }
        s.push('\n');
    }
    let props: Vec<(u32, &MetricSummary)> = levels
        .iter()
        .filter_map(|l| {
            let name = format!("propagation{l}");
            r.summary.iter().find(|m| m.metric == name).map(|m| (*l, m))
        })
        .collect();
    if !props.is_empty() {
        let _ = writeln!(
            s,
            "Lease propagation: time from an etcd put of a new lease (etcd's JSON gateway) until \
             every node's data path (`ROUTE_V4`, polled every 100 µs) holds it, p50 / p99 over \
             the changes. E and EH only: the stock paths have no flanneld here (flanneld's \
             own reaction would be its watch plus netlink calls).\n\n| path | {} |\n|---|{}",
            props
                .iter()
                .map(|(l, _)| format!("{l} peers"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(props.len())
        );
        for p in [PathId::E, PathId::EH] {
            let cells: Vec<String> = props
                .iter()
                .map(|(_, m)| {
                    let get = |k: &str| {
                        m.figures
                            .iter()
                            .find(|f| f.def.key == k)
                            .and_then(|f| f.median.get(&p).copied())
                    };
                    match (get("p50_ms"), get("p99_ms")) {
                        (Some(a), Some(b)) => format!("{} / {} ms", num(a), num(b)),
                        _ => "–".to_owned(),
                    }
                })
                .collect();
            if cells.iter().all(|c| c == "–") {
                continue;
            }
            let _ = writeln!(s, "| {} | {} |", p.name(), cells.join(" | "));
        }
        s.push('\n');
    }
}

fn fairness_section(s: &mut String, r: &Results) {
    let m = &r.meta;
    let _ = writeln!(
        s,
        "## Fairness: what K and H are, offloads, commands\n\nK and H are flannel as flanneld \
         builds it, not a strawman: `flannel.1` (VNI 1, port 8472, `nolearning`, MTU 1450, the \
         device's default offloads) with a permanent neigh, fdb and onlink route per peer (K); \
         a route `<peer subnet> via <peer PublicIP> dev eth0` per peer (H); on both, flanneld's \
         iptables rules (`{}`, Debian's default backend), as applied on node n0:\n\n```",
        m.tools.get("iptables").map_or("", String::as_str)
    );
    for rule in flannel_rule_commands(crate::topo::node_subnet(0)) {
        let words: Vec<String> = rule
            .iter()
            .map(|w| {
                if w.contains(' ') {
                    format!("\"{w}\"")
                } else {
                    w.clone()
                }
            })
            .collect();
        let _ = writeln!(s, "iptables {}", words.join(" "));
    }
    let _ = writeln!(
        s,
        "```\n\nOur paths run `overlay-agent --etcd-endpoints http://198.18.0.254:2379 --iface \
         eth0 --subnet-file <node>/subnet.env --bpf-dir <node>/bpffs/overlay --ip-masq` with \
         `{{\"Network\": \"172.16.0.0/12\", \"Backend\": {{\"Type\": \"vxlan\"}}}}` (E) or \
         `\"host-gw\"` (EH) in etcd, each node's subnet forced by a subnet file written before \
         the agent starts.\n"
    );
    let _ = writeln!(
        s,
        "Tools: {}\n",
        m.tools
            .iter()
            .map(|(k, v)| format!("{k}: `{v}`"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        s,
        "Offloads (`ethtool -k`; nic mode sets `tso off gso off` on both ends of each node's \
         underlay veth and `gro on` on the node's end; D's pods' veth ends get all three):\n"
    );
    for (mode, paths) in &m.offloads {
        let _ = writeln!(
            s,
            "| {mode} mode | device | tso | gso | gro | tx-csum | udp_tnl tso |\n|---|---|---|---|---|---|---|"
        );
        for (path, devices) in paths {
            for (dev, f) in devices {
                let g = |k: &str| f.get(k).map_or("–", String::as_str);
                let _ = writeln!(
                    s,
                    "| {path} | {dev} | {} | {} | {} | {} | {} |",
                    g("tcp-segmentation-offload"),
                    g("generic-segmentation-offload"),
                    g("generic-receive-offload"),
                    g("tx-checksumming"),
                    g("tx-udp_tnl-segmentation")
                );
            }
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Load generators (the first round's command of each metric, run as `ip netns exec <pod> taskset -c <cpu> …`; servers: `iperf3 -s -1`, `sockperf server --tcp`, `overlay-bench crr-server`, pinned to the other CPU):\n\n```"
    );
    let mut seen = Vec::new();
    for sample in &r.samples {
        let key = (sample.metric.clone(), sample.path);
        if sample.round == 0 && !seen.iter().any(|(m, _)| *m == key.0) {
            let _ = writeln!(s, "{:<12} {}", sample.metric, sample.command);
            seen.push(key);
        }
    }
    let _ = writeln!(s, "```\n");
    for (path, state) in &m.stock_state {
        let _ = writeln!(
            s,
            "<details><summary>Kernel state of path {path}, node n0</summary>\n\n```\n{}\n```\n</details>\n",
            state.trim()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_digits() {
        assert_eq!(num(12345.6), "12346");
        assert_eq!(num(123.45), "123.5");
        assert_eq!(num(12.345), "12.35");
        assert_eq!(num(1.2345), "1.234");
    }
}
