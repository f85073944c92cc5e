//! Decapsulation by `underlay_ingress`: delivery to the bridge and the host device, and every
//! check that drops (counted by reason).

use super::*;

#[test]
fn underlay_ingress_decapsulates_a_kernel_vxlan_frame_to_the_pod_bridge() {
    // The capture is A -> B (172.17.2.5); run it on node B.
    let kernel = from_hex(FLANNEL1_CAPTURE);
    let dp = loaded_node(B, &[A]);
    let run = dp.run(UNDERLAY_INGRESS, &kernel);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(run.out.len(), kernel.len() - 50);
    assert_eq!(be16(&run.out, 12), ETH_P_IP);
    // The receiver's forwarding hop decrements the TTL (64 -> 63).
    assert_eq!(&run.out[14..], &with_ttl_decremented(&kernel[64..], 1)[..]);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapPod, 1)]);
    assert_eq!(dp.counters_full()["decap_pod"].bytes, run.out.len() as u64);
}

#[test]
fn underlay_ingress_delivers_host_addresses_to_the_host_device() {
    let dp = loaded_node(A, &[B]);
    // .0 is the host device's address, .1 the bridge's (gateway): both are the host's.
    for last in [0, 1] {
        let inner = ipv4_packet(
            host_addr(B, 5),
            host_addr(A, last),
            IPPROTO_ICMP,
            64,
            0,
            &icmp_echo(8, 1, 1, b"hi"),
        );
        let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT, ".{last}");
        assert_eq!(
            &run.out[..6],
            &HOST_MAC,
            "destination MAC: the host device's"
        );
        assert_eq!(&run.out[6..12], &B.vtep, "source MAC: the sender's VtepMAC");
        assert_eq!(be16(&run.out, 12), ETH_P_IP);
        assert_eq!(
            &run.out[14..],
            &inner[..],
            "the host stack forwards it, if at all: TTL kept"
        );
    }
    dp.assert_counters(&[(Reason::UnderlayRx, 2), (Reason::DecapHost, 2)]);
}

#[test]
fn underlay_ingress_hands_expiring_packets_to_the_host() {
    let dp = loaded_node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 1, 1, 10);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &HOST_MAC);
    assert_eq!(
        &run.out[14..],
        &inner[..],
        "TTL 1 kept: the kernel answers time exceeded"
    );
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::StackTtl, 1)]);
}

#[test]
fn underlay_ingress_copies_congestion_marks_inward() {
    let dp = loaded_node(A, &[B]);
    let mut vx = Vxlan::between(B, A);
    vx.outer_tos = 0x03; // CE
    // ECT(0) inner -> CE inner (checksum patched), then the TTL hop.
    let inner = ipv4_packet(
        host_addr(B, 5),
        host_addr(A, 7),
        IPPROTO_UDP,
        64,
        0x02,
        &udp_datagram(1, 2, b"x"),
    );
    let run = dp.run(UNDERLAY_INGRESS, &vx.frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let mut expected = inner.clone();
    expected[1] = 0x03;
    assert_eq!(&run.out[14..], &with_ttl_decremented(&expected, 1)[..]);
    assert_eq!(checksum(&run.out[14..34]), 0);
    // Not-ECT inner under a CE outer: dropped (RFC 6040).
    let not_ect = ipv4_packet(
        host_addr(B, 5),
        host_addr(A, 7),
        IPPROTO_UDP,
        64,
        0,
        &udp_datagram(1, 2, b"x"),
    );
    assert_eq!(
        dp.run(UNDERLAY_INGRESS, &vx.frame(&not_ect)).verdict,
        TC_ACT_SHOT
    );
    // ECT outer without CE changes nothing.
    vx.outer_tos = 0x02;
    let run = dp.run(UNDERLAY_INGRESS, &vx.frame(&not_ect));
    assert_eq!(&run.out[14..], &with_ttl_decremented(&not_ect, 1)[..]);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapPod, 2),
        (Reason::DropEcn, 1),
    ]);
}

#[test]
fn underlay_ingress_drops_and_counts_what_fails_a_check() {
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 32);
    let good = Vxlan::between(B, A);
    let with = |f: &dyn Fn(&mut Vxlan)| {
        let mut v = good.clone();
        f(&mut v);
        v.frame(&inner)
    };
    let mut bad_checksum = good.frame(&inner);
    bad_checksum[24] ^= 0xff;
    let mut udp_len = good.frame(&inner);
    udp_len[39] -= 1; // UDP length one short of IP's
    let mut inner_ihl = good.frame(&inner);
    inner_ihl[64] = 0x44;
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "source not a member",
            with(&|v| v.outer_src = Ipv4Addr::new(198, 18, 0, 99)),
            Reason::DropUnknownPeer,
        ),
        ("other VNI", with(&|v| v.vni = 2), Reason::DropWrongVni),
        (
            "inner MAC not our VtepMAC",
            with(&|v| v.inner_dst_mac = [0x0e, 0, 0, 0, 0, 0x09]),
            Reason::DropWrongMac,
        ),
        (
            "inner broadcast",
            with(&|v| v.inner_dst_mac = [0xff; 6]),
            Reason::DropWrongMac,
        ),
        (
            "inner ARP",
            with(&|v| v.inner_type = ETH_P_ARP),
            Reason::DropNotIpv4,
        ),
        (
            "inner IPv6",
            with(&|v| v.inner_type = ETH_P_IPV6),
            Reason::DropNotIpv4,
        ),
        (
            "VXLAN flags with G bit",
            with(&|v| v.flags = [0x88, 0, 0, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN flags without I bit",
            with(&|v| v.flags = [0, 0, 0, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN reserved bytes",
            with(&|v| v.flags = [0x08, 0, 1, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN reserved byte after VNI",
            with(&|v| v.vni_reserved = 1),
            Reason::DropMalformed,
        ),
        ("UDP length mismatch", udp_len, Reason::DropMalformed),
        ("inner IPv4 header length", inner_ihl, Reason::DropMalformed),
        ("outer checksum", bad_checksum, Reason::DropBadChecksum),
        (
            "inner destination outside our subnet",
            Vxlan::between(B, A).frame(&udp_packet(
                host_addr(B, 5),
                Ipv4Addr::new(172, 17, 3, 4),
                64,
                1,
                32,
            )),
            Reason::DropNotLocal,
        ),
    ];
    let dp = loaded_node(A, &[B]);
    for (what, frame, reason) in &cases {
        let before = dp.counters();
        let run = dp.run(UNDERLAY_INGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_SHOT, "{what}");
        let after = dp.counters();
        assert_eq!(
            after.get(reason.name()).copied().unwrap_or(0),
            before.get(reason.name()).copied().unwrap_or(0) + 1,
            "{what}: counted as {}",
            reason.name()
        );
    }
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, reason) in &cases {
        *expected.entry(reason.name()).or_default() += 1;
    }
    expected.insert("underlay_rx", cases.len() as u64);
    assert_eq!(dp.counters(), expected);
}

/// Runs `frame` through `underlay_xdp` and then `underlay_ingress` on a node with XDP in use,
/// as the kernel would: XDP first, then TC on what XDP left. Returns TC's verdict, after
/// asserting that XDP either decapsulated and marked the frame (`decapsulated`) or left it
/// unchanged for TC to drop and count (XDP never drops).
#[track_caller]
pub(super) fn xdp_then_tc(dp: &Loaded, frame: &[u8], decapsulated: bool, what: &str) -> u32 {
    let xdp = run_xdp(&dp.ebpf, UNDERLAY_XDP, frame);
    assert_eq!(xdp.verdict, XDP_PASS, "{what}: XDP passes everything");
    if decapsulated {
        let mut expected = xdp_mark(XDP_COOKIE);
        expected.extend_from_slice(&frame[14 + 50 - 14..]);
        assert_eq!(xdp.out, expected, "{what}: XDP decapsulates and marks");
    } else {
        assert_eq!(
            xdp.out, frame,
            "{what}: XDP leaves the frame unchanged for TC"
        );
    }
    dp.run(UNDERLAY_INGRESS, frame).verdict
}

/// Issue 12, item 2: a member node speaks only for its own subnet, and for sources outside the
/// cluster network that it forwards; anything else is dropped and counted, in TC and (by
/// leaving it for TC) in XDP.
#[test]
fn a_member_cannot_claim_inner_sources_of_other_nodes_or_of_ours() {
    let c = Node::at(
        Ipv4Addr::new(198, 18, 0, 3),
        Ipv4Addr::new(172, 17, 3, 0),
        [0x0e, 0, 0, 0, 0, 0x03],
    );
    let mut dp = loaded_node(A, &[B, c]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let from_b = |src| Vxlan::between(B, A).frame(&udp_packet(src, host_addr(A, 7), 64, 1, 32));
    let refused = [
        ("another member's pod", host_addr(c, 5)),
        ("another member's host device", c.subnet),
        ("one of our own pods", host_addr(A, 9)),
        ("our own host device", A.subnet),
        (
            "a cluster address no node holds",
            Ipv4Addr::new(172, 17, 200, 1),
        ),
        ("our node's own address", A.local_ip),
    ];
    let accepted = [
        ("its own pod", host_addr(B, 5)),
        ("its own host device", B.subnet),
        (
            "an outside host it forwards for",
            Ipv4Addr::new(198, 19, 0, 1),
        ),
    ];
    for (what, src) in refused {
        let before = dp.counters();
        assert_eq!(
            xdp_then_tc(&dp, &from_b(src), false, what),
            TC_ACT_SHOT,
            "{what}"
        );
        let grown = |r: Reason| {
            dp.counters().get(r.name()).copied().unwrap_or(0)
                - before.get(r.name()).copied().unwrap_or(0)
        };
        assert_eq!(grown(Reason::DropInnerSource), 1, "{what}: counted");
    }
    for (what, src) in accepted {
        assert_eq!(
            xdp_then_tc(&dp, &from_b(src), true, what),
            TC_ACT_REDIRECT,
            "{what}"
        );
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, 9),
        (Reason::DropInnerSource, 6),
        (Reason::XdpDecap, 3),
        (Reason::DecapPod, 3),
        // The outside host's connection, for `--ip-masq` to leave the pod's replies alone.
        (Reason::KernelFlowNew, 1),
    ]);
}

/// The inner IPv4 header with a recomputed checksum after `f` changed it.
fn inner_with(inner: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = inner.to_vec();
    f(&mut p);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if p.len() >= ihl && ihl >= 20 {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Issue 12, item 10: an inner IPv4 header the kernel's `ip_rcv` would refuse is dropped and
/// counted (`drop_malformed`), as the direct path does (`drop_direct_malformed`), instead of
/// being delivered by redirect; a valid header with options still passes.
#[test]
fn malformed_inner_ipv4_headers_are_dropped_and_counted() {
    let mut dp = loaded_node(A, &[B]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 40);
    let vx = Vxlan::between(B, A);
    let mut bad_checksum = inner.clone();
    bad_checksum[10] ^= 0x5a;
    // One option word (a NOP and three END bytes), lengths and checksum consistent.
    let with_options = {
        let mut p = inner[..20].to_vec();
        p.extend_from_slice(&[1, 0, 0, 0]);
        p.extend_from_slice(&inner[20..]);
        inner_with(&p, |p| {
            p[0] = 0x46;
            let len = u16::try_from(p.len()).unwrap();
            p[2..4].copy_from_slice(&len.to_be_bytes());
        })
    };
    let mut options_bad_checksum = with_options.clone();
    options_bad_checksum[21] = 7;
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("header checksum", bad_checksum),
        ("checksum over the options", options_bad_checksum),
        (
            "header length beyond the total length",
            inner_with(
                &udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 4),
                |p| p[0] = 0x4f,
            ),
        ),
        (
            "header length beyond the packet",
            inner_with(&inner[..20], |p| {
                p[0] = 0x46;
                p[2..4].copy_from_slice(&24u16.to_be_bytes());
            }),
        ),
        (
            "total length beyond the frame",
            inner_with(&inner, |p| {
                let len = u16::try_from(p.len() + 1).unwrap();
                p[2..4].copy_from_slice(&len.to_be_bytes());
            }),
        ),
        (
            "total length below the header",
            inner_with(&inner, |p| p[2..4].copy_from_slice(&19u16.to_be_bytes())),
        ),
        ("version 6", inner_with(&inner, |p| p[0] = 0x65)),
    ];
    for (what, packet) in &refused {
        let before = dp.counters();
        let frame = vx.frame(packet);
        assert_eq!(xdp_then_tc(&dp, &frame, false, what), TC_ACT_SHOT, "{what}");
        assert_eq!(
            dp.counters().get("drop_malformed").copied().unwrap_or(0),
            before.get("drop_malformed").copied().unwrap_or(0) + 1,
            "{what}: counted as drop_malformed"
        );
    }
    // Shorter than the frame (Ethernet padding) is fine, as for the kernel; so are options.
    let padded = {
        let mut f = vx.frame(&inner);
        let outer_len = be16(&f, 16) + 6;
        f[16..18].copy_from_slice(&outer_len.to_be_bytes());
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..34]);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        let udp_len = be16(&f, 38) + 6;
        f[38..40].copy_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0; 6]);
        f
    };
    for (what, frame) in [
        ("padded", padded),
        ("with options", vx.frame(&with_options)),
    ] {
        assert_eq!(
            xdp_then_tc(&dp, &frame, true, what),
            TC_ACT_REDIRECT,
            "{what}"
        );
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, refused.len() as u64 + 2),
        (Reason::DropMalformed, refused.len() as u64),
        (Reason::XdpDecap, 2),
        (Reason::DecapPod, 2),
    ]);
}

#[test]
fn underlay_ingress_drops_when_the_target_device_is_missing() {
    let mut dp = loaded_node(A, &[B]);
    dp.update_config(|c| {
        c.bridge_ifindex = 0;
        c.host_ifindex = 0;
    });
    let to_pod =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 10));
    let to_host = Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), A.subnet, 64, 1, 10));
    let expiring =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 1, 1, 10));
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_pod).verdict, TC_ACT_SHOT);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_host).verdict, TC_ACT_SHOT);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &expiring).verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DropNoBridge, 1),
        (Reason::DropNoHostDevice, 2),
    ]);
    // The bridge appears: pods are reachable again.
    dp.update_config(|c| c.bridge_ifindex = BRIDGE_IFINDEX);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_pod).verdict, TC_ACT_REDIRECT);
}

#[test]
fn underlay_ingress_drops_truncated_vxlan_at_every_length() {
    let dp = loaded_node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16);
    let full = Vxlan::between(B, A).frame(&inner);
    // Header boundaries: 14 Ethernet | 34 IPv4 | 42 UDP | 50 VXLAN | 64 inner Ethernet |
    // 84 inner IPv4 | 92 inner UDP. The kernel's test run refuses IPv4 frames shorter than
    // Ethernet + IPv4 header (EINVAL), so cuts start at 34; shorter ones fail the program's
    // first bounds check and pass, like the 34..42 ones below.
    let mut dropped = 0;
    for cut in 34..full.len() {
        let frame = &full[..cut];
        let run = dp.run(UNDERLAY_INGRESS, frame);
        if cut < 42 {
            // No complete UDP header: nothing says it is VXLAN; the kernel deals with it.
            assert_eq!(run.verdict, TC_ACT_OK, "cut at {cut}");
            assert_eq!(run.out, frame, "cut at {cut}: untouched");
        } else {
            assert_eq!(run.verdict, TC_ACT_SHOT, "cut at {cut}");
            dropped += 1;
        }
    }
    // Frames whose IP and UDP lengths agree with the frame but end at a header boundary.
    for end in [42, 50, 64, 70, 83] {
        let mut frame = full[..end].to_vec();
        let ip_len = u16::try_from(end - 14).unwrap();
        frame[16..18].copy_from_slice(&ip_len.to_be_bytes());
        frame[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            dp.run(UNDERLAY_INGRESS, &frame).verdict,
            TC_ACT_SHOT,
            "consistent but ends at {end}"
        );
        dropped += 1;
    }
    let runs = (full.len() - 34) as u64 + 5;
    dp.assert_counters(&[(Reason::UnderlayRx, runs), (Reason::DropTruncated, dropped)]);
    // The whole frame still goes through.
    assert_eq!(dp.run(UNDERLAY_INGRESS, &full).verdict, TC_ACT_REDIRECT);
}

#[test]
fn underlay_ingress_passes_what_is_not_vxlan_for_us() {
    let dp = loaded_node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16);
    let other_port = {
        let mut v = Vxlan::between(B, A);
        v.dport = 4789;
        v.frame(&inner)
    };
    let other_dst = {
        let mut v = Vxlan::between(B, A);
        v.outer_dst = Ipv4Addr::new(198, 18, 0, 77);
        v.frame(&inner)
    };
    let later_fragment = {
        let mut v = Vxlan::between(B, A);
        v.frag_off = 0x00b9; // offset 1480 bytes, no UDP header in it
        v.frame(&inner)
    };
    let first_fragment = {
        let mut v = Vxlan::between(B, A);
        v.frag_off = 0x2000; // more fragments
        v.frame(&inner)
    };
    let mut with_options = Vxlan::between(B, A).frame(&inner);
    with_options[14] = 0x46;
    let tcp = ether(
        NIC_MAC,
        ROUTER_MAC,
        ETH_P_IP,
        &ipv4_packet(B.local_ip, A.local_ip, IPPROTO_TCP, 64, 0, &[0; 20]),
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ARP", ether([0xff; 6], ROUTER_MAC, ETH_P_ARP, &[0; 28])),
        ("IPv6", ether(NIC_MAC, ROUTER_MAC, ETH_P_IPV6, &[0x60; 80])),
        ("TCP to our address", tcp),
        ("UDP to another port", other_port),
        ("VXLAN for another address", other_dst),
        ("later fragment", later_fragment),
        ("IP options", with_options),
        // For us, but the kernel reassembles it (for the GRO device's socket): counted.
        ("first fragment", first_fragment.clone()),
    ];
    for (what, frame) in &cases {
        let run = dp.run(UNDERLAY_INGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(&run.out, frame, "{what}: untouched");
    }
    let fragment_len = first_fragment.len() as u64;
    let expected = [
        (Reason::UnderlayRx, cases.len() as u64),
        (Reason::StackFragment, 1),
    ];
    dp.assert_counters(&expected);
    assert_eq!(
        dp.counters_full()[Reason::StackFragment.name()].bytes,
        fragment_len,
        "to_stack_fragment counts the fragment's bytes"
    );
    // underlay_egress only counts.
    let run = dp.run(UNDERLAY_EGRESS, &cases[0].1);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &cases[0].1));
    dp.assert_counters(&[
        (Reason::UnderlayRx, cases.len() as u64),
        (Reason::StackFragment, 1),
        (Reason::UnderlayTx, 1),
    ]);
}

/// What `underlay_ingress` leaves to the kernel on our port (the frames above) meets the GRO
/// device's VXLAN socket, which decapsulates anything from anyone and records the outer
/// headers as tunnel metadata: the device's program delivers only what that metadata shows to
/// be for us (`vxlan_datapath.rs` sends fragmented VXLAN through it). A frame without tunnel
/// metadata, as a test run has none, is not from the socket: dropped and counted, configured
/// or not.
#[test]
fn the_gro_device_drops_frames_without_tunnel_metadata() {
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16);
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 to a pod", ether(A.vtep, B.vtep, ETH_P_IP, &inner)),
        (
            "IPv4 to the host",
            ether(
                A.vtep,
                B.vtep,
                ETH_P_IP,
                &udp_packet(host_addr(B, 5), A.local_ip, 64, 1, 16),
            ),
        ),
        ("ARP", ether([0xff; 6], B.vtep, ETH_P_ARP, &[0; 28])),
        ("IPv6", ether(A.vtep, B.vtep, ETH_P_IPV6, &[0x60; 80])),
    ];
    for dp in [loaded_node(A, &[B]), Loaded::new("packet_vxlan")] {
        for (what, frame) in &frames {
            let run = dp.run(GRO_DEVICE_INGRESS, frame);
            assert_eq!(run.verdict, TC_ACT_SHOT, "{what}");
        }
        dp.assert_counters(&[(Reason::DropGroDevice, frames.len() as u64)]);
    }
}

#[test]
fn underlay_ingress_without_configuration_passes_everything() {
    let dp = Loaded::new("packet_vxlan");
    let frame =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16));
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &frame));
    dp.assert_counters(&[(Reason::UnderlayRx, 1)]);
}

#[test]
fn a_pod_packet_survives_encapsulation_and_decapsulation() {
    let a = loaded_node(A, &[B]);
    let b = loaded_node(B, &[A]);
    for len in [0, 1, 100, 1372, 1422] {
        let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 40000, len);
        let wire = a.run(POD_EGRESS, &pod_frame(&inner));
        assert_eq!(wire.verdict, TC_ACT_REDIRECT, "{len}");
        let delivered = b.run(UNDERLAY_INGRESS, &wire.out);
        assert_eq!(delivered.verdict, TC_ACT_REDIRECT, "{len}");
        // Two forwarding hops, as between two stock flannel nodes.
        assert_eq!(
            &delivered.out[14..],
            &with_ttl_decremented(&inner, 2)[..],
            "{len}"
        );
    }
    a.assert_counters(&[(Reason::EncapPod, 5)]);
    b.assert_counters(&[(Reason::UnderlayRx, 5), (Reason::DecapPod, 5)]);
}
