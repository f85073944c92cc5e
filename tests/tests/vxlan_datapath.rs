//! The VXLAN data path end to end: the real agent binary in node namespaces against a
//! real etcd holding the seeds' config `{"Network": "172.17.0.0/16", "Backend": {"Type":
//! "vxlan"}}`, with pods behind a `cni0` bridge, checked with real traffic and captures:
//!
//! - 3 nodes × 2 pods: ping, checksummed TCP and UDP echo between pods on different nodes, both
//!   ways, with the real pod source address at the server; host → remote pod; the underlay
//!   capture decodes as flannel's VXLAN (VNI 1, port 8472, PublicIPs outside, pods inside, the
//!   receiver's VtepMAC from its etcd lease as inner destination).
//! - FORWARD policy DROP and no iptables rules: everything still flows, nothing of ours appears
//!   in `iptables-save` or `nft list ruleset`. With forward rules on (the default), a policy
//!   that drops gets flanneld's rules, in whichever backend (nft, legacy) it drops.
//! - The pod bridge appears after the agent started, and is deleted and re-created.
//! - A node whose lease goes away stops being reachable from the others.
//! - A stock flannel node (kernel `flannel.1` built from the lease records) in the cluster.
//! - Crafted VXLAN frames from a non-member, with a wrong VNI or a wrong inner MAC are dropped
//!   and counted; a member's correct frame arrives.
//! - A peer behind a router: outer frames go to the gateway's MAC (the FIB's next hop), and
//!   follow a route change from the first packet after it (the programs' next-hop cache);
//!   with a smaller MTU on the router's side, the fragmented VXLAN is reassembled by the
//!   kernel and delivered through the GRO device; a `flannel.1` left on the port keeps the GRO
//!   device down and is reported until it is deleted, after which the device comes up.
//! - A node behind NAT (`--public-ip`, DNATed and SNATed by the router): pods talk both ways,
//!   the node sends from and receives at its interface address, the others see its PublicIP.
//!
//! Root only (fails, never skips, without it); each test builds its own cluster. Run:
//! `cargo xtask build && OVERLAY_AGENT_BIN=target/debug/overlay-agent cargo test -p
//! overlay-tests --test vxlan_datapath -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use overlay_common::names;
use overlay_tests::{
    AttachKind, Capture, Cluster, NetNs, Node, Pod, add_veth, attached_programs,
    checks::{
        FIRST_ECHO, NO_FORWARD_RULES, agent_cmd, agent_of, assert_host_reaches, assert_no_ping,
        assert_ping, assert_pods_talk, assert_pods_talk_across_nodes, assert_tcp, counters,
        forward_drop, forward_drop_in, grown, route_via_missing_gateway, routing_generation,
        subnet_of, unroute_missing_gateway, wait_forward_rules, wait_forward_rules_in,
        wait_line_since, wait_routing_renewed, wait_until,
    },
    packet::{parse_mac, vxlan_payload},
    stock::{StockPeer, stock_vxlan_node_on},
    traffic, tshark_fields,
};

const CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const NETWORK: &str = "172.17.0.0/16";
/// flannel's defaults for this config.
const VNI: u32 = 1;
const VXLAN_PORT: u16 = 8472;
/// Pod MTU: the underlay's 1500 − 50.
const POD_MTU: u32 = 1450;
/// Bound for an agent to notice something in etcd or on the node and log it.
const AGENT_REACTS: Duration = Duration::from_secs(5);

// ----- helpers -----------------------------------------------------------------------------

/// A subnet lease record as read from etcd (flannel-compat.md §2).
#[derive(Debug, Clone)]
struct LeaseRecord {
    key: String,
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    backend_type: String,
    vni: u64,
    vtep_mac: String,
}

/// Every lease under `<prefix>/subnets/`, parsed; panics on a record that is not flannel's.
fn leases(cluster: &Cluster) -> Vec<LeaseRecord> {
    let prefix = format!("{}/subnets/", cluster.etcd_prefix());
    cluster
        .etcd()
        .get_prefix(&prefix)
        .expect("listing the subnet leases in etcd")
        .into_iter()
        .map(|kv| {
            let name = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            let (addr, len) = name.split_once('-').unwrap_or_else(|| {
                panic!("lease key {} is not <prefix>/subnets/a.b.c.d-len", kv.key)
            });
            let subnet = Ipv4Net::new(
                addr.parse()
                    .unwrap_or_else(|_| panic!("lease key {}: bad address", kv.key)),
                len.parse()
                    .unwrap_or_else(|_| panic!("lease key {}: bad length", kv.key)),
            )
            .unwrap();
            let v: serde_json::Value = serde_json::from_str(&kv.value)
                .unwrap_or_else(|e| panic!("lease {} holds no JSON ({e}): {}", kv.key, kv.value));
            let s = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            };
            let data = v.get("BackendData");
            LeaseRecord {
                subnet,
                public_ip: s("PublicIP")
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or_else(|| panic!("lease {} has no PublicIP: {}", kv.key, kv.value)),
                backend_type: s("BackendType").unwrap_or_default(),
                vni: data
                    .and_then(|d| d.get("VNI"))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                vtep_mac: data
                    .and_then(|d| d.get("VtepMAC"))
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                key: kv.key,
            }
        })
        .collect()
}

/// The lease of the node whose PublicIP is `ip`; panics unless exactly one exists.
fn lease_of(cluster: &Cluster, ip: Ipv4Addr) -> LeaseRecord {
    let all = leases(cluster);
    let mine: Vec<&LeaseRecord> = all.iter().filter(|l| l.public_ip == ip).collect();
    assert_eq!(
        mine.len(),
        1,
        "expected exactly one lease with PublicIP {ip} in etcd, found {all:#?}"
    );
    let lease = mine[0].clone();
    assert_eq!(
        (lease.backend_type.as_str(), lease.vni),
        ("vxlan", u64::from(VNI)),
        "lease {} must be a vxlan lease with VNI {VNI}: {lease:?}",
        lease.key
    );
    assert_eq!(
        lease.vtep_mac.len(),
        17,
        "lease {} has no VtepMAC: {lease:?}",
        lease.key
    );
    lease
}

/// 20 UDP datagrams `a` → `b`, each echoed back intact, the server seeing `a`'s address.
fn assert_udp_echo(a: &Pod, b: &Pod) {
    let r = traffic::udp_echo(a, b, 20).unwrap_or_else(|e| panic!("UDP echo {a} -> {b}: {e:#}"));
    assert_eq!(
        (r.sent, r.received, r.bad),
        (20, 20, 0),
        "UDP echo {a} -> {b}: expected 20 sent, 20 echoed intact, 0 bad; got {r:?}"
    );
    assert!(
        !r.server_peers.is_empty() && r.server_peers.iter().all(|p| p.ip() == IpAddr::V4(a.ip())),
        "UDP echo {a} -> {b}: the server must see only {} as source, saw {:?}",
        a.ip(),
        r.server_peers
    );
}

/// The host's address towards the cluster: `<its subnet>.0` (flannel.1's, our ovl0's).
fn host_overlay_ip(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

/// The node's ROUTE_V4 entries (`overlay-agent peers`): (subnet, PublicIP, VtepMAC).
fn peers(node: &Node) -> Vec<(Ipv4Net, Ipv4Addr, String)> {
    let out = agent_cmd(node, &["peers"]);
    out.lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [subnet, ip, mac] => match (subnet.parse(), ip.parse()) {
                (Ok(subnet), Ok(ip)) => (subnet, ip, mac.to_ascii_lowercase()),
                _ => panic!("bad `overlay-agent peers` line {l:?}"),
            },
            _ => panic!(
                "`overlay-agent peers` line {l:?} is not `<subnet> <public ip> <vtep mac>`:\n{out}"
            ),
        })
        .collect()
}

/// The entry `overlay-agent peers` must show for a lease.
fn peer_entry(lease: &LeaseRecord) -> (Ipv4Net, Ipv4Addr, String) {
    (lease.subnet, lease.public_ip, lease.vtep_mac.clone())
}

/// The node's iptables and nftables state must be exactly the FORWARD DROP policy the test set:
/// no table, chain or rule of the agent's.
fn assert_only_forward_drop_policy(node: &Node) {
    let save = node.ns().run("iptables-save", &[] as &[&str]).unwrap();
    let lines: Vec<String> = save
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        // Policy lines carry packet counters: `:FORWARD DROP [0:0]`.
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "*filter",
            ":INPUT ACCEPT",
            ":FORWARD DROP",
            ":OUTPUT ACCEPT",
            "COMMIT"
        ],
        "{}: iptables-save must show only the FORWARD DROP policy set by the test, got:\n{save}",
        node.name()
    );
    let ruleset = node.ns().run("nft", &["list", "ruleset"]).unwrap();
    let lines: Vec<&str> = ruleset
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines,
        [
            "table ip filter {",
            "chain FORWARD {",
            "type filter hook forward priority filter; policy drop;",
            "}",
            "}",
        ],
        "{}: nft list ruleset must show only the FORWARD chain with policy drop, got:\n{ruleset}",
        node.name()
    );
}

/// Sends `count` copies of `payload` from `src` (an address of `ns`) to `dst`:8472.
/// Two nodes with one pod each, agents running.
fn two_nodes_one_pod_each() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(CONFIG)
        .build()
        .unwrap()
}

/// The forward rules' control: `pod` (on n0) pings `n1`'s underlay address, a packet n0's
/// kernel forwards, so its FORWARD chain must let it through (`through`: what accepts it).
fn assert_forwarded_by_n0(pod: &Pod, n1: &Node, through: &str) {
    let target = n1.underlay_ip();
    traffic::ping_until(pod.ns(), target, FIRST_ECHO).unwrap_or_else(|e| {
        panic!("{pod} must reach {target} through n0's forwarding and {through}: {e:#}")
    });
}

fn send_vxlan(ns: &NetNs, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], count: usize) {
    traffic::send_udp(ns, src, (dst, VXLAN_PORT).into(), payload, count)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Captures VXLAN on node 0's port of the underlay bridge (its frames both ways) into `pcap`.
fn capture_vxlan_at_n0(cluster: &Cluster, pcap: &std::path::Path) -> Capture {
    Capture::start(
        cluster.underlay(),
        "n0",
        &format!("udp port {VXLAN_PORT}"),
        pcap,
    )
    .unwrap()
}

fn drain(sock: &UdpSocket) -> Vec<Vec<u8>> {
    traffic::drain(sock).unwrap()
}

// ----- 1. three nodes, two pods each -----------------------------------------------------------

/// Every pod reaches every pod on another node both ways (ping, checksummed TCP with the real
/// source address, UDP echo), every host reaches the remote pods, and the underlay carries
/// flannel's VXLAN: VNI 1, UDP to 8472, outer = the nodes' PublicIPs, inner = the pods, inner
/// Ethernet from the sender's to the receiver's VtepMAC as published in etcd.
#[test]
fn three_nodes_two_pods_talk_across_nodes_over_flannel_vxlan() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(2)
        .network_config(CONFIG)
        .build()
        .unwrap();
    let pods: Vec<Pod> = cluster.nodes().iter().flat_map(Node::pods).collect();
    assert_eq!(pods.len(), 6);
    let subnets: Vec<Ipv4Net> = cluster.nodes().iter().map(subnet_of).collect();
    for (node, subnet) in cluster.nodes().iter().zip(&subnets) {
        let env = node.subnet_env().unwrap();
        assert_eq!(
            (env.network.to_string(), env.mtu),
            (NETWORK.to_owned(), POD_MTU),
            "{}: subnet file",
            node.name()
        );
        let lease = lease_of(&cluster, node.underlay_ip());
        assert_eq!(
            lease.subnet,
            *subnet,
            "{}: subnet file and etcd lease disagree",
            node.name()
        );
        for pod in node.pods() {
            assert!(
                subnet.contains(&pod.ip()),
                "{pod} must be addressed from {subnet}"
            );
        }
    }

    // The wire, captured on node 0's port of the underlay bridge while pod n0/p0 pings n1/p0
    // and host n2 pings n0/p1 (requests and replies cross that port).
    let (p00, p01, p10) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));
    assert_ping(&p00, &p10);
    assert_ping(cluster.node(2), &p01);
    let pcap = cluster.dir().join("underlay-n0.pcap");
    let capture = capture_vxlan_at_n0(&cluster, &pcap);
    let r1 = p00.ping(p10.ip(), 3).unwrap();
    let r2 = cluster.node(2).ping(p01.ip(), 3).unwrap();
    let pcap = capture.stop().unwrap();
    assert!(
        r1.all_received() && r2.all_received(),
        "pings during the capture:\n{}\n{}",
        r1.output,
        r2.output
    );
    check_capture(&cluster, &pcap, &subnets, &[(&p00, &p10)]);

    // Every ordered pair of pods on different nodes: ping, TCP with checksum, real source.
    assert_pods_talk_across_nodes(&pods);
    // UDP echo across every ordered pair of nodes.
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            assert_udp_echo(&cluster.pod(i, 0), &cluster.pod(j, 1));
        }
    }
    // Each host (node namespace) to a pod on each other node: ping and TCP; the pod sees the
    // host's overlay address <subnet>.0, as with flannel.1.
    for (i, node) in cluster.nodes().iter().enumerate() {
        for j in (0..3).filter(|&j| j != i) {
            assert_host_reaches(node, &cluster.pod(j, 1));
        }
    }
    for node in cluster.nodes() {
        assert!(
            agent_of(node).is_running(),
            "{}'s agent died during the traffic",
            node.name()
        );
    }
}

/// Decodes the capture and checks every VXLAN packet in it against the leases in etcd; requires
/// echo requests and replies between each pair in `pod_pairs` and from host n2 (`<subnet>.0`).
fn check_capture(
    cluster: &Cluster,
    pcap: &std::path::Path,
    subnets: &[Ipv4Net],
    pod_pairs: &[(&Pod, &Pod)],
) {
    let rows = tshark_fields(
        pcap,
        "vxlan && icmp",
        &[
            "ip.src",
            "ip.dst",
            "udp.dstport",
            "vxlan.vni",
            "eth.src",
            "eth.dst",
            "icmp.type",
        ],
    )
    .unwrap();
    let everything = tshark_fields(
        pcap,
        "",
        &["frame.protocols", "ip.src", "ip.dst", "udp.dstport"],
    )
    .unwrap();
    assert!(
        !rows.is_empty(),
        "the capture must decode as VXLAN with ICMP inside; tshark saw:\n{everything:?}"
    );
    let node_of = |ip: Ipv4Addr| -> usize {
        subnets
            .iter()
            .position(|s| s.contains(&ip))
            .unwrap_or_else(|| panic!("inner address {ip} is in no node's subnet {subnets:?}"))
    };
    let mut seen: BTreeSet<(Ipv4Addr, Ipv4Addr, String)> = BTreeSet::new();
    for row in &rows {
        let field =
            |i: usize| -> Vec<&str> { row.get(i).map_or(vec![], |f| f.split(',').collect()) };
        let (ips_src, ips_dst, macs_src, macs_dst) = (field(0), field(1), field(4), field(5));
        assert!(
            ips_src.len() == 2 && ips_dst.len() == 2 && macs_src.len() == 2 && macs_dst.len() == 2,
            "a VXLAN packet must have outer and inner IPv4 and Ethernet headers: {row:?}"
        );
        let ip = |s: &str| -> Ipv4Addr {
            s.parse()
                .unwrap_or_else(|_| panic!("bad address {s} in {row:?}"))
        };
        let (outer_src, inner_src, outer_dst, inner_dst) = (
            ip(ips_src[0]),
            ip(ips_src[1]),
            ip(ips_dst[0]),
            ip(ips_dst[1]),
        );
        assert_eq!(
            field(2),
            [VXLAN_PORT.to_string().as_str()],
            "UDP destination port must be {VXLAN_PORT}: {row:?}"
        );
        assert_eq!(
            field(3),
            [VNI.to_string().as_str()],
            "VNI must be {VNI}: {row:?}"
        );
        let (from, to) = (node_of(inner_src), node_of(inner_dst));
        let (sender, receiver) = (cluster.node(from), cluster.node(to));
        assert_eq!(
            (outer_src, outer_dst),
            (sender.underlay_ip(), receiver.underlay_ip()),
            "outer addresses must be the underlay IPs of the nodes holding {inner_src} and {inner_dst}: {row:?}"
        );
        let (lease_tx, lease_rx) = (
            lease_of(cluster, sender.underlay_ip()),
            lease_of(cluster, receiver.underlay_ip()),
        );
        assert_eq!(
            macs_dst[1].to_ascii_lowercase(),
            lease_rx.vtep_mac,
            "inner Ethernet destination must be the receiver {}'s VtepMAC from its lease {}: {row:?}",
            receiver.name(),
            lease_rx.key
        );
        assert_eq!(
            macs_src[1].to_ascii_lowercase(),
            lease_tx.vtep_mac,
            "inner Ethernet source must be the sender {}'s VtepMAC from its lease {}: {row:?}",
            sender.name(),
            lease_tx.key
        );
        assert_eq!(
            macs_dst[0].to_ascii_lowercase(),
            receiver.ns().mac("eth0").unwrap(),
            "outer Ethernet destination must be the receiver's eth0: {row:?}"
        );
        seen.insert((
            inner_src,
            inner_dst,
            row.get(6).cloned().unwrap_or_default(),
        ));
    }
    eprintln!(
        "capture: {} VXLAN packets checked, e.g. {:?}",
        rows.len(),
        rows.first()
    );
    let host2 = host_overlay_ip(subnets[2]);
    let mut wanted: Vec<(Ipv4Addr, Ipv4Addr, &str)> = Vec::new();
    for (a, b) in pod_pairs {
        wanted.push((a.ip(), b.ip(), "8"));
        wanted.push((b.ip(), a.ip(), "0"));
    }
    let p01 = cluster.pod(0, 1);
    wanted.push((host2, p01.ip(), "8"));
    wanted.push((p01.ip(), host2, "0"));
    for (src, dst, icmp_type) in wanted {
        assert!(
            seen.contains(&(src, dst, icmp_type.to_owned())),
            "the capture lacks a VXLAN-encapsulated ICMP type {icmp_type} {src} -> {dst}; it has {seen:?}"
        );
    }
}

// ----- 2. FORWARD DROP, no iptables rules -----------------------------------------------------

/// With `iptables -P FORWARD DROP` in every node (as Docker leaves it) and no rules at all
/// (`--iptables-forward-rules=false`: no flanneld accepts either), pods and hosts still reach
/// remote pods: the data path never goes through the kernel's forwarding. The agent adds
/// nothing to iptables or nftables. A control shows the policy is in force: a pod's packet the
/// kernel must forward (to another node's underlay address) is dropped, and passes once the
/// policy is ACCEPT again.
#[test]
fn forward_policy_drop_and_no_iptables_rules() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(1)
        .network_config(CONFIG)
        .agent_args(&[NO_FORWARD_RULES])
        .build()
        .unwrap();
    for node in cluster.nodes() {
        forward_drop(node);
        assert_only_forward_drop_policy(node);
    }
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            let (a, b) = (cluster.pod(i, 0), cluster.pod(j, 0));
            assert_pods_talk(&a, &b);
            assert_host_reaches(cluster.node(i), &b);
        }
    }
    assert_udp_echo(&cluster.pod(0, 0), &cluster.pod(1, 0));
    assert_udp_echo(&cluster.pod(2, 0), &cluster.pod(0, 0));
    for node in cluster.nodes() {
        assert_only_forward_drop_policy(node);
    }

    // Control: pod n0/p0 -> n1's underlay address is forwarded by n0's kernel: dropped.
    let (pod, n1) = (cluster.pod(0, 0), cluster.node(1).underlay_ip());
    assert_no_ping(
        &pod,
        n1,
        "n0's kernel forwards it and its FORWARD policy is DROP",
    );
    cluster
        .node(0)
        .ns()
        .run("iptables", &["-P", "FORWARD", "ACCEPT"])
        .unwrap();
    traffic::ping_until(pod.ns(), n1, FIRST_ECHO).unwrap_or_else(|e| {
        panic!("with FORWARD ACCEPT again, {pod} must reach {n1} through n0's forwarding: {e:#}")
    });
}

/// By default (`--iptables-forward-rules`, as in flanneld) an agent whose node's FORWARD policy
/// turns to DROP after it started (Docker started later) writes flanneld's forward rules, each
/// once, at its next check, and writes them again when they are flushed; a node whose policy
/// accepts gets none. The control of the test above (a pod's packet that n0's kernel forwards
/// to another node's underlay address) then passes, while pod-to-pod traffic still never
/// reaches them (their counters stay at 0).
#[test]
fn forward_policy_drop_gets_flanneld_forward_rules() {
    let cluster = two_nodes_one_pod_each();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    forward_drop(n0);
    wait_forward_rules(n0, "172.17.0.0/16");
    let pod = cluster.pod(0, 0);
    assert_forwarded_by_n0(&pod, n1, "its rules");
    // The rules are there, yet pod-to-pod traffic still bypasses FORWARD: they count nothing.
    n0.ns().run("iptables", &["-Z"]).unwrap();
    assert_pods_talk(&pod, &cluster.pod(1, 0));
    let counted = n0
        .ns()
        .run("iptables", &["-L", "FLANNEL-FWD", "-v", "-x", "-n"])
        .unwrap();
    let packets: Vec<u64> = counted
        .lines()
        .filter(|l| l.contains("ACCEPT"))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        packets,
        [0, 0],
        "pod-to-pod packets crossed FORWARD:\n{counted}"
    );

    // Flushed (`iptables -F` empties FORWARD and FLANNEL-FWD): written again, each once.
    n0.ns().run("iptables", &["-F"]).unwrap();
    wait_forward_rules(n0, "172.17.0.0/16");

    let save = n1.ns().run("iptables-save", &[] as &[&str]).unwrap();
    assert!(
        !save.contains("FLANNEL-FWD") && !save.contains("172.17."),
        "n1's FORWARD policy accepts: no rule is needed, none may be written:\n{save}"
    );

    // `overlay-agent status` says which way each node went.
    for (node, line) in [
        (
            n0,
            "forward:    policy DROP: flanneld's forward rules in place (chain FLANNEL-FWD)",
        ),
        (n1, "forward:    policy ACCEPT: no rule needed"),
    ] {
        wait_until(
            &format!("{}'s status to say {line:?}", node.name()),
            Duration::from_secs(5),
            || agent_cmd(node, &["status"]).lines().any(|l| l == line),
        );
    }
}

/// A node whose DROP policy lives in the other iptables backend than its `iptables` command's
/// (Docker in a container, or an older distribution, on legacy tables while `iptables` here is
/// nft): a packet must pass both, so the agent finds the legacy filter table at its next check
/// and writes flanneld's rules there, and nothing in nft, whose policy accepts. The control of
/// the test above then passes. A node without legacy tables gets none created by the checks
/// (every packet would cross an empty table).
#[test]
fn forward_policy_drop_in_the_legacy_backend_gets_the_rules_there() {
    let cluster = two_nodes_one_pod_each();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let own = n0.ns().run("iptables", &["--version"]).unwrap();
    assert!(
        own.contains("(nf_tables)"),
        "this test needs the nft backend behind `iptables`, got: {own}"
    );
    forward_drop_in(n0, "iptables-legacy");
    wait_forward_rules_in(n0, "172.17.0.0/16", "iptables-legacy");
    let pod = cluster.pod(0, 0);
    assert_forwarded_by_n0(&pod, n1, "its legacy rules");
    let nft = n0.ns().run("nft", &["list", "ruleset"]).unwrap();
    assert!(
        !nft.contains("FLANNEL-FWD") && !nft.contains("172.17."),
        "n0's nft FORWARD accepts: no rule may be written there:\n{nft}"
    );
    let line = "forward:    policy ACCEPT: no rule needed; iptables-legacy: policy DROP: \
                flanneld's forward rules in place (chain FLANNEL-FWD)";
    wait_until(
        &format!("n0's status to say {line:?}"),
        Duration::from_secs(5),
        || agent_cmd(n0, &["status"]).lines().any(|l| l == line),
    );
    let legacy = n1.ns().run("cat", &["/proc/net/ip_tables_names"]).unwrap();
    assert!(
        legacy.trim().is_empty(),
        "n1 had no legacy tables; the agent's checks created some: {legacy:?}"
    );
}

// ----- 3. the pod bridge comes late and is re-created ------------------------------------------

/// The bridge is created after the agent wrote its subnet file (the harness adds pods then) and
/// the agent attaches to it; deleted, the agent lets go; re-created by the next pod, the agent
/// attaches to the new one within its 1 s poll and traffic flows again.
#[test]
fn pod_bridge_appearing_late_and_recreated_is_attached() {
    let cluster = two_nodes_one_pod_each();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let agent = agent_of(n1);
    let first = wait_line_since(
        &agent,
        0,
        &["pod bridge cni0 (index ", ") attached"],
        AGENT_REACTS,
    );
    let log = agent.log();
    let wrote = log
        .find("wrote ")
        .expect("the agent logs writing the subnet file");
    assert!(
        log.find(&first).unwrap() > wrote,
        "the bridge appeared after the subnet file was written, so the agent attaches after it:\n{log}"
    );
    let index = |line: &str| -> u32 {
        let rest = &line[line.find("(index ").unwrap() + 7..];
        rest[..rest.find(')').unwrap()].parse().unwrap()
    };
    let old_index = index(&first);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
    assert_pods_talk(&b, &a);

    // Delete the bridge.
    let mark = agent.log().len();
    n1.ns().ip(&["link", "del", "cni0"]).unwrap();
    wait_line_since(&agent, mark, &["pod bridge gone"], AGENT_REACTS);
    assert_no_ping(&a, b.ip(), "n1 has no pod bridge any more");

    // A new pod re-creates it (as the CNI bridge plugin would).
    let mark = agent.log().len();
    let start = Instant::now();
    let c = n1.add_pod("p1").unwrap();
    let line = wait_line_since(
        &agent,
        mark,
        &["pod bridge cni0 (index ", ") attached"],
        AGENT_REACTS,
    );
    let new_index = index(&line);
    assert_ne!(
        new_index, old_index,
        "the re-created bridge is a new interface: {line}"
    );
    assert!(
        attached_programs(n1.ns(), "cni0")
            .unwrap()
            .iter()
            .any(|p| p.name == names::POD_EGRESS && p.kind == AttachKind::TcxIngress),
        "the kernel must report pod_egress on the new cni0"
    );
    traffic::ping_until(a.ns(), c.ip(), FIRST_ECHO)
        .unwrap_or_else(|e| panic!("{a} -> {c} after the bridge came back: {e:#}"));
    let took = start.elapsed();
    eprintln!("traffic to the re-created bridge after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "traffic must work within a few seconds, took {took:?}"
    );
    assert_pods_talk(&a, &c);
    assert_pods_talk(&c, &a);
    assert_ping(n0, &c);
    assert_tcp(n0, &c);
}

// ----- 4. a node's lease goes away -------------------------------------------------------------

/// Node n2's agent crashes (SIGKILL: it cannot clean up, and its pinned data path stays) and its
/// lease is deleted: the other agents log the removal, their ROUTE_V4 entries for n2's subnet go
/// (`overlay-agent peers`), their pods and hosts stop reaching n2's pods (counted as
/// `drop_no_route`), n2's still-running data path is no longer accepted (`drop_unknown_peer`),
/// and n0 ↔ n1 keep working.
#[test]
fn removed_lease_stops_traffic_to_that_node() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(1)
        .network_config(CONFIG)
        .build()
        .unwrap();
    let (p0, p1, p2) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(2, 0));
    assert_pods_talk(&p0, &p2);
    assert_pods_talk(&p1, &p2);
    assert_pods_talk(&p2, &p0);
    assert_ping(cluster.node(0), &p2);

    let n2 = cluster.node(2);
    let lease = lease_of(&cluster, n2.underlay_ip());
    for i in 0..2 {
        let node = cluster.node(i);
        let mut want: Vec<_> = (0..3)
            .filter(|&j| j != i)
            .map(|j| peer_entry(&lease_of(&cluster, cluster.node(j).underlay_ip())))
            .collect();
        want.sort();
        assert_eq!(
            peers(node),
            want,
            "{}: ROUTE_V4 must hold the other two nodes' leases",
            node.name()
        );
    }

    let marks: Vec<usize> = (0..2)
        .map(|i| agent_of(cluster.node(i)).log().len())
        .collect();
    agent_of(n2).kill9().unwrap();
    assert_eq!(
        cluster.etcd().del(&lease.key).unwrap(),
        1,
        "deleting {}",
        lease.key
    );
    for (i, &mark) in marks.iter().enumerate() {
        wait_line_since(
            &agent_of(cluster.node(i)),
            mark,
            &[&format!("peer removed: subnet {}", lease.subnet)],
            AGENT_REACTS,
        );
    }
    for i in 0..2 {
        let node = cluster.node(i);
        let other = lease_of(&cluster, cluster.node(1 - i).underlay_ip());
        assert_eq!(
            peers(node),
            [peer_entry(&other)],
            "{}: ROUTE_V4 must have lost {} and kept only the other node",
            node.name(),
            lease.subnet
        );
    }

    let before = counters(cluster.node(0));
    assert_no_ping(&p0, p2.ip(), "n2's lease is gone");
    assert_no_ping(cluster.node(0), p2.ip(), "n2's lease is gone");
    assert_no_ping(&p1, p2.ip(), "n2's lease is gone");
    assert!(
        traffic::tcp_transfer_to(&p0, &p2, p2.ip(), 1024, Duration::from_secs(3)).is_err(),
        "TCP {p0} -> {p2} must fail once n2's lease is gone"
    );
    // n2's pinned data path still sends, but n0 no longer takes n2 for a member.
    assert_no_ping(&p2, p0.ip(), "n0 no longer accepts VXLAN from n2");
    let grew = grown(&before, &counters(cluster.node(0)));
    assert!(
        grew.get("drop_no_route").copied().unwrap_or(0) >= 6,
        "n0 must count its pod's and host's packets to {} as drop_no_route (>= 6); counters grew by {grew:?}",
        lease.subnet
    );
    assert!(
        grew.get("drop_unknown_peer").copied().unwrap_or(0) >= 3,
        "n0 must count n2's frames as drop_unknown_peer (>= 3); counters grew by {grew:?}"
    );
    assert!(
        !grew.contains_key("decap_pod") && !grew.contains_key("decap_endpoint"),
        "nothing from n2 may reach n0's pods: {grew:?}"
    );

    // The remaining nodes are unaffected.
    assert_pods_talk(&p0, &p1);
    assert_pods_talk(&p1, &p0);
}

// ----- 5. a stock flannel node in the cluster --------------------------------------------------

/// Node n2 runs no agent: it is built as flanneld builds a node, from the lease records in
/// etcd (kernel `flannel.1`, neighbour, fdb and route entries per peer), and announces itself
/// with a lease in flannel's exact format. Pods on our nodes and on the stock node reach each
/// other both ways (ping, TCP with checksum, real source), and the stock host reaches our pods.
#[test]
fn stock_flannel_node_interoperates() {
    assert_stock_node_interoperates(CONFIG, 1, 8472);
}

/// The same with the vxlan options flannel's docs give for clusters with Windows nodes: VNI
/// 4096 on UDP 4789, and the Windows-only `MacPrefix` and `Name` (taken and ignored, as on
/// Linux flanneld). Our leases carry VNI 4096, our frames reach the stock node's
/// `flannel.4096` (which takes only its VNI on its port) and its frames reach our pods.
#[test]
fn a_windows_compatible_vxlan_config_interoperates_with_a_stock_node() {
    assert_stock_node_interoperates(
        r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789,
            "MacPrefix": "0E-2A", "Name": "flannel.4096"}}"#,
        4096,
        4789,
    );
}

/// Two agents under `config` (whose VXLAN is `vni` on UDP `port`) and a stock flanneld node
/// built from their leases: pods and hosts reach each other every way.
fn assert_stock_node_interoperates(config: &str, vni: u32, port: u16) {
    let cluster = Cluster::builder()
        .nodes(3)
        .start_agents(false)
        .network_config(config)
        .build()
        .unwrap();
    for i in 0..2 {
        cluster.node(i).start_agent(&[]).unwrap();
    }
    for i in 0..2 {
        cluster.node(i).add_pod("p0").unwrap();
        cluster.node(i).add_pod("p1").unwrap();
    }

    // The stock node, flannel-compat.md §4.
    let stock = cluster.node(2);
    let stock_subnet: Ipv4Net = "172.17.250.0/24".parse().unwrap();
    let stock_mac = "0e:fa:00:00:00:03";
    let ours: Vec<LeaseRecord> = leases(&cluster);
    assert_eq!(ours.len(), 2, "our two agents hold leases: {ours:#?}");
    assert!(
        ours.iter().all(|l| l.vni == u64::from(vni)),
        "our leases must carry VNI {vni}: {ours:#?}"
    );
    assert!(
        ours.iter()
            .all(|l| !l.subnet.contains(&stock_subnet.network())),
        "{stock_subnet} must be free"
    );
    let (ns, local) = (stock.ns(), stock.underlay_ip().to_string());
    let stock_peers: Vec<StockPeer<'_>> = ours
        .iter()
        .map(|l| StockPeer {
            subnet: l.subnet,
            public_ip: l.public_ip,
            vtep_mac: &l.vtep_mac,
        })
        .collect();
    stock_vxlan_node_on(
        ns,
        stock.underlay_ip(),
        stock_subnet,
        stock_mac,
        &stock_peers,
        vni,
        port,
    )
    .unwrap();
    let stock_pod = stock
        .add_pod_in(
            "p0",
            Ipv4Net::new(Ipv4Addr::from(u32::from(stock_subnet.network()) + 1), 24).unwrap(),
            POD_MTU,
        )
        .unwrap();

    // Its lease, in flannel's exact JSON, with a 24 h etcd lease.
    let marks: Vec<usize> = (0..2)
        .map(|i| agent_of(cluster.node(i)).log().len())
        .collect();
    let key = format!(
        "{}/subnets/{}-{}",
        cluster.etcd_prefix(),
        stock_subnet.network(),
        stock_subnet.prefix_len()
    );
    let record = format!(
        r#"{{"PublicIP":"{local}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"{stock_mac}"}}}}"#
    );
    cluster.etcd().put_with_ttl(&key, &record, 86_400).unwrap();
    for (i, &mark) in marks.iter().enumerate() {
        wait_line_since(
            &agent_of(cluster.node(i)),
            mark,
            &[&format!(
                "peer added: subnet {stock_subnet} public IP {local} backend vxlan VtepMAC {stock_mac}"
            )],
            AGENT_REACTS,
        );
    }

    for i in 0..2 {
        let entry = (stock_subnet, stock.underlay_ip(), stock_mac.to_owned());
        let routed = peers(cluster.node(i));
        assert!(
            routed.contains(&entry),
            "n{i}: ROUTE_V4 must hold the stock node {entry:?}: {routed:?}"
        );
    }
    for i in 0..2 {
        for j in 0..2 {
            let pod = cluster.pod(i, j);
            assert_pods_talk(&pod, &stock_pod);
            assert_pods_talk(&stock_pod, &pod);
        }
        // Hosts both ways: stock host -> our pod (source flannel.1's address), ours -> stock pod.
        let pod = cluster.pod(i, 0);
        assert_ping(stock, &pod);
        assert_eq!(
            assert_tcp(stock, &pod),
            stock_subnet.network(),
            "TCP stock host -> {pod}: source"
        );
        assert_ping(cluster.node(i), &stock_pod);
        assert_tcp(cluster.node(i), &stock_pod);
    }
    // And our nodes still talk among themselves.
    assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 1));
    let rx: u64 = ns
        .run(
            "cat",
            &[&format!(
                "/sys/class/net/flannel.{vni}/statistics/rx_packets"
            )],
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        rx > 0,
        "the stock node's flannel.{vni} must have received our frames"
    );
}

// ----- 6. crafted frames: non-member, wrong VNI, wrong MAC --------------------------------------

/// VXLAN frames sent to n0's eth0 that fail a check are dropped before the pod and counted by
/// reason (`overlay-agent counters`): from a host on the underlay that is no member
/// (198.18.0.200), from member n1 with VNI 2, from member n1 to another inner MAC; so are the
/// same frames fragmented (reassembled by n0's kernel, checked by the GRO device's program), and
/// a pod of n0 posing as n1 to its node's own VXLAN socket. The same frame
/// from member n1 with VNI 1 and n0's VtepMAC arrives in the pod, counted as `decap_pod`.
#[test]
fn foreign_and_wrong_vni_frames_are_dropped_and_counted() {
    let cluster = two_nodes_one_pod_each();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (target, sender_pod) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&sender_pod, &target); // neighbours resolved, n1 known to n0 as a member
    let vtep0 = parse_mac(&lease_of(&cluster, n0.underlay_ip()).vtep_mac);
    let vtep1 = parse_mac(&lease_of(&cluster, n1.underlay_ip()).vtep_mac);

    // A stranger on the underlay bridge.
    let stranger_ip = Ipv4Addr::new(198, 18, 0, 200);
    let stranger = NetNs::new(format!("{}-x", cluster.id())).unwrap();
    add_veth(&stranger, "eth0", cluster.underlay(), "x0").unwrap();
    cluster.underlay().set_master("x0", "br0").unwrap();
    cluster.underlay().link_up("x0").unwrap();
    stranger
        .add_addr("eth0", &format!("{stranger_ip}/24"))
        .unwrap();
    stranger.link_up("eth0").unwrap();
    traffic::ping_until(&stranger, n0.underlay_ip(), FIRST_ECHO).unwrap();

    let port = 7777;
    let sock = target
        .ns()
        .in_netns(move || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?))
        .unwrap();
    let big = [b'f'; 2000];
    let frame = |vni: u32, dst_mac: [u8; 6], data: &[u8]| {
        vxlan_payload(
            vni,
            dst_mac,
            vtep1,
            sender_pod.ip(),
            target.ip(),
            port,
            data,
        )
    };
    const N: u64 = 5;
    let cases: [(&str, &NetNs, Ipv4Addr, Vec<u8>, &str); 3] = [
        (
            "from non-member 198.18.0.200",
            &stranger,
            stranger_ip,
            frame(VNI, vtep0, b"stranger"),
            "drop_unknown_peer",
        ),
        (
            "from member n1 with VNI 2",
            n1.ns(),
            n1.underlay_ip(),
            frame(2, vtep0, b"wrong vni"),
            "drop_wrong_vni",
        ),
        (
            "from member n1 to n1's own VtepMAC",
            n1.ns(),
            n1.underlay_ip(),
            frame(VNI, vtep1, b"wrong mac"),
            "drop_wrong_mac",
        ),
    ];
    // Sends N copies of `payload` from `src` in `ns` to n0's VXLAN port, asserts that none
    // reached the target, and returns how n0's counters grew.
    let undelivered = |what: &str, ns: &NetNs, src: Ipv4Addr, payload: &[u8]| {
        let before = counters(n0);
        send_vxlan(ns, src, n0.underlay_ip(), payload, N as usize);
        let got = drain(&sock);
        assert!(
            got.is_empty(),
            "VXLAN {what} must not reach {target}: it received {got:?}"
        );
        grown(&before, &counters(n0))
    };
    for (what, ns, src, payload, reason) in cases {
        let grew = undelivered(what, ns, src, &payload);
        assert_eq!(
            grew.get(reason).copied(),
            Some(N),
            "n0 must count the {N} frames {what} as {reason}; counters grew by {grew:?}"
        );
        for decap in ["decap_pod", "decap_endpoint"] {
            assert_eq!(
                grew.get(decap),
                None,
                "frames {what} must not be decapsulated: {grew:?}"
            );
        }

        // The same, too large for the sender's MTU: its kernel fragments the datagram, n0's
        // kernel reassembles it for the GRO device, whose program makes the same checks.
        let mut fragmented = payload.clone();
        fragmented.extend_from_slice(&big);
        let grew = undelivered(&format!("{what}, fragmented"), ns, src, &fragmented);
        assert_eq!(
            (
                grew.get("to_stack_fragment").copied(),
                grew.get(reason).copied()
            ),
            (Some(N), Some(N)),
            "fragmented VXLAN {what}: counters grew by {grew:?}"
        );
        assert_eq!(grew.get("decap_gro_device"), None, "{what}: {grew:?}");
    }

    // A pod of n0 sending VXLAN to its own node's socket, posing as member n1 (n1's address
    // added in the pod): it never meets eth0's program, only the GRO device's socket, whose
    // program delivers only what eth0's program handed over as fragments.
    let posing = format!("{}/32", n1.underlay_ip());
    target.ns().add_addr("eth0", &posing).unwrap();
    let grew = undelivered(
        "from a pod to its node",
        target.ns(),
        n1.underlay_ip(),
        &frame(VNI, vtep0, b"from a pod"),
    );
    assert_eq!(
        grew.get("drop_gro_device").copied(),
        Some(N),
        "VXLAN from a pod to its node: counters grew by {grew:?}"
    );
    target
        .ns()
        .ip(&["addr", "del", &posing, "dev", "eth0"])
        .unwrap();

    let before = counters(n0);
    send_vxlan(
        n1.ns(),
        n1.underlay_ip(),
        n0.underlay_ip(),
        &frame(VNI, vtep0, b"from a member"),
        N as usize,
    );
    let got = drain(&sock);
    assert_eq!(
        got,
        vec![b"from a member".to_vec(); N as usize],
        "all {N} correct frames from member n1 must arrive in {target}"
    );
    let grew = grown(&before, &counters(n0));
    // Delivered through the bridge, or straight into the pod once its endpoint is known.
    let delivered: u64 = ["decap_pod", "decap_endpoint"]
        .iter()
        .map(|c| grew.get(*c).copied().unwrap_or(0))
        .sum();
    assert!(
        delivered >= N,
        "n0 must count the member's {N} frames as decapsulated; counters grew by {grew:?}"
    );
    let drops: Vec<_> = grew.keys().filter(|k| k.starts_with("drop_")).collect();
    assert!(
        drops.is_empty(),
        "no drop counter may grow for the member's correct frames: {grew:?}"
    );
}

// ----- 7. peers behind a router --------------------------------------------------------------

/// n1 sits on the second segment, behind the underlay's router, as VXLAN allows (flannel.1
/// routes the outer packets like any other). Pods talk both ways through our encapsulation, and
/// the outer frames n0 sends to n1 go to the router's MAC: the next hop that the FIB lookup in
/// `redirect_to_underlay` finds for n1's PublicIP. n0 never resolves n1's PublicIP itself (nobody
/// on its segment would answer).
/// Two nodes with a pod each; n1 on the second segment, behind the underlay's router.
fn cluster_behind_a_router() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .second_segment(&[1])
        .pods_per_node(1)
        .network_config(CONFIG)
        .build()
        .unwrap()
}

#[test]
fn peers_behind_a_router_are_sent_to_the_gateway() {
    let cluster = cluster_behind_a_router();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let router_mac = cluster
        .underlay()
        .run("cat", &["/sys/class/net/br0/address"])
        .unwrap()
        .trim()
        .to_owned();

    let before = counters(n0);
    let pcap = cluster.dir().join("routed.pcap");
    let capture = capture_vxlan_at_n0(&cluster, &pcap);
    assert_pods_talk(&p0, &p1);
    assert_pods_talk(&p1, &p0);
    let pcap = capture.stop().unwrap();
    let sent = grown(&before, &counters(n0));
    assert!(
        sent.get("encap_pod").copied().unwrap_or(0) > 0,
        "n0 encapsulated nothing for n1: {sent:?}"
    );

    let to_n1 = tshark_fields(
        &pcap,
        &format!(
            "vxlan && ip.src == {} && ip.dst == {}",
            n0.underlay_ip(),
            n1.underlay_ip()
        ),
        &["eth.dst"],
    )
    .unwrap();
    assert!(!to_n1.is_empty(), "no VXLAN frame from n0 to n1 captured");
    for row in &to_n1 {
        let outer_dst = row[0].split(',').next().unwrap_or_default();
        assert_eq!(
            outer_dst, router_mac,
            "outer destination MAC of a frame to n1 (router br0 is {router_mac})"
        );
    }
    let neighbours = n0
        .ns()
        .run("ip", &["-4", "neigh", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        !neighbours.contains(&format!("{} ", n1.underlay_ip())),
        "n0 resolved n1's PublicIP on its own segment:\n{neighbours}"
    );
}

/// The programs cache the outer next hop per peer (`NEXT_HOP_V4`) under the agent's routing
/// generation. A route change on the node must take effect from the next packet after the
/// agent renewed the generation (at the route event; at worst at its once-a-second renewal),
/// not when the cache happens to expire: with n1 behind the router and traffic flowing (next
/// hop cached), n0 gets a more specific route to n1 through a gateway that does not exist.
/// Once the generation read after the change has been renewed (`status`), the pings must all
/// go there: n0 tries to resolve that gateway, and not one of their frames reaches the
/// router. (The pings used to start right after the change, which failed once on a loaded
/// machine where the agent heard of the route after the first ping went out: how fast the
/// agent reacts is not this test's to time.) With the route removed, pods talk through the
/// router again.
#[test]
fn a_changed_route_to_a_peer_is_followed_at_once() {
    let cluster = cluster_behind_a_router();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(1, 0));
    // ping -s 200: inner IPv4 packets of 228 bytes, told apart from the other traffic.
    let (payload, inner_len) = (200, 228);

    let pcap = cluster.dir().join("route-change.pcap");
    let capture = capture_vxlan_at_n0(&cluster, &pcap);
    assert_pods_talk(&p0, &p1);
    let host_route = route_via_missing_gateway(n0, &format!("{}/32", n1.underlay_ip()));
    // Read after the change: any renewal past it follows the change.
    wait_routing_renewed(n0, routing_generation(n0));
    // 20 pings in half a second; none can be answered.
    let _ = p0.ns().run(
        "ping",
        &[
            "-c",
            "20",
            "-i",
            "0.025",
            "-W",
            "1",
            "-s",
            &payload.to_string(),
            &p1.ip().to_string(),
        ],
    );
    unroute_missing_gateway(n0, &host_route);
    assert_pods_talk(&p0, &p1);
    let pcap = capture.stop().unwrap();

    let stale = tshark_fields(
        &pcap,
        &format!(
            "vxlan && ip.dst == {} && ip.len == {inner_len}",
            n1.underlay_ip()
        ),
        &["frame.number"],
    )
    .unwrap();
    assert!(
        stale.is_empty(),
        "{} ping(s) sent after the route change still went to the router (frames {stale:?})",
        stale.len()
    );
    let after = tshark_fields(
        &pcap,
        &format!("vxlan && ip.dst == {}", n1.underlay_ip()),
        &["frame.number"],
    )
    .unwrap();
    assert!(
        !after.is_empty(),
        "no VXLAN frame to n1 captured at all: the capture saw nothing"
    );
}

/// An underlay path with a smaller MTU than the nodes' interfaces (here the router's side
/// towards n1, 1300 bytes): we send VXLAN with DF clear, as flannel.1 does, so the router
/// fragments n0's full-size datagrams. `underlay_ingress` cannot reassemble: it hands the
/// fragments to n1's kernel (`to_stack_fragment`), which reassembles them for the GRO device's
/// socket, where `gro_device_ingress` checks what the kernel decapsulated and delivers it
/// (`decap_gro_device`). A TCP transfer of full-size segments and large pings arrive intact,
/// and nothing is dropped on the way.
#[test]
fn vxlan_fragmented_by_a_smaller_underlay_mtu_is_reassembled_and_delivered() {
    let cluster = cluster_behind_a_router();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&p0, &p1);
    cluster.underlay().set_mtu("br1", 1300).unwrap();

    let before = counters(n1);
    let bytes_before = counter_bytes(n1, "decap_gro_device");
    let report = p0.tcp_transfer(&p1, 4_000_000).unwrap();
    assert_eq!(report.bytes, 4_000_000);
    let ping = large_pings(&p0, &p1);
    assert!(
        ping.contains("5 received"),
        "large pings across the smaller MTU:\n{ping}"
    );
    let got = grown(&before, &counters(n1));
    let fragments = got.get("to_stack_fragment").copied().unwrap_or(0);
    let reassembled = got.get("decap_gro_device").copied().unwrap_or(0);
    assert!(
        fragments > 100,
        "n1 saw {fragments} first fragments for a 4 MB transfer: {got:?}"
    );
    // The socket's GRO merges the reassembled segments, so count bytes, not packets: the bulk
    // of the transfer came that way.
    let delivered = counter_bytes(n1, "decap_gro_device") - bytes_before;
    assert!(
        reassembled > 0 && delivered > 3_500_000,
        "n1 delivered {delivered} bytes in {reassembled} packets through the GRO device for \
         {fragments} fragmented datagrams: {got:?}"
    );
    let drops: Vec<_> = got
        .iter()
        .filter(|(name, _)| name.starts_with("drop_"))
        .collect();
    assert!(drops.is_empty(), "drops on n1: {drops:?}");
    // The other way, nothing is fragmented (the router's side towards n0 keeps 1500).
    let back = p1.tcp_transfer(&p0, 1_000_000).unwrap();
    assert_eq!(back.bytes, 1_000_000);
    let on_n0 = grown(&before, &counters(n0));
    assert_eq!(on_n0.get("to_stack_fragment"), None, "{on_n0:?}");
}

/// Five pings `from` → `to` with 1,400 bytes of ICMP data (an inner packet of 1,428 bytes, an
/// outer one of 1,478: fragmented on a 1,300-byte path); ping's summary.
fn large_pings(from: &Pod, to: &Pod) -> String {
    let dst = to.ip().to_string();
    let args = [
        "-n", "-q", "-c", "5", "-i", "0.2", "-W", "1", "-s", "1400", &dst,
    ];
    from.ns().run("ping", &args).unwrap()
}

/// The bytes of the counter `name` of `node` (`overlay-agent counters`: `<name> <packets>
/// <bytes>`).
fn counter_bytes(node: &Node, name: &str) -> u64 {
    let out = agent_cmd(node, &["counters"]);
    out.lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [n, _, bytes] if n == name => bytes.parse().ok(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no counter {name} in:\n{out}"))
}

// ----- 8. a node behind NAT ------------------------------------------------------------------

/// n1's published address behind the NAT.
const NAT_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

/// `pkts` of the first rule of `iptables-save -c` output `saved` containing `needle`.
fn rule_packets(saved: &str, needle: &str) -> u64 {
    let line = saved
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in:\n{saved}"));
    line.trim_start_matches('[')
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {line:?}"))
}

/// n1 sits behind a NAT: the underlay's router (n1 on its second segment) translates the
/// address n1 publishes, `--public-ip 198.18.2.2`, to n1's interface address 198.18.1.2
/// (DNAT) and what n1 sends to n0's segment back from it (SNAT); like an ISP it drops what n1
/// sends with another source. n1 must send VXLAN from its interface address (from its PublicIP
/// the router would drop it) and accept VXLAN to it (the NAT rewrote the PublicIP n0 sent
/// to). Pods talk both ways with their real addresses; on the wire n0 sees only the PublicIP,
/// n1 only its interface address; n1's status shows both.
#[test]
fn a_node_behind_nat_is_reached_through_its_public_ip() {
    let cluster = Cluster::builder()
        .nodes(2)
        .second_segment(&[1])
        .network_config(CONFIG)
        .build()
        .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (ul, iface, public) = (cluster.underlay(), n1.underlay_ip(), NAT_PUBLIC_IP);
    let (iface_s, public_s) = (iface.to_string(), public.to_string());
    for rule in [
        format!("-t nat -A PREROUTING -d {public} -j DNAT --to-destination {iface}"),
        format!("-t nat -A POSTROUTING -s {iface} -o br0 -j SNAT --to-source {public}"),
        "-A FORWARD -i br1 ! -s 198.18.1.0/24 -j DROP".to_owned(),
    ] {
        let args: Vec<&str> = rule.split_whitespace().collect();
        ul.run("iptables", &args).unwrap();
    }
    n0.start_agent(&[]).unwrap();
    n1.start_agent(&["--public-ip", &public_s]).unwrap();
    for n in [n0, n1] {
        n.subnet_env().unwrap();
    }
    let (p0, p1) = (n0.add_pod("p0").unwrap(), n1.add_pod("p0").unwrap());
    lease_of(&cluster, public);
    assert!(
        leases(&cluster).iter().all(|l| l.public_ip != iface),
        "n1's interface address must not be published"
    );

    let (at_n0, at_n1) = (
        cluster.dir().join("nat-n0.pcap"),
        cluster.dir().join("nat-n1.pcap"),
    );
    let captures = [
        capture_vxlan_at_n0(&cluster, &at_n0),
        Capture::start(ul, "n1", &format!("udp port {VXLAN_PORT}"), &at_n1).unwrap(),
    ];
    let before = counters(n1);
    assert_pods_talk(&p0, &p1);
    assert_pods_talk(&p1, &p0);
    for c in captures {
        c.stop().unwrap();
    }
    let decapsulated = grown(&before, &counters(n1));
    assert!(
        decapsulated.get("decap_pod").copied().unwrap_or(0)
            + decapsulated.get("decap_endpoint").copied().unwrap_or(0)
            > 0,
        "n1 decapsulated nothing: {decapsulated:?}"
    );

    let outer = |pcap: &std::path::Path| -> BTreeSet<(String, String)> {
        tshark_fields(pcap, "vxlan", &["ip.src", "ip.dst"])
            .unwrap()
            .into_iter()
            .map(|row| {
                let first = |f: &str| f.split(',').next().unwrap_or_default().to_owned();
                (first(&row[0]), first(&row[1]))
            })
            .collect()
    };
    let n0_ip = n0.underlay_ip().to_string();
    assert_eq!(
        outer(&at_n0),
        BTreeSet::from([
            (n0_ip.clone(), public_s.clone()),
            (public_s.clone(), n0_ip.clone())
        ]),
        "outer addresses at n0: n1 appears as its PublicIP only"
    );
    assert_eq!(
        outer(&at_n1),
        BTreeSet::from([(n0_ip.clone(), iface_s.clone()), (iface_s.clone(), n0_ip)]),
        "outer addresses at n1: n1 sends from and receives at its interface address"
    );
    let saved = ul.run("iptables-save", &["-c", "-t", "nat"]).unwrap();
    assert!(
        rule_packets(&saved, "-j DNAT") > 0,
        "the DNAT was not used:\n{saved}"
    );
    assert!(
        rule_packets(&saved, "-j SNAT") > 0,
        "the SNAT was not used:\n{saved}"
    );

    let status: serde_json::Value =
        serde_json::from_str(&agent_cmd(n1, &["status", "-o", "json"])).unwrap();
    assert_eq!(
        (
            status["agent"]["interface_addr"].as_str(),
            status["agent"]["public_ip"].as_str()
        ),
        (Some(iface_s.as_str()), Some(public_s.as_str())),
        "n1's status: {status}"
    );
}

/// A `flannel.1` that flanneld left behind (replacing flanneld without deleting it) holds the
/// VXLAN port, so the GRO device cannot come up, and fragmented VXLAN goes to `flannel.1`,
/// which drops it (its MAC is not our VtepMAC). The agent says so as an error naming the
/// device and what to do, and reports not ready; once the device is deleted, it brings the GRO
/// device up within seconds, is ready again, and fragmented VXLAN is delivered.
#[test]
fn a_leftover_flannel_1_is_reported_until_deleted_then_the_gro_device_comes_up() {
    let cluster = cluster_behind_a_router();
    let n1 = cluster.node(1);
    let (p0, p1) = (cluster.pod(0, 0), cluster.pod(1, 0));
    n1.agent().unwrap().kill().unwrap();
    let ns = n1.ns();
    ns.ip(&["link", "del", "ovl-gro"]).unwrap();
    let flannel = [
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "eth0",
        "nolearning",
    ];
    ns.ip(&flannel).unwrap();
    ns.ip(&["link", "set", "flannel.1", "up"]).unwrap();
    let agent = n1.start_agent(&[]).unwrap();
    let status = || -> serde_json::Value {
        serde_json::from_str(&agent_cmd(n1, &["status", "-o", "json"])).unwrap()
    };
    let wait = Duration::from_secs(15);
    agent
        .wait_for_log("VXLAN device flannel.1 holds port 8472", wait)
        .unwrap();
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("VXLAN device flannel.1 holds port 8472"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("ip link delete flannel.1"),
        "{line}"
    );
    wait_until("n1 not ready, naming flannel.1", wait, || {
        let s = status();
        s["agent"]["ready"] == false
            && s["agent"]["not_ready_reason"]
                .as_str()
                .is_some_and(|r| r.contains("flannel.1 holds port 8472"))
    });
    assert_pods_talk(&p0, &p1);

    ns.ip(&["link", "del", "flannel.1"]).unwrap();
    wait_until("n1 ready again", wait, || {
        status()["agent"]["ready"] == true
    });
    agent.wait_for_log("it is up now", wait).unwrap();
    cluster.underlay().set_mtu("br1", 1300).unwrap();
    let before = counters(n1);
    let ping = large_pings(&p0, &p1);
    assert!(ping.contains("5 received"), "large pings:\n{ping}");
    let got = grown(&before, &counters(n1));
    assert!(
        got.get("decap_gro_device").copied().unwrap_or(0) >= 5,
        "delivered through the GRO device: {got:?}"
    );
    let log = agent.log();
    assert!(
        log.matches("took over the pinned link on ovl-gro").count() <= 1,
        "the retries attach nothing again:\n{log}"
    );
}
