//! `cargo xtask demo`: the main job on an embedded default.
//!
//! A real etcd holding the seeds' config `{"Network": "172.17.0.0/16", "Backend": {"Type":
//! "vxlan"}}`, three node namespaces on one underlay, each running the real agent, two pods per
//! node behind a `cni0` bridge addressed from the node's subnet.env. Every pod pings and sends
//! checksummed TCP data to every pod on the other nodes, and every node pings a remote pod; a
//! summary table follows. Everything is removed at the end (also on failure), and the demo
//! exits non-zero when any check failed.

use std::{process::ExitCode, time::Duration};

use anyhow::Result;
use overlay_tests::{
    Cluster, Endpoint as _, Pod, attached_programs, cleanup_leftovers, require_root,
};

const CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
const TCP_BYTES: u64 = 1 << 20;

fn main() -> ExitCode {
    require_root();
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nsome checks failed (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<bool> {
    cleanup_leftovers()?; // a crashed earlier run must not get in the way
    println!("== building {NODES} nodes with {PODS_PER_NODE} pods each; etcd config {CONFIG}");
    let cluster = Cluster::builder()
        .nodes(NODES)
        .pods_per_node(PODS_PER_NODE)
        .network_config(CONFIG)
        .build()?;

    println!("\n== what each node's agent set up");
    for node in cluster.nodes() {
        let env = node.subnet_env()?;
        println!(
            "{}: underlay {}  FLANNEL_SUBNET={} FLANNEL_MTU={}",
            node.name(),
            node.underlay_ip(),
            env.subnet,
            env.mtu,
        );
        // Asked of the kernel, not the agent: which programs sit on which device.
        for dev in ["eth0", "cni0", "ovl0"] {
            let progs = attached_programs(node.ns(), dev)?;
            let names: Vec<String> = progs
                .iter()
                .map(|p| format!("{} ({})", p.name, p.kind))
                .collect();
            println!("    {dev:<5} {}", names.join(", "));
        }
        for pod in node.pods() {
            println!("    pod {} {}", pod.label(), pod.ip());
        }
    }

    println!("\n== leases in etcd");
    for kv in cluster
        .etcd()
        .get_prefix(&format!("{}/subnets/", cluster.etcd_prefix()))?
    {
        println!("{}  {}", kv.key, kv.value);
    }

    let pods: Vec<Pod> = cluster
        .nodes()
        .iter()
        .flat_map(overlay_tests::Node::pods)
        .collect();
    // Let neighbours settle before the first measured packet.
    if let (Some(a), Some(b)) = (pods.first(), pods.last()) {
        let _ = a.ping_until(b.ip(), Duration::from_secs(5));
    }

    println!("\n== traffic between pods on different nodes");
    println!(
        "{:<10} {:<10} {:<16} {:<6} {:<24}",
        "from", "to", "address", "ping", "TCP 1 MiB, checksum"
    );
    let mut all_ok = true;
    for a in &pods {
        for b in pods.iter().filter(|b| b.node_name() != a.node_name()) {
            let ping = a.ping(b.ip(), 2).map(|r| r.all_received()).unwrap_or(false);
            let tcp = match a.tcp_transfer(b, TCP_BYTES) {
                Ok(t) => format!(
                    "ok {:.1} ms, src {}",
                    t.elapsed.as_secs_f64() * 1e3,
                    t.server_peer.ip()
                ),
                Err(e) => format!("FAILED: {}", first_line(&e)),
            };
            all_ok &= ping && tcp.starts_with("ok");
            println!(
                "{:<10} {:<10} {:<16} {:<6} {}",
                a.label(),
                b.label(),
                b.ip(),
                mark(ping),
                tcp
            );
        }
    }

    println!("\n== host (node) to a pod on another node");
    for (i, node) in cluster.nodes().iter().enumerate() {
        let remote = cluster.pod((i + 1) % NODES, 0);
        let ping = node
            .ping(remote.ip(), 2)
            .map(|r| r.all_received())
            .unwrap_or(false);
        all_ok &= ping;
        println!(
            "{:<10} {:<10} {:<16} {}",
            node.name(),
            remote.label(),
            remote.ip(),
            mark(ping)
        );
    }

    println!("\n== tearing down (agents, pods, nodes, etcd)");
    drop(cluster);
    println!(
        "done: {}",
        if all_ok {
            "every check passed"
        } else {
            "some checks FAILED"
        }
    );
    Ok(all_ok)
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAIL" }
}

/// The helper's own words (e.g. `connect ...: connection timed out`) without the command line.
fn first_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let reason = text.split("ovl-xfer: ").nth(1).unwrap_or(&text);
    reason
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}
