//! Remote subnets and the nodes behind them: `ROUTE_V4` and `NODE_V4`.
//!
//! - `ROUTE_V4` is an LPM trie from a remote pod subnet to the node that holds its lease
//!   ([`RemoteNode`]): the encapsulating programs look up the inner destination address in it.
//! - `NODE_V4` is a hash of the PublicIPs of the member nodes ([`MemberNode`]): decapsulation
//!   accepts VXLAN only from these. Two leases may share a PublicIP (a node that re-leased, or
//!   two agents behind one address), so each entry counts the `ROUTE_V4` entries that point at
//!   it, and the agent removes it when the count drops to zero. Keeping the count in the map
//!   (rather than only in the agent) keeps the maps self-describing once they are pinned and
//!   outlive an agent restart.
//!
//! Byte orders: addresses are the 4 bytes as on the wire (network order), as `[u8; 4]` so the
//! layout has no alignment surprises; the LPM trie matches those bytes most significant first.

use bytemuck::{Pod, Zeroable};

/// Capacity of `ROUTE_V4`: flannel clusters reach thousands of nodes; 64 Ki leaves room for
/// clusters of ≥ 10,000 peers with several subnets each. LPM tries allocate per entry
/// (`BPF_F_NO_PREALLOC`), so an unused capacity costs nothing.
pub const ROUTE_V4_CAPACITY: u32 = 65_536;
/// Capacity of `NODE_V4`: at most one entry per route.
pub const NODE_V4_CAPACITY: u32 = ROUTE_V4_CAPACITY;

/// The data part of a `ROUTE_V4` key (the prefix length is the trie key's first field): the
/// subnet's network address, network byte order.
pub type RouteKeyV4 = [u8; 4];

/// Reach the subnet through a VXLAN tunnel to `public_ip`.
pub const ROUTE_F_VXLAN: u16 = 1 << 0;
/// Reach the subnet by routing it to `public_ip` without encapsulation (host-gw, or VXLAN's
/// DirectRouting for an L2-adjacent peer): packets keep their IP header and leave through the
/// external interface with `public_ip` as the L2 next hop. `vtep_mac` is then informational
/// (the peer's VtepMAC under DirectRouting, zero for host-gw).
pub const ROUTE_F_DIRECT: u16 = 1 << 1;

/// Value of `ROUTE_V4`: the node that holds a remote subnet's lease.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemoteNode {
    /// The node's PublicIP (outer destination), network byte order.
    pub public_ip: [u8; 4],
    /// The node's VtepMAC (inner Ethernet destination), as on the wire.
    pub vtep_mac: [u8; 6],
    /// `ROUTE_F_*` bits, host byte order.
    pub flags: u16,
}
const _: () = assert!(size_of::<RemoteNode>() == 12);

impl RemoteNode {
    /// A peer reached through VXLAN, as a stock flannel vxlan lease describes it.
    #[must_use]
    pub const fn vxlan(public_ip: [u8; 4], vtep_mac: [u8; 6]) -> Self {
        Self {
            public_ip,
            vtep_mac,
            flags: ROUTE_F_VXLAN,
        }
    }

    /// A peer reached without encapsulation, next hop `public_ip` (host-gw, DirectRouting).
    #[must_use]
    pub const fn direct(public_ip: [u8; 4], vtep_mac: [u8; 6]) -> Self {
        Self {
            public_ip,
            vtep_mac,
            flags: ROUTE_F_DIRECT,
        }
    }

    #[must_use]
    pub const fn is_vxlan(&self) -> bool {
        self.flags & ROUTE_F_VXLAN != 0
    }

    #[must_use]
    pub const fn is_direct(&self) -> bool {
        self.flags & ROUTE_F_DIRECT != 0
    }
}

/// The key of `NODE_V4`: a member node's PublicIP, network byte order.
pub type NodeKeyV4 = [u8; 4];

/// Value of `NODE_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MemberNode {
    /// How many `ROUTE_V4` entries point at this node (≥ 1 while the entry exists).
    pub routes: u32,
}
const _: () = assert!(size_of::<MemberNode>() == 4);

/// Capacity of `NEXT_HOP_V4`, an LRU map: the peers a node sends to at once. Beyond it the
/// least recently used entries make room, and their next hops are looked up again.
pub const NEXT_HOP_V4_CAPACITY: u32 = 4096;

/// Value of `NEXT_HOP_V4` (key: a peer's PublicIP, network order): the IPv4 next hop the kernel's
/// FIB gave for the VXLAN outer packet to that peer, and the routing generation
/// (`Config::route_gen`) it was looked up under. Written only by the programs, whole (a hash map
/// update replaces the element), so a reader never sees the next hop of one generation with
/// another's number. The same pair caches a masqueraded flow's next hop in its `SNAT_V4_CT`
/// entry (`nat::NatEntryV4::route`), written there as one 8-byte word for the same reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHopV4 {
    pub route_gen: u32,
    /// Network order.
    pub next_hop: [u8; 4],
}
const _: () = assert!(size_of::<NextHopV4>() == 8);

#[cfg(feature = "user")]
mod user {
    use std::net::Ipv4Addr;

    use aya::maps::lpm_trie::Key;

    use super::{MemberNode, RemoteNode, RouteKeyV4};

    // SAFETY: both are `#[repr(C)]` and `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for RemoteNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MemberNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHopV4 {}

    /// The `ROUTE_V4` key of `addr/prefix_len`. Host bits of `addr` must be zero (the agent
    /// passes `Ipv4Net::network()`); the trie would ignore them on lookup but keep them in the
    /// key, so two spellings of one subnet would be two entries.
    #[must_use]
    pub fn route_key(addr: Ipv4Addr, prefix_len: u8) -> Key<RouteKeyV4> {
        Key::new(u32::from(prefix_len), addr.octets())
    }

    impl RemoteNode {
        #[must_use]
        pub fn public_ip(&self) -> Ipv4Addr {
            Ipv4Addr::from(self.public_ip)
        }
    }
}

#[cfg(feature = "user")]
pub use user::route_key;
