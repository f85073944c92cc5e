//! Masquerade (`--ip-masq`): source NAT of pod traffic leaving the cluster, and of traffic from
//! outside the cluster network to remote pods (flannel's last rule), in eBPF.
//!
//! Maps (all pinned under `--bpf-dir`, so translated connections survive an agent restart):
//! - `NAT_CONFIG`: a one-entry array ([`NatConfig`]): on/off, the port range, idle timeouts.
//!   Without [`NAT_F_ENABLED`] the programs translate nothing.
//! - `NAT_EXCLUDE_V4`: an LPM trie of extra destinations never to masquerade
//!   (`--ip-masq-exclude`, like ip-masq-agent's nonMasqueradeCIDRs); key data = network address.
//! - `SNAT_V4_CT`: LRU hash, key = the flow as its originator sends it ([`NatKeyV4`]: pod
//!   address and port → remote address and port; or, with [`NAT_E_TO_CLUSTER`], outside
//!   address and port → remote pod), value = the translated source ([`NatEntryV4`]).
//! - `SNAT_V4_REV`: LRU hash, key = the reply as it arrives (remote address and port → the
//!   translated address and port), value = the originator's address and port.
//! - `SNAT_V4_CT_NEW`, `SNAT_V4_REV_NEW`: the same two tables for flows not assured yet. A
//!   flow starts there and moves to `SNAT_V4_CT` / `SNAT_V4_REV` once assured, as conntrack
//!   says: its originator sends again after a reply that was neither a reset nor a FIN. So a
//!   flood of new flows (a scan, one-shot DNS queries, hosts answering a scan) can only evict
//!   other new flows, never an idle connection: the protection conntrack gives assured flows
//!   with its early drop. A reply tuple is claimed in one table of the two (claims check the
//!   other one after inserting); a promotion holds it in both for a moment.
//! - `SNAT_V4_FRAG` (not pinned: in-flight state only): LRU hash of fragmented replies whose
//!   first fragment was translated back, key = the reply's reassembly identity (remote address
//!   → translated address, protocol, the IP identifier in `sport`, `dport` zero), value = the
//!   originator's side as in `SNAT_V4_REV`, so the later fragments (which carry no ports) get
//!   the same destination.
//!
//! The two kinds of flows never share a key: one has a cluster source and an outside
//! destination, the other the reverse. Translated addresses: the external interface's address
//! for pod flows and for flows to direct (host-gw, DirectRouting) peers, the host device's
//! `<subnet>.0` for flows to VXLAN peers.
//!
//! Both entries of a flow carry the same state and last-seen time, so either can be expired
//! alone: the data path refreshes both together, when a packet of either direction changes the
//! state or finds its own entry's time older than [`NAT_REFRESH_NS`]. Other packets touch only
//! the entry they look up, and only to read it (a second hash lookup per packet, and a write
//! to a cache line that other CPUs read, for nothing); expiry allows for that lag. ICMP echo
//! uses the identifier as the local "port" and 0 as the remote one.
//!
//! Byte orders: addresses and ports as on the wire (`[u8; N]`), everything else host order.
//! Times are `bpf_ktime_get_coarse_ns()` values (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC at the
//! last tick, read without the clock source; a flow's times need no more than the tick),
//! timeouts seconds.

use bytemuck::{Pod, Zeroable};

use crate::route::NextHopV4;

/// Index of the single `NAT_CONFIG` entry, and the array's capacity.
pub const NAT_CONFIG_INDEX: u32 = 0;
pub const NAT_CONFIG_LEN: u32 = 1;

/// Capacity of each of `SNAT_V4_CT` and `SNAT_V4_REV` (assured flows; LRU, so the least
/// recently used flow is evicted when full).
pub const SNAT_V4_CAPACITY: u32 = 65_536;
/// Capacity of each of `SNAT_V4_CT_NEW` and `SNAT_V4_REV_NEW` (flows not assured yet, most of
/// them for a round trip; LRU).
pub const SNAT_V4_NEW_CAPACITY: u32 = 32_768;
/// Capacity of `SNAT_V4_FRAG` (fragmented replies in flight; LRU).
pub const SNAT_V4_FRAG_CAPACITY: u32 = 4096;
/// How long a fragmented reply's later fragments are translated after its first one, in
/// seconds (the kernel's `ipfrag_time`).
pub const NAT_FRAG_TIMEOUT: u32 = 30;
/// Capacity of `NAT_EXCLUDE_V4`.
pub const NAT_EXCLUDE_V4_CAPACITY: u32 = 1024;
/// How old a flow entry's last-seen time may get before a packet refreshes both of the flow's
/// entries (100 ms, in nanoseconds). Expiry adds it to every timeout, so a flow still lives at
/// least its full timeout after its last packet.
pub const NAT_REFRESH_NS: u64 = 100_000_000;
/// How many ports the data path tries for a new flow before giving up (counted as
/// `drop_nat_exhausted`).
pub const NAT_PORT_TRIES: u32 = 32;

/// How far past the originator's last acknowledgment (`NatEntryV4::orig_ack`) a reply's FIN or
/// RST of an assured TCP flow may lie and still close it (1 MiB). conntrack closes a flow only
/// on a reset inside the receiver's window; without one, anybody who can spoof the remote's
/// address resets every idle masqueraded connection to it by spraying RSTs over the translated
/// ports (one packet each). Now that takes about 4,000 guesses per port. A legitimate reset
/// lies at or just past the originator's acknowledgment (its delayed ACKs lag by a few
/// segments); one further out is delivered but changes no state, and the originator's kernel
/// answers it with a challenge ACK (RFC 5961) that draws a reset at the exact number.
pub const NAT_CLOSE_WINDOW: u32 = 1 << 20;

/// Whether a reply segment with sequence number `seq` may close a flow whose originator last
/// acknowledged `orig_ack` (both host order): `seq` in `[orig_ack, orig_ack + NAT_CLOSE_WINDOW)`,
/// modulo 2^32. An `orig_ack` of 0 is unknown (a flow carried over from an older agent's
/// tables, whose originator has sent nothing since): any may, as before the window.
#[must_use]
pub const fn in_close_window(seq: u32, orig_ack: u32) -> bool {
    orig_ack == 0 || seq.wrapping_sub(orig_ack) < NAT_CLOSE_WINDOW
}

/// Masquerade is on (`--ip-masq`).
pub const NAT_F_ENABLED: u32 = 1 << 0;
/// Keep the pod's source port when it is free (`--ip-masq-fully-random-disable`); otherwise
/// ports are random in the range (iptables' `--random-fully`).
pub const NAT_F_KEEP_PORT: u32 = 1 << 1;

/// kube-proxy's "masquerade this" mark: flannel never NATs such packets (kube-proxy does).
pub const KUBE_MASQ_MARK: u32 = 0x4000;

/// Value of `NAT_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatConfig {
    /// `NAT_F_*` bits.
    pub flags: u32,
    /// Translated ports (and ICMP identifiers) are chosen in `[port_min, port_max]`.
    pub port_min: u16,
    pub port_max: u16,
    /// Idle timeouts in seconds: TCP assured (in `SNAT_V4_CT`) and before any FIN/RST; TCP
    /// otherwise (opening, half-open, closing); UDP (and every protocol but TCP and ICMP) not
    /// assured and assured; ICMP echo.
    pub tcp_established: u32,
    pub tcp_transient: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    /// TCP after a reset (conntrack's CLOSE); 0: `tcp_transient`.
    pub tcp_close: u32,
}
const _: () = assert!(size_of::<NatConfig>() == 32);

impl NatConfig {
    #[must_use]
    pub const fn enabled(&self) -> bool {
        self.flags & NAT_F_ENABLED != 0
    }

    /// The idle timeout in seconds for a flow of `proto` in `state` (`NAT_S_*`), `assured`
    /// or not (which table holds it), as conntrack times its flows: the long timeouts only
    /// for assured flows, so a half-open TCP flow (SYN answered, never acknowledged) or a
    /// one-shot UDP query does not hold its entry for days or minutes.
    #[must_use]
    pub const fn timeout(&self, proto: u8, state: u8, assured: bool) -> u32 {
        match proto {
            IPPROTO_TCP => {
                if state & NAT_S_RST != 0 && self.tcp_close != 0 {
                    // A reset flow is over: conntrack keeps it 10 s, not the 120 s of FIN's
                    // TIME_WAIT, so short connections closed by RST do not fill the tables.
                    self.tcp_close
                } else if assured
                    && state & (NAT_S_FIN | NAT_S_RST) == 0
                    && state & NAT_S_REPLIED != 0
                {
                    self.tcp_established
                } else {
                    self.tcp_transient
                }
            }
            IPPROTO_ICMP => self.icmp,
            // UDP, and every other protocol (conntrack's GRE tracker, closest of its own to a
            // generic flow, also waits 30 s for a reply and longer for a stream).
            _ => {
                if assured {
                    self.udp_stream
                } else {
                    self.udp
                }
            }
        }
    }

    /// Whether the flow entry `e` of `proto`, `assured` or not, has been idle longer than its
    /// timeout (and the refresh lag, [`NAT_REFRESH_NS`]) at `now`: the one rule by which the
    /// data path treats an entry as dead and the agent's sweeper frees it.
    #[must_use]
    pub const fn is_expired(&self, proto: u8, e: &NatEntryV4, now: u64, assured: bool) -> bool {
        let timeout_ns = self.timeout(proto, e.state, assured) as u64 * NS_PER_S;
        now.saturating_sub(e.last_seen) > timeout_ns + NAT_REFRESH_NS
    }
}

/// Nanoseconds per second, for timeouts in seconds against the data path's clock.
pub const NS_PER_S: u64 = 1_000_000_000;

/// Whether something last seen at `last_seen` has been idle more than `timeout_s` seconds at
/// `now` (both the data path's clock). A clock that seems to go back counts as no idle time.
#[must_use]
pub const fn idle_longer_than(last_seen: u64, now: u64, timeout_s: u32) -> bool {
    now.saturating_sub(last_seen) > timeout_s as u64 * NS_PER_S
}

/// Protocols the NAT tells apart (their numbers live in [`crate::wire`]).
pub use crate::wire::{
    IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
};

/// How the masquerade treats the ports of a protocol's flows (`NatKeyV4::sport`/`dport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatPorts {
    /// Ports (ICMP echo: the identifier) are part of the tuple and the translated port is
    /// chosen: TCP, UDP, ICMP.
    Chosen,
    /// Ports are part of the tuple and never rewritten: DCCP and UDP-Lite (their checksums
    /// cover a pseudo-header, patched for the address as UDP's is) and SCTP (its CRC32c
    /// covers the ports, not the addresses). Two pods' flows from one source port to one
    /// remote port share a reply tuple, so the second is refused while the first lives
    /// (`drop_nat_exhausted`), as conntrack drops its clash.
    Kept,
    /// No ports: the tuple is addresses and protocol (GRE, ESP, IP-in-IP, ...), translated on
    /// the address alone, as conntrack's generic tracker and MASQUERADE do; two pods' flows
    /// of one such protocol to one remote host clash the same way.
    None,
}

impl NatPorts {
    #[must_use]
    #[inline(always)]
    pub const fn of(proto: u8) -> Self {
        match proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP => Self::Chosen,
            IPPROTO_DCCP | IPPROTO_UDPLITE | IPPROTO_SCTP => Self::Kept,
            _ => Self::None,
        }
    }
}

/// A flow's 5-tuple in the direction of the packet it is looked up for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NatKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Ports, or (ICMP echo) the identifier on the local side and 0 on the remote side.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<NatKeyV4>() == 16);

/// The reply has been seen (the remote side sent something back).
pub const NAT_S_REPLIED: u8 = 1 << 0;
/// A TCP FIN was seen (either side).
pub const NAT_S_FIN: u8 = 1 << 1;
/// A TCP RST was seen (either side).
pub const NAT_S_RST: u8 = 1 << 2;

/// The flow was translated at the external interface's egress after the kernel routed it:
/// replies are translated back and handed to the kernel (which may hold its own state for the
/// flow, e.g. a Service DNAT), instead of being sent to the pod bridge directly.
pub const NAT_E_KERNEL: u8 = 1 << 0;
/// The flow goes from outside the cluster network (a host socket bound to a non-cluster
/// address, or a host the node routes for) to a remote pod, masqueraded on its way out through
/// the host device (flannel's `! -s <cluster> -d <cluster> -j MASQUERADE`). Its key's source is
/// the outside address; replies are translated back and routed to it (the host stack, or out
/// again), never to the pod bridge.
pub const NAT_E_TO_CLUSTER: u8 = 1 << 1;

/// Value of `SNAT_V4_CT` (the translated source) and `SNAT_V4_REV` (the originator's address:
/// the pod's, or the outside source's for [`NAT_E_TO_CLUSTER`] flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntryV4 {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// `NAT_S_*` bits.
    pub state: u8,
    /// `NAT_E_*` bits.
    pub flags: u8,
    /// When a packet of the flow was last seen, give or take [`NAT_REFRESH_NS`]
    /// (`bpf_ktime_get_coarse_ns`).
    pub last_seen: u64,
    /// `SNAT_V4_CT` entries of flows whose packets the pod bridge's hook forwards itself: the
    /// next hop the FIB gave the flow's packets out of the external interface, under a
    /// routing generation (`Config::route_gen`), so the flow's later packets skip the lookup
    /// while routing stays as it was. Generation 0 (every other entry): nothing cached.
    /// Written by the programs as one 8-byte word at an 8-byte offset, so a reader never sees
    /// one generation's number with another's next hop.
    pub route: NextHopV4,
    /// `SNAT_V4_CT` entries of TCP flows: the acknowledgment number of the originator's last
    /// packet that carried one (host order), the point from which a reply's FIN or RST must
    /// lie to close the flow ([`in_close_window`]). 0 in every other entry, and unknown.
    ///
    /// Fields are only ever added at the end, where 0 means "nothing known": an agent carries
    /// the flows of an older agent's smaller entries over by filling the rest with zeros.
    pub orig_ack: u32,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<NatEntryV4>() == 32);
const _: () = assert!(core::mem::offset_of!(NatEntryV4, route) % 8 == 0);

impl NatKeyV4 {
    /// The key of a packet from `saddr:sport` to `daddr:dport` of `proto`.
    #[must_use]
    pub const fn new(
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
        proto: u8,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }

    /// The same tuple seen from the other side (sources and destinations swapped).
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }

    /// The `SNAT_V4_REV` key of a flow whose pod-side key is `self`, translated to
    /// `nat_addr:nat_port`: the reply's tuple.
    #[must_use]
    pub const fn reply(&self, nat_addr: [u8; 4], nat_port: [u8; 2]) -> Self {
        Self {
            saddr: self.daddr,
            daddr: nat_addr,
            sport: self.dport,
            dport: nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The `SNAT_V4_CT` key of a flow whose reply key is `self` and pod side is `orig`.
    #[must_use]
    pub const fn original(&self, orig_addr: [u8; 4], orig_port: [u8; 2]) -> Self {
        Self {
            saddr: orig_addr,
            daddr: self.saddr,
            sport: orig_port,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::NatConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntryV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_and_original_are_inverse() {
        let k = NatKeyV4 {
            saddr: [172, 17, 1, 2],
            daddr: [198, 19, 0, 1],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let r = k.reply([198, 18, 0, 1], 1234u16.to_be_bytes());
        assert_eq!(r.saddr, [198, 19, 0, 1]);
        assert_eq!(r.daddr, [198, 18, 0, 1]);
        assert_eq!(r.sport, 80u16.to_be_bytes());
        assert_eq!(r.dport, 1234u16.to_be_bytes());
        assert_eq!(r.original(k.saddr, k.sport), k);
    }

    #[test]
    fn the_close_window_starts_at_the_originators_acknowledgment_and_wraps() {
        assert!(in_close_window(1000, 1000), "exactly at the acknowledgment");
        assert!(in_close_window(1000 + NAT_CLOSE_WINDOW - 1, 1000));
        assert!(!in_close_window(1000 + NAT_CLOSE_WINDOW, 1000));
        assert!(!in_close_window(999, 1000), "already acknowledged");
        assert!(in_close_window(5, u32::MAX - 5), "across the wrap");
        assert!(!in_close_window(u32::MAX - 5, 5));
        assert!(
            in_close_window(12345, 0),
            "nothing known: as before the window"
        );
    }

    #[test]
    fn ports_are_chosen_kept_or_absent_by_protocol() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP] {
            assert_eq!(NatPorts::of(proto), NatPorts::Chosen, "{proto}");
        }
        for proto in [IPPROTO_DCCP, IPPROTO_UDPLITE, IPPROTO_SCTP] {
            assert_eq!(NatPorts::of(proto), NatPorts::Kept, "{proto}");
        }
        // GRE, ESP, IP-in-IP, an experimental number.
        for proto in [47, 50, 4, 253] {
            assert_eq!(NatPorts::of(proto), NatPorts::None, "{proto}");
        }
        assert_eq!(crate::wire::ip_proto_name(47), Some("gre"));
        assert_eq!(crate::wire::ip_proto_name(253), None);
    }

    #[test]
    fn timeouts_follow_the_state() {
        let c = NatConfig {
            tcp_established: 1000,
            tcp_transient: 10,
            udp: 30,
            udp_stream: 120,
            icmp: 5,
            tcp_close: 3,
            ..NatConfig::default()
        };
        assert_eq!(c.timeout(IPPROTO_TCP, 0, false), 10, "SYN sent");
        assert_eq!(
            c.timeout(IPPROTO_TCP, NAT_S_REPLIED, false),
            10,
            "half-open"
        );
        assert_eq!(c.timeout(IPPROTO_TCP, NAT_S_REPLIED, true), 1000);
        assert_eq!(c.timeout(IPPROTO_TCP, NAT_S_REPLIED | NAT_S_FIN, true), 10);
        assert_eq!(c.timeout(IPPROTO_TCP, NAT_S_REPLIED | NAT_S_RST, true), 3);
        assert_eq!(
            c.timeout(IPPROTO_TCP, NAT_S_RST, false),
            3,
            "a SYN answered by RST"
        );
        assert_eq!(
            c.timeout(IPPROTO_TCP, NAT_S_REPLIED | NAT_S_FIN | NAT_S_RST, true),
            3,
            "a reset after a FIN"
        );
        let unset = NatConfig { tcp_close: 0, ..c };
        assert_eq!(
            unset.timeout(IPPROTO_TCP, NAT_S_REPLIED | NAT_S_RST, true),
            10,
            "no reset timeout: the transient one"
        );
        assert_eq!(c.timeout(IPPROTO_TCP, 0, true), 10, "a SYN started it over");
        assert_eq!(c.timeout(IPPROTO_UDP, 0, false), 30);
        assert_eq!(
            c.timeout(IPPROTO_UDP, NAT_S_REPLIED, false),
            30,
            "a query answered"
        );
        assert_eq!(c.timeout(IPPROTO_UDP, NAT_S_REPLIED, true), 120);
        assert_eq!(c.timeout(IPPROTO_ICMP, 0, false), 5);
        assert_eq!(c.timeout(IPPROTO_ICMP, NAT_S_REPLIED, true), 5);
    }

    #[test]
    fn expiry_allows_for_the_refresh_lag() {
        let c = NatConfig {
            udp: 30,
            ..NatConfig::default()
        };
        // Last refreshed at 5 s: the flow may have had packets until just under 5.1 s.
        let e = NatEntryV4 {
            last_seen: 5 * NS_PER_S,
            ..NatEntryV4::default()
        };
        let deadline = 35 * NS_PER_S + NAT_REFRESH_NS;
        assert!(!c.is_expired(IPPROTO_UDP, &e, deadline, false));
        assert!(c.is_expired(IPPROTO_UDP, &e, deadline + 1, false));
        assert!(
            !c.is_expired(IPPROTO_UDP, &e, 0, false),
            "a clock behind last_seen is no idle time"
        );
    }
}
