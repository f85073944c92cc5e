//! Address rewrites with every checksum they touch (IPv4 header, L4 pseudo-header) and the
//! TTL of the forwarding hop. Called by `snat`, `reverse` and `icmp`.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use overlay_common::counters::Reason;

use super::{IP_CHECK_OFF, IP_TTL_OFF};
use crate::lib::hdr::Ipv4Hdr;

/// Where an address rewrite also patches the L4 checksum: `(offset, bpf_l4_csum_replace flags)`.
/// A plain pair rather than an `Option`: a `None` leaves its payload undefined, and the
/// verifier refuses to see an uninitialised register stored (`!read_ok`).
pub(super) type L4Csum = (usize, u64);

/// No L4 checksum to patch (offset 0 is the Ethernet header, never an L4 checksum).
pub(super) const NO_L4_CSUM: L4Csum = (0, 0);

/// Rewrites the address at `off` (source or destination) from `old` to `new` with the IPv4
/// checksum, the L4 checksum at `l4_csum` (`(offset, flags)`, pseudo-header) unless it is
/// [`NO_L4_CSUM`], and
/// decrements the TTL when `hop`.
#[inline(always)]
pub(super) fn rewrite_addr(
    ctx: &TcContext,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4_csum: L4Csum,
    hop: bool,
    ip: &Ipv4Hdr,
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
