//! Replies translated back: at `underlay_ingress` for the node's address ([`reverse`]) and
//! from decapsulation for the host device's `<subnet>.0` ([`reverse_decapsulated`]); the
//! original destination is restored and the packet delivered to the pod (straight in, through
//! the bridge or the kernel) or, for flows masqueraded into the cluster, routed back to the
//! outside source. Calls `policy`, `flow`, `rewrite`, `icmp` and `lib::fib`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    endpoint::Endpoint,
    nat::{IPPROTO_ICMP, IPPROTO_UDP, NAT_E_KERNEL, NAT_E_TO_CLUSTER, NatEntryV4, NatKeyV4},
};

use super::{
    IP_OFF, L4Ports,
    flow::{self, flow_in, frag_offset, fragment_flow, is_first_fragment, remember_fragments},
    icmp::icmp_error_reverse,
    is_icmp_error, load_l4,
    policy::nat_ipv4,
    rewrite::{Addr, L4Csum, NO_L4_CSUM, Writes, rewrite_addr, write_port},
};
use crate::lib::{
    counters::count,
    endpoint::{endpoint_v4, redirect_to_endpoint},
    fib,
    hdr::{IcmpHdr, Ipv4Hdr},
    maps::config,
};

/// `underlay_ingress`, for what decapsulation left to the kernel: translates replies (and ICMP
/// errors about flows) to the node's address back to the pod (or the outside source).
/// `Ok(TC_ACT_OK)` when the packet is not ours, or is translated and goes on to the kernel.
#[inline(always)]
pub fn reverse(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    reverse_to(ctx, cfg, cfg.local_ip)
}

/// Decapsulation, for a packet to the host device's address `<subnet>.0` (after the outer
/// headers are gone): translates replies of `NAT_E_TO_CLUSTER` flows back. `Ok(TC_ACT_OK)`:
/// not ours, or translated for the host stack: the caller hands it to the host device either
/// way.
#[inline(always)]
pub fn reverse_decapsulated(ctx: &TcContext, cfg: &Config) -> Result<i32, Reason> {
    reverse_to(ctx, cfg, cfg.subnet)
}

/// Translates back a reply to `nat_addr` (a translated source address of ours).
#[inline(always)]
fn reverse_to(ctx: &TcContext, cfg: &Config, nat_addr: [u8; 4]) -> Result<i32, Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if ip.daddr != nat_addr {
        return Ok(TC_ACT_OK);
    }
    if frag_offset(&ip) != 0 {
        return reverse_later_fragment(ctx, cfg, &ip);
    }
    let l4 = IP_OFF + ihl;
    let Some(t) = load_l4(ctx, ip.proto, l4, true) else {
        return Ok(TC_ACT_OK);
    };
    let (sport, dport) = if ip.proto == IPPROTO_ICMP {
        if is_icmp_error(t.icmp_type) {
            return icmp_error_reverse(ctx, nat, cfg, &ip, l4);
        }
        if t.icmp_type != IcmpHdr::ECHO_REPLY {
            return Ok(TC_ACT_OK);
        }
        // The reply's identifier is the translated one: the key's remote side is 0.
        ([0, 0], t.sport)
    } else {
        (t.sport, t.dport)
    };
    let csum_off = t.csum_off;
    let key = NatKeyV4::new(ip.saddr, ip.daddr, sport, dport, ip.proto);
    let Some(orig) = flow_in(nat, &key, t.tcp_flags, t.tcp_seq) else {
        return Ok(TC_ACT_OK);
    };
    if is_first_fragment(&ip) {
        // The later fragments carry no ports: they follow this one by the datagram's identity.
        let now = flow::now();
        remember_fragments(&ip, orig, now);
    }

    let port_off = L4Ports::port_off(ip.proto, l4, false);
    let mangled = if ip.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if orig.port != dport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u16::from_ne_bytes(dport)),
            u64::from(u16::from_ne_bytes(orig.port)),
            mangled | 2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        write_port(ctx, port_off, orig.port, Writes::InPlace)?;
    }
    let l4_csum = if ip.proto == IPPROTO_ICMP || csum_off == 0 {
        NO_L4_CSUM
    } else {
        (csum_off, mangled)
    };
    deliver(ctx, cfg, &ip, orig, l4_csum)
}

/// A later fragment of a reply whose first fragment was translated back (`SNAT_V4_FRAG`, within
/// `NAT_FRAG_TIMEOUT`): the same destination, delivered the same way; its ports and L4
/// checksum are in the first fragment. Fragments that arrive before the first one, or of
/// datagrams never translated, go on to the kernel untouched.
#[inline(always)]
fn reverse_later_fragment(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr) -> Result<i32, Reason> {
    let now = flow::now();
    let Some(orig) = fragment_flow(ip, now) else {
        return Ok(TC_ACT_OK);
    };
    deliver(ctx, cfg, ip, orig, NO_L4_CSUM)
}

/// Rewrites the destination to the pod and sends the packet to it (or to the kernel).
#[inline(always)]
pub(super) fn deliver(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    orig: NatEntryV4,
    l4_csum: L4Csum,
) -> Result<i32, Reason> {
    if orig.flags & NAT_E_TO_CLUSTER != 0 {
        return route_back(ctx, cfg, ip, orig, l4_csum);
    }
    // Straight into the pod when its endpoint is known, else through the bridge. An unknown
    // endpoint is all zeroes (interface index 0), not a `None` held across the helper calls
    // below: its undefined payload would be spilled, which the verifier refuses (`!read_ok`).
    let endpoint = endpoint_v4(orig.addr).unwrap_or(Endpoint::new(0, [0; 6]));
    let egress = if endpoint.ifindex != 0 {
        endpoint.ifindex
    } else {
        cfg.bridge_ifindex
    };
    // Through the kernel: `NAT_E_KERNEL` flows, an expiring TTL (it answers "time exceeded"),
    // no bridge, or a packet too big for the pod (the kernel fragments or answers).
    let to_kernel =
        orig.flags & NAT_E_KERNEL != 0 || ip.ttl <= 1 || egress == 0 || !fib::fits(ctx, egress);
    restore_destination(ctx, ip, orig, l4_csum, !to_kernel)?;
    if to_kernel {
        return Ok(TC_ACT_OK);
    }
    if endpoint.ifindex != 0 {
        count(Reason::NatRevEndpoint, ctx.len());
        return redirect_to_endpoint(ctx, cfg, &endpoint).ok_or(Reason::DropNatFailed);
    }
    Ok(fib::redirect_neigh(cfg.bridge_ifindex))
}

/// A reply of a `NAT_E_TO_CLUSTER` flow: rewrites the destination to the original source and
/// routes it there. A local address (a host socket) goes on to the host stack (`TC_ACT_OK`);
/// anything else is forwarded with `bpf_redirect_neigh` (TTL decremented: we are the
/// forwarding hop, so the kernel's FORWARD chain is bypassed), or handed to the kernel when the
/// TTL expires, the packet is too big for the egress device or the FIB has no route.
#[inline(always)]
fn route_back(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    orig: NatEntryV4,
    l4_csum: L4Csum,
) -> Result<i32, Reason> {
    let route = fib::lookup(ctx, cfg.underlay_ifindex, ip, orig.addr);
    // NOT_FWDED (a local destination) and every failure: the kernel's.
    let forward = route.found() && ip.ttl > 1 && fib::fits(ctx, route.ifindex);
    restore_destination(ctx, ip, orig, l4_csum, forward)?;
    if !forward {
        return Ok(TC_ACT_OK);
    }
    Ok(fib::redirect_neigh_to(route.ifindex, route.next_hop))
}

/// Gives the reply its original destination back (`orig`, the originator), with its
/// checksums; `hop` when we forward it ourselves (the TTL is decremented). Counted as
/// translated back whatever the delivery.
#[inline(always)]
fn restore_destination(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    orig: NatEntryV4,
    l4_csum: L4Csum,
    hop: bool,
) -> Result<(), Reason> {
    rewrite_addr(
        ctx,
        Addr::Destination,
        ip.daddr,
        orig.addr,
        l4_csum,
        hop,
        ip,
        Writes::InPlace,
    )?;
    count(Reason::NatRev, ctx.len());
    Ok(())
}
