//! The node's own settings: `CONFIG`, a one-entry array the agent writes and every program reads.
//!
//! Until the agent writes an entry with [`CONFIG_F_READY`], the programs pass every packet
//! untouched, so attaching before configuring is harmless. Interface indexes are written as the
//! agent attaches to (or loses) each device; 0 means "not present".
//!
//! Byte orders are given per field: addresses and MACs are as on the wire, numbers are host
//! order (the programs convert when they write headers).

use bytemuck::{Pod, Zeroable};

/// Index of the single `CONFIG` entry.
pub const CONFIG_INDEX: u32 = 0;
/// Capacity of `CONFIG`.
pub const CONFIG_LEN: u32 = 1;

/// The entry is complete; without it the programs pass everything.
pub const CONFIG_F_READY: u32 = 1 << 0;
/// Some peers are routed directly (host-gw, or VXLAN with DirectRouting): accept unencapsulated
/// traffic for local pods from direct peers on the external interface (see `ROUTE_F_DIRECT`).
pub const CONFIG_F_DIRECT: u32 = 1 << 1;
/// No VXLAN at all (host-gw): decapsulation leaves VXLAN-looking frames to the kernel.
pub const CONFIG_F_NO_VXLAN: u32 = 1 << 2;
/// The running kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (probed by the agent at load time):
/// decapsulation then also clears the sender's UDP-tunnel GSO state, as the kernel's own tunnel
/// receive does.
pub const CONFIG_F_DECAP_L4_UDP: u32 = 1 << 3;

/// Value of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// `CONFIG_F_*` bits, host order.
    pub flags: u32,
    /// VXLAN network identifier (24 bits), host order.
    pub vni: u32,
    /// ifindex of the external interface: encapsulated packets leave through it.
    pub underlay_ifindex: u32,
    /// ifindex of the pod bridge (cni0/docker0); 0 while it does not exist, when decapsulated
    /// packets for pods are dropped and counted.
    pub bridge_ifindex: u32,
    /// ifindex of the host device (`ovl0`, address `<subnet>.0/32`); 0 while absent.
    pub host_ifindex: u32,
    /// The external interface's address (flannel's vxlan `SrcAddr`): the outer IPv4 source,
    /// the masquerade's address, and an outer destination decapsulation accepts. Network order.
    pub local_ip: [u8; 4],
    /// The PublicIP this node publishes in its lease (`--public-ip`; equal to `local_ip`
    /// without it): peers send VXLAN to it, so decapsulation accepts it as outer destination
    /// too (a NAT in front of the node may or may not rewrite it to `local_ip`), and refuses
    /// it, like `local_ip`, as an inner source. Network order.
    pub public_ip: [u8; 4],
    /// This node's pod subnet (the lease), network address, network order. Its first address
    /// (`.0`) is the host device's; the next one is the bridge's gateway.
    pub subnet: [u8; 4],
    /// Netmask of `subnet`, network order.
    pub subnet_mask: [u8; 4],
    /// The cluster network (flannel's `Network`), network order.
    pub network: [u8; 4],
    /// Netmask of `network`, network order.
    pub network_mask: [u8; 4],
    /// This node's VtepMAC (published in the lease): outer frames' inner Ethernet source, and
    /// the only inner destination decapsulation accepts.
    pub vtep_mac: [u8; 6],
    /// MAC address of the host device: the destination MAC of frames delivered to it.
    pub host_mac: [u8; 6],
    /// VXLAN UDP destination port, host order.
    pub port: u16,
    /// UDP source port range for the flow hash, host order (`[min, max)`, as the kernel does).
    pub src_port_min: u16,
    pub src_port_max: u16,
    /// MAC address of the pod bridge: the source MAC of frames delivered straight into a pod
    /// (what the pod would see from its gateway).
    pub bridge_mac: [u8; 6],
    /// Non-zero while the XDP program decapsulates on the external interface: it writes this
    /// value into the metadata of each frame it decapsulated, and `underlay_ingress` takes a
    /// frame as decapsulated only with it (a random value per load, so no other source of
    /// metadata can pass for it). Host order.
    pub xdp_cookie: u32,
    /// The generation of the node's routing as the agent last saw it: bumped at every route,
    /// rule, address or link event of its namespace and at least once a second. A next hop the
    /// programs cached (`route::NextHopV4`) under another generation is looked up again.
    /// Host order; 0 = no caching.
    pub route_gen: u32,
}
const _: () = assert!(size_of::<Config>() == 76);

impl Config {
    #[must_use]
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_F_READY != 0
    }

    /// `addr` (network order) is one of this node's underlay addresses: the interface's or
    /// the published PublicIP.
    #[must_use]
    #[inline(always)]
    pub fn is_own_address(&self, addr: [u8; 4]) -> bool {
        addr == self.local_ip || addr == self.public_ip
    }

    /// `addr` (network order) is one of the host's own addresses in this node's subnet: the
    /// host device's `<subnet>.0` or the pod bridge's gateway `<subnet>.1`. What is sent to them
    /// goes to the host stack, never into a pod.
    #[must_use]
    #[inline(always)]
    pub fn is_host_subnet_address(&self, addr: [u8; 4]) -> bool {
        let gateway = u32::from_be_bytes(self.subnet)
            .wrapping_add(1)
            .to_be_bytes();
        addr == self.subnet || addr == gateway
    }

    #[must_use]
    pub const fn accepts_direct(&self) -> bool {
        self.flags & CONFIG_F_DIRECT != 0
    }

    #[must_use]
    pub const fn vxlan_enabled(&self) -> bool {
        self.flags & CONFIG_F_NO_VXLAN == 0
    }

    #[must_use]
    pub const fn decap_clears_tunnel_gso(&self) -> bool {
        self.flags & CONFIG_F_DECAP_L4_UDP != 0
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::Config {}
}
