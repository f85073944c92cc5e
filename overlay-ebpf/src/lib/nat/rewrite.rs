//! Address and port rewrites with every checksum they touch (IPv4 header, L4 pseudo-header)
//! and the TTL of the forwarding hop. Called by `snat`, `reverse` and `icmp`.
//!
//! Two ways to write ([`Writes`]): through helpers (`bpf_skb_store_bytes`,
//! `bpf_l3_csum_replace`), or in place by direct packet access with the IPv4 checksum patched
//! by hand (RFC 1624). In place saves five helper calls on a translated TCP packet (address,
//! port, TTL and two header checksum updates), but the verifier gives every program that writes
//! the packet directly a prologue that makes a cloned skb's head writable on each run: so only
//! the programs that write in place anyway (the pod hooks, `underlay_ingress`) use it, and
//! `underlay_egress` and `host_egress`, which every packet leaving the node crosses, keep the
//! helpers. The L4 checksum is always the helper's (`bpf_l4_csum_replace`): only the kernel
//! knows whether it is a full checksum or a pseudo-header sum (`CHECKSUM_PARTIAL`, as for TCP
//! from pods), which a change of port must leave alone. Either way `skb->csum` is left as the
//! helpers leave it: each stored word is compensated by its checksum field.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use overlay_common::{counters::Reason, wire::IPV4_HLEN};

use super::{IP_CHECK_OFF, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF, IP_TTL_OFF};
use crate::lib::{
    csum::{replace16, replace32},
    hdr::Ipv4Hdr,
    ptr::{ptr_at, pull_headers},
};

/// Where an address rewrite also patches the L4 checksum: `(offset, bpf_l4_csum_replace flags)`.
/// A plain pair rather than an `Option`: a `None` leaves its payload undefined, and the
/// verifier refuses to see an uninitialised register stored (`!read_ok`).
pub(super) type L4Csum = (usize, u64);

/// No L4 checksum to patch (offset 0 is the Ethernet header, never an L4 checksum).
pub(super) const NO_L4_CSUM: L4Csum = (0, 0);

/// Which address of the IPv4 header a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Addr {
    Source,
    Destination,
}

/// How a rewrite writes the packet (see the module comment). A constant at each call site.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Writes {
    /// `bpf_skb_store_bytes` and `bpf_l3_csum_replace`: for programs without direct writes.
    Helpers,
    /// Direct packet access: for programs that write the packet directly anyway.
    InPlace,
}

impl Writes {
    /// For an outbound translation: in place where it forwards (`hop`), which only the pod
    /// hooks do; the egress hooks translate what the kernel routed, through the helpers.
    #[inline(always)]
    pub(super) const fn outbound(hop: bool) -> Self {
        if hop { Self::InPlace } else { Self::Helpers }
    }
}

/// Rewrites the `addr` address from `old` to `new` with the IPv4 checksum, the L4 checksum at
/// `l4_csum` (`(offset, flags)`, pseudo-header) unless it is [`NO_L4_CSUM`], and decrements the
/// TTL when `hop` (the caller has checked it is > 1).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; every argument is a plain value"
)]
pub(super) fn rewrite_addr(
    ctx: &TcContext,
    addr: Addr,
    old: [u8; 4],
    new: [u8; 4],
    l4_csum: L4Csum,
    hop: bool,
    ip: &Ipv4Hdr,
    writes: Writes,
) -> Result<(), Reason> {
    let (old32, new32) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    let (csum_off, flags) = l4_csum;
    if csum_off != 0 {
        ctx.l4_csum_replace(
            csum_off,
            old32,
            new32,
            flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| Reason::DropNatFailed)?;
    }
    if writes == Writes::InPlace {
        return rewrite_ip_in_place(ctx, addr, old, new, hop);
    }
    let off = match addr {
        Addr::Source => IP_SADDR_OFF,
        Addr::Destination => IP_DADDR_OFF,
    };
    ctx.l3_csum_replace(IP_CHECK_OFF, old32, new32, 4)
        .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Reason::DropNatFailed)?;
    if hop {
        let old_w = [ip.ttl, ip.proto];
        let new_w = [ip.ttl - 1, ip.proto];
        ctx.l3_csum_replace(
            IP_CHECK_OFF,
            u64::from(u16::from_ne_bytes(old_w)),
            u64::from(u16::from_ne_bytes(new_w)),
            2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        ctx.store(IP_TTL_OFF, &new_w[0], 0)
            .map_err(|_| Reason::DropNatFailed)?;
    }
    Ok(())
}

/// An outbound translation's source rewrite, from `ip`'s source to `nat_addr` (the L4
/// checksum at `l4_csum` with it, as [`rewrite_addr`]), written as [`Writes::outbound`] says.
#[inline(always)]
pub(super) fn rewrite_source_out(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    nat_addr: [u8; 4],
    l4_csum: L4Csum,
    hop: bool,
) -> Result<(), Reason> {
    let writes = Writes::outbound(hop);
    rewrite_addr(
        ctx,
        Addr::Source,
        ip.saddr,
        nat_addr,
        l4_csum,
        hop,
        ip,
        writes,
    )
}

/// [`rewrite_addr`]'s IPv4 header part, in place: the address, the TTL when `hop`, and one
/// checksum write for both.
#[inline(always)]
fn rewrite_ip_in_place(
    ctx: &TcContext,
    addr: Addr,
    old: [u8; 4],
    new: [u8; 4],
    hop: bool,
) -> Result<(), Reason> {
    pull_headers(ctx, IP_OFF + IPV4_HLEN);
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(Reason::DropNatFailed)?;
    // SAFETY: a checked pointer, fresh after the last helper; the caller read this header
    // (`old` is the address there) and checked the TTL for a hop.
    unsafe {
        let mut check = replace32((*ip).check, old, new);
        match addr {
            Addr::Source => (*ip).saddr = new,
            Addr::Destination => (*ip).daddr = new,
        }
        if hop {
            let ttl_proto = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
            (*ip).ttl -= 1;
            check = replace16(check, ttl_proto, ttl_proto - 0x100);
        }
        (*ip).check = check;
    }
    Ok(())
}

/// Writes `port` at `off` (a port or ICMP identifier whose L4 checksum the caller has patched).
#[inline(always)]
pub(super) fn write_port(
    ctx: &TcContext,
    off: usize,
    port: [u8; 2],
    writes: Writes,
) -> Result<(), Reason> {
    if writes == Writes::Helpers {
        return ctx.store(off, &port, 0).map_err(|_| Reason::DropNatFailed);
    }
    pull_headers(ctx, off + 2);
    let p = ptr_at::<[u8; 2]>(ctx, off).ok_or(Reason::DropNatFailed)?;
    // SAFETY: a checked pointer, written at once.
    unsafe { *p = port };
    Ok(())
}
