//! The overlay data path. One module per attach point, helpers per feature under `lib/`:
//!
//! - `underlay`: tcx ingress and egress on the node's external interface (decapsulation).
//! - `pod`: tcx ingress on the pod bridge (encapsulation of pod traffic to peers).
//! - `host`: tcx egress on the host device (encapsulation of host traffic to peers).
//! - `probe`: not attached; run once by the agent to learn what the kernel supports.
//!
//! `lib/`: `maps` (CONFIG, ROUTE_V4, NODE_V4), `counters` (COUNTERS and the verdict/drop-reason
//! plumbing), `events` (sampled drop events, DROP_EVENTS), `encap`/`decap` (VXLAN, XDP decapsulation), `endpoint` (delivery into local pods), `direct` (host-gw and DirectRouting), `hdr`, `ptr`,
//! `csum`, `ipv4` (packet access and rewrites).
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
    pub mod maps;
    pub mod nat;
    pub mod ptr;
}
mod host;
mod pod;
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
