//! `--ip-masq` end to end: the real agent and etcd, namespace nodes, an outside host
//! (198.19.0.1, its own namespace) that has no route to the pod network, so only masqueraded
//! traffic can come back. The masquerade is the data path's (no iptables or nftables rule is
//! ever written: checked in the node).
//!
//! flannel's last rule (`! -s <cluster> -d <cluster> -j MASQUERADE`) is covered from both of its
//! sources: a host socket bound to the node's underlay address, and the outside host routing
//! the cluster network through node 0 (the underlay namespace, its next hop, gets the route
//! `172.17.0.0/16 via 198.18.0.1`; a route on the outside host itself could not name a gateway
//! that is not on its own link).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Stdio,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, sendto,
        setsockopt, socket, sockopt::ReceiveTimeout,
    },
    time::TimeVal,
};
use overlay_agent::subnet::Mac;
use overlay_common::{
    kernel_flow::{KERNEL_FLOW_IN, KernelFlowKeyV4, KernelFlowV4},
    names,
    nat::{NAT_CLOSE_WINDOW, NatEntryV4, NatKeyV4, SNAT_V4_CAPACITY, SNAT_V4_NEW_CAPACITY},
};
use overlay_tests::{
    Capture, ChildGuard, Cluster, ClusterBuilder, Endpoint, Host, NetNs, Node, OUTSIDE_IP, Pod,
    checks::{
        self, agent_cmd, forward_drop, route_via_missing_gateway, transfer_across_agent_kill9,
        unroute_missing_gateway, wait_forward_rules,
    },
    packet::vxlan_payload,
    traffic, tshark_fields, xfer_bin,
};

/// How long an agent may take to start.
const START: Duration = Duration::from_secs(20);

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;

fn masq_cluster(nodes: usize, pods: usize, extra: &[&str]) -> Cluster {
    masq_builder(nodes, pods, extra).build().unwrap()
}

/// [`masq_cluster`] before it is built, for a test that sets more.
fn masq_builder(nodes: usize, pods: usize, extra: &[&str]) -> ClusterBuilder {
    let mut args = vec!["--ip-masq"];
    args.extend_from_slice(extra);
    Cluster::builder()
        .nodes(nodes)
        .pods_per_node(pods)
        .outside(true)
        .network_config(VXLAN_CONFIG)
        .agent_args(&args)
}

/// The node's counters (`overlay-agent counters`): name → packets.
fn counter(node: &Node, name: &str) -> u64 {
    let out = agent_cmd(node, &["counters"]);
    out.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("`overlay-agent counters` lacks {name}:\n{out}"))
}

/// Flows in the node's masquerade table (`overlay-agent nat`, last line).
/// The flows `overlay-agent nat` counts: (assured, not assured yet).
fn nat_tiers(node: &Node) -> (usize, usize) {
    let out = agent_cmd(node, &["nat"]);
    let last = out.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    match words.as_slice() {
        [
            "entries",
            assured,
            "capacity",
            _,
            "unassured",
            new,
            "capacity",
            _,
        ] => (assured.parse().unwrap(), new.parse().unwrap()),
        _ => panic!("`overlay-agent nat` ends with {last:?}:\n{out}"),
    }
}

/// All masqueraded flows, assured or not.
fn nat_entries(node: &Node) -> usize {
    let (assured, new) = nat_tiers(node);
    assured + new
}

/// Neither iptables nor nftables holds a rule of ours in the node.
fn assert_no_firewall_rules(node: &Node) {
    let saved = node
        .ns()
        .run("iptables-save", &[] as &[&str])
        .unwrap_or_default();
    assert!(
        !saved.contains("MASQUERADE") && !saved.contains("172.17."),
        "iptables in {} holds rules:\n{saved}",
        node.name()
    );
    let nft = node
        .ns()
        .run("nft", &["list", "ruleset"])
        .unwrap_or_default();
    assert!(
        !nft.contains("masquerade") && !nft.contains("172.17."),
        "nftables in {}:\n{nft}",
        node.name()
    );
}

#[test]
fn pods_reach_the_outside_host_as_the_node_by_tcp_udp_and_ping() {
    let cluster = masq_cluster(2, 1, &[]);
    let out = cluster.outside();
    let pod = cluster.pod(0, 0);
    let node = cluster.node(0);
    // The outside host really has no way back to the pods but through masquerade.
    let routes = out
        .ns()
        .run("ip", &["route", "get", &pod.ip().to_string()])
        .unwrap();
    assert!(routes.contains("via 198.19.0.254"), "{routes}");

    let ping = pod.ping(OUTSIDE_IP, 3).unwrap();
    assert!(ping.all_received(), "ping pod -> outside:\n{}", ping.output);

    let t = pod.tcp_transfer(out, 8 << 20).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(node.underlay_ip()),
        "outside sees the node"
    );
    assert_eq!(
        t.client_local.ip(),
        IpAddr::V4(pod.ip()),
        "the pod keeps its own address"
    );

    let u = pod.udp_echo(out, 20).unwrap();
    assert_eq!(u.received, 20, "UDP echoes: {u:?}");
    assert_eq!(u.bad, 0);
    assert!(
        u.server_peers
            .iter()
            .all(|p| p.ip() == IpAddr::V4(node.underlay_ip())),
        "outside sees only the node: {:?}",
        u.server_peers
    );
    // Big datagrams too (fragmented by the pod: the first fragment carries the port).
    let big = traffic::udp_echo_to(&pod, out, OUTSIDE_IP, 5, 1400).unwrap();
    assert_eq!(big.received, 5, "{big:?}");

    assert!(counter(node, "nat_snat") > 0);
    assert!(counter(node, "nat_rev") > 0);
    assert!(counter(node, "nat_new_flow") >= 3);
    assert_eq!(counter(node, "drop_nat_exhausted"), 0);
    assert!(nat_entries(node) >= 3, "{}", agent_cmd(node, &["nat"]));
    for n in cluster.nodes() {
        assert_no_firewall_rules(n);
    }
}

#[test]
fn without_ip_masq_pod_traffic_is_not_translated() {
    let cluster = Cluster::builder()
        .nodes(1)
        .pods_per_node(1)
        .outside(true)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let pod = cluster.pod(0, 0);
    // No masquerade: the outside host cannot answer the pod.
    assert!(
        !pod.ping(OUTSIDE_IP, 2).unwrap().any_received(),
        "must not be masqueraded"
    );
    assert_eq!(counter(cluster.node(0), "nat_snat"), 0);
}

#[test]
fn pods_see_real_pod_addresses_across_nodes_and_excluded_destinations_keep_them() {
    let cluster = masq_cluster(2, 1, &["--ip-masq-exclude", "198.19.0.0/24"]);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    a.ping_until(b.ip(), Duration::from_secs(10)).unwrap();
    let t = a.tcp_transfer(&b, 1 << 20).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(a.ip()),
        "pod -> pod: the real pod address"
    );
    let u = b.udp_echo(&a, 5).unwrap();
    assert_eq!(
        u.server_peers
            .iter()
            .map(std::net::SocketAddr::ip)
            .collect::<Vec<_>>(),
        [IpAddr::V4(b.ip())]
    );
    // Host -> remote pod: the host's sockets reach the cluster through ovl0 and take its
    // address (the lease's .0, as flannel.1's), a cluster source: the remote pod sees it as is.
    let host_addr = cluster
        .node(0)
        .subnet_env()
        .unwrap()
        .subnet
        .trunc()
        .network();
    let t = cluster.node(0).tcp_transfer(&b, 1 << 20).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(host_addr),
        "host -> remote pod source"
    );
    // The outside host is excluded: the pod's own address leaves, and no reply can come back.
    assert!(
        !a.ping(OUTSIDE_IP, 2).unwrap().any_received(),
        "excluded destination was masqueraded"
    );
    assert_eq!(counter(cluster.node(0), "nat_snat"), 0);
    assert_eq!(nat_entries(cluster.node(0)), 0);
}

#[test]
fn two_pods_with_the_same_source_port_to_the_same_service_both_work() {
    let cluster = masq_cluster(1, 2, &["--ip-masq-fully-random-disable"]);
    let out = cluster.outside();
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(0, 1));
    // A UDP server on the outside host; both pods send from port 40000 (kept when free, so the
    // second must be moved).
    let port = 7777u16;
    let mut srv = out.ns().command(xfer_bin().unwrap());
    srv.args([
        "udp-serve",
        "--port",
        &port.to_string(),
        "--timeout-ms",
        "20000",
        "--count",
        "6",
        "--idle-ms",
        "5000",
    ])
    .stdout(Stdio::piped());
    let mut srv = ChildGuard::spawn(srv).unwrap();
    let stdout = srv.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening"));
    for pod in [&p0, &p1] {
        let r = pod
            .ns()
            .run(
                xfer_bin().unwrap(),
                &[
                    "udp-send",
                    "--to",
                    &format!("{OUTSIDE_IP}:{port}"),
                    "--count",
                    "3",
                    "--size",
                    "64",
                    "--seed",
                    "1",
                    "--sport",
                    "40000",
                ],
            )
            .unwrap();
        assert!(
            r.contains(&format!("local={}:40000 ", pod.ip())) && r.contains("received=3"),
            "{}: {r}",
            pod.label()
        );
    }
    let done = lines.next().unwrap().unwrap();
    assert!(done.contains("received=6"), "{done}");
    let seen: BTreeSet<&str> = done.split("peers=").nth(1).unwrap().split(',').collect();
    assert_eq!(
        seen.len(),
        2,
        "two translated flows with distinct ports: {done}"
    );
    assert!(seen.iter().all(|p| p.starts_with("198.18.0.1:")), "{done}");
    assert!(
        seen.contains("198.18.0.1:40000"),
        "the first flow keeps its port: {done}"
    );
}

/// Runs `count` concurrent connections from `pod` to `server:port` (server started by caller).
fn many_connections(pod: &Pod, port: u16, count: usize, seed: u64) -> (usize, usize) {
    let mut c = pod.ns().command(xfer_bin().unwrap());
    c.args([
        "tcp-many-send",
        "--to",
        &format!("{OUTSIDE_IP}:{port}"),
        "--count",
        &count.to_string(),
        "--bytes",
        "4096",
        "--seed",
        &seed.to_string(),
        "--timeout-ms",
        "90000",
    ]);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {text} {}",
        pod.label(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, kv) = overlay_tests::xfer::parse_line(text.lines().last().unwrap());
    (kv["connected"].parse().unwrap(), kv["ok"].parse().unwrap())
}

#[test]
fn two_thousand_concurrent_connections_from_several_pods_complete_intact() {
    const PODS: usize = 4;
    const PER_POD: usize = 500;
    let cluster = masq_cluster(1, PODS, &[]);
    let out = cluster.outside();
    let port = 7788u16;
    let seed = 99u64;
    let mut srv = out.ns().command(xfer_bin().unwrap());
    srv.args([
        "tcp-many-serve",
        "--port",
        &port.to_string(),
        "--count",
        &(PODS * PER_POD).to_string(),
        "--bytes",
        "4096",
        "--seed",
        &seed.to_string(),
        "--timeout-ms",
        "120000",
    ])
    .stdout(Stdio::piped());
    let mut srv = ChildGuard::spawn(srv).unwrap();
    let mut lines = BufReader::new(srv.child_mut().stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening"));
    let started = Instant::now();
    let pods = cluster.node(0).pods();
    let results: Vec<(usize, usize)> = thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| s.spawn(move || many_connections(p, port, PER_POD, seed)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let done = lines.next().unwrap().unwrap();
    eprintln!(
        "{} connections in {:?}: {done}",
        PODS * PER_POD,
        started.elapsed()
    );
    for (connected, ok) in &results {
        assert_eq!(
            (*connected, *ok),
            (PER_POD, PER_POD),
            "per pod: {results:?}"
        );
    }
    assert!(
        done.contains(&format!("verified={}", PODS * PER_POD)),
        "{done}"
    );
    assert!(
        done.ends_with("peers=198.18.0.1"),
        "the outside saw only the node: {done}"
    );
    let node = cluster.node(0);
    assert!(
        nat_entries(node) >= PODS * PER_POD,
        "{} flows",
        nat_entries(node)
    );
    assert_eq!(counter(node, "drop_nat_exhausted"), 0);
}

#[test]
fn idle_flows_expire_and_the_table_shrinks() {
    let cluster = masq_cluster(1, 1, &["--dev-nat-timeout", "2"]);
    let out = cluster.outside();
    let pod = cluster.pod(0, 0);
    let node = cluster.node(0);
    // One datagram answered once: not assured; three of one flow: assured.
    for _ in 0..5 {
        let u = pod.udp_echo(out, 1).unwrap();
        assert_eq!(u.received, 1);
    }
    assert_eq!(pod.udp_echo(out, 3).unwrap().received, 3);
    assert!(pod.ping(OUTSIDE_IP, 1).unwrap().all_received());
    let (assured, new) = nat_tiers(node);
    assert!(
        assured >= 1 && new >= 6,
        "five one-shot UDP flows and one ping not assured, one UDP flow assured: {}",
        agent_cmd(node, &["nat"])
    );
    // Idle for 2 s, swept every second: gone within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nat_entries(node) > 0 {
        assert!(
            Instant::now() < deadline,
            "not expired:\n{}",
            agent_cmd(node, &["nat"])
        );
        thread::sleep(Duration::from_millis(250));
    }
    for map in [names::SNAT_V4_REV, names::SNAT_V4_REV_NEW] {
        let dir = node.bpf_dir().join("maps").join(map).display().to_string();
        let dump = node
            .ns()
            .run("bpftool", &["map", "dump", "pinned", &dir])
            .unwrap();
        assert!(
            dump.contains("Found 0 elements") || dump.trim() == "[]",
            "{map} not empty:\n{dump}"
        );
    }
    // And new flows still work afterwards.
    assert_eq!(pod.udp_echo(out, 2).unwrap().received, 2);
}

#[test]
fn a_masqueraded_transfer_survives_kill_9_of_the_agent() {
    let cluster = masq_cluster(1, 1, &[]);
    let out = cluster.outside();
    let pod = cluster.pod(0, 0);
    let node = cluster.node(0);
    const BYTES: u64 = 256 << 20;
    let report =
        transfer_across_agent_kill9(cluster.nodes(), &pod, out, BYTES, &["--ip-masq"], || {});
    assert_eq!(report.bytes, BYTES);
    assert_eq!(report.server_peer.ip(), IpAddr::V4(node.underlay_ip()));
    assert!(
        pod.ping(OUTSIDE_IP, 2).unwrap().all_received(),
        "after the restart"
    );
}

/// A masqueraded flow keeps its next hop in its flow entry, under the routing generation the
/// agent renews at every route change: a changed route to the outside is followed from the
/// flow's next packets, not after the once-a-second renewal.
#[test]
fn a_changed_route_to_the_outside_is_followed_at_once_by_a_masqueraded_flow() {
    let cluster = masq_cluster(1, 1, &[]);
    let (node, pod, out) = (cluster.node(0), cluster.pod(0, 0), cluster.outside());
    let pcap = cluster.dir().join("masq-route-change.pcap");
    let capture = Capture::start(out.ns(), "eth0", "icmp", &pcap).unwrap();
    // One ICMP flow (one identifier) across the change: a ping every 20 ms for 2.4 s.
    let mut ping = pod.ns().command("ping");
    ping.args([
        "-n",
        "-q",
        "-i",
        "0.02",
        "-c",
        "120",
        &OUTSIDE_IP.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut ping = ChildGuard::spawn(ping).unwrap();
    thread::sleep(Duration::from_millis(600));
    let added = SystemTime::now();
    let host_route = route_via_missing_gateway(node, &format!("{OUTSIDE_IP}/32"));
    thread::sleep(Duration::from_millis(600));
    unroute_missing_gateway(node, &host_route);
    let removed = SystemTime::now();
    ping.wait_timeout(Duration::from_secs(10)).unwrap();
    let pcap = capture.stop().unwrap();

    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let (added, removed) = (secs(added), secs(removed));
    let arrivals: Vec<f64> = tshark_fields(&pcap, "icmp.type == 8", &["frame.time_epoch"])
        .unwrap()
        .iter()
        .map(|f| f[0].parse().unwrap())
        .collect();
    // The route command returns after the kernel changed the route; the agent renews the
    // generation on the netlink event a moment later. 50 ms allows for that and for the
    // request in flight.
    let stale: Vec<f64> = arrivals
        .iter()
        .copied()
        .filter(|&t| t > added + 0.05 && t < removed)
        .collect();
    assert!(
        stale.is_empty(),
        "{} echo request(s) reached the outside host by the old route after it changed (at \
         {:?} s after the change)",
        stale.len(),
        stale.iter().map(|t| t - added).collect::<Vec<_>>()
    );
    let before = arrivals.iter().filter(|&&t| t < added).count();
    let after = arrivals.iter().filter(|&&t| t > removed).count();
    assert!(
        before >= 10 && after >= 10,
        "the flow must run before and after the change: {before} requests before, {after} after"
    );
}

/// The host device's address of `node` (`<lease>.0`, as flannel.1's): what flannel's
/// MASQUERADE picks for traffic into the cluster through VXLAN.
fn host_device_ip(node: &Node) -> Ipv4Addr {
    node.subnet_env().unwrap().subnet.trunc().network()
}

/// `ping -I <source> <dst>` in `node`, bounded; whether every echo came back.
fn ping_from(node: &Node, source: Ipv4Addr, dst: Ipv4Addr) -> (bool, String) {
    let out = node
        .ns()
        .exec(
            "ping",
            &[
                "-n",
                "-c",
                "3",
                "-W",
                "1",
                "-i",
                "0.2",
                "-I",
                &source.to_string(),
                &dst.to_string(),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.contains("3 received"), text)
}

#[test]
fn a_host_socket_on_the_node_address_reaches_a_remote_pod_as_the_host_device_address() {
    let cluster = masq_cluster(2, 1, &[]);
    let (node, pod) = (cluster.node(0), cluster.pod(1, 0));
    let masq = host_device_ip(node);
    // The peer is known once the host reaches the pod from its own (cluster) address.
    node.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();

    let (ok, text) = ping_from(node, node.underlay_ip(), pod.ip());
    assert!(ok, "ping -I {} {}:\n{text}", node.underlay_ip(), pod.ip());
    let t = traffic::tcp_transfer_bound(
        node,
        Some(node.underlay_ip()),
        &pod,
        pod.ip(),
        4 << 20,
        traffic::TCP_TIMEOUT,
    )
    .unwrap();
    assert_eq!(
        t.client_local.ip(),
        IpAddr::V4(node.underlay_ip()),
        "the client is bound to the underlay address"
    );
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(masq),
        "the pod sees node 0's host device address, not {}",
        node.underlay_ip()
    );
    assert!(counter(node, "nat_snat") > 0);
    assert!(counter(node, "nat_rev") > 0);
    let flows = agent_cmd(node, &["nat"]);
    assert!(
        flows
            .lines()
            .any(|l| l.contains("to-cluster") && l.contains(&format!("via {masq}:"))),
        "{flows}"
    );
    // The pod's node translated nothing: the pod answered .0, a cluster address.
    assert_eq!(counter(cluster.node(1), "nat_snat"), 0);
    for n in cluster.nodes() {
        assert_no_firewall_rules(n);
    }
}

/// Without `--ip-masq` the pod sees the underlay address itself. It still works, over an
/// asymmetric path: the request goes encapsulated through ovl0, the pod's answer to
/// 198.18.0.1 (not a cluster address) leaves node 1 unencapsulated through its kernel's
/// forwarding (so node 1's FORWARD chain sees it) straight to node 0 on the shared segment.
#[test]
fn without_ip_masq_a_host_socket_on_the_node_address_is_seen_as_it_is() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (node, pod) = (cluster.node(0), cluster.pod(1, 0));
    node.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();
    let t = traffic::tcp_transfer_bound(
        node,
        Some(node.underlay_ip()),
        &pod,
        pod.ip(),
        1 << 20,
        traffic::TCP_TIMEOUT,
    )
    .unwrap();
    assert_eq!(t.server_peer.ip(), IpAddr::V4(node.underlay_ip()));
    assert_eq!(counter(node, "nat_snat"), 0);
    assert_eq!(counter(cluster.node(1), "nat_snat"), 0);
}

/// Routes the cluster network through `node` in the underlay namespace, the outside host's
/// next hop.
fn route_cluster_through(cluster: &Cluster, node: &Node) {
    cluster
        .underlay()
        .ip(&[
            "route",
            "add",
            "172.17.0.0/16",
            "via",
            &node.underlay_ip().to_string(),
        ])
        .unwrap();
}

#[test]
fn an_outside_host_routing_the_cluster_through_a_node_reaches_remote_pods_as_that_node() {
    let cluster = masq_cluster(2, 1, &[]);
    let (out, node, pod) = (cluster.outside(), cluster.node(0), cluster.pod(1, 0));
    let masq = host_device_ip(node);
    route_cluster_through(&cluster, node);
    out.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();
    let t = out.tcp_transfer(&pod, 4 << 20).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(masq),
        "the pod sees node 0's host device address, not the outside host"
    );
    let u = out.udp_echo(&pod, 10).unwrap();
    assert_eq!((u.received, u.bad), (10, 0), "{u:?}");
    assert!(
        u.server_peers.iter().all(|p| p.ip() == IpAddr::V4(masq)),
        "{:?}",
        u.server_peers
    );
    // The pod's node translated nothing; node 0 translated both ways.
    assert_eq!(counter(cluster.node(1), "nat_snat"), 0);
    assert!(counter(node, "nat_rev") > 0);
    for n in cluster.nodes() {
        assert_no_firewall_rules(n);
    }

    // The outside host's packets reach ovl0 only through node 0's kernel forwarding. Under
    // FORWARD policy DROP (as Docker sets it) the agent writes flanneld's forward rules
    // (`-d <cluster> -j ACCEPT`), so they still pass; the replies bypass FORWARD anyway.
    forward_drop(node);
    wait_forward_rules(node, "172.17.0.0/16");
    out.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();
    let t = out.tcp_transfer(&pod, 1 << 20).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(masq),
        "under FORWARD DROP too"
    );
}

/// Without `--ip-masq`, under Docker's FORWARD DROP, a pod reaches an outside host that routes
/// the cluster network through the pod's node, by TCP, UDP and ping, and is seen by its own
/// address, as under flanneld: both directions cross the node's kernel forwarding, which the
/// agent's flanneld forward rules (`-s`/`-d <cluster> -j ACCEPT`) let through.
#[test]
fn without_ip_masq_pods_reach_the_outside_under_forward_drop() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .outside(true)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (out, node, pod) = (cluster.outside(), cluster.node(0), cluster.pod(0, 0));
    route_cluster_through(&cluster, node);
    forward_drop(node);
    wait_forward_rules(node, "172.17.0.0/16");
    let ping = pod.ping(OUTSIDE_IP, 3).unwrap();
    assert!(ping.all_received(), "ping pod -> outside:\n{}", ping.output);
    let t = pod.tcp_transfer(out, 4 << 20).unwrap();
    assert_eq!(t.server_peer.ip(), IpAddr::V4(pod.ip()), "not masqueraded");
    let u = pod.udp_echo(out, 10).unwrap();
    assert_eq!((u.received, u.bad), (10, 0), "{u:?}");
    assert!(
        u.server_peers
            .iter()
            .all(|p| p.ip() == IpAddr::V4(pod.ip())),
        "{:?}",
        u.server_peers
    );
    assert_eq!(counter(node, "nat_snat"), 0);
}

/// A node whose `net.ipv4.ip_forward` is 0 (a fresh host) gets it turned on by the agent
/// (flanneld leaves it to Docker or kubelet): without `--ip-masq` a pod's traffic to the outside
/// is forwarded by the kernel, which would otherwise drop it. Every other test's nodes start
/// with forwarding on.
#[test]
fn the_agent_turns_ip_forwarding_on() {
    let cluster = Cluster::builder()
        .nodes(1)
        .outside(true)
        .start_agents(false)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    node.ns().sysctl("net.ipv4.ip_forward", "0").unwrap();
    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log("wrote ", Duration::from_secs(30))
        .unwrap();
    assert_eq!(node.ns().sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    let pod = node.add_pod("p0").unwrap();
    route_cluster_through(&cluster, node);
    let ping = pod.ping(OUTSIDE_IP, 3).unwrap();
    assert!(ping.all_received(), "ping pod -> outside:\n{}", ping.output);
}

/// The same outside host, routing the cluster network through node 0, to node 0's own pod:
/// flannel never masquerades outside → local pod (`! -s <cluster> -d <pod> -j RETURN`), and
/// MASQUERADE leaves the replies of that connection alone. The pod sees the outside host's
/// address and answers from its own: `pod_ingress` filed the connection as the kernel sent it
/// into the pod, so neither `pod_egress` nor `underlay_egress` takes the replies for a new flow.
#[test]
fn an_outside_host_routing_the_cluster_through_a_node_reaches_its_pods_unmasqueraded() {
    let cluster = masq_cluster(2, 1, &[]);
    let (node, pod) = (cluster.node(0), cluster.pod(0, 0));
    route_cluster_through(&cluster, node);
    assert_outside_host_answered_unmasqueraded(cluster.outside(), &pod, node);
}

/// The outside host (routed to the cluster network) reaches `pod` on `node` by ping, TCP and
/// UDP, and the pod sees the host's address and answers from its own: `node` translated no
/// reply and filed the connections (TCP and UDP).
fn assert_outside_host_answered_unmasqueraded(out: &Host, pod: &Pod, node: &Node) {
    out.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();
    let t = out.tcp_transfer(pod, 4 << 20).unwrap();
    assert_eq!(t.server_peer.ip(), IpAddr::V4(out.ip()), "not masqueraded");
    let u = out.udp_echo(pod, 10).unwrap();
    assert_eq!((u.received, u.bad), (10, 0), "{u:?}");
    assert!(
        u.server_peers
            .iter()
            .all(|p| p.ip() == IpAddr::V4(out.ip())),
        "{:?}",
        u.server_peers
    );
    assert_eq!(counter(node, "nat_snat"), 0, "no reply translated");
    assert!(counter(node, "kernel_flow_new") >= 2);
}

/// The same outside host, routing the cluster network through node 0, which runs without
/// `--ip-masq` (as a stock flanneld may), to a pod on node 1, which runs with it: node 0
/// forwards the outside host's packets over VXLAN untranslated, and node 1 decapsulates them
/// straight into the pod, past any conntrack. flannel's MASQUERADE on node 1 would leave the
/// replies of that connection alone; so must ours: decapsulation files the connection, and
/// `pod_egress` sends the replies on with the pod's own address (`nat_inbound_reply`), where
/// it used to masquerade them as a new flow, which the outside host's sockets refused.
#[test]
fn an_outside_host_forwarded_over_vxlan_by_a_node_without_masquerade_gets_the_pods_own_replies() {
    let cluster = masq_builder(2, 1, &[])
        .node_agent_args(0, &[])
        .build()
        .unwrap();
    let (node, pod) = (cluster.node(1), cluster.pod(1, 0));
    route_cluster_through(&cluster, cluster.node(0));
    assert_outside_host_answered_unmasqueraded(cluster.outside(), &pod, node);
    assert!(counter(node, "nat_inbound_reply") > 0);
    assert!(counter(node, "decap_endpoint") > 0, "straight into the pod");
}

/// An upgrade from an agent that kept connections into pods in `KERNEL_FLOW_V4`, beside the
/// Service flows, to one with a table of their own (`KERNEL_FLOW_IN_V4`): the new agent moves
/// them over, so a connection from an outside host (routed to the cluster through the node)
/// keeps its replies unmasqueraded even when the pod speaks first after the upgrade. Shown by
/// putting the connection's entry where the older agent kept it, while the agent is down;
/// left behind there, the pod's next segment would be masqueraded as a new flow, which the
/// outside host's socket never sees.
#[test]
fn connections_into_a_pod_keep_their_replies_across_the_upgrade_that_splits_the_flow_tables() {
    let cluster = masq_cluster(1, 1, &[]);
    let (node, pod, out) = (cluster.node(0), cluster.pod(0, 0), cluster.outside());
    route_cluster_through(&cluster, node);
    out.ping_until(pod.ip(), Duration::from_secs(10)).unwrap();
    let listener = pod
        .ns()
        .in_netns(|| Ok(TcpListener::bind((pod.ip(), 0))?))
        .unwrap();
    let to = SocketAddrV4::new(pod.ip(), listener.local_addr().unwrap().port());
    let mut client = out
        .ns()
        .in_netns(|| {
            Ok(TcpStream::connect_timeout(
                &to.into(),
                Duration::from_secs(5),
            )?)
        })
        .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(out.ip()), "not masqueraded");
    for end in [&client, &server] {
        end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let exchange = |from: &mut TcpStream, to: &mut TcpStream, what: &[u8]| {
        from.write_all(what).unwrap();
        let mut got = vec![0; what.len()];
        to.read_exact(&mut got).unwrap();
        assert_eq!(got, what);
    };
    exchange(&mut client, &mut server, b"before");
    exchange(&mut server, &mut client, b"answer");

    node.agent().unwrap().kill().unwrap();
    // The older layout: inbound connections in the one table, no inbound table pinned.
    let maps = node.bpf_dir().join("maps");
    let open = |name: &str| {
        let data = MapData::from_pin(maps.join(name)).unwrap();
        AyaHashMap::<_, KernelFlowKeyV4, KernelFlowV4>::try_from(Map::LruHashMap(data)).unwrap()
    };
    let inbound: Vec<_> = open(names::KERNEL_FLOW_IN_V4)
        .iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        inbound.iter().any(|(k, _)| k.pod == pod.ip().octets()
            && k.pod_port == to.port().to_be_bytes()
            && k.way == KERNEL_FLOW_IN),
        "the connection is filed as the kernel's: {inbound:?}"
    );
    let mut all = open(names::KERNEL_FLOW_V4);
    for (k, v) in &inbound {
        all.insert(k, v, 0).unwrap();
    }
    std::fs::remove_file(maps.join(names::KERNEL_FLOW_IN_V4)).unwrap();

    let agent = node.start_agent(&["--ip-masq"]).unwrap();
    agent.wait_for_log("data path attached", START).unwrap();
    let said = format!(
        "{} inbound connections moved from {} into the new {}",
        inbound.len(),
        names::KERNEL_FLOW_V4,
        names::KERNEL_FLOW_IN_V4
    );
    assert!(agent.log().contains(&said), "{said}:\n{}", agent.log());
    // The pod first: nothing from the outside host has filed the connection again.
    exchange(&mut server, &mut client, b"after the upgrade");
    exchange(&mut client, &mut server, b"and back");
    assert_eq!(counter(node, "nat_snat"), 0, "no segment masqueraded");
}

/// Issue 12, item 1: with `--ip-masq`, a pod sends VXLAN to a member node's UDP 8472 whose
/// inner packet is for that node's pod. Masqueraded, it would carry its node's PublicIP and be
/// decapsulated there as member traffic; it is dropped at the pod's node and counted instead,
/// and the target pod receives nothing.
#[test]
fn a_pod_cannot_pass_vxlan_off_as_its_nodes_through_the_masquerade() {
    let cluster = masq_cluster(2, 1, &[]);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (attacker, target) = (cluster.pod(0, 0), cluster.pod(1, 0));
    checks::assert_ping(&attacker, &target);
    let port = 7777;
    let sock = target
        .ns()
        .in_netns(move || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?))
        .unwrap();
    // What n1 accepts from n0: n1's VtepMAC (public, in etcd), an inner source of n0's subnet.
    let vtep1 = Mac::for_public_ip(n1.underlay_ip()).octets();
    let payload = vxlan_payload(
        1,
        vtep1,
        [0x02, 0, 0, 0, 0, 0x66],
        attacker.ip(),
        target.ip(),
        port,
        b"injected",
    );
    const N: usize = 5;
    let (before0, before1) = (checks::counters(n0), checks::counters(n1));
    traffic::send_udp(
        attacker.ns(),
        attacker.ip(),
        (n1.underlay_ip(), 8472).into(),
        &payload,
        N,
    )
    .unwrap();
    let got = traffic::drain(&sock).unwrap();
    assert!(got.is_empty(), "the target pod received {got:?}");
    let grew0 = checks::grown(&before0, &checks::counters(n0));
    assert_eq!(
        grew0.get("drop_pod_vxlan"),
        Some(&(N as u64)),
        "n0 drops and counts the pod's VXLAN: {grew0:?}"
    );
    let grew1 = checks::grown(&before1, &checks::counters(n1));
    for decap in ["decap_pod", "decap_endpoint", "xdp_decap"] {
        assert_eq!(grew1.get(decap), None, "n1 decapsulated nothing: {grew1:?}");
    }
    // The pod's ordinary traffic to the outside is masqueraded as before.
    assert!(attacker.ping(OUTSIDE_IP, 2).unwrap().all_received());
}

/// Issue 12, item 3: replies of a masqueraded flow that the outside host fragments reach the
/// pod whole (the later fragments follow the first, translated back), and an ICMP error the
/// pod sends about a reply of its flow leaves translated: from the node's address, quoting the
/// reply as the outside host sent it (so its socket gets the error), never the pod's address.
#[test]
fn fragmented_replies_and_a_pods_icmp_errors_cross_the_masquerade_translated() {
    let cluster = masq_cluster(1, 1, &[]);
    let (node, pod, out) = (cluster.node(0), cluster.pod(0, 0), cluster.outside());
    assert_eq!(out.ns().mtu("eth0").unwrap(), 1500);
    let big = traffic::udp_echo_to(&pod, out, OUTSIDE_IP, 5, 3000).unwrap();
    assert_eq!(
        big.received, 5,
        "3000-byte echoes, fragmented both ways: {big:?}"
    );
    assert_eq!(big.bad, 0);

    // A flow from the pod; the outside host answers after the pod's socket is gone.
    let pod_sock = pod
        .ns()
        .in_netns({
            let ip = pod.ip();
            move || Ok(UdpSocket::bind((ip, 0))?)
        })
        .unwrap();
    let out_sock = out
        .ns()
        .in_netns(|| Ok(UdpSocket::bind((OUTSIDE_IP, 0))?))
        .unwrap();
    pod_sock
        .send_to(b"request", out_sock.local_addr().unwrap())
        .unwrap();
    out_sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let (_, seen) = out_sock.recv_from(&mut buf).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(node.underlay_ip()), "masqueraded");
    drop(pod_sock);

    let capture = Capture::start(
        out.ns(),
        "eth0",
        "icmp",
        cluster.dir().join("outside-icmp.pcap"),
    )
    .unwrap();
    out_sock.connect(seen).unwrap();
    out_sock.send(b"late answer").unwrap();
    // The pod's "port unreachable" quotes what it received; translated, it quotes what the
    // outside host sent, so the kernel there reports it on the connected socket.
    let err = out_sock.recv(&mut buf).map(|n| buf[..n].to_vec());
    let pcap = capture.stop().unwrap();
    let sources = tshark_fields(&pcap, "icmp", &["ip.src"]).unwrap();
    assert!(
        !sources.is_empty(),
        "no ICMP error reached the outside host"
    );
    let pod_ip = pod.ip().to_string();
    for fields in &sources {
        let outer = fields[0].split(',').next().unwrap_or_default();
        assert_eq!(
            outer,
            node.underlay_ip().to_string(),
            "the ICMP error's source: {sources:?}"
        );
        assert!(
            !fields[0].contains(&pod_ip),
            "the pod's address leaked in an ICMP error: {sources:?}"
        );
    }
    match err {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(data) => panic!("an answer came back instead of an error: {data:?}"),
    }
}

/// A TCP segment from `src` to `dst` with only `flags` set (no payload, window 0), checksum
/// included: what an attacker on the underlay sends with a raw socket.
fn bare_segment(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, flags: u8) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0, 0, 0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&seg);
    let sum = overlay_tests::packet::checksum(&pseudo);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// Sends each of `segments` (to `dst`) from a raw socket in `host`'s namespace: the kernel puts
/// the IP header with the host's own address in front.
fn send_raw_tcp(host: &Host, dst: Ipv4Addr, segments: &[Vec<u8>]) {
    host.ns()
        .in_netns(|| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::Tcp,
            )?;
            let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
            for seg in segments {
                sendto(fd.as_raw_fd(), seg, &to, MsgFlags::empty())?;
            }
            Ok(())
        })
        .unwrap();
}

/// Stop 24's finding: a reply RST set a masqueraded flow's reset state (10 s to live) whatever
/// its sequence number. Whoever can send from the remote's address (or spoof it on the
/// underlay) could spray RSTs over the translated ports and end every idle connection of the
/// node's pods to that remote 10 s later: the pod's next packet left from another port, and
/// the remote reset it. Now only a FIN or RST near the pod's own acknowledgment closes a flow;
/// the rest are delivered (the pod's kernel drops them) and counted.
/// A TCP connection from pod 0 of node 0 to the outside host, masqueraded.
struct OutsideConnection {
    listener: TcpListener,
    /// The pod's end.
    client: TcpStream,
    /// The outside host's end.
    server: TcpStream,
    service: SocketAddrV4,
    /// The pod's address and port as the outside host sees them.
    translated: SocketAddrV4,
}

impl OutsideConnection {
    fn open(cluster: &Cluster) -> Self {
        let listener = cluster
            .outside()
            .ns()
            .in_netns(|| Ok(TcpListener::bind((OUTSIDE_IP, 0))?))
            .unwrap();
        let service = SocketAddrV4::new(OUTSIDE_IP, listener.local_addr().unwrap().port());
        let client = cluster
            .pod(0, 0)
            .ns()
            .in_netns(|| {
                Ok(TcpStream::connect_timeout(
                    &service.into(),
                    Duration::from_secs(5),
                )?)
            })
            .unwrap();
        let (server, peer) = listener.accept().unwrap();
        for end in [&client, &server] {
            end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let std::net::SocketAddr::V4(translated) = peer else {
            panic!("{peer}")
        };
        assert_eq!(
            *translated.ip(),
            cluster.node(0).underlay_ip(),
            "masqueraded"
        );
        let mut c = Self {
            listener,
            client,
            server,
            service,
            translated,
        };
        c.exchange("hello");
        c
    }

    /// `what` both ways, on the same connection from the same translated port.
    #[track_caller]
    fn exchange(&mut self, what: &str) {
        self.client.write_all(what.as_bytes()).unwrap();
        let mut got = vec![0; what.len()];
        self.server.read_exact(&mut got).unwrap();
        assert_eq!(got, what.as_bytes());
        self.server.write_all(what.as_bytes()).unwrap();
        self.client.read_exact(&mut got).unwrap();
        assert_eq!(got, what.as_bytes());
        assert_eq!(
            self.server.peer_addr().unwrap(),
            std::net::SocketAddr::V4(self.translated)
        );
    }
}

#[test]
fn spoofed_resets_at_the_translated_port_leave_an_idle_connection_alive() {
    let cluster = masq_cluster(1, 1, &[]);
    let out = cluster.outside();
    let node = cluster.node(0);
    let mut conn = OutsideConnection::open(&cluster);
    let (service, translated) = (conn.service, conn.translated);

    // The pod's acknowledgment, as the agent shows it.
    let flows: serde_json::Value =
        serde_json::from_str(&agent_cmd(node, &["nat", "-o", "json"])).unwrap();
    let flow = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["remote"] == service.to_string())
        .unwrap_or_else(|| panic!("no flow to {service}: {flows}"));
    assert_eq!(flow["assured"], true, "{flow}");
    let ack = u32::try_from(flow["ack"].as_u64().unwrap()).unwrap();

    // RSTs (and a FIN) a window or more away from it, at the translated port and across the
    // translated port range around it, as a spray would send them.
    let mut spray = Vec::new();
    for seq in [
        ack.wrapping_sub(1),
        ack.wrapping_add(NAT_CLOSE_WINDOW),
        ack.wrapping_add(1 << 31),
    ] {
        spray.push(bare_segment(service, translated, seq, 0x04));
    }
    spray.push(bare_segment(
        service,
        translated,
        ack.wrapping_add(1 << 30),
        0x11,
    ));
    let base = translated.port().saturating_sub(200).max(1024);
    for p in base..base + 400 {
        let to = SocketAddrV4::new(*translated.ip(), p);
        spray.push(bare_segment(service, to, ack.wrapping_add(1 << 31), 0x04));
    }
    send_raw_tcp(out, node.underlay_ip(), &spray);
    let deadline = Instant::now() + Duration::from_secs(5);
    // The four, and the spray's one at the flow's port.
    while counter(node, "nat_close_out_of_window") < 5 {
        assert!(
            Instant::now() < deadline,
            "{}",
            agent_cmd(node, &["counters"])
        );
        thread::sleep(Duration::from_millis(100));
    }
    let nat = agent_cmd(node, &["nat"]);
    assert!(
        nat.lines()
            .any(|l| l.contains(&service.to_string()) && l.contains(" replied ")),
        "the flow is not closed:\n{nat}"
    );

    // Past the reset timeout (10 s): the idle connection still goes out from its port.
    thread::sleep(Duration::from_secs(11));
    conn.exchange("still here");

    // The remote's own reset closes it, as before: its socket closed, the pod's next data is
    // answered with a RST at the pod's acknowledgment.
    let OutsideConnection {
        listener,
        mut client,
        server,
        ..
    } = conn;
    drop(server);
    drop(listener);
    let mut buf = [0; 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let nat = agent_cmd(node, &["nat"]);
        if nat
            .lines()
            .any(|l| l.contains(&service.to_string()) && l.contains("rst"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reset:\n{nat}");
        let _ = client.write_all(b"x");
        let _ = client.read(&mut buf);
        thread::sleep(Duration::from_millis(100));
    }
}

/// Masqueraded connections survive an upgrade that grows the flow tables' entries: the new
/// agent reads the older tables before it replaces them and writes their flows into its own,
/// zero-filled (unknown). Shown by turning the four pinned tables into the 24-byte entries of
/// the agent before the close window (`NatEntryV4` without `orig_ack`), flows included, while
/// the agent is down; before, such an upgrade emptied the tables and every masqueraded
/// connection broke at its next packet.
#[test]
fn masqueraded_connections_survive_an_upgrade_that_grows_the_flow_entries() {
    let cluster = masq_cluster(1, 1, &[]);
    let node = cluster.node(0);
    let mut conn = OutsideConnection::open(&cluster);
    node.agent().unwrap().kill().unwrap();

    let maps = node.bpf_dir().join("maps");
    let mut flows = 0;
    for name in names::NAT_FLOW_MAPS {
        let path = maps.join(name);
        let entries: Vec<(NatKeyV4, NatEntryV4)> = {
            let data = MapData::from_pin(&path).unwrap();
            let map = Map::LruHashMap(data);
            let hash = AyaHashMap::<_, NatKeyV4, NatEntryV4>::try_from(&map).unwrap();
            hash.iter().map(Result::unwrap).collect()
        };
        let capacity = if name.ends_with("_NEW") {
            SNAT_V4_NEW_CAPACITY
        } else {
            SNAT_V4_CAPACITY
        };
        let path = checks::pin_older_flow_table(node, name, capacity);
        let bpftool = |args: &[&str]| node.ns().run("bpftool", args).unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
        for (k, e) in &entries {
            let key = hex(bytemuck::bytes_of(k));
            let value = hex(&bytemuck::bytes_of(e)[..24]);
            let mut args = vec!["map", "update", "pinned", &path, "key", "hex"];
            args.extend(key.iter().map(String::as_str));
            args.extend(["value", "hex"]);
            args.extend(value.iter().map(String::as_str));
            bpftool(&args);
        }
        flows += entries.len();
    }
    assert!(flows >= 2, "the connection's two entries at least");

    let agent = node.start_agent(&["--ip-masq"]).unwrap();
    agent.wait_for_log("data path attached", START).unwrap();
    node.subnet_env().unwrap();
    conn.exchange("after the upgrade");
    for said in [
        "pinned map SNAT_V4_CT replaced, its flows carried over",
        "masqueraded flows carried over into the new SNAT_V4_CT",
    ] {
        assert!(agent.log().contains(said), "{said}:\n{}", agent.log());
    }
    let nat = agent_cmd(node, &["nat"]);
    let line = format!("{} via {}", conn.service, conn.translated);
    assert!(nat.contains(&line), "{line} in\n{nat}");
}

/// IP protocol 253 (RFC 3692, for experiments): no ports, so no tracker but the generic one.
const EXPERIMENTAL_PROTO: i32 = 253;

/// A raw IPv4 socket of protocol `proto` opened in namespace `ns`, reads timing out after 5 s.
fn raw_socket(ns: &NetNs, proto: i32) -> OwnedFd {
    ns.in_netns(move || {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt(&fd, ReceiveTimeout, &TimeVal::new(5, 0))?;
        Ok(fd)
    })
    .unwrap()
}

/// The next datagram on raw socket `fd`: its source and the bytes after the IP header.
fn raw_recv(fd: &OwnedFd) -> (Ipv4Addr, Vec<u8>) {
    let mut buf = [0u8; 2048];
    let (n, from) = recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf).unwrap();
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    (from.unwrap().ip(), buf[ihl..n].to_vec())
}

fn raw_send(fd: &OwnedFd, to: Ipv4Addr, data: &[u8]) {
    let to = SocketAddrV4::new(to, 0);
    sendto(
        fd.as_raw_fd(),
        data,
        &SockaddrIn::from(to),
        MsgFlags::empty(),
    )
    .unwrap();
}

/// A protocol the masquerade knows no ports of (here 253) leaves with the node's address and
/// its answer reaches the pod, as conntrack's generic tracker and MASQUERADE would have it,
/// where it used to leave with the pod's own address and never be answered. A second pod's
/// flow of that protocol to the same host is refused while the first lives (one reply tuple;
/// conntrack drops its clash too); the flow is listed by protocol.
#[test]
fn a_protocol_without_ports_is_masqueraded_and_answered() {
    let cluster = masq_cluster(1, 2, &[]);
    let node = cluster.node(0);
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(0, 1));
    let outside = raw_socket(cluster.outside().ns(), EXPERIMENTAL_PROTO);
    let pod = raw_socket(p0.ns(), EXPERIMENTAL_PROTO);

    raw_send(&pod, OUTSIDE_IP, b"experiment");
    let (seen, data) = raw_recv(&outside);
    assert_eq!(seen, node.underlay_ip(), "the pod's packet masqueraded");
    assert_eq!(data, b"experiment");
    raw_send(&outside, seen, b"answer");
    let (from, data) = raw_recv(&pod);
    assert_eq!(
        (from, data.as_slice()),
        (OUTSIDE_IP, &b"answer"[..]),
        "the answer reaches the pod"
    );

    let flows = agent_cmd(node, &["nat"]);
    assert!(
        flows
            .lines()
            .any(|l| l.starts_with(&format!("proto-253 {}:0 {OUTSIDE_IP}:0 via ", p0.ip()))),
        "the flow listed by protocol:\n{flows}"
    );

    let dropped = counter(node, "drop_nat_exhausted");
    let other = raw_socket(p1.ns(), EXPERIMENTAL_PROTO);
    raw_send(&other, OUTSIDE_IP, b"second");
    raw_send(&pod, OUTSIDE_IP, b"again");
    let (seen, data) = raw_recv(&outside);
    assert_eq!(
        (seen, data.as_slice()),
        (node.underlay_ip(), &b"again"[..]),
        "the second pod's packet is not delivered, the first pod's next one is"
    );
    assert_eq!(counter(node, "drop_nat_exhausted"), dropped + 1);
}
