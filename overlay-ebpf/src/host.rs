//! `host_egress`: packets the host sends into the cluster, on the host device.
//!
//! Hook: tcx egress of the host device (`ovl0`: NOARP, address `<subnet>.0/32`, MTU = underlay
//! MTU − 50, route `<cluster network> dev ovl0`), which plays flannel.1's part for host-originated
//! and host-forwarded traffic (the host itself, hostNetwork pods, outside traffic the host
//! routes into the cluster, and pod packets `pod_egress` handed back to the kernel). An IPv4
//! packet for a peer's subnet is encapsulated (`lib::encap`) and redirected to the underlay
//! device. The kernel has already routed it (TTL decremented if forwarded, MTU applied), so it
//! is sent as it is. A cluster address no peer covers has nowhere to go: dropped and counted
//! (`drop_no_route`) instead of leaving through the device's other end. Non-IPv4 and
//! non-cluster packets go on untouched. A peer with the DIRECT flag (host-gw, DirectRouting)
//! gets the packet unencapsulated, next hop its PublicIP (`lib::direct`). A local pod's packet
//! that gets here went through the kernel's netfilter (a Service address DNATed to a remote
//! endpoint): its flow is filed (`lib::kernel_flow`) so that the replies go back through the
//! kernel, whose conntrack gives them the Service address.
//!
//! With `--ip-masq`, a packet from outside the cluster network to a peer's pod (a host socket
//! bound to a non-cluster address, or traffic the kernel forwards for an outside host) is
//! masqueraded first (`lib::nat`, flannel's `! -s <cluster> -d <cluster>` rule): to
//! `<subnet>.0` towards a VXLAN peer, to the external interface's address towards a direct one.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use overlay_common::{counters::Reason, wire::ETH_HLEN};

use crate::lib::{
    counters::{count, verdict},
    direct::redirect_direct,
    encap::{encapsulate, redirect_to_underlay},
    ipv4::eth_ipv4,
    kernel_flow,
    maps::{config, in_subnet, route_v4},
    nat,
};

#[classifier]
pub fn host_egress(ctx: TcContext) -> i32 {
    verdict(&ctx, try_host_egress(&ctx))
}
named!(host_egress, overlay_common::names::HOST_EGRESS);

#[inline(always)]
fn try_host_egress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    let Some((_, ip)) = eth_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let hdr = unsafe { *ip };
    let (tos, daddr) = (hdr.tos, hdr.daddr);
    let Some(peer) = route_v4(daddr) else {
        if in_subnet(daddr, cfg.network, cfg.network_mask) {
            return Err(Reason::DropNoRoute);
        }
        return Ok(TC_ACT_OK);
    };
    // A pod's packet here was routed by the kernel (e.g. to a Service endpoint after
    // kube-proxy's DNAT): its replies must come back through the kernel.
    kernel_flow::file(ctx, cfg, ETH_HLEN, &hdr);
    if peer.is_direct() {
        nat::snat_to_cluster(ctx, cfg, true)?;
        count(Reason::DirectHost, ctx.len());
        return Ok(redirect_direct(cfg, &peer));
    }
    if !peer.is_vxlan() {
        return Ok(TC_ACT_OK);
    }

    // Before encapsulation: the NAT works on the packet as the kernel routed it.
    nat::snat_to_cluster(ctx, cfg, false)?;
    encapsulate(ctx, cfg, &peer, tos)?;
    count(Reason::EncapHost, ctx.len());
    Ok(redirect_to_underlay(ctx, cfg, &peer, tos))
}
