//! `pod_ingress`: what the kernel sends into local pods, on the pod bridge.
//!
//! Hook: tcx egress of the pod bridge (cni0/docker0), which sees the packets the host's stack
//! routes to pods (its own, and what it forwards). Our deliveries go straight into the pod
//! (`bpf_redirect_peer`) and skip it, except those for a pod whose endpoint is not known yet,
//! which carry `BRIDGE_DELIVERY_MARK` (cleared here). Nothing else is changed, and nothing is
//! dropped: a packet from outside the cluster network is only
//! noted (`lib::kernel_flow::file_delivered`), because its connection is the kernel's. That is
//! the case of a port published on the node and DNATed into a pod (`docker run -p`, a
//! hostPort, a NodePort with `externalTrafficPolicy: Local`): the pod's replies must go back
//! through conntrack, which gives them the node's address and port, instead of being
//! masqueraded by `pod_egress` as a new flow.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use overlay_common::wire::ETH_HLEN;

use crate::lib::{ipv4::eth_ipv4, kernel_flow, maps::config};

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    if let Some(cfg) = config()
        && let Some((_, ip)) = eth_ipv4(&ctx)
    {
        // SAFETY: a checked pointer from `eth_ipv4`, read at once.
        let hdr = unsafe { *ip };
        kernel_flow::file_delivered(&ctx, cfg, ETH_HLEN, &hdr);
    }
    TC_ACT_OK
}
named!(pod_ingress, overlay_common::names::POD_INGRESS);
