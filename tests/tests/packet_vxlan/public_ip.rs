//! A node whose PublicIP (`--public-ip`, in its lease) is not its interface address, as behind a
//! NAT: it sends VXLAN from the interface address (flannel's `SrcAddr`), accepts VXLAN to
//! either address (a NAT in front of it rewrites the PublicIP to the interface address, or
//! not), nothing else, and refuses both as inner sources.

use super::decap::xdp_then_tc;
use super::*;

#[test]
fn a_node_behind_nat_encapsulates_from_its_interface_address() {
    assert_ne!(N.local_ip, N.public_ip);
    let dp = loaded_node(N, &[B]);
    let inner = udp_packet(host_addr(N, 5), host_addr(B, 7), 64, 40000, 100);
    let run = dp.run(POD_EGRESS, &pod_frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, N, B, &with_ttl_decremented(&inner, 1));
    assert_eq!(
        &run.out[26..30],
        &N.local_ip.octets(),
        "pod_egress: outer source is the interface address, not the PublicIP"
    );

    let from_host = host_echo(N, host_addr(B, 5));
    let frame = ether(HOST_MAC, HOST_MAC, ETH_P_IP, &from_host);
    let run = dp.run(HOST_EGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, N, B, &from_host);
    assert_eq!(
        &run.out[26..30],
        &N.local_ip.octets(),
        "host_egress: outer source"
    );
    dp.assert_counters(&[(Reason::EncapPod, 1), (Reason::EncapHost, 1)]);

    // Its peers send to the PublicIP its lease publishes.
    let dp = loaded_node(B, &[N]);
    let inner = udp_packet(host_addr(B, 5), host_addr(N, 7), 64, 40000, 100);
    let run = dp.run(POD_EGRESS, &pod_frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &run.out[30..34],
        &N.public_ip.octets(),
        "a peer's outer destination"
    );
}

#[test]
fn a_node_behind_nat_accepts_vxlan_to_either_of_its_addresses_only() {
    let mut dp = loaded_node(N, &[B]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(N, 7), 64, 1, 32);
    let to = |outer_dst| {
        Vxlan {
            outer_dst,
            ..Vxlan::between(B, N)
        }
        .frame(&inner)
    };
    for (what, dst) in [
        ("the interface address (the NAT translated)", N.local_ip),
        ("the PublicIP (no translation)", N.public_ip),
    ] {
        // TC alone (no XDP attached) and XDP then TC.
        let run = dp.run(UNDERLAY_INGRESS, &to(dst));
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "TC, to {what}");
        assert_eq!(
            &run.out[14..],
            &with_ttl_decremented(&inner, 1)[..],
            "{what}"
        );
        assert_eq!(
            xdp_then_tc(&dp, &to(dst), true, what),
            TC_ACT_REDIRECT,
            "XDP then TC, to {what}"
        );
    }
    // Another node's address (B's own, and one no node holds): not ours, left to the kernel.
    for dst in [B.local_ip, Ipv4Addr::new(198, 18, 0, 77)] {
        let frame = to(dst);
        let run = dp.run(UNDERLAY_INGRESS, &frame);
        assert_eq!(run.verdict, TC_ACT_OK, "to {dst}");
        assert_eq!(run.out, frame, "to {dst}: untouched");
        assert_eq!(
            xdp_then_tc(&dp, &frame, false, "another address"),
            TC_ACT_OK
        );
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, 8),
        (Reason::XdpDecap, 2),
        (Reason::DecapPod, 4),
    ]);
}

#[test]
fn a_node_behind_nat_refuses_both_its_addresses_as_inner_source() {
    let mut dp = loaded_node(N, &[B]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let mut cases = 0;
    for outer_dst in [N.local_ip, N.public_ip] {
        for src in [N.local_ip, N.public_ip] {
            let frame = Vxlan {
                outer_dst,
                ..Vxlan::between(B, N)
            }
            .frame(&udp_packet(src, host_addr(N, 7), 64, 1, 32));
            let what = format!("inner source {src}, outer destination {outer_dst}");
            assert_eq!(
                xdp_then_tc(&dp, &frame, false, &what),
                TC_ACT_SHOT,
                "{what}"
            );
            cases += 1;
        }
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, cases),
        (Reason::DropInnerSource, cases),
    ]);
}
