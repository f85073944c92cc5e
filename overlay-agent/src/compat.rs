//! The rest of flanneld's command line, so that a flanneld unit file or DaemonSet starts this
//! agent unchanged: every flag flanneld v0.28 accepts (its own, and the klog flags it copies:
//! `v`, `vmodule`, `log_backtrace_at`), plus klog's file-logging flags that older flanneld
//! releases took and distribution unit files still pass (`-logtostderr`, `--log_dir`, ...).
//!
//! Three kinds, decided in [`FlanneldCompat::check`]:
//! - meaningless here (klog's logging options, the Kubernetes options while
//!   `--kube-subnet-mgr` is off, `--ip-blackhole-route`): accepted with a one-line warning each;
//! - not implemented yet (`--kube-subnet-mgr`, `--public-ipv6`): the agent stops with a message
//!   that says so;
//! - the flags the agent implements live in [`crate::cli::Flags`].

use clap::{ArgAction, Args as ClapArgs, builder::BoolishValueParser};

use crate::cli::Flags;

/// Heading of these flags in `--help`.
const HEADING: &str = "Accepted for flanneld compatibility";

/// flanneld's flags that the agent accepts without acting on them, or refuses for now.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct FlanneldCompat {
    /// Not implemented yet: IPv6 address of this node (stops the agent).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", help_heading = HEADING)]
    pub public_ipv6: Option<String>,

    /// Not implemented yet: subnet leases from the Kubernetes API (stops the agent when true).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(), help_heading = HEADING)]
    pub kube_subnet_mgr: Option<bool>,

    /// No effect without --kube-subnet-mgr.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", help_heading = HEADING)]
    pub kube_api_url: Option<String>,

    /// No effect without --kube-subnet-mgr.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", help_heading = HEADING)]
    pub kube_annotation_prefix: Option<String>,

    /// No effect without --kube-subnet-mgr.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", help_heading = HEADING)]
    pub kubeconfig_file: Option<String>,

    /// No effect without --kube-subnet-mgr (the network config comes from etcd).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", help_heading = HEADING)]
    pub net_config_path: Option<String>,

    /// No effect without --kube-subnet-mgr.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(), help_heading = HEADING)]
    pub set_node_network_unavailable: Option<bool>,

    /// No effect: flanneld's blackhole route for this node's subnet, which the cluster network's
    /// route through ovl0 makes unneeded.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new(), help_heading = HEADING)]
    pub ip_blackhole_route: Option<bool>,

    /// klog: per-file verbosity. No effect (use RUST_LOG).
    #[arg(long, env = "FLANNELD_VMODULE", help_heading = HEADING)]
    pub vmodule: Option<String>,

    /// klog: stack trace at a log line. No effect.
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT", help_heading = HEADING)]
    pub log_backtrace_at: Option<String>,

    /// klog: logs always go to stderr (journald). No effect.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub logtostderr: Option<bool>,

    /// klog. No effect.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub alsologtostderr: Option<bool>,

    /// klog. No effect: logs go to stderr.
    #[arg(long = "log_dir", help_heading = HEADING)]
    pub log_dir: Option<String>,

    /// klog. No effect: logs go to stderr.
    #[arg(long = "log_file", help_heading = HEADING)]
    pub log_file: Option<String>,

    /// klog. No effect.
    #[arg(long = "log_file_max_size", help_heading = HEADING)]
    pub log_file_max_size: Option<u64>,

    /// klog. No effect.
    #[arg(long, help_heading = HEADING)]
    pub stderrthreshold: Option<String>,

    /// klog. No effect.
    #[arg(long = "skip_headers", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub skip_headers: Option<bool>,

    /// klog. No effect.
    #[arg(long = "skip_log_headers", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub skip_log_headers: Option<bool>,

    /// klog. No effect.
    #[arg(long = "add_dir_header", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub add_dir_header: Option<bool>,

    /// klog. No effect.
    #[arg(long = "one_output", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub one_output: Option<bool>,

    /// klog. No effect.
    #[arg(long = "legacy_stderr_threshold_behavior", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          help_heading = HEADING)]
    pub legacy_stderr_threshold_behavior: Option<bool>,
}

/// A flanneld flag the agent does not implement yet, given with a value that needs it.
#[derive(Debug, thiserror::Error)]
#[error("{flag} is not implemented by overlay-agent yet ({what}); remove it to run this agent")]
pub struct Unsupported {
    pub flag: &'static str,
    pub what: &'static str,
}

impl FlanneldCompat {
    /// The warnings for the flags given that mean nothing here (one line each), or the first
    /// flag given that needs something not implemented yet.
    pub fn check(&self) -> Result<Vec<String>, Unsupported> {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        let unsupported = [
            (
                self.kube_subnet_mgr == Some(true),
                "--kube-subnet-mgr",
                "subnet leases from the Kubernetes API; this agent uses etcd",
            ),
            (
                set(&self.public_ipv6),
                "--public-ipv6",
                "IPv6 and dual stack",
            ),
        ];
        if let Some((_, flag, what)) = unsupported.into_iter().find(|(on, ..)| *on) {
            return Err(Unsupported { flag, what });
        }

        let mut warnings = Vec::new();
        let mut ignore = |given: bool, flag: &str, why: &str| {
            if given {
                warnings.push(format!("ignoring {flag}: {why}"));
            }
        };
        let kube = "only used with --kube-subnet-mgr, and this agent uses etcd";
        ignore(self.kube_api_url.is_some(), "--kube-api-url", kube);
        ignore(
            self.kube_annotation_prefix.is_some(),
            "--kube-annotation-prefix",
            kube,
        );
        ignore(self.kubeconfig_file.is_some(), "--kubeconfig-file", kube);
        ignore(self.net_config_path.is_some(), "--net-config-path", kube);
        ignore(
            self.set_node_network_unavailable.is_some(),
            "--set-node-network-unavailable",
            kube,
        );
        // Given as false: the flag's default in flanneld, nothing to say beyond "ignored".
        ignore(
            self.kube_subnet_mgr == Some(false),
            "--kube-subnet-mgr=false",
            "etcd is the only subnet manager here",
        );
        // flanneld adds it so that a node without a pod bridge (Canal) does not send traffic for
        // its unassigned pod addresses to the default route. Here the route of the whole
        // cluster network through ovl0 already takes them, and `host_egress` drops them
        // (`drop_no_route`); decapsulated ones are dropped too (`drop_no_bridge`). Added before
        // the runtime's bridge, a blackhole route would shadow the bridge's own route.
        ignore(
            self.ip_blackhole_route == Some(true),
            "--ip-blackhole-route",
            "not needed: the cluster network's route through ovl0 keeps this node's unassigned \
             pod addresses from the default route, and the data path drops what is sent to them",
        );
        ignore(
            self.ip_blackhole_route == Some(false),
            "--ip-blackhole-route=false",
            "no blackhole route is added",
        );
        let klog = "logs go to stderr (journald); set the level with -v or RUST_LOG";
        for (given, flag) in [
            (self.vmodule.is_some(), "--vmodule"),
            (self.log_backtrace_at.is_some(), "--log_backtrace_at"),
            (self.logtostderr.is_some(), "--logtostderr"),
            (self.alsologtostderr.is_some(), "--alsologtostderr"),
            (self.log_dir.is_some(), "--log_dir"),
            (self.log_file.is_some(), "--log_file"),
            (self.log_file_max_size.is_some(), "--log_file_max_size"),
            (self.stderrthreshold.is_some(), "--stderrthreshold"),
            (self.skip_headers.is_some(), "--skip_headers"),
            (self.skip_log_headers.is_some(), "--skip_log_headers"),
            (self.add_dir_header.is_some(), "--add_dir_header"),
            (self.one_output.is_some(), "--one_output"),
            (
                self.legacy_stderr_threshold_behavior.is_some(),
                "--legacy_stderr_threshold_behavior",
            ),
        ] {
            ignore(given, flag, klog);
        }
        Ok(warnings)
    }
}

impl Flags {
    /// The effective settings, one `name=value` each (flanneld logs its own at start as
    /// `CLI flags config: {...}`); the etcd password is shown as set or not, never its value.
    #[must_use]
    pub fn effective(&self) -> String {
        let opt = |v: &Option<std::path::PathBuf>| {
            v.as_ref()
                .map_or_else(String::new, |p| p.display().to_string())
        };
        let fields = [
            ("etcd-endpoints", self.etcd_endpoints.join(",")),
            ("etcd-prefix", self.etcd_prefix.clone()),
            ("etcd-keyfile", opt(&self.etcd_keyfile)),
            ("etcd-certfile", opt(&self.etcd_certfile)),
            ("etcd-cafile", opt(&self.etcd_cafile)),
            (
                "etcd-username",
                self.etcd_username.clone().unwrap_or_default(),
            ),
            (
                "etcd-password",
                if self.etcd_password.is_some() {
                    "<set>".to_owned()
                } else {
                    String::new()
                },
            ),
            ("iface", self.iface.join(",")),
            ("iface-regex", self.iface_regex.join(",")),
            (
                "iface-can-reach",
                self.iface_can_reach.clone().unwrap_or_default(),
            ),
            (
                "public-ip",
                self.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            ),
            ("subnet-file", self.subnet_file.display().to_string()),
            (
                "subnet-lease-renew-margin",
                self.subnet_lease_renew_margin.to_string(),
            ),
            ("ip-masq", self.ip_masq.to_string()),
            (
                "ip-masq-fully-random-disable",
                self.ip_masq_fully_random_disable.to_string(),
            ),
            (
                "ip-masq-exclude",
                self.ip_masq_exclude
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("healthz-ip", self.healthz_ip.to_string()),
            ("healthz-port", self.healthz_port.to_string()),
            (
                "iptables-forward-rules",
                self.iptables_forward_rules.to_string(),
            ),
            ("iptables-resync", self.iptables_resync.to_string()),
            ("v", self.verbosity.to_string()),
            ("pod-bridge", self.pod_bridge.clone().unwrap_or_default()),
            ("bpf-dir", self.bpf_dir.display().to_string()),
            ("status-file", self.status_file.display().to_string()),
            (
                "health-etcd-timeout",
                self.health_etcd_timeout.as_secs().to_string(),
            ),
            (
                "pinned-layout-mismatch",
                self.pinned_layout_mismatch.as_str().to_owned(),
            ),
        ];
        let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{{{}}}", parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::tests::parse;

    /// Every flag `flanneld -help` lists in v0.28 (main.go's flag set, with klog's v, vmodule,
    /// log_backtrace_at), each with a value of its type, in Go's single-dash form.
    const FLANNELD_V028: &[&str] = &[
        "-etcd-endpoints=http://198.18.0.254:2379",
        "-etcd-prefix=/coreos.com/network",
        "-etcd-keyfile=k.pem",
        "-etcd-certfile=c.pem",
        "-etcd-cafile=ca.pem",
        "-etcd-username=u",
        "-etcd-password=p",
        "-iface=eth0",
        "-iface-regex=^eth",
        "-iface-can-reach=",
        "-subnet-file=/run/flannel/subnet.env",
        "-public-ip=198.18.0.1",
        "-public-ipv6=",
        "-subnet-lease-renew-margin=60",
        "-ip-masq=true",
        "-ip-masq-fully-random-disable=false",
        "-kube-subnet-mgr=false",
        "-kube-api-url=https://k8s",
        "-kube-annotation-prefix=flannel.alpha.coreos.com",
        "-kubeconfig-file=/etc/kubeconfig",
        "-healthz-ip=0.0.0.0",
        "-healthz-port=2401",
        "-iptables-resync=5",
        "-iptables-forward-rules=true",
        "-ip-blackhole-route=false",
        "-net-config-path=/etc/kube-flannel/net-conf.json",
        "-set-node-network-unavailable=true",
        "-v=2",
        "-vmodule=main=3",
        "-log_backtrace_at=main.go:1",
    ];

    #[test]
    fn every_flanneld_v028_flag_is_accepted() {
        let cli = parse(FLANNELD_V028);
        assert_eq!(cli.flags.healthz_port, 2401);
        assert_eq!(cli.flags.verbosity, 2);
        let warnings = cli.flags.compat.check().expect("nothing unsupported is on");
        for flag in [
            "--kube-api-url",
            "--vmodule",
            "--log_backtrace_at",
            "--set-node-network-unavailable",
        ] {
            assert!(
                warnings.iter().any(|w| w.contains(flag)),
                "{flag} must be warned about: {warnings:?}"
            );
        }
    }

    #[test]
    fn klog_flags_of_older_unit_files_are_accepted_with_a_warning() {
        let cli = parse(&[
            "-logtostderr",
            "--alsologtostderr=false",
            "--log_dir=/var/log/flannel",
            "-log_file=/x",
            "--log_file_max_size",
            "1800",
            "-stderrthreshold=INFO",
            "--skip_headers",
            "--v=3",
            "--v",
            "4",
        ]);
        assert_eq!(cli.flags.verbosity, 4, "the last -v wins, as in Go");
        let warnings = cli.flags.compat.check().unwrap();
        assert_eq!(warnings.len(), 7, "{warnings:?}");
        assert!(
            warnings.iter().all(|w| w.contains("stderr")),
            "{warnings:?}"
        );
    }

    #[test]
    fn unimplemented_flags_stop_the_agent_naming_the_flag() {
        for (args, flag) in [
            (&["--kube-subnet-mgr"][..], "--kube-subnet-mgr"),
            (&["-kube-subnet-mgr=true"][..], "--kube-subnet-mgr"),
            (&["--public-ipv6", "2001:db8::1"][..], "--public-ipv6"),
        ] {
            let err = parse(args).flags.compat.check().unwrap_err().to_string();
            assert!(
                err.contains(flag) && err.contains("not implemented"),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn ip_blackhole_route_is_accepted_and_said_to_be_unneeded() {
        let warnings = parse(&["-ip-blackhole-route"])
            .flags
            .compat
            .check()
            .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("ignoring --ip-blackhole-route: not needed"),
            "{warnings:?}"
        );
    }

    #[test]
    fn help_lists_every_flanneld_flag() {
        use clap::CommandFactory as _;
        let help = crate::cli::Cli::command().render_long_help().to_string();
        for arg in FLANNELD_V028 {
            let name = arg.trim_start_matches('-').split('=').next().unwrap();
            let flag = if name == "v" {
                "-v, --v".to_owned()
            } else {
                format!("--{name}")
            };
            assert!(help.contains(&flag), "--help lacks {flag}");
        }
        assert!(help.contains("Accepted for flanneld compatibility"));
    }

    #[test]
    fn nothing_given_means_no_warning() {
        assert!(parse(&[]).flags.compat.check().unwrap().is_empty());
    }

    #[test]
    fn effective_flags_hide_the_password() {
        let flags = parse(&["--etcd-password", "s3cret", "--iface", "eth0"]).flags;
        let line = flags.effective();
        assert!(!line.contains("s3cret"), "{line}");
        assert!(line.contains("etcd-password=<set>"), "{line}");
        assert!(line.contains("iface=eth0"), "{line}");
        assert!(line.contains("etcd-prefix=/coreos.com/network"), "{line}");
    }
}
