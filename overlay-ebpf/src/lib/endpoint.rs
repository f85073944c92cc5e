//! Delivery straight into a local pod: `ENDPOINT_V4` (pod address → host-side veth and pod MAC,
//! layout in `overlay_common::endpoint`) and the redirect into the pod's namespace.
//!
//! `bpf_redirect_peer` (tc ingress only) moves the packet to the veth's peer, the pod's `eth0`,
//! and the kernel goes on with it there as received: no bridge, no transmit path of any device,
//! no backlog queue. That is what makes delivery cheap, and what keeps a decapsulated TCP
//! super-packet whole: a transmit through the bridge would segment and checksum it in software
//! (a bridge has no encapsulation offloads and the decapsulated packet still carries the
//! sender's tunnel GSO type). The packet arrives with the MACs a pod expects from its gateway:
//! destination the pod's MAC, source the bridge's.
//!
//! The agent writes an entry only for a veth whose peer lives in another namespace (what
//! `bpf_redirect_peer` needs) and removes it when the port, the pod's MAC or its address goes,
//! so a stale entry cannot send a pod's traffic to whatever reuses its interface index.
//! Addresses without an entry take the bridge (`bpf_redirect_neigh`), as before, marked as
//! ours (`BRIDGE_DELIVERY_MARK`) for `pod_ingress`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC, helpers::bpf_redirect_peer, macros::map, maps::HashMap,
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    endpoint::{ENDPOINT_V4_CAPACITY, Endpoint, EndpointKeyV4},
    wire::BRIDGE_DELIVERY_MARK,
};

use crate::lib::{fib, hdr::EthHdr, ptr::ptr_at};

// Not preallocated: only the agent inserts, and most nodes hold far fewer pods than the capacity.
#[map]
static ENDPOINT_V4: HashMap<EndpointKeyV4, Endpoint> =
    HashMap::with_max_entries(ENDPOINT_V4_CAPACITY, BPF_F_NO_PREALLOC);
named!(ENDPOINT_V4, overlay_common::names::ENDPOINT_V4);

/// The local pod with address `addr` (network order), if the agent knows where it is.
#[inline(always)]
pub fn endpoint_v4(addr: [u8; 4]) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { ENDPOINT_V4.get(&addr).copied() }
}

/// Rewrites the Ethernet header for the pod (from the bridge's MAC to the pod's) and moves the
/// packet into the pod's namespace. `None` when the packet has no Ethernet header to rewrite.
#[inline(always)]
pub fn redirect_to_endpoint(ctx: &TcContext, cfg: &Config, ep: &Endpoint) -> Option<i32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: a checked pointer, used before any helper call.
    unsafe {
        (*eth).dst = ep.mac;
        (*eth).src = cfg.bridge_mac;
    }
    // SAFETY: plain helper call; flags must be 0.
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// Sends a packet for a local pod without an endpoint to the pod bridge, where the kernel
/// resolves the pod's MAC and the bridge forwards it to the pod's port; marked, so that
/// `pod_ingress` knows it for our delivery (`BRIDGE_DELIVERY_MARK`).
#[inline(always)]
pub fn redirect_to_bridge(ctx: &TcContext, cfg: &Config) -> i32 {
    ctx.set_mark(BRIDGE_DELIVERY_MARK);
    fib::redirect_neigh(cfg.bridge_ifindex)
}
