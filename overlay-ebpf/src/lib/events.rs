//! Sampled drop events (`DROP_EVENTS`, layout in `overlay_common::events`), emitted from the one
//! place drops are counted (`counters::verdict`), so every drop reason is covered.
//!
//! Only the drop path runs this: a per-CPU budget of `DROP_EVENTS_PER_SEC` events per second
//! decides (one map lookup and a clock read per dropped packet); a packet over budget is only
//! counted as suppressed. Within budget the packet's headers are read with
//! `bpf_skb_load_bytes`, which works whatever the program did to the packet before and
//! whether or not the headers are in the linear part. A full ring (nobody reading) loses the
//! event, never the verdict.

use core::mem::offset_of;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::TcContext,
};
use overlay_common::{
    counters::Reason,
    events::{
        DROP_EVENT_BUDGET_LEN, DROP_EVENTS_BYTES, DROP_EVENTS_PER_SEC, DropEvent, DropEventBudget,
        EVENT_F_IPV4, EVENT_F_PORTS, EVENT_F_VXLAN,
    },
    nat::NS_PER_S,
    wire::{
        DEFAULT_VXLAN_PORT, ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN,
        VXLAN_HLEN,
    },
};

use crate::lib::{
    hdr::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr},
    maps::config,
};

#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(DROP_EVENTS_BYTES, 0);
named!(DROP_EVENTS, overlay_common::names::DROP_EVENTS);

#[map]
static DROP_EVENT_BUDGET: PerCpuArray<DropEventBudget> =
    PerCpuArray::with_max_entries(DROP_EVENT_BUDGET_LEN, 0);
named!(DROP_EVENT_BUDGET, overlay_common::names::DROP_EVENT_BUDGET);

/// Emits an event for a packet dropped for `reason`, if this CPU's budget allows.
#[inline(always)]
pub fn drop_event(ctx: &TcContext, reason: Reason) {
    let Some(budget) = DROP_EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array; programs are not preempted on one CPU.
    let budget = unsafe { &mut *budget };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget.window_start_ns) >= NS_PER_S {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= DROP_EVENTS_PER_SEC {
        budget.suppressed = budget.suppressed.wrapping_add(1);
        return;
    }
    let mut event = DropEvent {
        ktime_ns: now,
        reason: reason.index(),
        // SAFETY: reading a field of the context the program was given.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: ctx.len(),
        suppressed: budget.suppressed,
        ..DropEvent::default()
    };
    describe(ctx, &mut event);
    if DROP_EVENTS.output::<DropEvent>(&event, 0).is_ok() {
        budget.sent += 1;
        budget.suppressed = 0;
    }
}

/// Fills in the addresses and ports of the packet (and, for VXLAN to our port, of its inner
/// packet). Leaves fields zero where the packet ends early or is not IPv4.
#[inline(always)]
fn describe(ctx: &TcContext, event: &mut DropEvent) {
    let Ok(proto) = ctx.load::<[u8; 2]>(offset_of!(EthHdr, proto)) else {
        return;
    };
    if proto != ETH_P_IP {
        return;
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN) else {
        return;
    };
    let port = config().map_or(DEFAULT_VXLAN_PORT, |cfg| cfg.port);
    let mut ip = ip;
    let mut l4 = ETH_HLEN + IPV4_HLEN;
    if ip.ver_ihl == Ipv4Hdr::VER_IHL_NO_OPTIONS
        && ip.proto == IPPROTO_UDP
        && let Ok(dport) = ctx.load::<[u8; 2]>(l4 + offset_of!(UdpHdr, dest))
        && dport == port.to_be_bytes()
    {
        event.flags |= EVENT_F_VXLAN;
        event.outer_saddr = ip.saddr;
        event.outer_daddr = ip.daddr;
        if let Ok(vni) = ctx.load::<[u8; 4]>(l4 + UDP_HLEN + offset_of!(VxlanHdr, vni)) {
            event.vni = u32::from_be_bytes([0, vni[0], vni[1], vni[2]]);
        }
        let inner = l4 + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
        match (
            ctx.load::<[u8; 2]>(inner - ETH_HLEN + offset_of!(EthHdr, proto)),
            ctx.load::<Ipv4Hdr>(inner),
        ) {
            (Ok(inner_proto), Ok(inner_ip)) if inner_proto == ETH_P_IP => {
                ip = inner_ip;
                l4 = inner + IPV4_HLEN;
            }
            _ => return,
        }
    }
    event.flags |= EVENT_F_IPV4;
    event.saddr = ip.saddr;
    event.daddr = ip.daddr;
    event.proto = ip.proto;
    // Ports only where the header has no options, so they sit right after it.
    if ip.ver_ihl == Ipv4Hdr::VER_IHL_NO_OPTIONS
        && (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP)
        && let Ok(ports) = ctx.load::<[u8; 4]>(l4)
    {
        event.flags |= EVENT_F_PORTS;
        event.sport = u16::from_be_bytes([ports[0], ports[1]]);
        event.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
}
