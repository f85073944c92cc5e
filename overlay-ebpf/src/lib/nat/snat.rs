//! Outbound translation at the three hooks that masquerade (see the parent module):
//! `pod_egress` ([`snat_from_pod`], forwarded out of the external interface), the external
//! interface's egress ([`snat_egress`], what the kernel routed) and the host device's egress
//! ([`snat_to_cluster`], flannel's last rule). Calls `policy`, `flow`, `rewrite`, `icmp` and
//! `lib::fib`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    kernel_flow::{KERNEL_FLOW_IN, KERNEL_FLOW_IN_DIRECT},
    nat::{
        IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NAT_E_KERNEL, NAT_E_TO_CLUSTER, NatConfig,
        NatKeyV4, NatPorts,
    },
    route::NextHopV4,
};

use super::{
    IP_OFF, L4Ports, Translated,
    flow::{self, Segment, flow_out, flow_route, frag_offset, replies_to_cluster_flow},
    icmp::icmp_error_out,
    is_icmp_error, load_l4,
    policy::{masquerades, masquerades_to_cluster, nat_ipv4},
    rewrite::{NO_L4_CSUM, Writes, rewrite_source_out, write_port},
};
use crate::lib::{
    counters::{Role, count, count_handback},
    fib,
    hdr::{IcmpHdr, Ipv4Hdr},
    ipv4::{ECN_MASK, decrement_ttl, eth_ipv4},
    kernel_flow,
    maps::{config, is_member, route_gen},
    ptr::skb_mark,
};

/// The pod bridge's tcx ingress: masquerades `ip` when it leaves through the external
/// interface. `Ok(TC_ACT_OK)` when the packet is not for us.
#[inline(always)]
pub fn snat_from_pod(ctx: &TcContext, cfg: &Config, role: Role) -> Result<i32, Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !masquerades(cfg, ip.saddr, ip.daddr, skb_mark(ctx)) {
        return Ok(TC_ACT_OK);
    }
    // Only what the kernel would send out of the external interface: that is the address we
    // translate to and the interface whose ingress sees the replies.
    let Some(route) = route_out(ctx, cfg, &ip, ihl, role) else {
        return Ok(TC_ACT_OK);
    };
    if ip.ttl <= 1 {
        count_handback(role, Reason::StackTtl, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if route.untranslated {
        // Forwarded as the kernel's forwarding would (whose FORWARD chain never saw the
        // connection): TTL decremented, the lookup's next hop.
        let Some((_, ptr)) = eth_ipv4(ctx) else {
            return Ok(TC_ACT_OK);
        };
        // SAFETY: a checked pointer, fresh after the lookup's helper; ttl > 1.
        unsafe { decrement_ttl(ptr) };
        count(Reason::NatInboundReply, ctx.len());
        return Ok(fib::redirect_neigh_to(cfg.underlay_ifindex, route.next_hop));
    }
    let translated = translate_out(ctx, nat, cfg, &ip, ihl, cfg.local_ip, 0, Some(route.cache))?;
    if translated == Translated::No {
        return Ok(TC_ACT_OK);
    }
    count(Reason::NatSnat, ctx.len());
    // The next hop the lookup chose, as the kernel's forwarding would use it; the kernel
    // routes only where there is none to give.
    Ok(fib::redirect_neigh_to(cfg.underlay_ifindex, route.next_hop))
}

/// A pod's packet's way out of the external interface: the next hop, and what to cache of it
/// in the packet's flow.
struct RouteOut {
    next_hop: Option<[u8; 4]>,
    /// For `NatEntryV4::route` (generation 0: not cacheable).
    cache: NextHopV4,
    /// A reply in a connection direct delivery sent into the pod: forwarded, not translated.
    untranslated: bool,
}

/// The route of a pod's packet `ip` as the kernel would forward it, if it leaves through the
/// external interface (`None`: it goes elsewhere, or nowhere, and is the kernel's).
///
/// At a pod's port (`role` the accelerator) only a packet of a known flow is taken: a flow's
/// first packet goes on to the bridge, where netfilter may still DNAT it (kube-proxy's
/// Services, under `br_netfilter`); `pod_egress` then leaves a rewritten packet to the kernel
/// and masquerades an unchanged one, creating the flow whose later packets the port finishes.
///
/// A packet without a flow of ours that belongs to a connection the kernel delivered into the
/// pod (`lib::kernel_flow::file_delivered`) is the kernel's too (`to_stack_kernel_flow`).
///
/// A flow's packets reuse the next hop its CT entry cached under the current routing
/// generation: the lookup cost about a fifth of a masqueraded packet's time in this program
/// (`bpf_skb_fib_lookup` in a profile of the masquerade's connection-rate load). That is exact
/// because the lookup's inputs are fixed for a flow (interface, addresses, protocol; ports are
/// in the key) except the TOS, so only packets without DSCP bits (ECN bits do not route)
/// use or fill the cache; the mark is not an input (the lookup runs the rules with mark 0).
/// The generation is read once, before the lookup (`maps::route_gen`).
#[inline(always)]
fn route_out(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    ihl: usize,
    role: Role,
) -> Option<RouteOut> {
    let route_gen = route_gen(cfg);
    let key = if route_gen != 0 && ip.tos & !ECN_MASK == 0 && frag_offset(ip) == 0 {
        flow_key(ctx, ip, IP_OFF + ihl)
    } else {
        None
    };
    let cached = key.as_ref().and_then(flow_route);
    let mut untranslated = false;
    if cached.is_none() {
        if role == Role::Accelerator {
            return None;
        }
        // No flow of ours: a reply in a connection delivered into the pod is no new flow, and
        // MASQUERADE would not touch it. The kernel's (a port published on the node, DNATed to
        // the pod) stays the kernel's, whose conntrack undoes the DNAT; ours (direct delivery
        // from a member's own address) is sent on untranslated.
        match kernel_flow::inbound_way(ctx, IP_OFF, ip) {
            KERNEL_FLOW_IN => {
                count(Reason::StackKernelFlow, ctx.len());
                return None;
            }
            KERNEL_FLOW_IN_DIRECT => untranslated = true,
            _ => {}
        }
    }
    if let Some(cached) = cached
        && cached.route_gen == route_gen
    {
        return Some(RouteOut {
            next_hop: Some(cached.next_hop),
            cache: cached,
            untranslated,
        });
    }
    let route = fib::lookup(ctx, cfg.bridge_ifindex, ip, ip.daddr);
    if !route.found() || route.ifindex != cfg.underlay_ifindex {
        return None;
    }
    let cache = match (key, route.next_hop) {
        (Some(_), Some(next_hop)) => NextHopV4 {
            route_gen,
            next_hop,
        },
        _ => NextHopV4::default(),
    };
    Some(RouteOut {
        next_hop: route.next_hop,
        cache,
        untranslated,
    })
}

/// The flow key of an outbound TCP, UDP or ICMP echo packet whose L4 header is at `l4`, as
/// [`translate_out`] makes it; `None` for anything else.
#[inline(always)]
fn flow_key(ctx: &TcContext, ip: &Ipv4Hdr, l4: usize) -> Option<NatKeyV4> {
    let t = load_l4(ctx, ip.proto, l4, false)?;
    if ip.proto == IPPROTO_ICMP && t.icmp_type != IcmpHdr::ECHO {
        return None;
    }
    Some(NatKeyV4::new(
        ip.saddr, ip.daddr, t.sport, t.dport, ip.proto,
    ))
}

/// The external interface's tcx egress: masquerades what the kernel routed there itself.
#[inline(always)]
pub fn snat_egress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !masquerades(cfg, ip.saddr, ip.daddr, skb_mark(ctx)) {
        return Ok(TC_ACT_OK);
    }
    // A reply in a connection delivered into the pod (an outside host that routes the cluster
    // network through this node): no new flow, left alone as MASQUERADE leaves it.
    if kernel_flow::inbound_way(ctx, IP_OFF, &ip) != kernel_flow::NOT_INBOUND {
        return Ok(TC_ACT_OK);
    }
    if translate_out(ctx, nat, cfg, &ip, ihl, cfg.local_ip, NAT_E_KERNEL, None)? == Translated::Yes
    {
        count(Reason::NatSnat, ctx.len());
    }
    Ok(TC_ACT_OK)
}

/// The host device's tcx egress, for a packet the kernel sends to a remote pod (`ROUTE_V4` has
/// its peer): masquerades it when its source is outside the cluster network (flannel's last
/// rule), to `<subnet>.0` towards a VXLAN peer or to the external interface's address towards
/// a `direct` one. The caller then encapsulates or forwards it.
#[inline(always)]
pub fn snat_to_cluster(ctx: &TcContext, cfg: &Config, direct: bool) -> Result<(), Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(());
    };
    if !masquerades_to_cluster(cfg, ip.saddr, ip.daddr, skb_mark(ctx)) {
        return Ok(());
    }
    let nat_addr = if direct { cfg.local_ip } else { cfg.subnet };
    if translate_out(ctx, nat, cfg, &ip, ihl, nat_addr, NAT_E_TO_CLUSTER, None)? == Translated::Yes
    {
        count(Reason::NatSnat, ctx.len());
    }
    Ok(())
}

/// [`translate_out`] for a protocol whose reply tuple its packet fixes (ports kept, or none):
/// the flow, then the address (and a pseudo-header checksum, where one covers it).
#[inline(always)]
fn fixed_tuple_out_rewrite(
    ctx: &TcContext,
    nat: &NatConfig,
    ip: &Ipv4Hdr,
    t: &L4Ports,
    nat_addr: [u8; 4],
    eflags: u8,
    hop: bool,
) -> Result<Translated, Reason> {
    let key = NatKeyV4::new(ip.saddr, ip.daddr, t.sport, t.dport, ip.proto);
    if eflags & NAT_E_KERNEL != 0 && replies_to_cluster_flow(nat, &key, flow::now()) {
        return Ok(Translated::No);
    }
    match flow::fixed_tuple_out(nat, &key, nat_addr, eflags) {
        flow::FIXED_OK => {}
        flow::FIXED_TAKEN => return Err(Reason::DropNatExhausted),
        _ => return Err(Reason::DropNatFailed),
    }
    // DCCP, UDP-Lite: their checksums cover a pseudo-header, as UDP's does (`csum_off` 0:
    // none covers the address).
    rewrite_source_out(ctx, ip, nat_addr, (t.csum_off, 0), hop)?;
    Ok(Translated::Yes)
}

/// The outbound translation of one packet: finds or creates the flow, then rewrites source
/// address (to `nat_addr`) and port. `hop` comes from the pod bridge's hook, which forwards the
/// packet itself: the TTL is decremented, and the flow caches the route (generation not 0).
/// `Ok(Translated::No)`: not a protocol we translate, or (at the external interface,
/// `NAT_E_KERNEL`) the reply of a `NAT_E_TO_CLUSTER` flow.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into three call sites")]
pub(super) fn translate_out(
    ctx: &TcContext,
    nat: &NatConfig,
    cfg: &Config,
    ip: &Ipv4Hdr,
    ihl: usize,
    nat_addr: [u8; 4],
    eflags: u8,
    hop: Option<NextHopV4>,
) -> Result<Translated, Reason> {
    let route = hop.unwrap_or_default();
    let hop = hop.is_some();
    let l4 = IP_OFF + ihl;
    if frag_offset(ip) != 0 {
        if NatPorts::of(ip.proto) == NatPorts::None && is_member(ip.daddr) {
            // As its first fragment was (below).
            return Ok(Translated::No);
        }
        // A later fragment: no ports; every masqueraded flow has the same address.
        rewrite_source_out(ctx, ip, nat_addr, NO_L4_CSUM, hop)?;
        return Ok(Translated::Yes);
    }
    // Ports (ICMP: identifier) and where the L4 checksum is.
    let Some(t) = load_l4(ctx, ip.proto, l4, true) else {
        return Err(Reason::DropNatMalformed);
    };
    if t.ports != NatPorts::Chosen {
        if t.ports == NatPorts::None && is_member(ip.daddr) {
            // Without ports the reply tuple is the remote and the protocol: a member node's
            // own tunnels (IP-in-IP, GRE, ESP between nodes) would come back to the pod. Left
            // as they are, with the pod's address, which the member routes back through the
            // overlay.
            return Ok(Translated::No);
        }
        // Decided here, before any other test of the protocol: past this point the verifier
        // would walk every such test's other branch for protocols it cannot tell apart.
        return fixed_tuple_out_rewrite(ctx, nat, ip, &t, nat_addr, eflags, hop);
    }
    if ip.proto == IPPROTO_UDP {
        // Translated to our address, a datagram to a member's VXLAN port would pass for this
        // node's own tunnel traffic there: a pod must not speak VXLAN as the node.
        if u16::from_be_bytes(t.dport) == cfg.port && is_member(ip.daddr) {
            return Err(Reason::DropPodVxlan);
        }
    } else if ip.proto == IPPROTO_ICMP {
        if is_icmp_error(t.icmp_type) {
            return icmp_error_out(ctx, nat, ip, l4, nat_addr, hop);
        }
        if t.icmp_type != IcmpHdr::ECHO {
            return Ok(Translated::No);
        }
    }
    let (sport, dport, csum_off, tcp_flags) = (t.sport, t.dport, t.csum_off, t.tcp_flags);
    let key = NatKeyV4::new(ip.saddr, ip.daddr, sport, dport, ip.proto);
    let now = flow::now();
    if eflags & NAT_E_KERNEL != 0 && replies_to_cluster_flow(nat, &key, now) {
        return Ok(Translated::No);
    }
    let seg = Segment {
        flags: tcp_flags,
        ack: t.tcp_ack,
    };
    let nat_port = flow_out(ctx, nat, cfg, &key, nat_addr, seg, eflags, route, now)?;

    // Rewrites: the L4 checksum's helpers first, then the fields (in place, or by offset).
    let port_off = L4Ports::port_off(ip.proto, l4, true);
    // A pseudo-header checksum (TCP, UDP, DCCP, UDP-Lite) follows the address; ICMP's does
    // not, and other protocols have none over it (`csum_off` 0).
    let (pseudo, mangled) = match ip.proto {
        IPPROTO_TCP => (BPF_F_PSEUDO_HDR, 0),
        IPPROTO_UDP => (BPF_F_PSEUDO_HDR, BPF_F_MARK_MANGLED_0),
        _ => (0, 0),
    };
    let flags = u64::from(mangled);
    if pseudo != 0 {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u32::from_ne_bytes(ip.saddr)),
            u64::from(u32::from_ne_bytes(nat_addr)),
            flags | u64::from(pseudo) | 4,
        )
        .map_err(|_| Reason::DropNatFailed)?;
    }
    if nat_port != sport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u16::from_ne_bytes(sport)),
            u64::from(u16::from_ne_bytes(nat_port)),
            flags | 2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        write_port(ctx, port_off, nat_port, Writes::outbound(hop))?;
    }
    rewrite_source_out(ctx, ip, nat_addr, NO_L4_CSUM, hop)?;
    Ok(Translated::Yes)
}
