//! Operations end to end: the real agent in namespace clusters against a real etcd.
//! `/metrics` during traffic, drop events in `monitor`, `status -o json` against the kernel,
//! repairs after `ovl0` or an underlay link is deleted by hand, `/readyz` following etcd, a
//! distribution's flanneld command line, systemd's notify protocol, pinned maps of another
//! layout.
//!
//! Root only; run one at a time:
//! `cargo test -p overlay-tests --test operations -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use overlay_common::counters::Reason;
use overlay_common::names;
use overlay_common::nat::{SNAT_V4_CAPACITY, SNAT_V4_NEW_CAPACITY};
use overlay_tests::{
    AgentProcess, AttachKind, ChildGuard, Cluster, DEFAULT_ETCD_PREFIX, Node, UNDERLAY_GATEWAY,
    agent_bin,
    checks::{
        agent_cmd, assert_host_reaches, assert_no_ping, assert_pods_talk, counters, eth0_programs,
        grown, http_get, programs_on, subnet_of, wait_until,
    },
};
use serde_json::Value;

const VXLAN_CONFIG: &str = r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const HEALTHZ_PORT: u16 = 8471;
/// Generous bound for an agent to start, reach etcd and attach.
const START: Duration = Duration::from_secs(30);
/// Repairs must happen "within seconds".
const REPAIR: Duration = Duration::from_secs(5);

// ----- helpers -----------------------------------------------------------------------------

fn healthz_addr(node: &Node) -> SocketAddr {
    SocketAddr::new(node.underlay_ip().into(), HEALTHZ_PORT)
}

/// `GET path` on the node's health port, from the node's own namespace.
fn get(node: &Node, path: &str) -> (u16, String) {
    http_get(node.ns(), healthz_addr(node), path)
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e:#}", node.name()))
}

/// The samples of a Prometheus text page: `name{labels}` → value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sample(page: &BTreeMap<String, f64>, name: &str) -> f64 {
    *page
        .get(name)
        .unwrap_or_else(|| panic!("/metrics lacks {name}; it has {:?}", page.keys()))
}

fn scrape(node: &Node) -> BTreeMap<String, f64> {
    let (status, body) = get(node, "/metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    samples(&body)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// A VXLAN payload (VXLAN header, inner Ethernet, IPv4, UDP) carrying `data` from
/// `src:40000` to `dst:port`.
fn vxlan_payload(vni: u32, src: Ipv4Addr, dst: Ipv4Addr, port: u16, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&[0x0e, 0, 0, 0, 0, 1, 0x0e, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let total = u16::try_from(20 + 8 + data.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let csum = !u16::try_from((sum & 0xffff) + (sum >> 16)).unwrap();
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(data);
    f
}

/// A cluster whose agents the test starts itself.
fn cluster_without_agents(nodes: usize) -> Cluster {
    Cluster::builder()
        .nodes(nodes)
        .start_agents(false)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap()
}

fn cluster(nodes: usize, pods: usize, args: &[&str]) -> Cluster {
    Cluster::builder()
        .nodes(nodes)
        .pods_per_node(pods)
        .network_config(VXLAN_CONFIG)
        .agent_args(args)
        .build()
        .unwrap()
}

// ----- /metrics ----------------------------------------------------------------------------

/// `/metrics` scraped around traffic: the per-reason counters move with it (packets and bytes),
/// the NAT gauge rises with masqueraded flows and falls when they expire, and the gauges say
/// what the node is: one VXLAN peer, both underlay programs attached, etcd reachable, a lease
/// that expires in the future, the build.
#[test]
fn metrics_move_with_traffic_and_the_nat_gauge_follows_flows() {
    let port = HEALTHZ_PORT.to_string();
    let cluster = Cluster::builder()
        .nodes(2)
        .pods_per_node(1)
        .outside(true)
        .network_config(VXLAN_CONFIG)
        .agent_args(&[
            "--ip-masq",
            "--dev-nat-timeout",
            "2",
            "--healthz-port",
            &port,
        ])
        .build()
        .unwrap();
    let (n0, a, b) = (cluster.node(0), cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);

    let before = scrape(n0);
    let encap = r#"overlay_packets_total{reason="encap_pod"}"#;
    let encap_bytes = r#"overlay_bytes_total{reason="encap_pod"}"#;
    let t = a.tcp_transfer(&b, 4 << 20).unwrap();
    assert_eq!(t.bytes, 4 << 20);
    let after = scrape(n0);
    let packets = sample(&after, encap) - sample(&before, encap);
    let bytes = sample(&after, encap_bytes) - sample(&before, encap_bytes);
    assert!(
        packets >= 50.0 && bytes >= f64::from(4u32 << 20),
        "4 MiB to the remote pod: encap_pod grew by {packets} packets, {bytes} bytes"
    );
    assert_eq!(
        sample(&after, r#"overlay_peers{mode="vxlan"}"#),
        1.0,
        "one peer through VXLAN"
    );
    assert_eq!(
        sample(&after, r#"overlay_programs_attached{device="eth0"}"#),
        2.0
    );
    assert_eq!(
        sample(&after, r#"overlay_programs_attached{device="ovl0"}"#),
        1.0
    );
    assert_eq!(sample(&after, "overlay_etcd_reachable"), 1.0);
    assert_eq!(sample(&after, "overlay_ready"), 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = sample(&after, "overlay_lease_expiry_timestamp_seconds");
    assert!(
        expiry > now + 23.0 * 3600.0 && expiry < now + 24.0 * 3600.0 + 60.0,
        "flannel's 24 h lease: expiry {expiry}, now {now}"
    );
    assert_eq!(
        sample(&after, "overlay_nat_capacity"),
        f64::from(SNAT_V4_CAPACITY)
    );
    assert_eq!(
        sample(&after, "overlay_nat_unassured_capacity"),
        f64::from(SNAT_V4_NEW_CAPACITY)
    );
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("overlay_build_info{") && k.contains("object_sha256=\"")),
        "build info: {:?}",
        after.keys()
    );
    assert_eq!(
        after
            .keys()
            .filter(|k| k.starts_with("overlay_packets_total{"))
            .count(),
        Reason::ALL.len(),
        "every counter reason"
    );

    // Masqueraded flows: the gauges follow them up, and down as they expire (2 s idle). One
    // datagram answered once is not assured; a flow that goes on after its answer is.
    let (nat, unassured) = ("overlay_nat_entries", "overlay_nat_unassured_entries");
    assert_eq!(sample(&after, nat), 0.0, "no masqueraded flow yet");
    assert_eq!(sample(&after, unassured), 0.0);
    for _ in 0..3 {
        assert_eq!(a.udp_echo(cluster.outside(), 1).unwrap().received, 1);
    }
    assert_eq!(a.udp_echo(cluster.outside(), 3).unwrap().received, 3);
    let busy = scrape(n0);
    assert!(
        sample(&busy, unassured) >= 3.0 && sample(&busy, nat) >= 1.0,
        "three one-shot UDP flows, one assured: {} and {}",
        sample(&busy, unassured),
        sample(&busy, nat)
    );
    let snat = r#"overlay_packets_total{reason="nat_snat"}"#;
    assert!(sample(&busy, snat) >= 6.0);
    wait_until("the NAT gauges back to 0", Duration::from_secs(15), || {
        let now = scrape(n0);
        sample(&now, nat) == 0.0 && sample(&now, unassured) == 0.0
    });
}

// ----- monitor -----------------------------------------------------------------------------

/// A VXLAN frame from a host on the underlay that is no member (the underlay gateway
/// 198.18.0.254) shows up in `monitor --type drop` with its reason, the device, the outer
/// addresses and VNI, and the inner 5-tuple: which source is being dropped.
#[test]
fn monitor_shows_a_drop_event_for_a_frame_from_a_non_member() {
    let cluster = cluster(2, 1, &[]);
    let n0 = cluster.node(0);
    assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));
    let target = cluster.pod(0, 0).ip();

    let dir = n0.bpf_dir().display().to_string();
    let mut monitor = n0.ns().command(agent_bin().unwrap());
    monitor
        .args(["monitor", "--type", "drop", "-o", "json", "--count", "1"])
        .args(["--timeout", "20", "--bpf-dir", &dir])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut monitor = ChildGuard::spawn(monitor).unwrap();
    // It prints one line to stderr once it reads the ring.
    let mut stderr = monitor.child_mut().stderr.take().unwrap();
    let mut first = [0u8; 8];
    stderr.read_exact(&mut first).unwrap();

    let payload = vxlan_payload(1, Ipv4Addr::new(172, 17, 99, 2), target, 7777, b"stranger");
    cluster
        .underlay()
        .in_netns(move || {
            let sock = UdpSocket::bind((UNDERLAY_GATEWAY, 0))?;
            for _ in 0..10 {
                sock.send_to(&payload, (Ipv4Addr::new(198, 18, 0, 1), 8472))?;
                thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
        .unwrap();
    let status = monitor.wait_timeout(Duration::from_secs(25)).unwrap();
    let mut out = String::new();
    monitor
        .child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "monitor must stop after one event: {status:?}, output {out:?}"
    );
    let event = json(out.lines().next().unwrap_or_default());
    assert_eq!(event["type"], "drop");
    assert_eq!(event["reason"], "drop_unknown_peer", "{event}");
    assert_eq!(event["device"], "eth0", "{event}");
    assert_eq!(event["outer_src"], "198.18.0.254", "{event}");
    assert_eq!(event["outer_dst"], "198.18.0.1", "{event}");
    assert_eq!(event["vni"], 1, "{event}");
    assert_eq!(event["proto"], "udp", "{event}");
    assert_eq!(event["src"], "172.17.99.2:40000", "{event}");
    assert_eq!(event["dst"], format!("{target}:7777"), "{event}");
}

// ----- status ------------------------------------------------------------------------------

/// `status -o json` parses and says what the kernel says: the programs on eth0, ovl0 and the
/// pod bridge (asked of the kernel with bpftool), the interface indexes (`ip link`), the peer
/// and its mode, the lease from the subnet file; `counters`, `peers`, `nat -o json` parse too.
#[test]
fn status_json_parses_and_matches_the_kernel() {
    let cluster = cluster(2, 1, &[]);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    assert_pods_talk(&cluster.pod(0, 0), &cluster.pod(1, 0));
    // The status file is rewritten every second; the bridge is found within one.
    thread::sleep(Duration::from_millis(1500));

    let s = json(&agent_cmd(n0, &["status", "-o", "json"]));
    assert_eq!(s["agent_running"], true, "{s:#}");
    assert_eq!(s["agent"]["ready"], true, "{s:#}");
    assert_eq!(s["agent"]["etcd"]["reachable"], true, "{s:#}");
    assert_eq!(s["agent"]["lease"]["subnet"], subnet_of(n0).to_string());
    assert!(s["agent"]["lease"]["expires_at_unix"].as_f64().unwrap() > 0.0);
    assert_eq!(s["agent"]["pid"], agent_of_pid(n0));
    assert_eq!(s["bridge"], "cni0");

    let links = json(&n0.ns().run("ip", &["-j", "link", "show"]).unwrap());
    let ifindex = |name: &str| {
        links
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifname"] == name)
            .and_then(|l| l["ifindex"].as_u64())
            .unwrap_or_else(|| panic!("{name} not in ip link"))
    };
    let interfaces = s["interfaces"].as_array().unwrap();
    for (name, role) in [
        ("eth0", "underlay"),
        ("ovl0", "host"),
        ("cni0", "bridge"),
        ("ovl-gro", "gro"),
    ] {
        let i = interfaces
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("status lacks {name}: {s:#}"));
        assert_eq!(i["role"], role);
        assert_eq!(i["ifindex"].as_u64(), Some(ifindex(name)), "{name}");
        let mut reported: Vec<(String, String)> = i["programs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["attach"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        reported.sort();
        let kernel: Vec<(String, String)> = programs_on(n0, name)
            .into_iter()
            .map(|(n, k)| (n, k.to_string()))
            .collect();
        assert_eq!(reported, kernel, "{name}: status against bpftool");
    }
    assert_eq!(
        eth0_programs(n0),
        [
            (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
            (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
        ]
    );

    let peers = s["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{s:#}");
    assert_eq!(peers[0]["subnet"], subnet_of(n1).to_string());
    assert_eq!(peers[0]["public_ip"], n1.underlay_ip().to_string());
    assert_eq!(peers[0]["mode"], "vxlan");
    assert_eq!(s["modes"]["vxlan"], 1);
    // The route map as the kernel holds it: one entry.
    let dump = n0
        .ns()
        .run(
            "bpftool",
            &[
                "-j",
                "map",
                "dump",
                "pinned",
                &n0.bpf_dir().join("maps/ROUTE_V4").display().to_string(),
            ],
        )
        .unwrap();
    assert_eq!(json(&dump).as_array().unwrap().len(), 1, "{dump}");
    assert_eq!(s["nat"]["entries"], 0);
    assert_eq!(s["nat"]["capacity"], SNAT_V4_CAPACITY);
    assert_eq!(
        (
            &s["nat"]["unassured_entries"],
            &s["nat"]["unassured_capacity"]
        ),
        (&Value::from(0), &Value::from(SNAT_V4_NEW_CAPACITY))
    );

    let counters = json(&agent_cmd(n0, &["counters", "-o", "json"]));
    assert_eq!(counters.as_array().unwrap().len(), Reason::ALL.len());
    let encap = counters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["reason"] == "encap_pod")
        .unwrap();
    assert!(encap["packets"].as_u64().unwrap() > 0, "{encap}");
    assert_eq!(json(&agent_cmd(n0, &["peers", "-o", "json"])), s["peers"]);
    assert_eq!(json(&agent_cmd(n0, &["nat", "-o", "json"]))["entries"], 0);

    // The text form says the same in lines for people.
    let text = agent_cmd(n0, &["status"]);
    assert!(text.contains("ready:      yes"), "{text}");
    assert!(text.contains("interface:  eth0 [underlay]"), "{text}");

    // With the agent gone, status still shows the pinned data path, and says the agent is not
    // running.
    overlay_tests::checks::agent_of(n0).kill().unwrap();
    thread::sleep(Duration::from_millis(200));
    let s = json(&agent_cmd(n0, &["status", "-o", "json"]));
    assert_eq!(s["agent_running"], false, "{s:#}");
    assert_eq!(s["peers"].as_array().unwrap().len(), 1);

    // The pins of an older agent: an assured table of another capacity, no unassured table.
    // `nat` and `status` report the tables that are pinned, not this build's.
    let maps = n0.bpf_dir().join("maps");
    for name in [names::SNAT_V4_CT, names::SNAT_V4_CT_NEW] {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    overlay_tests::checks::pin_older_flow_table(n0, names::SNAT_V4_CT, 4096);
    let nat = agent_cmd(n0, &["nat"]);
    assert_eq!(
        nat.lines().last(),
        Some("entries 0 capacity 4096 unassured 0 capacity 0"),
        "{nat}"
    );
    let s = json(&agent_cmd(n0, &["status", "-o", "json"]));
    assert_eq!(
        (&s["nat"]["capacity"], &s["nat"]["unassured_capacity"]),
        (&Value::from(4096), &Value::from(0)),
        "{s:#}"
    );
}

fn agent_of_pid(node: &Node) -> u32 {
    overlay_tests::checks::agent_of(node).pid()
}

// ----- repairs -----------------------------------------------------------------------------

/// Deleting `ovl0` by hand, and detaching the underlay's ingress link by hand (`bpftool link
/// detach`, which emits no netlink event), are both repaired within seconds, and traffic
/// resumes: the host reaches the remote pod through the new `ovl0`, pods reach each other
/// through the re-attached programs.
#[test]
fn deleted_ovl0_and_a_detached_underlay_link_are_repaired_and_traffic_resumes() {
    let cluster = cluster(2, 1, &[]);
    let (n0, a, b) = (cluster.node(0), cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
    assert_host_reaches(n0, &b);
    let agent = overlay_tests::checks::agent_of(n0);

    let old = n0.ns().run("ip", &["-j", "link", "show", "ovl0"]).unwrap();
    n0.ns().ip(&["link", "del", "ovl0"]).unwrap();
    wait_until("ovl0 recreated with host_egress", REPAIR, || {
        n0.ns().run("ip", &["-j", "link", "show", "ovl0"]).is_ok()
            && programs_on(n0, "ovl0") == [(names::HOST_EGRESS.to_owned(), AttachKind::TcxEgress)]
    });
    let new = n0.ns().run("ip", &["-j", "link", "show", "ovl0"]).unwrap();
    assert_ne!(
        json(&old)[0]["ifindex"],
        json(&new)[0]["ifindex"],
        "a new device"
    );
    assert_host_reaches(n0, &b);
    agent
        .wait_for_log("data path repaired", Duration::from_secs(1))
        .unwrap();

    // Detach the pinned ingress link: the device stays, only the program goes.
    let pin = n0.bpf_dir().join("links/underlay_ingress");
    let link = json(
        &n0.ns()
            .run(
                "bpftool",
                &["-j", "link", "show", "pinned", &pin.display().to_string()],
            )
            .unwrap(),
    );
    let id = link["id"].as_u64().unwrap().to_string();
    n0.ns()
        .run("bpftool", &["link", "detach", "id", &id])
        .unwrap();
    wait_until("underlay_ingress re-attached to eth0", REPAIR, || {
        eth0_programs(n0)
            == [
                (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
                (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
            ]
    });
    assert_pods_talk(&a, &b);
    let s = json(&agent_cmd(n0, &["status", "-o", "json"]));
    assert!(s["agent"]["repairs"].as_u64().unwrap() >= 2, "{s:#}");
    assert!(agent.is_running());
}

/// The external interface deleted: `/readyz` says 503 naming the detached programs and the
/// device, for as long as it is gone; re-created (a new interface index), the agent hears the
/// link event, attaches to it again, `/readyz` is 200 and pods talk again.
#[test]
fn a_deleted_external_interface_is_not_ready_and_its_recreation_is_repaired() {
    let port = HEALTHZ_PORT.to_string();
    let cluster = cluster(2, 1, &["--healthz-port", &port]);
    let (n0, a, b) = (cluster.node(0), cluster.pod(0, 0), cluster.pod(1, 0));
    assert_pods_talk(&a, &b);
    // Over the node's loopback: eth0 is about to go.
    let local = SocketAddr::from(([127, 0, 0, 1], HEALTHZ_PORT));
    let readyz = || http_get(n0.ns(), local, "/readyz").unwrap();
    wait_until("/readyz 200", START, || readyz().0 == 200);

    cluster.remove_underlay_link(0).unwrap();
    wait_until("/readyz 503 without eth0", REPAIR, || readyz().0 == 503);
    let (_, body) = readyz();
    assert!(
        body.contains("data path detached") && body.contains("underlay_ingress on eth0"),
        "{body}"
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(readyz().0, 503, "not ready for as long as eth0 is gone");

    cluster.restore_underlay_link(0).unwrap();
    wait_until("/readyz 200 with eth0 back", REPAIR, || readyz().0 == 200);
    assert_eq!(
        eth0_programs(n0),
        [
            (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
            (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
        ]
    );
    assert_pods_talk(&a, &b);
}

// ----- readiness ---------------------------------------------------------------------------

/// `/readyz` turns 503 with the reason when etcd has been unreachable for longer than
/// `--health-etcd-timeout`, and back to 200 when etcd returns; `/healthz` stays 200 and the
/// agent keeps running (and keeps forwarding) meanwhile.
#[test]
fn readyz_turns_503_while_etcd_is_down_and_200_when_it_returns() {
    let port = HEALTHZ_PORT.to_string();
    let cluster = cluster(
        2,
        1,
        &["--healthz-port", &port, "--health-etcd-timeout", "2"],
    );
    let n0 = cluster.node(0);
    let (a, b) = (cluster.pod(0, 0), cluster.pod(1, 0));
    wait_until("/readyz 200", START, || {
        http_get(n0.ns(), healthz_addr(n0), "/readyz").is_ok_and(|(s, _)| s == 200)
    });

    cluster.etcd().stop();
    wait_until(
        "/readyz 503 with etcd stopped",
        Duration::from_secs(15),
        || get(n0, "/readyz").0 == 503,
    );
    let (_, body) = get(n0, "/readyz");
    assert!(body.contains("etcd unreachable"), "{body}");
    assert_eq!(get(n0, "/healthz").0, 200);
    assert_eq!(sample(&scrape(n0), "overlay_etcd_reachable"), 0.0);
    // The data path does not need etcd to forward.
    assert_pods_talk(&a, &b);

    cluster.etcd().restart().unwrap();
    wait_until(
        "/readyz 200 with etcd back",
        Duration::from_secs(20),
        || get(n0, "/readyz").0 == 200,
    );
    assert_eq!(sample(&scrape(n0), "overlay_etcd_reachable"), 1.0);
    assert!(overlay_tests::checks::agent_of(n0).is_running());
}

/// With etcd's authentication on (`--etcd-username`, `--etcd-password`), etcd keeps its tokens
/// in memory, so a restart of etcd invalidates the agent's. Like flanneld's client, the agent
/// logs in again: `/readyz` returns to 200, its lease is renewed (`--dev-lease-ttl 20`: every
/// 10 s), and a node that joins after the restart is learnt through the watch, opened again,
/// and reached.
#[test]
fn an_etcd_restart_with_authentication_on_is_logged_into_again() {
    let port = HEALTHZ_PORT.to_string();
    let cluster = cluster_without_agents(3);
    cluster.etcd().enable_auth("ovl-secret").unwrap();
    let args = [
        "--etcd-username",
        "root",
        "--etcd-password",
        "ovl-secret",
        "--healthz-port",
        &port,
        "--health-etcd-timeout",
        "2",
        "--dev-lease-ttl",
        "20",
    ];
    let (n0, n1, n2) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let ready = |node: &Node| {
        wait_until(&format!("{}'s /readyz 200", node.name()), START, || {
            http_get(node.ns(), healthz_addr(node), "/readyz").is_ok_and(|(s, _)| s == 200)
        });
        node.add_pod("p0").unwrap()
    };
    for node in [n0, n1] {
        node.start_agent(&args).unwrap();
    }
    let (a, b) = (ready(n0), ready(n1));
    assert_pods_talk(&a, &b);
    let subnet = subnet_of(n0);
    let key = format!(
        "{DEFAULT_ETCD_PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    );
    let lease = || cluster.etcd().get_kv(&key).unwrap().map(|kv| kv.lease);
    let before = lease();

    cluster.etcd().stop();
    cluster.etcd().restart().unwrap();
    wait_until(
        "n0's lease renewed after etcd's restart",
        Duration::from_secs(30),
        || lease().is_some_and(|l| Some(l) != before),
    );
    // Longer than --health-etcd-timeout: a refused probe would have turned it 503 by now.
    thread::sleep(Duration::from_secs(3));
    let (status, body) = get(n0, "/readyz");
    assert_eq!(status, 200, "{body}");
    n2.start_agent(&args).unwrap();
    let c = ready(n2);
    assert_pods_talk(&a, &c);
}

// ----- drop-in: a distribution's flanneld command line, systemd ----------------------------

/// The command line of a typical distribution flanneld unit starts the agent as it is: TLS
/// files relative to the working directory, Go's single-dash flags, klog's `-logtostderr` and
/// `--v=2`, `--healthz-port`, the subnet file under /run/flannel (a private tmpfs /run here,
/// so the machine's /run is untouched) and the default `--bpf-dir` /sys/fs/bpf/overlay: the
/// node's own bpffs is bound there, as systemd's /sys/fs/bpf would be on a host (the agent
/// refuses a bpffs that would die with its mount namespace), so the pins outlive the agent.
#[test]
fn a_distribution_flanneld_command_line_starts_the_agent() {
    let cluster = Cluster::builder()
        .nodes(2)
        .etcd_tls(true)
        .start_agents(false)
        .network_config(VXLAN_CONFIG)
        .build()
        .unwrap();
    let n0 = cluster.node(0);
    let tls = n0.etcd_tls().unwrap().clone();
    let work = n0.dir().join("flanneld-cwd");
    std::fs::create_dir_all(&work).unwrap();
    for (from, to) in [
        (&tls.ca, "ca.pem"),
        (&tls.client_cert, "client.pem"),
        (&tls.client_key, "client-key.pem"),
    ] {
        std::fs::copy(from, work.join(to)).unwrap();
    }
    let line = "-etcd-endpoints=https://198.18.0.254:2379 -etcd-prefix=/coreos.com/network \
                -etcd-cafile=ca.pem -etcd-certfile=client.pem -etcd-keyfile=client-key.pem \
                -iface=eth0 -ip-masq=true --v=2 -logtostderr --healthz-port=2401 \
                -subnet-file=/run/flannel/subnet.env";
    let script = "mount -t tmpfs tmpfs /run && mount --bind \"$1\" /sys/fs/bpf && cd \"$0\" \
                  && shift && exec \"$@\"";
    let mut args: Vec<String> = ["--mount", "--propagation", "private", "sh", "-c", script]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.push(work.display().to_string());
    args.push(n0.bpf_dir().parent().unwrap().display().to_string());
    args.push(agent_bin().unwrap().display().to_string());
    args.extend(line.split_whitespace().map(str::to_owned));
    let agent = AgentProcess::spawn(
        n0.ns(),
        &PathBuf::from("unshare"),
        &args,
        n0.dir().join("agent-flanneld-line.log"),
        "n0-flanneld-line",
    )
    .unwrap();

    let addr = SocketAddr::new(n0.underlay_ip().into(), 2401);
    wait_until("/readyz 200 on port 2401", START, || {
        http_get(n0.ns(), addr, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    let log = agent.log();
    assert!(log.contains("ignoring --logtostderr"), "{log}");
    assert!(
        log.contains("CLI flags config: {etcd-endpoints=https://198.18.0.254:2379 "),
        "{log}"
    );
    assert!(
        log.contains("etcd-cafile=ca.pem") && log.contains(" v=2 "),
        "{log}"
    );
    assert!(log.contains("ip-masq=true"), "{log}");
    let leases = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert!(
        leases
            .iter()
            .any(|kv| kv.value.contains("\"PublicIP\":\"198.18.0.1\"")),
        "{leases:?}"
    );
    assert_eq!(
        eth0_programs(n0),
        [
            (names::UNDERLAY_EGRESS.to_owned(), AttachKind::TcxEgress),
            (names::UNDERLAY_INGRESS.to_owned(), AttachKind::TcxIngress),
        ]
    );
    assert!(
        n0.bpf_dir()
            .join("links")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "the default --bpf-dir must land on the node's bpffs, which outlives the agent"
    );
}

/// flanneld flags this agent does not implement yet stop it with a message that names them,
/// before it touches anything.
#[test]
fn unimplemented_flanneld_flags_stop_the_agent_with_a_message() {
    let cluster = cluster_without_agents(1);
    let n0 = cluster.node(0);
    for flag in ["--kube-subnet-mgr", "--public-ipv6=2001:db8::1"] {
        let agent = n0.start_agent(&[flag]).unwrap();
        let status = agent.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(!status.success(), "{flag} must stop the agent");
        let log = agent.log();
        let name = flag.split('=').next().unwrap();
        assert!(
            log.contains(&format!("{name} is not implemented by overlay-agent yet")),
            "{log}"
        );
        assert!(eth0_programs(n0).is_empty(), "nothing attached with {flag}");
    }
}

/// `--ip-blackhole-route` (flanneld's blackhole route for the node's subnet, for nodes without a
/// pod bridge, so that traffic for their unassigned pod addresses does not follow the default
/// route) is accepted with a warning that it is not needed, and the reason holds: on a node
/// without a pod bridge, the host's own packets to such an address take the cluster network's
/// route through ovl0 and are dropped there (`drop_no_route`), and a remote pod's are dropped
/// at decapsulation (`drop_no_bridge`).
#[test]
fn ip_blackhole_route_is_accepted_as_not_needed() {
    let cluster = cluster_without_agents(2);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let agent = n0.start_agent(&["--ip-blackhole-route"]).unwrap();
    n1.start_agent(&[]).unwrap();
    agent
        .wait_for_log("ignoring --ip-blackhole-route: not needed", START)
        .unwrap();
    agent
        .wait_for_log("data path attached to eth0", START)
        .unwrap();
    let unassigned = Ipv4Addr::from(u32::from(subnet_of(n0).network()) + 77);
    let route = n0
        .ns()
        .run("ip", &["route", "get", &unassigned.to_string()])
        .unwrap();
    assert!(route.contains("dev ovl0"), "{route}");

    let before = counters(n0);
    assert_no_ping(n0, unassigned, "no pod holds it");
    let pod = n1.add_pod("p0").unwrap();
    assert_no_ping(&pod, unassigned, "no pod holds it");
    let grew = grown(&before, &counters(n0));
    assert!(
        grew.contains_key("drop_no_route") && grew.contains_key("drop_no_bridge"),
        "n0 must drop both, the host's and the remote pod's: {grew:?}"
    );
}

/// The notify protocol as systemd's `Type=notify` sees it (systemd does not run as PID 1 in
/// this container, so the test plays the service manager: a datagram socket in
/// `$NOTIFY_SOCKET`): `READY=1` arrives only once the lease is in etcd, the subnet file is
/// written and the programs are attached; `WATCHDOG=1` follows at half of `$WATCHDOG_USEC`;
/// `STOPPING=1` on SIGTERM.
#[test]
fn the_agent_notifies_systemd_when_ready_and_pets_the_watchdog() {
    let cluster = cluster_without_agents(2);
    let n0 = cluster.node(0);
    let socket_path = n0.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let path = socket_path.display().to_string();
    let agent = n0
        .start_agent_env(
            &[],
            &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1000000")],
        )
        .unwrap();

    let recv = |timeout: Duration| -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    let first = recv(START).unwrap_or_else(|| panic!("no notification; log:\n{}", agent.log()));
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert!(
        first.contains(&format!("MAINPID={}", agent.pid())),
        "{first:?}"
    );
    // What READY promises is in place at that moment.
    assert!(
        n0.try_subnet_env().unwrap().is_some(),
        "subnet file before READY"
    );
    assert_eq!(eth0_programs(n0).len(), 2, "programs attached before READY");
    let leases = cluster
        .etcd()
        .get_prefix(&format!("{DEFAULT_ETCD_PREFIX}/subnets/"))
        .unwrap();
    assert_eq!(leases.len(), 1, "the lease in etcd before READY");

    let next = recv(Duration::from_secs(3)).expect("WATCHDOG=1 within half the period");
    assert_eq!(next, "WATCHDOG=1");
    assert!(agent.kill().unwrap().success());
    let mut last = String::new();
    while let Some(m) = recv(Duration::from_secs(1)) {
        last = m;
    }
    assert_eq!(last, "STOPPING=1");
}

// ----- pinned layout -----------------------------------------------------------------------

/// A map pinned under --bpf-dir with another shape than this agent's is never reused: with
/// `--pinned-layout-mismatch=refuse` the agent stops naming it and the command that clears
/// it; by default it is replaced (and the peers refilled from etcd). A changed layout version
/// replaces the settings maps. Restarts with the same layout replace nothing.
#[test]
fn pinned_maps_of_another_layout_are_refused_or_migrated_never_reused() {
    let cluster = cluster_without_agents(2);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    n1.start_agent(&[]).unwrap();
    let remote = n1.add_pod("p0").unwrap();
    let maps = n0.bpf_dir().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let route = maps.join(names::ROUTE_V4).display().to_string();
    n0.ns()
        .run(
            "bpftool",
            &[
                "map",
                "create",
                &route,
                "type",
                "lpm_trie",
                "key",
                "8",
                "value",
                "8",
                "entries",
                "16",
                "name",
                names::ROUTE_V4,
                "flags",
                "1",
            ],
        )
        .unwrap();

    let refused = n0
        .start_agent(&["--pinned-layout-mismatch=refuse"])
        .unwrap();
    let status = refused.wait_exit(START).unwrap();
    assert!(!status.success());
    let log = refused.log();
    assert!(log.contains("ROUTE_V4: pinned"), "{log}");
    assert!(
        log.contains(&format!(
            "overlay-agent cleanup --bpf-dir {}",
            n0.bpf_dir().display()
        )),
        "{log}"
    );

    let agent = n0.start_agent(&[]).unwrap();
    agent
        .wait_for_log("pinned map ROUTE_V4 replaced", START)
        .unwrap();
    agent.wait_for_log("data path attached", START).unwrap();
    let value_size = || {
        let info = json(
            &n0.ns()
                .run("bpftool", &["-j", "map", "show", "pinned", &route])
                .unwrap(),
        );
        info["bytes_value"].as_u64().unwrap()
    };
    assert_eq!(
        value_size(),
        12,
        "ROUTE_V4 with the agent's RemoteNode values"
    );
    let local = n0.add_pod("p0").unwrap();
    assert_pods_talk(&local, &remote);

    // Same layout: nothing replaced.
    agent.kill().unwrap();
    let again = n0.start_agent(&[]).unwrap();
    again.wait_for_log("Lease acquired", START).unwrap();
    n0.subnet_env().unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(!again.log().contains("replaced"), "{}", again.log());

    // Another layout version recorded: the settings maps are replaced, state maps kept.
    again.kill().unwrap();
    let layout = n0.bpf_dir().join("layout");
    let current = std::fs::read_dir(&layout)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_dir(&current).unwrap();
    std::fs::create_dir(layout.join("0000000000000000")).unwrap();
    let third = n0.start_agent(&[]).unwrap();
    third
        .wait_for_log("pinned map CONFIG replaced", START)
        .unwrap();
    assert!(
        !third.log().contains("pinned map ROUTE_V4 replaced"),
        "{}",
        third.log()
    );
    assert_pods_talk(&local, &remote);
}
