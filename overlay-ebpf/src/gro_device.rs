//! `gro_device_ingress`: everything the kernel's own VXLAN receive would deliver, dropped.
//!
//! Hook: tcx ingress of the GRO device (`ovl-gro`), a kernel VXLAN device in collect-metadata
//! mode on our VXLAN port that the agent creates for one reason: the kernel's GRO aggregates
//! UDP-tunnel frames only for a port with a tunnel socket, and that device owns one. With it,
//! MTU-sized VXLAN frames are aggregated per inner flow before `underlay_ingress` runs, which
//! then checks and decapsulates the aggregate as one packet.
//!
//! The device itself must deliver nothing: the socket accepts any VNI from anyone, on every
//! interface and for both address families, and `underlay_ingress` leaves to the kernel what is
//! not VXLAN for us by its checks (outer IP options, another local address, IPv6, loopback).
//! Without the device the kernel answered those with "port unreachable"; now they surface
//! here, decapsulated, and are dropped and counted (`drop_gro_device`). The agent attaches this
//! program before it brings the device up.

use aya_ebpf::{macros::classifier, programs::TcContext};
use overlay_common::counters::Reason;

use crate::lib::counters::verdict;

#[classifier]
pub fn gro_device_ingress(ctx: TcContext) -> i32 {
    verdict(&ctx, Err(Reason::DropGroDevice))
}
named!(
    gro_device_ingress,
    overlay_common::names::GRO_DEVICE_INGRESS
);
