//! The data path outlives the agent: its links and maps are pinned under --bpf-dir, so pods keep
//! talking while the agent is dead, and the next agent adopts the pinned state without a gap.

use std::time::{Duration, Instant};

use overlay_tests::{Cluster, attached_programs, checks::transfer_across_agent_kill9};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
/// Large enough that the transfer is still running when the agent is killed.
const BYTES: u64 = 256 << 20;

fn prog_ids(node: &overlay_tests::Node, dev: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = attached_programs(node.ns(), dev)
        .unwrap()
        .into_iter()
        .filter_map(|p| p.prog_id)
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn tcp_transfer_survives_kill_9_and_restart_of_both_agents() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    a.ping_until(b.ip(), Duration::from_secs(10)).unwrap();
    let before = prog_ids(cluster.node(0), "eth0");

    let started = Instant::now();
    // Both ends lose their agent: the sender's encapsulation and the receiver's decapsulation
    // must go on from the pinned programs and maps alone; while no agent runs, new traffic flows
    // too.
    let report = transfer_across_agent_kill9(cluster.nodes(), &a, &b, BYTES, &[], || {
        assert!(
            a.ping(b.ip(), 2).unwrap().all_received(),
            "ping with both agents dead"
        );
    });
    eprintln!(
        "{BYTES} bytes in {:?} across kill -9 and restart",
        started.elapsed()
    );
    assert_eq!(report.bytes, BYTES);
    assert_eq!(
        report.server_peer.ip(),
        std::net::IpAddr::V4(a.ip()),
        "real pod source address"
    );

    // The new agent's programs sit in the same links: the kernel reports new program ids.
    let after = prog_ids(cluster.node(0), "eth0");
    assert_eq!(
        after.len(),
        2,
        "still exactly two programs on eth0: {after:?}"
    );
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "programs replaced: {before:?} -> {after:?}"
    );
    assert!(
        a.tcp_transfer(&b, 1 << 20).is_ok(),
        "traffic after the restart"
    );
}

#[test]
fn a_peer_that_left_while_the_agent_was_down_is_removed_on_restart() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let gone = cluster.node(2).subnet_env().unwrap().subnet.trunc();
    let node = cluster.node(0);
    node.agent().unwrap().kill9().unwrap();
    // Node 2 leaves for good while node 0 has no agent.
    cluster.node(2).agent().unwrap().kill9().unwrap();
    let key = format!(
        "{}/subnets/{}-{}",
        cluster.etcd_prefix(),
        gone.addr(),
        gone.prefix_len()
    );
    cluster.etcd().del(&key).unwrap();

    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log(
            &format!("peer removed: subnet {gone} (gone while"),
            Duration::from_secs(10),
        )
        .unwrap();
    let peers = node.agent_cmd(&["peers"]).unwrap();
    assert!(
        !peers.contains(&gone.to_string()),
        "{gone} must be gone from ROUTE_V4:\n{peers}"
    );
    let staying = cluster.node(1).subnet_env().unwrap().subnet.trunc();
    assert!(
        peers.contains(&staying.to_string()),
        "{staying} must stay in ROUTE_V4:\n{peers}"
    );
}
