//! Per-reason packet counters: one slot per [`Reason`] in a per-CPU array (`COUNTERS`), so the
//! data path counts without atomics and the agent sums the CPUs when it reports.
//!
//! Reasons in `0..16` and `32..48` count what happened to packets that went on (received, sent,
//! encapsulated, delivered, handed to the kernel); reasons in `16..32` and `48..64` are drop
//! reasons (see [`Reason::is_drop`]). Drop reasons start above every TC verdict (`TC_ACT_*` are
//! -1..=8), so a drop reason can never be mistaken for a verdict, and the values are stable:
//! they are the counter indexes.

use bytemuck::{Pod, Zeroable};

/// Packets and bytes seen for one reason on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

impl Counter {
    /// Adds another CPU's slot (the agent sums per-CPU values this way).
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Capacity of the `COUNTERS` array; leaves room for reasons added later without a map resize.
pub const COUNTERS_LEN: u32 = 64;

/// The first drop reason's value.
pub const FIRST_DROP: u32 = 16;
/// The first value of the second range of non-drop reasons (`32..48`).
pub const SECOND_NON_DROP: u32 = 32;
/// The first value of the second range of drop reasons (`48..64`).
pub const SECOND_DROP: u32 = 48;

/// Why a packet was counted. The value is the index into `COUNTERS` (and the order).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A packet arrived on the external (underlay) interface.
    UnderlayRx = 0,
    /// A packet left through the external (underlay) interface.
    UnderlayTx = 1,
    /// A packet from a local pod was encapsulated and sent to a peer.
    EncapPod = 2,
    /// A packet from the host (the host device) was encapsulated and sent to a peer.
    EncapHost = 3,
    /// A VXLAN packet was decapsulated and delivered to the pod bridge.
    DecapPod = 4,
    /// A VXLAN packet was decapsulated and delivered to the host device.
    DecapHost = 5,
    /// A pod's packet for a peer is larger than the tunnel MTU: handed to the kernel, which
    /// fragments it or answers ICMP "fragmentation needed", as with flannel.1's MTU.
    StackMtu = 6,
    /// A packet's TTL would expire on this hop: handed to the kernel, which answers ICMP
    /// "time exceeded".
    StackTtl = 7,
    // Slots 8..=12 (and drop 31): host-gw / DirectRouting.
    /// A packet from a local pod was sent unencapsulated to a direct peer (host-gw, or a
    /// DirectRouting peer on our L2 segment), next hop its PublicIP.
    DirectPod = 8,
    /// A packet from the host (the host device) was sent unencapsulated to a direct peer.
    DirectHost = 9,
    /// An unencapsulated packet from a direct peer was delivered to a local pod (bridge).
    DeliverDirectPod = 10,
    /// An unencapsulated packet from a direct peer was delivered to the host device (for the
    /// host's overlay address or the bridge's gateway address, or because its TTL expires here).
    DeliverDirectHost = 11,
    /// An unencapsulated packet for a local pod from a source that is not a direct peer (nor a
    /// member node's PublicIP): left to the kernel, whose forwarding rules decide (FORWARD).
    StackNotPeer = 12,
    // Slots 13..=15 and drops 61..=63: masquerade, taken from the top of each range.
    /// A new masqueraded flow was created (an entry in `SNAT_V4_CT_NEW` / `SNAT_V4_REV_NEW`,
    /// moved to `SNAT_V4_CT` / `SNAT_V4_REV` once assured).
    NatNewFlow = 13,
    /// A reply (or an ICMP error about a flow) was translated back to the originator's address
    /// (the pod's, or the outside source's).
    NatRev = 14,
    /// A packet was masqueraded (source translated): from a pod to outside the cluster, or from
    /// outside the cluster network to a remote pod.
    NatSnat = 15,

    /// The host sent to a cluster address that no peer's subnet covers.
    DropNoRoute = FIRST_DROP,
    /// Encapsulation failed (the kernel refused to grow the packet, e.g. an unsupported GSO
    /// type, or the result would exceed 64 KiB).
    DropEncapFailed = 17,
    /// A VXLAN frame (UDP to our port, for our address) ends before its inner IPv4 header:
    /// cut short, or IP/UDP lengths too small for VXLAN.
    DropTruncated = 18,
    /// A VXLAN frame with inconsistent headers: UDP length not matching the IP length, VXLAN
    /// flags or reserved bits set, or an inner IPv4 header the kernel would refuse (version,
    /// header length, header checksum, a total length shorter than the header or longer than
    /// what the frame carries).
    DropMalformed = 19,
    // Slot 20 was `drop_fragment`: fragments now go to the kernel (`to_stack_fragment`).
    /// A VXLAN frame whose outer IPv4 header checksum is wrong.
    DropBadChecksum = 21,
    /// A VXLAN frame with another VNI.
    DropWrongVni = 22,
    /// A VXLAN frame from an address that is not a member node's PublicIP.
    DropUnknownPeer = 23,
    /// A VXLAN frame whose inner Ethernet destination is not our VtepMAC.
    DropWrongMac = 24,
    /// A VXLAN frame whose inner frame is not IPv4 (ARP, IPv6, ...).
    DropNotIpv4 = 25,
    /// A decapsulated packet for an address outside this node's subnet.
    DropNotLocal = 26,
    /// A decapsulated packet for a pod while there is no pod bridge.
    DropNoBridge = 27,
    /// A decapsulated packet for the host (or whose TTL expires) while there is no host device.
    DropNoHostDevice = 28,
    /// Decapsulation failed (the kernel refused to shrink the packet).
    DropDecapFailed = 29,
    /// The outer header says "congestion experienced" but the inner packet is not ECN-capable
    /// (RFC 6040: drop, as the kernel's tunnels do).
    DropEcn = 30,
    /// An unencapsulated packet from a direct peer for a local pod with a bad IPv4 header
    /// (checksum, or a total length the frame does not hold): the kernel would drop it too.
    DropDirectMalformed = 31,
    // Slots 32..=39: delivery straight into pods, XDP decapsulation, pickup at pods' veths,
    // fragments, what the GRO device's socket decapsulated, and the masquerade's close window.
    /// A VXLAN packet was decapsulated and delivered straight into a local pod (`ENDPOINT_V4`,
    /// `bpf_redirect_peer`); `decap_pod` counts those that took the bridge instead.
    DecapEndpoint = 32,
    /// An unencapsulated packet from a direct peer was delivered straight into a local pod;
    /// `deliver_direct_pod` counts those that took the bridge instead.
    DeliverDirectEndpoint = 33,
    /// A reply to a masqueraded flow was delivered straight into its pod (of those counted in
    /// `nat_rev`).
    NatRevEndpoint = 34,
    /// A VXLAN frame was decapsulated by the XDP program, before GRO (counted per frame; the
    /// frames then reach `underlay_ingress`, possibly aggregated).
    XdpDecap = 35,
    /// A pod's packet was finished at its host-side veth (`pod_port_egress`, `--pod-hook
    /// port`), in front of the bridge: counted besides what was done with it (`encap_pod`,
    /// `direct_pod`, `nat_snat`), with its length as the pod sent it.
    PodPort = 36,
    /// The first fragment of a VXLAN datagram for us (an underlay path with a smaller MTU
    /// fragmented it; we send with DF clear, as flannel.1 does): handed to the kernel, which
    /// reassembles the datagram for the GRO device's socket (`decap_gro_device`).
    StackFragment = 37,
    /// VXLAN that the GRO device's socket decapsulated (datagrams the kernel reassembled from
    /// fragments, or VXLAN for us that arrived on another interface) passed every check of
    /// `underlay_ingress` and was delivered (counted besides `decap_*`).
    DecapGroDevice = 38,
    /// A reply FIN or RST of an assured masqueraded TCP flow whose sequence number lies
    /// outside the window past the pod's last acknowledgment (`NAT_CLOSE_WINDOW`): translated
    /// and delivered (the pod's kernel judges it), but the flow is not closed (counted besides
    /// `nat_rev`). Many of these are spoofed resets from the underlay.
    NatCloseOutOfWindow = 39,
    // Slots 40..=43: flows the kernel forwarded for local pods, or delivered into them
    // (`KERNEL_FLOW_V4`).
    /// A local pod's flow that the kernel forwarded (after netfilter, e.g. kube-proxy's DNAT
    /// of a Service address) was filed in `KERNEL_FLOW_V4`, so that its replies go back
    /// through the kernel (counted once per flow, at its first packet).
    KernelFlowNew = 40,
    /// A packet of a flow the kernel forwarded (`KERNEL_FLOW_V4`) was left to the kernel, so
    /// that its conntrack undoes the flow's NAT: for a local pod, handed to the host device
    /// instead of the pod (a Service endpoint's reply gets the Service address back); from a
    /// local pod (`pod_egress`), neither masqueraded nor sent to a peer (a reply through a port
    /// published on the node gets the node's address back).
    StackKernelFlow = 41,
    /// A pod's packet whose destination netfilter rewrote between its veth and the bridge
    /// (with `br_netfilter`, kube-proxy's DNAT of a Service address runs there) was handed to
    /// the kernel's forwarding, which keeps the flow in conntrack (`pod_egress`).
    StackDnat = 42,
    /// With `--ip-masq`, a local pod's reply in a connection direct delivery sent into it from
    /// a member node's own address (a stock host-gw node's host, `KERNEL_FLOW_V4`) was
    /// forwarded out of the external interface untranslated, as MASQUERADE leaves the replies
    /// of a tracked connection (`pod_egress`).
    NatInboundReply = 43,
    // Drops 48..=60: what a member node, a pod or a hostile underlay must not get through,
    // taken from the bottom of the second drop range.
    /// A VXLAN frame from a member node whose inner source address is in the cluster network
    /// but not in that node's own subnet (another node's pods, this node's own pods, or a
    /// subnet no node holds): a member only speaks for its own subnet, and for sources outside
    /// the cluster network that it forwards, except this node's own address.
    DropInnerSource = 48,
    /// A pod's UDP datagram to a member node's VXLAN port: masqueraded, it would carry that
    /// node's own address and pass for this node's tunnel traffic (a pod injecting packets
    /// into other nodes), so it is never translated.
    DropPodVxlan = 49,
    /// A frame the kernel's VXLAN socket of the GRO device (`ovl-gro`) decapsulated that was
    /// not for us: to another local address, over IPv6, or before the agent configured the
    /// data path. (What was for us but fails a check counts under that check's reason.)
    DropGroDevice = 50,
    /// A packet to masquerade whose L4 header (TCP, ICMP, or the ports of UDP, DCCP, UDP-Lite,
    /// SCTP) is cut short (it would leak the pod's address untranslated).
    DropNatMalformed = 61,
    /// Rewriting a packet for masquerade failed (the kernel refused a checksum or store helper).
    DropNatFailed = 62,
    /// No free translated port for a new flow after `NAT_PORT_TRIES` attempts; for a
    /// protocol whose ports are kept (DCCP, UDP-Lite, SCTP) or that has none (GRE, ...), its
    /// one reply tuple held by another pod's flow.
    DropNatExhausted = 63,
}

impl Reason {
    /// Every reason, in index order (what the agent reports).
    pub const ALL: [Self; 49] = [
        Self::UnderlayRx,
        Self::UnderlayTx,
        Self::EncapPod,
        Self::EncapHost,
        Self::DecapPod,
        Self::DecapHost,
        Self::StackMtu,
        Self::StackTtl,
        Self::DirectPod,
        Self::DirectHost,
        Self::DeliverDirectPod,
        Self::DeliverDirectHost,
        Self::StackNotPeer,
        Self::NatNewFlow,
        Self::NatRev,
        Self::NatSnat,
        Self::DropNoRoute,
        Self::DropEncapFailed,
        Self::DropTruncated,
        Self::DropMalformed,
        Self::DropBadChecksum,
        Self::DropWrongVni,
        Self::DropUnknownPeer,
        Self::DropWrongMac,
        Self::DropNotIpv4,
        Self::DropNotLocal,
        Self::DropNoBridge,
        Self::DropNoHostDevice,
        Self::DropDecapFailed,
        Self::DropEcn,
        Self::DropDirectMalformed,
        Self::DecapEndpoint,
        Self::DeliverDirectEndpoint,
        Self::NatRevEndpoint,
        Self::XdpDecap,
        Self::PodPort,
        Self::StackFragment,
        Self::DecapGroDevice,
        Self::NatCloseOutOfWindow,
        Self::KernelFlowNew,
        Self::StackKernelFlow,
        Self::StackDnat,
        Self::NatInboundReply,
        Self::DropInnerSource,
        Self::DropPodVxlan,
        Self::DropGroDevice,
        Self::DropNatMalformed,
        Self::DropNatFailed,
        Self::DropNatExhausted,
    ];

    /// The stable name a user sees in the agent's counter report.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnderlayRx => "underlay_rx",
            Self::UnderlayTx => "underlay_tx",
            Self::EncapPod => "encap_pod",
            Self::EncapHost => "encap_host",
            Self::DecapPod => "decap_pod",
            Self::DecapHost => "decap_host",
            Self::StackMtu => "to_stack_mtu",
            Self::StackTtl => "to_stack_ttl",
            Self::DirectPod => "direct_pod",
            Self::DirectHost => "direct_host",
            Self::DeliverDirectPod => "deliver_direct_pod",
            Self::DeliverDirectHost => "deliver_direct_host",
            Self::StackNotPeer => "to_stack_not_peer",
            Self::DropNoRoute => "drop_no_route",
            Self::DropEncapFailed => "drop_encap_failed",
            Self::DropTruncated => "drop_truncated",
            Self::DropMalformed => "drop_malformed",
            Self::DropBadChecksum => "drop_bad_checksum",
            Self::DropWrongVni => "drop_wrong_vni",
            Self::DropUnknownPeer => "drop_unknown_peer",
            Self::DropWrongMac => "drop_wrong_mac",
            Self::DropNotIpv4 => "drop_not_ipv4",
            Self::DropNotLocal => "drop_not_local",
            Self::DropNoBridge => "drop_no_bridge",
            Self::DropNoHostDevice => "drop_no_host_device",
            Self::DropDecapFailed => "drop_decap_failed",
            Self::DropEcn => "drop_ecn",
            Self::DropDirectMalformed => "drop_direct_malformed",
            Self::DecapEndpoint => "decap_endpoint",
            Self::DeliverDirectEndpoint => "deliver_direct_endpoint",
            Self::NatRevEndpoint => "nat_rev_endpoint",
            Self::XdpDecap => "xdp_decap",
            Self::PodPort => "pod_port",
            Self::StackFragment => "to_stack_fragment",
            Self::DecapGroDevice => "decap_gro_device",
            Self::NatCloseOutOfWindow => "nat_close_out_of_window",
            Self::KernelFlowNew => "kernel_flow_new",
            Self::StackKernelFlow => "to_stack_kernel_flow",
            Self::StackDnat => "to_stack_dnat",
            Self::NatInboundReply => "nat_inbound_reply",
            Self::DropInnerSource => "drop_inner_source",
            Self::DropPodVxlan => "drop_pod_vxlan",
            Self::DropGroDevice => "drop_gro_device",
            Self::NatNewFlow => "nat_new_flow",
            Self::NatRev => "nat_rev",
            Self::NatSnat => "nat_snat",
            Self::DropNatMalformed => "drop_nat_malformed",
            Self::DropNatFailed => "drop_nat_failed",
            Self::DropNatExhausted => "drop_nat_exhausted",
        }
    }

    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }

    #[must_use]
    pub const fn is_drop(self) -> bool {
        let i = self.index();
        (i >= FIRST_DROP && i < SECOND_NON_DROP) || i >= SECOND_DROP
    }
}

// Every reason fits the array, and ALL lists each reason once, at its own index order.
const _: () = {
    assert!((Reason::ALL.len() as u32) <= COUNTERS_LEN);
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i].index() < COUNTERS_LEN);
        if i > 0 {
            assert!(Reason::ALL[i - 1].index() < Reason::ALL[i].index());
        }
        i += 1;
    }
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: `Counter` is `#[repr(C)]`, `Pod` by bytemuck's derive (no padding, any bit pattern).
    unsafe impl aya::Pod for super::Counter {}
}
