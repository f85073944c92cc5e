//! The IPv4 header of a packet, and in-place rewrites of it (TTL, ECN) with incremental
//! checksum updates.

use overlay_common::{
    counters::Reason,
    wire::{ETH_HLEN, ETH_P_IP},
};

use crate::lib::{
    csum::replace16,
    hdr::{EthHdr, Ipv4Hdr},
    ptr::{Packet, ptr_at},
};

/// ECN codepoints (the low two bits of the TOS byte).
pub const ECN_MASK: u8 = 0b11;
pub const ECN_NOT_ECT: u8 = 0b00;
pub const ECN_CE: u8 = 0b11;

/// The Ethernet and IPv4 headers at the start of the packet, as checked pointers (valid until
/// the next helper call that moves packet data): `None` unless the frame is IPv4 (Ethernet type
/// and version 4, header length of at least five words) and both headers lie in the linear
/// part. Callers let `None` pass; a pull of the headers into the linear part, where wanted,
/// comes before (`ptr::pull_headers`).
#[inline(always)]
pub fn eth_ipv4(ctx: &impl Packet) -> Option<(*mut EthHdr, *mut Ipv4Hdr)> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: a pointer from `ptr_at`, read before any helper moves data.
    if unsafe { (*eth).proto } != ETH_P_IP {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: a pointer from `ptr_at`, read before any helper moves data.
    let ver_ihl = unsafe { (*ip).ver_ihl };
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return None;
    }
    Some((eth, ip))
}

/// Decrements the TTL (the caller has checked it is > 1) and patches the checksum.
///
/// # Safety
/// `ip` must come from a bounds-checked `ptr_at` and be used before the next helper call that
/// moves packet data.
#[inline(always)]
pub unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller guarantees `ip` points at a whole header in the packet.
    unsafe {
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        (*ip).check = replace16((*ip).check, old, old - 0x100);
    }
}

/// Marks the packet "congestion experienced" (the caller has checked it is ECN-capable) and
/// patches the checksum.
///
/// # Safety
/// As for [`decrement_ttl`].
#[inline(always)]
pub unsafe fn set_ce(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller guarantees `ip` points at a whole header in the packet.
    unsafe {
        let old = u16::from_be_bytes([(*ip).ver_ihl, (*ip).tos]);
        (*ip).tos |= ECN_CE;
        let new = u16::from_be_bytes([(*ip).ver_ihl, (*ip).tos]);
        (*ip).check = replace16((*ip).check, old, new);
    }
}

/// RFC 6040 on decapsulation, as the kernel's `INET_ECN_decapsulate`: an outer CE mark is copied
/// into an ECN-capable inner packet (checksum patched); a CE-marked frame whose inner packet is
/// not ECN-capable must be dropped (`DropEcn`).
///
/// # Safety
/// As for [`decrement_ttl`].
#[inline(always)]
pub unsafe fn decapsulate_ecn(outer_tos: u8, inner: *mut Ipv4Hdr) -> Result<(), Reason> {
    if outer_tos & ECN_MASK != ECN_CE {
        return Ok(());
    }
    // SAFETY: the caller guarantees `inner` points at a whole header in the packet.
    unsafe {
        match (*inner).tos & ECN_MASK {
            ECN_NOT_ECT => Err(Reason::DropEcn),
            ECN_CE => Ok(()),
            _ => {
                set_ce(inner);
                Ok(())
            }
        }
    }
}

/// The outer TOS for an inner one, as the kernel's tunnels compute it with `tos 0`
/// (`INET_ECN_encapsulate`): no DSCP, the inner ECN field copied, except that CE becomes ECT(0)
/// so the marking of the inner packet is not mistaken for one made on the underlay.
#[inline(always)]
pub fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & ECN_MASK {
        ECN_CE => 0b10,
        ecn => ecn,
    }
}
