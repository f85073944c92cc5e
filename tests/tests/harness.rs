//! Tests of the harness itself (no agent involved). Root only; run one at a time:
//! `cargo test -p overlay-tests --test harness -- --test-threads=1`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::Duration,
};

use overlay_tests::{
    AgentProcess, AttachKind, Capture, Cluster, EtcdServer, NetNs, OUTSIDE_IP, UNDERLAY_GATEWAY,
    add_veth, attached_programs, bpf::DummyProg, netns::list_namespaces, require_root,
    traffic::tcp_transfer_to, tshark_fields,
};

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    list_namespaces()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn cluster_underlay_etcd_pods_and_traffic() {
    let cluster = Cluster::builder()
        .nodes(2)
        .outside(true)
        .build()
        .expect("build cluster");
    let prefix = format!("{}-", cluster.id());
    let names = namespaces_with_prefix(&prefix);
    assert_eq!(names.len(), 4, "ul, out, n0, n1: {names:?}");

    let (n0, n1) = (cluster.node(0), cluster.node(1));
    assert_eq!(n0.underlay_ip(), Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(n1.underlay_ip(), Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(n0.ns().mtu("eth0").unwrap(), 1500);
    assert_eq!(n0.ns().sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    let route = n0.ns().ip(&["route", "show", "default"]).unwrap();
    assert!(route.contains("via 198.18.0.254 dev eth0"), "{route}");

    // Underlay: node <-> node, node -> gateway, node -> outside (routed by the underlay ns).
    let r = n0.ping(n1.underlay_ip(), 3).unwrap();
    assert!(r.all_received(), "{}", r.output);
    assert!(n1.ping(UNDERLAY_GATEWAY, 1).unwrap().all_received());
    assert!(n0.ping(OUTSIDE_IP, 2).unwrap().all_received());
    assert!(
        cluster
            .outside()
            .ping(n1.underlay_ip(), 1)
            .unwrap()
            .all_received()
    );
    // Nothing answers for an address nobody has; that is a report, not an error.
    let lost = n0.ping(Ipv4Addr::new(198, 18, 0, 99), 1).unwrap();
    assert!(!lost.any_received());

    // etcd from the harness and from inside a node namespace (where agents run).
    let etcd = cluster.etcd();
    assert_eq!(etcd.endpoint(), "http://198.18.0.254:2379");
    etcd.put("/ovl-test/a", "from-harness").unwrap();
    let ep = format!("--endpoints={}", n0.etcd_endpoint());
    n0.ns()
        .run("etcdctl", &[ep.as_str(), "put", "/ovl-test/b", "from-node"])
        .unwrap();
    assert_eq!(
        etcd.get("/ovl-test/b").unwrap().as_deref(),
        Some("from-node")
    );
    let got = n1
        .ns()
        .run(
            "etcdctl",
            &[ep.as_str(), "get", "--print-value-only", "/ovl-test/a"],
        )
        .unwrap();
    assert_eq!(got.trim(), "from-harness");
    let kvs = etcd.get_prefix("/ovl-test/").unwrap();
    assert_eq!(
        kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["/ovl-test/a", "/ovl-test/b"]
    );
    assert_eq!(etcd.del("/ovl-test/a").unwrap(), 1);
    assert_eq!(etcd.get("/ovl-test/a").unwrap(), None);
    let cfg = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
    cluster.put_network_config(cfg).unwrap();
    assert_eq!(
        etcd.get("/coreos.com/network/config").unwrap().as_deref(),
        Some(cfg)
    );

    // Pods with an explicit subnet (no agent, no subnet.env).
    let gw = "172.17.5.1/24".parse().unwrap();
    let a = n0.add_pod_in("a", gw, 1450).unwrap();
    let b = n0.add_pod_in("b", gw, 1450).unwrap();
    assert_eq!(a.ip(), Ipv4Addr::new(172, 17, 5, 2));
    assert_eq!(b.ip(), Ipv4Addr::new(172, 17, 5, 3));
    assert_eq!(a.gateway(), Ipv4Addr::new(172, 17, 5, 1));
    assert_eq!(a.ns().mtu("eth0").unwrap(), 1450);
    assert_eq!(n0.ns().mtu("cni0").unwrap(), 1450);
    assert_eq!(n0.ns().mtu(a.host_veth()).unwrap(), 1450);
    assert!(
        n0.add_pod_in("c", "172.17.6.1/24".parse().unwrap(), 1450)
            .is_err(),
        "other gateway on the same bridge"
    );
    assert!(n0.add_pod_in("a", gw, 1450).is_err(), "duplicate pod name");
    assert_eq!(cluster.pod(0, 1).ip(), b.ip());
    assert!(n0.try_subnet_env().unwrap().is_none());

    let r = a.ping(a.gateway(), 2).unwrap();
    assert!(r.all_received(), "{}", r.output);
    a.ping_until(b.ip(), Duration::from_secs(5)).unwrap();

    let t = a.tcp_transfer(&b, 4 << 20).unwrap();
    assert_eq!(t.bytes, 4 << 20);
    assert_eq!(
        t.server_peer.ip(),
        IpAddr::V4(a.ip()),
        "same bridge: no NAT"
    );
    assert_eq!(t.server_peer, t.client_local);
    // Towards the node's bridge address (node namespace as server).
    let t = b.tcp_transfer(n0, 100_000).unwrap();
    assert_eq!(t.server_peer.ip(), IpAddr::V4(b.ip()));

    let u = b.udp_echo(&a, 20).unwrap();
    assert_eq!((u.sent, u.received, u.bad), (20, 20, 0), "{u:?}");
    assert_eq!(u.server_peers, vec![u.client_local]);

    // A pod on the other node has no route towards it without an agent: transfers fail
    // cleanly (bounded), UDP reports losses.
    let c = n1
        .add_pod_in("c", "172.17.9.1/24".parse().unwrap(), 1450)
        .unwrap();
    let err = tcp_transfer_to(&c, &a, a.ip(), 1000, Duration::from_secs(1)).unwrap_err();
    assert!(format!("{err:#}").contains("TCP n1/c -> n0/a"), "{err:#}");
    let u = c.udp_echo(&a, 1).unwrap();
    assert_eq!(u.received, 0);

    // Captures: a kernel VXLAN link between the nodes (as a stock flannel node builds it),
    // captured on the underlay and decoded as VXLAN by tshark.
    for (n, me, peer) in [(n0, 1, n1.underlay_ip()), (n1, 2, n0.underlay_ip())] {
        let remote = peer.to_string();
        n.ns()
            .ip(&[
                "link", "add", "vx0", "type", "vxlan", "id", "7", "remote", &remote, "dstport",
                "8472", "dev", "eth0",
            ])
            .unwrap();
        n.ns()
            .add_addr("vx0", &format!("172.31.0.{me}/24"))
            .unwrap();
        n.ns().link_up("vx0").unwrap();
    }
    let cap = Capture::start(
        n0.ns(),
        "eth0",
        "udp port 8472",
        cluster.dir().join("vx.pcap"),
    )
    .unwrap();
    assert!(
        n0.ping(Ipv4Addr::new(172, 31, 0, 2), 2)
            .unwrap()
            .all_received()
    );
    let pcap = cap.stop().unwrap();
    let rows = tshark_fields(
        &pcap,
        "vxlan && icmp.type == 8",
        &["ip.src", "ip.dst", "vxlan.vni"],
    )
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0],
        ["198.18.0.1,172.31.0.1", "198.18.0.2,172.31.0.2", "7"]
    );

    drop(cluster);
    assert_eq!(
        namespaces_with_prefix(&prefix),
        Vec::<String>::new(),
        "namespaces left after drop"
    );
    // Handles that outlive the cluster point to deleted namespaces.
    assert!(a.ping(b.ip(), 1).is_err() || !a.ping(b.ip(), 1).unwrap().any_received());
}

#[test]
fn cluster_is_removed_when_the_test_panics() {
    let mut prefix = String::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::builder().nodes(1).build().unwrap();
        prefix = format!("{}-", cluster.id());
        let node = cluster.node(0);
        // A stand-in "agent" so that the log printing path runs during the unwind.
        let log = node.dir().join("fake-agent.log");
        let _agent = AgentProcess::spawn(
            node.ns(),
            Path::new("/bin/sh"),
            &[
                "-c".to_owned(),
                "echo fake agent up; exec sleep 30".to_owned(),
            ],
            log,
            "fake",
        )
        .unwrap();
        panic!("deliberate panic with a live cluster");
    }));
    assert!(res.is_err());
    assert!(!prefix.is_empty());
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
}

#[test]
fn leftovers_of_dead_runs_are_removed_and_live_ones_kept() {
    require_root();
    // A pid that has just exited stands for a crashed run.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead}")).exists());

    let dead_ns = NetNs::new(format!("ovl-{dead}-0-left")).unwrap();
    let mut inside = dead_ns.spawn("sleep", &["30"]).unwrap();
    let dead_dir = std::env::temp_dir().join(format!("ovl-{dead}-0-leftdir"));
    std::fs::create_dir_all(dead_dir.join("sub")).unwrap();
    let live_ns = NetNs::new(format!("{}-left-live", overlay_tests::unique_id())).unwrap();

    let removed = overlay_tests::cleanup_leftovers().unwrap();
    assert!(removed.contains(&dead_ns.name().to_owned()), "{removed:?}");
    assert!(!dead_dir.exists());
    let all = list_namespaces().unwrap();
    assert!(!all.contains(&dead_ns.name().to_owned()));
    assert!(
        all.contains(&live_ns.name().to_owned()),
        "a live run's namespace was removed"
    );
    // The process inside the leftover namespace was killed.
    let status = inside
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("process in leftover ns survived");
    assert!(!status.success());
    // Dropping the guard of an already removed namespace is fine.
    drop(dead_ns);
    drop(live_ns);
}

#[test]
fn etcd_local_server_helpers() {
    require_root();
    let etcd = EtcdServer::start_local().unwrap();
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    assert!(etcd.namespace().is_none());
    etcd.put("/p/x", "-starts with a dash\nand has two lines")
        .unwrap();
    assert_eq!(
        etcd.get("/p/x").unwrap().as_deref(),
        Some("-starts with a dash\nand has two lines")
    );
    let id = etcd.put_with_ttl("/p/leased", "v", 60).unwrap();
    let kv = etcd.get_kv("/p/leased").unwrap().unwrap();
    assert_eq!(kv.lease, id);
    let ttl = etcd.lease_ttl(id).unwrap();
    assert!(ttl.ttl > 50 && ttl.granted_ttl == 60, "{ttl:?}");
    etcd.lease_revoke(id).unwrap();
    assert_eq!(etcd.get("/p/leased").unwrap(), None);
    assert_eq!(etcd.lease_ttl(id).unwrap().ttl, -1);
    etcd.put_network_config(None, "{}").unwrap();
    assert_eq!(
        etcd.get("/coreos.com/network/config").unwrap().as_deref(),
        Some("{}")
    );
    assert_eq!(etcd.del_prefix("/").unwrap(), 2);
    assert!(etcd.get_prefix("/").unwrap().is_empty());

    let data = etcd.log_path().parent().unwrap().to_owned();
    assert!(data.join("data").exists());
    drop(etcd);
    assert!(!data.exists(), "etcd data dir left after drop");
}

#[test]
fn agent_process_guard_with_a_stand_in() {
    require_root();
    let ns = NetNs::new(format!("{}-agent", overlay_tests::unique_id())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = "echo \"up in $(ip -o link show lo | cut -d: -f2)\"; \
                  trap 'echo got TERM; exit 3' TERM; while :; do sleep 0.05; done";
    let args = ["-c".to_owned(), script.to_owned()];
    let agent = AgentProcess::spawn(
        &ns,
        Path::new("/bin/sh"),
        &args,
        dir.path().join("a.log"),
        "stand-in",
    )
    .unwrap();
    agent.wait_for_log("up in", Duration::from_secs(5)).unwrap();
    assert!(agent.is_running());
    let err = agent
        .wait_for_log("never printed", Duration::from_millis(300))
        .unwrap_err();
    assert!(format!("{err:#}").contains("did not log"), "{err:#}");
    let status = agent.kill().unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(agent.log().contains("got TERM"));
    assert!(!agent.is_running());

    // SIGKILL, and a process that exits by itself.
    let agent = AgentProcess::spawn(
        &ns,
        Path::new("/bin/sh"),
        &args,
        dir.path().join("b.log"),
        "stand-in-2",
    )
    .unwrap();
    agent.wait_for_log("up in", Duration::from_secs(5)).unwrap();
    let status = agent.kill9().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let quick = ["-c".to_owned(), "echo bad flag >&2; exit 2".to_owned()];
    let agent = AgentProcess::spawn(
        &ns,
        Path::new("/bin/sh"),
        &quick,
        dir.path().join("c.log"),
        "quick",
    )
    .unwrap();
    assert_eq!(
        agent.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(2)
    );
    let err = agent
        .wait_for_log("ready", Duration::from_secs(5))
        .unwrap_err();
    assert!(format!("{err:#}").contains("exited"), "{err:#}");
    assert!(agent.log().contains("bad flag"));
}

#[test]
fn bpf_attached_programs_are_listed() {
    require_root();
    let ns = NetNs::new(format!("{}-bpf", overlay_tests::unique_id())).unwrap();
    add_veth(&ns, "va", &ns, "vb").unwrap();
    ns.link_up("va").unwrap();
    ns.link_up("vb").unwrap();
    assert!(attached_programs(&ns, "va").unwrap().is_empty());
    assert!(attached_programs(&ns, "nosuchdev").is_err());

    let ing = DummyProg::attach(&ns, "va", AttachKind::TcxIngress).unwrap();
    let eg = DummyProg::attach(&ns, "va", AttachKind::TcxEgress).unwrap();
    let xdp = DummyProg::attach(&ns, "va", AttachKind::Xdp).unwrap();
    // A classic-BPF TC filter (no program id) through the clsact qdisc.
    ns.run("tc", &["qdisc", "add", "dev", "va", "clsact"])
        .unwrap();
    ns.run(
        "tc",
        &[
            "filter",
            "add",
            "dev",
            "va",
            "egress",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
        ],
    )
    .unwrap();

    let progs = attached_programs(&ns, "va").unwrap();
    let find = |kind| progs.iter().filter(|p| p.kind == kind).collect::<Vec<_>>();
    let tcx_in = find(AttachKind::TcxIngress);
    assert_eq!(tcx_in.len(), 1, "{progs:?}");
    assert_eq!(
        (tcx_in[0].prog_id, tcx_in[0].name.as_str()),
        (Some(ing.prog_id()), DummyProg::NAME)
    );
    assert_eq!(find(AttachKind::TcxEgress)[0].prog_id, Some(eg.prog_id()));
    let x = find(AttachKind::Xdp);
    assert_eq!(
        (x[0].prog_id, x[0].name.as_str()),
        (Some(xdp.prog_id()), DummyProg::NAME),
        "{progs:?}"
    );
    assert_eq!(x[0].xdp_mode.as_deref(), Some("driver"));
    let tc = find(AttachKind::TcEgress);
    assert_eq!((tc.len(), tc[0].prog_id), (1, None), "{progs:?}");
    // The peer and other namespaces see nothing.
    assert!(attached_programs(&ns, "vb").unwrap().is_empty());

    drop((ing, eg, xdp));
    let progs = attached_programs(&ns, "va").unwrap();
    assert_eq!(
        progs.iter().map(|p| p.kind).collect::<Vec<_>>(),
        [AttachKind::TcEgress],
        "{progs:?}"
    );
}

#[test]
fn binaries_are_located_or_explained() {
    // ovl-xfer is built by cargo for this package's integration tests.
    assert!(overlay_tests::xfer_bin().unwrap().is_file());
    // The agent may not be built yet; then the error says how to build it.
    match overlay_tests::agent_bin() {
        Ok(p) => assert!(p.is_file()),
        Err(e) => assert!(
            format!("{e:#}").contains("cargo build -p overlay-agent"),
            "{e:#}"
        ),
    }
}
