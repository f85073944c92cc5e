//! Faults and hostile input (docs/reliability.md), end to end against the real agent in namespace
//! clusters: a member node claiming other nodes' pod addresses or sending inner headers the
//! kernel would refuse, restarts of both agents under a 2,000 pps stream, a subnet file the
//! agent cannot write, `overlay-agent cleanup` while the agent runs, and a bpffs that would die
//! with the agent. (The masquerade items are in `masquerade.rs`, the etcd ones in
//! `control_plane.rs`; `docs/reliability.md` has the whole fault matrix.)
//!
//! Root only; run one at a time: `cargo test -p overlay-tests --test reliability --
//! --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use overlay_agent::subnet::Mac;
use overlay_tests::{
    Cluster, DEFAULT_ETCD_PREFIX, Node, agent_bin,
    checks::{agent_cmd, agent_of, assert_pods_talk, counters, eth0_programs, grown, subnet_of},
    packet::{checksum, vxlan_payload},
    traffic,
};

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const VXLAN_PORT: u16 = 8472;
/// Where the inner IPv4 header starts in a VXLAN payload (VXLAN header, inner Ethernet).
const INNER_IP: usize = 8 + 14;

/// The drop counters that grew from `before` to `after`.
fn drops(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    grown(before, after)
        .into_iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .collect()
}

/// Issue 12, items 2 and 10: a member node (n1, whose PublicIP n0 accepts VXLAN from) sends
/// n0 frames whose inner packet claims another node's pod, or one of n0's own addresses, or
/// carries an inner header the kernel would refuse (bad checksum, a total length beyond the
/// frame). None reaches the pod; each is dropped and counted by its reason. n1's own pods'
/// packets still arrive.
#[test]
fn a_member_node_gets_through_only_valid_packets_of_its_own_pods() {
    let cluster = Cluster::builder()
        .nodes(3)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let (target, n1_pod, n2_pod) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(2, 0));
    assert_pods_talk(&n1_pod, &target);
    assert_pods_talk(&n2_pod, &target);
    let port = 7777;
    let sock = target
        .ns()
        .in_netns(move || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?))
        .unwrap();
    let (vtep0, vtep1) = (
        Mac::for_public_ip(n0.underlay_ip()).octets(),
        Mac::for_public_ip(n1.underlay_ip()).octets(),
    );
    let frame =
        |src: Ipv4Addr, data: &[u8]| vxlan_payload(1, vtep0, vtep1, src, target.ip(), port, data);
    let n0_subnet = subnet_of(n0);
    let [a, b, c, _] = n0_subnet.network().octets();
    let mut bad_checksum = frame(n1_pod.ip(), b"bad checksum");
    bad_checksum[INNER_IP + 10] ^= 0x5a;
    let mut too_long = frame(n1_pod.ip(), b"too long");
    let len = u16::from_be_bytes([too_long[INNER_IP + 2], too_long[INNER_IP + 3]]) + 100;
    too_long[INNER_IP + 2..INNER_IP + 4].copy_from_slice(&len.to_be_bytes());
    too_long[INNER_IP + 10..INNER_IP + 12].copy_from_slice(&[0, 0]);
    let c_sum = checksum(&too_long[INNER_IP..INNER_IP + 20]);
    too_long[INNER_IP + 10..INNER_IP + 12].copy_from_slice(&c_sum.to_be_bytes());

    const N: usize = 5;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "claiming n2's pod",
            frame(n2_pod.ip(), b"n2 pod"),
            "drop_inner_source",
        ),
        (
            "claiming n0's own host device address",
            frame(n0_subnet.network(), b"n0 host"),
            "drop_inner_source",
        ),
        (
            "claiming another of n0's pods",
            frame(Ipv4Addr::new(a, b, c, 200), b"n0 pod"),
            "drop_inner_source",
        ),
        (
            "with a bad inner header checksum",
            bad_checksum,
            "drop_malformed",
        ),
        (
            "with an inner total length beyond the frame",
            too_long,
            "drop_malformed",
        ),
    ];
    for (what, payload, reason) in cases {
        let before = counters(n0);
        traffic::send_udp(
            n1.ns(),
            n1.underlay_ip(),
            (n0.underlay_ip(), VXLAN_PORT).into(),
            &payload,
            N,
        )
        .unwrap();
        let got = traffic::drain(&sock).unwrap();
        assert!(got.is_empty(), "frames {what} reached {target}: {got:?}");
        let grew = grown(&before, &counters(n0));
        assert_eq!(
            grew.get(reason),
            Some(&(N as u64)),
            "n0 counts the {N} frames {what} as {reason}: {grew:?}"
        );
        for decap in ["decap_pod", "decap_endpoint", "decap_host"] {
            assert_eq!(grew.get(decap), None, "frames {what}: {grew:?}");
        }
    }

    // n1's own pod, valid: delivered.
    let before = counters(n0);
    traffic::send_udp(
        n1.ns(),
        n1.underlay_ip(),
        (n0.underlay_ip(), VXLAN_PORT).into(),
        &frame(n1_pod.ip(), b"from n1's pod"),
        N,
    )
    .unwrap();
    assert_eq!(
        traffic::drain(&sock).unwrap(),
        vec![b"from n1's pod".to_vec(); N]
    );
    assert!(drops(&before, &counters(n0)).is_empty());
}

/// Issue 12, item 4: restarts are hitless. A pod streams 2,000 datagrams per second to a pod
/// on the other node while both agents restart (SIGTERM, then a new agent), twice each: not
/// one datagram is lost, and the data path counts no drop (the new agent keeps the pinned
/// configuration in force until it has its own, so nothing is `drop_no_bridge`).
#[test]
fn restarts_of_both_agents_lose_nothing_at_2000_pps() {
    const PPS: u32 = 2000;
    const RESTARTS: usize = 4;
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
    let before: Vec<_> = cluster.nodes().iter().map(counters).collect();
    let sink = traffic::udp_sink(b.ns(), Duration::from_secs(120)).unwrap();
    let to = (b.ip(), sink.port()).into();
    // Long enough for the restarts below, each of which waits for the new agent to be ready.
    let count = PPS * 14;
    let started = Instant::now();
    let mut took = Vec::new();
    thread::scope(|s| {
        let stream = s.spawn(|| traffic::udp_stream(a.ns(), to, PPS, count));
        thread::sleep(Duration::from_secs(1));
        for round in 0..RESTARTS {
            // The receiver first: that is where decapsulated traffic needs the bridge.
            let node = cluster.node(1 - round % 2);
            let t = Instant::now();
            let status = agent_of(node).kill().unwrap();
            assert!(status.success(), "SIGTERM ends the agent cleanly: {status}");
            let agent = node.start_agent(&[]).unwrap();
            agent
                .wait_for_log("wrote ", Duration::from_secs(30))
                .unwrap();
            took.push(t.elapsed());
            thread::sleep(Duration::from_millis(500));
        }
        assert!(
            !stream.is_finished(),
            "the stream ended before the last restart: make it longer (restarts took {took:?})"
        );
        stream.join().expect("stream thread").unwrap();
    });
    let report = sink.finish(Duration::from_secs(10)).unwrap();
    let lost = u64::from(count) - report.distinct;
    eprintln!(
        "{RESTARTS} agent restarts (each {took:?} until ready) during {count} datagrams at \
         {PPS} pps in {:?}: {lost} lost, {:.1} per restart",
        started.elapsed(),
        lost as f64 / RESTARTS as f64
    );
    for (node, before) in cluster.nodes().iter().zip(&before) {
        let dropped = drops(before, &counters(node));
        assert!(
            dropped.is_empty(),
            "{} dropped packets during the restarts: {dropped:?}",
            node.name()
        );
    }
    assert_eq!(
        lost, 0,
        "datagrams lost across {RESTARTS} restarts: {report:?}"
    );
}

/// Makes a file immutable (`chattr +i`) for as long as it lives, so that not even root can
/// replace it; takes the flag off again on drop (else the cluster's directory cannot go).
struct Immutable(PathBuf);

impl Immutable {
    fn new(path: &Path) -> Self {
        let status = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .unwrap_or_else(|e| panic!("chattr (e2fsprogs) cannot run: {e}"));
        assert!(
            status.success(),
            "chattr +i {} failed: this test needs a file system with the immutable flag \
             (ext4, as /tmp is on these machines)",
            path.display()
        );
        Self(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Nothing of the agent is left on `node`: no lease in etcd, no programs on eth0, no host
/// or GRO device, no pins.
fn assert_nothing_left(cluster: &Cluster, node: &Node, why: &str) {
    let leases = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert!(leases.is_empty(), "{why}: leases left in etcd: {leases:?}");
    assert!(
        eth0_programs(node).is_empty(),
        "{why}: programs left on eth0: {:?}",
        eth0_programs(node)
    );
    let links = node.ns().run("ip", &["-o", "link", "show"]).unwrap();
    assert!(!links.contains("ovl0"), "{why}: ovl0 left:\n{links}");
    assert!(!links.contains("ovl-gro"), "{why}: ovl-gro left:\n{links}");
    let pins = node.bpf_dir().join("maps");
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "{why}: pins left in {}: {left:?}",
        pins.display()
    );
}

/// Issue 12, item 7: a subnet file the agent cannot write is found before it takes a lease or
/// installs anything (the error named once); one it can write but not replace (immutable) is
/// found after both, and the start-up undoes them: the lease it created goes, and the data path
/// it installed (pins, links, host device).
#[test]
fn an_unwritable_subnet_file_leaves_no_lease_and_no_data_path_behind() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);

    let blocker = node.dir().join("not-a-directory");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("subnet.env").display().to_string();
    let agent = node.start_agent(&["--subnet-file", &path]).unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "the agent must fail: {status}");
    assert_nothing_left(&cluster, node, "unwritable location");
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error logged:\n{log}"));
    assert!(
        line.contains("--subnet-file") && line.contains("not-a-directory"),
        "{line}"
    );
    assert_eq!(
        line.matches("(os error").count(),
        1,
        "the cause once: {line}"
    );
    assert!(!log.contains("Lease acquired"), "{log}");

    // Writable directory, a file that cannot be replaced: found only at the write.
    let file = node.dir().join("subnet.env");
    std::fs::write(&file, "FLANNEL_NETWORK=left by hand\n").unwrap();
    let _immutable = Immutable::new(&file);
    let agent = node
        .start_agent(&["--subnet-file", &file.display().to_string()])
        .unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "the agent must fail: {status}");
    let log = agent.log();
    assert!(log.contains("Lease acquired"), "it got that far:\n{log}");
    assert!(log.contains("gave up the lease"), "{log}");
    assert!(log.contains("removed the data path"), "{log}");
    assert_nothing_left(&cluster, node, "subnet file not replaceable");
}

/// Issue 12, item 8: `overlay-agent cleanup` while the agent runs refuses, removing nothing,
/// and says why (exit status 1); traffic goes on. Once the agent is stopped it removes
/// everything.
#[test]
fn cleanup_refuses_while_the_agent_runs() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let programs = eth0_programs(node);
    assert_eq!(programs.len(), 2, "{programs:?}");
    let dir = node.bpf_dir().display().to_string();
    let out = node
        .ns()
        .exec(agent_bin().unwrap(), &["cleanup", "--bpf-dir", &dir])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cleanup must fail: {stderr}");
    assert!(
        stderr.contains("another agent is running with --bpf-dir") && stderr.contains(&dir),
        "{stderr}"
    );
    assert_eq!(eth0_programs(node), programs, "nothing detached");
    assert!(node.bpf_dir().join("maps/CONFIG").exists(), "pins kept");
    let links = node.ns().run("ip", &["-o", "link", "show"]).unwrap();
    assert!(links.contains("ovl0"), "{links}");
    assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));

    assert!(agent_of(node).kill().unwrap().success());
    agent_cmd(node, &["cleanup"]);
    assert!(eth0_programs(node).is_empty());
    assert!(!node.bpf_dir().exists(), "pins removed");
}

/// Issue 12, item 9: under `ip netns exec` (the README's own example) the agent is alone in a
/// private mount namespace, so a bpffs it mounted on /sys/fs/bpf itself would vanish with it
/// and take the whole data path along at a `kill -9`. It refuses to start, saying so and what
/// to do, before it takes a lease.
#[test]
fn a_bpffs_that_would_die_with_the_agent_is_refused() {
    let cluster = Cluster::builder()
        .nodes(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let agent = node
        .start_agent(&["--bpf-dir", "/sys/fs/bpf/overlay"])
        .unwrap();
    let status = agent.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "the agent must refuse: {status}");
    let log = agent.log();
    assert!(
        log.contains("--bpf-dir /sys/fs/bpf/overlay is not on a bpffs")
            && log.contains("private mount namespace")
            && log.contains("mount -t bpf"),
        "{log}"
    );
    assert!(!log.contains("Lease acquired"), "{log}");
    assert_nothing_left(&cluster, node, "private bpffs");
}

/// A careless operator starts a second agent on a node with another `--bpf-dir` (or changes
/// the directory while the old data path stays pinned): its programs would sit behind the
/// first agent's on every device and never run, and a failed start would delete `ovl0` and the
/// GRO device the first one uses. It refuses before the lease, naming the programs, and
/// leaves the first agent's data path, devices and lease as they are; `cleanup` of another
/// directory keeps the devices too. Once the old data path is cleaned up, the new directory
/// is taken.
#[test]
fn a_second_agent_with_another_bpf_dir_is_refused_and_touches_nothing() {
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let node = cluster.node(0);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
    let first = agent_of(node);
    let programs = eth0_programs(node);
    let index = |dev: &str| node.ns().ifindex(dev).unwrap();
    let devices = (index("ovl0"), index("ovl-gro"));
    let subnet = subnet_of(node);
    let key = format!(
        "{DEFAULT_ETCD_PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    );
    let record = cluster.etcd().get(&key).unwrap().unwrap();
    let other = node.dir().join("bpffs/other");
    let other_env = node.dir().join("other.env");
    let start_other = || {
        node.start_agent(&[
            "--bpf-dir",
            &other.display().to_string(),
            "--subnet-file",
            &other_env.display().to_string(),
        ])
        .unwrap()
    };
    let not_ours = format!("not pinned under {}", other.display());
    let refused = |second: &overlay_tests::AgentProcess| {
        let messages = [
            "eth0 already carries another overlay agent's data path",
            "underlay_ingress (program id",
            "underlay_egress (program id",
            &not_ours,
        ];
        overlay_tests::checks::assert_refused_before_lease(second, &messages);
    };

    refused(&start_other());
    assert_eq!(eth0_programs(node), programs, "nothing attached");
    assert_eq!((index("ovl0"), index("ovl-gro")), devices, "devices kept");
    assert!(!other_env.exists(), "no subnet file written");
    assert_eq!(cluster.etcd().get(&key).unwrap(), Some(record.clone()));
    assert_pods_talk(&a, &b);

    // `cleanup` of a directory that is not the running agent's: the devices stay.
    let out = node
        .ns()
        .exec(
            agent_bin().unwrap(),
            &["cleanup", "--bpf-dir", &other.display().to_string()],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kept the GRO device") && stderr.contains("kept the host device"),
        "{stderr}"
    );
    assert_eq!((index("ovl0"), index("ovl-gro")), devices, "devices kept");
    assert_pods_talk(&a, &b);

    // The first agent stopped, its data path still pinned: refused the same way.
    assert!(first.kill().unwrap().success());
    refused(&start_other());
    assert_eq!(
        eth0_programs(node),
        programs,
        "the stopped agent's data path stays"
    );
    // Its data path removed, the new directory is taken.
    agent_cmd(node, &["cleanup"]);
    let second = start_other();
    second
        .wait_for_log("wrote ", Duration::from_secs(30))
        .unwrap();
    assert!(other_env.exists());
    assert_eq!(eth0_programs(node), programs);
    assert_pods_talk(&a, &b);
}
