//! Command-line flags: flanneld's, with the same names, defaults and `FLANNELD_<NAME>` variables,
//! so an existing flanneld unit file or DaemonSet can start this agent unchanged.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Args as ClapArgs, Parser, Subcommand, builder::BoolishValueParser};

use crate::compat::FlanneldCompat;

/// Where programs and maps are pinned so that a restarted agent adopts them.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/overlay";
/// Where the agent keeps its runtime state for `overlay-agent status`: beside flannel's
/// subnet file, on the tmpfs /run.
pub const DEFAULT_STATUS_FILE: &str = "/run/flannel/overlay-status.json";

/// flannel-compatible overlay network agent with an eBPF data path.
///
/// Runs on every node: leases this node's subnet of the cluster network from etcd (the records
/// flanneld uses), writes the subnet file for the container runtime, and forwards pod traffic
/// between nodes with eBPF programs instead of a kernel VXLAN device and iptables.
#[derive(Debug, Parser)]
#[command(
    name = "overlay-agent",
    version,
    about,
    long_about,
    args_override_self = true
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: Flags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (the default when no subcommand is given).
    Run,
    /// Print the data path's counters (packets and bytes per forward/drop reason), read from
    /// the maps pinned under --bpf-dir: `<name> <packets> <bytes>` per line.
    Counters {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the remote subnets the data path routes, read from the pinned maps:
    /// `<subnet> <public IP> <VtepMAC>` per line.
    Peers {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the masqueraded flows (`--ip-masq`), read from the pinned maps: `<proto> <pod>
    /// <remote> via <translated> <state> [unassured] idle=<s>` per line, then `entries <n>
    /// capacity <max> unassured <n> capacity <max>` (assured flows' table, then the other).
    Nat {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The node at a glance: the agent's lease and its expiry, etcd reachability, readiness,
    /// the interfaces and the programs the kernel has attached to them, the pod bridge, the
    /// peers and how each is reached, NAT pressure. Reads the agent's --status-file and asks
    /// the kernel; works while the agent is down too.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show sampled drop events from the data path live (reason, device, addresses, ports,
    /// and for VXLAN the outer addresses), until interrupted or --count events were shown.
    Monitor {
        /// Which events: only `drop` exists.
        #[arg(long = "type", value_enum, default_value_t = EventType::Drop)]
        event_type: EventType,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_parser = parse_seconds)]
        timeout: Option<Duration>,
    },
    /// Print the local pods the data path delivers to directly (read from the pinned maps):
    /// `<pod address> <host-side veth index> <pod MAC>` per line.
    Endpoints,
    /// Remove everything the agent installed in this network namespace: detach and unpin its
    /// programs, remove its maps, delete the host device ovl0. The subnet lease stays in etcd.
    Cleanup,
}

/// How the inspection subcommands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for people.
    Text,
    /// One JSON document (`monitor`: one JSON object per line).
    Json,
}

/// The event types `monitor` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventType {
    Drop,
}

/// What to do when the maps pinned under --bpf-dir have another layout than this agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutMismatch {
    /// Replace the maps whose layout differs (their state is rebuilt from etcd; their
    /// counters or masqueraded flows start empty); keep the others.
    Migrate,
    /// Stop with a message naming the maps and the command that clears them.
    Refuse,
}

impl LayoutMismatch {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Migrate => "migrate",
            Self::Refuse => "refuse",
        }
    }
}

/// flanneld's flags. Every flag can also be set from the environment as `FLANNELD_<NAME>`
/// (dashes become underscores, upper case), e.g. `FLANNELD_ETCD_ENDPOINTS`.
#[derive(Debug, Clone, ClapArgs)]
pub struct Flags {
    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix under which the network config and subnet leases live.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// TLS client key file for etcd (TLS is used when both key and cert file are given).
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// TLS client certificate file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// CA certificate file that signs the etcd server's certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// Username for etcd authentication.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password for etcd authentication.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Interface (name or IP address) to use for inter-node traffic; repeatable, the first that
    /// exists wins. Default: the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface addresses, then names, when no --iface matches; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// When neither --iface nor --iface-regex matches: the interface the kernel routes this
    /// IPv4 address through (`ip route get <address>`), with the source address it picks.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", value_name = "ADDRESS")]
    pub iface_can_reach: Option<String>,

    /// IP address other nodes use to reach this one. Default: the address of the chosen interface.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// File to write the leased subnet to, for the container runtime (Docker, CNI).
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Renew the subnet lease this many minutes before it expires (1..1439).
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..=1439)
    )]
    pub subnet_lease_renew_margin: u32,

    /// Masquerade traffic from pods to destinations outside the cluster network (done in eBPF:
    /// no iptables rules are written).
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub ip_masq: bool,

    /// Keep source ports when masquerading where possible instead of picking them at random.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,

    /// Beyond flanneld (like Kubernetes' ip-masq-agent nonMasqueradeCIDRs): a destination CIDR
    /// that --ip-masq never masquerades, besides the cluster network; repeatable.
    #[arg(
        long,
        env = "OVERLAY_IP_MASQ_EXCLUDE",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub ip_masq_exclude: Vec<ipnet::Ipv4Net>,

    /// Address the health endpoints listen on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// Port of the health endpoints (/healthz, /readyz); 0 turns them off.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// flanneld's FORWARD accept rules for the cluster network (chain FLANNEL-FWD), written
    /// only while the FORWARD policy is not ACCEPT (Docker sets DROP): what the data path leaves
    /// to the kernel's forwarding (Service connections, unmasqueraded traffic to and from
    /// outside) needs them there. The data path itself bypasses FORWARD.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub iptables_forward_rules: bool,

    /// How often the forward rules and the FORWARD policy are checked again, in seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub iptables_resync: u64,

    /// Log verbosity as flanneld's glog level: 0 info, 1+ debug, 5+ trace (RUST_LOG overrides).
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// Name of the pod bridge (docker0, cni0). Default: the interface holding the subnet's
    /// gateway address (FLANNEL_SUBNET), found whenever it appears.
    #[arg(long, env = "OVERLAY_POD_BRIDGE")]
    pub pod_bridge: Option<String>,

    /// XDP decapsulation on the external interface, before GRO (ours). `auto` does without:
    /// the kernel's GRO aggregates VXLAN through the GRO device `ovl-gro`, then TC
    /// decapsulates the aggregate (faster than XDP in the benchmark's NIC mode, where a veth
    /// copies every frame for XDP, and the kernel's checksum handling stays whole); `on`
    /// requires native XDP; `off` never uses it.
    #[arg(long, env = "OVERLAY_XDP", value_enum, default_value_t = XdpPolicy::Auto)]
    pub xdp: XdpPolicy,

    /// Where pods' traffic is picked up (ours): `port`, each pod's host-side veth (as Cilium
    /// does) in front of the pod bridge's tcx ingress, which skips the bridge for what leaves
    /// the node (measured: CPU per GB −9 %, small packets +9 %); `bridge`, the bridge only.
    #[arg(long, env = "OVERLAY_POD_HOOK", value_enum, default_value_t = PodHook::Port)]
    pub pod_hook: PodHook,

    /// Directory under bpffs where the data path's programs and maps are pinned.
    #[arg(long, env = "OVERLAY_BPF_DIR", default_value = DEFAULT_BPF_DIR, global = true)]
    pub bpf_dir: PathBuf,

    /// Where the agent keeps its runtime state (lease, etcd reachability, readiness) for
    /// `overlay-agent status`, rewritten every second.
    #[arg(
        long,
        env = "OVERLAY_STATUS_FILE",
        default_value = DEFAULT_STATUS_FILE,
        global = true
    )]
    pub status_file: PathBuf,

    /// /readyz answers 503 once etcd has been unreachable for this many seconds.
    #[arg(long, env = "OVERLAY_HEALTH_ETCD_TIMEOUT", default_value = "60",
          value_parser = parse_seconds)]
    pub health_etcd_timeout: Duration,

    /// What to do when the maps pinned under --bpf-dir have another layout than this agent's.
    #[arg(long, env = "OVERLAY_PINNED_LAYOUT_MISMATCH", value_enum,
          default_value_t = LayoutMismatch::Migrate)]
    pub pinned_layout_mismatch: LayoutMismatch,

    /// The rest of flanneld's flags (accepted with a warning, or refused for now).
    #[command(flatten)]
    pub compat: FlanneldCompat,

    /// Developer option: TTL of the subnet lease in seconds (flannel's 24 h by default).
    #[arg(long, env = "OVERLAY_DEV_LEASE_TTL", hide = true, value_parser = parse_seconds)]
    pub dev_lease_ttl: Option<Duration>,

    /// Developer option: every masquerade idle timeout (TCP, UDP, ICMP) in seconds, instead of
    /// conntrack's defaults (for expiry tests).
    #[arg(long, env = "OVERLAY_DEV_NAT_TIMEOUT", hide = true, value_parser = parse_seconds)]
    pub dev_nat_timeout: Option<Duration>,
}

/// Where pods' traffic is picked up (`--pod-hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodHook {
    /// The pod bridge's tcx ingress.
    Bridge,
    /// Each pod's host-side veth too (the bridge's hook stays, for the rest).
    Port,
}

/// When the agent decapsulates in XDP (`--xdp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpPolicy {
    /// No XDP: GRO aggregates VXLAN through the GRO device's tunnel socket, as it does for
    /// `flannel.1`, and TC decapsulates the aggregate. (On a veth XDP costs a copy of every
    /// frame; on a NIC that only validated the outer UDP checksum, XDP's decapsulated frames
    /// would pass that verdict on to the inner packet.)
    Auto,
    /// XDP decapsulation before GRO; the agent fails to start if native XDP cannot be
    /// attached.
    On,
    /// Never: TC decapsulates everything.
    Off,
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!(
            "expected a positive number of seconds, got {value:?}"
        )),
    }
}

impl Cli {
    /// Parses the command line and the `FLANNELD_*` variables as flanneld does, which reads a
    /// variable only when it is not empty (`FLANNELD_IFACE=` in a unit's environment file means
    /// "not given", not an interface named ""). `is_empty` says whether a variable is set to "".
    pub fn try_parse_env<I: IntoIterator<Item = OsString>>(
        args: I,
        is_empty: impl Fn(&std::ffi::OsStr) -> bool,
    ) -> Result<Self, clap::Error> {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let command = Self::command().mut_args(|arg| match arg.get_env() {
            Some(name) if is_empty(name) => arg.env(None),
            _ => arg,
        });
        Self::from_arg_matches(&command.try_get_matches_from(normalize_go_flags(args))?)
    }

    /// [`Cli::try_parse_env`] with `args` and the process's environment; exits with clap's
    /// message on bad input.
    #[must_use]
    pub fn parse_process_env<I: IntoIterator<Item = OsString>>(args: I) -> Self {
        Self::try_parse_env(args, |name| {
            std::env::var_os(name).is_some_and(|v| v.is_empty())
        })
        .unwrap_or_else(|e| e.exit())
    }
}

/// flanneld is a Go program, whose flag parser takes `-etcd-endpoints=...` with one dash as well
/// as two. Rewrites such single-dash long flags to the double-dash form clap expects.
pub fn normalize_go_flags<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            let Some(s) = arg.to_str() else { return arg };
            let name = s.split('=').next().unwrap_or(s);
            // A single dash, then a name of two or more characters: `-v=2` stays a short flag.
            if i > 0 && s.starts_with('-') && !s.starts_with("--") && name.len() > 2 {
                OsString::from(format!("-{s}"))
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Parses `args` as the agent's command line (Go spellings included); panics on error.
    pub(crate) fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("overlay-agent")
            .chain(args.iter().copied())
            .map(OsString::from);
        Cli::try_parse_from(normalize_go_flags(argv)).expect("flags parse")
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_flanneld_defaults() {
        let f = parse(&[]).flags;
        assert_eq!(
            f.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq);
        assert!(f.iptables_forward_rules);
        assert_eq!(f.healthz_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.dev_lease_ttl, None);
        assert!(f.ip_masq_exclude.is_empty());
        assert_eq!(f.dev_nat_timeout, None);
    }

    #[test]
    fn go_style_single_dash_and_bool_forms() {
        let f = parse(&[
            "-etcd-endpoints=http://198.18.0.254:2379",
            "-iface",
            "eth0",
            "-ip-masq",
            "--iptables-forward-rules=false",
            "-v=2",
        ])
        .flags;
        assert_eq!(f.etcd_endpoints, ["http://198.18.0.254:2379"]);
        assert_eq!(f.iface, ["eth0"]);
        assert!(f.ip_masq);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.verbosity, 2);
    }

    #[test]
    fn ip_masq_exclude_is_repeatable_and_comma_separated() {
        let f = parse(&[
            "--ip-masq",
            "--ip-masq-exclude",
            "10.96.0.0/12",
            "--ip-masq-exclude=192.168.0.0/16,100.64.0.0/10",
            "--dev-nat-timeout",
            "2",
        ])
        .flags;
        assert!(f.ip_masq);
        let nets: Vec<String> = f.ip_masq_exclude.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.96.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]);
        assert_eq!(f.dev_nat_timeout, Some(Duration::from_secs(2)));
        let argv = ["overlay-agent", "--ip-masq-exclude", "10.96.0.0"].map(OsString::from);
        assert!(
            Cli::try_parse_from(argv).is_err(),
            "a CIDR needs its prefix length"
        );
    }

    #[test]
    fn renew_margin_out_of_range_is_rejected_naming_the_value() {
        let argv = ["overlay-agent", "--subnet-lease-renew-margin", "1440"].map(OsString::from);
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("1440"), "{err}");
    }

    /// The flags `--help` must list are checked on the real binary (tests/agent_lifecycle.rs);
    /// here: what it must not show.
    #[test]
    fn developer_options_stay_out_of_help() {
        let help = Cli::command().render_long_help().to_string();
        for hidden in ["--dev-lease-ttl", "--dev-nat-timeout"] {
            assert!(
                !help.contains(hidden),
                "developer option {hidden} must stay hidden"
            );
        }
        assert!(
            help.contains("--etcd-endpoints"),
            "the help is the agent's: {help}"
        );
    }
}
