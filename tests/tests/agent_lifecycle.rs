//! The agent binary's life cycle in a node namespace: flags, attaching its programs to the
//! external interface (checked by asking the kernel, not the agent), and a clean exit.

use std::{process::Command, time::Duration};

use overlay_tests::{AttachKind, Cluster, agent_bin, attached_programs};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;

fn attached(node: &overlay_tests::Node) -> Vec<(String, AttachKind)> {
    let mut progs: Vec<_> = attached_programs(node.ns(), "eth0")
        .expect("query the kernel for eth0's programs")
        .into_iter()
        .map(|p| (p.name, p.kind))
        .collect();
    progs.sort_by_key(|(name, _)| name.clone());
    progs
}

#[test]
fn agent_attaches_to_the_external_interface_and_detaches_on_sigterm() {
    let cluster = Cluster::builder().nodes(2).network_config(VXLAN_CONFIG).build().unwrap();
    let node = cluster.node(0);
    assert!(attached(node).is_empty(), "eth0 must start without programs");

    let agent = node.start_agent(&[]).unwrap();
    agent.wait_for_log("data path attached to eth0", Duration::from_secs(30)).unwrap();
    assert_eq!(
        attached(node),
        [
            ("underlay_egress".to_owned(), AttachKind::TcxEgress),
            ("underlay_ingress".to_owned(), AttachKind::TcxIngress),
        ],
        "the kernel must report both programs on eth0"
    );
    // The other node's interface is untouched: attachments are per namespace.
    assert!(attached(cluster.node(1)).is_empty());

    // Traffic still flows through the attached programs, and they count it.
    let peer = cluster.node(1).underlay_ip();
    assert!(node.ping(peer, 3).unwrap().all_received(), "underlay ping through the programs");

    let status = agent.kill().unwrap();
    assert!(status.success(), "SIGTERM must end the agent cleanly, got {status}");
    let log = agent.log();
    let rx = log.lines().find(|l| l.contains("counter underlay_rx:")).expect("rx counter in log");
    assert!(!rx.contains(" 0 packets"), "the ingress program counted nothing: {rx}");
    assert!(attached(node).is_empty(), "programs must be detached after exit");
}

#[test]
fn help_lists_flanneld_flags_and_version_prints() {
    let help = Command::new(agent_bin().unwrap()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--etcd-endpoints", "--etcd-prefix", "--etcd-keyfile", "--etcd-certfile", "--etcd-cafile",
        "--etcd-username", "--etcd-password", "--iface", "--iface-regex", "--public-ip",
        "--subnet-file", "--subnet-lease-renew-margin", "--ip-masq",
        "--ip-masq-fully-random-disable", "--healthz-ip", "--healthz-port",
        "--iptables-forward-rules", "--version", "FLANNELD_ETCD_ENDPOINTS",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let version = Command::new(agent_bin().unwrap()).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("overlay-agent "));
}

#[test]
fn a_bad_flag_value_is_refused_naming_it() {
    let out = Command::new(agent_bin().unwrap())
        .args(["--public-ip", "300.1.2.3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("300.1.2.3") && stderr.contains("--public-ip"), "{stderr}");
}
