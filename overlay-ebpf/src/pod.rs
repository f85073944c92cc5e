//! `pod_egress`: packets from local pods towards the host, on the pod bridge.
//!
//! Hook: tcx ingress of the pod bridge (cni0/docker0), which sees what the bridge passes up to
//! the host: frames pods address to the gateway's MAC. An IPv4 packet whose destination lies in
//! a peer's subnet (`ROUTE_V4`, VXLAN flag) is encapsulated (`lib::encap`) and redirected to the
//! underlay device, bypassing the host's routing; everything else (local traffic, the outside
//! world, subnets without a peer yet, broadcasts, non-IPv4) goes on to the kernel untouched.
//!
//! This program takes the place of the kernel's forwarding hop on the sending node, so it
//! decrements the inner TTL as that hop would (a stock node decrements twice: forwarding into
//! flannel.1 here, and out of it on the receiver, where `underlay_ingress` does the second).
//! Packets the kernel must answer instead are handed to it unchanged: a TTL that would expire
//! (ICMP time exceeded) and a packet too big for the tunnel (fragmentation, or ICMP
//! "fragmentation needed"; it then reaches the peer through the host device and `host_egress`).
//! Pods are expected to use the tunnel MTU (FLANNEL_MTU = underlay MTU − 50).
//! A peer with the DIRECT flag (host-gw, DirectRouting) is sent to unencapsulated instead
//! (`lib::direct`), with the same TTL and MTU hand-backs against the external interface's MTU.
//!
//! `pod_port_egress` is the same body on the tcx ingress of a pod's host-side veth, in front of
//! the bridge (where the agent runs with `--pod-hook port`): it takes only frames the pod
//! addresses to its gateway (the bridge's MAC; the rest is the bridge's to switch), redirects
//! what it can finish (encapsulation, direct routing, masquerade of a flow that exists: a new
//! flow's first packet is the bridge's, see below) and passes everything else on
//! to the bridge uncounted, where `pod_egress` decides and counts as without it (`Role`).
//!
//! Between the two, with `br_netfilter` (which Kubernetes requires), the bridge runs the IP
//! netfilter hooks, where kube-proxy DNATs a Service address to an endpoint: `pod_egress` would
//! then see an endpoint's address (often a remote pod) and send the packet on, out of the
//! conntrack that holds the translation. The port notes what it passes (`POD_PORT_PASSED`, per
//! CPU); a packet that reaches the bridge with another destination than it left the port with
//! is handed to the kernel's forwarding (`to_stack_dnat`), whose replies come back through
//! the kernel too (`lib::kernel_flow`). Without the port hook (`--pod-hook bridge`) nothing
//! sees the address before the DNAT, so Services need the port hook. For the same reason, with
//! `--ip-masq` the port leaves a new flow's first packet to the bridge (`lib::nat`): kube-proxy's
//! rules see it before `pod_egress` masquerades what they left alone.
//!
//! The reverse case, a connection into a pod through a port published on the node (DNATed
//! from the node's address: `docker run -p`, a hostPort), is undone by conntrack only after
//! both hooks, on the pod's replies. `pod_ingress` files such a connection as the kernel
//! sends it into the pod (`lib::kernel_flow`); both hooks leave the pod's packets of it to
//! the kernel (`to_stack_kernel_flow`, counted at the bridge) rather than sending them to a
//! peer or masquerading them as a new flow.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use overlay_common::{counters::Reason, wire::ETH_HLEN};

use crate::lib::{
    counters::{Role, count, count_handback, verdict},
    direct,
    encap::{encapsulate, fits_tunnel, redirect_to_underlay},
    ipv4::{decrement_ttl, eth_ipv4},
    kernel_flow,
    maps::{config, in_subnet, route_v4},
    nat,
};

#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    if rewritten_since_port(&ctx) {
        count(Reason::StackDnat, ctx.len());
        return TC_ACT_OK;
    }
    verdict(&ctx, try_pod_egress(&ctx, Role::Authority))
}
named!(pod_egress, overlay_common::names::POD_EGRESS);

#[classifier]
pub fn pod_port_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let result = try_pod_egress(&ctx, Role::Accelerator);
    // What the port finished (everything but a pass to the bridge): shows the port at work.
    if matches!(result, Ok(TC_ACT_OK)) {
        note_passed(&ctx);
    } else {
        count(Reason::PodPort, len);
    }
    verdict(&ctx, result)
}
named!(pod_port_egress, overlay_common::names::POD_PORT_EGRESS);

/// The IPv4 packet `pod_port_egress` last passed on to the bridge on this CPU: enough of its
/// header to know it again, and its destination then. The bridge takes the packet on the same
/// CPU, synchronously (veth receive → bridge → passed up to the host → the bridge's tcx
/// ingress), so `pod_egress` finds here the packet it is looking at, unless the bridge
/// forwarded it elsewhere and a later one took its place (then nothing matches).
#[repr(C)]
#[derive(Clone, Copy)]
struct Passed {
    saddr: [u8; 4],
    daddr: [u8; 4],
    id: [u8; 2],
    tot_len: [u8; 2],
    proto: u8,
    /// 1 while the entry waits for `pod_egress`, which clears it.
    valid: u8,
    _reserved: [u8; 2],
}

#[map]
static POD_PORT_PASSED: PerCpuArray<Passed> = PerCpuArray::with_max_entries(1, 0);
named!(POD_PORT_PASSED, overlay_common::names::POD_PORT_PASSED);

/// Notes the IPv4 packet the port passes on to the bridge (see [`Passed`]).
#[inline(always)]
fn note_passed(ctx: &TcContext) {
    let Some((_, ip)) = eth_ipv4(ctx) else {
        return;
    };
    let Some(slot) = POD_PORT_PASSED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a checked packet pointer, read at once; `slot` is this CPU's element.
    unsafe {
        let h = *ip;
        *slot = Passed {
            saddr: h.saddr,
            daddr: h.daddr,
            id: h.id,
            tot_len: h.tot_len,
            proto: h.proto,
            valid: 1,
            _reserved: [0; 2],
        };
    }
}

/// Whether the bridge's packet is one the port passed on with another destination: netfilter
/// rewrote it on the way (with `br_netfilter`, the bridge runs the IP hooks, where kube-proxy
/// DNATs a Service address to an endpoint). Such a packet is the kernel's to forward: its
/// conntrack holds the translation, which only the kernel's forwarding confirms and only the
/// kernel can undo on the replies (`host_egress` files the flow, `lib::kernel_flow`).
#[inline(always)]
fn rewritten_since_port(ctx: &TcContext) -> bool {
    let Some(slot) = POD_PORT_PASSED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's element, which no other program run touches meanwhile.
    let passed = unsafe { *slot };
    if passed.valid == 0 {
        return false;
    }
    // SAFETY: as above.
    unsafe { (*slot).valid = 0 };
    let Some((_, ip)) = eth_ipv4(ctx) else {
        return false;
    };
    // SAFETY: a checked packet pointer, read at once.
    let h = unsafe { *ip };
    h.saddr == passed.saddr
        && h.id == passed.id
        && h.tot_len == passed.tot_len
        && h.proto == passed.proto
        && h.daddr != passed.daddr
}

#[inline(always)]
fn try_pod_egress(ctx: &TcContext, role: Role) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    let Some((eth, ip)) = eth_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let dst_mac = unsafe { (*eth).dst };
    // Broadcast and multicast frames are not routed by the kernel either; on a port, frames to
    // other pods are the bridge's.
    if dst_mac[0] & 0x01 != 0 || (role == Role::Accelerator && dst_mac != cfg.bridge_mac) {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let (tos, ttl, daddr) = unsafe { ((*ip).tos, (*ip).ttl, (*ip).daddr) };
    // Every peer's subnet lies in the cluster network (the agent refuses leases outside it), so
    // what leaves the network skips the route lookup, a trie walk. (One call of the masquerade
    // below: each call site would inline all of it again.)
    let peer = if in_subnet(daddr, cfg.network, cfg.network_mask) {
        route_v4(daddr)
    } else {
        None
    };
    let Some(peer) = peer else {
        // Not for a peer: masquerade (if on and flannel's rules say so), else the kernel's.
        return nat::snat_from_pod(ctx, cfg, role);
    };
    // A reply in a connection the kernel delivered into the pod (a remote pod's, DNATed from
    // the node's address) is the kernel's: its conntrack gives it the node's address back.
    // Anything else is the pod's own, and a Service flow filed under its tuple is over.
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    if kernel_flow::pod_packet_way(ctx, ETH_HLEN, unsafe { &*ip }) != kernel_flow::NOT_INBOUND {
        count_handback(role, Reason::StackKernelFlow, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if peer.is_direct() {
        return direct::forward_from_pod(ctx, cfg, role, &peer, ip, ttl);
    }
    if !peer.is_vxlan() {
        return Ok(TC_ACT_OK);
    }
    if ttl <= 1 {
        count_handback(role, Reason::StackTtl, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if !fits_tunnel(ctx, cfg) {
        count_handback(role, Reason::StackMtu, ctx.len());
        return Ok(TC_ACT_OK);
    }

    // SAFETY: `ip` is still valid (no helper that moves data was called); ttl > 1.
    unsafe { decrement_ttl(ip) };
    encapsulate(ctx, cfg, &peer, tos)?;
    count(Reason::EncapPod, ctx.len());
    Ok(redirect_to_underlay(ctx, cfg, &peer, tos))
}
