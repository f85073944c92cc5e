//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates) for IPv4 headers
//! the programs build or patch in place. Header-only, so plain arithmetic beats a helper call.

use crate::lib::hdr::Ipv4Hdr;

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of an option-less IPv4 header's ten 16-bit words, checksum included.
#[inline(always)]
fn ipv4_sum(h: &Ipv4Hdr) -> u16 {
    let w = |hi: u8, lo: u8| u32::from(u16::from_be_bytes([hi, lo]));
    fold(
        w(h.ver_ihl, h.tos)
            + w(h.tot_len[0], h.tot_len[1])
            + w(h.id[0], h.id[1])
            + w(h.frag_off[0], h.frag_off[1])
            + w(h.ttl, h.proto)
            + w(h.check[0], h.check[1])
            + w(h.saddr[0], h.saddr[1])
            + w(h.saddr[2], h.saddr[3])
            + w(h.daddr[0], h.daddr[1])
            + w(h.daddr[2], h.daddr[3]),
    )
}

/// The checksum field for `h` (computed with `h.check` taken as zero).
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> [u8; 2] {
    let mut copy = *h;
    copy.check = [0; 2];
    (!ipv4_sum(&copy)).to_be_bytes()
}

/// Whether an option-less IPv4 header's checksum verifies (the sum of all words is 0xffff).
#[inline(always)]
pub fn ipv4_checksum_ok(h: &Ipv4Hdr) -> bool {
    ipv4_sum(h) == 0xffff
}

/// The checksum after one 16-bit header word changed from `old` to `new` (RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`), for in-place TTL and ECN rewrites.
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let hc = u16::from_be_bytes(check);
    let sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    (!fold(sum)).to_be_bytes()
}
