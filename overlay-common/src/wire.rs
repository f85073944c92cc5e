//! VXLAN wire constants (RFC 7348, and what a stock flannel node's `flannel.<VNI>` device sends).
//!
//! A VXLAN frame on the underlay is
//! `outer Ethernet (14) | outer IPv4 (20) | UDP (8) | VXLAN (8) | inner Ethernet (14) | inner IPv4`.
//! The 50 bytes between the outer Ethernet header and the inner IPv4 packet are what
//! encapsulation adds and decapsulation strips ([`VXLAN_OVERHEAD`]), which is why pods and the
//! host device use an MTU 50 bytes below the underlay's.

/// Ethernet header length (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// IPv4 header length without options (we never send options and only accept VXLAN without).
pub const IPV4_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// VXLAN header length.
pub const VXLAN_HLEN: usize = 8;
/// Bytes added between the outer Ethernet header and the inner IPv4 header.
pub const VXLAN_OVERHEAD: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const _: () = assert!(VXLAN_OVERHEAD == 50);

/// EtherType of IPv4, as the two bytes on the wire.
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// IP protocol numbers (the only ones the data path looks into).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// DCCP and UDP-Lite: ports where UDP has them, and a checksum over a pseudo-header with the
/// addresses at UDP's offset (6), which the masquerade patches for the address.
pub const IPPROTO_DCCP: u8 = 33;
pub const IPPROTO_UDPLITE: u8 = 136;
/// SCTP: ports where UDP has them, but a CRC32c over the SCTP packet alone, which a port
/// rewrite would invalidate and an address rewrite does not: masqueraded with its ports kept.
pub const IPPROTO_SCTP: u8 = 132;

/// The lower-case IANA keyword of IP protocol `proto`, for the common ones (logs, flow lists).
#[must_use]
pub const fn ip_proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        IPPROTO_ICMP => "icmp",
        2 => "igmp",
        4 => "ipip",
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_DCCP => "dccp",
        41 => "ipv6",
        47 => "gre",
        50 => "esp",
        51 => "ah",
        89 => "ospf",
        103 => "pim",
        112 => "vrrp",
        IPPROTO_SCTP => "sctp",
        IPPROTO_UDPLITE => "udplite",
        _ => return None,
    })
}

/// First byte of a VXLAN header: only the I flag ("VNI is valid"). The kernel drops frames with
/// any other flag or reserved bit set (no GBP/GPE here), and so do we.
pub const VXLAN_FLAGS_I: u8 = 0x08;

/// The packet mark `underlay_ingress` gives a fragment of VXLAN for us before handing it to
/// the kernel, and that `gro_device_ingress` requires (and clears) on what the GRO device's
/// socket decapsulated: reassembly keeps the first fragment's mark, and the kernel clears
/// marks of packets that cross from another namespace (a pod's), so only VXLAN that came in
/// through the underlay's program is delivered that way, not VXLAN a pod or a local process
/// sends to the node's socket. ("ovlf"; it replaces the fragment's mark, normally 0.)
pub const FRAGMENT_MARK: u32 = 0x6f76_6c66;

/// The packet mark of our own deliveries through the pod bridge: a packet for a local pod that
/// has no endpoint (yet), which `underlay_ingress` decapsulated or delivered directly and sent
/// to the bridge instead of straight into the pod. `pod_ingress`, on the bridge's egress,
/// clears it and files nothing for such a packet: its connection is not the kernel's, even if
/// the pod's endpoint was written meanwhile (the agent writes it from another CPU, and the
/// packet may wait for the bridge's neighbour entry). The endpoint map alone cannot tell.
/// ("ovlb"; a decapsulated packet's mark is normally 0, and the kernel clears marks of packets
/// that cross into the pod's namespace.)
pub const BRIDGE_DELIVERY_MARK: u32 = 0x6f76_6c62;

/// flannel's default VXLAN port (the IANA port is 4789; flannel keeps the Linux default 8472).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The UDP source port range the kernel's VXLAN device uses when none is configured (which is
/// how flanneld creates it): `net.ipv4.ip_local_port_range`, default `32768 60999`. The port is
/// `min + hash * (max - min) / 2^32`, so `max` itself is never used.
pub const DEFAULT_SRC_PORT_MIN: u16 = 32768;
pub const DEFAULT_SRC_PORT_MAX: u16 = 60999;

/// Outer IPv4 TTL: the kernel's VXLAN device with `ttl` unset uses `net.ipv4.ip_default_ttl`.
pub const OUTER_TTL: u8 = 64;
