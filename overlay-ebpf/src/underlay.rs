//! TC programs on the node's external (underlay) interface.
//!
//! Hook: tcx ingress and egress of the interface that carries inter-node traffic.
//! - `underlay_ingress` counts every packet (`underlay_rx`), decapsulates VXLAN for this node
//!   and delivers it to the pod bridge or the host device (see `lib::decap`), drops VXLAN that
//!   fails a check (counted by reason); what is not VXLAN for us may be unencapsulated traffic
//!   from a direct peer (host-gw, DirectRouting), delivered likewise (see `lib::direct`);
//!   everything else goes on (`TC_ACT_OK`).
//!   Last, replies to masqueraded flows are translated back to their pod (`lib::nat`), or, for
//!   flows masqueraded into the cluster towards a direct peer, to their outside source.
//! - `underlay_xdp` (native XDP, attached with `--xdp on`; by default the kernel's GRO
//!   aggregates VXLAN through the agent's GRO device instead, see `lib::decap`) decapsulates
//!   VXLAN for us before GRO, so GRO aggregates the inner flow, and
//!   marks what it decapsulated for `underlay_ingress` (see `lib::decap`). It never drops.
//! - `underlay_egress` counts what leaves (`underlay_tx`), our encapsulated packets included
//!   (`bpf_redirect_neigh` transmits through this hook); with `--ip-masq` it masquerades pod
//!   traffic the kernel routed out of here itself (`lib::nat`; a remote pod's reply to an
//!   outside host that we route back is not a new flow and keeps its source), and rewrites
//!   nothing else. A local pod's packet the kernel routed out of here unmasqueraded (to
//!   outside the cluster network) is filed first (`lib::kernel_flow`), so that a reply that
//!   comes back through the overlay goes through the kernel too.

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::{counters::Reason, wire::ETH_HLEN};

use crate::lib::{
    counters::{Step, count, settled, then, verdict},
    decap::{try_underlay_ingress, xdp_decapsulate},
    direct::try_direct_ingress,
    ipv4::eth_ipv4,
    kernel_flow,
    maps::{config, in_subnet},
    nat,
};

#[classifier]
pub fn underlay_ingress(ctx: TcContext) -> i32 {
    count(Reason::UnderlayRx, ctx.len());
    // Three stages in turn, each settling the packet or passing it on. VXLAN for us never has a
    // pod subnet as outer destination, so only what decapsulation passed on can be direct
    // traffic; then replies to masqueraded flows (`lib::nat`), addressed to this node.
    let steps = Step::of(try_underlay_ingress(&ctx));
    let steps = then(steps, || try_direct_ingress(&ctx));
    let steps = then(steps, || nat::reverse(&ctx));
    verdict(&ctx, settled(steps))
}
named!(underlay_ingress, overlay_common::names::UNDERLAY_INGRESS);

#[classifier]
pub fn underlay_egress(ctx: TcContext) -> i32 {
    count(Reason::UnderlayTx, ctx.len());
    file_kernel_flow(&ctx);
    // Masquerades what the kernel routed out of here itself (`lib::nat`).
    verdict(&ctx, nat::snat_egress(&ctx))
}

/// Files a local pod's packet the kernel routed out of here to outside the cluster network
/// (`lib::kernel_flow`; what `pod_egress` sends on is masqueraded or for a peer's subnet): a
/// Service endpoint on a member node's own address answers through the overlay, and that reply
/// must come back through the kernel.
#[inline(always)]
fn file_kernel_flow(ctx: &TcContext) {
    let Some(cfg) = config() else {
        return;
    };
    let Some((_, ip)) = eth_ipv4(ctx) else {
        return;
    };
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let hdr = unsafe { *ip };
    if !in_subnet(hdr.daddr, cfg.network, cfg.network_mask) {
        kernel_flow::file(ctx, cfg, ETH_HLEN, &hdr);
    }
}
named!(underlay_egress, overlay_common::names::UNDERLAY_EGRESS);

#[xdp]
pub fn underlay_xdp(ctx: XdpContext) -> u32 {
    xdp_decapsulate(&ctx)
}
named!(underlay_xdp, overlay_common::names::UNDERLAY_XDP);
