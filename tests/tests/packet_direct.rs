//! Packet tests of the direct branches (host-gw, VXLAN DirectRouting): the eBPF
//! programs run on crafted frames through `BPF_PROG_TEST_RUN` (aya's `TestRun`) with a
//! `ROUTE_V4` entry flagged DIRECT, and the tests check the bytes out, the verdict and the
//! per-reason counters.
//!
//! Root only (loading BPF programs needs it); they fail, never skip, without it. Run with
//! `cargo xtask build-ebpf && cargo test -p overlay-tests --test packet_direct -- --test-threads=1`.
//! The object is `$OVERLAY_EBPF_OBJECT` or `target/bpfel-unknown-none/release/overlay`.
//!
//! As in `packet_vxlan`: a redirect only shows as `TC_ACT_REDIRECT` (the target and the MACs
//! `bpf_redirect_neigh` writes are not visible), so where a packet went is told by the counters.
//! The test run builds its skb on the namespace's loopback device, whose MAC is all zeros: a
//! frame to 00:00:00:00:00:00 is `PACKET_HOST`, any other unicast MAC `PACKET_OTHERHOST`.

use std::net::Ipv4Addr;

use overlay_common::names;
use overlay_common::{
    config::{CONFIG_F_DIRECT, CONFIG_F_NO_VXLAN, CONFIG_F_READY, Config},
    counters::Reason,
    endpoint::Endpoint,
    route::RemoteNode,
    wire::BRIDGE_DELIVERY_MARK,
};
use overlay_tests::packet::{
    self, BRIDGE_IFINDEX, BRIDGE_MAC, ETH_P_IP, GW_MAC, HOST_IFINDEX, HOST_MAC, IPPROTO_UDP,
    Loaded, POD_MAC, SRC_PORT_MAX, SRC_PORT_MIN, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    UNDERLAY_IFINDEX, VXLAN_PORT, checksum, ipv4_packet, set_endpoint, udp_datagram,
    with_ttl_decremented,
};

/// The destination MAC that makes a test-run frame `PACKET_HOST` (loopback's address).
const TO_US: [u8; 6] = [0; 6];
/// Another host's MAC: the frame was only overheard (`PACKET_OTHERHOST`).
const NOT_US: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x77];
const PEER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x02];
const VTEP_A: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x01];
const VTEP_C: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x03];

/// Our node A and its peers: B direct (same segment), C through VXLAN (another segment).
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const A_SUBNET: Ipv4Addr = Ipv4Addr::new(172, 7, 1, 0);
const B_SUBNET: Ipv4Addr = Ipv4Addr::new(172, 7, 2, 0);
const C_SUBNET: Ipv4Addr = Ipv4Addr::new(172, 7, 3, 0);
const A_POD: Ipv4Addr = Ipv4Addr::new(172, 7, 1, 5);
const B_POD: Ipv4Addr = Ipv4Addr::new(172, 7, 2, 5);
const C_POD: Ipv4Addr = Ipv4Addr::new(172, 7, 3, 5);

/// The object, configured as node A with `flags`, B routed directly, C through VXLAN.
fn node_a(flags: u32) -> Loaded {
    let mut dp = Loaded::new("packet_direct");
    dp.set_config(Config {
        flags: CONFIG_F_READY | flags,
        vni: 1,
        underlay_ifindex: UNDERLAY_IFINDEX,
        bridge_ifindex: BRIDGE_IFINDEX,
        host_ifindex: HOST_IFINDEX,
        local_ip: A_IP.octets(),
        public_ip: A_IP.octets(),
        subnet: A_SUBNET.octets(),
        subnet_mask: [255, 255, 255, 0],
        network: [172, 7, 0, 0],
        network_mask: [255, 255, 0, 0],
        vtep_mac: VTEP_A,
        host_mac: HOST_MAC,
        port: VXLAN_PORT,
        src_port_min: SRC_PORT_MIN,
        src_port_max: SRC_PORT_MAX,
        bridge_mac: BRIDGE_MAC,
        xdp_cookie: 0,
        route_gen: 0,
    });
    for (subnet, node, member) in [
        (B_SUBNET, RemoteNode::direct(B_IP.octets(), [0; 6]), B_IP),
        (C_SUBNET, RemoteNode::vxlan(C_IP.octets(), VTEP_C), C_IP),
    ] {
        dp.add_route(subnet, 24, node);
        dp.add_member(member);
    }
    dp
}

// ---------------------------------------------------------------------------------------------
// Frames

/// IPv4/UDP `src` → `dst` with `ttl` and 64 bytes of payload.
fn packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..64u8).collect();
    ipv4_packet(
        src,
        dst,
        IPPROTO_UDP,
        ttl,
        0,
        &udp_datagram(40000, 5201, &data),
    )
}

/// An IPv4 frame `src` → `dst`.
fn ether(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    packet::ether(dst, src, ETH_P_IP, payload)
}

/// `ip` with its TTL lowered by one and the header checksum recomputed from scratch.
fn ttl_minus_one(ip: &[u8]) -> Vec<u8> {
    with_ttl_decremented(ip, 1)
}

/// A VXLAN frame from C to A carrying `inner` for A's VtepMAC.
fn vxlan_from_c(inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&ether(VTEP_A, VTEP_C, inner));
    let mut udp = vec![0xb2, 0x6e, 0x21, 0x18];
    udp.extend_from_slice(&u16::try_from(8 + vx.len()).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&u16::try_from(20 + udp.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, IPPROTO_UDP, 0, 0]);
    ip.extend_from_slice(&C_IP.octets());
    ip.extend_from_slice(&A_IP.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&udp);
    ether(TO_US, PEER_MAC, &ip)
}

const HOST_GW: u32 = CONFIG_F_DIRECT | CONFIG_F_NO_VXLAN;
const DIRECT_ROUTING: u32 = CONFIG_F_DIRECT;

// ---------------------------------------------------------------------------------------------
// Sending

/// A pod's packet for a direct peer leaves unencapsulated: same frame, TTL − 1 with a correct
/// checksum (incremental update checked against a full recomputation), redirected.
#[test]
fn pod_to_direct_peer_is_forwarded_unencapsulated_with_ttl_decremented() {
    for flags in [HOST_GW, DIRECT_ROUTING] {
        let dp = node_a(flags);
        let ip = packet(A_POD, B_POD, 64);
        let r = dp.run(names::POD_EGRESS, &ether(GW_MAC, POD_MAC, &ip));
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            r.out.len(),
            14 + ip.len(),
            "no bytes added: not encapsulated"
        );
        assert_eq!(
            &r.out[14..],
            &ttl_minus_one(&ip)[..],
            "only TTL and checksum change"
        );
        assert_eq!(r.out[22], 63);
        dp.assert_counters(&[(Reason::DirectPod, 1)]);
    }
}

/// Under DirectRouting, a peer on another segment (C) is still encapsulated.
#[test]
fn direct_routing_keeps_vxlan_for_other_peers() {
    let dp = node_a(DIRECT_ROUTING);
    let ip = packet(A_POD, C_POD, 64);
    let r = dp.run(names::POD_EGRESS, &ether(GW_MAC, POD_MAC, &ip));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.out.len(), 14 + 50 + ip.len(), "VXLAN adds 50 bytes");
    assert_eq!(
        &r.out[14 + 12 + 4..14 + 20],
        &C_IP.octets(),
        "outer destination: C's PublicIP"
    );
    dp.assert_counters(&[(Reason::EncapPod, 1)]);
}

/// A TTL that would expire is the kernel's (ICMP time exceeded), unchanged.
#[test]
fn pod_to_direct_peer_with_ttl_1_goes_to_the_kernel() {
    let dp = node_a(HOST_GW);
    let frame = ether(GW_MAC, POD_MAC, &packet(A_POD, B_POD, 1));
    let r = dp.run(names::POD_EGRESS, &frame);
    assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &frame));
    dp.assert_counters(&[(Reason::StackTtl, 1)]);
}

/// The host's packet (already routed by the kernel) leaves as it is.
#[test]
fn host_to_direct_peer_is_sent_as_it_is() {
    let dp = node_a(HOST_GW);
    let frame = ether(
        [0x0e, 0, 0, 0, 0, 0x01],
        HOST_MAC,
        &packet(A_SUBNET, B_POD, 64),
    );
    let r = dp.run(names::HOST_EGRESS, &frame);
    assert_eq!((r.verdict, &r.out), (TC_ACT_REDIRECT, &frame));
    dp.assert_counters(&[(Reason::DirectHost, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// From a direct peer's pod to a local pod: delivered to the bridge, TTL − 1.
#[test]
fn direct_peer_pod_to_local_pod_is_delivered() {
    for flags in [HOST_GW, DIRECT_ROUTING] {
        let dp = node_a(flags);
        let ip = packet(B_POD, A_POD, 63);
        let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &ip));
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(&r.out[14..], &ttl_minus_one(&ip)[..]);
        assert_eq!(r.mark, BRIDGE_DELIVERY_MARK, "marked as our delivery");
        dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DeliverDirectPod, 1)]);
    }
}

/// A local pod the agent knows (`ENDPOINT_V4`) gets direct traffic straight into its namespace,
/// MACs those of its gateway and itself; one it no longer knows takes the bridge again.
#[test]
fn direct_peer_pod_to_a_known_local_pod_goes_straight_in() {
    for flags in [HOST_GW, DIRECT_ROUTING] {
        let mut dp = node_a(flags);
        let ep = Endpoint::new(21, POD_MAC);
        set_endpoint(&mut dp.ebpf, A_POD, Some(ep));
        let ip = packet(B_POD, A_POD, 63);
        let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &ip));
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(&r.out[..6], &POD_MAC);
        assert_eq!(&r.out[6..12], &BRIDGE_MAC);
        assert_eq!(&r.out[14..], &ttl_minus_one(&ip)[..]);
        assert_eq!(r.mark, 0);
        set_endpoint(&mut dp.ebpf, A_POD, None);
        let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &ip));
        assert_eq!(r.verdict, TC_ACT_REDIRECT);
        assert_eq!(&r.out[..6], &TO_US, "left to bpf_redirect_neigh");
        dp.assert_counters(&[
            (Reason::UnderlayRx, 2),
            (Reason::DeliverDirectEndpoint, 1),
            (Reason::DeliverDirectPod, 1),
        ]);
    }
}

/// For the host device's address (`.0`) and the gateway (`.1`): to the host device, destination
/// MAC rewritten to its own, TTL untouched; a member PublicIP (a stock host-gw node's host) is
/// accepted as source too.
#[test]
fn direct_traffic_for_the_host_goes_to_the_host_device() {
    let dp = node_a(HOST_GW);
    for (src, dst) in [
        (B_POD, A_SUBNET),
        (B_POD, Ipv4Addr::new(172, 7, 1, 1)),
        (B_IP, A_SUBNET),
    ] {
        let ip = packet(src, dst, 64);
        let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &ip));
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "{src} -> {dst}");
        assert_eq!(
            &r.out[..6],
            &HOST_MAC,
            "{src} -> {dst}: destination MAC = host device's"
        );
        assert_eq!(&r.out[6..12], &PEER_MAC);
        assert_eq!(&r.out[14..], &ip[..], "{src} -> {dst}: IP untouched");
    }
    // A member's host to a pod is delivered to the pod, and its connection filed, so that
    // with `--ip-masq` the pod's replies are known as replies (`packet_nat`).
    let r = dp.run(
        names::UNDERLAY_INGRESS,
        &ether(TO_US, PEER_MAC, &packet(B_IP, A_POD, 64)),
    );
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 4),
        (Reason::DeliverDirectHost, 3),
        (Reason::DeliverDirectPod, 1),
        (Reason::KernelFlowNew, 1),
    ]);
}

/// A TTL that expires here goes to the host device, so the kernel answers.
#[test]
fn direct_traffic_with_ttl_1_goes_to_the_host_device() {
    let dp = node_a(HOST_GW);
    let ip = packet(B_POD, A_POD, 1);
    let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &ip));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(&r.out[..6], &HOST_MAC);
    assert_eq!(&r.out[14..], &ip[..]);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::StackTtl, 1)]);
}

/// What is not accepted is left to the kernel untouched: sources that are not direct peers (an
/// outside host, a VXLAN-only peer's pod), frames not addressed to us at L2, the subnet's
/// broadcast address, IP options, destinations outside our subnet.
#[test]
fn traffic_not_from_direct_peers_is_left_to_the_kernel() {
    let dp = node_a(DIRECT_ROUTING);
    let not_peer = [
        packet(Ipv4Addr::new(198, 19, 0, 1), A_POD, 64),
        packet(C_POD, A_POD, 64),
    ];
    for ip in &not_peer {
        let frame = ether(TO_US, PEER_MAC, ip);
        let r = dp.run(names::UNDERLAY_INGRESS, &frame);
        assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &frame));
    }
    let mut options = packet(B_POD, A_POD, 64);
    options[0] = 0x46;
    options.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
    let untouched = [
        ether(NOT_US, PEER_MAC, &packet(B_POD, A_POD, 64)),
        ether(
            TO_US,
            PEER_MAC,
            &packet(B_POD, Ipv4Addr::new(172, 7, 1, 255), 64),
        ),
        ether(TO_US, PEER_MAC, &options),
        ether(
            TO_US,
            PEER_MAC,
            &packet(B_POD, Ipv4Addr::new(198, 18, 0, 1), 64),
        ),
        ether(
            TO_US,
            PEER_MAC,
            &packet(B_POD, Ipv4Addr::new(172, 7, 9, 9), 64),
        ),
    ];
    for frame in &untouched {
        let r = dp.run(names::UNDERLAY_INGRESS, frame);
        assert_eq!((r.verdict, &r.out), (TC_ACT_OK, frame));
    }
    dp.assert_counters(&[(Reason::UnderlayRx, 7), (Reason::StackNotPeer, 2)]);
}

/// Without the DIRECT flag (plain VXLAN) nothing unencapsulated is taken, even from a route
/// flagged DIRECT.
#[test]
fn vxlan_only_nodes_accept_nothing_unencapsulated() {
    let dp = node_a(0);
    let frame = ether(TO_US, PEER_MAC, &packet(B_POD, A_POD, 64));
    let r = dp.run(names::UNDERLAY_INGRESS, &frame);
    assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &frame));
    dp.assert_counters(&[(Reason::UnderlayRx, 1)]);
}

/// A bad header checksum or a total length beyond the frame: dropped and counted (`ip_rcv`
/// would drop them; redirecting skips it). No bridge: dropped and counted.
#[test]
fn malformed_direct_packets_and_a_missing_bridge_are_dropped() {
    let mut dp = node_a(HOST_GW);
    let mut bad_sum = packet(B_POD, A_POD, 64);
    bad_sum[10] ^= 0xff;
    let mut too_long = packet(B_POD, A_POD, 64);
    too_long[2..4].copy_from_slice(&2000u16.to_be_bytes());
    let c = {
        too_long[10..12].copy_from_slice(&[0, 0]);
        checksum(&too_long[..20])
    };
    too_long[10..12].copy_from_slice(&c.to_be_bytes());
    for ip in [&bad_sum, &too_long] {
        let r = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, ip));
        assert_eq!(r.verdict, TC_ACT_SHOT);
    }
    dp.update_config(|c| c.bridge_ifindex = 0);
    let r = dp.run(
        names::UNDERLAY_INGRESS,
        &ether(TO_US, PEER_MAC, &packet(B_POD, A_POD, 64)),
    );
    assert_eq!(r.verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DropNoBridge, 1),
        (Reason::DropDirectMalformed, 2),
    ]);
}

/// host-gw has no VXLAN: a valid VXLAN frame from a member is not decapsulated; DirectRouting
/// still decapsulates it.
#[test]
fn host_gw_does_not_decapsulate_vxlan_but_direct_routing_does() {
    let frame = vxlan_from_c(&packet(C_POD, A_POD, 63));
    let dp = node_a(HOST_GW);
    let r = dp.run(names::UNDERLAY_INGRESS, &frame);
    assert_eq!((r.verdict, &r.out), (TC_ACT_OK, &frame));
    dp.assert_counters(&[(Reason::UnderlayRx, 1)]);

    let dp = node_a(DIRECT_ROUTING);
    let r = dp.run(names::UNDERLAY_INGRESS, &frame);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.out.len(), frame.len() - 50);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapPod, 1)]);
}

/// A flow the kernel forwarded from a local pod to a direct peer's pod (kube-proxy's DNAT of a
/// Service address, `KERNEL_FLOW_V4`): `host_egress` files it as it sends it, and the peer's
/// reply goes to the host device (the kernel's conntrack gives it the Service address back)
/// instead of into the pod, untouched; another flow of the same pods still goes straight in.
#[test]
fn the_reply_of_a_flow_the_kernel_forwarded_goes_to_the_host_device() {
    for flags in [HOST_GW, DIRECT_ROUTING] {
        let mut dp = node_a(flags);
        set_endpoint(&mut dp.ebpf, A_POD, Some(Endpoint::new(21, POD_MAC)));
        let out = packet(A_POD, B_POD, 63);
        assert_eq!(
            dp.run(names::HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, &out))
                .verdict,
            TC_ACT_REDIRECT
        );
        let reply_from = |sport: u16| {
            ipv4_packet(
                B_POD,
                A_POD,
                IPPROTO_UDP,
                64,
                0,
                &udp_datagram(sport, 40000, b"r"),
            )
        };
        let reply = reply_from(5201);
        let run = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &reply));
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(&run.out[..6], &HOST_MAC, "to the host device");
        assert_eq!(&run.out[14..], &reply[..], "untouched, TTL included");
        let other = reply_from(5202);
        let run = dp.run(names::UNDERLAY_INGRESS, &ether(TO_US, PEER_MAC, &other));
        assert_eq!(&run.out[..6], &POD_MAC, "another flow: into the pod");
        dp.assert_counters(&[
            (Reason::DirectHost, 1),
            (Reason::KernelFlowNew, 1),
            (Reason::UnderlayRx, 2),
            (Reason::StackKernelFlow, 1),
            (Reason::DeliverDirectEndpoint, 1),
        ]);
    }
}
