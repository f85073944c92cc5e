//! `overlay-bench`: this project's data path against flannel's kernel paths, side by side
//! (`../shared/bench.md`). `cargo xtask bench` builds the agent in release and runs
//! `overlay-bench run`.
//!
//! For every underlay mode it builds one topology per path with the harness of `overlay-tests`
//! (namespaces, etcd, the real agent binary driven by flags and etcd as a user drives it), then
//! measures in interleaved rounds: inside a round every metric runs on every path one after the
//! other (the order rotates each round), so a ratio of two paths compares figures taken seconds
//! apart on a shared, drifting machine. The report gives medians of the figures and of the
//! per-round ratios.
//!
//! The other subcommands are this binary's own load generators, started by `run` inside the
//! namespaces (`ip netns exec <ns> taskset -c <cpu> overlay-bench crr-client ...`).

mod charts;
mod crr;
mod etcd_http;
mod load;
mod maps;
mod progstats;
mod report;
mod run;
mod scale;
mod stats;
mod topo;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "overlay-bench",
    about = "Benchmark this data path against flannel's kernel paths"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the paths' topologies in namespaces, measure, write the report.
    Run(Box<RunArgs>),
    /// Write report.md and the charts again from a results.json (e.g. after a change to the
    /// report's layout), without measuring.
    Report {
        /// The results.json of a run.
        #[arg(long)]
        results: PathBuf,
        /// Where report.md and the charts go [default: beside results.json].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Connection-rate server (one accept loop; read 1 byte, answer 1 byte, wait for close).
    CrrServer {
        #[arg(long)]
        port: u16,
    },
    /// Connection-rate client: connect, 1-byte request and response, close with RST, repeat
    /// for `--secs`; prints one JSON line.
    CrrClient {
        /// Server address `ip:port`.
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long)]
        secs: f64,
    },
}

/// A path of `../shared/bench.md`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
pub enum PathId {
    /// Ceiling: two pod namespaces joined by one veth pair.
    #[value(name = "D")]
    D,
    /// Stock flannel vxlan: kernel flannel.1 + flannel's iptables rules.
    #[value(name = "K")]
    K,
    /// Stock flannel host-gw: kernel routes + flannel's iptables rules.
    #[value(name = "H")]
    H,
    /// This project's agent, vxlan backend, --ip-masq.
    #[value(name = "E")]
    E,
    /// This project's agent, host-gw backend, --ip-masq.
    #[value(name = "EH")]
    EH,
    /// Kernel routes only, no NAT and no netfilter rules: the connection rates' no-NAT ceiling
    /// with the nodes' and the underlay's hops.
    #[value(name = "R")]
    R,
}

impl PathId {
    pub const ALL: [Self; 6] = [Self::D, Self::K, Self::H, Self::E, Self::EH, Self::R];

    pub fn name(self) -> &'static str {
        match self {
            Self::D => "D",
            Self::K => "K",
            Self::H => "H",
            Self::E => "E",
            Self::EH => "EH",
            Self::R => "R",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::D => "direct veth between the two pods (ceiling)",
            Self::K => "stock flannel vxlan: kernel flannel.1 + flannel's iptables rules",
            Self::H => "stock flannel host-gw: kernel routes + flannel's iptables rules",
            Self::E => {
                "this project, vxlan, --ip-masq (eBPF NAT; only flanneld's FORWARD accepts, which its traffic bypasses)"
            }
            Self::EH => {
                "this project, host-gw, --ip-masq (eBPF NAT; only flanneld's FORWARD accepts, which its traffic bypasses)"
            }
            Self::R => {
                "kernel routes only, no NAT, no netfilter rules (no-NAT ceiling of the connection rates)"
            }
        }
    }

    /// Whether the path has flannel peers, whose number the scale metric raises.
    pub fn has_peers(self) -> bool {
        matches!(self, Self::K | Self::H | Self::E | Self::EH)
    }

    /// Whether `metric` is measured on the path: R is the ceiling of the connection rates only
    /// (D, one veth, is the others').
    pub fn measures(self, metric: Metric) -> bool {
        self != Self::R || metric == Metric::Crr
    }

    /// Whether our agent runs the path.
    pub fn is_ours(self) -> bool {
        matches!(self, Self::E | Self::EH)
    }
}

/// How frames cross the underlay (`../shared/datapath-speed.md`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// veth defaults: the sender's TSO super-packets cross the underlay whole.
    Veth,
    /// TSO/GSO off on the underlay veths, GRO on at the receivers: MTU-sized frames as on NICs.
    Nic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Veth => "veth",
            Self::Nic => "nic",
        }
    }
}

/// What is measured.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// TCP throughput and CPU per GB, 1 stream, pod → remote pod (iperf3).
    Tcp1,
    /// The same with 4 streams.
    Tcp4,
    /// TCP request/response latency, pod → remote pod (sockperf ping-pong).
    Rr,
    /// Connection rate pod → remote pod and pod → outside host through masquerade.
    Crr,
    /// 64-byte UDP datagrams delivered per second, pod → remote pod (iperf3).
    Udp,
    /// 1-stream throughput and RR latency with many peer leases.
    Scale,
    /// Time from a lease put in etcd to every node's data path (E and EH).
    Propagation,
}

impl Metric {
    pub const ALL: [Self; 7] = [
        Self::Tcp1,
        Self::Tcp4,
        Self::Rr,
        Self::Crr,
        Self::Udp,
        Self::Scale,
        Self::Propagation,
    ];
}

/// Options of `overlay-bench run` (and so of `cargo xtask bench`).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct RunArgs {
    /// A short run (1 round of 1 s loads, veth mode, 10 and 100 peers, 5 lease changes);
    /// explicit options still override.
    #[arg(long)]
    pub quick: bool,
    /// Paths to measure (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PathId::ALL)]
    pub paths: Vec<PathId>,
    /// Metrics to measure (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Metric::ALL)]
    pub metrics: Vec<Metric>,
    /// Underlay modes (comma-separated) [default: veth,nic; --quick: veth].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<Mode>,
    /// Interleaved rounds per metric [default: 5; --quick: 1].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Seconds per load (iperf3 adds one omitted warm-up second, except with --quick)
    /// [default: 5; --quick: 1].
    #[arg(long)]
    pub secs: Option<u32>,
    /// Peer-lease counts of the scale metric [default: 10,1000,4000; --quick: 10,100].
    #[arg(long, value_delimiter = ',')]
    pub scale_peers: Vec<u32>,
    /// The mode in which scale and propagation run (lookup costs do not depend on how frames
    /// cross the underlay, and a second pass would add ~12 minutes).
    #[arg(long, value_enum, default_value_t = Mode::Veth)]
    pub scale_mode: Mode,
    /// Lease changes timed per scale level for propagation [default: 20; --quick: 5].
    #[arg(long)]
    pub changes: Option<u32>,
    /// CPUs for the client and the server (`taskset -c`).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 1])]
    pub cpus: Vec<u32>,
    /// Run `perf record -a -g` during this metric (first round, every path) and write the top
    /// symbols per path under `<out>/profile/`.
    #[arg(long, value_enum)]
    pub profile: Option<Metric>,
    /// Turn on the kernel's BPF run-time statistics for the run and report, per path and load,
    /// how often each of our programs ran and how long one run took. The statistics add two
    /// clock reads to every BPF program run, so E's and EH's other figures carry that cost:
    /// compare them with a run without this flag.
    #[arg(long)]
    pub prog_stats: bool,
    /// Where report.md, results.json and the charts go.
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
}

/// [`RunArgs`] with the defaults resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    pub paths: Vec<PathId>,
    pub metrics: Vec<Metric>,
    pub modes: Vec<Mode>,
    pub rounds: u32,
    pub secs: u32,
    /// iperf3's omitted warm-up seconds (`-O`): 1, none in a quick run.
    pub omit: u32,
    pub scale_peers: Vec<u32>,
    pub scale_mode: Mode,
    pub changes: u32,
    pub client_cpu: u32,
    pub server_cpu: u32,
    pub profile: Option<Metric>,
    /// BPF run-time statistics of our programs per load (`--prog-stats`).
    #[serde(default)]
    pub prog_stats: bool,
    pub out: PathBuf,
}

impl RunArgs {
    pub fn plan(&self) -> anyhow::Result<Plan> {
        use anyhow::ensure;
        let q = self.quick;
        let mut paths = self.paths.clone();
        paths.sort();
        paths.dedup();
        let mut metrics = self.metrics.clone();
        metrics.sort();
        metrics.dedup();
        let mut modes = if self.modes.is_empty() {
            if q {
                vec![Mode::Veth]
            } else {
                vec![Mode::Veth, Mode::Nic]
            }
        } else {
            self.modes.clone()
        };
        modes.sort();
        modes.dedup();
        let mut scale_peers = if self.scale_peers.is_empty() {
            if q {
                vec![10, 100]
            } else {
                vec![10, 1000, 4000]
            }
        } else {
            self.scale_peers.clone()
        };
        scale_peers.sort_unstable();
        scale_peers.dedup();
        let rounds = self.rounds.unwrap_or(if q { 1 } else { 5 });
        let secs = self.secs.unwrap_or(if q { 1 } else { 5 });
        let changes = self.changes.unwrap_or(if q { 5 } else { 20 });
        ensure!(!paths.is_empty(), "--paths: give at least one path");
        ensure!(!metrics.is_empty(), "--metrics: give at least one metric");
        ensure!(
            (1..=100).contains(&rounds),
            "--rounds {rounds}: must be 1..=100"
        );
        ensure!((1..=120).contains(&secs), "--secs {secs}: must be 1..=120");
        ensure!(
            (1..=1000).contains(&changes),
            "--changes {changes}: must be 1..=1000"
        );
        ensure!(
            scale_peers
                .iter()
                .all(|n| (2..=scale::MAX_PEERS).contains(n)),
            "--scale-peers {scale_peers:?}: each must be 2..={} (the count includes the real peer)",
            scale::MAX_PEERS
        );
        let [client_cpu, server_cpu] = self.cpus[..] else {
            anyhow::bail!("--cpus {:?}: give two CPUs, client then server", self.cpus);
        };
        let online = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        for cpu in [client_cpu, server_cpu] {
            ensure!(
                (cpu as usize) < online,
                "--cpus: CPU {cpu} does not exist (this machine has {online})"
            );
        }
        Ok(Plan {
            quick: q,
            paths,
            metrics,
            modes,
            rounds,
            secs,
            omit: u32::from(!q),
            scale_peers,
            scale_mode: self.scale_mode,
            changes,
            client_cpu,
            server_cpu,
            profile: self.profile,
            prog_stats: self.prog_stats,
            out: self.out.clone(),
        })
    }
}

impl Plan {
    pub fn has(&self, m: Metric) -> bool {
        self.metrics.contains(&m)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.plan().and_then(|plan| run::run(&plan)),
        Command::Report { results, out } => run::rerender(&results, out),
        Command::CrrServer { port } => crr::server(port),
        Command::CrrClient { to, secs } => crr::client(to, secs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlay-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
