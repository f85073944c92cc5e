//! Kubernetes Services through the overlay: kube-proxy's iptables mode, as it writes its rules,
//! in the node namespaces (nat PREROUTING and OUTPUT, a Service address DNATed to an
//! endpoint), with `br_netfilter` on as Kubernetes requires it (the bridge runs those rules on
//! pods' packets, between the pod's veth and the bridge's own hook).
//!
//! What must hold, as with flannel: a pod reaches a Service whose endpoint is a remote pod, a
//! local pod or a member node's own address (a hostNetwork pod, the API server) by the Service
//! address; the endpoint sees the pod's real address; the replies reach the pod from the
//! Service address (else TCP resets and UDP sockets drop them); agents killed and restarted
//! lose no such connection. The counters show the way it took: `to_stack_dnat` (the bridge's
//! packet left to the kernel's forwarding), `kernel_flow_new` (the flow filed at the host
//! device), `to_stack_kernel_flow` (replies through the kernel). Pod-to-pod traffic between the
//! same pods still goes straight in.
//!
//! Root only (fails, never skips, without it). Run: `cargo xtask build && OVERLAY_AGENT_BIN=
//! target/debug/overlay-agent cargo test -p overlay-tests --test services -- --test-threads=1`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use overlay_tests::{
    Cluster, Endpoint, NetNs, Node, Pod,
    checks::{
        assert_pods_talk, assert_tcp, counters, forward_drop, grown, transfer_across_agent_kill9,
        wait_forward_rules,
    },
    traffic,
};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const HOST_GW_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "host-gw"}}"#;
/// A Service address in kubeadm's Service CIDR (10.96.0.0/12).
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_BYTES: u64 = 1_000_000;
const UDP_COUNT: u64 = 20;
/// Long enough to be running across an agent kill and restart.
const RESTART_BYTES: u64 = 400_000_000;

/// A Service as a client sees it: the address it connects to, served in the endpoint's
/// namespace.
struct Service<'a> {
    endpoint: &'a (dyn Endpoint + Sync),
}

impl Endpoint for Service<'_> {
    fn ns(&self) -> &NetNs {
        self.endpoint.ns()
    }

    fn ip(&self) -> Ipv4Addr {
        SERVICE_IP
    }

    fn label(&self) -> String {
        format!("service {SERVICE_IP} → {}", self.endpoint.label())
    }
}

/// Fails unless the bridge runs iptables on pods' packets in `node`, as on a Kubernetes node.
fn require_br_netfilter(node: &Node) {
    let on = node
        .ns()
        .sysctl_get("net.bridge.bridge-nf-call-iptables")
        .unwrap_or_else(|e| {
            panic!("br_netfilter is needed (modprobe br_netfilter), as Kubernetes needs it: {e:#}")
        });
    assert_eq!(
        on.trim(),
        "1",
        "net.bridge.bridge-nf-call-iptables must be 1, as Kubernetes sets it"
    );
}

/// kube-proxy's rules for `SERVICE_IP` with one endpoint, `to` (the ports are kept: the tests
/// pick a new one per transfer), replacing any earlier ones.
fn route_service(node: &Node, to: Ipv4Addr) {
    node.ns().run("iptables", &["-t", "nat", "-F"]).unwrap();
    for chain in ["PREROUTING", "OUTPUT"] {
        for proto in ["tcp", "udp"] {
            let rule = format!(
                "-t nat -A {chain} -d {SERVICE_IP}/32 -p {proto} -j DNAT --to-destination {to}"
            );
            let args: Vec<&str> = rule.split_whitespace().collect();
            node.ns().run("iptables", &args).unwrap();
        }
    }
}

/// TCP from `client` to the Service whose endpoint is `endpoint`: every byte arrives, and the
/// endpoint sees the client's own address.
fn assert_service_reached_tcp(client: &Pod, endpoint: &(dyn Endpoint + Sync)) {
    let service = Service { endpoint };
    let t = traffic::tcp_transfer(client, &service, TCP_BYTES)
        .unwrap_or_else(|e| panic!("TCP {client} -> {}: {e:#}", service.label()));
    assert_eq!(t.bytes, TCP_BYTES);
    assert_eq!(
        t.server_peer.ip(),
        client.ip(),
        "the endpoint must see the pod's own address"
    );
}

/// [`assert_service_reached_tcp`], and UDP: every echo comes back.
fn assert_service_reached(client: &Pod, endpoint: &(dyn Endpoint + Sync)) {
    assert_service_reached_tcp(client, endpoint);
    let service = Service { endpoint };
    let u = traffic::udp_echo(client, &service, UDP_COUNT).unwrap();
    assert_eq!(
        (u.received, u.bad),
        (UDP_COUNT, 0),
        "UDP {client} -> {}: every echo must come back from the Service address",
        service.label()
    );
    assert!(
        u.server_peers.iter().all(|p| p.ip() == client.ip()),
        "UDP seen from {:?}",
        u.server_peers
    );
}

/// How much the counter `reason` grew from `before` to `after`.
fn grew(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    grown(before, after).get(reason).copied().unwrap_or(0)
}

fn cluster(config: &str, args: &[&str]) -> Cluster {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(2)
        .outside(true)
        .network_config(config)
        .agent_args(args)
        .build()
        .unwrap();
    require_br_netfilter(cluster.node(0));
    cluster
}

/// VXLAN, no masquerade: endpoints on the other node (a pod, the node itself) and on this one.
#[test]
fn a_service_is_reached_through_its_address_wherever_its_endpoint_is() {
    let cluster = cluster(VXLAN_CONFIG, &[]);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, local, remote) = (cluster.pod(0, 0), cluster.pod(0, 1), cluster.pod(1, 0));

    let before = counters(n0);
    route_service(n0, remote.ip());
    assert_service_reached(&p0, &remote);
    let after = counters(n0);
    for reason in ["to_stack_dnat", "kernel_flow_new", "to_stack_kernel_flow"] {
        assert!(
            grew(&before, &after, reason) > 0,
            "n0's {reason} must grow: {after:?}"
        );
    }

    // The same two pods, pod to pod: straight into the pod, not through the kernel.
    let before = counters(n0);
    assert_pods_talk(&remote, &p0);
    assert_pods_talk(&p0, &remote);
    let after = counters(n0);
    assert_eq!(
        grew(&before, &after, "to_stack_kernel_flow"),
        0,
        "{after:?}"
    );
    assert_eq!(grew(&before, &after, "to_stack_dnat"), 0, "{after:?}");
    assert!(grew(&before, &after, "decap_endpoint") > 0, "{after:?}");

    // An endpoint on the other node's own address (a hostNetwork pod): it answers through
    // its host device, over VXLAN. TCP only: a UDP server on the wildcard address answers a
    // pod from the host device's address, the route's source (`flannel.1`'s under flannel
    // too), which no conntrack matches; such servers bind the node's address.
    route_service(n0, n1.underlay_ip());
    assert_service_reached_tcp(&p0, n1);

    // A local endpoint: the bridge's netfilter forwards it on the bridge itself.
    route_service(n0, local.ip());
    assert_service_reached(&p0, &local);
}

/// Under Docker's FORWARD DROP on both nodes, with kube-proxy's own FORWARD rule (it accepts
/// established connections only), a pod still reaches a Service whose endpoint is a pod on the
/// other node, by TCP and UDP: the DNATed packets cross the kernel's forwarding, where the
/// first one of each connection is NEW, and the agent's flanneld forward rules (written by
/// default, as flanneld does) accept it. Without them the connection timed out (checked on
/// 038cdac).
#[test]
fn a_service_is_reached_under_dockers_forward_drop() {
    let cluster = cluster(VXLAN_CONFIG, &[]);
    let (n0, p0, remote) = (cluster.node(0), cluster.pod(0, 0), cluster.pod(1, 0));
    for node in cluster.nodes() {
        forward_drop(node);
        // kube-proxy's KUBE-FORWARD accepts what conntrack knows, not a Service's first packet.
        node.ns()
            .run(
                "iptables",
                &[
                    "-I",
                    "FORWARD",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    "ACCEPT",
                ],
            )
            .unwrap();
        wait_forward_rules(node, "172.17.0.0/16");
    }
    route_service(n0, remote.ip());
    let before = counters(n0);
    assert_service_reached(&p0, &remote);
    let after = counters(n0);
    assert!(grew(&before, &after, "to_stack_dnat") > 0, "{after:?}");
    assert_pods_talk(&p0, &remote);
}

/// host-gw with `--ip-masq` (the Service CIDR excluded, as the DaemonSet sets it): replies come
/// unencapsulated from the direct peer; an endpoint on the peer's own address is masqueraded
/// after the DNAT, as flannel's MASQUERADE rule would.
#[test]
fn a_service_is_reached_over_host_gw_with_masquerade() {
    let cluster = cluster(
        HOST_GW_CONFIG,
        &["--ip-masq", "--ip-masq-exclude", "10.96.0.0/12"],
    );
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, remote) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let before = counters(n0);
    route_service(n0, remote.ip());
    assert_service_reached(&p0, &remote);
    let after = counters(n0);
    assert!(
        grew(&before, &after, "to_stack_kernel_flow") > 0,
        "{after:?}"
    );

    route_service(n0, n1.underlay_ip());
    let service = Service { endpoint: n1 };
    let t = traffic::tcp_transfer(&p0, &service, TCP_BYTES).unwrap();
    assert_eq!(
        t.server_peer.ip(),
        n0.underlay_ip(),
        "leaving the cluster network, the pod is masqueraded to its node's address"
    );
}

/// A node moved in place from flanneld's host-gw keeps flanneld's route to each peer's subnet
/// (`<subnet> via <PublicIP> dev eth0`: flanneld deletes it only when the lease goes, and it is
/// not on `flannel.1`). Through it, kube-proxy's DNATed packet left past `ovl0`, unfiled, and
/// the endpoint's reply went straight into the pod, past conntrack. The agent removes such a
/// route, one that names a live peer's subnet and PublicIP, and the Service is reached.
#[test]
fn a_service_is_reached_over_host_gw_after_flanneld_left_its_routes() {
    let cluster = cluster(HOST_GW_CONFIG, &[]);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, remote) = (cluster.pod(0, 0), cluster.pod(1, 0));
    let peer_subnet = overlay_tests::checks::subnet_of(n1).to_string();
    let agent = overlay_tests::checks::agent_of(n0);
    let mark = agent.log().len();
    n0.ns()
        .ip(&[
            "route",
            "add",
            &peer_subnet,
            "via",
            &n1.underlay_ip().to_string(),
            "dev",
            "eth0",
        ])
        .unwrap();
    overlay_tests::checks::wait_log_since(
        &agent,
        mark,
        &format!("removed the route {peer_subnet} via {}", n1.underlay_ip()),
        std::time::Duration::from_secs(5),
    );
    let left = n0.ns().ip(&["route", "show", &peer_subnet]).unwrap();
    assert!(
        left.trim().is_empty(),
        "flanneld's route must be gone: {left}"
    );
    route_service(n0, remote.ip());
    assert_service_reached(&p0, &remote);
}

/// `--ip-masq` with the Service CIDR not excluded: the port hook (`--pod-hook port`, the
/// default) leaves a flow's first packet to the bridge, whose netfilter runs kube-proxy's rules
/// before `pod_egress` masquerades what they left alone. The Service is reached with the pod's
/// own address; an endpoint on the other node's address is masqueraded after the DNAT, as
/// flannel's MASQUERADE would; the outside host sees the node's address, and the port finishes
/// the later packets of that flow (`pod_port`).
#[test]
fn a_service_is_reached_with_masquerade_and_no_service_cidr_excluded() {
    let cluster = cluster(VXLAN_CONFIG, &["--ip-masq"]);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (p0, remote) = (cluster.pod(0, 0), cluster.pod(1, 0));
    route_service(n0, remote.ip());
    assert_service_reached(&p0, &remote);

    route_service(n0, n1.underlay_ip());
    let service = Service { endpoint: n1 };
    let t = traffic::tcp_transfer(&p0, &service, TCP_BYTES).unwrap();
    assert_eq!(t.server_peer.ip(), n0.underlay_ip());

    let before = counters(n0);
    let seen = assert_tcp(&p0, cluster.outside());
    assert_eq!(seen, n0.underlay_ip(), "masqueraded to the node's address");
    let after = counters(n0);
    assert_eq!(grew(&before, &after, "nat_new_flow"), 1, "{after:?}");
    assert!(grew(&before, &after, "pod_port") > 0, "{after:?}");
}

/// A Service connection survives `kill -9` of both agents and their restart: the filed flow is
/// pinned, so its replies keep going through the kernel.
#[test]
fn a_service_connection_survives_agent_restarts() {
    let cluster = cluster(VXLAN_CONFIG, &[]);
    let n0 = cluster.node(0);
    let (p0, remote) = (cluster.pod(0, 0), cluster.pod(1, 0));
    route_service(n0, remote.ip());
    let service = Service { endpoint: &remote };
    let report =
        transfer_across_agent_kill9(cluster.nodes(), &p0, &service, RESTART_BYTES, &[], || {});
    assert_eq!(report.bytes, RESTART_BYTES);
    assert_eq!(report.server_peer.ip(), p0.ip());
}

/// A port published on a node into a local pod (`docker run -p`, a hostPort, a NodePort with
/// `externalTrafficPolicy: Local`), with `--ip-masq`: the host outside the cluster connects to
/// the node's address; the node's netfilter DNATs it to the pod. The pod's replies must go
/// back through that conntrack entry (which gives them the node's address and port back), not
/// be masqueraded as a new flow.
#[test]
fn a_port_published_into_a_pod_is_reached_with_masquerade() {
    let cluster = cluster(VXLAN_CONFIG, &["--ip-masq"]);
    let (n0, p0) = (cluster.node(0), cluster.pod(0, 0));
    assert_published_port_reached(n0, cluster.outside(), &p0);
}

/// The same from a pod on the other node, without `--ip-masq` (so it connects with its own
/// address, not its node's): the pod's replies are addressed to a remote pod, and would be
/// sent straight to it with the pod's address, skipping the conntrack entry. Over VXLAN and
/// host-gw.
#[test]
fn a_port_published_into_a_pod_is_reached_from_a_remote_pod() {
    for config in [VXLAN_CONFIG, HOST_GW_CONFIG] {
        let cluster = cluster(config, &[]);
        let (n0, p0, client) = (cluster.node(0), cluster.pod(0, 0), cluster.pod(1, 0));
        assert_published_port_reached(n0, &client, &p0);
    }
}

/// `client` reaches `pod` through a port published on `node`'s address, by TCP and UDP, five
/// times each: every byte and every echo arrives, the pod sees the client's address, and
/// `node`'s counters show the connections filed where the kernel delivered them into the pod
/// and the pod's replies left to the kernel, none masqueraded as a flow of its own.
fn assert_published_port_reached(node: &Node, client: &(dyn Endpoint + Sync), pod: &Pod) {
    publish(node, client.ip(), pod.ip());
    let published = Published { node, pod };
    let before = counters(node);
    for round in 0..5 {
        let t = traffic::tcp_transfer(client, &published, TCP_BYTES).unwrap_or_else(|e| {
            panic!(
                "round {round}: TCP {} -> {}: {e:#}",
                client.label(),
                published.label()
            )
        });
        assert_eq!(t.bytes, TCP_BYTES);
        assert_eq!(
            t.server_peer.ip(),
            client.ip(),
            "the pod sees the client's address"
        );
        let u = traffic::udp_echo(client, &published, UDP_COUNT).unwrap();
        assert_eq!(
            (u.received, u.bad),
            (UDP_COUNT, 0),
            "round {round}: UDP {} -> {}: every echo must come back from the node's address",
            client.label(),
            published.label()
        );
    }
    let after = counters(node);
    assert!(grew(&before, &after, "kernel_flow_new") >= 10, "{after:?}");
    assert!(
        grew(&before, &after, "to_stack_kernel_flow") > 0,
        "{after:?}"
    );
    assert_eq!(grew(&before, &after, "nat_new_flow"), 0, "{after:?}");
}

/// The node's address as a client outside sees a published port; served in the pod.
struct Published<'a> {
    node: &'a Node,
    pod: &'a Pod,
}

impl Endpoint for Published<'_> {
    fn ns(&self) -> &NetNs {
        self.pod.ns()
    }

    fn ip(&self) -> Ipv4Addr {
        self.node.underlay_ip()
    }

    fn label(&self) -> String {
        format!("{} published → {}", self.node.underlay_ip(), self.pod)
    }
}

/// A DNAT of whatever `from` sends to the node's address into `pod` (every port: the tests pick
/// a new one per transfer; only from `from`, so the node's own VXLAN and etcd traffic is
/// untouched), replacing any earlier rules.
fn publish(node: &Node, from: Ipv4Addr, pod: Ipv4Addr) {
    node.ns().run("iptables", &["-t", "nat", "-F"]).unwrap();
    for proto in ["tcp", "udp"] {
        let rule = format!(
            "-t nat -A PREROUTING -s {from}/32 -d {}/32 -p {proto} -j DNAT --to-destination {pod}",
            node.underlay_ip()
        );
        let args: Vec<&str> = rule.split_whitespace().collect();
        node.ns().run("iptables", &args).unwrap();
    }
}
