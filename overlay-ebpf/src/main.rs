//! The overlay data path. One module per attach point, helpers per feature under `lib/`:
//!
//! - `underlay`: tcx ingress and egress on the node's external interface (decapsulation).
//! - `pod`: tcx ingress on the pod bridge (encapsulation of pod traffic to peers).
//! - `pod_ingress`: tcx egress on the pod bridge (notes connections the kernel delivers into
//!   pods from outside the cluster, whose replies are the kernel's).
//! - `host`: tcx egress on the host device (encapsulation of host traffic to peers).
//! - `gro_device`: tcx ingress on the GRO device (delivers the reassembled fragments of VXLAN
//!   for us that the kernel's VXLAN socket decapsulated, drops everything else it took).
//! - `probe`: not attached; run once by the agent to learn what the kernel supports.
//!
//! `lib/`, features as small libraries (Cilium's `bpf/lib/` in miniature): `maps` (CONFIG,
//! ROUTE_V4, NODE_V4), `counters` (COUNTERS, the one verdict point with its drop reasons, and
//! `Step`, how a stage passes a packet on or settles it), `events` (sampled drop events,
//! DROP_EVENTS), `encap`/`decap` (VXLAN, XDP decapsulation), `endpoint` (delivery into local
//! pods), `direct` (host-gw and DirectRouting), `nat/` (masquerade, split by job), `fib` (MTU
//! checks, `bpf_redirect_neigh`, the host hand-off, FIB lookups); packet access: `hdr`
//! (header structs), `ptr`, `csum`, `ipv4`. Entry files call `lib/`; `lib/` modules call each
//! other and `overlay_common` only. Every map and program name is checked against
//! `overlay_common::names` (`named!`).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference, as aya's own examples do: a key is built once on \
              the stack and never copied"
)]

/// Checks at compile time that the map or program `$item` is called as `$name` says
/// (`overlay_common::names`, the names the agent, tests and benchmark look up). aya's macros
/// take the name from the item itself, so this is where both spellings meet.
macro_rules! named {
    ($item:ident, $name:path) => {
        const _: () = {
            let _ = &$item;
            assert!(
                overlay_common::names::same(stringify!($item), $name),
                concat!(stringify!($item), " is not named as ", stringify!($name))
            );
        };
    };
}

mod lib {
    pub mod counters;
    pub mod csum;
    pub mod decap;
    pub mod direct;
    pub mod encap;
    pub mod endpoint;
    pub mod events;
    pub mod fib;
    pub mod hdr;
    pub mod ipv4;
    pub mod kernel_flow;
    pub mod maps;
    pub mod nat;
    pub mod ptr;
}
mod gro_device;
mod host;
mod pod;
mod pod_ingress;
mod probe;
mod underlay;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
