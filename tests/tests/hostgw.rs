//! host-gw and VXLAN DirectRouting end to end: the real agent binary in node
//! namespaces against a real etcd, pods behind `cni0`, `iptables -P FORWARD DROP` in every node
//! (as Docker leaves it), checked with real traffic, the kernel's routing tables and captures:
//!
//! - host-gw, 3 nodes × 2 pods (`{"Network": "172.7.0.0/16", "Backend": {"Type": "host-gw"}}`):
//!   ping and checksummed TCP between all pods on different nodes with the real pod source;
//!   host → remote pod; no per-peer kernel route; the wire carries plain pod-to-pod IP; a node
//!   that leaves (agent killed, lease deleted) is no longer reachable nor listed by `peers`.
//! - DirectRouting on two L2 segments joined by a router: same-segment peers direct (no VXLAN in
//!   the capture), cross-segment peers through VXLAN.
//! - A stock flanneld host-gw node (kernel routes `via <PublicIP>`, flannel's FORWARD rules).
//! - `kill -9` of both agents during a transfer: it completes intact.
//! - flannel's NAT refusal: `--public-ip` other than the interface address exits non-zero.
//!
//! Root only (fails, never skips, without it); each test builds its own cluster. Run:
//! `cargo xtask build && OVERLAY_AGENT_BIN=target/debug/overlay-agent cargo test -p
//! overlay-tests --test hostgw -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use overlay_tests::{
    Capture, Cluster, Node, Pod,
    checks::{
        NO_FORWARD_RULES, agent_cmd, agent_of, assert_host_reaches, assert_no_ping, assert_ping,
        assert_pods_talk, assert_pods_talk_across_nodes, assert_tcp, counters, forward_drop, grown,
        subnet_of, transfer_across_agent_kill9, wait_line_since,
    },
    tshark_fields,
};

const HOST_GW: &str = r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "host-gw"}}"#;
const DIRECT_ROUTING: &str =
    r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "vxlan", "Directrouting": true}}"#;
const NETWORK: &str = "172.7.0.0/16";
/// Bound for an agent to notice something in etcd and log it.
const AGENT_REACTS: Duration = Duration::from_secs(5);
/// flannel's refusal, word for word (flannel-compat.md §5).
const NAT_MESSAGE: &str = "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend";

// ----- helpers -----------------------------------------------------------------------------

/// `overlay-agent peers`: subnet → (PublicIP, VtepMAC or `direct`).
fn peers(node: &Node) -> BTreeMap<Ipv4Net, (Ipv4Addr, String)> {
    let out = agent_cmd(node, &["peers"]);
    out.lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [subnet, ip, how] => (
                subnet.parse().unwrap(),
                (ip.parse().unwrap(), how.to_owned()),
            ),
            _ => panic!(
                "`overlay-agent peers` line {l:?} is not `<subnet> <ip> <mac|direct>`:\n{out}"
            ),
        })
        .collect()
}

/// The node's IPv4 routes: none may lead to a peer (no per-peer kernel route for pod traffic).
fn assert_no_peer_routes(node: &Node, peers: &[Ipv4Net]) {
    let routes = node
        .ns()
        .ip(&["-4", "route", "show", "table", "all"])
        .unwrap();
    for subnet in peers {
        assert!(
            !routes.lines().any(|l| l.starts_with(&subnet.to_string())),
            "{}: the kernel must have no route for peer subnet {subnet}:\n{routes}",
            node.name()
        );
    }
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{NETWORK} dev ovl0"))),
        "{}: the cluster network must be routed into ovl0:\n{routes}",
        node.name()
    );
}

// ----- 1. host-gw cluster ------------------------------------------------------------------

/// Three host-gw nodes, two pods each, FORWARD DROP everywhere: every pod reaches every pod on
/// another node (ping, TCP, real source), every host every remote pod (source: its `<subnet>.0`),
/// without kernel routes to the peers and without any VXLAN on the wire; the eBPF counters show
/// the direct path. Then n2 leaves: traffic to it stops and the others forget it.
#[test]
fn host_gw_three_nodes_forward_drop_and_node_leave() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(2)
        .network_config(HOST_GW)
        .agent_args(&[NO_FORWARD_RULES])
        .build()
        .unwrap();
    for node in cluster.nodes() {
        forward_drop(node);
        let env = node.subnet_env().unwrap();
        assert_eq!(env.mtu, 1500, "host-gw pods get the interface MTU");
    }
    let subnets: Vec<Ipv4Net> = cluster.nodes().iter().map(subnet_of).collect();
    for (i, node) in cluster.nodes().iter().enumerate() {
        let others: Vec<Ipv4Net> = (0..3).filter(|&j| j != i).map(|j| subnets[j]).collect();
        let want: BTreeMap<_, _> = (0..3)
            .filter(|&j| j != i)
            .map(|j| {
                (
                    subnets[j],
                    (cluster.node(j).underlay_ip(), "direct".to_owned()),
                )
            })
            .collect();
        let start = Instant::now();
        while peers(node) != want && start.elapsed() < AGENT_REACTS {
            thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            peers(node),
            want,
            "{}: ROUTE_V4 must route both peers directly",
            node.name()
        );
        assert_no_peer_routes(node, &others);
    }

    let pcap = cluster.dir().join("hostgw.pcap");
    let capture = Capture::start(cluster.underlay(), "n0", "", &pcap).unwrap();
    let before: Vec<_> = cluster.nodes().iter().map(counters).collect();
    let pods: Vec<Pod> = cluster.nodes().iter().flat_map(Node::pods).collect();
    assert_pods_talk_across_nodes(&pods);
    for node in cluster.nodes() {
        for b in pods.iter().filter(|b| b.node_name() != node.name()) {
            assert_host_reaches(node, b);
        }
    }
    let pcap = capture.stop().unwrap();
    for (i, node) in cluster.nodes().iter().enumerate() {
        let grew = grown(&before[i], &counters(node));
        for name in [
            "direct_pod",
            "direct_host",
            "deliver_direct_pod",
            "deliver_direct_host",
        ] {
            assert!(
                grew.get(name).copied().unwrap_or(0) > 0,
                "{}: {name} must grow; grew {grew:?}",
                node.name()
            );
        }
        for name in [
            "encap_pod",
            "encap_host",
            "decap_pod",
            "decap_endpoint",
            "to_stack_not_peer",
        ] {
            assert_eq!(
                grew.get(name),
                None,
                "{}: no {name} in host-gw; grew {grew:?}",
                node.name()
            );
        }
    }
    // The wire: plain pod-to-pod ICMP between n0's and n1's pods, no VXLAN at all.
    let vxlan = tshark_fields(&pcap, "udp.port == 8472 || vxlan", &["ip.src", "ip.dst"]).unwrap();
    assert!(
        vxlan.is_empty(),
        "host-gw must put no VXLAN on the wire: {vxlan:?}"
    );
    let icmp = tshark_fields(&pcap, "icmp", &["ip.src", "ip.dst", "ip.ttl"]).unwrap();
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert!(
        icmp.iter()
            .any(|r| r[0] == p0.ip().to_string() && r[1] == p1.ip().to_string() && r[2] == "63"),
        "the capture must show {p0} -> {p1} as plain IP with TTL 63 (one forwarding hop): {icmp:?}"
    );

    // n2 leaves: its agent dies (its pinned data path stays) and its lease is deleted.
    let n2 = cluster.node(2);
    let key = format!(
        "{}/subnets/{}-{}",
        cluster.etcd_prefix(),
        subnets[2].network(),
        subnets[2].prefix_len()
    );
    let marks: Vec<usize> = (0..2)
        .map(|i| agent_of(cluster.node(i)).log().len())
        .collect();
    agent_of(n2).kill9().unwrap();
    assert_eq!(cluster.etcd().del(&key).unwrap(), 1, "deleting {key}");
    for (i, mark) in marks.into_iter().enumerate() {
        let node = cluster.node(i);
        wait_line_since(
            &agent_of(node),
            mark,
            &[&format!("peer removed: subnet {}", subnets[2])],
            AGENT_REACTS,
        );
        assert!(
            !peers(node).contains_key(&subnets[2]),
            "{}: {} must be gone from ROUTE_V4",
            node.name(),
            subnets[2]
        );
    }
    let p2 = cluster.pod(2, 0);
    assert_no_ping(&p0, p2.ip(), "n2's lease is gone");
    assert_no_ping(cluster.node(0), p2.ip(), "n2's lease is gone");
    assert_no_ping(&p2, p0.ip(), "n0 no longer takes n2 for a direct peer");
    assert_pods_talk(&p0, &p1);
    assert_pods_talk(&p1, &p0);
}

// ----- 2. DirectRouting on two segments ----------------------------------------------------

/// n0 and n1 share a segment, n2 sits behind the router on 198.18.1.0/24. With DirectRouting,
/// n0 ↔ n1 go direct (plain pod IP on the wire, no UDP 8472 between them), n0/n1 ↔ n2 through
/// VXLAN, all with FORWARD DROP.
#[test]
fn direct_routing_same_segment_direct_other_segment_vxlan() {
    let cluster = Cluster::builder()
        .nodes(3)
        .second_segment(&[2])
        .pods_per_node(1)
        .network_config(DIRECT_ROUTING)
        .agent_args(&[NO_FORWARD_RULES])
        .build()
        .unwrap();
    assert_eq!(cluster.node(2).underlay_ip(), Ipv4Addr::new(198, 18, 1, 3));
    for node in cluster.nodes() {
        forward_drop(node);
    }
    let subnets: Vec<Ipv4Net> = cluster.nodes().iter().map(subnet_of).collect();
    let how = |i: usize, j: usize| -> String {
        let start = Instant::now();
        loop {
            if let Some((_, how)) = peers(cluster.node(i)).get(&subnets[j]) {
                return how.clone();
            }
            assert!(
                start.elapsed() < AGENT_REACTS,
                "n{i} has no route to {}",
                subnets[j]
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(how(0, 1), "direct", "n0 -> n1 share a segment");
    assert_eq!(how(1, 0), "direct", "n1 -> n0 share a segment");
    for (i, j) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        assert_ne!(
            how(i, j),
            "direct",
            "n{i} -> n{j} are on different segments: VXLAN"
        );
    }

    let pcap = cluster.dir().join("direct.pcap");
    let capture = Capture::start(cluster.underlay(), "n0", "", &pcap).unwrap();
    let (p0, p1, p2) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(2, 0));
    for (a, b) in [
        (&p0, &p1),
        (&p1, &p0),
        (&p0, &p2),
        (&p2, &p0),
        (&p1, &p2),
        (&p2, &p1),
    ] {
        assert_pods_talk(a, b);
    }
    assert_ping(cluster.node(0), &p1);
    assert_ping(cluster.node(0), &p2);
    let pcap = capture.stop().unwrap();

    let (n0, n1, n2) = (
        cluster.node(0).underlay_ip().to_string(),
        cluster.node(1).underlay_ip().to_string(),
        cluster.node(2).underlay_ip().to_string(),
    );
    let udp = tshark_fields(&pcap, "udp.port == 8472", &["ip.src", "ip.dst"]).unwrap();
    let outer = |r: &Vec<String>| {
        (
            r[0].split(',').next().unwrap().to_owned(),
            r[1].split(',').next().unwrap().to_owned(),
        )
    };
    assert!(
        !udp.iter()
            .map(outer)
            .any(|(s, d)| (s == n0 && d == n1) || (s == n1 && d == n0)),
        "no VXLAN between same-segment nodes {n0} and {n1}: {udp:?}"
    );
    assert!(
        udp.iter().map(outer).any(|(s, d)| s == n0 && d == n2)
            && udp.iter().map(outer).any(|(s, d)| s == n2 && d == n0),
        "VXLAN both ways between {n0} and {n2} (different segments): {udp:?}"
    );
    let plain = tshark_fields(&pcap, "icmp && !vxlan", &["ip.src", "ip.dst"]).unwrap();
    for (a, b) in [(&p0, &p1), (&p1, &p0)] {
        assert!(
            plain
                .iter()
                .any(|r| r[0] == a.ip().to_string() && r[1] == b.ip().to_string()),
            "plain (unencapsulated) ICMP {a} -> {b} on the wire: {plain:?}"
        );
    }
    let inner = tshark_fields(&pcap, "vxlan && icmp", &["ip.src", "ip.dst"]).unwrap();
    assert!(
        inner
            .iter()
            .any(|r| r[0] == format!("{n0},{}", p0.ip()) && r[1] == format!("{n2},{}", p2.ip())),
        "VXLAN-encapsulated ICMP {p0} -> {p2}: {inner:?}"
    );
}

// ----- 3. a stock flanneld host-gw node ----------------------------------------------------

/// n2 runs no agent: it is a stock host-gw node as flanneld builds it (a kernel route `<peer
/// subnet> via <peer PublicIP> dev eth0` per lease, ip_forward, flannel's FORWARD rules under
/// policy DROP, its own cni0 and pod) announcing a host-gw lease. Pods on our nodes and on it
/// reach each other both ways, and our hosts reach its pod.
#[test]
fn stock_host_gw_node_interoperates() {
    let (cluster, stock_pod) = with_stock_host_gw_node(&[]);
    for i in 0..2 {
        let pod = cluster.pod(i, 0);
        assert_pods_talk(&pod, &stock_pod);
        assert_pods_talk(&stock_pod, &pod);
        assert_ping(cluster.node(i), &stock_pod);
        assert_eq!(
            assert_tcp(cluster.node(i), &stock_pod),
            subnet_of(cluster.node(i)).network(),
            "host source"
        );
    }
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
}

/// The same with `--ip-masq` on our nodes: the stock node's host reaches our pods from its
/// interface address (the source of its `via <PublicIP>` route), which lies outside the
/// cluster network. Our pods' replies belong to that connection and must leave untranslated,
/// as flannel's MASQUERADE (new connections only) leaves them. The first transfer runs before
/// our pod has talked (its endpoint unknown: delivered through the bridge at first).
#[test]
fn stock_host_gw_hosts_reach_our_pods_with_masquerade() {
    let (cluster, stock_pod) = with_stock_host_gw_node(&["--ip-masq"]);
    let stock = cluster.node(2);
    for i in 0..2 {
        let pod = cluster.pod(i, 0);
        assert_eq!(
            assert_tcp(stock, &pod),
            stock.underlay_ip(),
            "our pod sees the stock host's address"
        );
        assert_pods_talk(&stock_pod, &pod);
    }
}

/// Two nodes of ours (host-gw, one pod each, `agent_args`) and n2, a stock flanneld host-gw
/// node with one pod, known to our agents by its lease; FORWARD policy DROP everywhere.
fn with_stock_host_gw_node(agent_args: &[&str]) -> (Cluster, Pod) {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(HOST_GW)
        .agent_args(&[agent_args, &[NO_FORWARD_RULES]].concat())
        .build()
        .unwrap();
    cluster.add_node().unwrap();
    let stock = cluster.node(2);
    let stock_subnet: Ipv4Net = "172.7.250.0/24".parse().unwrap();
    let ours: Vec<Ipv4Net> = (0..2).map(|i| subnet_of(cluster.node(i))).collect();
    assert!(
        !ours.contains(&stock_subnet),
        "{stock_subnet} must be free: {ours:?}"
    );
    for (i, subnet) in ours.iter().enumerate() {
        let via = cluster.node(i).underlay_ip().to_string();
        stock
            .ns()
            .ip(&[
                "route",
                "replace",
                &subnet.to_string(),
                "via",
                &via,
                "dev",
                "eth0",
            ])
            .unwrap();
    }
    for rule in [["-s", NETWORK], ["-d", NETWORK]] {
        stock
            .ns()
            .run(
                "iptables",
                &["-A", "FORWARD", rule[0], rule[1], "-j", "ACCEPT"],
            )
            .unwrap();
    }
    for node in cluster.nodes() {
        forward_drop(node);
    }
    let gw = Ipv4Net::new(Ipv4Addr::from(u32::from(stock_subnet.network()) + 1), 24).unwrap();
    let stock_pod = stock.add_pod_in("p0", gw, 1500).unwrap();
    let key = format!(
        "{}/subnets/{}-{}",
        cluster.etcd_prefix(),
        stock_subnet.network(),
        stock_subnet.prefix_len()
    );
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
        stock.underlay_ip()
    );
    let marks: Vec<usize> = (0..2)
        .map(|i| agent_of(cluster.node(i)).log().len())
        .collect();
    cluster.etcd().put(&key, &value).unwrap();
    let want = format!(
        "peer added: subnet {stock_subnet} public IP {} backend host-gw",
        stock.underlay_ip()
    );
    for (i, mark) in marks.into_iter().enumerate() {
        wait_line_since(&agent_of(cluster.node(i)), mark, &[&want], AGENT_REACTS);
    }
    (cluster, stock_pod)
}

// ----- 4. kill -9 during a transfer --------------------------------------------------------

/// Both agents die by SIGKILL during a 256 MiB transfer between host-gw pods: the pinned data
/// path carries it on, new agents take the pinned links over, and it completes intact.
#[test]
fn host_gw_transfer_survives_kill_9_of_both_agents() {
    const BYTES: u64 = 256 << 20;
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(HOST_GW)
        .agent_args(&[NO_FORWARD_RULES])
        .build()
        .unwrap();
    for node in cluster.nodes() {
        forward_drop(node);
    }
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_ping(&a, &b);
    let report =
        transfer_across_agent_kill9(cluster.nodes(), &a, &b, BYTES, &[NO_FORWARD_RULES], || {
            assert!(
                a.ping(b.ip(), 2).unwrap().all_received(),
                "ping with both agents dead"
            );
        });
    assert_eq!(report.bytes, BYTES);
    assert_eq!(
        report.server_peer.ip(),
        IpAddr::V4(a.ip()),
        "real pod source address"
    );
    assert_pods_talk(&b, &a);
}

// ----- 5. NAT refusal ----------------------------------------------------------------------

/// host-gw behind NAT: `--public-ip` differs from the interface address → flannel's message and
/// a non-zero exit, before any lease is taken.
#[test]
fn host_gw_refuses_a_public_ip_that_is_not_on_the_interface() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(HOST_GW)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let agent = node.start_agent(&["--public-ip", "198.18.0.99"]).unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "the agent must fail, exited {status}");
    let log = agent.log();
    assert!(
        log.contains(NAT_MESSAGE),
        "the log must carry flannel's message:\n{log}"
    );
    let leases = cluster
        .etcd()
        .get_prefix(&format!("{}/subnets/", cluster.etcd_prefix()))
        .unwrap();
    assert!(leases.is_empty(), "no lease may be taken: {leases:?}");
    // The same node with its real address starts.
    let agent = node.start_agent(&[]).unwrap();
    node.subnet_env().unwrap();
    assert!(agent.is_running());
}
