//! Masquerade (`--ip-masq`: pod traffic leaving the cluster, and traffic from outside the
//! cluster network to remote pods, flannel's last rule) on the agent's side: the settings
//! written to `NAT_CONFIG` and
//! `NAT_EXCLUDE_V4`, the sweeper that frees idle flows from the flow tables (`SNAT_V4_CT` /
//! `SNAT_V4_REV` and their `_NEW` twins for flows not assured yet), and a read-only view of
//! the pinned flow tables (`overlay-agent nat`). The translation itself is in
//! the data path (`overlay-ebpf/src/lib/nat.rs`); layouts in `overlay_common::nat`.
//!
//! The data path already treats an idle entry as dead when it meets one; the sweeper exists so
//! that the table does not fill with dead flows nobody meets again (LRU eviction would then
//! pick among live and dead flows alike). Both entries of a flow carry the same state and time,
//! so each map is swept on its own.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError};
use ipnet::Ipv4Net;
use overlay_common::nat::{
    IPPROTO_TCP, NAT_CONFIG_INDEX, NAT_E_KERNEL, NAT_E_TO_CLUSTER, NAT_F_ENABLED, NAT_F_KEEP_PORT,
    NAT_S_FIN, NAT_S_REPLIED, NAT_S_RST, NatConfig, NatEntryV4, NatKeyV4,
};

use super::{Datapath, DatapathError, map_mut, names, pin::PinDir};

/// Idle timeouts, as the kernel's conntrack defaults (`nf_conntrack_*_timeout*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTimeouts {
    pub tcp_established: Duration,
    /// SYN sent, half-open, closing (FIN): conntrack's SYN_SENT / FIN_WAIT / TIME_WAIT are
    /// 120 s.
    pub tcp_transient: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
    pub icmp: Duration,
    /// After a reset: conntrack's CLOSE, 10 s.
    pub tcp_close: Duration,
}

impl Default for NatTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(5 * 24 * 3600),
            tcp_transient: Duration::from_secs(120),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
            tcp_close: Duration::from_secs(10),
        }
    }
}

impl NatTimeouts {
    /// Every timeout `t` (the developer option for expiry tests).
    #[must_use]
    pub fn all(t: Duration) -> Self {
        Self {
            tcp_established: t,
            tcp_transient: t,
            udp: t,
            udp_stream: t,
            icmp: t,
            tcp_close: t,
        }
    }

    /// The shortest timeout the sweep interval follows. `tcp_close` is left out: a sweep walks
    /// every flow, and at the data path an expired entry is dead already; reset flows are
    /// freed by the next sweep all the same.
    fn shortest(&self) -> Duration {
        [
            self.tcp_established,
            self.tcp_transient,
            self.udp,
            self.udp_stream,
            self.icmp,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(30))
    }

    /// How often the agent sweeps: half the shortest timeout, within 1..=30 s.
    #[must_use]
    pub fn sweep_interval(&self) -> Duration {
        (self.shortest() / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

/// What `--ip-masq` and its companions ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    pub enabled: bool,
    /// `--ip-masq-fully-random-disable`.
    pub keep_port: bool,
    /// Translated ports, inclusive.
    pub ports: (u16, u16),
    pub timeouts: NatTimeouts,
    /// `--ip-masq-exclude`: destinations never masqueraded besides the cluster network.
    pub exclude: Vec<Ipv4Net>,
}

impl NatSettings {
    /// Off: nothing is translated.
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            keep_port: false,
            ports: (1024, 65535),
            timeouts: NatTimeouts::default(),
            exclude: Vec::new(),
        }
    }

    fn encode(&self) -> NatConfig {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        let t = &self.timeouts;
        NatConfig {
            flags: if self.enabled { NAT_F_ENABLED } else { 0 }
                | if self.keep_port { NAT_F_KEEP_PORT } else { 0 },
            port_min: self.ports.0,
            port_max: self.ports.1,
            tcp_established: secs(t.tcp_established),
            tcp_transient: secs(t.tcp_transient),
            udp: secs(t.udp),
            udp_stream: secs(t.udp_stream),
            icmp: secs(t.icmp),
            tcp_close: secs(t.tcp_close),
        }
    }
}

/// The translated port range: the larger side of 1024..=65535 outside the kernel's ephemeral
/// range `lo..=hi` (`net.ipv4.ip_local_port_range`), so that a translated flow never takes a
/// port the host's own connections may pick; the whole of 1024..=65535 if neither side is left.
#[must_use]
pub fn port_range_outside(lo: u16, hi: u16) -> (u16, u16) {
    let below = (1024u16, lo.saturating_sub(1));
    let above = (hi.saturating_add(1).max(1024), 65535u16);
    let size = |(a, b): (u16, u16)| {
        if b >= a && b >= 1024 {
            u32::from(b - a) + 1
        } else {
            0
        }
    };
    let best = if size(below) >= size(above) {
        below
    } else {
        above
    };
    if size(best) < 1024 {
        (1024, 65535)
    } else {
        best
    }
}

/// `port_range_outside` for this network namespace's `ip_local_port_range`.
#[must_use]
pub fn default_port_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut nums = text
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    match (nums.next(), nums.next()) {
        (Some(lo), Some(hi)) if lo <= hi => port_range_outside(lo, hi),
        _ => port_range_outside(32768, 60999),
    }
}

impl NatSettings {
    /// The settings the agent's flags ask for.
    #[must_use]
    pub fn from_flags(flags: &crate::cli::Flags) -> Self {
        Self {
            enabled: flags.ip_masq,
            keep_port: flags.ip_masq_fully_random_disable,
            ports: default_port_range(),
            timeouts: flags
                .dev_nat_timeout
                .map_or_else(NatTimeouts::default, NatTimeouts::all),
            exclude: flags.ip_masq_exclude.clone(),
        }
    }
}

/// The Kubernetes Service address (`KUBERNETES_SERVICE_HOST`, set in every pod, the agent's
/// DaemonSet pod included) that these settings would masquerade: the masquerade translates a
/// pod's packet where it enters the node, before kube-proxy's DNAT, so pod → Service traffic
/// must be excluded (`--ip-masq-exclude` with the Service CIDR). `None` when the masquerade is
/// off, the variable is unset or not IPv4, the address is excluded or in `network`, or it is a
/// local address (kube-proxy's IPVS mode puts ClusterIPs on `kube-ipvs0`: the kernel then
/// takes such packets, and the masquerade leaves them alone).
#[must_use]
pub fn service_ip_masqueraded(
    settings: &NatSettings,
    network: Ipv4Net,
    service_host: Option<&str>,
    local: &[Ipv4Addr],
) -> Option<Ipv4Addr> {
    let ip: Ipv4Addr = service_host?.trim().parse().ok()?;
    let excluded = network.contains(&ip) || settings.exclude.iter().any(|n| n.contains(&ip));
    (settings.enabled && !excluded && !local.contains(&ip)).then_some(ip)
}

/// Result of one sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries removed from the four flow tables.
    pub removed: usize,
    /// Flows left (`SNAT_V4_CT` and `SNAT_V4_CT_NEW` entries).
    pub flows: usize,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

impl Datapath {
    /// Writes the masquerade settings: `NAT_CONFIG`, and `NAT_EXCLUDE_V4` made equal to
    /// `settings.exclude`. Turning masquerade off also forgets every flow.
    pub fn set_nat(&mut self, settings: &NatSettings) -> Result<(), DatapathError> {
        if settings.ports.0 == 0 || settings.ports.1 < settings.ports.0 {
            return Err(DatapathError::InvalidConfig(format!(
                "bad masquerade port range {}..={}",
                settings.ports.0, settings.ports.1
            )));
        }
        let mut trie: LpmTrie<_, [u8; 4], u8> = map_mut(&mut self.ebpf, names::NAT_EXCLUDE_V4)?;
        let want: Vec<Ipv4Net> = settings.exclude.iter().map(Ipv4Net::trunc).collect();
        let have: Vec<_> =
            trie.keys()
                .collect::<Result<_, _>>()
                .map_err(|source| DatapathError::Map {
                    map: names::NAT_EXCLUDE_V4,
                    source,
                })?;
        for key in have {
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8);
            if !net.is_ok_and(|n| want.contains(&n)) {
                ignore_missing(trie.remove(&key)).map_err(|source| DatapathError::MapUpdate {
                    map: names::NAT_EXCLUDE_V4,
                    source,
                })?;
            }
        }
        for net in &want {
            let key =
                aya::maps::lpm_trie::Key::new(u32::from(net.prefix_len()), net.network().octets());
            trie.insert(&key, 1, 0)
                .map_err(|source| DatapathError::MapUpdate {
                    map: names::NAT_EXCLUDE_V4,
                    source,
                })?;
        }
        let mut array: Array<_, NatConfig> = map_mut(&mut self.ebpf, names::NAT_CONFIG)?;
        array
            .set(NAT_CONFIG_INDEX, settings.encode(), 0)
            .map_err(|source| DatapathError::MapUpdate {
                map: names::NAT_CONFIG,
                source,
            })?;
        if !settings.enabled {
            self.sweep_nat_with(|_, _, _| true)?;
        }
        Ok(())
    }

    /// Removes the idle flows (by the timeouts in `NAT_CONFIG`).
    pub fn sweep_nat(&mut self) -> Result<SweepReport, DatapathError> {
        let array: Array<_, NatConfig> = map_mut(&mut self.ebpf, names::NAT_CONFIG)?;
        let cfg = array
            .get(&NAT_CONFIG_INDEX, 0)
            .map_err(|source| DatapathError::Map {
                map: names::NAT_CONFIG,
                source,
            })?;
        let now = monotonic_ns();
        self.sweep_nat_with(|proto, e, assured| cfg.is_expired(proto, e, now, assured))
    }

    /// Removes the entries `dead(protocol, entry, assured)` says are dead.
    fn sweep_nat_with(
        &mut self,
        dead: impl Fn(u8, &NatEntryV4, bool) -> bool,
    ) -> Result<SweepReport, DatapathError> {
        let mut report = SweepReport::default();
        for name in names::NAT_FLOW_MAPS {
            let assured = name == names::SNAT_V4_CT || name == names::SNAT_V4_REV;
            let mut map: HashMap<_, NatKeyV4, NatEntryV4> = map_mut(&mut self.ebpf, name)?;
            let entries: Vec<(NatKeyV4, NatEntryV4)> = map.iter().filter_map(Result::ok).collect();
            let mut left = 0;
            for (key, entry) in entries {
                if dead(key.proto, &entry, assured) {
                    ignore_missing(map.remove(&key))
                        .map_err(|source| DatapathError::MapUpdate { map: name, source })?;
                    report.removed += 1;
                } else {
                    left += 1;
                }
            }
            if name == names::SNAT_V4_CT || name == names::SNAT_V4_CT_NEW {
                report.flows += left;
            }
        }
        Ok(report)
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// One masqueraded flow, as `overlay-agent nat` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatFlow {
    pub proto: u8,
    /// The originator: a local pod, or (`to_cluster`) an address outside the cluster network.
    pub pod: SocketAddrV4,
    /// The destination: outside the cluster, or (`to_cluster`) a remote pod.
    pub remote: SocketAddrV4,
    pub translated: SocketAddrV4,
    pub state: u8,
    pub via_kernel: bool,
    /// Masqueraded into the cluster (flannel's `! -s <cluster> -d <cluster>` rule).
    pub to_cluster: bool,
    /// In the assured tier (`SNAT_V4_CT`); otherwise not assured yet (`SNAT_V4_CT_NEW`).
    pub assured: bool,
    pub idle: Duration,
    /// TCP: the originator's last acknowledgment number, where a reply's FIN or RST must lie
    /// to close the flow (`NAT_CLOSE_WINDOW`); 0 before it acknowledged anything.
    pub ack: Option<u32>,
}

impl std::fmt::Display for NatFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = crate::monitor::proto_name(self.proto);
        let mut state = Vec::new();
        for (bit, name) in [
            (NAT_S_REPLIED, "replied"),
            (NAT_S_FIN, "fin"),
            (NAT_S_RST, "rst"),
        ] {
            if self.state & bit != 0 {
                state.push(name);
            }
        }
        if state.is_empty() {
            state.push("new");
        }
        write!(
            f,
            "{proto} {} {} via {} {}{}{}{} idle={}s{}",
            self.pod,
            self.remote,
            self.translated,
            state.join(","),
            if self.assured { "" } else { " unassured" },
            if self.via_kernel { " kernel" } else { "" },
            if self.to_cluster { " to-cluster" } else { "" },
            self.idle.as_secs(),
            self.ack.map(|a| format!(" ack={a}")).unwrap_or_default()
        )
    }
}

/// The masqueraded flows of the pinned data path and the tables' capacities, as `nat`,
/// `status` and `/metrics` show them.
#[derive(Clone, Debug)]
pub struct NatTable {
    /// Assured (`SNAT_V4_CT`) and not assured yet (`SNAT_V4_CT_NEW`), sorted.
    pub flows: Vec<NatFlow>,
    /// `SNAT_V4_CT`'s: the table whose filling evicts live connections.
    pub capacity: u32,
    /// `SNAT_V4_CT_NEW`'s.
    pub unassured_capacity: u32,
}

impl NatTable {
    /// Assured flows.
    #[must_use]
    pub fn assured(&self) -> usize {
        self.flows.iter().filter(|f| f.assured).count()
    }

    /// Flows not assured yet.
    #[must_use]
    pub fn unassured(&self) -> usize {
        self.flows.len() - self.assured()
    }
}

/// The flows of the pinned data path ([`NatTable`]), with the capacities the pinned maps were
/// created with (which an older agent's pins may not share with this build);
/// `SNAT_V4_CT_NEW` is absent under an agent older than that table: its capacity is then 0.
pub fn pinned_nat_flows(dir: &Path) -> Result<NatTable, DatapathError> {
    let pins = PinDir::existing(dir).ok_or_else(|| {
        DatapathError::InvalidConfig(format!("no pinned data path under {}", dir.display()))
    })?;
    let now = monotonic_ns();
    let port = |p: [u8; 2]| u16::from_be_bytes(p);
    let mut flows = Vec::new();
    let (mut capacity, mut unassured_capacity) = (0, 0);
    for name in [names::SNAT_V4_CT, names::SNAT_V4_CT_NEW] {
        let path = pins.map(name);
        if name == names::SNAT_V4_CT_NEW && !path.exists() {
            continue;
        }
        let data =
            MapData::from_pin(path).map_err(|source| DatapathError::Map { map: name, source })?;
        let info = data
            .info()
            .map_err(|source| DatapathError::Map { map: name, source })?;
        if name == names::SNAT_V4_CT {
            capacity = info.max_entries();
        } else {
            unassured_capacity = info.max_entries();
        }
        // An older agent's pins may hold smaller entries (fields are only added at the end).
        let entries = super::layout::flows_of_any_layout(&Map::LruHashMap(data), info.value_size())
            .ok_or_else(|| {
                DatapathError::InvalidConfig(format!(
                    "{name} holds entries of {} bytes, which no agent wrote",
                    info.value_size()
                ))
            })?;
        flows.extend(entries.into_iter().map(|(k, e)| NatFlow {
            proto: k.proto,
            pod: SocketAddrV4::new(k.saddr.into(), port(k.sport)),
            remote: SocketAddrV4::new(k.daddr.into(), port(k.dport)),
            translated: SocketAddrV4::new(e.addr.into(), port(e.port)),
            state: e.state,
            via_kernel: e.flags & NAT_E_KERNEL != 0,
            to_cluster: e.flags & NAT_E_TO_CLUSTER != 0,
            assured: name == names::SNAT_V4_CT,
            idle: Duration::from_nanos(now.saturating_sub(e.last_seen)),
            ack: (k.proto == IPPROTO_TCP).then_some(e.orig_ack),
        }));
    }
    flows.sort_by_key(|f| (f.proto, f.pod, f.remote));
    Ok(NatTable {
        flows,
        capacity,
        unassured_capacity,
    })
}

#[cfg(test)]
mod tests {
    use overlay_common::nat::{IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_UDP};

    use super::*;

    #[test]
    fn port_range_avoids_the_ephemeral_range() {
        assert_eq!(port_range_outside(32768, 60999), (1024, 32767));
        assert_eq!(port_range_outside(1024, 40000), (40001, 65535));
        assert_eq!(
            port_range_outside(1024, 65535),
            (1024, 65535),
            "nothing left: everything"
        );
        assert_eq!(
            port_range_outside(2000, 65000),
            (1024, 65535),
            "too small a side"
        );
    }

    #[test]
    fn settings_encode_flags_ports_and_timeouts() {
        let s = NatSettings {
            enabled: true,
            keep_port: true,
            ports: (1024, 32767),
            timeouts: NatTimeouts::all(Duration::from_secs(2)),
            exclude: vec![],
        };
        let c = s.encode();
        assert_eq!(c.flags, NAT_F_ENABLED | NAT_F_KEEP_PORT);
        assert_eq!((c.port_min, c.port_max), (1024, 32767));
        assert_eq!((c.tcp_established, c.udp, c.icmp), (2, 2, 2));
        assert_eq!(NatSettings::disabled().encode().flags, 0);
        assert_eq!(
            NatTimeouts::all(Duration::from_secs(2)).sweep_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            NatTimeouts::default().sweep_interval(),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn expiry_uses_the_state_timeout() {
        let cfg = NatSettings {
            timeouts: NatTimeouts::default(),
            ..NatSettings::disabled()
        }
        .encode();
        let e = NatEntryV4 {
            last_seen: 0,
            state: 0,
            ..NatEntryV4::default()
        };
        let s = 1_000_000_000;
        assert!(!cfg.is_expired(IPPROTO_UDP, &e, 30 * s, false));
        assert!(cfg.is_expired(IPPROTO_UDP, &e, 31 * s, false));
        let replied = NatEntryV4 {
            state: NAT_S_REPLIED,
            ..e
        };
        assert!(!cfg.is_expired(IPPROTO_UDP, &replied, 100 * s, true));
        assert!(
            cfg.is_expired(IPPROTO_UDP, &replied, 31 * s, false),
            "a query answered"
        );
        assert!(!cfg.is_expired(IPPROTO_TCP, &replied, 3600 * s, true));
        assert!(
            cfg.is_expired(IPPROTO_TCP, &replied, 121 * s, false),
            "half-open"
        );
        assert!(
            cfg.is_expired(IPPROTO_TCP, &e, 121 * s, false),
            "unanswered SYN"
        );
        // Every other protocol times out as UDP does (conntrack's GRE and generic trackers
        // are no shorter); ICMP echo on its own timeout.
        for proto in [47, IPPROTO_SCTP, IPPROTO_DCCP] {
            assert!(!cfg.is_expired(proto, &e, 30 * s, false), "proto {proto}");
            assert!(cfg.is_expired(proto, &e, 31 * s, false), "proto {proto}");
            assert!(
                !cfg.is_expired(proto, &replied, 100 * s, true),
                "proto {proto}"
            );
        }
        assert!(
            cfg.is_expired(IPPROTO_ICMP, &replied, 100 * s, true),
            "echo: its own 30 s"
        );
    }

    #[test]
    fn a_service_address_outside_the_exclusions_is_found() {
        let network: Ipv4Net = "172.17.0.0/16".parse().unwrap();
        let mut settings = NatSettings {
            enabled: true,
            ..NatSettings::disabled()
        };
        let service = Ipv4Addr::new(10, 96, 0, 1);
        let found = |s: &NatSettings, host: Option<&str>, local: &[Ipv4Addr]| {
            service_ip_masqueraded(s, network, host, local)
        };
        assert_eq!(found(&settings, Some("10.96.0.1"), &[]), Some(service));
        assert_eq!(found(&settings, None, &[]), None, "not under Kubernetes");
        assert_eq!(found(&settings, Some("fd00::1"), &[]), None, "IPv6");
        assert_eq!(
            found(&settings, Some("10.96.0.1"), &[service]),
            None,
            "IPVS"
        );
        settings.exclude = vec!["10.96.0.0/12".parse().unwrap()];
        assert_eq!(found(&settings, Some("10.96.0.1"), &[]), None, "excluded");
        settings.exclude = vec!["10.43.0.0/16".parse().unwrap()];
        assert_eq!(found(&settings, Some("10.96.0.1"), &[]), Some(service));
        assert_eq!(
            found(&NatSettings::disabled(), Some("10.96.0.1"), &[]),
            None,
            "no masquerade"
        );
    }
}
