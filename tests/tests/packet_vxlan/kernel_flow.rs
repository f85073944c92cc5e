//! Flows the kernel forwarded for a local pod (`KERNEL_FLOW_V4`): Service traffic that
//! kube-proxy's DNAT sent to an endpoint. Filed where the kernel's packets leave (`host_egress`,
//! `underlay_egress`), their replies go to the host device instead of into the pod; and a
//! packet whose destination changed between the pod's veth and the bridge (netfilter's DNAT
//! under `br_netfilter`) is left to the kernel by `pod_egress`. Connections into a pod
//! (`KERNEL_FLOW_IN_V4`, a table of their own) leave the pod's replies to the kernel.

use overlay_common::{
    kernel_flow::{KERNEL_FLOW_IN_V4_CAPACITY, KERNEL_FLOW_V4_CAPACITY},
    names::POD_PORT_EGRESS,
};
use overlay_tests::packet::pin_to_one_cpu;

use super::*;

const POD_IFINDEX: u32 = 21;
/// A Service address (kubeadm's Service CIDR), outside the cluster network.
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// A TCP segment `src:sport` → `dst:dport` with `flags`, TTL 64.
fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    ipv4_packet(src, dst, IPPROTO_TCP, 64, 0, &tcp)
}

/// `A` with a known pod (`ENDPOINT_V4`), whose flow to `B`'s pod the kernel forwarded out of
/// the host device.
fn node_with_a_kernel_flow() -> (Loaded, Ipv4Addr, Ipv4Addr) {
    let mut dp = loaded_node(A, &[B]);
    let (pod, endpoint) = (host_addr(A, 7), host_addr(B, 5));
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let syn = tcp_packet(pod, endpoint, 40000, 80, 0x02);
    let run = dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &syn));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, A, B, &syn);
    (dp, pod, endpoint)
}

/// The endpoint's SYN-ACK of the flow of [`node_with_a_kernel_flow`] goes to the host device,
/// untouched (the kernel's forwarding decrements the TTL), addressed to it so that the stack
/// takes it, not into the pod.
#[track_caller]
fn assert_reply_goes_to_the_host_device(dp: &Loaded, pod: Ipv4Addr, endpoint: Ipv4Addr) {
    let reply = tcp_packet(endpoint, pod, 80, 40000, 0x12);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&reply));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &run.out[..6],
        &HOST_MAC,
        "destination MAC: the host device's"
    );
    assert_eq!(&run.out[6..12], &B.vtep, "source MAC: the sender's VtepMAC");
    assert_eq!(&run.out[14..], &reply[..], "the inner packet, TTL included");
}

#[test]
fn replies_of_a_flow_the_kernel_forwarded_go_back_through_the_kernel() {
    let (dp, pod, endpoint) = node_with_a_kernel_flow();
    dp.assert_counters(&[(Reason::EncapHost, 1), (Reason::KernelFlowNew, 1)]);

    assert_reply_goes_to_the_host_device(&dp, pod, endpoint);

    // The same pods on other ports (a connection of their own, pod to pod) go straight in.
    let direct = tcp_packet(endpoint, pod, 80, 40001, 0x12);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&direct));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &POD_MAC);
    assert_eq!(&run.out[14..], &with_ttl_decremented(&direct, 1)[..]);

    // The flow is filed once, however many packets follow.
    let ack = tcp_packet(pod, endpoint, 40000, 80, 0x10);
    dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &ack));
    dp.assert_counters(&[
        (Reason::EncapHost, 2),
        (Reason::KernelFlowNew, 1),
        (Reason::UnderlayRx, 2),
        (Reason::StackKernelFlow, 1),
        (Reason::DecapEndpoint, 1),
    ]);
}

#[test]
fn an_echo_the_kernel_forwarded_gets_its_reply_through_the_kernel_and_udp_by_its_ports() {
    let mut dp = loaded_node(A, &[B]);
    let (pod, endpoint) = (host_addr(A, 7), host_addr(B, 5));
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let request = ipv4_packet(
        pod,
        endpoint,
        IPPROTO_ICMP,
        63,
        0,
        &icmp_echo(8, 77, 1, b"x"),
    );
    dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &request));
    let datagram = udp_packet(pod, endpoint, 63, 5353, 10);
    dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &datagram));

    let echo_reply = |id| {
        ipv4_packet(
            endpoint,
            pod,
            IPPROTO_ICMP,
            64,
            0,
            &icmp_echo(0, id, 1, b"x"),
        )
    };
    let to_host = dp.run(
        UNDERLAY_INGRESS,
        &Vxlan::between(B, A).frame(&echo_reply(77)),
    );
    assert_eq!(&to_host.out[..6], &HOST_MAC, "the echo's reply");
    let other = dp.run(
        UNDERLAY_INGRESS,
        &Vxlan::between(B, A).frame(&echo_reply(78)),
    );
    assert_eq!(&other.out[..6], &POD_MAC, "another identifier's");
    // `udp_packet` sends to port 5201: the reply comes from there to the pod's 5353.
    let udp_reply = ipv4_packet(
        endpoint,
        pod,
        IPPROTO_UDP,
        64,
        0,
        &udp_datagram(5201, 5353, b"r"),
    );
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&udp_reply));
    assert_eq!(&run.out[..6], &HOST_MAC, "the datagram's reply");
    dp.assert_counters(&[
        (Reason::EncapHost, 2),
        (Reason::KernelFlowNew, 2),
        (Reason::UnderlayRx, 3),
        (Reason::StackKernelFlow, 2),
        (Reason::DecapEndpoint, 1),
    ]);
}

#[test]
fn the_hosts_own_traffic_and_traffic_to_peers_are_not_filed() {
    let dp = loaded_node(A, &[B]);
    // The host (`<subnet>.0`) to a peer's pod: its replies take the host device anyway.
    let host = tcp_packet(A.subnet, host_addr(B, 5), 40000, 80, 0x02);
    dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &host));
    // At the external interface: a pod's packet to a peer's subnet (direct routing sends those
    // there itself) and our own VXLAN are not the kernel's flows.
    let to_peer = tcp_packet(host_addr(A, 7), host_addr(B, 5), 40000, 80, 0x02);
    dp.run(
        UNDERLAY_EGRESS,
        &ether(ROUTER_MAC, NIC_MAC, ETH_P_IP, &to_peer),
    );
    dp.run(UNDERLAY_EGRESS, &Vxlan::between(A, B).frame(&to_peer));
    dp.assert_counters(&[(Reason::EncapHost, 1), (Reason::UnderlayTx, 2)]);
}

#[test]
fn a_pods_packet_the_kernel_routed_out_of_the_cluster_is_filed() {
    let mut dp = loaded_node(A, &[B]);
    let pod = host_addr(A, 7);
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    // A Service endpoint on a member node's own address (a hostNetwork pod, the API server):
    // the kernel routes the pod's packet out of the external interface, unmasqueraded.
    let node_endpoint = B.local_ip;
    let syn = tcp_packet(pod, node_endpoint, 40000, 6443, 0x02);
    assert_eq!(
        dp.run(UNDERLAY_EGRESS, &ether(ROUTER_MAC, NIC_MAC, ETH_P_IP, &syn))
            .verdict,
        TC_ACT_OK
    );
    // The member answers through its host device, over VXLAN.
    let reply = tcp_packet(node_endpoint, pod, 6443, 40000, 0x12);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&reply));
    assert_eq!(&run.out[..6], &HOST_MAC);
    dp.assert_counters(&[
        (Reason::UnderlayTx, 1),
        (Reason::KernelFlowNew, 1),
        (Reason::UnderlayRx, 1),
        (Reason::StackKernelFlow, 1),
    ]);
}

#[test]
fn pod_egress_leaves_a_packet_dnated_after_the_port_to_the_kernel() {
    pin_to_one_cpu();
    let dp = loaded_node(A, &[B]);
    let (pod, endpoint) = (host_addr(A, 7), host_addr(B, 5));
    // The pod sends to a Service address: not for a peer, so the port passes it on.
    let to_service = tcp_packet(pod, SERVICE, 40000, 80, 0x02);
    let run = dp.run(POD_PORT_EGRESS, &pod_frame(&to_service));
    assert_eq!(run.verdict, TC_ACT_OK);
    // The bridge's netfilter DNATed it to a remote pod: the kernel's to forward.
    let dnated = tcp_packet(pod, endpoint, 40000, 80, 0x02);
    let run = dp.run(POD_EGRESS, &pod_frame(&dnated));
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(run.out, pod_frame(&dnated), "left as it is");
    dp.assert_counters(&[(Reason::StackDnat, 1)]);

    // The next packet for the endpoint that did not pass the port (a pod without the port
    // hook yet) is sent on as ever: the note was used up.
    let run = dp.run(POD_EGRESS, &pod_frame(&dnated));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    // Nor does a packet the port passed that arrives unchanged (no DNAT) count as one.
    let outside = tcp_packet(pod, Ipv4Addr::new(198, 19, 0, 1), 40000, 80, 0x02);
    assert_eq!(
        dp.run(POD_PORT_EGRESS, &pod_frame(&outside)).verdict,
        TC_ACT_OK
    );
    assert_eq!(dp.run(POD_EGRESS, &pod_frame(&outside)).verdict, TC_ACT_OK);
    // A packet the port passed, then another one at the bridge (the first went elsewhere):
    // no match, so it is judged on its own.
    assert_eq!(
        dp.run(POD_PORT_EGRESS, &pod_frame(&to_service)).verdict,
        TC_ACT_OK
    );
    let other = tcp_packet(host_addr(A, 8), endpoint, 40000, 80, 0x02);
    assert_eq!(
        dp.run(POD_EGRESS, &pod_frame(&other)).verdict,
        TC_ACT_REDIRECT
    );
    dp.assert_counters(&[(Reason::StackDnat, 1), (Reason::EncapPod, 2)]);
}

/// A local pod's packet `ip` leaves encapsulated from its veth (`pod_port_egress`).
#[track_caller]
fn assert_encapsulated_at_port(dp: &Loaded, ip: &[u8]) {
    assert_eq!(
        dp.run(POD_PORT_EGRESS, &pod_frame(ip)).verdict,
        TC_ACT_REDIRECT
    );
}

/// A remote pod's connection to a port published on this node's address, DNATed by netfilter
/// into a local pod: `pod_ingress` (the bridge's egress) files it as the kernel sends it in,
/// and the local pod's replies, addressed to the remote pod, are left to the kernel (whose
/// conntrack gives them the node's address back) instead of being encapsulated with the pod's
/// own. A remote pod's packet to a pod without an endpoint is our own delivery through the
/// bridge, not the kernel's: not filed.
#[test]
fn replies_in_a_remote_pods_connection_the_kernel_delivered_go_back_through_the_kernel() {
    pin_to_one_cpu();
    let mut dp = loaded_node(A, &[B]);
    let (pod, unknown_pod, client) = (host_addr(A, 7), host_addr(A, 8), host_addr(B, 5));
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let to_bridge = |p: &[u8]| ether(POD_MAC, GW_MAC, ETH_P_IP, p);
    let syn = tcp_packet(client, pod, 50000, 8080, 0x02);
    let run = dp.run(POD_INGRESS, &to_bridge(&syn));
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &to_bridge(&syn)));
    dp.run(
        POD_INGRESS,
        &to_bridge(&tcp_packet(client, unknown_pod, 50001, 8080, 0x02)),
    );
    dp.assert_counters(&[(Reason::KernelFlowNew, 1)]);

    let syn_ack = tcp_packet(pod, client, 8080, 50000, 0x12);
    let run = dp.run(POD_PORT_EGRESS, &pod_frame(&syn_ack));
    assert_eq!(
        (run.verdict, &run.out),
        (TC_ACT_OK, &pod_frame(&syn_ack)),
        "the port passes it on untouched"
    );
    let run = dp.run(POD_EGRESS, &pod_frame(&syn_ack));
    assert_eq!(
        (run.verdict, &run.out),
        (TC_ACT_OK, &pod_frame(&syn_ack)),
        "the bridge leaves it to the kernel, untouched"
    );
    // The pod's own connection to the same remote pod is encapsulated as ever.
    assert_encapsulated_at_port(&dp, &tcp_packet(pod, client, 40000, 8080, 0x02));
    dp.assert_counters(&[
        (Reason::KernelFlowNew, 1),
        (Reason::StackKernelFlow, 1),
        (Reason::PodPort, 1),
        (Reason::EncapPod, 1),
    ]);
}

/// Our own delivery through the bridge, of a packet decapsulated while the pod had no endpoint,
/// carries `BRIDGE_DELIVERY_MARK`: `pod_ingress` clears it and files nothing, even when the
/// endpoint is known by the time the packet reaches the bridge's egress (the agent writes it
/// from another CPU, and the packet may wait there for the bridge's neighbour entry). Filed,
/// the pod-to-pod connection became the kernel's: the pod's next packets went to the kernel,
/// whose `FORWARD DROP` dropped them (an iperf3 stalled in the bench's scale runs, where the
/// kernel's garbage collection of neighbour entries made endpoints come and go).
#[test]
fn our_delivery_through_the_bridge_is_not_filed_even_if_the_endpoint_appeared_meanwhile() {
    pin_to_one_cpu();
    let mut dp = loaded_node(A, &[B]);
    let (pod, remote) = (host_addr(A, 7), host_addr(B, 5));
    let data = tcp_packet(remote, pod, 5201, 40000, 0x10);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&data));
    assert_eq!(
        (run.verdict, run.mark),
        (TC_ACT_REDIRECT, BRIDGE_DELIVERY_MARK),
        "to the bridge, marked"
    );
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let at_bridge = dp.run_marked(POD_INGRESS, &run.out, run.mark);
    assert_eq!(
        (at_bridge.verdict, &at_bridge.out, at_bridge.mark),
        (TC_ACT_OK, &run.out, 0),
        "passed on untouched, the mark cleared"
    );
    // The pod's next packet in that connection is its own: encapsulated as ever.
    assert_encapsulated_at_port(&dp, &tcp_packet(pod, remote, 40000, 5201, 0x10));
    dp.assert_counters(&[
        (Reason::UnderlayRx, 1),
        (Reason::DecapPod, 1),
        (Reason::PodPort, 1),
        (Reason::EncapPod, 1),
    ]);
    // Unmarked, the same packet is the kernel's (a remote pod's connection to a port published
    // on this node, DNATed into the pod): filed.
    assert_eq!(dp.run(POD_INGRESS, &run.out).verdict, TC_ACT_OK);
    assert_eq!(dp.counters().get(Reason::KernelFlowNew.name()), Some(&1));
}

/// A flood of connections into a pod (whoever reaches a published port can open them by the
/// thousand, one SYN each) fills only the inbound table: a Service flow filed before keeps its
/// replies going back through the kernel. When both kinds shared one LRU, the flood evicted
/// the Service flow, and the endpoint's reply went straight into the pod with an address the
/// pod never sent to.
#[test]
fn a_flood_of_connections_into_a_pod_leaves_the_kernels_flows_alone() {
    pin_to_one_cpu();
    let (dp, pod, endpoint) = node_with_a_kernel_flow();
    let to_bridge = |p: &[u8]| ether(POD_MAC, GW_MAC, ETH_P_IP, p);
    // More connections than either table holds, from two outside clients.
    let flood = KERNEL_FLOW_IN_V4_CAPACITY.max(KERNEL_FLOW_V4_CAPACITY) as usize * 5 / 4;
    for i in 0..flood {
        let client = Ipv4Addr::new(198, 19, 200, 1 + (i % 2) as u8);
        let sport = 1024 + (i / 2) as u16;
        let syn = tcp_packet(client, pod, sport, 8080, 0x02);
        assert_eq!(dp.run(POD_INGRESS, &to_bridge(&syn)).verdict, TC_ACT_OK);
    }
    assert_eq!(
        dp.counters().get(Reason::KernelFlowNew.name()),
        Some(&(1 + flood as u64)),
        "the Service flow and every inbound connection filed"
    );
    assert_reply_goes_to_the_host_device(&dp, pod, endpoint);
}

/// A flood of SYNs never answered, four times what the inbound table holds, leaves a live
/// connection into a pod alone: the pod's replies keep going back through the kernel. Nothing
/// of ours makes it so: the kernel's LRU moves an entry that was looked up after its insertion
/// (here by the pod's SYN-ACK and the client's ACK) to its active list, and evicts from the
/// inactive one while that holds more, where entries never looked up again (the flood's) sit.
/// This test keeps that property in view: conntrack's assured flows, the masquerade's two
/// tables, would be what replaces it if it ever went.
#[test]
fn a_flood_of_syns_never_answered_leaves_a_live_connection_into_a_pod_alone() {
    pin_to_one_cpu();
    let mut dp = loaded_node(A, &[B]);
    let (pod, client) = (host_addr(A, 7), host_addr(B, 5));
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let to_bridge = |p: &[u8]| ether(POD_MAC, GW_MAC, ETH_P_IP, p);
    // A remote pod's connection to a port published on this node, DNATed into the pod.
    dp.run(
        POD_INGRESS,
        &to_bridge(&tcp_packet(client, pod, 50000, 8080, 0x02)),
    );
    let syn_ack = tcp_packet(pod, client, 8080, 50000, 0x12);
    assert_eq!(dp.run(POD_EGRESS, &pod_frame(&syn_ack)).verdict, TC_ACT_OK);
    dp.run(
        POD_INGRESS,
        &to_bridge(&tcp_packet(client, pod, 50000, 8080, 0x10)),
    );

    let flood = KERNEL_FLOW_IN_V4_CAPACITY as usize * 4;
    for i in 0..flood {
        let outside = Ipv4Addr::new(198, 19, 200, 1 + (i % 8) as u8);
        let syn = tcp_packet(outside, pod, 1024 + (i / 8) as u16, 8080, 0x02);
        assert_eq!(dp.run(POD_INGRESS, &to_bridge(&syn)).verdict, TC_ACT_OK);
    }
    assert_eq!(
        dp.counters().get(Reason::KernelFlowNew.name()),
        Some(&(1 + flood as u64)),
        "every SYN filed"
    );
    let data = tcp_packet(pod, client, 8080, 50000, 0x18);
    let run = dp.run(POD_EGRESS, &pod_frame(&data));
    assert_eq!(
        (run.verdict, &run.out),
        (TC_ACT_OK, &pod_frame(&data)),
        "the pod's reply is still the kernel's, untouched"
    );
    assert_eq!(
        dp.counters().get(Reason::StackKernelFlow.name()),
        Some(&2),
        "the SYN-ACK and the reply after the flood"
    );
    assert_eq!(dp.counters().get(Reason::EncapPod.name()), None);
}

/// `B`'s packet `ip` for the pod is decapsulated straight into it (`decap_endpoint`).
#[track_caller]
fn assert_goes_into_the_pod(dp: &Loaded, ip: &[u8]) {
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(ip));
    assert_eq!(
        (run.verdict, &run.out[..6]),
        (TC_ACT_REDIRECT, &POD_MAC[..]),
        "straight into the pod"
    );
}

/// A pod's own connection on the tuple of a Service flow the kernel forwarded earlier (the same
/// source port, now straight to the endpoint: a headless Service, a scrape of pod addresses)
/// is the pod's. Its first packet reaches `pod_egress` as the pod sent it (a Service flow's
/// arrive rewritten by netfilter), which makes the old filing go, so the endpoint's replies go
/// into the pod. Filings are never expired by time: without this the tuple stayed the
/// kernel's for good, and its replies went to the host device, where conntrack has no such
/// connection (kube-proxy's rules drop them as INVALID).
#[test]
fn a_pods_own_connection_on_the_tuple_of_an_old_service_flow_is_its_own() {
    pin_to_one_cpu();
    let (dp, pod, endpoint) = node_with_a_kernel_flow();
    assert_reply_goes_to_the_host_device(&dp, pod, endpoint);
    let syn = tcp_packet(pod, endpoint, 40000, 80, 0x02);
    assert_eq!(
        dp.run(POD_EGRESS, &pod_frame(&syn)).verdict,
        TC_ACT_REDIRECT
    );
    assert_goes_into_the_pod(&dp, &tcp_packet(endpoint, pod, 80, 40000, 0x12));
    dp.assert_counters(&[
        (Reason::KernelFlowNew, 1),
        (Reason::UnderlayRx, 2),
        (Reason::StackKernelFlow, 1),
        (Reason::EncapHost, 1),
        (Reason::EncapPod, 1),
        (Reason::DecapEndpoint, 1),
    ]);
}

/// The other way round: a remote pod's connection straight to a pod, on the tuple of its
/// earlier connection that the kernel DNATed into the pod from a port published on the node,
/// is the remote pod's own. Decapsulated for the pod itself (the published port's packets
/// are addressed to the node), it makes the old filing go, and the pod's replies are
/// encapsulated again instead of being left to the kernel.
#[test]
fn a_remote_pods_own_connection_on_the_tuple_of_an_old_published_one_is_its_own() {
    pin_to_one_cpu();
    let mut dp = loaded_node(A, &[B]);
    let (pod, client) = (host_addr(A, 7), host_addr(B, 5));
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let to_bridge = |p: &[u8]| ether(POD_MAC, GW_MAC, ETH_P_IP, p);
    dp.run(
        POD_INGRESS,
        &to_bridge(&tcp_packet(client, pod, 50000, 8080, 0x02)),
    );
    let syn_ack = tcp_packet(pod, client, 8080, 50000, 0x12);
    assert_eq!(
        dp.run(POD_EGRESS, &pod_frame(&syn_ack)).verdict,
        TC_ACT_OK,
        "the published port's connection: the kernel's"
    );
    assert_goes_into_the_pod(&dp, &tcp_packet(client, pod, 50000, 8080, 0x02));
    assert_eq!(
        dp.run(POD_EGRESS, &pod_frame(&syn_ack)).verdict,
        TC_ACT_REDIRECT,
        "the pod's answer to the new connection: encapsulated"
    );
    dp.assert_counters(&[
        (Reason::KernelFlowNew, 1),
        (Reason::StackKernelFlow, 1),
        (Reason::UnderlayRx, 1),
        (Reason::DecapEndpoint, 1),
        (Reason::EncapPod, 1),
    ]);
}
