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
    /// Outer IPv4 source, and the outer destination decapsulation accepts: the external
    /// interface's address (flannel's vxlan `SrcAddr`, which differs from PublicIP behind NAT).
    /// Network order.
    pub local_ip: [u8; 4],
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
    pub _reserved: [u8; 2],
}
const _: () = assert!(size_of::<Config>() == 60);

impl Config {
    #[must_use]
    pub const fn is_ready(&self) -> bool {
        self.flags & CONFIG_F_READY != 0
    }

    #[must_use]
    pub const fn accepts_direct(&self) -> bool {
        self.flags & CONFIG_F_DIRECT != 0
    }

    #[must_use]
    pub const fn vxlan_enabled(&self) -> bool {
        self.flags & CONFIG_F_NO_VXLAN == 0
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::Config {}
}
