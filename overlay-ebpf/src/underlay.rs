//! TC programs on the node's external (underlay) interface.
//!
//! Hook: tcx ingress and egress of the interface that carries inter-node traffic.
//! - `underlay_ingress` counts every packet (`underlay_rx`), decapsulates VXLAN for this node
//!   and delivers it to the pod bridge or the host device (see `lib::decap`), drops VXLAN that
//!   fails a check (counted by reason), and lets everything else go on (`TC_ACT_OK`).
//! - `underlay_egress` counts what leaves (`underlay_tx`), our encapsulated packets included
//!   (`bpf_redirect_neigh` transmits through this hook), and rewrites nothing.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use overlay_common::counters::Reason;

use crate::lib::{
    counters::{count, verdict},
    decap::try_underlay_ingress,
};

#[classifier]
pub fn underlay_ingress(ctx: TcContext) -> i32 {
    count(Reason::UnderlayRx, ctx.len());
    verdict(&ctx, try_underlay_ingress(&ctx))
}

#[classifier]
pub fn underlay_egress(ctx: TcContext) -> i32 {
    count(Reason::UnderlayTx, ctx.len());
    TC_ACT_OK
}
