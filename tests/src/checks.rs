//! Assertions shared by the end-to-end tests: reachability with real traffic, the agent's log,
//! its inspection subcommands and the programs the kernel reports attached.
//!
//! Unlike the rest of the harness these panic (with a message naming both ends and what was
//! seen) instead of returning errors: they are the tests' own checks, written once.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;

use crate::{
    AgentProcess, AttachKind, Endpoint, NetNs, Node, Pod, TransferReport, attached_programs,
    traffic,
};

/// Bytes per checked TCP transfer.
pub const TCP_BYTES: u64 = 1 << 20;
/// Bound for the first echo between two endpoints (neighbour resolution on both sides).
pub const FIRST_ECHO: Duration = Duration::from_secs(10);

/// The node's lease as its subnet file says (`FLANNEL_SUBNET` truncated); waits for the file.
pub fn subnet_of(node: &Node) -> Ipv4Net {
    node.subnet_env()
        .unwrap_or_else(|e| panic!("{}: no subnet file: {e:#}", node.name()))
        .subnet
        .trunc()
}

/// The agent started last on `node`; panics when none was.
pub fn agent_of(node: &Node) -> AgentProcess {
    node.agent()
        .unwrap_or_else(|| panic!("{} has no agent", node.name()))
}

/// `from` reaches `to`: a first echo within [`FIRST_ECHO`], then 3 of 3 echoes answered.
pub fn assert_ping(from: &dyn Endpoint, to: &dyn Endpoint) {
    let (a, b) = (from.label(), to.label());
    traffic::ping_until(from.ns(), to.ip(), FIRST_ECHO).unwrap_or_else(|e| {
        panic!(
            "ping {a} -> {b} ({}): expected an echo reply: {e:#}",
            to.ip()
        )
    });
    let r = traffic::ping(from.ns(), to.ip(), 3).unwrap();
    assert!(
        r.all_received(),
        "ping {a} -> {b} ({}): expected 3 of 3 echoes answered, got {} of {}:\n{}",
        to.ip(),
        r.received,
        r.transmitted,
        r.output
    );
}

/// `from` does not reach `to`: 3 echoes, none answered.
pub fn assert_no_ping(from: &dyn Endpoint, to: Ipv4Addr, why: &str) {
    let r = traffic::ping(from.ns(), to, 3).unwrap();
    assert_eq!(
        r.received,
        0,
        "ping {} -> {to} must fail ({why}), but {} of {} echoes were answered:\n{}",
        from.label(),
        r.received,
        r.transmitted,
        r.output
    );
}

/// A checksummed TCP transfer of [`TCP_BYTES`] `from` → `to`; returns the source address the
/// server saw.
pub fn assert_tcp(from: &dyn Endpoint, to: &dyn Endpoint) -> Ipv4Addr {
    let t = traffic::tcp_transfer(from, to, TCP_BYTES).unwrap_or_else(|e| {
        panic!(
            "TCP {} -> {}: expected {TCP_BYTES} bytes to arrive intact: {e:#}",
            from.label(),
            to.label()
        )
    });
    assert_eq!(t.bytes, TCP_BYTES);
    match t.server_peer.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!(
            "TCP {} -> {}: server saw IPv6 peer {ip}",
            from.label(),
            to.label()
        ),
    }
}

/// Waits (up to 30 s) for `agent` to exit and asserts that it failed before taking a lease,
/// saying every one of `messages`; returns its log.
pub fn assert_refused_before_lease(agent: &AgentProcess, messages: &[&str]) -> String {
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let label = agent.label();
    assert!(!status.success(), "{label} must fail");
    let log = agent.log();
    for message in messages {
        assert!(
            log.contains(message),
            "{label}: no {message:?} in its log:\n{log}"
        );
    }
    assert!(
        !log.contains("Lease acquired"),
        "{label} must be refused before the lease:\n{log}"
    );
    log
}

/// Ping and TCP `a` → `b`, with the real pod source address at the server.
pub fn assert_pods_talk(a: &Pod, b: &Pod) {
    assert_ping(a, b);
    let seen = assert_tcp(a, b);
    assert_eq!(
        seen,
        a.ip(),
        "TCP {a} -> {b}: the server must see the real pod source address {}, saw {seen}",
        a.ip()
    );
}

/// [`assert_pods_talk`] for every ordered pair of `pods` on different nodes.
pub fn assert_pods_talk_across_nodes(pods: &[Pod]) {
    for a in pods {
        for b in pods.iter().filter(|b| b.node_name() != a.node_name()) {
            assert_pods_talk(a, b);
        }
    }
}

/// Ping and TCP from the host (node namespace) `node` to a remote `pod`: the pod sees the host's
/// overlay address `<its subnet>.0` (flannel.1's, our `ovl0`'s).
pub fn assert_host_reaches(node: &Node, pod: &Pod) {
    let host = subnet_of(node).network();
    assert_ping(node, pod);
    let seen = assert_tcp(node, pod);
    assert_eq!(
        seen,
        host,
        "TCP {} -> {pod}: the pod must see the host's overlay address {host}, saw {seen}",
        node.name()
    );
}

/// A TCP transfer of `bytes` `from` → `to` across a `kill -9` of the agents of `nodes`: 300 ms
/// into the transfer every agent is killed (the transfer must still be running: else `bytes` is
/// too small), 500 ms later `while_down` runs with no agent alive (e.g. a ping that must pass),
/// then each node gets a new agent with `agent_args`, which must take over the pinned link on
/// eth0 within 30 s. Returns the transfer's report; panics unless every byte arrived intact.
pub fn transfer_across_agent_kill9(
    nodes: &[Node],
    from: &(dyn Endpoint + Sync),
    to: &(dyn Endpoint + Sync),
    bytes: u64,
    agent_args: &[&str],
    while_down: impl FnOnce(),
) -> TransferReport {
    thread::scope(|s| {
        let transfer = s.spawn(|| traffic::tcp_transfer(from, to, bytes));
        thread::sleep(Duration::from_millis(300));
        for node in nodes {
            agent_of(node).kill9().unwrap();
        }
        assert!(
            !transfer.is_finished(),
            "the transfer ended before the kill: make BYTES larger"
        );
        thread::sleep(Duration::from_millis(500));
        while_down();
        for node in nodes {
            let agent = node.start_agent(agent_args).unwrap();
            agent
                .wait_for_log("took over the pinned link on eth0", Duration::from_secs(30))
                .unwrap();
        }
        transfer
            .join()
            .expect("transfer thread")
            .expect("transfer intact")
    })
}

/// Waits until the part of the agent's log after byte `mark` contains `pattern`, at most
/// `timeout`; fails at once if the agent exits. Returns the time it took.
pub fn wait_log_since(
    agent: &AgentProcess,
    mark: usize,
    pattern: &str,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let exited = agent.exit_status();
        let log = agent.log();
        if log.get(mark..).unwrap_or("").contains(pattern) {
            return start.elapsed();
        }
        assert!(
            exited.is_none(),
            "agent {} exited ({exited:?}) without logging {pattern:?}; log:\n{log}",
            agent.label()
        );
        assert!(
            start.elapsed() < timeout,
            "agent {} did not log {pattern:?} within {timeout:?}; log after the mark:\n{}",
            agent.label(),
            log.get(mark..).unwrap_or("")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a line of the agent's log after byte `mark` contains every one of `parts`;
/// returns that line. Same limits as [`wait_log_since`].
pub fn wait_line_since(
    agent: &AgentProcess,
    mark: usize,
    parts: &[&str],
    timeout: Duration,
) -> String {
    let start = Instant::now();
    loop {
        let exited = agent.exit_status();
        let log = agent.log();
        let since = log.get(mark..).unwrap_or("");
        if let Some(line) = since.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            exited.is_none(),
            "agent {} exited ({exited:?}) without logging a line with {parts:?}; log:\n{log}",
            agent.label()
        );
        assert!(
            start.elapsed() < timeout,
            "agent {} logged no line with all of {parts:?} within {timeout:?}; log after the \
             mark:\n{since}",
            agent.label()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `overlay-agent <args>` in the node ([`Node::agent_cmd`]); panics when it fails.
pub fn agent_cmd(node: &Node, args: &[&str]) -> String {
    node.agent_cmd(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The output of `overlay-agent counters` (`<name> <packets> <bytes>` per line): name →
/// packets, or an error naming the first line of another shape.
pub fn parse_counters(out: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    out.lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, packets, bytes] if bytes.parse::<u64>().is_ok() => packets
                .parse()
                .map(|p| (name.to_owned(), p))
                .map_err(|_| anyhow::anyhow!("bad counters line {l:?}")),
            _ => Err(anyhow::anyhow!(
                "`overlay-agent counters` line {l:?} is not `<name> <packets> <bytes>`:\n{out}"
            )),
        })
        .collect()
}

/// The node's data path counters (`overlay-agent counters`): name → packets. Panics unless
/// every line is `<name> <packets> <bytes>` and the well-known names are there.
pub fn counters(node: &Node) -> BTreeMap<String, u64> {
    let out = agent_cmd(node, &["counters"]);
    let counters = parse_counters(&out).unwrap_or_else(|e| panic!("{e:#}"));
    for name in [
        "underlay_rx",
        "decap_pod",
        "decap_endpoint",
        "drop_no_route",
    ] {
        assert!(
            counters.contains_key(name),
            "`overlay-agent counters` lacks {name}:\n{out}"
        );
    }
    counters
}

/// `overlay-agent endpoints`: pod address → (host-side veth index, pod MAC).
pub fn endpoints(node: &Node) -> BTreeMap<Ipv4Addr, (u32, String)> {
    let out = agent_cmd(node, &["endpoints"]);
    out.lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [addr, ifindex, mac] => (
                addr.parse()
                    .unwrap_or_else(|_| panic!("bad address in {l:?}")),
                (
                    ifindex
                        .parse()
                        .unwrap_or_else(|_| panic!("bad ifindex in {l:?}")),
                    mac.to_owned(),
                ),
            ),
            _ => panic!(
                "`overlay-agent endpoints` line {l:?} is not `<address> <ifindex> <mac>`:\n{out}"
            ),
        })
        .collect()
}

/// How much each counter grew from `before` to `after` (counters that did not grow left out).
pub fn grown(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// The programs the kernel reports attached to the node's `eth0`, (name, kind) sorted by name.
pub fn eth0_programs(node: &Node) -> Vec<(String, AttachKind)> {
    programs_on(node, "eth0")
}

/// The programs the kernel reports attached to `ifname` in the node, (name, kind) sorted by
/// name.
pub fn programs_on(node: &Node, ifname: &str) -> Vec<(String, AttachKind)> {
    let mut progs: Vec<_> = attached_programs(node.ns(), ifname)
        .unwrap_or_else(|e| panic!("query the kernel for {ifname}'s programs: {e:#}"))
        .into_iter()
        .map(|p| (p.name, p.kind))
        .collect();
    progs.sort_by_key(|(name, _)| name.clone());
    progs
}

/// `GET path` over plain HTTP/1.1 from inside `ns`: the status code and the body. Bounded: 2 s
/// to connect, 2 s per read or write, 1 MiB.
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    ns.in_netns(move || {
        let limit = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.take(1 << 20).read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("HTTP/1.1 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no HTTP status line in {response:?}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The routing generation of `node`'s data path (`overlay-agent status -o json`), which the
/// agent renews at every route, rule, address or link event and once a second.
pub fn routing_generation(node: &Node) -> u32 {
    let out = agent_cmd(node, &["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{}: status -o json: {e}:\n{out}", node.name()));
    status["routing_generation"]
        .as_u64()
        .and_then(|g| u32::try_from(g).ok())
        .unwrap_or_else(|| panic!("{}: no routing_generation in:\n{out}", node.name()))
}

/// Waits until `node`'s agent has renewed the routing generation past `before`: from then on
/// its programs look their next hops up again. Panics after 5 s (the agent renews it at least
/// once a second).
pub fn wait_routing_renewed(node: &Node, before: u32) {
    wait_until(
        &format!(
            "{} to renew its routing generation past {before}",
            node.name()
        ),
        Duration::from_secs(5),
        || routing_generation(node) != before,
    );
}

/// A gateway on the nodes' first segment that nobody answers: a next hop that goes nowhere.
pub const MISSING_GATEWAY: &str = "198.18.0.250";

/// Routes `dest` (a CIDR) in `node` via [`MISSING_GATEWAY`] on `eth0`: what that route carries
/// is lost, and the node tries to resolve the gateway. Returns the route, for
/// [`unroute_missing_gateway`].
pub fn route_via_missing_gateway(node: &Node, dest: &str) -> String {
    node.ns()
        .run(
            "ip",
            &["route", "add", dest, "via", MISSING_GATEWAY, "dev", "eth0"],
        )
        .unwrap_or_else(|e| {
            panic!(
                "routing {dest} via {MISSING_GATEWAY} in {}: {e:#}",
                node.name()
            )
        });
    dest.to_owned()
}

/// Removes the route [`route_via_missing_gateway`] added, and asserts that the node had tried to
/// resolve the missing gateway meanwhile (so packets really took that route).
pub fn unroute_missing_gateway(node: &Node, dest: &str) {
    let neighbour = node
        .ns()
        .run(
            "ip",
            &["-4", "neigh", "show", MISSING_GATEWAY, "dev", "eth0"],
        )
        .unwrap_or_default();
    node.ns()
        .run("ip", &["route", "del", dest])
        .unwrap_or_else(|e| panic!("removing the route to {dest} in {}: {e:#}", node.name()));
    assert!(
        neighbour.contains(MISSING_GATEWAY),
        "{} never tried to resolve the new next hop {MISSING_GATEWAY}: `ip neigh` shows {neighbour:?}",
        node.name()
    );
}

/// The agent's GRO device (`ovl-gro`) as the kernel shows it in `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroDevice {
    pub index: u64,
    pub up: bool,
    /// A VXLAN device in collect-metadata mode (`external`).
    pub external_vxlan: bool,
    pub port: u64,
}

/// The name the agent gives its GRO device.
pub const GRO_DEVICE: &str = "ovl-gro";

/// `node`'s GRO device, if there is one (`ip -d -j link show ovl-gro`).
pub fn gro_device(node: &Node) -> Option<GroDevice> {
    let out = node
        .ns()
        .run("ip", &["-d", "-j", "link", "show", GRO_DEVICE])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    let link = &v[0];
    let info = &link["linkinfo"];
    Some(GroDevice {
        index: link["ifindex"].as_u64().unwrap_or(0),
        up: link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        external_vxlan: info["info_kind"] == "vxlan"
            && info["info_data"]["external"].as_bool() == Some(true),
        port: info["info_data"]["port"].as_u64().unwrap_or(0),
    })
}

/// Sends one VXLAN datagram (VNI 1, an inner IPv4/UDP packet) to the node's own VXLAN socket
/// over loopback, where no program of the external interface sees it: only the GRO device's
/// socket can take it.
pub fn vxlan_over_loopback(node: &Node, port: u16) {
    let bytes = crate::packet::vxlan_payload(
        1,
        [0x02, 0, 0, 0, 0, 0x01],
        [0x02, 0, 0, 0, 0, 0x02],
        Ipv4Addr::new(172, 17, 99, 5),
        Ipv4Addr::LOCALHOST,
        9,
        b"ovl!",
    );
    traffic::send_udp(
        node.ns(),
        Ipv4Addr::LOCALHOST,
        (Ipv4Addr::LOCALHOST, port).into(),
        &bytes,
        1,
    )
    .unwrap();
}

/// Replaces the NAT flow table `name` pinned in `node`'s data path with an empty LRU hash of
/// flows whose entries are 24 bytes (`NatEntryV4` before the close window's `orig_ack`), of
/// `capacity` flows: an older agent's pin. Returns its path.
pub fn pin_older_flow_table(node: &Node, name: &str, capacity: u32) -> String {
    let path = node.bpf_dir().join("maps").join(name);
    if path.exists() {
        std::fs::remove_file(&path).unwrap();
    }
    let path = path.display().to_string();
    let capacity = capacity.to_string();
    let create = [
        "map", "create", &path, "type", "lru_hash", "key", "16", "value", "24", "entries",
        &capacity, "name", name,
    ];
    node.ns().run("bpftool", &create).unwrap();
    path
}

/// Agent flag of the tests that show the data path bypassing FORWARD under Docker's DROP
/// policy: by default the agent writes flanneld's accept rules there (`--iptables-forward-rules`),
/// and the kernel's forwarding would then pass too.
pub const NO_FORWARD_RULES: &str = "--iptables-forward-rules=false";

/// Sets FORWARD's policy to DROP in `node`, as Docker leaves it, and checks that it took.
pub fn forward_drop(node: &Node) {
    forward_drop_in(node, "iptables");
}

/// [`forward_drop`] through one backend's command (`iptables-legacy`, as a Docker in a
/// container or an older distribution would set it).
pub fn forward_drop_in(node: &Node, iptables: &str) {
    node.ns().run(iptables, &["-P", "FORWARD", "DROP"]).unwrap();
    let save = node
        .ns()
        .run(format!("{iptables}-save"), &["-t", "filter"])
        .unwrap();
    assert!(
        save.contains(":FORWARD DROP"),
        "{}: FORWARD policy must be DROP ({iptables}):\n{save}",
        node.name()
    );
}

/// flanneld's forward rules for `network`, as `iptables -S` prints them (chain `FLANNEL-FWD`).
pub fn flannel_forward_rules(network: &str) -> [String; 3] {
    [
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD".to_owned(),
        format!("-A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT"),
    ]
}

/// Waits (up to two of the agent's 5 s checks) until `node`'s filter table holds flanneld's
/// forward rules for `network`, each once; returns the table.
pub fn wait_forward_rules(node: &Node, network: &str) -> String {
    wait_forward_rules_in(node, network, "iptables")
}

/// [`wait_forward_rules`] in the filter table that one backend's command lists.
pub fn wait_forward_rules_in(node: &Node, network: &str, iptables: &str) -> String {
    let expected = flannel_forward_rules(network);
    let mut save = String::new();
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        save = node.ns().run(iptables, &["-S"]).unwrap();
        if expected
            .iter()
            .all(|rule| save.lines().filter(|l| l == rule).count() == 1)
        {
            return save;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{}: flanneld's forward rules {expected:#?} not (each once) in {iptables}'s:\n{save}",
        node.name()
    );
}
