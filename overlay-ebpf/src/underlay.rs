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
//!   nothing else.

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use overlay_common::counters::Reason;

use crate::lib::{
    counters::{Step, count, settled, then, verdict},
    decap::{try_underlay_ingress, xdp_decapsulate},
    direct::try_direct_ingress,
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
    // Masquerades what the kernel routed out of here itself (`lib::nat`).
    verdict(&ctx, nat::snat_egress(&ctx))
}
named!(underlay_egress, overlay_common::names::UNDERLAY_EGRESS);

#[xdp]
pub fn underlay_xdp(ctx: XdpContext) -> u32 {
    xdp_decapsulate(&ctx)
}
named!(underlay_xdp, overlay_common::names::UNDERLAY_XDP);
