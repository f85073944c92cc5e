//! Drop events: a sample of dropped packets, written by the data path into the `DROP_EVENTS`
//! ring buffer where drops are counted, read by `overlay-agent monitor`.
//!
//! Counters say *that* drops rise; an event says *which* packet: the reason, the device, the
//! packet's addresses and ports, and for VXLAN the outer addresses and VNI as well. Events are
//! rate-limited per CPU ([`DROP_EVENTS_PER_SEC`]), so a flood of drops costs one per-CPU map
//! update per packet and never fills the ring; how many were left out since the last event
//! travels in the next one ([`DropEvent::suppressed`]).
//!
//! Byte orders: addresses as on the wire, everything else host order.

use bytemuck::{Pod, Zeroable};

/// Size of `DROP_EVENTS` in bytes (a power of two, a multiple of the page size): room for
/// about 4,000 events while nobody reads.
pub const DROP_EVENTS_BYTES: u32 = 256 * 1024;
/// At most this many events per CPU per second; the rest are only counted.
pub const DROP_EVENTS_PER_SEC: u32 = 64;
/// Capacity of `DROP_EVENT_BUDGET` (one per-CPU slot).
pub const DROP_EVENT_BUDGET_LEN: u32 = 1;

/// The packet was IPv4: `saddr`, `daddr`, `proto` are valid.
pub const EVENT_F_IPV4: u32 = 1 << 0;
/// `sport`/`dport` are valid (TCP or UDP).
pub const EVENT_F_PORTS: u32 = 1 << 1;
/// The packet was VXLAN to our port: `outer_saddr`, `outer_daddr` and `vni` describe the outer
/// headers, the 5-tuple the inner packet.
pub const EVENT_F_VXLAN: u32 = 1 << 2;

/// One dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` at the drop (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// The drop reason (`counters::Reason` value).
    pub reason: u32,
    /// The device whose hook dropped it.
    pub ifindex: u32,
    /// Packet length in bytes.
    pub len: u32,
    /// `EVENT_F_*`.
    pub flags: u32,
    /// Source and destination of the (inner, for VXLAN) IPv4 packet.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Outer IPv4 source and destination of a VXLAN frame.
    pub outer_saddr: [u8; 4],
    pub outer_daddr: [u8; 4],
    /// TCP/UDP ports of the (inner) packet, host order.
    pub sport: u16,
    pub dport: u16,
    /// IP protocol of the (inner) packet.
    pub proto: u8,
    pub _pad: [u8; 3],
    /// VNI of a VXLAN frame.
    pub vni: u32,
    /// Drops on this CPU left out by the rate limit since the previous event.
    pub suppressed: u32,
}
const _: () = assert!(size_of::<DropEvent>() == 56);
// The ring buffer hands out 8-byte aligned records.
const _: () = assert!(size_of::<DropEvent>().is_multiple_of(8));

/// The per-CPU rate limit's state (`DROP_EVENT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DropEventBudget {
    /// Start of the current one-second window (`bpf_ktime_get_ns`).
    pub window_start_ns: u64,
    /// Events sent in the window.
    pub sent: u32,
    /// Drops not sent since the last event.
    pub suppressed: u32,
}
const _: () = assert!(size_of::<DropEventBudget>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DropEventBudget {}
}
