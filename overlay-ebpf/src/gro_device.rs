//! `gro_device_ingress`: what the kernel's own VXLAN receive decapsulated, checked and
//! delivered as `underlay_ingress` delivers, or dropped.
//!
//! Hook: tcx ingress of the GRO device (`ovl-gro`), a kernel VXLAN device in collect-metadata
//! mode on our VXLAN port that the agent creates because the kernel's GRO aggregates
//! UDP-tunnel frames only for a port with a tunnel socket, and that device owns one. With it,
//! MTU-sized VXLAN frames are aggregated per inner flow before `underlay_ingress` runs, which
//! then checks and decapsulates the aggregate as one packet.
//!
//! The socket also receives what `underlay_ingress` leaves to the kernel: fragmented VXLAN
//! (an underlay path with a smaller MTU fragments our datagrams, sent with DF clear as
//! flannel.1 sends them), which the kernel reassembles; and VXLAN to our port that is not for
//! us (another local address, IPv6, outer IP options) or that arrived on another interface. The
//! socket accepts any VNI from anyone, so this program takes only what is for us by the
//! tunnel metadata (outer destination one of our addresses, our VNI, a member node) and
//! passes the inner checks of `underlay_ingress` (`lib::decap::try_gro_device_ingress`); the
//! rest is dropped and counted. The agent attaches it before it brings the device up.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::lib::{counters::verdict, decap::try_gro_device_ingress};

#[classifier]
pub fn gro_device_ingress(ctx: TcContext) -> i32 {
    verdict(&ctx, try_gro_device_ingress(&ctx))
}
named!(
    gro_device_ingress,
    overlay_common::names::GRO_DEVICE_INGRESS
);
