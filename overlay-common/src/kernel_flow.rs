//! Flows the kernel forwarded for a local pod, and connections into one: `KERNEL_FLOW_V4` and
//! `KERNEL_FLOW_IN_V4`.
//!
//! A pod's packet that the kernel routed itself (rather than `pod_egress` sending it on) has
//! been through netfilter, where kube-proxy's DNAT may have turned a Service address into an
//! endpoint's. Its replies must go back through the kernel too, so that conntrack turns the
//! endpoint's address back into the Service's: delivered straight into the pod, they would
//! carry an address the pod never sent to, and its socket would drop them (UDP) or reset the
//! connection (TCP). The programs that see such packets leave (`host_egress`, `underlay_egress`)
//! file the flow here; decapsulation and direct delivery hand a packet whose tuple is filed to
//! the host device instead of the pod (`to_stack_kernel_flow`).
//!
//! The other way round, a connection into a pod through a port published on the node (DNATed
//! from the node's address) is filed by `pod_ingress` as the kernel sends it into the pod;
//! `pod_egress` then leaves the pod's replies to the kernel (`to_stack_kernel_flow`), which
//! gives them the node's address back, rather than masquerading them or sending them to a
//! peer itself. Direct delivery and decapsulation file a connection from outside the cluster
//! network that they send straight into a pod (a stock host-gw node's host, whose source is
//! its interface address; an outside host's packets forwarded over VXLAN by a member without
//! `--ip-masq`), whose replies `pod_egress` then sends on untranslated.
//!
//! The key's `way` tells the three kinds apart. The outbound kind lives in `KERNEL_FLOW_V4`,
//! the two inbound kinds in `KERNEL_FLOW_IN_V4`, so that one kind cannot evict the other
//! ([`KERNEL_FLOW_IN_V4_CAPACITY`]).
//!
//! Byte orders: addresses and ports as on the wire.

use bytemuck::{Pod, Zeroable};

/// Capacity of `KERNEL_FLOW_V4` (an LRU map, written by the programs): as many flows as the
/// assured masquerade table holds.
pub const KERNEL_FLOW_V4_CAPACITY: u32 = 65_536;

/// Capacity of `KERNEL_FLOW_IN_V4`, the inbound connections (an LRU map as well). A table of
/// their own: anyone who can reach a published port or route to a pod can open inbound
/// connections by the thousand, and in a shared LRU they would evict the Service flows of
/// `KERNEL_FLOW_V4`, whose replies would then go straight into the pod with the endpoint's
/// address (reset or dropped by the pod's socket). A flood now evicts only other inbound
/// connections.
pub const KERNEL_FLOW_IN_V4_CAPACITY: u32 = 65_536;

/// Slots of `KERNEL_FLOW_PAIRS_V4`, the filter in front of `KERNEL_FLOW_V4`: an array of
/// `u32` (1: a flow of a pair with this slot was filed), 128 KiB.
pub const KERNEL_FLOW_PAIRS_LEN: u32 = 16_384;

/// The slot in `KERNEL_FLOW_PAIRS_V4` of the pair (`pod`, `remote`) (addresses as on the
/// wire): the top bits of a multiplicative hash of both.
#[must_use]
pub const fn pair_slot(pod: [u8; 4], remote: [u8; 4]) -> u32 {
    let h = u32::from_be_bytes(pod).wrapping_mul(0x9e37_79b1)
        ^ u32::from_be_bytes(remote).wrapping_mul(0x85eb_ca77);
    h >> (32 - KERNEL_FLOW_PAIRS_LEN.trailing_zeros())
}
const _: () = assert!(KERNEL_FLOW_PAIRS_LEN.is_power_of_two());

/// [`KernelFlowKeyV4::way`] of a local pod's flow that the kernel forwarded out (a Service
/// connection after kube-proxy's DNAT): packets for the pod go to the host device. The zero
/// value, which entries filed before the field existed carry too.
pub const KERNEL_FLOW_OUT: u8 = 0;
/// [`KernelFlowKeyV4::way`] of a connection the kernel delivered into a local pod from
/// elsewhere than this node's subnet (a port published on the node, DNATed to the pod): the
/// pod's packets go on through the kernel, never masqueraded.
pub const KERNEL_FLOW_IN: u8 = 1;
/// [`KernelFlowKeyV4::way`] of a connection from outside the cluster network that direct
/// delivery or decapsulation sent straight into a local pod (a stock host-gw node's host,
/// whose source is its interface address; an outside host forwarded over VXLAN by a member
/// without `--ip-masq`): no conntrack saw it, so the pod's replies are sent on by the data
/// path, untranslated, as MASQUERADE leaves a tracked connection's replies.
pub const KERNEL_FLOW_IN_DIRECT: u8 = 2;

/// The key of `KERNEL_FLOW_V4` and `KERNEL_FLOW_IN_V4`: a flow between a local pod and a remote end, as the kernel
/// sent it out (after any DNAT) or delivered it in, oriented from the pod. Ports are 0 for a
/// protocol without them; an ICMP echo has its identifier as `pod_port` and 0 as
/// `remote_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct KernelFlowKeyV4 {
    pub pod: [u8; 4],
    pub remote: [u8; 4],
    pub pod_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub proto: u8,
    /// Which way the connection went and who carried it: [`KERNEL_FLOW_OUT`],
    /// [`KERNEL_FLOW_IN`] or [`KERNEL_FLOW_IN_DIRECT`] (once the first of three reserved bytes,
    /// always 0: pinned entries of earlier agents read as `KERNEL_FLOW_OUT`, which they are).
    pub way: u8,
    pub _reserved: [u8; 2],
}
const _: () = assert!(size_of::<KernelFlowKeyV4>() == 16);

impl KernelFlowKeyV4 {
    #[must_use]
    pub const fn new(
        pod: [u8; 4],
        remote: [u8; 4],
        pod_port: [u8; 2],
        remote_port: [u8; 2],
        proto: u8,
        way: u8,
    ) -> Self {
        Self {
            pod,
            remote,
            pod_port,
            remote_port,
            proto,
            way,
            _reserved: [0; 2],
        }
    }
}

/// Value of `KERNEL_FLOW_V4` and `KERNEL_FLOW_IN_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelFlowV4 {
    /// When the flow was filed (`bpf_ktime_get_coarse_ns`): nothing in the agent reads it; it
    /// tells an operator dumping the map (`bpftool map dump`) how old each entry is.
    pub created_ns: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::KernelFlowKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelFlowV4 {}
}
