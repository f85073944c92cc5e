//! ICMP errors about masqueraded flows, both ways: one to a translated address of ours gets
//! the packet it quotes translated back ([`icmp_error_reverse`]); one a flow's originator sends
//! leaves translated like the flow, quote included ([`icmp_error_out`]). The quoted headers'
//! checksums are patched by hand (RFC 1624). Called by `snat` and `reverse`.

use core::mem::offset_of;

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use overlay_common::{
    config::Config,
    counters::Reason,
    nat::{IPPROTO_ICMP, IPPROTO_UDP, NatConfig, NatKeyV4},
    wire::IPV4_HLEN,
};

use super::{
    L4Ports, Translated,
    flow::{self, flow_related, live_flow},
    load_l4,
    reverse::deliver,
    rewrite::{NO_L4_CSUM, rewrite_source_out},
};
use crate::lib::{
    csum::{replace16, replace32},
    hdr::{IcmpHdr, Ipv4Hdr},
};

/// An ICMP error to a translated address of ours about a translated flow: the embedded header
/// (what we sent: translated address and port → remote) is given the originator's address and
/// port back, with its own checksums, the ICMP checksum and the outer destination.
#[inline(always)]
pub(super) fn icmp_error_reverse(
    ctx: &TcContext,
    nat: &NatConfig,
    cfg: &Config,
    ip: &Ipv4Hdr,
    l4: usize,
) -> Result<i32, Reason> {
    let Some(Quoted {
        iip,
        key,
        port_off,
        inner_csum_off,
    }) = quoted(ctx, l4, ip.daddr, true)
    else {
        return Ok(TC_ACT_OK);
    };
    let Some(orig) = flow_related(nat, &key) else {
        return Ok(TC_ACT_OK);
    };
    // The quoted packet's source (us, translated) and port become the originator's again.
    let side = QuotedSide {
        addr_off: offset_of!(Ipv4Hdr, saddr),
        old_addr: iip.saddr,
        new_addr: orig.addr,
        port_off,
        old_port: key.dport,
        new_port: orig.port,
    };
    rewrite_quote(ctx, l4, inner_csum_off, &iip, &side)?;

    // The outer destination (ICMP has no pseudo-header).
    deliver(ctx, cfg, ip, orig, NO_L4_CSUM)
}

/// An ICMP error that a masqueraded flow's originator sends about a packet of that flow it
/// received (a pod answering "port unreachable" to a translated reply; an outside host
/// answering a remote pod's reply): related to the flow, as conntrack would say, so it leaves
/// translated like the flow (`nat_addr`, the outer source), and the packet it quotes (the
/// reply, addressed to the originator) gets the translated address and port back, with its own
/// checksums and the ICMP checksum. `Ok(Translated::No)` when the quoted packet belongs to no live flow
/// translated to `nat_addr` (it then goes on as it is: nothing of it was translated).
#[inline(always)]
pub(super) fn icmp_error_out(
    ctx: &TcContext,
    nat: &NatConfig,
    ip: &Ipv4Hdr,
    l4: usize,
    nat_addr: [u8; 4],
    hop: bool,
) -> Result<Translated, Reason> {
    let Some(Quoted {
        iip,
        key,
        port_off,
        inner_csum_off,
    }) = quoted(ctx, l4, ip.saddr, false)
    else {
        return Ok(Translated::No);
    };
    let now = flow::now();
    let Some(flow) = live_flow(nat, &key, nat_addr, now) else {
        return Ok(Translated::No);
    };
    // The quoted packet's destination (the originator) and port become the translated ones.
    let side = QuotedSide {
        addr_off: offset_of!(Ipv4Hdr, daddr),
        old_addr: iip.daddr,
        new_addr: nat_addr,
        port_off,
        old_port: key.sport,
        new_port: flow.port,
    };
    rewrite_quote(ctx, l4, inner_csum_off, &iip, &side)?;

    // The outer source (ICMP has no pseudo-header).
    rewrite_source_out(ctx, ip, nat_addr, NO_L4_CSUM, hop)?;
    Ok(Translated::Yes)
}

/// The packet an ICMP error quotes, as a translation needs it: its IPv4 header, the key of
/// its flow (as the flow's own packets carry it: `SNAT_V4_REV`'s for what we sent,
/// `SNAT_V4_CT`'s for what we received), where the port we translate is and where its L4
/// checksum is.
struct Quoted {
    iip: Ipv4Hdr,
    key: NatKeyV4,
    port_off: usize,
    inner_csum_off: usize,
}

/// Reads the packet quoted by the ICMP error whose header is at `l4`, once for both
/// directions: `sent_by_us` when the quoted packet went out translated (its source is `ours`,
/// the error comes back to us), else it is one the originator received (its destination is
/// `ours`). `None` when the quote is not an option-less IPv4 packet of a protocol and ICMP
/// type we translate, or is not about `ours`.
#[inline(always)]
fn quoted(ctx: &TcContext, l4: usize, ours: [u8; 4], sent_by_us: bool) -> Option<Quoted> {
    let inner = l4 + size_of::<IcmpHdr>();
    let iip: Ipv4Hdr = ctx.load(inner).ok()?;
    let our_side = if sent_by_us { iip.saddr } else { iip.daddr };
    if iip.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS || our_side != ours {
        return None;
    }
    let il4 = inner + IPV4_HLEN;
    let t = load_l4(ctx, iip.proto, il4, false)?;
    // Either way the flow's key is the quoted tuple reversed; for ICMP echo the identifier is
    // on our side: the destination of a reply to our request, the source of our request.
    let (sport, dport) = if iip.proto == IPPROTO_ICMP {
        if sent_by_us {
            if t.icmp_type != IcmpHdr::ECHO {
                return None;
            }
            ([0, 0], t.sport)
        } else {
            if t.icmp_type != IcmpHdr::ECHO_REPLY {
                return None;
            }
            (t.sport, [0, 0])
        }
    } else {
        (t.dport, t.sport)
    };
    Some(Quoted {
        iip,
        key: NatKeyV4::new(iip.daddr, iip.saddr, sport, dport, iip.proto),
        port_off: L4Ports::port_off(iip.proto, il4, sent_by_us),
        inner_csum_off: t.csum_off,
    })
}

/// The side of a packet quoted by an ICMP error that a translation rewrites: the address at
/// `addr_off` in the quoted IPv4 header (source or destination) and the port (ICMP: the
/// identifier) at `port_off` in the packet.
struct QuotedSide {
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
}

/// Rewrites `side` of the packet quoted by the ICMP error whose header is at `l4` (`iip`, the
/// quoted IPv4 header, read before): the address with the quoted header's checksum (their sum
/// stays the same, so does the ICMP checksum), the port, and, where the error carries it, the
/// quoted L4 checksum at `inner_csum_off` (pseudo-header for TCP, UDP, DCCP, UDP-Lite; a zero
/// UDP checksum stays zero; 0: none). Every other changed word moves the ICMP checksum.
#[inline(always)]
fn rewrite_quote(
    ctx: &TcContext,
    l4: usize,
    inner_csum_off: usize,
    iip: &Ipv4Hdr,
    side: &QuotedSide,
) -> Result<(), Reason> {
    let icmp_csum_off = l4 + offset_of!(IcmpHdr, check);
    let inner = l4 + size_of::<IcmpHdr>();
    let (old_a, new_a) = (side.old_addr, side.new_addr);

    let icheck = replace32(iip.check, old_a, new_a);
    ctx.store(inner + side.addr_off, &new_a, 0)
        .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(inner + offset_of!(Ipv4Hdr, check), &icheck, 0)
        .map_err(|_| Reason::DropNatFailed)?;

    // No quoted checksum covers the rewrite (`inner_csum_off` 0, see `load_l4`), or the error
    // left it out.
    if inner_csum_off != 0
        && let Ok(old_c) = ctx.load::<[u8; 2]>(inner_csum_off)
    {
        let udp_zero = iip.proto == IPPROTO_UDP && old_c == [0, 0];
        if !udp_zero {
            let mut c = replace16(
                old_c,
                u16::from_be_bytes(side.old_port),
                u16::from_be_bytes(side.new_port),
            );
            if iip.proto != IPPROTO_ICMP {
                c = replace32(c, old_a, new_a);
            }
            if iip.proto == IPPROTO_UDP && c == [0, 0] {
                c = [0xff, 0xff];
            }
            ctx.l4_csum_replace(
                icmp_csum_off,
                u64::from(u16::from_ne_bytes(old_c)),
                u64::from(u16::from_ne_bytes(c)),
                2,
            )
            .map_err(|_| Reason::DropNatFailed)?;
            ctx.store(inner_csum_off, &c, 0)
                .map_err(|_| Reason::DropNatFailed)?;
        }
    }
    if side.old_port == side.new_port {
        // Kept, or no ports at all: what sits there is not ours to write.
        return Ok(());
    }
    ctx.l4_csum_replace(
        icmp_csum_off,
        u64::from(u16::from_ne_bytes(side.old_port)),
        u64::from(u16::from_ne_bytes(side.new_port)),
        2,
    )
    .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(side.port_off, &side.new_port, 0)
        .map_err(|_| Reason::DropNatFailed)
}
