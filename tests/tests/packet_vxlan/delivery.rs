//! Delivery straight into local pods (`ENDPOINT_V4`, `bpf_redirect_peer`) after decapsulation.

use super::*;

const POD_IFINDEX: u32 = 21;
const OTHER_POD_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x09];

#[test]
fn underlay_ingress_delivers_a_known_pod_straight_into_it() {
    let mut dp = loaded_node(A, &[B]);
    let pod = host_addr(A, 7);
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let inner = udp_packet(host_addr(B, 5), pod, 64, 1, 100);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &POD_MAC, "destination MAC: the pod's");
    assert_eq!(
        &run.out[6..12],
        &BRIDGE_MAC,
        "source MAC: the bridge's (its gateway)"
    );
    assert_eq!(be16(&run.out, 12), ETH_P_IP);
    assert_eq!(&run.out[14..], &with_ttl_decremented(&inner, 1)[..]);
    assert_eq!(run.mark, 0, "straight into the pod: no mark");
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapEndpoint, 1)]);
    assert_eq!(
        dp.counters_full()["decap_endpoint"].bytes,
        run.out.len() as u64
    );

    // Without a bridge (the runtime deleted it) a known pod is still reached.
    dp.update_config(|c| c.bridge_ifindex = 0);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &POD_MAC);
    // An unknown one then has nowhere to go.
    let unknown = udp_packet(host_addr(B, 5), host_addr(A, 8), 64, 1, 100);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&unknown));
    assert_eq!(run.verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapEndpoint, 2),
        (Reason::DropNoBridge, 1),
    ]);
}

#[test]
fn underlay_ingress_takes_the_bridge_for_a_pod_without_an_endpoint() {
    let mut dp = loaded_node(A, &[B]);
    // Another pod's entry does not make this one known.
    set_endpoint(
        &mut dp.ebpf,
        host_addr(A, 9),
        Some(Endpoint::new(POD_IFINDEX, OTHER_POD_MAC)),
    );
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 100);
    let frame = Vxlan::between(B, A).frame(&inner);
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &run.out[..12],
        &frame[..12],
        "the MACs are left to bpf_redirect_neigh on the bridge"
    );
    assert_eq!(&run.out[14..], &with_ttl_decremented(&inner, 1)[..]);
    assert_eq!(
        run.mark, BRIDGE_DELIVERY_MARK,
        "marked as our delivery for pod_ingress"
    );
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapPod, 1)]);
}

#[test]
fn underlay_ingress_follows_an_endpoint_that_changed_or_went_away() {
    let mut dp = loaded_node(A, &[B]);
    let pod = host_addr(A, 7);
    let inner = udp_packet(host_addr(B, 5), pod, 64, 1, 100);
    let frame = Vxlan::between(B, A).frame(&inner);
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    assert_eq!(&dp.run(UNDERLAY_INGRESS, &frame).out[..6], &POD_MAC);
    // The address moved to another pod (another MAC, another veth): the next packet follows.
    set_endpoint(
        &mut dp.ebpf,
        pod,
        Some(Endpoint::new(POD_IFINDEX + 1, OTHER_POD_MAC)),
    );
    assert_eq!(&dp.run(UNDERLAY_INGRESS, &frame).out[..6], &OTHER_POD_MAC);
    // The pod went (the agent removed its entry): back to the bridge, never the old veth.
    set_endpoint(&mut dp.ebpf, pod, None);
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..12], &frame[..12]);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapEndpoint, 2),
        (Reason::DecapPod, 1),
    ]);
}

#[test]
fn underlay_ingress_never_sends_host_addresses_to_an_endpoint() {
    // Entries for .0 and .1 cannot come from the agent, but even then the host gets them.
    let mut dp = loaded_node(A, &[B]);
    for last in [0, 1] {
        set_endpoint(
            &mut dp.ebpf,
            host_addr(A, last),
            Some(Endpoint::new(POD_IFINDEX, POD_MAC)),
        );
        let inner = udp_packet(host_addr(B, 5), host_addr(A, last), 64, 1, 10);
        let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
        assert_eq!(&run.out[..6], &HOST_MAC, ".{last}");
    }
    dp.assert_counters(&[(Reason::UnderlayRx, 2), (Reason::DecapHost, 2)]);
}
