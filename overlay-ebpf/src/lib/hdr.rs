//! Wire headers as `#[repr(C)]` byte-array structs: alignment 1, no padding, no enums (a packet
//! may hold any bit pattern), multi-byte fields kept in network order as `[u8; N]` so a
//! conversion is always explicit at the use site.

use core::mem::offset_of;

use overlay_common::wire::{ETH_HLEN, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN, VXLAN_OVERHEAD};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub ver_ihl: u8,
    /// DSCP (high 6 bits) and ECN (low 2 bits).
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    /// Flags (DF 0x4000, MF 0x2000) and fragment offset (low 13 bits).
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    /// `version == 4 && ihl == 5` as one byte.
    pub const VER_IHL_NO_OPTIONS: u8 = 0x45;
    /// More-fragments flag and fragment offset mask, in the host-order `frag_off` word.
    pub const MF_OFFSET_MASK: u16 = 0x3fff;
    /// The more-fragments flag alone.
    pub const MF: u16 = 0x2000;
    pub const OFFSET_MASK: u16 = 0x1fff;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// The TCP header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset (high nibble) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

impl TcpHdr {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    /// Bytes up to and including the checksum: what a translation must be able to rewrite.
    pub const THROUGH_CHECK: usize = offset_of!(TcpHdr, check) + 2;
}

/// The ICMP header as echo request and reply carry it; errors have 4 unused bytes where
/// `id` and `seq` are, followed by the packet they quote.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

impl IcmpHdr {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETERPROB: u8 = 12;
}

/// RFC 7348: flags byte (I = 0x08), 3 reserved bytes, 24-bit VNI, 1 reserved byte.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: [u8; 4],
    pub vni: [u8; 4],
}

/// Everything encapsulation inserts after the outer Ethernet header, written in one store.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanEncap {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub eth: EthHdr,
}

const _: () = {
    assert!(size_of::<EthHdr>() == ETH_HLEN);
    assert!(size_of::<Ipv4Hdr>() == IPV4_HLEN);
    assert!(size_of::<UdpHdr>() == UDP_HLEN);
    assert!(size_of::<TcpHdr>() == 20);
    assert!(size_of::<IcmpHdr>() == 8);
    assert!(TcpHdr::THROUGH_CHECK == 18);
    assert!(size_of::<VxlanHdr>() == VXLAN_HLEN);
    assert!(size_of::<VxlanEncap>() == VXLAN_OVERHEAD);
};
