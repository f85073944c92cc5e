//! The fast delivery paths end to end: straight into pods (`ENDPOINT_V4`, `bpf_redirect_peer`)
//! as the runtime adds and removes them on the bridge after the agent started, never to an
//! interface index a removed pod left behind; the same for host-gw; and, where frames cross
//! the underlay MTU-sized (TSO/GSO off on the underlay veths, GRO on at the receivers: what a
//! real NIC does), GRO of VXLAN through the agent's GRO device (the default) or XDP
//! decapsulation before GRO (`--xdp on`), surviving `kill -9` of the agents.
//!
//! Root only; the harness builds everything in `ovl-<pid>-…` namespaces and removes it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use overlay_common::names;
use overlay_tests::{
    AttachKind, Capture, Cluster, Node, Pod,
    checks::{
        GRO_DEVICE, NO_FORWARD_RULES, agent_of, assert_ping, assert_tcp, counters, endpoints,
        eth0_programs, forward_drop, gro_device, grown, programs_on, transfer_across_agent_kill9,
        vxlan_over_loopback,
    },
    tshark_fields,
};

const VXLAN: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const HOST_GW: &str = r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "host-gw"}}"#;

/// Two nodes with one pod each, agents running with `config`.
fn two_nodes(config: &str) -> Cluster {
    Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(config)
        .build()
        .unwrap()
}

/// How long the agent may take to reflect a netlink event in its endpoint map.
const EVENT_BOUND: Duration = Duration::from_secs(5);

/// Waits until `node`'s endpoint map satisfies `ok`, at most [`EVENT_BOUND`]; returns it.
fn wait_endpoints(
    node: &Node,
    what: &str,
    ok: impl Fn(&BTreeMap<Ipv4Addr, (u32, String)>) -> bool,
) -> BTreeMap<Ipv4Addr, (u32, String)> {
    let start = Instant::now();
    loop {
        let eps = endpoints(node);
        if ok(&eps) {
            return eps;
        }
        assert!(
            start.elapsed() < EVENT_BOUND,
            "{}: endpoints never {what} within {EVENT_BOUND:?}: {eps:?}",
            node.name()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The pod's MAC as its own namespace reports it.
fn pod_mac(pod: &Pod) -> String {
    pod.ns().mac("eth0").unwrap()
}

/// The host-side veth's interface index of `pod` on `node`.
fn host_ifindex(node: &Node, pod: &Pod) -> u32 {
    node.ns().ifindex(pod.host_veth()).unwrap()
}

/// A counter of the `Ip:` line of `/proc/net/snmp` in the pod's namespace.
fn ip_stat(pod: &Pod, name: &str) -> u64 {
    let snmp = pod.ns().run("cat", &["/proc/net/snmp"]).unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no {name} in {names}"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Sends `count` UDP datagrams from `from` to `to` (which need not exist), one per 10 ms.
fn udp_to(from: &Pod, to: Ipv4Addr, count: u32) {
    let script = format!("for i in $(seq {count}); do echo x > /dev/udp/{to}/9; sleep 0.01; done");
    from.ns().run("bash", &["-c", &script]).unwrap();
}

#[test]
fn pods_added_after_start_are_reached_straight_and_a_reused_ifindex_gets_nothing_of_the_old() {
    let cluster = two_nodes(VXLAN);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let a = cluster.pod(0, 0);

    // A pod added to node 1 after its agent started: known once it has talked.
    let b = n1.add_pod("late").unwrap();
    assert_ping(&a, &b);
    let eps = wait_endpoints(n1, "listed the late pod", |e| e.contains_key(&b.ip()));
    assert_eq!(
        eps[&b.ip()],
        (host_ifindex(n1, &b), pod_mac(&b)),
        "the late pod's veth and MAC"
    );
    // Now its traffic goes straight in: a transfer moves decap_endpoint, never decap_pod.
    let before = counters(n1);
    assert_tcp(&a, &b);
    let d = grown(&before, &counters(n1));
    assert!(d.get("decap_endpoint").copied().unwrap_or(0) >= 10, "{d:?}");
    assert_eq!(d.get("decap_pod"), None, "nothing took the bridge: {d:?}");
    // And the pods of node 0 (added when the cluster was built) too, the other way.
    let before = counters(n0);
    assert_tcp(&b, &a);
    let d = grown(&before, &counters(n0));
    assert!(d.get("decap_endpoint").copied().unwrap_or(0) >= 10, "{d:?}");
    assert_eq!(d.get("decap_pod"), None, "{d:?}");

    // The pod goes: its entry goes with its veth.
    let (old_ip, old_ifindex) = (b.ip(), host_ifindex(n1, &b));
    n1.remove_pod("late").unwrap();
    wait_endpoints(n1, "dropped the removed pod", |e| !e.contains_key(&old_ip));

    // Another pod gets a veth with the very same interface index (and its own address).
    let c = n1.add_pod_with_ifindex("reuse", old_ifindex).unwrap();
    assert_eq!(host_ifindex(n1, &c), old_ifindex);
    assert_ne!(c.ip(), old_ip);
    assert_ping(&a, &c);
    let eps = wait_endpoints(n1, "listed the new pod", |e| e.contains_key(&c.ip()));
    assert_eq!(eps[&c.ip()], (old_ifindex, pod_mac(&c)));
    assert!(!eps.contains_key(&old_ip), "{eps:?}");

    // Traffic for the old address is not delivered to the new pod: it takes the bridge, whose
    // neighbour entry for it is stale. The bridge may flood such a frame (its MAC is unknown
    // now, as with any bridge), but never addressed to the new pod, whose stack drops it
    // before IP; a delivery into the pod would reach its IP layer and count as an address
    // error there.
    let before = counters(n1);
    let addr_errors_before = ip_stat(&c, "InAddrErrors");
    let capture = Capture::start(
        c.ns(),
        "eth0",
        &format!("dst host {old_ip}"),
        cluster.dir().join("reuse.pcap"),
    )
    .unwrap();
    udp_to(&a, old_ip, 20);
    let seen = tshark_fields(&capture.stop().unwrap(), "", &["eth.dst"]).unwrap();
    let new_mac = pod_mac(&c);
    assert!(
        seen.iter().all(|f| f[0] != new_mac),
        "a frame for {old_ip} was addressed to the new pod: {seen:?}"
    );
    assert_eq!(
        ip_stat(&c, "InAddrErrors"),
        addr_errors_before,
        "the new pod's IP layer received traffic for {old_ip}"
    );
    let d = grown(&before, &counters(n1));
    assert_eq!(d.get("decap_endpoint"), None, "{d:?}");
    assert!(d.get("decap_pod").copied().unwrap_or(0) >= 20, "{d:?}");
    // The new pod itself is reached straight.
    let before = counters(n1);
    assert_tcp(&a, &c);
    let d = grown(&before, &counters(n1));
    assert!(d.get("decap_endpoint").copied().unwrap_or(0) >= 10, "{d:?}");
}

/// The kernel forgets a pod's entries on the bridge while the pod's traffic is delivered
/// straight in, past both: its FDB entry ages out, and its stale neighbour entry is
/// garbage-collected once the kernel holds more than `gc_thresh1` (128) neighbours, counting
/// every namespace's (a stock `flannel.1` with 1,000 peers elsewhere on the machine did it in
/// the bench). Neither is news about the pod: its endpoint stays, and its traffic keeps going
/// straight in. When the endpoint went with them, packets crossed the bridge until the kernel
/// learnt the pod again, and one that crossed as the endpoint came back made its connection
/// the kernel's, whose `FORWARD DROP` then dropped it.
#[test]
fn a_pod_keeps_its_endpoint_when_the_kernel_forgets_its_bridge_entries() {
    // No forward rules: they would accept what the kernel forwards for the pods.
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN)
        .agent_args(&[NO_FORWARD_RULES])
        .build()
        .unwrap();
    let nodes = cluster.nodes();
    let pods = [cluster.pod(0, 0), cluster.pod(1, 0)];
    assert_tcp(&pods[0], &pods[1]);
    for (node, pod) in nodes.iter().zip(&pods) {
        forward_drop(node);
        wait_endpoints(node, "listed its pod", |e| e.contains_key(&pod.ip()));
    }
    let before: Vec<_> = nodes.iter().map(counters).collect();
    for (node, pod) in nodes.iter().zip(&pods) {
        let (ip, mac) = (pod.ip().to_string(), pod_mac(pod));
        node.ns()
            .run("ip", &["neigh", "del", &ip, "dev", "cni0"])
            .unwrap();
        node.ns()
            .run(
                "bridge",
                &["fdb", "del", &mac, "dev", pod.host_veth(), "master"],
            )
            .unwrap();
    }
    // The agents hear of both deletions within milliseconds; the endpoints stay all along.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        for (node, pod) in nodes.iter().zip(&pods) {
            assert!(
                endpoints(node).contains_key(&pod.ip()),
                "{} dropped the endpoint of {} when the kernel forgot its entries",
                node.name(),
                pod.ip()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_tcp(&pods[0], &pods[1]);
    assert_tcp(&pods[1], &pods[0]);
    for (node, before) in nodes.iter().zip(&before) {
        let d = grown(before, &counters(node));
        assert!(d.get("decap_endpoint").copied().unwrap_or(0) >= 10, "{d:?}");
        assert_eq!(
            d.get("decap_pod"),
            None,
            "{}: crossed the bridge: {d:?}",
            node.name()
        );
        assert_eq!(d.get("kernel_flow_new"), None, "{}: {d:?}", node.name());
    }
}

/// A TCP transfer from `from` (a pod of `node`) to `to` is picked up at `from`'s veth in front
/// of the bridge (`pod_port_egress`): every encapsulated packet counted there too.
fn assert_picked_up_at_port(node: &Node, from: &Pod, to: &Pod) {
    let before = counters(node);
    assert_tcp(from, to);
    let d = grown(&before, &counters(node));
    let (port, encap) = (
        d.get("pod_port").copied().unwrap_or(0),
        d.get("encap_pod").copied().unwrap_or(0),
    );
    assert!(
        encap >= 10 && port == encap,
        "{}: {port} of {encap} encapsulated packets picked up at the pod's veth: {d:?}",
        node.name()
    );
}

/// Pickup at the pods' veths follows the bridge's MAC address. A bridge without an address of
/// its own (the CNI plugin's, the harness's) takes its lowest port's when pods join, often
/// after the agent attached; an operator may set one. The port program takes only frames to
/// the bridge's MAC, so with a stale one every pod's traffic silently took the bridge.
#[test]
fn pods_are_picked_up_at_their_veth_after_the_bridge_changes_its_mac() {
    let cluster = two_nodes(VXLAN);
    let n0 = cluster.node(0);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    // A pod's veth gets the program once the pod is an endpoint (it has talked).
    assert_ping(&a, &b);
    wait_endpoints(n0, "listed the pod", |e| e.contains_key(&a.ip()));
    assert_picked_up_at_port(n0, &a, &b);

    let new_mac = "02:00:00:00:aa:01";
    n0.ns()
        .ip(&["link", "set", "cni0", "address", new_mac])
        .unwrap();
    agent_of(n0)
        .wait_for_log(
            &format!("pod bridge cni0 now has MAC {new_mac}"),
            EVENT_BOUND,
        )
        .unwrap();
    // The kernel announces no new MAC to the pods; the pod asks again, as after any change.
    // (It also forgot its neighbours on the bridge, so the pod is an endpoint again once it
    // has talked.)
    a.ns().ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    assert_ping(&a, &b);
    wait_endpoints(n0, "listed the pod again", |e| e.contains_key(&a.ip()));
    assert_picked_up_at_port(n0, &a, &b);

    // Frames delivered straight into the pod come from the gateway's new MAC.
    let capture = Capture::start(
        a.ns(),
        "eth0",
        &format!("icmp and src host {}", b.ip()),
        cluster.dir().join("bridge-mac.pcap"),
    )
    .unwrap();
    assert_ping(&b, &a);
    let seen = tshark_fields(&capture.stop().unwrap(), "", &["eth.src"]).unwrap();
    assert!(
        !seen.is_empty() && seen.iter().all(|f| f[0] == new_mac),
        "frames into the pod from {}: {seen:?}",
        b.ip()
    );
}

#[test]
fn host_gw_delivers_known_pods_straight() {
    let cluster = two_nodes(HOST_GW);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_ping(&a, &b);
    wait_endpoints(cluster.node(1), "listed the pod", |e| {
        e.contains_key(&b.ip())
    });
    let before = counters(cluster.node(1));
    assert_tcp(&a, &b);
    let d = grown(&before, &counters(cluster.node(1)));
    assert!(
        d.get("deliver_direct_endpoint").copied().unwrap_or(0) >= 10,
        "{d:?}"
    );
    assert_eq!(d.get("deliver_direct_pod"), None, "{d:?}");
}

/// host-gw has no VXLAN to decapsulate: even where frames arrive MTU-sized and with `--xdp on`
/// no XDP program goes on the underlay, whose veth would otherwise copy every frame for it, and
/// there is no GRO device (one left by an earlier vxlan agent is removed); traffic flows.
#[test]
fn host_gw_never_attaches_xdp_even_where_frames_arrive_mtu_sized() {
    let cluster = nic_like_cluster(2, HOST_GW);
    cluster
        .node(0)
        .ns()
        .ip(&[
            "link", "add", GRO_DEVICE, "type", "vxlan", "external", "dstport", "8472",
        ])
        .unwrap();
    cluster.node(0).start_agent(&[]).unwrap();
    cluster.node(1).start_agent(&["--xdp", "on"]).unwrap();
    for node in cluster.nodes() {
        node.subnet_env().unwrap();
        node.add_pod("p0").unwrap();
    }
    for node in cluster.nodes() {
        assert_xdp_off(node, "XDP decapsulation off on eth0 (host-gw: no VXLAN)");
        assert_eq!(gro_device(node), None, "{}", node.name());
    }
    assert_tcp(&cluster.pod(0, 0), &cluster.pod(1, 0));
}

/// The agent of `node` logged `why` XDP stays off, and no XDP program is on its eth0.
fn assert_xdp_off(node: &Node, why: &str) {
    agent_of(node)
        .wait_for_log(why, Duration::from_secs(5))
        .unwrap();
    let programs = eth0_programs(node);
    assert!(
        programs.iter().all(|(_, kind)| *kind != AttachKind::Xdp),
        "{}: {programs:?}",
        node.name()
    );
}

/// `nodes` nodes without pods or agents yet, on underlay veths that behave like NICs: TSO and
/// GSO off on both ends of every node's link, so frames cross MTU-sized, and GRO on at the
/// receivers (set before the agents start, as a NIC has them).
fn nic_like_cluster(nodes: usize, config: &str) -> Cluster {
    let cluster = Cluster::builder()
        .nodes(nodes)
        .pods_per_node(0)
        .network_config(config)
        .start_agents(false)
        .build()
        .unwrap();
    for node in cluster.nodes() {
        for (ns, dev) in [(node.ns(), "eth0"), (cluster.underlay(), node.name())] {
            ns.run(
                "ethtool",
                &["-K", dev, "tso", "off", "gso", "off", "gro", "on"],
            )
            .unwrap();
        }
    }
    cluster
}

#[test]
fn xdp_on_decapsulates_before_gro_where_frames_arrive_mtu_sized_and_survives_kill9() {
    let cluster = nic_like_cluster(3, VXLAN);
    // Nodes 0 and 1 decapsulate in XDP (`--xdp on`); node 2 is told not to.
    for node in &cluster.nodes()[..2] {
        node.start_agent(&["--xdp", "on"]).unwrap();
    }
    cluster.node(2).start_agent(&["--xdp", "off"]).unwrap();
    for node in cluster.nodes() {
        node.subnet_env().unwrap();
        node.add_pod("p0").unwrap();
    }
    let xdp_on = |node: &Node| {
        eth0_programs(node)
            .iter()
            .any(|(name, kind)| name == names::UNDERLAY_XDP && *kind == AttachKind::Xdp)
    };
    assert!(xdp_on(cluster.node(0)) && xdp_on(cluster.node(1)));
    assert!(!xdp_on(cluster.node(2)), "--xdp off");
    agent_of(cluster.node(0))
        .wait_for_log("XDP decapsulation on eth0", Duration::from_secs(5))
        .unwrap();

    let pods: Vec<Pod> = (0..3).map(|i| cluster.pod(i, 0)).collect();
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if i != j {
                assert_ping(from, to);
            }
        }
    }
    // Node 1 receives a checked transfer: decapsulated in XDP, then aggregated by GRO (fewer
    // packets reach TC than frames XDP saw) and delivered straight into the pod.
    let before = counters(cluster.node(1));
    assert_tcp(&pods[0], &pods[1]);
    let d = grown(&before, &counters(cluster.node(1)));
    let (xdp, delivered) = (
        d.get("xdp_decap").copied().unwrap_or(0),
        d.get("decap_endpoint").copied().unwrap_or(0),
    );
    assert!(xdp > 500, "{d:?}");
    assert!(
        delivered > 0 && delivered < xdp / 2,
        "GRO aggregated nothing: {d:?}"
    );
    assert!(d.keys().all(|k| !k.starts_with("drop_")), "{d:?}");
    // Node 2 (TC only) receives from an XDP node and sends to one: both work.
    assert_tcp(&pods[0], &pods[2]);
    let before = counters(cluster.node(2));
    assert_tcp(&pods[1], &pods[2]);
    let d = grown(&before, &counters(cluster.node(2)));
    assert_eq!(d.get("xdp_decap"), None, "{d:?}");
    assert!(d.get("decap_endpoint").copied().unwrap_or(0) >= 10, "{d:?}");

    // kill -9 of both agents in the middle of a transfer: the pinned XDP link keeps working,
    // the next agents (`--xdp on` again) take it over.
    let r = transfer_across_agent_kill9(
        &cluster.nodes()[..2],
        &pods[0],
        &pods[1],
        256 << 20,
        &["--xdp", "on"],
        || {},
    );
    assert_eq!(r.bytes, 256 << 20);
    for node in &cluster.nodes()[..2] {
        agent_of(node)
            .wait_for_log(
                "underlay_xdp: took over the pinned link on eth0",
                Duration::from_secs(10),
            )
            .unwrap();
        assert!(xdp_on(node));
    }
}

/// Received frames on `node`'s eth0, as the kernel counts them (before GRO).
fn eth0_rx_frames(node: &Node) -> u64 {
    let out = node
        .ns()
        .run("ip", &["-s", "-j", "link", "show", "eth0"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// By default (`--xdp auto`) no XDP goes on a NIC-like veth: the agent's GRO device, a kernel
/// VXLAN device in collect-metadata mode on the VXLAN port, lets the kernel's GRO aggregate
/// the MTU-sized VXLAN frames per inner flow, so `underlay_ingress` decapsulates aggregates.
/// What that device's socket receives itself (here VXLAN over loopback) is dropped and
/// counted, not delivered; a device deleted by hand is recreated with its program.
#[test]
fn gro_aggregates_mtu_sized_vxlan_through_the_gro_device() {
    let cluster = nic_like_cluster(2, VXLAN);
    for node in cluster.nodes() {
        node.start_agent(&[]).unwrap();
    }
    for node in cluster.nodes() {
        node.subnet_env().unwrap();
        node.add_pod("p0").unwrap();
    }
    let gro_ingress = [(names::GRO_DEVICE_INGRESS.to_owned(), AttachKind::TcxIngress)];
    for node in cluster.nodes() {
        assert_xdp_off(node, "--xdp auto");
        let dev = gro_device(node).expect("the GRO device exists");
        assert!(dev.up && dev.external_vxlan && dev.port == 8472, "{dev:?}");
        assert_eq!(programs_on(node, GRO_DEVICE), gro_ingress);
    }
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_ping(&a, &b);

    // A checked transfer to node 1: far fewer packets reach TC than frames arrived.
    let (before, frames_before) = (counters(cluster.node(1)), eth0_rx_frames(cluster.node(1)));
    assert_tcp(&a, &b);
    let d = grown(&before, &counters(cluster.node(1)));
    let frames = eth0_rx_frames(cluster.node(1)) - frames_before;
    let delivered = d.get("decap_endpoint").copied().unwrap_or(0);
    assert!(frames > 500, "{frames} frames");
    assert!(
        delivered > 0 && delivered < frames / 2,
        "GRO aggregated nothing: {frames} frames, {d:?}"
    );
    assert!(d.keys().all(|k| !k.starts_with("drop_")), "{d:?}");

    // VXLAN to the node's own socket over loopback (no program of eth0 sees it): the device's
    // socket decapsulates it, its program drops it.
    let n0 = cluster.node(0);
    let before = counters(n0);
    vxlan_over_loopback(n0, 8472);
    let d = grown(&before, &counters(n0));
    assert!(d.get("drop_gro_device").copied().unwrap_or(0) >= 1, "{d:?}");

    // Deleted by hand: recreated (a new device) with its program, and traffic still aggregates.
    let old = gro_device(n0).unwrap();
    n0.ns().ip(&["link", "del", GRO_DEVICE]).unwrap();
    let start = Instant::now();
    while !gro_device(n0).is_some_and(|d| d.up && d.index != old.index)
        || programs_on(n0, GRO_DEVICE) != gro_ingress
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{GRO_DEVICE} not recreated: {:?}",
            gro_device(n0)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let before = counters(n0);
    vxlan_over_loopback(n0, 8472);
    let d = grown(&before, &counters(n0));
    assert!(d.get("drop_gro_device").copied().unwrap_or(0) >= 1, "{d:?}");
    assert_tcp(&b, &a);
}

#[test]
fn a_veth_underlay_passing_tso_keeps_tc_decapsulation() {
    let cluster = two_nodes(VXLAN);
    for node in cluster.nodes() {
        assert_xdp_off(node, "XDP decapsulation off on eth0");
    }
    assert_tcp(&cluster.pod(0, 0), &cluster.pod(1, 0));
}
