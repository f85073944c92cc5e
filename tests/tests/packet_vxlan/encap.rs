//! Encapsulation by `pod_egress` and `host_egress`: the outer headers byte by byte, against the
//! kernel's VXLAN device.

use super::*;

#[test]
fn pod_egress_encapsulates_for_a_peer_subnet() {
    let dp = loaded_node(A, &[B]);
    let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 40000, 100);
    let frame = pod_frame(&inner);

    let run = dp.run(POD_EGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    // The sender's forwarding hop: TTL 64 -> 63, checksum patched.
    let expected_inner = with_ttl_decremented(&inner, 1);
    assert_eq!(checksum(&expected_inner[..20]), 0);
    let sport = assert_vxlan(&run.out, A, B, &expected_inner);

    // Same flow, same source port.
    assert_eq!(
        assert_vxlan(&dp.run(POD_EGRESS, &frame).out, A, B, &expected_inner),
        sport
    );
    // The port comes from the flow hash: different flows spread over the range.
    let ports: std::collections::BTreeSet<u16> = (0..8u16)
        .map(|i| {
            let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 41000 + i, 100);
            assert_vxlan(
                &dp.run(POD_EGRESS, &pod_frame(&inner)).out,
                A,
                B,
                &with_ttl_decremented(&inner, 1),
            )
        })
        .collect();
    assert!(ports.len() >= 4, "source ports of 8 flows: {ports:?}");

    dp.assert_counters(&[(Reason::EncapPod, 10)]);
    let bytes = dp.counters_full()["encap_pod"].bytes;
    assert_eq!(
        bytes,
        10 * run.out.len() as u64,
        "encap_pod counts the encapsulated size"
    );
}

#[test]
fn pod_egress_uses_the_longest_prefix_and_the_peer_entry() {
    let mut dp = loaded_node(A, &[B]);
    // A /16 catch-all to another node and a /28 inside B's subnet to a third one.
    let c = Node::at(
        Ipv4Addr::new(198, 18, 0, 3),
        Ipv4Addr::new(172, 17, 3, 0),
        [0x0e, 0, 0, 0, 0, 3],
    );
    let d = Node::at(
        Ipv4Addr::new(198, 18, 0, 4),
        Ipv4Addr::new(172, 17, 2, 16),
        [0x0e, 0, 0, 0, 0, 4],
    );
    dp.add_route(NETWORK, 16, RemoteNode::vxlan(c.public_ip.octets(), c.vtep));
    dp.add_route(
        d.subnet,
        28,
        RemoteNode::vxlan(d.public_ip.octets(), d.vtep),
    );
    for (dst, to) in [
        (host_addr(B, 7), B),
        (host_addr(B, 20), d),
        (Ipv4Addr::new(172, 17, 99, 1), c),
    ] {
        let inner = udp_packet(host_addr(A, 5), dst, 64, 40000, 10);
        let run = dp.run(POD_EGRESS, &pod_frame(&inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{dst}");
        assert_vxlan(&run.out, A, to, &with_ttl_decremented(&inner, 1));
    }
    // A route with neither the VXLAN nor the DIRECT flag is left to the kernel (DIRECT routes:
    // packet_direct.rs).
    dp.add_route(
        Ipv4Addr::new(172, 17, 4, 0),
        24,
        RemoteNode {
            public_ip: [198, 18, 0, 5],
            vtep_mac: [0; 6],
            flags: 0,
        },
    );
    let frame = pod_frame(&udp_packet(
        host_addr(A, 5),
        Ipv4Addr::new(172, 17, 4, 9),
        64,
        40000,
        10,
    ));
    let run = dp.run(POD_EGRESS, &frame);
    assert_eq!((run.verdict, run.out), (TC_ACT_OK, frame));
    dp.assert_counters(&[(Reason::EncapPod, 3)]);
}

#[test]
fn pod_egress_leaves_everything_else_to_the_kernel() {
    let mut dp = loaded_node(A, &[B]);
    let src = host_addr(A, 5);
    let peer_bound = pod_frame(&udp_packet(src, host_addr(B, 7), 64, 40000, 10));
    let mut broadcast = peer_bound.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    let mut bad_ihl = peer_bound.clone();
    bad_ihl[14] = 0x44;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "outside world",
            pod_frame(&udp_packet(src, Ipv4Addr::new(198, 19, 0, 1), 64, 1, 10)),
        ),
        (
            "own subnet",
            pod_frame(&udp_packet(src, host_addr(A, 9), 64, 1, 10)),
        ),
        (
            "cluster address without a peer",
            pod_frame(&udp_packet(src, Ipv4Addr::new(172, 17, 9, 9), 64, 1, 10)),
        ),
        ("ARP", ether([0xff; 6], POD_MAC, ETH_P_ARP, &[0; 28])),
        ("IPv6", ether(GW_MAC, POD_MAC, ETH_P_IPV6, &[0x60; 60])),
        ("broadcast MAC", broadcast),
        ("IPv4 header length below 20", bad_ihl),
    ];
    for (what, frame) in &cases {
        let run = dp.run(POD_EGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(&run.out, frame, "{what}: untouched");
    }
    // TTL about to expire: the kernel must answer ICMP time exceeded, so it gets the packet.
    let ttl1 = pod_frame(&udp_packet(src, host_addr(B, 7), 1, 40000, 10));
    let run = dp.run(POD_EGRESS, &ttl1);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &ttl1));
    dp.assert_counters(&[(Reason::StackTtl, 1)]);

    // Before the agent has configured the node, nothing is touched.
    dp.set_config(Config::default());
    let run = dp.run(POD_EGRESS, &peer_bound);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &peer_bound));
    dp.assert_counters(&[(Reason::StackTtl, 1)]);
}

#[test]
fn host_egress_encapsulates_without_touching_the_inner_packet() {
    let dp = loaded_node(A, &[B]);
    // The host (source: the host device's address) pings a remote pod. The kernel routed it
    // already, so the TTL stays.
    let inner = host_echo(A, host_addr(B, 5));
    let frame = ether(
        [0x02, 0x11, 0, 0, 0, 1],
        [0x02, 0x11, 0, 0, 0, 1],
        ETH_P_IP,
        &inner,
    );
    let run = dp.run(HOST_EGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, A, B, &inner);
    dp.assert_counters(&[(Reason::EncapHost, 1)]);
}

#[test]
fn host_egress_drops_cluster_addresses_without_a_peer() {
    let dp = loaded_node(A, &[B]);
    let no_peer = ether(
        HOST_MAC,
        HOST_MAC,
        ETH_P_IP,
        &udp_packet(A.subnet, Ipv4Addr::new(172, 17, 9, 9), 64, 1, 10),
    );
    assert_eq!(dp.run(HOST_EGRESS, &no_peer).verdict, TC_ACT_SHOT);
    // Not a cluster address, not IPv4: not ours.
    let outside = ether(
        HOST_MAC,
        HOST_MAC,
        ETH_P_IP,
        &udp_packet(A.subnet, Ipv4Addr::new(10, 1, 2, 3), 64, 1, 10),
    );
    let run = dp.run(HOST_EGRESS, &outside);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &outside));
    let ipv6 = ether(HOST_MAC, HOST_MAC, ETH_P_IPV6, &[0x60; 60]);
    assert_eq!(dp.run(HOST_EGRESS, &ipv6).verdict, TC_ACT_OK);
    dp.assert_counters(&[(Reason::DropNoRoute, 1)]);
}

#[test]
fn ecn_is_copied_to_the_outer_header_as_the_kernel_does() {
    let dp = loaded_node(A, &[B]);
    // inner ECN -> outer ECN: Not-ECT -> 0, ECT(1) -> 1, ECT(0) -> 2, CE -> ECT(0); DSCP never.
    for (inner_tos, outer_tos) in [(0x00, 0), (0xb9, 1), (0x02, 2), (0x03, 2)] {
        let inner = ipv4_packet(
            A.subnet,
            host_addr(B, 5),
            IPPROTO_UDP,
            64,
            inner_tos,
            &udp_datagram(1, 2, b"x"),
        );
        let run = dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            run.out[15], outer_tos,
            "outer TOS for inner TOS {inner_tos:#x}"
        );
        assert_eq!(checksum(&run.out[14..34]), 0);
    }
}

/// The same inner packet as in the kernel capture, through `host_egress` configured like the
/// capture's node: every byte after the outer Ethernet header must be the kernel's, except the
/// IP ID (random in both), the header checksum (follows the ID), the UDP source port (flow hash
/// with a per-boot key) and the UDP checksum (zero from us; flannel.1 fills it in).
#[test]
fn encapsulation_matches_the_kernel_vxlan_device() {
    let kernel = from_hex(FLANNEL1_CAPTURE);
    assert_eq!(kernel.len(), 148);
    let dp = loaded_node(A, &[B]);
    let inner = &kernel[64..];
    let run = dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, A, B, inner);
    assert_eq!(run.out.len(), kernel.len());
    let differ: Vec<usize> = (14..kernel.len())
        .filter(|&i| run.out[i] != kernel[i])
        .collect();
    let allowed = [18, 19, 24, 25, 34, 35, 40, 41];
    assert!(
        differ.iter().all(|i| allowed.contains(i)),
        "bytes differing from flannel.1: {differ:?}"
    );
    // The kernel's frame passes our own frame checks too.
    assert_vxlan(
        &[
            &run.out[..14],
            &kernel[14..34],
            &run.out[34..36],
            &kernel[36..40],
            &[0, 0],
            &kernel[42..],
        ]
        .concat(),
        A,
        B,
        inner,
    );
}
