//! VXLAN decapsulation on the underlay's ingress (`underlay_ingress`).
//!
//! Hook: tcx ingress of the external interface, before the IP stack. A frame is ours when it is
//! option-less IPv4 to our interface address, UDP to the configured VXLAN port; everything else
//! (including what we cannot recognise, like non-first fragments or IP options, which Linux never
//! puts on VXLAN) goes on to the kernel untouched. Ours is then either delivered or dropped and
//! counted: there is no VXLAN socket on this node, so the kernel would only drop it anyway.
//!
//! Checks, in order: not a fragment (no reassembly here), outer IPv4 checksum (the IP layer that
//! would verify it runs after us), lengths (the frame holds what IP and UDP announce, which
//! holds VXLAN + inner Ethernet + an IPv4 header), VXLAN flags exactly 0x08 with zero reserved
//! bits (as the kernel's VXLAN device demands without GBP/GPE), our VNI, an outer source that is
//! a member node's PublicIP (`NODE_V4`), inner destination MAC = our VtepMAC, inner IPv4.
//!
//! Delivery of the inner packet `d`:
//! - `d` = our subnet's `.0` (the host device's address, which flannel gives flannel.1) or its
//!   gateway `.1` (the bridge's own address, which `bpf_redirect_neigh` cannot reach: it would
//!   ARP for it on the bridge) → ingress of the host device, MACs rewritten so the stack takes it
//!   as addressed to that device; the host stack does the rest, as after flannel.1. With
//!   `--ip-masq`, a reply to `.0` of a flow masqueraded into the cluster (`lib::nat`,
//!   `NAT_E_TO_CLUSTER`) is first translated back to its original destination: a host socket's
//!   address goes on to the host device likewise, an outside host's is routed out directly.
//! - other `d` in our subnet → `bpf_redirect_neigh` to the pod bridge: the kernel resolves the
//!   pod's MAC and the bridge forwards to its port. This replaces the kernel's forwarding hop, so
//!   the inner TTL is decremented here (a packet whose TTL would expire goes to the host device
//!   instead, so the kernel answers ICMP time exceeded).
//! - anything else → dropped (`DropNotLocal`): peers only send us our subnet.
//!
//! ECN follows RFC 6040 as the kernel's `INET_ECN_decapsulate`: an outer CE mark is copied into
//! an ECN-capable inner packet; a CE-marked frame whose inner packet is not ECN-capable is
//! dropped. The outer UDP checksum is not verified (zero is allowed; the inner packet carries its
//! own checksums). The 50 bytes go with `bpf_skb_adjust_room(-50, BPF_ADJ_ROOM_MAC)`:
//! `BPF_F_ADJ_ROOM_FIXED_GSO` keeps a GSO packet's MSS, which describes the inner TCP segments
//! and must not grow by the 50 bytes removed; `BPF_F_ADJ_ROOM_DECAP_L3_IPV4` states the new
//! network protocol.
//!
//! GSO: GSO packets arrive here when the underlay passes the sender's unsegmented, as veth does
//! (a NIC normally delivers single frames: with no VXLAN socket, no UDP-tunnel GRO kicks in). Kernel 6.18 offers no way to
//! clear what the sender's encapsulation left on such a packet (`skb->encapsulation`,
//! `SKB_GSO_UDP_TUNNEL`; the `BPF_F_ADJ_ROOM_DECAP_L4_UDP` flag that does is newer), so the pod
//! bridge, which has no encapsulation offloads, segments it in software on the way to the pod:
//! correct, but slower than flannel.1, whose receive path clears that state. Redirecting
//! straight into the pod (`bpf_redirect_peer` with an endpoint map) would avoid it.

use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    wire::{
        ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_FLAGS_I, VXLAN_HLEN,
        VXLAN_OVERHEAD,
    },
};

use crate::lib::{
    counters::count,
    csum::ipv4_checksum_ok,
    hdr::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr},
    ipv4::{ECN_CE, ECN_MASK, ECN_NOT_ECT, decrement_ttl, eth_ipv4, set_ce},
    maps::{config, in_subnet, is_member},
    nat,
    ptr::{ptr_at, pull_headers},
};

const UDP_OFF: usize = ETH_HLEN + IPV4_HLEN;
const VXLAN_OFF: usize = UDP_OFF + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
/// Headers read by the checks, from the outer Ethernet header to the end of the inner IPv4 one.
const HEADERS_LEN: usize = INNER_IP_OFF + IPV4_HLEN;
/// The smallest outer IPv4 total length that holds VXLAN and an inner IPv4 header.
const MIN_OUTER_IP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN;

const DECAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64;

/// Where a decapsulated packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A local pod, through the bridge.
    Pod,
    /// The host stack, through the host device's ingress.
    Host,
    /// The host stack because the TTL expires here (the kernel answers ICMP time exceeded).
    HostTtl,
}

/// The body of `underlay_ingress`: `Ok(verdict)` or the drop reason.
#[inline(always)]
pub fn try_underlay_ingress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    if !cfg.vxlan_enabled() {
        // host-gw: no VXLAN on this node; the kernel has no socket for it either.
        return Ok(TC_ACT_OK);
    }
    // Short packets fail the checks below.
    pull_headers(ctx, HEADERS_LEN);

    // Recognise VXLAN for us; pass everything else.
    let Some((_, ip)) = eth_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY (all reads below): pointers come from `eth_ipv4` or `ptr_at`, used before any
    // helper moves data.
    let ip = unsafe { *ip };
    if ip.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS
        || ip.proto != IPPROTO_UDP
        || ip.daddr != cfg.local_ip
    {
        return Ok(TC_ACT_OK);
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    if frag & Ipv4Hdr::OFFSET_MASK != 0 {
        // A later fragment has no UDP header to recognise.
        return Ok(TC_ACT_OK);
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, UDP_OFF) else {
        return Ok(TC_ACT_OK);
    };
    let udp = unsafe { *udp };
    if udp.dest != cfg.port.to_be_bytes() {
        return Ok(TC_ACT_OK);
    }

    // VXLAN to our port: from here on, deliver or drop.
    if frag & Ipv4Hdr::MF_OFFSET_MASK != 0 {
        return Err(Reason::DropFragment);
    }
    if !ipv4_checksum_ok(&ip) {
        return Err(Reason::DropBadChecksum);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if tot_len + ETH_HLEN > ctx.len() as usize || tot_len < MIN_OUTER_IP_LEN {
        return Err(Reason::DropTruncated);
    }
    if usize::from(u16::from_be_bytes(udp.len)) != tot_len - IPV4_HLEN {
        return Err(Reason::DropMalformed);
    }
    let Some(vxlan) = ptr_at::<VxlanHdr>(ctx, VXLAN_OFF) else {
        return Err(Reason::DropTruncated);
    };
    let vxlan = unsafe { *vxlan };
    if vxlan.flags != [VXLAN_FLAGS_I, 0, 0, 0] || vxlan.vni[3] != 0 {
        return Err(Reason::DropMalformed);
    }
    if u32::from_be_bytes(vxlan.vni) >> 8 != cfg.vni {
        return Err(Reason::DropWrongVni);
    }
    if !is_member(ip.saddr) {
        return Err(Reason::DropUnknownPeer);
    }
    let Some(inner_eth) = ptr_at::<EthHdr>(ctx, INNER_ETH_OFF) else {
        return Err(Reason::DropTruncated);
    };
    let inner_eth = unsafe { *inner_eth };
    if inner_eth.dst != cfg.vtep_mac {
        return Err(Reason::DropWrongMac);
    }
    if inner_eth.proto != ETH_P_IP {
        return Err(Reason::DropNotIpv4);
    }
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF) else {
        return Err(Reason::DropTruncated);
    };
    let (ver_ihl, tos, ttl, daddr) = unsafe {
        (
            (*inner_ip).ver_ihl,
            (*inner_ip).tos,
            (*inner_ip).ttl,
            (*inner_ip).daddr,
        )
    };
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return Err(Reason::DropMalformed);
    }

    let target = target(cfg, daddr, ttl)?;
    match target {
        Target::Pod if cfg.bridge_ifindex == 0 => return Err(Reason::DropNoBridge),
        Target::Host | Target::HostTtl if cfg.host_ifindex == 0 => {
            return Err(Reason::DropNoHostDevice);
        }
        _ => {}
    }

    // Inner header rewrites, while the pointer is valid (before the packet shrinks).
    if ip.tos & ECN_MASK == ECN_CE {
        match tos & ECN_MASK {
            ECN_NOT_ECT => return Err(Reason::DropEcn),
            ECN_CE => {}
            // SAFETY: `inner_ip` is a checked pointer, still valid.
            _ => unsafe { set_ce(inner_ip) },
        }
    }
    if target == Target::Pod {
        // SAFETY: as above; `target` guarantees ttl > 1.
        unsafe { decrement_ttl(inner_ip) };
    }

    ctx.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .map_err(|_| Reason::DropDecapFailed)?;

    if target == Target::Pod {
        count(Reason::DecapPod, ctx.len());
        // SAFETY: NULL parameters are allowed (the kernel does the FIB lookup).
        return Ok(unsafe { bpf_redirect_neigh(cfg.bridge_ifindex, ptr::null_mut(), 0, 0) } as i32);
    }
    if target == Target::Host && daddr == cfg.subnet {
        // A reply to a flow masqueraded into the cluster: translated back, and either routed
        // out (a verdict) or left for the host stack.
        let verdict = nat::reverse_decapsulated(ctx, cfg)?;
        if verdict != TC_ACT_OK {
            return Ok(verdict);
        }
    }
    deliver_to_host(ctx, cfg, inner_eth.src, target)
}

/// Where the inner destination `daddr` (network order) is delivered, or why it is dropped.
#[inline(always)]
fn target(cfg: &Config, daddr: [u8; 4], ttl: u8) -> Result<Target, Reason> {
    let host_addr = cfg.subnet;
    let gateway = (u32::from_be_bytes(cfg.subnet).wrapping_add(1)).to_be_bytes();
    if daddr == host_addr || daddr == gateway {
        Ok(Target::Host)
    } else if in_subnet(daddr, cfg.subnet, cfg.subnet_mask) {
        Ok(if ttl <= 1 {
            Target::HostTtl
        } else {
            Target::Pod
        })
    } else {
        Err(Reason::DropNotLocal)
    }
}

/// Hands the decapsulated packet to the host stack as if the host device had received it: the
/// destination MAC becomes the device's own (so the stack sees PACKET_HOST), the source the
/// sender's VtepMAC (what flannel.1 would show).
#[inline(always)]
fn deliver_to_host(
    ctx: &TcContext,
    cfg: &Config,
    peer_vtep_mac: [u8; 6],
    target: Target,
) -> Result<i32, Reason> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(Reason::DropDecapFailed);
    };
    // SAFETY: checked pointer, fresh after the resize.
    unsafe {
        (*eth).dst = cfg.host_mac;
        (*eth).src = peer_vtep_mac;
    }
    count(
        if target == Target::HostTtl {
            Reason::StackTtl
        } else {
            Reason::DecapHost
        },
        ctx.len(),
    );
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(cfg.host_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}
