//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates) for IPv4 headers
//! the programs build or patch in place. Header-only, so plain arithmetic beats a helper call.

use crate::lib::{
    hdr::Ipv4Hdr,
    ptr::{Packet, ptr_at},
};

/// Most option words an IPv4 header can carry (IHL 15 − 5).
const MAX_OPTION_WORDS: usize = 10;

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

/// Whether the IPv4 header at `off` in the packet, `option_words` 32-bit words of options
/// included (≤ 10), has a checksum that verifies. `false` when the packet ends before the
/// header does.
#[inline(always)]
pub fn ipv4_header_checksum_ok(
    ctx: &impl Packet,
    h: &Ipv4Hdr,
    off: usize,
    option_words: usize,
) -> bool {
    let mut sum = u32::from(ipv4_sum(h));
    // Bounded by the IHL field's range; each word checked against the packet's end.
    for i in 0..MAX_OPTION_WORDS {
        if i >= option_words {
            break;
        }
        let Some(word) = ptr_at::<[u8; 4]>(ctx, off + size_of::<Ipv4Hdr>() + 4 * i) else {
            return false;
        };
        // SAFETY: a checked pointer, read at once.
        let w = unsafe { *word };
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    fold(sum) == 0xffff
}

/// The checksum after one 16-bit header word changed from `old` to `new` (RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`), for in-place TTL and ECN rewrites.
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let hc = u16::from_be_bytes(check);
    let sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    (!fold(sum)).to_be_bytes()
}

/// The checksum after a 32-bit field (an address, as on the wire) changed from `old` to
/// `new`: [`replace16`] for each of its two words.
#[inline(always)]
pub fn replace32(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let w = |a: [u8; 4], i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    let check = replace16(check, w(old, 0), w(new, 0));
    replace16(check, w(old, 2), w(new, 2))
}
