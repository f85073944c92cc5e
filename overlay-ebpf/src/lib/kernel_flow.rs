//! Flows the kernel forwarded for a local pod (`KERNEL_FLOW_V4`, and `KERNEL_FLOW_IN_V4` for
//! connections into one; layout and purpose in `overlay_common::kernel_flow`): filed where such packets leave or enter, looked up where
//! packets of the flow would otherwise skip the kernel.
//!
//! A pod's packet reaches `host_egress` or `underlay_egress` with its pod source only when the
//! kernel routed it (`pod_egress` sends what it finishes itself, and masquerades what leaves
//! the cluster): after netfilter, e.g. kube-proxy's DNAT from a Service address to an endpoint.
//! The kernel's conntrack then holds the flow, and only the kernel can undo its NAT on the
//! replies, so those go to the host device (as after `flannel.1`), not into the pod. Filed:
//! - at `host_egress`, what goes to a peer (the endpoint is a remote pod, or a peer's host);
//! - at `underlay_egress`, what goes outside the cluster network unmasqueraded (an endpoint
//!   on a member node's own address answers through its host device, i.e. VXLAN or direct);
//! - at `pod_ingress` (the bridge's egress), what the kernel sends into a pod from elsewhere
//!   than this node's subnet (`KERNEL_FLOW_IN`): a port published on the node and DNATed into
//!   the pod, or an outside host routing to the pod. There the pod's replies are what must stay
//!   in the kernel: `pod_egress` leaves them to it instead of masquerading them (outside
//!   clients) or sending them to a peer (remote pods), and `underlay_egress` does not
//!   masquerade them either;
//! - at direct delivery and decapsulation, what comes from outside the cluster network
//!   straight into a pod (`KERNEL_FLOW_IN_DIRECT`): a member node's own address (a stock
//!   host-gw node's host), or an outside host whose packets a member forwarded over VXLAN
//!   unmasqueraded (a node without `--ip-masq`). No conntrack here saw it, so `pod_egress`
//!   sends the pod's replies on itself, untranslated.
//!
//! The key's `way` keeps the three apart: only `KERNEL_FLOW_OUT` entries send packets for the
//! pod to the host device, only the inbound ones exempt the pod's replies from the masquerade.
//! The inbound ones live in a table of their own (`KERNEL_FLOW_IN_V4`): whoever reaches a
//! published port can open connections by the thousand, and in one shared LRU they would
//! evict the Service flows.
//!
//! Entries are never refreshed or expired by time: conntrack keeps an established TCP flow 5
//! days. An entry that outlived its flow goes when the tuple is seen carrying a connection of
//! its own, which the kernel's conntrack does not hold (it would drop its packets as INVALID,
//! or translate them as the old flow's): a pod's packet that `pod_egress` sends on unrewritten
//! (`pod_packet_way`) ends an outbound filing, and a remote pod's packet delivered to the pod
//! itself (`is_kernel_flow`) ends an inbound one of the kernel. The LRU evicts the least used
//! when the map is full.
//!
//! Limits: a later fragment carries no ports, so only first fragments are filed and checked;
//! ICMP errors about such a flow and ICMP other than echo are not matched (they go straight
//! into the pod, as before); an echo request into a pod is not filed.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    kernel_flow::{
        KERNEL_FLOW_IN, KERNEL_FLOW_IN_DIRECT, KERNEL_FLOW_IN_V4_CAPACITY, KERNEL_FLOW_OUT,
        KERNEL_FLOW_PAIRS_LEN, KERNEL_FLOW_V4_CAPACITY, KernelFlowKeyV4, KernelFlowV4, pair_slot,
    },
    wire::{
        BRIDGE_DELIVERY_MARK, IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
        IPPROTO_UDPLITE,
    },
};

use crate::lib::{
    counters::count,
    endpoint::endpoint_v4,
    hdr::{IcmpHdr, Ipv4Hdr},
    maps::in_subnet,
    ptr::skb_mark,
};

#[map]
static KERNEL_FLOW_V4: LruHashMap<KernelFlowKeyV4, KernelFlowV4> =
    LruHashMap::with_max_entries(KERNEL_FLOW_V4_CAPACITY, 0);
named!(KERNEL_FLOW_V4, overlay_common::names::KERNEL_FLOW_V4);

// The inbound ways apart, so that a flood of connections into pods evicts only its own kind
// (`overlay_common::kernel_flow::KERNEL_FLOW_IN_V4_CAPACITY`).
#[map]
static KERNEL_FLOW_IN_V4: LruHashMap<KernelFlowKeyV4, KernelFlowV4> =
    LruHashMap::with_max_entries(KERNEL_FLOW_IN_V4_CAPACITY, 0);
named!(KERNEL_FLOW_IN_V4, overlay_common::names::KERNEL_FLOW_IN_V4);

/// The table of `way`'s flows.
#[inline(always)]
fn table(way: u8) -> &'static LruHashMap<KernelFlowKeyV4, KernelFlowV4> {
    if way == KERNEL_FLOW_OUT {
        &KERNEL_FLOW_V4
    } else {
        &KERNEL_FLOW_IN_V4
    }
}

// A filter in front of the flow table: one slot per hash of (pod, remote), set when a flow of
// the pair is filed, never cleared. The delivery path reads a slot (an array access, which
// the verifier inlines) and looks the flow up only for pairs that ever had one: the lookup
// cost a decapsulated packet about 130 ns of its 600-750 (prog stats, interleaved runs),
// and most pairs (pod to pod, not through a Service) never need it. A slot of another
// pair's only costs that lookup.
#[map]
static KERNEL_FLOW_PAIRS_V4: Array<u32> = Array::with_max_entries(KERNEL_FLOW_PAIRS_LEN, 0);
named!(
    KERNEL_FLOW_PAIRS_V4,
    overlay_common::names::KERNEL_FLOW_PAIRS_V4
);

/// Whether `addr` (network order) is a local pod's: in this node's subnet, not one of the
/// host's own addresses there (whose traffic takes the host device both ways anyway).
#[inline(always)]
fn is_local_pod(cfg: &Config, addr: [u8; 4]) -> bool {
    in_subnet(addr, cfg.subnet, cfg.subnet_mask) && !cfg.is_host_subnet_address(addr)
}

/// Source and destination port of the IPv4 packet whose header `ip` sits at `ip_off` (0 for a
/// protocol without ports; an ICMP echo's identifier stands for the pod's port, on the side
/// `from_pod` says). `None` for what cannot be matched: a later fragment, ICMP other than an
/// echo request from the pod or an echo reply to it, a header cut short.
#[inline(always)]
fn ports(
    ctx: &TcContext,
    ip_off: usize,
    ip: &Ipv4Hdr,
    from_pod: bool,
) -> Option<([u8; 2], [u8; 2])> {
    if u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::OFFSET_MASK != 0 {
        return None;
    }
    let l4 = ip_off + usize::from(ip.ver_ihl & 0x0f) * 4;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_DCCP | IPPROTO_UDPLITE => {
            let h: [u8; 4] = ctx.load(l4).ok()?;
            Some(([h[0], h[1]], [h[2], h[3]]))
        }
        IPPROTO_ICMP => {
            let h: IcmpHdr = ctx.load(l4).ok()?;
            match (from_pod, h.kind) {
                (true, IcmpHdr::ECHO) => Some((h.id, [0, 0])),
                (false, IcmpHdr::ECHO_REPLY) => Some(([0, 0], h.id)),
                _ => None,
            }
        }
        _ => Some(([0, 0], [0, 0])),
    }
}

/// Files the flow of a local pod's packet (header `ip` at `ip_off`) that the kernel routed
/// out, once: the caller has checked where it goes. A reply in a connection delivered into the
/// pod is none (it left the pod untranslated, by the kernel or by `pod_egress`): filed, it
/// would send the connection's next packets for the pod to the host device.
#[inline(always)]
pub fn file(ctx: &TcContext, cfg: &Config, ip_off: usize, ip: &Ipv4Hdr) {
    if !is_local_pod(cfg, ip.saddr) || inbound_way(ctx, ip_off, ip) != NOT_INBOUND {
        return;
    }
    let Some((sport, dport)) = ports(ctx, ip_off, ip, true) else {
        return;
    };
    file_key(
        ctx,
        &KernelFlowKeyV4::new(ip.saddr, ip.daddr, sport, dport, ip.proto, KERNEL_FLOW_OUT),
    );
}

/// Files the flow of a packet the kernel sends into a local pod (header `ip` at `ip_off`) from
/// elsewhere than this node's subnet: a connection that the node's netfilter DNATed from its
/// own address (`docker run -p`, a hostPort, a NodePort) or that an outside host routed to the
/// pod. The pod's replies belong to that connection in the kernel's conntrack, which alone can
/// undo the DNAT; flannel's MASQUERADE leaves them alone too, as it touches only new
/// connections. The node's own addresses are left out (a reply to them is the host's anyway),
/// and so are our own deliveries through the bridge, to a pod without an endpoint: they carry
/// `BRIDGE_DELIVERY_MARK`, cleared here. The endpoint map cannot tell them apart, as the
/// endpoint may have been written since: filed, such a packet made the kernel the owner of a
/// pod-to-pod connection, whose packets `FORWARD DROP` then dropped. A remote pod's packet to
/// a pod without an endpoint is not filed either (one of ours, from programs loaded before).
#[inline(always)]
pub fn file_delivered(ctx: &TcContext, cfg: &Config, ip_off: usize, ip: &Ipv4Hdr) {
    if skb_mark(ctx) == BRIDGE_DELIVERY_MARK {
        ctx.set_mark(0);
        return;
    }
    if !is_local_pod(cfg, ip.daddr)
        || in_subnet(ip.saddr, cfg.subnet, cfg.subnet_mask)
        || cfg.is_own_address(ip.saddr)
    {
        return;
    }
    if in_subnet(ip.saddr, cfg.network, cfg.network_mask) && endpoint_v4(ip.daddr).is_none() {
        return;
    }
    file_inbound(ctx, ip_off, ip, KERNEL_FLOW_IN);
}

/// Files the flow of a packet from outside the cluster network that we send into a local pod
/// ourselves (header `ip` at `ip_off`), bypassing the kernel: direct delivery of a member
/// node's own address (a stock host-gw node's host), or decapsulation of an outside host's
/// packet that a member forwarded unmasqueraded. With `--ip-masq` the pod's replies would
/// otherwise be masqueraded as a new flow.
#[inline(always)]
pub fn file_delivered_directly(ctx: &TcContext, cfg: &Config, ip_off: usize, ip: &Ipv4Hdr) {
    if !in_subnet(ip.saddr, cfg.network, cfg.network_mask) {
        file_inbound(ctx, ip_off, ip, KERNEL_FLOW_IN_DIRECT);
    }
}

/// Files the connection of a packet into a local pod (header `ip` at `ip_off`) as `way`.
#[inline(always)]
fn file_inbound(ctx: &TcContext, ip_off: usize, ip: &Ipv4Hdr, way: u8) {
    let Some((sport, dport)) = ports(ctx, ip_off, ip, false) else {
        return;
    };
    file_key(
        ctx,
        &KernelFlowKeyV4::new(ip.daddr, ip.saddr, dport, sport, ip.proto, way),
    );
}

/// Files `key` in its way's table unless it is there already.
#[inline(always)]
fn file_key(ctx: &TcContext, key: &KernelFlowKeyV4) {
    let flows = table(key.way);
    if flows.get_ptr(key).is_some() {
        return;
    }
    // The slot first: a reply may follow at once on another CPU.
    if let Some(slot) = KERNEL_FLOW_PAIRS_V4.get_ptr_mut(pair_slot(key.pod, key.remote)) {
        // SAFETY: an element of the array, written whole (any CPU writes the same value).
        unsafe { *slot = 1 };
    }
    // SAFETY: a helper without arguments.
    let created_ns = unsafe { bpf_ktime_get_coarse_ns() };
    if flows
        .insert(key, &KernelFlowV4 { created_ns }, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count(Reason::KernelFlowNew, ctx.len());
    }
}

/// Whether the packet for a local pod (header `ip` at `ip_off`), addressed to the pod itself
/// and about to be delivered by us, belongs to a flow the kernel forwarded out of it, so that
/// it must go back through the kernel. If not, and it comes from the cluster network, a
/// connection filed under its tuple as one the kernel delivered into the pod is over: that
/// one's packets were addressed to the node, whose DNAT sent them in, and this packet is a new
/// connection of a remote pod that reused the port. Forgotten, so that the pod's replies are
/// its own again instead of being left to the kernel, whose conntrack has no such connection.
#[inline(always)]
pub fn is_kernel_flow(ctx: &TcContext, cfg: &Config, ip_off: usize, ip: &Ipv4Hdr) -> bool {
    if !pair_filed(ip.daddr, ip.saddr) {
        return false;
    }
    let Some((sport, dport)) = ports(ctx, ip_off, ip, false) else {
        return false;
    };
    let mut key = KernelFlowKeyV4::new(ip.daddr, ip.saddr, dport, sport, ip.proto, KERNEL_FLOW_OUT);
    if KERNEL_FLOW_V4.get_ptr(&key).is_some() {
        return true;
    }
    if in_subnet(ip.saddr, cfg.network, cfg.network_mask) {
        key.way = KERNEL_FLOW_IN;
        let _ = KERNEL_FLOW_IN_V4.remove(&key);
    }
    false
}

/// How a local pod's packet (header `ip` at `ip_off`) answers a connection delivered into the
/// pod: [`KERNEL_FLOW_IN_DIRECT`] (by direct delivery: sent on untranslated), [`KERNEL_FLOW_IN`]
/// (by the kernel: the packet is the kernel's too), or [`NOT_INBOUND`].
#[inline(always)]
pub fn inbound_way(ctx: &TcContext, ip_off: usize, ip: &Ipv4Hdr) -> u8 {
    match filed_ports_from_pod(ctx, ip_off, ip) {
        Some((sport, dport)) => inbound_way_of(ip, sport, dport),
        None => NOT_INBOUND,
    }
}

/// [`inbound_way`] of a local pod's packet to a peer that `pod_egress` sends on itself unless
/// it answers a connection delivered into the pod. If it does not, a flow the kernel forwarded
/// out under its tuple is over: a Service connection's packets reach `pod_egress` rewritten
/// by netfilter (`to_stack_dnat`), never as the pod sent them, so this is a new connection of
/// the pod that reused the port. Forgotten, so that the peer's replies go into the pod instead
/// of to the kernel, whose conntrack has no such connection (and drops, or un-DNATs, them).
#[inline(always)]
pub fn pod_packet_way(ctx: &TcContext, ip_off: usize, ip: &Ipv4Hdr) -> u8 {
    let Some((sport, dport)) = filed_ports_from_pod(ctx, ip_off, ip) else {
        return NOT_INBOUND;
    };
    let way = inbound_way_of(ip, sport, dport);
    if way == NOT_INBOUND {
        let key = KernelFlowKeyV4::new(ip.saddr, ip.daddr, sport, dport, ip.proto, KERNEL_FLOW_OUT);
        let _ = KERNEL_FLOW_V4.remove(&key);
    }
    way
}

/// The ports of a local pod's packet (header `ip` at `ip_off`) whose pair may have filed
/// flows; `None` for the others and for what carries no ports to match.
#[inline(always)]
fn filed_ports_from_pod(
    ctx: &TcContext,
    ip_off: usize,
    ip: &Ipv4Hdr,
) -> Option<([u8; 2], [u8; 2])> {
    if !pair_filed(ip.saddr, ip.daddr) {
        return None;
    }
    ports(ctx, ip_off, ip, true)
}

/// The inbound way of the pod's packet (header `ip`, ports `sport`, `dport` as on the wire).
#[inline(always)]
fn inbound_way_of(ip: &Ipv4Hdr, sport: [u8; 2], dport: [u8; 2]) -> u8 {
    // Direct delivery first: its connection may also have crossed the bridge (a pod without an
    // endpoint yet), where `pod_ingress` files it as the kernel's.
    for way in [KERNEL_FLOW_IN_DIRECT, KERNEL_FLOW_IN] {
        let key = KernelFlowKeyV4::new(ip.saddr, ip.daddr, sport, dport, ip.proto, way);
        if KERNEL_FLOW_IN_V4.get_ptr(&key).is_some() {
            return way;
        }
    }
    NOT_INBOUND
}

/// [`inbound_way`] of a packet of no inbound connection.
pub const NOT_INBOUND: u8 = u8::MAX;

/// Whether a flow between `pod` and `remote` may have been filed (the filter's slot is set).
#[inline(always)]
fn pair_filed(pod: [u8; 4], remote: [u8; 4]) -> bool {
    KERNEL_FLOW_PAIRS_V4
        .get(pair_slot(pod, remote))
        .is_some_and(|set| *set != 0)
}
