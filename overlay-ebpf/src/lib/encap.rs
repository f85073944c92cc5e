//! VXLAN encapsulation, shared by the programs that send to peers (`pod_egress`, `host_egress`).
//!
//! Rewrites `eth | IPv4 ...` into `eth | IPv4 | UDP | VXLAN | eth' | IPv4 ...`: the 50 bytes go
//! between the existing Ethernet header and the packet, with `bpf_skb_adjust_room(BPF_ADJ_ROOM_MAC)`
//! and the ENCAP flags, which also record the inner header offsets, set `skb->encapsulation` and
//! add `SKB_GSO_UDP_TUNNEL` to GSO packets, so a TSO super-packet is segmented later (by the NIC
//! or in software) as a UDP tunnel, each segment getting its own outer headers.
//! `BPF_F_ADJ_ROOM_FIXED_GSO` keeps the MSS: pods and the host device already use the tunnel MTU
//! (underlay MTU − 50), so segments come out exactly underlay-sized; without it the kernel would
//! shrink the MSS by another 50 bytes, and it refuses UDP GSO packets outright.
//!
//! The outer headers mirror what a stock flannel.1 device sends (flannel-compat.md §4, checked
//! against a capture): IPv4 from our interface address to the peer's PublicIP, TTL 64, DF clear,
//! TOS = inner ECN only, a random ID; UDP from a flow-hash source port to the VXLAN port with a
//! zero checksum (RFC 7348 allows it and Linux accepts it; flannel.1 fills it in, which we cannot
//! for GSO packets); VXLAN flags 0x08 and the VNI; inner Ethernet from our VtepMAC to the peer's.
//! The outer Ethernet header is left as it is: `bpf_redirect_neigh` fills both MACs from the
//! kernel's neighbour table for the next hop towards the peer (see [`redirect_to_underlay`]).

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_MASK, BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    route::RemoteNode,
    wire::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, OUTER_TTL, VXLAN_FLAGS_I, VXLAN_OVERHEAD},
};

use crate::lib::{
    csum::ipv4_checksum,
    fib,
    hdr::{EthHdr, Ipv4Hdr, UdpHdr, VxlanEncap, VxlanHdr},
    ipv4::ecn_encapsulate,
    maps::{cache_next_hop, cached_next_hop, route_gen},
    ptr::skb_mark,
};

const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    // BPF_F_ADJ_ROOM_ENCAP_L2(len): the inner MAC header's length, so inner offsets are right.
    | ((ETH_HLEN as u64 & BPF_ADJ_ROOM_ENCAP_L2_MASK as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// Whether the packet still fits the underlay once encapsulated, as flannel.1's MTU
/// (underlay − 50) would decide. With a host device (whose MTU is that tunnel MTU) the kernel
/// checks against it, GSO packets segment by segment; without one, against the underlay's MTU
/// plus the overhead (GSO packets are then not checked). If the check itself fails (a device
/// just vanished) the packet goes ahead and the redirect decides.
#[inline(always)]
pub fn fits_tunnel(ctx: &TcContext, cfg: &Config) -> bool {
    if cfg.host_ifindex != 0 {
        fib::fits(ctx, cfg.host_ifindex)
    } else {
        fib::fits_with(ctx, cfg.underlay_ifindex, VXLAN_OVERHEAD as i32, 0)
    }
}

/// The UDP source port for a flow, as the kernel's `udp_flow_src_port` derives it: spread the
/// flow hash over `[min, max)` so ECMP and RSS on the underlay see one flow per inner flow.
#[inline(always)]
fn src_port(hash: u32, min: u16, max: u16) -> u16 {
    if max <= min {
        return min;
    }
    // Only the upper 16 bits matter below; fold the lower ones in (the kernel does the same).
    let hash = hash ^ (hash << 16);
    let span = u64::from(max - min);
    min + ((u64::from(hash) * span) >> 32) as u16
}

/// Encapsulates the packet (an IPv4 packet behind an Ethernet header, already validated by the
/// caller) for `peer`. `inner_tos` is the inner header's TOS, for the outer ECN field.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    cfg: &Config,
    peer: &RemoteNode,
    inner_tos: u8,
) -> Result<(), Reason> {
    let outer_len = (ctx.len() as usize) - ETH_HLEN + VXLAN_OVERHEAD;
    let Ok(outer_len) = u16::try_from(outer_len) else {
        // Only a > 64 KiB "BIG TCP" packet gets here; the UDP length field cannot carry it.
        return Err(Reason::DropEncapFailed);
    };
    // Hash the inner flow before the outer headers exist.
    // SAFETY: helper calls on our own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    // The ID only matters if the underlay fragments (DF is clear, as from flannel.1); a random
    // one avoids shared state between CPUs. GSO segments get consecutive IDs from this one.
    // SAFETY: no arguments.
    let id = unsafe { bpf_get_prandom_u32() } as u16;

    let mut hdr = VxlanEncap {
        ip: Ipv4Hdr {
            ver_ihl: Ipv4Hdr::VER_IHL_NO_OPTIONS,
            tos: ecn_encapsulate(inner_tos),
            tot_len: outer_len.to_be_bytes(),
            id: id.to_be_bytes(),
            frag_off: [0; 2],
            ttl: OUTER_TTL,
            proto: IPPROTO_UDP,
            check: [0; 2],
            saddr: cfg.local_ip,
            daddr: peer.public_ip,
        },
        udp: UdpHdr {
            source: src_port(hash, cfg.src_port_min, cfg.src_port_max).to_be_bytes(),
            dest: cfg.port.to_be_bytes(),
            len: (outer_len - IPV4_HLEN as u16).to_be_bytes(),
            check: [0; 2],
        },
        vxlan: VxlanHdr {
            flags: [VXLAN_FLAGS_I, 0, 0, 0],
            vni: ((cfg.vni & 0x00ff_ffff) << 8).to_be_bytes(),
        },
        eth: EthHdr {
            dst: peer.vtep_mac,
            src: cfg.vtep_mac,
            proto: ETH_P_IP,
        },
    };
    hdr.ip.check = ipv4_checksum(&hdr.ip);

    ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| Reason::DropEncapFailed)?;
    ctx.store(ETH_HLEN, &hdr, 0)
        .map_err(|_| Reason::DropEncapFailed)
}

/// Sends the encapsulated packet for `peer` out of the underlay device. The next hop comes from
/// our own FIB lookup where it is certain ([`outer_next_hop`]), so the kernel only fills the
/// outer MACs from its neighbour table (resolving it if needed); otherwise the kernel routes
/// the outer destination itself, as before. Either way the outer packet goes where the kernel
/// would send a packet from our address to the peer's PublicIP.
#[inline(always)]
pub fn redirect_to_underlay(ctx: &TcContext, cfg: &Config, peer: &RemoteNode, tos: u8) -> i32 {
    let next_hop = outer_next_hop(ctx, cfg, peer, tos);
    fib::redirect_neigh_to(cfg.underlay_ifindex, next_hop)
}

/// The next hop of the outer packet to `peer`: cached per peer for the current routing
/// generation, else looked up (`fib::next_hop_out`) and cached. The lookup cost about 200 ns
/// per packet (BPF run-time statistics), a third of the encapsulating program's time. One
/// entry per PublicIP is exact because every other input of that lookup is fixed for a peer:
/// the source is `local_ip` (a change rewrites `CONFIG`, which bumps the generation), the
/// protocol UDP, and the outer TOS carries only ECN bits, which routing ignores. Marked packets
/// are never cached (the lookup declines them). The agent bumps the generation at every route,
/// rule, address or link event and once a second, so a changed route is followed within
/// milliseconds, and within a second even if an event were lost.
#[inline(always)]
fn outer_next_hop(ctx: &TcContext, cfg: &Config, peer: &RemoteNode, tos: u8) -> Option<[u8; 4]> {
    let route_gen = route_gen(cfg);
    if route_gen != 0
        && skb_mark(ctx) == 0
        && let Some(next_hop) = cached_next_hop(peer.public_ip, route_gen)
    {
        return Some(next_hop);
    }
    let outer = fib::Flow {
        proto: IPPROTO_UDP,
        tos: ecn_encapsulate(tos),
        saddr: cfg.local_ip,
        daddr: peer.public_ip,
    };
    let next_hop = fib::next_hop_out(ctx, cfg.underlay_ifindex, &outer)?;
    if route_gen != 0 {
        cache_next_hop(peer.public_ip, route_gen, next_hop);
    }
    Some(next_hop)
}
