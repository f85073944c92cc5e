//! Local pods: `ENDPOINT_V4`, from a pod's IPv4 address to the host-side veth it hangs off and
//! its MAC, so that traffic for a local pod is delivered straight into the pod's namespace
//! (`bpf_redirect_peer`) instead of crossing the pod bridge's transmit path.
//!
//! The agent keeps it current from netlink: bridge ports (veths whose peer lives in another
//! namespace), the bridge's forwarding database (pod MAC → port) and the neighbour table of the
//! bridge (pod address → MAC). An address without an entry takes the bridge path
//! (`bpf_redirect_neigh` to the bridge), which also makes the kernel resolve it, so the entry
//! follows.
//!
//! Byte orders: the key is the address as on the wire; the interface index is host order.

use bytemuck::{Pod, Zeroable};

/// Capacity of `ENDPOINT_V4`: a node's subnet holds at most a few thousand pods (flannel's
/// smallest useful `SubnetLen` on a /16 is /24, a /20 subnet holds 4094). Not preallocated.
pub const ENDPOINT_V4_CAPACITY: u32 = 16_384;

/// The key of `ENDPOINT_V4`: a local pod's IPv4 address, network byte order.
pub type EndpointKeyV4 = [u8; 4];

/// Value of `ENDPOINT_V4`: where a local pod is reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// Interface index of the pod's host-side veth (a port of the pod bridge), host order.
    pub ifindex: u32,
    /// The pod's MAC address (destination MAC of frames delivered to it), as on the wire.
    pub mac: [u8; 6],
    pub _reserved: [u8; 2],
}
const _: () = assert!(size_of::<Endpoint>() == 12);

impl Endpoint {
    #[must_use]
    pub const fn new(ifindex: u32, mac: [u8; 6]) -> Self {
        Self {
            ifindex,
            mac,
            _reserved: [0; 2],
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::Endpoint {}
}
