//! Running one load between the client pod and the server pod (or the outside host) of a path:
//! the server pinned to one CPU, the client to the other (`ip netns exec <ns> taskset -c <cpu>
//! ...`), the machine's CPU time from `/proc/stat` around the client's run, optionally a
//! `perf record -a -g` of the whole machine meanwhile. Every process is bounded in time and
//! killed when its guard drops.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{ChildGuard, cmd};
use serde_json::Value;

use crate::{Plan, topo::PathTopo};

/// Named figures of one measurement, e.g. `gbps` → 12.3.
pub type Figures = BTreeMap<String, f64>;

/// What one measurement produced.
pub struct Measured {
    pub figures: Figures,
    /// The client's command line, for the report.
    pub command: String,
}

/// Machine-wide CPU time in seconds from `/proc/stat`'s first line.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq (guest time is inside user).
    pub busy: f64,
    pub steal: f64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&stat)
    }

    pub fn parse(stat: &str) -> Result<Self> {
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no `cpu` line in /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad /proc/stat line {line:?}"))?;
        ensure!(v.len() >= 8, "short /proc/stat line {line:?}");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        #[expect(clippy::cast_precision_loss, reason = "tick counts far below 2^52")]
        let s = |ticks: u64| ticks as f64 / hz.max(1) as f64;
        Ok(Self {
            busy: s(v[0] + v[1] + v[2] + v[5] + v[6]),
            steal: s(v[7]),
        })
    }

    pub fn since(self, start: Self) -> Self {
        Self {
            busy: self.busy - start.busy,
            steal: self.steal - start.steal,
        }
    }
}

/// `ip netns exec <ns> taskset -c <cpu> <program> <args>`.
pub fn pinned(ns: &str, cpu: u32, program: &str, args: &[String]) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "taskset",
        "-c",
        &cpu.to_string(),
        program,
    ])
    .args(args);
    c
}

fn line(c: &Command) -> String {
    // Without the `ip netns exec <ns>` prefix: the namespace names change every run.
    let full = cmd::describe(c);
    full.splitn(4, ' ').nth(3).unwrap_or(&full).to_owned()
}

/// A server started in the background, killed on drop.
fn start_server(
    ns: &str,
    cpu: u32,
    program: &str,
    args: &[String],
    port: u16,
) -> Result<ChildGuard> {
    let mut c = pinned(ns, cpu, program, args);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut guard = ChildGuard::spawn(c)?;
    let filter = format!("sport = :{port}");
    crate::topo::wait_for(Duration::from_secs(10), || {
        if let Some(status) = guard.wait_timeout(Duration::ZERO)? {
            bail!("{program} server exited ({status}) before listening");
        }
        let c = cmd::command("ip", &["netns", "exec", ns, "ss", "-Hltn", &filter]);
        Ok(!cmd::check(c)?.trim().is_empty())
    })
    .with_context(|| format!("{program} did not listen on TCP port {port} in {ns}"))?;
    Ok(guard)
}

/// Where and whether to profile this measurement.
pub struct Profile {
    /// `<out>/profile/<mode>-<metric>-<path>`, without extension.
    pub stem: PathBuf,
}

/// Runs `client` (bounded by `limit`) while sampling CPU time (and perf when asked); returns
/// its stdout and the CPU used meanwhile.
fn run_client(
    client: Command,
    limit: Duration,
    profile: Option<&Profile>,
) -> Result<(String, CpuTimes)> {
    let perf = profile.map(start_perf).transpose()?;
    let before = CpuTimes::now()?;
    let out = cmd::check_with(client, None, limit);
    let used = CpuTimes::now()?.since(before);
    if let (Some(mut perf), Some(p)) = (perf, profile) {
        finish_perf(&mut perf, p)?;
    }
    Ok((out?, used))
}

fn start_perf(p: &Profile) -> Result<ChildGuard> {
    let data = p.stem.with_extension("perf.data");
    let mut c = Command::new("perf");
    c.args(["record", "-a", "-g", "-q", "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let guard = ChildGuard::spawn(c)?;
    std::thread::sleep(Duration::from_millis(300)); // let it start sampling
    Ok(guard)
}

fn finish_perf(perf: &mut ChildGuard, p: &Profile) -> Result<()> {
    // SIGINT makes perf record write its file and exit.
    cmd::signal(perf.id(), libc::SIGINT)?;
    perf.wait_timeout(Duration::from_secs(30))?
        .context("perf record did not stop within 30 s of SIGINT")?;
    let data = p.stem.with_extension("perf.data");
    // A flat list of the top symbols, then the same with call graphs (who called them).
    for (suffix, graph, lines) in [("txt", "none", 80), ("graph.txt", "graph", 400)] {
        let mut c = Command::new("perf");
        c.args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.5",
            "-g",
            graph,
            "-i",
        ])
        .arg(&data);
        let report = cmd::check_with(c, None, Duration::from_secs(300)).context("perf report")?;
        let head: String = report.lines().take(lines).fold(String::new(), |mut s, l| {
            let _ = writeln!(s, "{}", l.trim_end());
            s
        });
        std::fs::write(p.stem.with_extension(suffix), head)?;
    }
    let _ = std::fs::remove_file(&data);
    Ok(())
}

fn figures(pairs: &[(&str, f64)]) -> Figures {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// The iperf3 server port.
const IPERF_PORT: u16 = 5201;
/// sockperf's server port.
const SOCKPERF_PORT: u16 = 11111;

/// Runs an iperf3 test: a one-off server in the server pod, the client with `args` (after
/// `-c <server> -p <port> -t <secs> -J`) in the client pod. Returns the client's JSON, the CPU
/// used meanwhile and the client's command line.
fn iperf3(
    p: &PathTopo,
    plan: &Plan,
    args: &[&str],
    profile: Option<&Profile>,
) -> Result<(String, CpuTimes, String)> {
    let port = IPERF_PORT.to_string();
    let _server = start_server(
        &p.server,
        plan.server_cpu,
        "iperf3",
        &strings(&["-s", "-1", "-p", &port]),
        IPERF_PORT,
    )?;
    let ip = p.server_ip.to_string();
    let secs = plan.secs.to_string();
    let mut all = vec!["-c", &ip, "-p", &port, "-t", &secs, "-J"];
    all.extend(args);
    let client = pinned(&p.client, plan.client_cpu, "iperf3", &strings(&all));
    let command = line(&client);
    let limit = Duration::from_secs(u64::from(plan.secs + plan.omit) + 30);
    let (out, cpu) = run_client(client, limit, profile)?;
    Ok((out, cpu, command))
}

/// TCP throughput with `streams` streams, client pod → server pod (`iperf3 -J`, `plan.omit`
/// omitted warm-up seconds): Gbit/s received, and machine CPU core-seconds per GB moved.
pub fn tcp(p: &PathTopo, plan: &Plan, streams: u32, profile: Option<&Profile>) -> Result<Measured> {
    let omit = plan.omit.to_string();
    let streams = streams.to_string();
    let (out, cpu, command) = iperf3(p, plan, &["-O", &omit, "-P", &streams], profile)?;
    let (gbps, bytes) = parse_iperf_tcp(&out)?;
    let gb = bytes / 1e9;
    Ok(Measured {
        figures: figures(&[
            ("gbps", gbps),
            ("cpu_s_per_gb", cpu.busy / gb),
            ("busy_s", cpu.busy),
            ("steal_s", cpu.steal),
            ("bytes", bytes),
        ]),
        command,
    })
}

/// (Gbit/s received, bytes sent over the whole run including the omitted second).
pub fn parse_iperf_tcp(json: &str) -> Result<(f64, f64)> {
    let v: Value = serde_json::from_str(json).context("parsing iperf3 -J output")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3 output")?;
    let bytes: f64 = v
        .get("intervals")
        .and_then(Value::as_array)
        .context("no intervals in iperf3 output")?
        .iter()
        .filter_map(|i| i.pointer("/sum/bytes").and_then(Value::as_f64))
        .sum();
    ensure!(bps > 0.0 && bytes > 0.0, "iperf3 moved nothing");
    Ok((bps / 1e9, bytes))
}

/// 64-byte UDP datagrams, sender unthrottled (`iperf3 -u -l 64 -b 0`): datagrams delivered
/// per second, and machine CPU ns per delivered datagram.
pub fn udp(p: &PathTopo, plan: &Plan, profile: Option<&Profile>) -> Result<Measured> {
    let args = ["-u", "-l", "64", "-b", "0"];
    let (out, cpu, command) = iperf3(p, plan, &args, profile)?;
    let (pps, delivered, sent) = parse_iperf_udp(&out, 64.0)?;
    Ok(Measured {
        figures: figures(&[
            ("pps", pps),
            ("cpu_ns_per_pkt", cpu.busy * 1e9 / delivered),
            ("delivered", delivered),
            ("sent", sent),
            ("steal_s", cpu.steal),
        ]),
        command,
    })
}

/// (delivered datagrams per second, delivered, sent) from `iperf3 -u -J`.
pub fn parse_iperf_udp(json: &str, len: f64) -> Result<(f64, f64, f64)> {
    let v: Value = serde_json::from_str(json).context("parsing iperf3 -J output")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let get = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_f64)
            .with_context(|| format!("no {p} in iperf3 output"))
    };
    let received = get("/end/sum_received/bytes")? / len;
    let secs = get("/end/sum_received/seconds")?;
    let sent = get("/end/sum_sent/packets")?;
    ensure!(received > 0.0 && secs > 0.0, "no datagram was delivered");
    Ok((received / secs, received, sent))
}

/// TCP request/response latency, client pod → server pod (`sockperf ping-pong --tcp
/// --full-rtt`, 14-byte messages, sockperf's smallest): transactions/s, p50 and p99 µs.
pub fn rr(p: &PathTopo, plan: &Plan, profile: Option<&Profile>) -> Result<Measured> {
    let port = SOCKPERF_PORT.to_string();
    let ip = p.server_ip.to_string();
    let _server = start_server(
        &p.server,
        plan.server_cpu,
        "sockperf",
        &strings(&["server", "--tcp", "-i", &ip, "-p", &port]),
        SOCKPERF_PORT,
    )?;
    let client = pinned(
        &p.client,
        plan.client_cpu,
        "sockperf",
        &strings(&[
            "ping-pong",
            "--tcp",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &plan.secs.to_string(),
            "-m",
            "14",
            "--full-rtt",
        ]),
    );
    let command = line(&client);
    let limit = Duration::from_secs(u64::from(plan.secs) + 30);
    let (out, _) = run_client(client, limit, profile)?;
    let r = parse_sockperf(&out)?;
    Ok(Measured {
        figures: figures(&[("tps", r.tps), ("p50_us", r.p50), ("p99_us", r.p99)]),
        command,
    })
}

#[derive(Debug, PartialEq)]
pub struct SockperfReport {
    pub tps: f64,
    pub p50: f64,
    pub p99: f64,
}

/// Reads `[Valid Duration] RunTime=<s> sec; ... ReceivedMessages=<n>` and the `percentile`
/// lines of sockperf's ping-pong output (colour escapes stripped).
pub fn parse_sockperf(out: &str) -> Result<SockperfReport> {
    let mut clean = String::with_capacity(out.len());
    let mut chars = out.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        let num: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse().ok()
    };
    let valid = clean
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .with_context(|| format!("no [Valid Duration] line in sockperf output:\n{out}"))?;
    let runtime = field(valid, "RunTime=").context("no RunTime")?;
    let received = field(valid, "ReceivedMessages=").context("no ReceivedMessages")?;
    let pct = |p: &str| -> Result<f64> {
        clean
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no percentile {p} in sockperf output:\n{out}"))
    };
    ensure!(
        runtime > 0.0 && received > 0.0,
        "sockperf received nothing:\n{out}"
    );
    Ok(SockperfReport {
        tps: received / runtime,
        p50: pct("50.000")?,
        p99: pct("99.000")?,
    })
}

/// Connection rate from the client pod to `(ns, ip)` with our CRR client and server
/// ([`crate::crr`]), on `port`: connections/s and failed attempts.
pub fn crr(
    p: &PathTopo,
    plan: &Plan,
    to_ns: &str,
    to: std::net::Ipv4Addr,
    port: u16,
    profile: Option<&Profile>,
) -> Result<Measured> {
    let bin = std::env::current_exe().context("locating overlay-bench")?;
    let bin = bin.to_str().context("non-UTF-8 path of overlay-bench")?;
    let _server = start_server(
        to_ns,
        plan.server_cpu,
        bin,
        &strings(&["crr-server", "--port", &port.to_string()]),
        port,
    )?;
    let client = pinned(
        &p.client,
        plan.client_cpu,
        bin,
        &strings(&[
            "crr-client",
            "--to",
            &format!("{to}:{port}"),
            "--secs",
            &plan.secs.to_string(),
        ]),
    );
    let command = line(&client).replace(bin, "overlay-bench");
    let limit = Duration::from_secs(u64::from(plan.secs) + 30);
    let (out, cpu) = run_client(client, limit, profile)?;
    let r: crate::crr::CrrReport = serde_json::from_str(out.trim())
        .with_context(|| format!("bad crr-client output {out:?}"))?;
    ensure!(
        r.connections > 0,
        "no connection completed ({} errors, first: {})",
        r.errors,
        r.first_error.as_deref().unwrap_or("-")
    );
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let (conns, errors) = (r.connections as f64, r.errors as f64);
    Ok(Measured {
        figures: figures(&[
            ("cps", conns / r.secs),
            ("errors", errors),
            ("cpu_us_per_conn", cpu.busy * 1e6 / conns),
        ]),
        command,
    })
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// `ethtool -k <dev>` in `ns`, reduced to the offloads that matter here.
pub fn offloads(ns: &str, dev: &str) -> Result<BTreeMap<String, String>> {
    let c = cmd::command("ip", &["netns", "exec", ns, "ethtool", "-k", dev]);
    let out = cmd::check(c)?;
    const KEEP: [&str; 8] = [
        "tx-checksumming",
        "scatter-gather",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "rx-gro-list",
        "rx-udp-gro-forwarding",
        "tx-udp_tnl-segmentation",
    ];
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| KEEP.contains(&k.trim()))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// Path of a profile's files for `(mode, metric, path)`.
pub fn profile_stem(out: &Path, mode: &str, metric: &str, path: &str) -> PathBuf {
    out.join("profile").join(format!("{mode}-{metric}-{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_and_steal() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let t =
            CpuTimes::parse("cpu  100 10 50 1000 5 3 7 9 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n").unwrap();
        assert!((t.busy - 170.0 / hz).abs() < 1e-9);
        assert!((t.steal - 9.0 / hz).abs() < 1e-9);
        assert!(CpuTimes::parse("cpu0 1 2\n").is_err());
    }

    #[test]
    fn sockperf_output() {
        let out = "sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=85859; ReceivedMessages=85858\n\
            sockperf: ========= Printing statistics for Server No: 0\n\
            sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=68148; ReceivedMessages=68148\n\
            sockperf: \u{1b}[2;35m====> avg-rtt=22.724 (std-dev=154.826)\u{1b}[0m\n\
            sockperf: ---> percentile 99.000 =   42.122\n\
            sockperf: ---> percentile 50.000 =   14.501\n";
        let r = parse_sockperf(out).unwrap();
        assert!((r.tps - 68148.0 / 1.55).abs() < 1e-6);
        assert!((r.p50 - 14.501).abs() < 1e-9);
        assert!((r.p99 - 42.122).abs() < 1e-9);
        assert!(parse_sockperf("nothing").is_err());
    }

    #[test]
    fn iperf_outputs() {
        let tcp = r#"{"intervals":[{"sum":{"bytes":100,"omitted":true}},{"sum":{"bytes":300}}],
            "end":{"sum_received":{"bits_per_second":2.5e9}}}"#;
        assert_eq!(parse_iperf_tcp(tcp).unwrap(), (2.5, 400.0));
        assert!(parse_iperf_tcp(r#"{"error":"unable to connect"}"#).is_err());
        let udp =
            r#"{"end":{"sum_sent":{"packets":1000},"sum_received":{"bytes":6400,"seconds":2.0}}}"#;
        assert_eq!(parse_iperf_udp(udp, 64.0).unwrap(), (50.0, 100.0, 1000.0));
    }
}
