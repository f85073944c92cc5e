//! The names of the eBPF object's programs and maps: the one place they are spelled.
//!
//! The kernel and aya know a map or program by the name of its `static` or function in the eBPF
//! crate; the agent, the tests and the benchmark look them up by these constants. aya's
//! `#[map]`/`#[classifier]` macros take only literals, so the eBPF crate checks at compile time
//! that each of its maps and programs is named as here (`overlay-ebpf`'s `named!`), and a rename
//! on either side fails the build instead of a lookup at run time.

/// tcx ingress of the external interface: decapsulation, direct delivery, masquerade replies.
pub const UNDERLAY_INGRESS: &str = "underlay_ingress";
/// tcx egress of the external interface: counting, masquerade of kernel-routed pod traffic.
pub const UNDERLAY_EGRESS: &str = "underlay_egress";
/// Native XDP on the external interface: decapsulation before GRO.
pub const UNDERLAY_XDP: &str = "underlay_xdp";
/// tcx ingress of the pod bridge: encapsulation or direct routing of pod traffic.
pub const POD_EGRESS: &str = "pod_egress";
/// tcx egress of the pod bridge: notes connections the kernel delivers into pods from outside.
pub const POD_INGRESS: &str = "pod_ingress";
/// tcx ingress of a pod's host-side veth (`--pod-hook port`).
pub const POD_PORT_EGRESS: &str = "pod_port_egress";
/// tcx egress of the host device: the same for host traffic.
pub const HOST_EGRESS: &str = "host_egress";
/// tcx ingress of the GRO device (`ovl-gro`): delivers reassembled VXLAN fragments for us that
/// the kernel's VXLAN socket decapsulated, drops everything else it delivers.
pub const GRO_DEVICE_INGRESS: &str = "gro_device_ingress";
/// Run once at load to learn whether the kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`.
pub const PROBE_DECAP_L4_UDP: &str = "probe_decap_l4_udp";
/// Every TC program the agent attaches.
pub const TC_PROGRAMS: [&str; 7] = [
    UNDERLAY_INGRESS,
    UNDERLAY_EGRESS,
    POD_EGRESS,
    POD_INGRESS,
    POD_PORT_EGRESS,
    HOST_EGRESS,
    GRO_DEVICE_INGRESS,
];

/// The node's settings (`config::Config`).
pub const CONFIG: &str = "CONFIG";
/// Remote subnet → node (`route`).
pub const ROUTE_V4: &str = "ROUTE_V4";
/// Member nodes' PublicIPs, reference-counted (`route`).
pub const NODE_V4: &str = "NODE_V4";
/// Local pod → host-side veth and MAC (`endpoint`).
pub const ENDPOINT_V4: &str = "ENDPOINT_V4";
/// Flows the kernel forwarded for a local pod, whose replies go back through it (`kernel_flow`).
pub const KERNEL_FLOW_V4: &str = "KERNEL_FLOW_V4";
/// Connections delivered into a local pod from elsewhere, whose replies are no new flows
/// (`kernel_flow`).
pub const KERNEL_FLOW_IN_V4: &str = "KERNEL_FLOW_IN_V4";
/// The filter of pairs of addresses that had such flows (`kernel_flow`).
pub const KERNEL_FLOW_PAIRS_V4: &str = "KERNEL_FLOW_PAIRS_V4";
/// What `pod_port_egress` last passed on to the bridge, per CPU, for `pod_egress` (`pod`).
pub const POD_PORT_PASSED: &str = "POD_PORT_PASSED";
/// Peer PublicIP → the next hop towards it, cached by the programs (`route`).
pub const NEXT_HOP_V4: &str = "NEXT_HOP_V4";
/// Per-CPU counters by reason (`counters`).
pub const COUNTERS: &str = "COUNTERS";
/// Sampled drop events, a ring buffer (`events`).
pub const DROP_EVENTS: &str = "DROP_EVENTS";
/// The per-CPU budget of drop events (`events`).
pub const DROP_EVENT_BUDGET: &str = "DROP_EVENT_BUDGET";
/// Masquerade settings (`nat`).
pub const NAT_CONFIG: &str = "NAT_CONFIG";
/// Destinations never masqueraded (`nat`).
pub const NAT_EXCLUDE_V4: &str = "NAT_EXCLUDE_V4";
/// The masquerade flow table, original direction, of assured flows (`nat`).
pub const SNAT_V4_CT: &str = "SNAT_V4_CT";
/// The masquerade flow table, reply direction, of assured flows (`nat`).
pub const SNAT_V4_REV: &str = "SNAT_V4_REV";
/// The masquerade flow table, original direction, of flows not assured yet (`nat`).
pub const SNAT_V4_CT_NEW: &str = "SNAT_V4_CT_NEW";
/// The masquerade flow table, reply direction, of flows not assured yet (`nat`).
pub const SNAT_V4_REV_NEW: &str = "SNAT_V4_REV_NEW";
/// Fragments of masqueraded datagrams after the first (`nat`).
pub const SNAT_V4_FRAG: &str = "SNAT_V4_FRAG";
/// The masquerade maps that hold state worth keeping across a restart.
pub const NAT_MAPS: [&str; 6] = [
    NAT_CONFIG,
    NAT_EXCLUDE_V4,
    SNAT_V4_CT,
    SNAT_V4_REV,
    SNAT_V4_CT_NEW,
    SNAT_V4_REV_NEW,
];
/// The masquerade's flow tables, assured flows first (`NAT_MAPS` without the settings).
pub const NAT_FLOW_MAPS: [&str; 4] = [SNAT_V4_CT, SNAT_V4_REV, SNAT_V4_CT_NEW, SNAT_V4_REV_NEW];

/// Whether two names are equal; `const`, for the eBPF crate's compile-time checks.
#[must_use]
pub const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_compares_whole_names() {
        assert!(same(ROUTE_V4, "ROUTE_V4"));
        assert!(!same(ROUTE_V4, "ROUTE_V"));
        assert!(!same(ROUTE_V4, "ROUTE_V6"));
    }
}
