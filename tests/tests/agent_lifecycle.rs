//! The agent binary's life cycle in a node namespace: flags, attaching its programs to the
//! external interface (checked by asking the kernel, not the agent), and a clean exit.

use std::{process::Command, time::Duration};

use overlay_common::names;
use overlay_tests::{
    AttachKind, Cluster, agent_bin,
    checks::{GRO_DEVICE, agent_cmd, eth0_programs, gro_device, programs_on},
};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;

#[test]
fn agent_attaches_keeps_its_pinned_data_path_after_sigterm_and_cleanup_removes_it() {
    let cluster = Cluster::builder()
        .nodes(2)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    assert!(
        eth0_programs(node).is_empty(),
        "eth0 must start without programs"
    );

    let agent = node.start_agent(&[]).unwrap();
    agent
        .wait_for_log("data path attached to eth0", Duration::from_secs(30))
        .unwrap();
    let expected = [
        (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
        (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
    ];
    assert_eq!(
        eth0_programs(node),
        expected,
        "the kernel must report both programs on eth0"
    );
    // The other node's interface is untouched: attachments are per namespace.
    assert!(eth0_programs(cluster.node(1)).is_empty());

    // Traffic still flows through the attached programs, and they count it.
    let peer = cluster.node(1).underlay_ip();
    assert!(
        node.ping(peer, 3).unwrap().all_received(),
        "underlay ping through the programs"
    );

    let status = agent.kill().unwrap();
    assert!(
        status.success(),
        "SIGTERM must end the agent cleanly, got {status}"
    );
    // The data path is pinned: it outlives the agent so pods keep talking across restarts.
    assert_eq!(
        eth0_programs(node),
        expected,
        "pinned programs must stay attached after exit"
    );
    let gro_ingress = [(names::GRO_DEVICE_INGRESS.to_owned(), AttachKind::TcxIngress)];
    assert_eq!(
        programs_on(node, GRO_DEVICE),
        gro_ingress,
        "the GRO device keeps its program"
    );
    let counters = agent_cmd(node, &["counters"]);
    let rx = counters
        .lines()
        .find(|l| l.starts_with("underlay_rx "))
        .expect("underlay_rx line");
    let packets: u64 = rx.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        packets >= 3,
        "the ingress program must have counted the pings: {rx}"
    );

    agent_cmd(node, &["cleanup"]);
    assert!(
        eth0_programs(node).is_empty(),
        "cleanup must detach every program"
    );
    let links = node.ns().run("ip", &["-o", "link", "show"]).unwrap();
    assert!(
        !links.contains("ovl0"),
        "cleanup must delete the host device:\n{links}"
    );
    assert_eq!(gro_device(node), None, "cleanup must delete the GRO device");
    assert!(!node.bpf_dir().exists(), "cleanup must remove the pins");
}

#[test]
fn help_lists_flanneld_flags_and_version_prints() {
    let help = Command::new(agent_bin().unwrap())
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--etcd-endpoints",
        "--etcd-prefix",
        "--etcd-keyfile",
        "--etcd-certfile",
        "--etcd-cafile",
        "--etcd-username",
        "--etcd-password",
        "--iface",
        "--iface-regex",
        "--public-ip",
        "--subnet-file",
        "--subnet-lease-renew-margin",
        "--ip-masq",
        "--ip-masq-fully-random-disable",
        "--healthz-ip",
        "--healthz-port",
        "--iptables-forward-rules",
        "--ip-masq-exclude",
        "--version",
        "FLANNELD_ETCD_ENDPOINTS",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let version = Command::new(agent_bin().unwrap())
        .arg("--version")
        .output()
        .unwrap();
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
    assert!(
        stderr.contains("300.1.2.3") && stderr.contains("--public-ip"),
        "{stderr}"
    );
}
