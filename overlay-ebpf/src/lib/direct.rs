//! Direct routing (host-gw, and VXLAN's DirectRouting for peers on our L2 segment): pod traffic
//! crosses the underlay unencapsulated, the peer's PublicIP being the L2 next hop.
//!
//! Sending (`pod_egress`, `host_egress`), for a `ROUTE_V4` entry with `ROUTE_F_DIRECT`: the
//! packet keeps its IP header and goes out of the external interface with
//! `bpf_redirect_neigh(underlay, nh = PublicIP)`, so the kernel fills both MACs from its
//! neighbour table for that address (resolving it with ARP if needed), exactly the next hop of
//! flannel's `ip route replace <subnet> via <PublicIP> dev <iface>`, but without that route and
//! without the kernel's forwarding (FORWARD chain, policy DROP as Docker sets it). From a pod this
//! replaces the kernel's forwarding hop, so the TTL is decremented; a TTL that would expire or a
//! packet larger than the external interface's MTU is handed to the kernel instead (ICMP time
//! exceeded, fragmentation / "fragmentation needed"; it then comes back through the host device
//! and `host_egress`). From the host device the kernel has already routed the packet (TTL, MTU,
//! source address `<subnet>.0`), so it is sent as it is.
//!
//! Receiving (`underlay_ingress`, when `CONFIG_F_DIRECT` is set): what is accepted, and what is
//! not. flannel accepts anything the kernel routes to a pod (its FORWARD rules accept every
//! cluster destination); we deliver, bypassing the kernel's forwarding, only an IPv4 packet that
//! - was addressed to this host at L2 (`PACKET_HOST`, not overheard by a promiscuous NIC),
//! - is for this node's subnet (not its broadcast address), without IP options,
//! - comes from a direct peer: its source lies in the subnet of a `ROUTE_F_DIRECT` entry (a
//!   peer's pod, or its host device `<subnet>.0`), or is a member node's PublicIP (`NODE_V4`:
//!   host traffic of a stock host-gw node, which uses its interface address as source),
//! - has a valid IPv4 header checksum and a total length the frame holds (the checks of the
//!   kernel's `ip_rcv` that redirecting skips; failures are dropped, `drop_direct_malformed`).
//!
//! Anything else for a local pod is left to the kernel (`to_stack_not_peer`), whose forwarding
//! rules decide (with FORWARD policy DROP and no rules: dropped). Source addresses are not
//! authenticated: a host on the L2 segment can claim a peer's pod address, as it can with
//! flannel's kernel routes. Accepted packets go straight into the pod when `ENDPOINT_V4` knows
//! it (`lib::endpoint`, `bpf_redirect_peer`), else to the pod bridge (`bpf_redirect_neigh`,
//! marked as ours for `pod_ingress`),
//! TTL decremented as the kernel's forwarding would; or, for the host device's address, the
//! bridge's gateway address, a TTL that expires here or a packet of a flow the kernel
//! forwarded for the pod (`lib::kernel_flow`, a Service endpoint's reply that conntrack must
//! translate back; `to_stack_kernel_flow`), to the host device's ingress, as
//! decapsulated VXLAN does (the host stack answers; replies go out through `host_egress`).
//! A packet for a pod from outside the cluster network (a member's own address: a stock host-gw
//! node's host) has its connection filed (`lib::kernel_flow`, `KERNEL_FLOW_IN_DIRECT`): no
//! conntrack sees it, and with `--ip-masq` the pod's replies must leave untranslated.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use overlay_common::{
    config::Config,
    counters::Reason,
    route::RemoteNode,
    wire::{ETH_HLEN, IPV4_HLEN},
};

use crate::lib::{
    counters::{Role, count, count_handback},
    csum::ipv4_checksum_ok,
    endpoint::{endpoint_v4, redirect_to_bridge, redirect_to_endpoint},
    fib,
    hdr::Ipv4Hdr,
    ipv4::{decrement_ttl, eth_ipv4},
    kernel_flow::{file_delivered_directly, is_kernel_flow},
    maps::{config, in_subnet, is_member, route_v4},
    ptr::pull_headers,
};

/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

/// Sends the packet (IPv4 behind an Ethernet header) out of the external interface with the
/// peer's PublicIP as the next hop; the kernel writes the MACs from its neighbour table.
#[inline(always)]
pub fn redirect_direct(cfg: &Config, peer: &RemoteNode) -> i32 {
    fib::redirect_neigh_via(cfg.underlay_ifindex, peer.public_ip)
}

/// `pod_egress` for a direct peer: forwards the pod's packet at `ip` (a checked pointer, valid:
/// no helper has moved data yet) whose TTL is `ttl`.
#[inline(always)]
pub fn forward_from_pod(
    ctx: &TcContext,
    cfg: &Config,
    role: Role,
    peer: &RemoteNode,
    ip: *mut Ipv4Hdr,
    ttl: u8,
) -> Result<i32, Reason> {
    if ttl <= 1 {
        count_handback(role, Reason::StackTtl, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if !fib::fits(ctx, cfg.underlay_ifindex) {
        count_handback(role, Reason::StackMtu, ctx.len());
        return Ok(TC_ACT_OK);
    }
    // SAFETY: the caller's pointer is still valid; ttl > 1.
    unsafe { decrement_ttl(ip) };
    count(Reason::DirectPod, ctx.len());
    Ok(redirect_direct(cfg, peer))
}

/// Whether an unencapsulated packet from `saddr` comes from a direct peer (see the module note).
#[inline(always)]
fn from_direct_peer(saddr: [u8; 4]) -> bool {
    route_v4(saddr).is_some_and(|peer| peer.is_direct()) || is_member(saddr)
}

/// `underlay_ingress` for what is not VXLAN for us: delivers unencapsulated traffic from direct
/// peers to local pods and the host (see the module note); everything else goes on.
#[inline(always)]
pub fn try_direct_ingress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    if !cfg.accepts_direct() {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: reading a field of our own context's skb.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return Ok(TC_ACT_OK);
    }
    pull_headers(ctx, ETH_HLEN + IPV4_HLEN);
    let Some((eth, ip)) = eth_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let hdr = unsafe { *ip };
    let daddr = hdr.daddr;
    if !in_subnet(daddr, cfg.subnet, cfg.subnet_mask) {
        return Ok(TC_ACT_OK);
    }
    let broadcast = u32::from_ne_bytes(cfg.subnet) | !u32::from_ne_bytes(cfg.subnet_mask);
    if hdr.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS || u32::from_ne_bytes(daddr) == broadcast {
        return Ok(TC_ACT_OK);
    }
    if !from_direct_peer(hdr.saddr) {
        count(Reason::StackNotPeer, ctx.len());
        return Ok(TC_ACT_OK);
    }
    let tot_len = usize::from(u16::from_be_bytes(hdr.tot_len));
    if !ipv4_checksum_ok(&hdr) || tot_len < IPV4_HLEN || tot_len + ETH_HLEN > ctx.len() as usize {
        return Err(Reason::DropDirectMalformed);
    }

    let to_host = cfg.is_host_subnet_address(daddr);
    // A TTL that expires here goes to the host device (as `to_stack_ttl`), whatever its flow.
    let forwarded = !to_host && hdr.ttl > 1;
    let kernel_flow = forwarded && is_kernel_flow(ctx, cfg, ETH_HLEN, &hdr);
    if forwarded && !kernel_flow {
        let endpoint = endpoint_v4(daddr);
        if endpoint.is_none() && cfg.bridge_ifindex == 0 {
            return Err(Reason::DropNoBridge);
        }
        // A member's own address (a stock node's host): no conntrack sees this connection, so
        // the pod's replies must be known as replies (`--ip-masq` leaves them untranslated).
        file_delivered_directly(ctx, cfg, ETH_HLEN, &hdr);
        // SAFETY: `ip` is still valid (no helper moved data since `eth_ipv4`); ttl > 1.
        unsafe { decrement_ttl(ip) };
        if let Some(ep) = endpoint {
            count(Reason::DeliverDirectEndpoint, ctx.len());
            return redirect_to_endpoint(ctx, cfg, &ep).ok_or(Reason::DropDirectMalformed);
        }
        count(Reason::DeliverDirectPod, ctx.len());
        return Ok(redirect_to_bridge(ctx, cfg));
    }
    if cfg.host_ifindex == 0 {
        return Err(Reason::DropNoHostDevice);
    }
    // The stack must take the frame as addressed to the host device (PACKET_HOST there).
    // SAFETY: checked pointer, still valid.
    unsafe { (*eth).dst = cfg.host_mac };
    count(
        if to_host {
            Reason::DeliverDirectHost
        } else if kernel_flow {
            Reason::StackKernelFlow
        } else {
            Reason::StackTtl
        },
        ctx.len(),
    );
    Ok(fib::to_host_device(cfg))
}
