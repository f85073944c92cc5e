//! `overlay-bench run --quick` end to end, so that the benchmark cannot rot: a reduced
//! selection (one path of each kind: D, the stock vxlan path K, our vxlan path E, and R, the
//! routed no-NAT ceiling that runs the connection rates only; every metric, two small scale
//! levels, three lease changes) runs to the end into a temporary directory, the three
//! artifacts exist and parse, every selected measurement is in them, and nothing the run
//! created is left: no `ovl-<pid>-` namespace of the bench process, and no process carrying the
//! environment tag given to it (every process it starts inherits it: agents, etcd, iperf3,
//! sockperf, the CRR helpers).
//!
//! Root only (fails, never skips, without it). Run through `cargo xtask test`, or:
//! `cargo xtask build && OVERLAY_AGENT_BIN=target/debug/overlay-agent cargo test -p
//! overlay-bench --test quick -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    fs::File,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use overlay_tests::{cmd, netns::list_namespaces, require_root};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn quick_run_writes_the_artifacts_and_leaves_nothing() {
    require_root();
    let out = tempfile::tempdir().unwrap();
    let tag = format!("overlay-bench-test-{}", std::process::id());
    let log = out.path().join("bench.log");
    let mut c = Command::new(env!("CARGO_BIN_EXE_overlay-bench"));
    c.args([
        "run",
        "--quick",
        "--paths",
        "D,K,E,R",
        "--scale-peers",
        "10,50",
        "--changes",
        "3",
        "--out",
    ])
    .arg(out.path())
    .env("OVL_BENCH_TAG", &tag)
    .stdin(Stdio::null())
    .stdout(File::create(&log).unwrap())
    .stderr(File::create(&log).unwrap());
    let started = Instant::now();
    let mut child = c.spawn().unwrap();
    let pid = child.id();
    let status = cmd::wait_timeout(&mut child, LIMIT).unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{text}");
    let Some(status) = status else {
        let _ = cmd::kill_and_reap(&mut child);
        panic!("the quick benchmark did not finish within {LIMIT:?}");
    };
    println!("quick benchmark: {status} in {:.1?}", started.elapsed());
    assert!(status.success(), "the quick benchmark failed ({status})");

    // results.json: every round's figures, for every path and metric selected.
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results["failures"].as_array().map(Vec::len), Some(0));
    let samples = results["samples"].as_array().unwrap();
    let seen: BTreeSet<(String, String)> = samples
        .iter()
        .map(|s| {
            (
                s["metric"].as_str().unwrap().to_owned(),
                s["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for path in ["D", "K", "E"] {
        for metric in ["tcp1", "tcp4", "rr", "crr_pod", "udp"] {
            want.push((metric.to_owned(), path.to_owned()));
        }
    }
    for path in ["K", "E"] {
        for metric in [
            "crr_out",
            "scale10_tcp1",
            "scale50_tcp1",
            "scale10_rr",
            "scale50_rr",
        ] {
            want.push((metric.to_owned(), path.to_owned()));
        }
    }
    // R measures the connection rates only, and has no peers to scale.
    for metric in ["crr_pod", "crr_out"] {
        want.push((metric.to_owned(), "R".to_owned()));
    }
    assert!(
        !seen.iter().any(|(m, p)| p == "R" && !m.starts_with("crr")),
        "R measured more than the connection rates: {seen:?}"
    );
    want.push(("propagation10".to_owned(), "E".to_owned()));
    want.push(("propagation50".to_owned(), "E".to_owned()));
    for w in &want {
        assert!(seen.contains(w), "no sample for {w:?}; samples: {seen:?}");
    }
    for s in samples {
        let figures = s["figures"].as_object().unwrap();
        assert!(
            figures
                .values()
                .all(|v| v.as_f64().is_some_and(f64::is_finite)),
            "non-finite figure in {s}"
        );
    }
    let gbps = |path: &str| {
        samples
            .iter()
            .find(|s| s["metric"] == "tcp1" && s["path"] == path)
            .and_then(|s| s["figures"]["gbps"].as_f64())
            .unwrap()
    };
    assert!(gbps("D") > 0.1 && gbps("K") > 0.1 && gbps("E") > 0.1);
    let prop = samples
        .iter()
        .find(|s| s["metric"] == "propagation50")
        .unwrap();
    assert_eq!(prop["series"].as_array().map(Vec::len), Some(3));
    assert!(
        results["meta"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    assert!(results["meta"]["offloads"]["veth"]["K"].is_object());

    // report.md: the tables and the ratios.
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for needle in [
        "## TCP throughput, 1 stream, pod → remote pod",
        "## Connection rate, pod → outside host through masquerade",
        "| E/K |",
        "of R |",
        "## Scale: peer leases",
        "Lease propagation",
        "iptables -t nat -A FLANNEL-POSTRTG",
        "![",
    ] {
        assert!(
            report.contains(needle),
            "report.md lacks {needle:?}:\n{report}"
        );
    }

    // The charts are PNG images.
    for png in [
        "throughput.png",
        "cpu.png",
        "latency.png",
        "connections.png",
        "udp.png",
        "scale.png",
    ] {
        let bytes = std::fs::read(out.path().join(png)).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 2000,
            "{png} is not a PNG chart"
        );
        assert!(report.contains(png), "report.md does not show {png}");
    }

    // Nothing left behind.
    let prefix = format!("ovl-{pid}-");
    let left: Vec<String> = list_namespaces()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let needle = format!("OVL_BENCH_TAG={tag}");
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            procs.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    assert!(
        procs.is_empty(),
        "processes of the bench still running: {procs:?}"
    );
    let tmp: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(tmp.is_empty(), "temporary directories left: {tmp:?}");
}
