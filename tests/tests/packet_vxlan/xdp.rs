//! `underlay_xdp`: decapsulation before GRO, the mark it leaves for `underlay_ingress`, and
//! everything it leaves alone.

use super::*;

#[test]
fn underlay_xdp_decapsulates_and_marks_what_passes_every_check() {
    let mut dp = loaded_node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 300);
    let vx = Vxlan::between(B, A);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &vx.frame(&inner));
    assert_eq!(run.verdict, XDP_PASS);
    let mut expected = xdp_mark(XDP_COOKIE);
    // The inner Ethernet frame, untouched: TC decides the delivery and the TTL.
    expected.extend_from_slice(&ether(A.vtep, B.vtep, ETH_P_IP, &inner));
    assert_eq!(run.out, expected);
    dp.assert_counters(&[(Reason::XdpDecap, 1)]);
    assert_eq!(
        dp.counters_full()["xdp_decap"].bytes,
        (14 + inner.len()) as u64
    );
}

#[test]
fn underlay_xdp_applies_ecn_as_tc_decapsulation_does() {
    let mut dp = loaded_node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let vx = Vxlan {
        outer_tos: 0b11,
        ..Vxlan::between(B, A)
    };
    let mut inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 30);
    inner[1] = 0b10; // ECT(0)
    inner[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &vx.frame(&inner));
    let ip = &run.out[8 + 14..8 + 14 + 20];
    assert_eq!(ip[1] & 0b11, 0b11, "CE copied inward");
    assert_eq!(checksum(ip), 0, "inner checksum patched");

    // CE over a not-ECT inner packet must be dropped: XDP leaves that to TC, unchanged.
    inner[1] = 0;
    inner[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    let frame = vx.frame(&inner);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &frame);
    assert_eq!((run.verdict, &run.out), (XDP_PASS, &frame));
    assert_eq!(dp.run(UNDERLAY_INGRESS, &frame).verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::XdpDecap, 1),
        (Reason::UnderlayRx, 1),
        (Reason::DropEcn, 1),
    ]);
}

#[test]
fn underlay_xdp_leaves_everything_else_unchanged_for_tc() {
    let mut dp = loaded_node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 50);
    let c = Node::at(Ipv4Addr::new(198, 18, 0, 3), B.subnet, B.vtep);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wrong VNI",
            Vxlan {
                vni: 7,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        ("not a member", Vxlan::between(c, A).frame(&inner)),
        (
            "wrong inner MAC",
            Vxlan {
                inner_dst_mac: B.vtep,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "fragment (the kernel reassembles it)",
            Vxlan {
                frag_off: 0x2000,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "another port",
            Vxlan {
                dport: 4789,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "truncated",
            Vxlan::between(B, A).frame(&inner)[..14 + 20 + 8 + 8 + 14 + 10].to_vec(),
        ),
        (
            "plain traffic",
            ether(NIC_MAC, ROUTER_MAC, ETH_P_IP, &inner),
        ),
    ];
    for (what, frame) in &cases {
        let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, frame);
        assert_eq!((run.verdict, &run.out), (XDP_PASS, frame), "{what}");
    }
    // Without a cookie (XDP not in use by the agent) nothing is decapsulated either.
    dp.update_config(|c| c.xdp_cookie = 0);
    let frame = Vxlan::between(B, A).frame(&inner);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &frame);
    assert_eq!((run.verdict, &run.out), (XDP_PASS, &frame));
    dp.assert_counters(&[]);
}
