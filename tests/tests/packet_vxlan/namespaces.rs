//! Tests that need real devices (network namespaces): the MTU checks, a stock flannel node,
//! the agent's `Datapath` driving the programs.

use super::*;

/// The MTU check runs against real devices: the host device (tunnel MTU) when there is one,
/// else the underlay MTU minus the overhead. A namespace provides devices with those MTUs.
#[test]
fn pod_egress_hands_packets_too_big_for_the_tunnel_to_the_kernel() {
    require_root("packet_vxlan");
    let ns = NetNs::new(format!("{}-mtu", unique_id())).unwrap();
    // veth pairs (the kernel has no dummy driver); only the MTUs matter.
    ns.ip(&[
        "link", "add", "ovl0", "mtu", "1450", "type", "veth", "peer", "name", "ovl0p",
    ])
    .unwrap();
    ns.ip(&[
        "link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.in_netns(|| {
        // SAFETY: C strings; if_nametoindex resolves in this thread's namespace.
        let (host, underlay) = unsafe {
            (
                libc::if_nametoindex(c"ovl0".as_ptr()),
                libc::if_nametoindex(c"eth0".as_ptr()),
            )
        };
        assert!(host != 0 && underlay != 0);
        let mut dp = loaded_node(A, &[B]);
        let frame_of = |ip_len: usize| {
            pod_frame(&udp_packet(
                host_addr(A, 5),
                host_addr(B, 7),
                64,
                1,
                ip_len - 28,
            ))
        };
        for (host_ifindex, via) in [
            (host, "host device MTU 1450"),
            (0, "underlay MTU 1500 - 50"),
        ] {
            dp.update_config(|c| {
                c.host_ifindex = host_ifindex;
                c.underlay_ifindex = underlay;
            });
            let fits = dp.run(POD_EGRESS, &frame_of(1450));
            assert_eq!(fits.verdict, TC_ACT_REDIRECT, "{via}: 1450 bytes fit");
            assert_eq!(fits.out.len(), 14 + 1500);
            let too_big = frame_of(1451);
            let run = dp.run(POD_EGRESS, &too_big);
            assert_eq!(
                (run.verdict, &run.out),
                (TC_ACT_OK, &too_big),
                "{via}: 1451 bytes go to the kernel"
            );
        }
        dp.assert_counters(&[(Reason::EncapPod, 2), (Reason::StackMtu, 2)]);
        Ok(())
    })
    .unwrap();
}

/// Sends `frame` out of `ifname` with a packet socket in this thread's namespace and returns
/// the first incoming frame `want` accepts within `timeout`.
fn send_and_receive(
    ifname: &std::ffi::CStr,
    frame: &[u8],
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor we own; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
        if sll.sll_ifindex == 0 {
            bail!("no interface {ifname:?}");
        }
        let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error()).context("bind");
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let tv_len = size_of::<libc::timeval>() as libc::socklen_t;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            tv_len,
        );
        if libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            len,
        ) < 0
        {
            return Err(std::io::Error::last_os_error()).context("send");
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let mut from: libc::sockaddr_ll = zeroed();
            let mut from_len = len;
            let n = libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            );
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let got = &buf[..n as usize];
            if want(got) {
                return Ok(got.to_vec());
            }
        }
        bail!("no matching frame within {timeout:?}")
    }
}

/// Interop at the packet level with a stock kernel VXLAN device: our encapsulated ping from the
/// host of node A goes to a namespace where node B is a stock flannel node (`flannel.1` made as
/// flanneld makes it); its kernel must accept the frame and answer; the answer, a kernel-made
/// VXLAN frame, must decapsulate through `underlay_ingress` to the ping reply.
#[test]
fn a_stock_flannel_node_accepts_our_frame_and_we_accept_its_answer() {
    require_root("packet_vxlan");
    let id = unique_id();
    let snd = NetNs::new(format!("{id}-a")).unwrap();
    let rcv = NetNs::new(format!("{id}-b")).unwrap();
    add_veth(&snd, "eth0", &rcv, "eth0").unwrap();
    snd.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])
        .unwrap();
    snd.ip(&["link", "set", "eth0", "up"]).unwrap();
    rcv.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])
        .unwrap();
    rcv.ip(&["link", "set", "eth0", "up"]).unwrap();
    // Node B as flanneld sets it up (flannel-compat.md §4).
    let vtep_a = "0e:00:00:00:00:01";
    let a_lease = StockPeer {
        subnet: "172.17.1.0/24".parse().unwrap(),
        public_ip: Ipv4Addr::new(198, 18, 0, 1),
        vtep_mac: vtep_a,
    };
    let (local_b, subnet_b) = (
        Ipv4Addr::new(198, 18, 0, 2),
        "172.17.2.0/24".parse().unwrap(),
    );
    stock_vxlan_node(&rcv, local_b, subnet_b, "0e:00:00:00:00:02", &[a_lease]).unwrap();

    // Our frame: the host of A (172.17.1.0) pings B's flannel.1 address, through host_egress.
    let a = loaded_node(A, &[B]);
    let inner = ipv4_packet(
        A.subnet,
        B.subnet,
        IPPROTO_ICMP,
        64,
        0,
        &icmp_echo(8, 0x4242, 1, b"overlay interop"),
    );
    let run = a.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let mut frame = run.out;
    // What bpf_redirect_neigh would put there.
    frame[..6].copy_from_slice(&parse_mac(&rcv.mac("eth0").unwrap()));
    frame[6..12].copy_from_slice(&parse_mac(&snd.mac("eth0").unwrap()));

    let is_vxlan_from_b = |f: &[u8]| {
        f.len() > 64
            && be16(f, 12) == ETH_P_IP
            && f[23] == IPPROTO_UDP
            && f[26..30] == B.local_ip.octets()
            && be16(f, 36) == PORT
    };
    let reply = snd
        .in_netns(|| send_and_receive(c"eth0", &frame, Duration::from_secs(3), is_vxlan_from_b))
        .expect("the stock node answers our VXLAN ping with VXLAN");
    let rx = rcv
        .run("cat", &["/sys/class/net/flannel.1/statistics/rx_packets"])
        .unwrap();
    assert_eq!(rx.trim(), "1", "flannel.1 received our frame");

    // The kernel's answer, as our decapsulation sees it.
    assert_eq!(
        &reply[42..50],
        &[0x08, 0, 0, 0, 0, 0, 1, 0],
        "VXLAN header from flannel.1"
    );
    assert_eq!(&reply[50..56], &A.vtep, "to our VtepMAC");
    let reply_inner = reply[64..].to_vec();
    assert_eq!(
        &reply_inner[12..20],
        &[172, 17, 2, 0, 172, 17, 1, 0],
        "reply 172.17.2.0 -> 172.17.1.0"
    );
    assert_eq!(
        (reply_inner[9], reply_inner[20]),
        (IPPROTO_ICMP, 0),
        "ICMP echo reply"
    );
    assert_eq!(be16(&reply_inner, 24), 0x4242, "our echo id");
    let a = loaded_node(A, &[B]);
    let run = a.run(UNDERLAY_INGRESS, &reply);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &HOST_MAC);
    assert_eq!(&run.out[14..], &reply_inner[..]);
    a.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapHost, 1)]);
}

/// The agent's `Datapath` API end to end: attach to real devices in a namespace, configure,
/// add and remove peers, and check with the programs themselves (test runs against the maps
/// the agent wrote) that encapsulation, member checks and delivery follow.
#[test]
fn the_agent_datapath_drives_the_programs() {
    use overlay_agent::datapath::{Datapath, DatapathError, NodeConfig};
    use overlay_tests::AttachKind::{TcxEgress, TcxIngress};

    require_root("packet_vxlan");
    let ns = NetNs::new(format!("{}-dp", unique_id())).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    ns.ip(&[
        "link",
        "add",
        "ovl0",
        "mtu",
        "1450",
        "address",
        "02:aa:00:00:00:10",
        "type",
        "veth",
        "peer",
        "name",
        "ovl0p",
    ])
    .unwrap();
    let attached = |ifname: &str| {
        let mut progs: Vec<(overlay_tests::AttachKind, String)> =
            overlay_tests::attached_programs(&ns, ifname)
                .unwrap()
                .into_iter()
                .map(|p| (p.kind, p.name))
                .collect();
        progs.sort_by_key(|(k, n)| (k.to_string(), n.clone()));
        progs
    };
    let net = |s: &str| -> ipnet::Ipv4Net { s.parse().unwrap() };

    ns.in_netns(|| {
        let mut dp = Datapath::load()?;
        dp.attach_underlay("eth0")?;
        dp.attach_pod_bridge("cni0")?;
        dp.attach_host_device("ovl0")?;
        assert_eq!(
            attached("eth0"),
            [
                (TcxEgress, UNDERLAY_EGRESS.to_owned()),
                (TcxIngress, UNDERLAY_INGRESS.to_owned())
            ]
        );
        assert_eq!(
            attached("cni0"),
            [
                (TcxEgress, POD_INGRESS.to_owned()),
                (TcxIngress, POD_EGRESS.to_owned())
            ]
        );
        assert_eq!(attached("ovl0"), [(TcxEgress, HOST_EGRESS.to_owned())]);

        let to_b = pod_frame(&udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 1, 10));
        let from_b_to_pod =
            Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 10));
        let from_b_to_host =
            Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), A.subnet, 64, 1, 10));

        // Not configured yet: everything passes.
        assert_eq!(run_prog(dp.ebpf(), POD_EGRESS, &to_b).verdict, TC_ACT_OK);
        let node = NodeConfig::new(
            VNI,
            PORT,
            A.local_ip,
            A.vtep,
            net("172.17.1.1/24"),
            net("172.17.0.0/16"),
        );
        dp.set_config(&node)?;
        dp.upsert_peer(net("172.17.2.0/24"), B.local_ip, B.vtep)?;
        let encapsulated = run_prog(dp.ebpf(), POD_EGRESS, &to_b);
        assert_eq!(encapsulated.verdict, TC_ACT_REDIRECT);
        assert_vxlan(
            &encapsulated.out,
            A,
            B,
            &with_ttl_decremented(&to_b[14..], 1),
        );
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_REDIRECT
        );
        let to_host = run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_host);
        assert_eq!(to_host.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            &to_host.out[..6],
            &[0x02, 0xaa, 0, 0, 0, 0x10],
            "ovl0's MAC, read by the agent"
        );

        // B also holds 172.17.5.0/24; dropping 172.17.2.0/24 keeps B a member.
        dp.upsert_peer(net("172.17.5.0/24"), B.local_ip, B.vtep)?;
        dp.remove_peer(net("172.17.2.0/24"))?;
        assert_eq!(dp.peers().node_refs(B.local_ip), 1);
        assert_eq!(
            run_prog(dp.ebpf(), POD_EGRESS, &to_b).verdict,
            TC_ACT_OK,
            "no route to 172.17.2.0/24 any more"
        );
        let to_b5 = pod_frame(&udp_packet(
            host_addr(A, 5),
            Ipv4Addr::new(172, 17, 5, 7),
            64,
            1,
            10,
        ));
        assert_eq!(
            run_prog(dp.ebpf(), POD_EGRESS, &to_b5).verdict,
            TC_ACT_REDIRECT
        );
        // B speaks for its remaining subnet only (drop_inner_source otherwise).
        let from_b5_to_pod = Vxlan::between(B, A).frame(&udp_packet(
            Ipv4Addr::new(172, 17, 5, 5),
            host_addr(A, 7),
            64,
            1,
            10,
        ));
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b5_to_pod).verdict,
            TC_ACT_REDIRECT,
            "B is still a member"
        );
        dp.remove_peer(net("172.17.5.0/24"))?;
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_SHOT,
            "B is no member any more"
        );

        // The bridge goes away: pod traffic from peers is dropped, and the program detached.
        dp.upsert_peer(net("172.17.2.0/24"), B.local_ip, B.vtep)?;
        dp.detach_pod_bridge()?;
        assert_eq!(attached("cni0"), []);
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_SHOT
        );
        dp.attach_pod_bridge("cni0")?;
        assert_eq!(
            attached("cni0"),
            [
                (TcxEgress, POD_INGRESS.to_owned()),
                (TcxIngress, POD_EGRESS.to_owned())
            ]
        );
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_REDIRECT
        );

        assert!(matches!(
            dp.upsert_peer(net("172.17.1.0/24"), B.local_ip, B.vtep),
            Err(DatapathError::OwnSubnet { .. })
        ));
        assert!(matches!(
            dp.attach_pod_bridge("nonexistent0"),
            Err(DatapathError::Device { .. })
        ));

        let counters: BTreeMap<&str, u64> = dp
            .counters()?
            .into_iter()
            .filter(|(_, c)| c.packets != 0)
            .map(|(r, c)| (r.name(), c.packets))
            .collect();
        let expected: BTreeMap<&str, u64> = [
            ("underlay_rx", 6),
            ("encap_pod", 2),
            ("decap_pod", 3),
            ("decap_host", 1),
            ("drop_unknown_peer", 1),
            ("drop_no_bridge", 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(counters, expected);
        Ok(())
    })
    .unwrap();
}

/// The outer next hop is cached per peer under the routing generation in `CONFIG`
/// (`NEXT_HOP_V4`): looked up in the FIB and cached on a miss, used as it is on a hit (even
/// when the FIB has changed since: that is what the agent's new generation is for), looked up
/// again under a new generation, and never cached without one (generation 0).
#[test]
fn pod_egress_caches_the_outer_next_hop_per_routing_generation() {
    require_root("packet_vxlan");
    let ns = NetNs::new(format!("{}-nexthop", unique_id())).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.ip(&["addr", "add", &format!("{}/24", A.local_ip), "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0p", "up"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    // As on a node (the agent enables it); the FIB helper refuses to route otherwise.
    ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let gateway = Ipv4Addr::new(198, 18, 0, 254);
    ns.in_netns(|| {
        // SAFETY: a C string; if_nametoindex resolves in this thread's namespace.
        let underlay = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert!(underlay != 0);
        let mut dp = loaded_node(A, &[B]);
        let frame = pod_frame(&udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 1, 100));
        let send = |dp: &Loaded| {
            assert_eq!(dp.run(POD_EGRESS, &frame).verdict, TC_ACT_REDIRECT);
            dp.cached_next_hop(B.local_ip)
        };
        let entry = |route_gen: u32, next_hop: Ipv4Addr| {
            Some(NextHopV4 {
                route_gen,
                next_hop: next_hop.octets(),
            })
        };

        dp.update_config(|c| {
            c.underlay_ifindex = underlay;
            c.host_ifindex = 0;
            c.route_gen = 0;
        });
        assert_eq!(send(&dp), None, "generation 0: nothing cached");

        dp.update_config(|c| c.route_gen = 7);
        assert_eq!(
            send(&dp),
            entry(7, B.local_ip),
            "a miss caches B itself (on the link)"
        );

        // B now through a gateway: the same generation keeps the cached next hop...
        ns.ip(&[
            "route",
            "add",
            &format!("{}/32", B.local_ip),
            "via",
            &gateway.to_string(),
        ])
        .unwrap();
        assert_eq!(send(&dp), entry(7, B.local_ip), "a hit is used as cached");
        // ...and a new one looks it up again.
        dp.update_config(|c| c.route_gen = 8);
        assert_eq!(
            send(&dp),
            entry(8, gateway),
            "a new generation follows the FIB"
        );
        ns.ip(&["route", "del", &format!("{}/32", B.local_ip)])
            .unwrap();
        dp.update_config(|c| c.route_gen = 9);
        assert_eq!(send(&dp), entry(9, B.local_ip));
        dp.assert_counters(&[(Reason::EncapPod, 5)]);
        Ok(())
    })
    .unwrap();
}
