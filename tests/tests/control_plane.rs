//! The control plane end to end: the real agent against a real etcd, in namespace
//! clusters. Leases, the subnet file, restarts, reservations, races, revocation, peer events,
//! bad input, etcd over TLS, health endpoints and flanneld's environment variables.
//!
//! Root only; run one at a time:
//! `cargo test -p overlay-tests --test control_plane -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use overlay_agent::subnet::Mac;
use overlay_common::names;
use overlay_tests::{
    AgentProcess, AttachKind, Cluster, DEFAULT_ETCD_PREFIX, KeyValue, NetNs, Node,
    checks::{eth0_programs, http_get, subnet_of, wait_line_since, wait_log_since, wait_until},
};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const NETWORK: &str = "172.17.0.0/16";
/// Generous bound for an agent to start, reach etcd and write its subnet file.
const START: Duration = Duration::from_secs(20);
/// flannel's lease TTL.
const DAY_SECS: i64 = 86_400;

// ----- helpers -----------------------------------------------------------------------------

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// `<prefix>/subnets/172.17.5.0-24`.
fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{prefix}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The VtepMAC our agent publishes for a node with this PublicIP.
fn vtep_mac(public_ip: Ipv4Addr) -> String {
    Mac::for_public_ip(public_ip).to_string()
}

/// flannel's vxlan lease record, byte for byte.
fn vxlan_record(public_ip: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// The subnet file flanneld writes for `subnet` (the lease, e.g. 172.17.5.0/24).
fn subnet_env_text(network: &str, subnet: Ipv4Net, mtu: u32, ipmasq: bool) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    format!(
        "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ipmasq}\n",
        subnet.prefix_len()
    )
}

/// Reads the node's subnet file as text (it must exist).
fn subnet_file_text(node: &Node) -> String {
    std::fs::read_to_string(node.subnet_file())
        .unwrap_or_else(|e| panic!("reading {}: {e}", node.subnet_file().display()))
}

/// The key `key` in etcd; panics when it is absent.
fn must_get(cluster: &Cluster, key: &str) -> KeyValue {
    cluster
        .etcd()
        .get_kv(key)
        .unwrap()
        .unwrap_or_else(|| panic!("expected key {key} in etcd, it is absent"))
}

/// Asserts that `kv` carries an etcd lease granted for 24 h that has (almost) all of it left.
fn assert_day_ttl(cluster: &Cluster, kv: &KeyValue) {
    assert_ne!(
        kv.lease, 0,
        "{} must carry an etcd lease, it has none",
        kv.key
    );
    let ttl = cluster.etcd().lease_ttl(kv.lease).unwrap();
    assert_eq!(
        ttl.granted_ttl, DAY_SECS,
        "{}: lease {:x} must be granted for 24 h (86400 s), got {ttl:?}",
        kv.key, kv.lease
    );
    assert!(
        (DAY_SECS - 120..=DAY_SECS).contains(&ttl.ttl),
        "{}: lease {:x} must have nearly 24 h left, got {ttl:?}",
        kv.key,
        kv.lease
    );
}

/// A one-node VXLAN cluster whose agent has attached its data path and taken a lease.
/// Two nodes under the VXLAN config, no agent started.
fn two_nodes() -> Cluster {
    Cluster::builder()
        .nodes(2)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap()
}

fn one_node_with_agent() -> (Cluster, AgentProcess, Ipv4Net) {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log("data path attached to eth0", START)
        .unwrap();
    let subnet = subnet_of(node);
    (cluster, agent, subnet)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn assert_data_path_attached(node: &Node) {
    assert_eq!(
        eth0_programs(node),
        [
            (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
            (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
        ],
        "{}: the kernel must report both data path programs on eth0",
        node.name()
    );
}

/// `GET path` over plain HTTP/1.1 from inside `ns`; returns the status code.
fn http_status(ns: &NetNs, addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    http_get(ns, addr, path).map(|(status, _)| status)
}

// ----- 1. leases, subnet file, records ----------------------------------------------------

#[test]
fn two_nodes_get_distinct_subnets_flannel_subnet_files_and_lease_records() {
    let cluster = two_nodes();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let a0 = n0.start_agent(&[]).unwrap();
    let a1 = n1.start_agent(&["--ip-masq"]).unwrap();
    for a in [&a0, &a1] {
        a.wait_for_log("Found network config - Backend type: vxlan", START)
            .unwrap();
        a.wait_for_log("data path attached to eth0", START).unwrap();
    }
    let s0 = subnet_of(n0);
    let s1 = subnet_of(n1);
    assert_ne!(s0, s1, "the two nodes must get distinct subnets");
    let network = net(NETWORK);
    for (node, agent, subnet, ipmasq) in [(n0, &a0, s0, false), (n1, &a1, s1, true)] {
        assert_eq!(
            subnet.prefix_len(),
            24,
            "{}: default SubnetLen is 24",
            node.name()
        );
        assert!(
            network.contains(&subnet),
            "{}: {subnet} must lie in {network}",
            node.name()
        );
        // flannel skips the first subnet of the network (SubnetMin default).
        assert_ne!(
            subnet,
            net("172.17.0.0/24"),
            "{}: SubnetMin skips 172.17.0.0/24",
            node.name()
        );
        agent
            .wait_for_log(&format!("Lease acquired: {subnet}"), START)
            .unwrap();
        agent
            .wait_for_log(
                &format!(
                    "wrote {} (subnet {subnet}, MTU 1450)",
                    node.subnet_file().display()
                ),
                START,
            )
            .unwrap();

        // The whole file, in flannel's order, MTU = 1500 - 50 for vxlan.
        assert_eq!(
            subnet_file_text(node),
            subnet_env_text(NETWORK, subnet, 1450, ipmasq),
            "{}: subnet file must be flannel's exact text",
            node.name()
        );
        let mode = std::fs::metadata(node.subnet_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644, "{}: subnet file mode", node.name());

        // The record in etcd: flannel's exact JSON with the VtepMAC derived from the PublicIP,
        // under a 24 h etcd lease.
        let kv = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, subnet));
        let ip = node.underlay_ip();
        assert_eq!(
            kv.value,
            vxlan_record(ip, &vtep_mac(ip)),
            "{}: lease record",
            node.name()
        );
        assert_day_ttl(&cluster, &kv);
    }
    // Exactly the two leases exist.
    let keys: Vec<String> = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let mut want = vec![
        lease_key(DEFAULT_ETCD_PREFIX, s0),
        lease_key(DEFAULT_ETCD_PREFIX, s1),
    ];
    want.sort();
    assert_eq!(keys, want, "the leases in etcd");

    // Each node sees the other as a peer, with the VtepMAC the other published.
    for (agent, peer, subnet) in [(&a0, n1, s1), (&a1, n0, s0)] {
        let ip = peer.underlay_ip();
        agent
            .wait_for_log(
                &format!(
                    "peer added: subnet {subnet} public IP {ip} backend vxlan VtepMAC {}",
                    vtep_mac(ip)
                ),
                Duration::from_secs(5),
            )
            .unwrap();
    }
}

// ----- 2. restarts --------------------------------------------------------------------------

#[test]
fn restart_keeps_subnet_and_vtep_mac_after_sigterm_and_after_kill9() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let ip = node.underlay_ip();
    let record = vxlan_record(ip, &vtep_mac(ip));

    let first = node.start_agent(&[]).unwrap();
    let subnet = subnet_of(node);
    let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
    let text = subnet_file_text(node);
    assert_eq!(must_get(&cluster, &key).value, record);

    // SIGTERM: a clean exit that leaves the lease in etcd (flanneld does not give it up).
    let status = first.kill().unwrap();
    assert!(
        status.success(),
        "SIGTERM must end the agent cleanly, got {status}"
    );
    let kept = must_get(&cluster, &key);
    assert!(
        cluster.etcd().lease_ttl(kept.lease).unwrap().ttl > 0,
        "the lease must survive a clean stop"
    );
    let second = node.start_agent(&[]).unwrap();
    second
        .wait_for_log(&format!("Lease acquired: {subnet}"), START)
        .unwrap();
    second
        .wait_for_log(
            &format!("Found lease ({subnet}) for current IP ({ip}), reusing"),
            START,
        )
        .unwrap();
    second.wait_for_log("wrote ", START).unwrap();
    assert_eq!(
        subnet_file_text(node),
        text,
        "subnet file after the SIGTERM restart"
    );
    let kv = must_get(&cluster, &key);
    assert_eq!(
        kv.value, record,
        "record (VtepMAC) after the SIGTERM restart"
    );
    assert_day_ttl(&cluster, &kv);

    // kill -9: no clean-up at all; the old etcd lease still holds the key. The subnet file is
    // removed too, so that only etcd can give the subnet back.
    second.kill9().unwrap();
    let before = must_get(&cluster, &key);
    let old_ttl = cluster.etcd().lease_ttl(before.lease).unwrap();
    assert!(
        old_ttl.ttl > 0,
        "the old etcd lease must still exist after kill -9: {old_ttl:?}"
    );
    std::fs::remove_file(node.subnet_file()).unwrap();
    let third = node.start_agent(&[]).unwrap();
    third
        .wait_for_log(&format!("Lease acquired: {subnet}"), START)
        .unwrap();
    third
        .wait_for_log(
            &format!("Found lease ({subnet}) for current IP ({ip}), reusing"),
            START,
        )
        .unwrap();
    assert_eq!(subnet_of(node), subnet);
    assert_eq!(
        subnet_file_text(node),
        text,
        "subnet file after the kill -9 restart"
    );
    let kv = must_get(&cluster, &key);
    assert_eq!(
        kv.value, record,
        "record (VtepMAC) after the kill -9 restart"
    );
    assert_day_ttl(&cluster, &kv);
    let all = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert_eq!(
        all.len(),
        1,
        "restarts must not leave extra leases: {all:?}"
    );
    third
        .wait_for_log("data path attached to eth0", START)
        .unwrap();
}

// ----- 3. subnet-file fallback --------------------------------------------------------------

#[test]
fn subnet_file_of_a_previous_run_chooses_the_subnet() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    std::fs::write(
        node.subnet_file(),
        "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.77.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let agent = node.start_agent(&[]).unwrap();
    let want = net("172.17.77.0/24");
    agent
        .wait_for_log(
            &format!("Found previously leased subnet ({want}), reusing"),
            START,
        )
        .unwrap();
    agent
        .wait_for_log(&format!("Lease acquired: {want}"), START)
        .unwrap();
    agent.wait_for_log("wrote ", START).unwrap();
    assert_eq!(
        subnet_file_text(node),
        subnet_env_text(NETWORK, want, 1450, false)
    );
    let kv = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, want));
    let ip = node.underlay_ip();
    assert_eq!(kv.value, vxlan_record(ip, &vtep_mac(ip)));
    assert_day_ttl(&cluster, &kv);
}

// ----- 4. reservations, out of subnets ------------------------------------------------------

#[test]
fn reservation_is_left_alone_and_a_fully_reserved_range_is_out_of_subnets() {
    // Two candidates: 172.17.1.0/24 and 172.17.2.0/24.
    let config = r#"{"Network": "172.17.0.0/16", "SubnetMin": "172.17.1.0", "SubnetMax": "172.17.2.0", "Backend": {"Type": "vxlan"}}"#;
    let cluster = Cluster::builder()
        .nodes(2)
        .network_config(config)
        .build()
        .unwrap();
    let etcd = cluster.etcd();
    let other = Ipv4Addr::new(198, 18, 0, 77);
    let reserved = net("172.17.1.0/24");
    let reserved_key = lease_key(DEFAULT_ETCD_PREFIX, reserved);
    let reserved_value = vxlan_record(other, &vtep_mac(other));
    etcd.put(&reserved_key, &reserved_value).unwrap();
    let before = must_get(&cluster, &reserved_key);
    assert_eq!(
        before.lease, 0,
        "a reservation is a key without an etcd lease"
    );

    let node = cluster.node(0);
    let agent = node.start_agent(&[]).unwrap();
    let free = net("172.17.2.0/24");
    assert_eq!(
        subnet_of(node),
        free,
        "the agent must take the one unreserved subnet"
    );
    agent
        .wait_for_log(&format!("Lease acquired: {free}"), START)
        .unwrap();
    // The reservation is a peer like any other node (it is a node's record), and untouched.
    agent
        .wait_for_log(
            &format!("peer added: subnet {reserved} public IP {other}"),
            Duration::from_secs(5),
        )
        .unwrap();
    let after = must_get(&cluster, &reserved_key);
    assert_eq!(
        after, before,
        "the reservation must stay exactly as it was (value, no lease, revision)"
    );
    let ours = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, free));
    assert_day_ttl(&cluster, &ours);

    // Everything reserved (under another prefix): the agent fails with flannel's message,
    // once, and exits non-zero without writing anything.
    let full = "/full/network";
    etcd.put_network_config(Some(full), config).unwrap();
    for (subnet, ip) in [("172.17.1.0/24", 77), ("172.17.2.0/24", 78)] {
        let ip = Ipv4Addr::new(198, 18, 0, ip);
        etcd.put(
            &lease_key(full, net(subnet)),
            &vxlan_record(ip, &vtep_mac(ip)),
        )
        .unwrap();
    }
    let reservations = etcd.get_prefix(&format!("{full}/")).unwrap();
    let n1 = cluster.node(1);
    let agent = n1.start_agent(&["--etcd-prefix", full]).unwrap();
    let status = agent.wait_exit(START).unwrap();
    let log = agent.log();
    assert!(
        !status.success(),
        "out of subnets must end the agent with an error, got {status}; log:\n{log}"
    );
    assert!(
        log.contains("out of subnets"),
        "the log must name the cause (out of subnets):\n{log}"
    );
    assert_eq!(
        count(&log, "out of subnets"),
        1,
        "reported once, not in a loop:\n{log}"
    );
    assert!(
        !log.contains("Lease acquired"),
        "no lease may be acquired:\n{log}"
    );
    assert!(
        !log.contains("data path attached"),
        "no data path without a lease:\n{log}"
    );
    assert!(
        n1.try_subnet_env().unwrap().is_none(),
        "no subnet file without a lease"
    );
    assert_eq!(
        etcd.get_prefix(&format!("{full}/")).unwrap(),
        reservations,
        "the reservations and config under {full} must be untouched"
    );

    // A reservation holding the node's own PublicIP is the node's (flannel: "Found
    // reservation"): used, its record brought up to date (our VtepMAC), and still no lease.
    let own = "/own/network";
    etcd.put_network_config(Some(own), config).unwrap();
    let ip1 = n1.underlay_ip();
    let mine = net("172.17.1.0/24");
    let mine_key = lease_key(own, mine);
    etcd.put(&mine_key, &vxlan_record(ip1, "0a:00:00:00:00:01"))
        .unwrap();
    let agent = n1.start_agent(&["--etcd-prefix", own]).unwrap();
    agent
        .wait_for_log(
            &format!("Found reservation ({mine}) for current IP ({ip1}), reusing"),
            START,
        )
        .unwrap();
    assert_eq!(subnet_of(n1), mine);
    let kv = must_get(&cluster, &mine_key);
    assert_eq!(
        kv.value,
        vxlan_record(ip1, &vtep_mac(ip1)),
        "the reservation carries our record"
    );
    assert_eq!(
        kv.lease, 0,
        "a reservation taken by its node still has no etcd lease"
    );
    assert_eq!(
        etcd.get_prefix(&format!("{own}/subnets/")).unwrap().len(),
        1
    );
}

// ----- 5. ten agents at once --------------------------------------------------------------

#[test]
fn ten_agents_started_together_get_the_ten_free_subnets() {
    let config = r#"{"Network": "172.17.0.0/16", "SubnetMin": "172.17.1.0", "SubnetMax": "172.17.10.0", "Backend": {"Type": "vxlan"}}"#;
    let cluster = Cluster::builder()
        .nodes(10)
        .network_config(config)
        .build()
        .unwrap();
    // All ten started back to back, no waiting in between.
    let agents = cluster.start_agents(&[]).unwrap();
    let mut subnets = BTreeSet::new();
    for node in cluster.nodes() {
        let subnet = subnet_of(node);
        assert!(
            subnets.insert(subnet),
            "{} got {subnet}, which another node has too",
            node.name()
        );
    }
    let want: BTreeSet<Ipv4Net> = (1..=10).map(|i| net(&format!("172.17.{i}.0/24"))).collect();
    assert_eq!(
        subnets, want,
        "the ten nodes must hold exactly the ten free subnets"
    );

    let kvs = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert_eq!(kvs.len(), 10, "ten leases in etcd: {kvs:?}");
    for node in cluster.nodes() {
        let subnet = subnet_of(node);
        let kv = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, subnet));
        let ip = node.underlay_ip();
        assert_eq!(
            kv.value,
            vxlan_record(ip, &vtep_mac(ip)),
            "{}'s record",
            node.name()
        );
        assert_ne!(
            kv.lease,
            0,
            "{}'s key must carry an etcd lease",
            node.name()
        );
    }
    let races: usize = agents
        .iter()
        .map(|a| count(&a.log(), "another node took the subnet we picked"))
        .sum();
    eprintln!("ten agents: {races} lost create race(s), all retried successfully");
    for a in &agents {
        assert!(
            a.is_running(),
            "agent {} must keep running; log:\n{}",
            a.label(),
            a.log()
        );
    }
}

// ----- 6. revocation ------------------------------------------------------------------------

#[test]
fn deleted_or_revoked_lease_is_acquired_again_and_the_data_path_stays() {
    let (cluster, agent, subnet) = one_node_with_agent();
    let node = cluster.node(0);
    let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
    let ip = node.underlay_ip();
    let text = subnet_file_text(node);
    let first = must_get(&cluster, &key);

    // Both ways of losing the lease end the same: flannel's message, the same subnet again,
    // the record as it was, under a new etcd lease with a full day's TTL.
    let reacquired = |mark: usize| {
        let revoked = "Lease has been revoked. Shutting down daemon.";
        wait_log_since(&agent, mark, revoked, Duration::from_secs(5));
        let again = format!("Acquired lease {subnet} again after revocation");
        wait_log_since(&agent, mark, &again, Duration::from_secs(10));
        let back = must_get(&cluster, &key);
        assert_eq!(
            back.value,
            vxlan_record(ip, &vtep_mac(ip)),
            "the record is back as it was"
        );
        assert_day_ttl(&cluster, &back);
        back
    };

    // 1) etcdctl del of our key.
    let mark = agent.log().len();
    assert_eq!(cluster.etcd().del(&key).unwrap(), 1);
    let back = reacquired(mark);
    assert_ne!(
        back.lease, first.lease,
        "the key is back under a new etcd lease"
    );

    // 2) The etcd lease revoked (as an expiry would): the same again.
    let mark = agent.log().len();
    cluster.etcd().lease_revoke(back.lease).unwrap();
    let again = reacquired(mark);
    assert_ne!(
        again.lease, back.lease,
        "the key is back under a new etcd lease"
    );

    // The agent keeps running with the same subnet file and its programs still attached.
    thread::sleep(Duration::from_millis(500));
    assert!(
        agent.is_running(),
        "the agent must keep running after a revocation; log:\n{}",
        agent.log()
    );
    assert_eq!(subnet_file_text(node), text, "the subnet file is unchanged");
    assert!(
        !agent.log().contains("subnet changed from"),
        "the subnet must not change"
    );
    assert_data_path_attached(node);
    assert_eq!(
        count(&agent.log(), "data path attached"),
        1,
        "the data path is never re-attached"
    );
}

/// A node whose lease is deleted while another node takes its subnet (here while the agent is
/// stopped, so that the taking lands first) moves to another free subnet, as flanneld would:
/// its record under the new key, `subnet.env`, `ovl0`'s `<subnet>.0/32` and the programs' node
/// settings all follow, and the other node learns it: a pod started from the new `subnet.env`
/// and a pod on the other node talk. The data path is moved, never re-attached.
#[test]
fn a_node_whose_subnet_was_taken_moves_to_another() {
    let cluster = two_nodes();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let agent = n0.start_agent(&[]).unwrap();
    n1.start_agent(&[]).unwrap();
    agent
        .wait_for_log("data path attached to eth0", START)
        .unwrap();
    let old = subnet_of(n0);
    let old_key = lease_key(DEFAULT_ETCD_PREFIX, old);
    let taker = Ipv4Addr::new(198, 18, 0, 99);

    let mark = agent.log().len();
    agent.signal(libc::SIGSTOP).unwrap();
    assert_eq!(cluster.etcd().del(&old_key).unwrap(), 1);
    cluster
        .etcd()
        .put_with_ttl(&old_key, &vxlan_record(taker, &vtep_mac(taker)), 86_400)
        .unwrap();
    agent.signal(libc::SIGCONT).unwrap();

    wait_log_since(
        &agent,
        mark,
        &format!("subnet changed from {old} to "),
        Duration::from_secs(10),
    );
    let new = subnet_of(n0);
    assert_ne!(new, old, "subnet.env must name the new subnet");
    let ip = n0.underlay_ip();
    assert_eq!(
        must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, new)).value,
        vxlan_record(ip, &vtep_mac(ip))
    );
    assert_eq!(
        must_get(&cluster, &old_key).value,
        vxlan_record(taker, &vtep_mac(taker)),
        "the taker keeps the old subnet"
    );
    let ovl0 = n0
        .ns()
        .run("ip", &["-4", "-o", "addr", "show", "dev", "ovl0"])
        .unwrap();
    assert!(
        ovl0.contains(&format!("inet {}/32", new.network()))
            && !ovl0.contains(&old.network().to_string()),
        "ovl0 must hold {}/32 only: {ovl0}",
        new.network()
    );
    assert_eq!(count(&agent.log(), "data path attached to eth0"), 1);

    let (a, b) = (n0.add_pod("p0").unwrap(), n1.add_pod("p0").unwrap());
    assert!(new.contains(&a.ip()), "{a} must be in {new}");
    overlay_tests::checks::assert_pods_talk(&a, &b);
}

// ----- 7. peer events -----------------------------------------------------------------------

#[test]
fn peer_lease_put_change_and_delete_reach_the_agent_within_a_second() {
    let (cluster, agent, _) = one_node_with_agent();
    let etcd = cluster.etcd();
    let one_second = Duration::from_secs(1);
    let peer_ip = Ipv4Addr::new(198, 18, 0, 99);
    let subnet = net("172.17.200.0/24");
    let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
    let mac1 = "0a:58:c6:12:00:63";
    let mac2 = "0a:58:c6:12:00:64";

    // A put (timed from before etcdctl starts).
    let start = Instant::now();
    etcd.put(&key, &vxlan_record(peer_ip, mac1)).unwrap();
    let line =
        format!("peer added: subnet {subnet} public IP {peer_ip} backend vxlan VtepMAC {mac1}");
    agent
        .wait_for_log(&line, one_second.saturating_sub(start.elapsed()))
        .unwrap();
    eprintln!("peer added after {:?}", start.elapsed());

    // A changed record (a new VtepMAC, as after a stock flanneld's restart).
    let start = Instant::now();
    etcd.put(&key, &vxlan_record(peer_ip, mac2)).unwrap();
    let line =
        format!("peer changed: subnet {subnet} public IP {peer_ip} backend vxlan VtepMAC {mac2}");
    agent
        .wait_for_log(&line, one_second.saturating_sub(start.elapsed()))
        .unwrap();
    eprintln!("peer changed after {:?}", start.elapsed());

    // The same record again (what a renewal looks like): no event.
    let mark = agent.log().len();
    etcd.put(&key, &vxlan_record(peer_ip, mac2)).unwrap();

    // A delete.
    let start = Instant::now();
    assert_eq!(etcd.del(&key).unwrap(), 1);
    let line = format!("peer removed: subnet {subnet}");
    agent
        .wait_for_log(&line, one_second.saturating_sub(start.elapsed()))
        .unwrap();
    eprintln!("peer removed after {:?}", start.elapsed());
    let since = agent.log().split_off(mark);
    assert!(
        !since.contains("peer changed") && !since.contains("peer added"),
        "re-putting the same record must not produce an event:\n{since}"
    );

    // A lease that expires (revoked here) is a removal too.
    let subnet2 = net("172.17.201.0/24");
    let peer2 = Ipv4Addr::new(198, 18, 0, 98);
    let start = Instant::now();
    let lease = etcd
        .put_with_ttl(
            &lease_key(DEFAULT_ETCD_PREFIX, subnet2),
            &vxlan_record(peer2, mac1),
            600,
        )
        .unwrap();
    agent
        .wait_for_log(
            &format!("peer added: subnet {subnet2} public IP {peer2}"),
            Duration::from_secs(2).saturating_sub(start.elapsed()),
        )
        .unwrap();
    let start = Instant::now();
    etcd.lease_revoke(lease).unwrap();
    agent
        .wait_for_log(
            &format!("peer removed: subnet {subnet2}"),
            one_second.saturating_sub(start.elapsed()),
        )
        .unwrap();

    // A host-gw lease is not a vxlan peer: skipped. The vxlan one put after it proves the
    // host-gw put was processed (events arrive in order).
    let mark = agent.log().len();
    etcd.put(
        &lease_key(DEFAULT_ETCD_PREFIX, net("172.17.202.0/24")),
        r#"{"PublicIP":"198.18.0.97","PublicIPv6":null,"BackendType":"host-gw"}"#,
    )
    .unwrap();
    etcd.put(
        &lease_key(DEFAULT_ETCD_PREFIX, net("172.17.203.0/24")),
        &vxlan_record(peer2, mac1),
    )
    .unwrap();
    wait_log_since(
        &agent,
        mark,
        "peer added: subnet 172.17.203.0/24",
        Duration::from_secs(2),
    );
    let since = agent.log().split_off(mark);
    assert!(
        !since.contains("172.17.202.0/24"),
        "a host-gw lease must not become a vxlan peer:\n{since}"
    );
    assert!(agent.is_running());
}

// ----- 8. bad config, malformed records -----------------------------------------------------

#[test]
fn bad_network_configs_are_reported_and_waited_out() {
    let cluster = Cluster::builder().nodes(1).build().unwrap();
    let node = cluster.node(0);
    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log(
            "Couldn't fetch network config: flannel config not found in etcd store. Did you create your config using etcdv3 API?",
            START,
        )
        .unwrap();

    for (config, message) in [
        (
            r#"{"Network": "172.17.0.0/16", "SubnetLen": 31}"#,
            "SubnetLen must be less than /31",
        ),
        (
            r#"{"SubnetLen": 24}"#,
            "please define a correct Network parameter in the flannel config",
        ),
        (
            r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "udp"}}"#,
            "unknown backend type: udp",
        ),
    ] {
        let mark = agent.log().len();
        cluster.put_network_config(config).unwrap();
        let line = format!("Couldn't fetch network config: {message}");
        wait_log_since(&agent, mark, &line, Duration::from_secs(5));
        // flanneld retries every second and so do we: the error repeats, the agent waits.
        let t = Instant::now();
        while count(agent.log().get(mark..).unwrap_or(""), &line) < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the config error must be retried every second:\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        assert!(
            agent.is_running(),
            "a bad config must not end the agent; log:\n{}",
            agent.log()
        );
    }
    let log = agent.log();
    assert!(
        !log.contains("Lease acquired"),
        "no lease while the config is bad:\n{log}"
    );
    assert!(
        node.try_subnet_env().unwrap().is_none(),
        "no subnet file while the config is bad"
    );
    assert!(
        cluster
            .etcd()
            .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
            .unwrap()
            .is_empty(),
        "no lease in etcd while the config is bad"
    );

    cluster.put_network_config(VXLAN_CONFIG).unwrap();
    agent
        .wait_for_log(
            "Found network config - Backend type: vxlan",
            Duration::from_secs(5),
        )
        .unwrap();
    let subnet = subnet_of(node);
    agent
        .wait_for_log(&format!("Lease acquired: {subnet}"), START)
        .unwrap();
    agent
        .wait_for_log("data path attached to eth0", START)
        .unwrap();
}

#[test]
fn malformed_peer_records_are_logged_with_their_key_and_ignored() {
    let (cluster, agent, _) = one_node_with_agent();
    let etcd = cluster.etcd();
    let key = |s: &str| lease_key(DEFAULT_ETCD_PREFIX, net(s));
    let peer_ip = Ipv4Addr::new(198, 18, 0, 99);
    let good = vxlan_record(peer_ip, "0a:58:c6:12:00:63");
    let wait = Duration::from_secs(2);

    // A known good peer first.
    etcd.put(&key("172.17.210.0/24"), &good).unwrap();
    agent
        .wait_for_log(
            "peer added: subnet 172.17.210.0/24 public IP 198.18.0.99",
            wait,
        )
        .unwrap();

    // Garbage JSON under a new key.
    let mark = agent.log().len();
    etcd.put(&key("172.17.211.0/24"), "this is {not json")
        .unwrap();
    wait_line_since(
        &agent,
        mark,
        &[
            "WARN",
            "ignoring a malformed subnet lease: not valid JSON",
            &format!("key={}", key("172.17.211.0/24")),
        ],
        wait,
    );

    // A record with a bad PublicIP.
    let mark = agent.log().len();
    let bad_ip = good.replace("198.18.0.99", "198.18.0.999");
    etcd.put(&key("172.17.212.0/24"), &bad_ip).unwrap();
    wait_line_since(
        &agent,
        mark,
        &[
            "ignoring a malformed subnet lease: invalid PublicIP: 198.18.0.999",
            &format!("key={}", key("172.17.212.0/24")),
        ],
        wait,
    );

    // A key under subnets/ that names no subnet.
    let mark = agent.log().len();
    let odd = format!("{DEFAULT_ETCD_PREFIX}/subnets/not-a-subnet");
    etcd.put(&odd, &good).unwrap();
    wait_line_since(
        &agent,
        mark,
        &[
            "ignoring a key that is not a subnet lease",
            &format!("{odd:?} is not a subnet lease key"),
        ],
        wait,
    );

    // The known good peer's record turns malformed: logged, and the last good record stays
    // in force (no removal).
    let mark = agent.log().len();
    etcd.put(&key("172.17.210.0/24"), r#"{"PublicIP": 7}"#)
        .unwrap();
    wait_line_since(
        &agent,
        mark,
        &[
            "ignoring a malformed subnet lease: invalid PublicIP",
            "keeping the last good record",
            &format!("key={}", key("172.17.210.0/24")),
        ],
        wait,
    );

    // A valid peer put afterwards still arrives, in time.
    let start = Instant::now();
    etcd.put(
        &key("172.17.213.0/24"),
        &vxlan_record(Ipv4Addr::new(198, 18, 0, 98), "0a:58:c6:12:00:62"),
    )
    .unwrap();
    wait_log_since(
        &agent,
        mark,
        "peer added: subnet 172.17.213.0/24 public IP 198.18.0.98 backend vxlan VtepMAC 0a:58:c6:12:00:62",
        Duration::from_secs(1).saturating_sub(start.elapsed()),
    );
    let log = agent.log();
    assert!(
        !log.contains("peer removed: subnet 172.17.210.0/24"),
        "a good peer must not be removed because its record turned malformed:\n{log}"
    );
    for bad in ["172.17.211.0/24", "172.17.212.0/24"] {
        assert!(
            !log.contains(&format!("peer added: subnet {bad}")),
            "malformed {bad} must not become a peer:\n{log}"
        );
    }
    assert!(
        agent.is_running(),
        "malformed records must not end the agent; log:\n{log}"
    );

    // The peer kept from its last good record is still known: deleting its key removes it.
    let mark = agent.log().len();
    etcd.del(&key("172.17.210.0/24")).unwrap();
    wait_log_since(&agent, mark, "peer removed: subnet 172.17.210.0/24", wait);
    // Deleting keys that never were peers produces no event.
    etcd.del(&key("172.17.211.0/24")).unwrap();
    etcd.del(&odd).unwrap();
    etcd.del(&key("172.17.213.0/24")).unwrap();
    wait_log_since(&agent, mark, "peer removed: subnet 172.17.213.0/24", wait);
    let since = agent.log().split_off(mark);
    assert!(
        !since.contains("peer removed: subnet 172.17.211.0/24"),
        "{since}"
    );
    assert!(agent.is_running());
}

// ----- 9. etcd over TLS ---------------------------------------------------------------------

#[test]
fn etcd_over_tls_with_client_certificates() {
    let cluster = Cluster::builder()
        .nodes(2)
        .etcd_tls(true)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    assert!(
        cluster
            .etcd()
            .endpoint()
            .starts_with("https://198.18.0.254:")
    );
    let n0 = cluster.node(0);
    let tls = n0.etcd_tls().expect("TLS files").clone();

    // With CA, certificate and key, the agent gets its lease over TLS.
    let agent = n0.start_agent(&[]).unwrap();
    let args = agent.args().join(" ");
    assert!(
        args.contains("--etcd-endpoints https://198.18.0.254:2379")
            && args.contains(&format!("--etcd-certfile {}", tls.client_cert.display())),
        "agent args: {args}"
    );
    let subnet = subnet_of(n0);
    agent
        .wait_for_log(&format!("Lease acquired: {subnet}"), START)
        .unwrap();
    let kv = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, subnet));
    let ip = n0.underlay_ip();
    assert_eq!(kv.value, vxlan_record(ip, &vtep_mac(ip)));
    assert_day_ttl(&cluster, &kv);

    // Plain http to the TLS-only etcd does not work either (the harness is not fooling us).
    let n1 = cluster.node(1);
    let ca = tls.ca.display().to_string();
    let plain = n1
        .start_agent(&[
            "--etcd-endpoints",
            "http://198.18.0.254:2379",
            "--etcd-cafile",
            &ca,
        ])
        .unwrap();

    // Without the client certificate etcd refuses the connection inside the TLS handshake: the
    // agent says up front that it has no client certificate, then reports the failing requests
    // and keeps trying (as for any etcd error) without getting a lease.
    let no_cert = n1.start_agent(&["--etcd-cafile", &ca]).unwrap();
    let warning = wait_line_since(
        &no_cert,
        0,
        &[
            "WARN",
            "connecting to etcd over TLS without a client certificate",
            "198.18.0.254:2379",
        ],
        START,
    );
    eprintln!("without a client certificate: {warning}");
    no_cert
        .wait_for_log(
            "Couldn't fetch network config: etcd get on /coreos.com/network/config failed",
            START,
        )
        .unwrap();
    thread::sleep(Duration::from_secs(3));
    for a in [&no_cert, &plain] {
        let log = a.log();
        assert!(
            !log.contains("Lease acquired"),
            "no lease without a client certificate:\n{log}"
        );
        assert!(
            a.is_running(),
            "{}: an unreachable etcd is retried; log:\n{log}",
            a.label()
        );
        assert!(
            count(&log, "Couldn't fetch network config:") >= 2,
            "{}: the error must be retried:\n{log}",
            a.label()
        );
    }
    assert!(n1.try_subnet_env().unwrap().is_none());

    // A certificate without its key (or the reverse) is refused at start, as flanneld does.
    let cert = tls.client_cert.display().to_string();
    let half = n1
        .start_agent(&["--etcd-cafile", &ca, "--etcd-certfile", &cert])
        .unwrap();
    let status = half.wait_exit(START).unwrap();
    let log = half.log();
    assert!(
        !status.success(),
        "a certificate without a key must end the agent, got {status}:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("KeyFile and CertFile must both be present")
            && l.contains("--etcd-keyfile: not given")
            && l.contains(&cert)),
        "the error must name the missing key file:\n{log}"
    );
    assert_eq!(
        cluster
            .etcd()
            .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
            .unwrap()
            .len(),
        1
    );
}

// ----- 10. health endpoints -----------------------------------------------------------------

#[test]
fn health_endpoints_report_alive_and_ready() {
    let cluster = Cluster::builder().nodes(2).build().unwrap();
    let node = cluster.node(0);
    let port = 8471;
    let agent = node
        .start_agent(&["--healthz-port", "8471", "--healthz-ip", "0.0.0.0"])
        .unwrap();
    agent
        .wait_for_log("health endpoints on http://0.0.0.0:8471/healthz", START)
        .unwrap();
    agent
        .wait_for_log(
            "Couldn't fetch network config: flannel config not found",
            START,
        )
        .unwrap();
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Waiting for a config: alive, not ready.
    assert_eq!(
        http_status(node.ns(), local, "/healthz").unwrap(),
        200,
        "/healthz while waiting"
    );
    assert_eq!(
        http_status(node.ns(), local, "/readyz").unwrap(),
        503,
        "/readyz while the config is missing"
    );

    cluster.put_network_config(VXLAN_CONFIG).unwrap();
    node.subnet_env().unwrap();
    let mut last = None;
    wait_until(
        "/readyz to answer 200 after the subnet file",
        Duration::from_secs(3),
        || {
            last = http_status(node.ns(), local, "/readyz").ok();
            last == Some(200)
        },
    );
    assert_eq!(http_status(node.ns(), local, "/healthz").unwrap(), 200);
    // 0.0.0.0: also reachable over the underlay from another node; unknown paths are 404.
    let remote = SocketAddr::from((node.underlay_ip(), port));
    assert_eq!(
        http_status(cluster.node(1).ns(), remote, "/readyz").unwrap(),
        200
    );
    assert_eq!(http_status(node.ns(), local, "/nope").unwrap(), 404);
    agent.kill().unwrap();

    // --healthz-ip 127.0.0.1 listens on the node's loopback only.
    let agent = node
        .start_agent(&["--healthz-port", "8471", "--healthz-ip", "127.0.0.1"])
        .unwrap();
    agent
        .wait_for_log("health endpoints on http://127.0.0.1:8471/healthz", START)
        .unwrap();
    agent.wait_for_log("wrote ", START).unwrap();
    wait_until("/readyz 200 on 127.0.0.1", Duration::from_secs(3), || {
        http_status(node.ns(), local, "/readyz").ok() == Some(200)
    });
    assert!(
        http_status(cluster.node(1).ns(), remote, "/healthz").is_err(),
        "with --healthz-ip 127.0.0.1 the endpoint must not answer on the underlay"
    );
}

// ----- 11. flags from the environment -------------------------------------------------------

#[test]
fn flanneld_environment_variables_set_the_flags() {
    let cluster = Cluster::builder().nodes(2).build().unwrap();
    let prefix = "/other/network";
    cluster
        .etcd()
        .put_network_config(Some(prefix), VXLAN_CONFIG)
        .unwrap();

    // FLANNELD_ETCD_PREFIX, the rest as flags.
    let n0 = cluster.node(0);
    let a0 = n0
        .start_agent_env(&[], &[("FLANNELD_ETCD_PREFIX", prefix)])
        .unwrap();
    assert!(
        !a0.args().iter().any(|a| a.contains("etcd-prefix")),
        "{:?}",
        a0.args()
    );
    let s0 = subnet_of(n0);
    a0.wait_for_log(&format!("Lease acquired: {s0}"), START)
        .unwrap();

    // Everything from the environment, no flags at all.
    let n1 = cluster.node(1);
    let file = n1.subnet_file().display().to_string();
    let a1 = n1
        .start_agent_env(
            &[],
            &[
                ("FLANNELD_ETCD_ENDPOINTS", n1.etcd_endpoint()),
                ("FLANNELD_ETCD_PREFIX", prefix),
                ("FLANNELD_IFACE", "eth0"),
                ("FLANNELD_SUBNET_FILE", &file),
                ("FLANNELD_IP_MASQ", "true"),
            ],
        )
        .unwrap();
    // No flanneld flag on the command line (the harness's own --bpf-dir may be there).
    let flanneld_flags = [
        "--etcd",
        "--iface",
        "--subnet-file",
        "--ip-masq",
        "--public-ip",
    ];
    assert!(
        !a1.args()
            .iter()
            .any(|a| flanneld_flags.iter().any(|f| a.starts_with(f))),
        "no flanneld flags expected, only their FLANNELD_* variables: {:?}",
        a1.args()
    );
    let s1 = subnet_of(n1);
    assert_ne!(s0, s1);
    assert_eq!(
        subnet_file_text(n1),
        subnet_env_text(NETWORK, s1, 1450, true),
        "FLANNELD_IP_MASQ=true"
    );

    let etcd = cluster.etcd();
    for (node, subnet) in [(n0, s0), (n1, s1)] {
        let kv = must_get(&cluster, &lease_key(prefix, subnet));
        let ip = node.underlay_ip();
        assert_eq!(kv.value, vxlan_record(ip, &vtep_mac(ip)));
    }
    assert!(
        etcd.get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/"))
            .unwrap()
            .is_empty(),
        "nothing may be written under the default prefix"
    );
}

// ----- renewal ------------------------------------------------------------------------------

#[test]
fn lease_is_renewed_before_it_expires() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    // A 4 s TTL (developer option): renewal at half-life.
    let agent = node.start_agent(&["--dev-lease-ttl", "4"]).unwrap();
    let subnet = subnet_of(node);
    let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
    let first = must_get(&cluster, &key);
    assert_eq!(
        cluster.etcd().lease_ttl(first.lease).unwrap().granted_ttl,
        4
    );
    let mark = agent.log().len();
    wait_log_since(&agent, mark, "Lease renewed", Duration::from_secs(5));
    // Past the first lease's life the key is still there, under a newer lease.
    thread::sleep(Duration::from_secs(5));
    let now = must_get(&cluster, &key);
    assert_ne!(
        now.lease, first.lease,
        "the key must have moved to a new etcd lease"
    );
    assert_eq!(now.value, first.value);
    assert!(cluster.etcd().lease_ttl(now.lease).unwrap().ttl > 0);
    assert!(
        count(&agent.log(), "Lease renewed") >= 2,
        "renewed every ~2 s:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("Lease has been revoked"),
        "{}",
        agent.log()
    );
    assert_eq!(subnet_of(node), subnet);
}

/// Issue 12, item 5: etcd restored from nothing (a fresh data directory: the revision counter
/// starts over, below what the agents saw). The agents notice when their watches break: they
/// write their leases again (the same subnets) and follow the new store, so a node that joins
/// afterwards is seen by every agent and its pods reach theirs.
#[test]
fn etcd_restored_from_nothing_is_followed_by_every_agent() {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let subnets = [subnet_of(cluster.node(0)), subnet_of(cluster.node(1))];
    // Enough writes that the old revision is well above where the new store starts.
    for n in 0..30 {
        cluster
            .etcd()
            .put(&format!("/overlay-test/filler/{n}"), "x")
            .unwrap();
    }
    let marks: Vec<usize> = cluster
        .nodes()
        .iter()
        .map(|n| n.agent().unwrap().log().len())
        .collect();

    cluster.etcd().restart_empty().unwrap();
    cluster.put_network_config(VXLAN_CONFIG).unwrap();
    for subnet in subnets {
        let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
        wait_until(&format!("{key} written again"), START, || {
            cluster.etcd().get(&key).unwrap().is_some()
        });
    }

    cluster.add_node().unwrap();
    let n2 = cluster.node(2);
    n2.start_agent(&[]).unwrap();
    let joined = subnet_of(n2);
    assert!(!subnets.contains(&joined), "{joined} was free again");
    n2.add_pod("p0").unwrap();
    for (node, mark) in cluster.nodes()[..2].iter().zip(marks) {
        let took = wait_log_since(
            &node.agent().unwrap(),
            mark,
            &format!("peer added: subnet {joined}"),
            START,
        );
        eprintln!("{} saw the new node {took:?} after it joined", node.name());
    }
    let newcomer = cluster.pod(2, 0);
    for i in 0..2 {
        overlay_tests::checks::assert_pods_talk(&cluster.pod(i, 0), &newcomer);
    }
}

/// Issue 12, item 6: peer records that conflict with the network are refused with one
/// warning naming the key and the reason, and never reach the data path: a subnet outside the
/// Network, prefix lengths other than SubnetLen (a /25 or /32 inside a live node's subnet,
/// a /20 over several), a live node's lease overwritten with another PublicIP (its holder
/// writes its record back and keeps its subnet), a node of another backend type (skipped,
/// with a warning), a 1 MiB value (cut in the log).
#[test]
fn conflicting_peer_records_are_refused_and_an_overwritten_lease_is_written_back() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (a0, a1) = (n0.agent().unwrap(), n1.agent().unwrap());
    let s1 = subnet_of(n1);
    let k1 = lease_key(DEFAULT_ETCD_PREFIX, s1);
    let own1 = cluster.etcd().get(&k1).unwrap().unwrap();
    let file1 = subnet_file_text(n1);
    let [a, b, c, _] = s1.network().octets();
    let intruder = vxlan_record(Ipv4Addr::new(198, 18, 0, 99), "0a:58:c6:12:00:63");
    let mark = a0.log().len();

    let refused = [
        (net("172.18.5.0/24"), "is outside the network 172.17.0.0/16"),
        (
            Ipv4Net::new(Ipv4Addr::new(a, b, c, 128), 25).unwrap(),
            "is not a /24",
        ),
        (
            Ipv4Net::new(Ipv4Addr::new(a, b, c, 2), 32).unwrap(),
            "is not a /24",
        ),
        (net("172.17.192.0/20"), "is not a /24"),
    ];
    for (subnet, _) in refused {
        let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
        cluster.etcd().put_with_ttl(&key, &intruder, 600).unwrap();
    }
    // Overwritten with another PublicIP, as `etcdctl put` does (no etcd lease).
    cluster.etcd().put(&k1, &intruder).unwrap();
    let host_gw = r#"{"PublicIP":"198.18.0.97","PublicIPv6":null,"BackendType":"host-gw"}"#;
    let k_other = lease_key(DEFAULT_ETCD_PREFIX, net("172.17.250.0/24"));
    cluster.etcd().put(&k_other, host_gw).unwrap();
    let k_huge = lease_key(DEFAULT_ETCD_PREFIX, net("172.17.251.0/24"));
    let huge = format!(
        r#"{{"PublicIP":"198.18.0.96","BackendType":"vxlan","BackendData":{{"VNI":1}},"Pad":"{}"}}"#,
        "z".repeat(1 << 20)
    );
    cluster.etcd().put(&k_huge, &huge).unwrap();
    // n0's own PublicIP under another subnet, as a cloned machine would publish it.
    let k_clone = lease_key(DEFAULT_ETCD_PREFIX, net("172.17.252.0/24"));
    let clone = vxlan_record(n0.underlay_ip(), "0a:58:c6:12:00:62");
    cluster.etcd().put_with_ttl(&k_clone, &clone, 600).unwrap();
    // A PublicIP inside the network, as a node whose --iface is its pod bridge publishes.
    let k_inside = lease_key(DEFAULT_ETCD_PREFIX, net("172.17.253.0/24"));
    let inside = vxlan_record(Ipv4Addr::new(172, 17, 253, 1), "0a:58:c6:12:00:61");
    cluster
        .etcd()
        .put_with_ttl(&k_inside, &inside, 600)
        .unwrap();

    let wait = Duration::from_secs(10);
    for (subnet, reason) in refused {
        let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
        wait_line_since(
            &a0,
            mark,
            &["WARN", "refusing a subnet lease", &key, reason],
            wait,
        );
    }
    wait_line_since(
        &a0,
        mark,
        &[
            "WARN",
            &k1,
            "overwrites the live lease of 198.18.0.2 with PublicIP 198.18.0.99",
        ],
        wait,
    );
    wait_line_since(
        &a0,
        mark,
        &[
            "WARN",
            &k_other,
            "backend type \"host-gw\": this node runs vxlan",
        ],
        wait,
    );
    wait_line_since(
        &a0,
        mark,
        &["WARN", &k_huge, "no BackendData.VtepMAC"],
        wait,
    );
    let own_ip = format!("PublicIP {} is this node's own", n0.underlay_ip());
    wait_line_since(&a0, mark, &["WARN", &k_clone, &own_ip], wait);
    let inside_net = "PublicIP 172.17.253.1 is inside the network 172.17.0.0/16";
    wait_line_since(&a0, mark, &["WARN", &k_inside, inside_net], wait);
    // The holder writes its record back and keeps its subnet.
    wait_line_since(&a1, 0, &["WARN", "our lease was overwritten", &k1], wait);
    wait_until("n1's record back in etcd", wait, || {
        cluster.etcd().get(&k1).unwrap().as_deref() == Some(own1.as_str())
    });
    assert_eq!(subnet_file_text(n1), file1, "n1 keeps its subnet");
    assert!(
        !a1.log().contains("Lease has been revoked"),
        "n1 must not give up its subnet"
    );

    // Nothing of it reached n0's data path: the one peer is n1, at its own address.
    let peers = overlay_tests::checks::agent_cmd(n0, &["peers"]);
    assert_eq!(
        peers.trim(),
        format!("{s1} {} {}", n1.underlay_ip(), vtep_mac(n1.underlay_ip())),
        "n0's peers"
    );
    overlay_tests::checks::assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));

    // One warning per record, also after n1's renewal-like rewrite; no huge log lines.
    let log = a0.log();
    let since = &log[mark..];
    for key in refused
        .iter()
        .map(|(s, _)| lease_key(DEFAULT_ETCD_PREFIX, *s))
        .chain([k1.clone(), k_other, k_huge, k_clone, k_inside])
    {
        let lines = since.lines().filter(|l| l.contains(&key)).count();
        assert_eq!(lines, 1, "{key}: one line in n0's log:\n{since}");
    }
    for (name, log) in [("n0", log), ("n1", a1.log())] {
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 2048, "{name}: a log line of {longest} bytes");
    }
}

/// Starts an agent on `node` with `args` and expects it to stop before taking a lease, saying
/// `message`.
fn refused_at_start(node: &Node, args: &[&str], message: &str) {
    let agent = node.start_agent(args).unwrap();
    overlay_tests::checks::assert_refused_before_lease(&agent, &[message]);
}

/// `--iface-can-reach`, as flanneld: when no `--iface` or `--iface-regex` matches (or none is
/// given), the interface the kernel routes that address through (`ip route get`), with the
/// source address it picks, carries the node's traffic and is published as its PublicIP.
/// Two nodes told to reach each other's address pick eth0 and their pods talk; a node with a
/// second interface (`ext1`, 198.18.9.1/24, a veth whose peer stays in the node) that only
/// the route to 198.18.9.7 takes picks it after its `--iface` matched nothing, and publishes
/// 198.18.9.1. The same node, as flanneld, also picks `ext1` when given only `--public-ip
/// 198.18.9.1` (the interface holding it, not the default route's), and when its first
/// `--iface` names an interface without an IPv4 address (`ext2`); empty `FLANNELD_*`
/// variables count as not given. `--iface eth0` with that `--public-ip` is warned about.
#[test]
fn iface_can_reach_picks_the_interface_the_kernel_routes_the_address_through() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .node_agent_args(0, &["--iface-can-reach", "198.18.0.2"])
        .node_agent_args(1, &["--iface", "wlan9", "--iface-can-reach=198.18.0.1"])
        .build()
        .unwrap();
    for node in cluster.nodes() {
        let agent = node.agent().unwrap();
        let line = format!(
            "using interface eth0 (index {}, MTU 1500), address {ip}, public IP {ip}",
            node.ns().ifindex("eth0").unwrap(),
            ip = node.underlay_ip()
        );
        agent.wait_for_log(&line, START).unwrap();
    }
    overlay_tests::checks::assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));

    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    for args in [
        &[
            "link",
            "add",
            "ext1",
            "type",
            "veth",
            "peer",
            "name",
            "ext1-peer",
        ][..],
        &["addr", "add", "198.18.9.1/24", "dev", "ext1"],
        &["link", "set", "ext1-peer", "up"],
        &["link", "set", "ext1", "up"],
        &[
            "link",
            "add",
            "ext2",
            "type",
            "veth",
            "peer",
            "name",
            "ext2-peer",
        ],
        &["link", "set", "ext2", "up"],
    ] {
        node.ns().ip(args).unwrap();
    }
    let agent = node
        .start_agent(&["--iface", "wlan9", "--iface-can-reach", "198.18.9.7"])
        .unwrap();
    agent.wait_for_log("using interface ext1", START).unwrap();
    agent
        .wait_for_log("address 198.18.9.1, public IP 198.18.9.1", START)
        .unwrap();
    let public_ip = Ipv4Addr::new(198, 18, 9, 1);
    let kv = must_get(&cluster, &lease_key(DEFAULT_ETCD_PREFIX, subnet_of(node)));
    assert_eq!(kv.value, vxlan_record(public_ip, &vtep_mac(public_ip)));
    agent.kill().unwrap();

    // An empty FLANNELD_* variable is "not given", as flanneld reads them: FLANNELD_IFACE= takes
    // away the harness's --iface, and FLANNELD_PUBLIC_IP= is no address to refuse.
    let cases: [(&[&str], (&str, &str)); 2] = [
        (&["--public-ip", "198.18.9.1"], ("FLANNELD_IFACE", "")),
        (
            &["--iface", "ext2", "--iface", "ext1"],
            ("FLANNELD_PUBLIC_IP", ""),
        ),
    ];
    for (args, env) in cases {
        let agent = node.start_agent_env(args, &[env]).unwrap();
        agent
            .wait_for_log(
                &format!(
                    "using interface ext1 (index {}, MTU 1500), address 198.18.9.1, public IP \
                     198.18.9.1",
                    node.ns().ifindex("ext1").unwrap()
                ),
                START,
            )
            .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
        agent.kill().unwrap();
    }
    // With --iface naming another interface, VXLAN would leave from that one's address, which
    // peers running this agent do not accept: said at start.
    let agent = node
        .start_agent(&["--iface", "eth0", "--public-ip", "198.18.9.1"])
        .unwrap();
    agent
        .wait_for_log(
            "--public-ip 198.18.9.1 is an address of ext1, not of the chosen interface eth0",
            START,
        )
        .unwrap();
    agent.kill().unwrap();

    // Not an IPv4 address: refused, naming it.
    refused_at_start(
        node,
        &["--iface-can-reach", "2001:db8::1"],
        "--iface-can-reach \"2001:db8::1\" is not an IPv4 address",
    );
}

/// An agent whose PublicIP its peers would refuse (a loopback interface, or `--public-ip` inside
/// the network) stops at start, naming the address and where it came from, before any lease.
#[test]
fn a_public_ip_peers_would_refuse_stops_the_agent_before_the_lease() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let cases: [(&[&str], &str); 2] = [
        (
            &["--iface", "lo"],
            "the PublicIP from interface lo cannot be used: PublicIP 127.0.0.1 is not a unicast address",
        ),
        (
            &["--public-ip", "172.17.9.9"],
            "the PublicIP from --public-ip cannot be used: PublicIP 172.17.9.9 is inside the network 172.17.0.0/16",
        ),
    ];
    for (args, message) in cases {
        refused_at_start(node, args, message);
    }
    let leases = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert!(leases.is_empty(), "{leases:?}");
}

/// A `--subnet-file` naming another program's file (a typo, or mk-docker-opts.sh's output)
/// stops the agent at start, naming the file and the line that is no `FLANNEL_*` variable,
/// and leaves the file as it was: the agent replaces the subnet file whole.
#[test]
fn a_subnet_file_of_another_program_stops_the_agent_and_is_left_alone() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let path = node.dir().join("resolv.conf");
    let text = "nameserver 198.18.0.53\nsearch cluster.local\n";
    std::fs::write(&path, text).unwrap();
    let message = format!(
        "{} is not a subnet file (line 1: \"nameserver 198.18.0.53\")",
        path.display()
    );
    refused_at_start(
        node,
        &["--subnet-file", &path.display().to_string()],
        &message,
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

/// `--ip-masq` in a Kubernetes pod (`KUBERNETES_SERVICE_HOST` set, as in the DaemonSet) with
/// the Service address not excluded stops the agent before the lease, naming the address, the
/// reason and the fixes, where the masquerade would run before kube-proxy's DNAT: with
/// `--pod-hook bridge`, or a bridge that does not run iptables (`br_netfilter`'s
/// `bridge-nf-call-iptables` 0). With the port hook and `br_netfilter` (Kubernetes' own
/// requirement, this machine's setting) a flow's first packet meets kube-proxy's rules on the
/// bridge first, and the agent starts, saying so; excluded, a local address (kube-proxy's IPVS
/// mode puts ClusterIPs on `kube-ipvs0`), or without `--ip-masq`, it starts either way.
#[test]
fn ip_masq_under_kubernetes_needs_the_service_cidr_excluded() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let ns = node.ns();
    // A Service CIDR from the test's own range, outside the Network.
    let env = [("KUBERNETES_SERVICE_HOST", "172.30.0.1")];
    let refused = |args: &[&str], why: &str| {
        let agent = node.start_agent_env(args, &env).unwrap();
        overlay_tests::checks::assert_refused_before_lease(
            &agent,
            &[
                "--ip-masq under Kubernetes: the Service address 172.30.0.1 \
                 (KUBERNETES_SERVICE_HOST) is not in --ip-masq-exclude",
                why,
            ],
        );
    };
    let starts = |args: &[&str]| {
        let agent = node.start_agent_env(args, &env).unwrap();
        agent
            .wait_for_log("Lease acquired", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{args:?}: {e:#}\n{}", agent.log()));
        agent.kill().unwrap();
        agent.log()
    };
    assert_eq!(
        ns.sysctl_get("net.bridge.bridge-nf-call-iptables")
            .unwrap()
            .trim(),
        "1",
        "br_netfilter must be loaded (as Kubernetes requires)"
    );
    refused(
        &["--ip-masq", "--pod-hook", "bridge"],
        "with --pod-hook bridge",
    );
    let log = starts(&["--ip-masq"]);
    assert!(
        log.contains("Services need no --ip-masq-exclude"),
        "the agent says why it starts:\n{log}"
    );
    ns.sysctl("net.bridge.bridge-nf-call-iptables", "0")
        .unwrap();
    refused(
        &["--ip-masq"],
        "the bridge does not run iptables (net.bridge.bridge-nf-call-iptables is not 1",
    );
    starts(&["--ip-masq", "--ip-masq-exclude", "172.30.0.0/16"]);
    starts(&[]);
    // kube-proxy makes it a dummy device; this kernel has no dummy driver, and a bridge's
    // address is as local.
    ns.ip(&["link", "add", "kube-ipvs0", "type", "bridge"])
        .unwrap();
    ns.add_addr("kube-ipvs0", "172.30.0.1/32").unwrap();
    starts(&["--ip-masq"]);
}

/// A vxlan `MTU` option above the external interface's MTU (a jumbo-frame value on 1500-byte
/// links) stops the agent at start, naming both, before the lease: pods would get an MTU whose
/// encapsulated frames cannot leave.
#[test]
fn a_vxlan_mtu_above_the_interfaces_stops_the_agent_before_the_lease() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(
            r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan", "MTU": 9001}}"#,
        )
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let message = "the vxlan option MTU 9001 is above the MTU 1500 of eth0";
    refused_at_start(node, &[], message);
    assert!(
        !node.subnet_file().exists(),
        "no subnet.env for docker to use"
    );
}

/// A `Network` that a network of the node lies in (or equals) stops the agent before the lease,
/// naming the interface and its address: the network's route through `ovl0` would replace that
/// interface's route, and its hosts (etcd, storage) would become unreachable. A pod bridge
/// still holding Docker's default `172.17.0.1/16` is not such a network.
#[test]
fn a_network_the_node_is_already_on_stops_the_agent_before_the_lease() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let ns = node.ns();
    ns.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
    ])
    .unwrap();
    ns.add_addr("lan0", "172.17.0.5/16").unwrap();
    ns.link_up("lan0").unwrap();
    let before = ns
        .run("ip", &["-4", "route", "show", "172.17.0.0/16"])
        .unwrap();
    let message = "Network 172.17.0.0/16 overlaps lan0's 172.17.0.5/16";
    refused_at_start(node, &[], message);
    let after = ns
        .run("ip", &["-4", "route", "show", "172.17.0.0/16"])
        .unwrap();
    assert_eq!(after, before, "lan0's route is untouched");
    assert!(after.contains("lan0"), "{after}");

    // A static route of a wider network (a remote site through a gateway) would be cut into.
    ns.ip(&["link", "del", "lan0"]).unwrap();
    let gateway = overlay_tests::UNDERLAY_GATEWAY.to_string();
    ns.ip(&[
        "route",
        "add",
        "172.16.0.0/12",
        "via",
        &gateway,
        "dev",
        "eth0",
    ])
    .unwrap();
    let message =
        format!("Network 172.17.0.0/16 overlaps the route 172.16.0.0/12 via {gateway} dev eth0");
    refused_at_start(node, &[], &message);
    ns.ip(&["route", "del", "172.16.0.0/12"]).unwrap();

    // An etcd endpoint given as an address inside the Network that only the default route
    // leads to: the network's route would capture it.
    let endpoints = format!("{},http://172.17.0.77:2379", node.etcd_endpoint());
    let message = "etcd endpoint http://172.17.0.77:2379 is inside Network 172.17.0.0/16";
    refused_at_start(node, &["--etcd-endpoints", &endpoints], message);

    // Docker's bridge before its restart with FLANNEL_SUBNET: the agent starts.
    ns.ip(&["link", "add", "docker0", "type", "bridge"])
        .unwrap();
    ns.add_addr("docker0", "172.17.0.1/16").unwrap();
    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log("Lease acquired", Duration::from_secs(30))
        .unwrap();
}

/// Another overlay's VXLAN device on our port (here VNI 4096 on 8472): our data path takes the
/// VXLAN sent to the node on that port first and drops the other VNI, so the agent says so at
/// start, as an error naming the device, its VNI and the port; the device also keeps the GRO
/// device down, which makes the node not ready.
#[test]
fn another_vxlan_device_on_our_port_is_named_at_start() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let add = [
        "link", "add", "vx0", "type", "vxlan", "id", "4096", "dstport", "8472", "dev", "eth0",
    ];
    node.ns().ip(&add).unwrap();
    node.ns().link_up("vx0").unwrap();
    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log("also listens on port 8472", Duration::from_secs(30))
        .unwrap();
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("also listens on port 8472"))
        .unwrap();
    assert!(
        line.contains("ERROR")
            && line.contains("VXLAN device vx0 (VNI 4096)")
            && line.contains("drops what is not VNI 1"),
        "{line}"
    );
    // It also keeps the GRO device down: fragmented VXLAN is lost, so the node is not ready.
    agent
        .wait_for_log("VXLAN device vx0 holds port 8472", Duration::from_secs(10))
        .unwrap();
    assert!(
        agent
            .log()
            .contains("Give this network or the other overlay another port"),
        "{}",
        agent.log()
    );
    wait_until("not ready, naming vx0", Duration::from_secs(10), || {
        let status = overlay_tests::checks::agent_cmd(node, &["status", "-o", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["agent"]["ready"] == false
            && status["agent"]["not_ready_reason"]
                .as_str()
                .is_some_and(|r| r.contains("vx0 holds port 8472"))
    });
    assert!(agent.is_running(), "a warning, not a refusal:\n{log}");
}

/// The network config edited while agents run (here SubnetLen 24 → 25): each agent goes on
/// with the config it started with, as flanneld does, but says so once, naming the change, and
/// reports not ready until the config is back (a node started after the edit would refuse its
/// lease, and it that node's). The data path is untouched.
#[test]
fn an_edited_network_config_is_reported_and_makes_the_node_not_ready() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (a0, a1) = (n0.agent().unwrap(), n1.agent().unwrap());
    let ready = |node: &Node| -> serde_json::Value {
        let text = overlay_tests::checks::agent_cmd(node, &["status", "-o", "json"]);
        serde_json::from_str(&text).unwrap()
    };
    let wait = Duration::from_secs(10);
    wait_until("both nodes ready", wait, || {
        ready(n0)["agent"]["ready"] == true && ready(n1)["agent"]["ready"] == true
    });
    let mark = (a0.log().len(), a1.log().len());
    let edited = r#"{"Network": "172.17.0.0/16", "SubnetLen": 25, "Backend": {"Type": "vxlan"}}"#;
    cluster.etcd().put_network_config(None, edited).unwrap();
    for (agent, since) in [(&a0, mark.0), (&a1, mark.1)] {
        wait_line_since(
            agent,
            since,
            &[
                "ERROR",
                "changed since this agent started (SubnetLen 24 → 25,",
            ],
            wait,
        );
    }
    wait_until("n0 not ready, naming the change", wait, || {
        let s = ready(n0);
        s["agent"]["ready"] == false
            && s["agent"]["not_ready_reason"]
                .as_str()
                .is_some_and(|r| r.contains("network config in etcd changed"))
    });
    overlay_tests::checks::assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));

    cluster
        .etcd()
        .put_network_config(None, VXLAN_CONFIG)
        .unwrap();
    wait_until("both nodes ready again", wait, || {
        ready(n0)["agent"]["ready"] == true && ready(n1)["agent"]["ready"] == true
    });
    let errors = a0.log()[mark.0..]
        .lines()
        .filter(|l| l.contains("changed since this agent started"))
        .count();
    assert_eq!(errors, 1, "one error per change:\n{}", a0.log());
}

/// Two agents publishing one PublicIP (here a second node started with `--public-ip` of the
/// first, as a cluster-wide `FLANNELD_PUBLIC_IP` or a typo would give): the second reuses the
/// first's live lease, as a restarted node does, so both nodes hold the same subnet. Each
/// agent logs an error naming the PublicIP and the subnet and reports not ready, and they stop
/// writing the key after one write each.
#[test]
fn two_agents_with_one_public_ip_are_both_reported() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(0)
        .network_config(VXLAN_CONFIG)
        .start_agents(false)
        .build()
        .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let status = |node: &Node| -> serde_json::Value {
        let text = overlay_tests::checks::agent_cmd(node, &["status", "-o", "json"]);
        serde_json::from_str(&text).unwrap()
    };
    let wait = Duration::from_secs(10);
    let a0 = n0.start_agent(&[]).unwrap();
    wait_until("n0 ready", wait, || status(n0)["agent"]["ready"] == true);
    let subnet = n0
        .subnet_env()
        .unwrap()
        .get("FLANNEL_SUBNET")
        .unwrap()
        .to_owned();
    let public_ip = n0.underlay_ip().to_string();
    let a1 = n1.start_agent(&["--public-ip", &public_ip]).unwrap();
    for (agent, node) in [(&a0, n0), (&a1, n1)] {
        wait_line_since(
            agent,
            0,
            &[
                "ERROR",
                &format!("another agent publishes this node's PublicIP {public_ip}"),
            ],
            wait,
        );
        wait_until(&format!("{} not ready", node.name()), wait, || {
            let s = status(node);
            s["agent"]["ready"] == false
                && s["agent"]["not_ready_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("two nodes share one subnet"))
        });
    }
    assert_eq!(
        n1.subnet_env().unwrap().get("FLANNEL_SUBNET"),
        Some(subnet.as_str()),
        "the second node took the first's subnet"
    );
    let leases = || -> Vec<(String, i64)> {
        let prefix = format!("{DEFAULT_ETCD_PREFIX}/subnets/");
        let kvs = cluster.etcd().get_prefix(&prefix).unwrap();
        kvs.into_iter()
            .map(|kv| (kv.key, kv.mod_revision))
            .collect()
    };
    let before = leases();
    assert_eq!(before.len(), 1, "one lease for both nodes: {before:?}");
    thread::sleep(Duration::from_secs(3));
    assert_eq!(leases(), before, "the agents stopped writing the key");
}

/// What held before the hardening and must go on holding (docs/reliability.md): etcd down for a
/// while (here 20 s) costs no packet between pods on different nodes, and once it is back the
/// agents follow changes again (a node joining is seen).
#[test]
fn an_etcd_outage_loses_no_packet_and_the_agents_catch_up() {
    const PPS: u32 = 500;
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    overlay_tests::checks::assert_pods_talk(&a, &b);
    let agent = cluster.node(0).agent().unwrap();
    let sink = overlay_tests::traffic::udp_sink(b.ns(), Duration::from_secs(90)).unwrap();
    let to = (b.ip(), sink.port()).into();
    let count = PPS * 30;
    thread::scope(|s| {
        let stream = s.spawn(|| overlay_tests::traffic::udp_stream(a.ns(), to, PPS, count));
        thread::sleep(Duration::from_secs(2));
        cluster.etcd().stop();
        thread::sleep(Duration::from_secs(20));
        cluster.etcd().start_again().unwrap();
        let mark = agent.log().len();
        let put_at = Instant::now();
        let subnet = net("172.17.222.0/24");
        cluster
            .etcd()
            .put(
                &lease_key(DEFAULT_ETCD_PREFIX, subnet),
                &vxlan_record(Ipv4Addr::new(198, 18, 0, 99), "0a:58:c6:12:00:63"),
            )
            .unwrap();
        wait_log_since(
            &agent,
            mark,
            &format!("peer added: subnet {subnet}"),
            Duration::from_secs(20),
        );
        eprintln!(
            "a peer added after the outage reached the agent {:?} after the put began",
            put_at.elapsed()
        );
        stream.join().expect("stream").unwrap();
    });
    let report = sink.finish(Duration::from_secs(10)).unwrap();
    assert_eq!(
        report.distinct,
        u64::from(count),
        "datagrams lost across a 20 s etcd outage: {report:?}"
    );
    assert!(agent.is_running(), "the agent rode out the outage");
}

/// What held before the hardening (docs/reliability.md): 4,000 peers in etcd reach a starting
/// agent's data path. The time and the agent's memory are printed (figures, not a bound).
#[test]
fn four_thousand_peers_reach_the_data_path() {
    const PEERS: u32 = 4000;
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(r#"{"Network": "172.16.0.0/12", "Backend": {"Type": "vxlan"}}"#)
        .build()
        .unwrap();
    // In transactions of 100 puts (etcd allows 128 operations per transaction).
    let record = |i: u32| {
        let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (1 + i % 250) as u8);
        vxlan_record(ip, &vtep_mac(ip))
    };
    let ids: Vec<u32> = (1..=PEERS).collect();
    for chunk in ids.chunks(100) {
        let mut ops = String::from("\n");
        for &i in chunk {
            let subnet = Ipv4Net::new(Ipv4Addr::from(0xac10_0000 + (i << 8)), 24).unwrap();
            let key = lease_key(DEFAULT_ETCD_PREFIX, subnet);
            ops.push_str(&format!(
                "put {key} {}\n",
                serde_json::to_string(&record(i)).unwrap()
            ));
        }
        // An empty failure section, ended by a blank line too.
        ops.push_str("\n\n");
        let c = cluster.etcd().etcdctl_command(&["txn"]);
        let out = overlay_tests::cmd::check_with(c, Some(ops.as_bytes()), Duration::from_secs(30))
            .unwrap();
        assert!(out.starts_with("SUCCESS"), "etcdctl txn: {out}");
    }
    let node = cluster.node(0);
    let start = Instant::now();
    let agent = node.start_agent(&[]).unwrap();
    wait_until("4,000 peers in ROUTE_V4", Duration::from_secs(60), || {
        node.agent_cmd(&["peers"])
            .is_ok_and(|out| out.lines().count() == PEERS as usize)
    });
    let took = start.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?");
    eprintln!("{PEERS} peers in the data path {took:?} after the agent started; {rss}");
    assert!(agent.is_running());
}
