//! One topology per path, all with the same pod addresses (client pod 172.16.1.2 on node n0,
//! server pod 172.16.2.2 on node n1, cluster network 172.16.0.0/12 with /24 leases), built by the
//! `overlay-tests` harness: an underlay namespace with a bridge and etcd, two node namespaces on
//! it, one pod per node behind `cni0`, an outside host (198.19.0.1) routed by the underlay.
//!
//! - K: the nodes get flannel's vxlan state as flanneld builds it (`flannel.1` VNI 1, port 8472,
//!   nolearning, MTU 1450, neigh/fdb/route per peer) and flannel's iptables rules.
//! - H: a kernel route `<peer subnet> via <peer PublicIP>` per peer and the same rules; MTU 1500.
//! - E / EH: our agent with `--ip-masq` (vxlan / host-gw config in etcd), its subnet forced by
//!   a subnet file written before it starts (the agent reuses it, as flanneld does); pods get
//!   the MTU the agent writes (1450 / 1500). No NAT rules: the agent writes only flanneld's two
//!   FORWARD accepts (`--iptables-forward-rules`, as the policy is DROP), which the measured
//!   traffic never crosses (the data path bypasses FORWARD).
//! - R: H's routes without its rules, no NAT, no netfilter state at all, and a route in the
//!   underlay to each node's lease, so the outside host answers the pods' own addresses: what
//!   a connection costs over the same hops when nothing but routing is in between (the no-NAT
//!   ceiling of the connection rates; the masquerade's cost is E's or EH's rate against it).
//! - D: two namespaces joined by one veth pair, addressed 172.16.1.2/12 and 172.16.2.2/12, MTU
//!   1500: the pods' own socket work with nothing in between.
//!
//! Every node namespace but R's gets `iptables -P FORWARD DROP`, as Docker leaves it
//! (flannel's FORWARD rules exist to undo that). MTUs are flannel's own choice per backend.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use overlay_tests::{
    Cluster, NetNs, Node, add_veth,
    cluster::ETCD_PORT,
    stock::{StockPeer, stock_vxlan_node},
};

use crate::{Mode, PathId};

/// The cluster network of every path.
pub const NETWORK: &str = "172.16.0.0/12";
/// MTU of the vxlan paths (flannel: underlay 1500 − 50).
pub const VXLAN_MTU: u32 = 1450;
/// MTU of the host-gw paths and D.
pub const PLAIN_MTU: u32 = 1500;

/// Node `i`'s lease: 172.16.<i+1>.0/24.
pub fn node_subnet(i: usize) -> Ipv4Net {
    let i = u8::try_from(i + 1).unwrap_or(u8::MAX);
    Ipv4Net::new(Ipv4Addr::new(172, 16, i, 0), 24).unwrap_or_else(|_| unreachable!())
}

/// The pod address on node `i`: `<subnet>.2` (the bridge holds `.1`).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(node_subnet(i).network()) + 2)
}

/// The bridge address on node `i`, with the subnet's prefix: `<subnet>.1/24`.
fn bridge_cidr(i: usize) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(u32::from(node_subnet(i).network()) + 1), 24)
        .unwrap_or_else(|_| unreachable!())
}

/// The VtepMAC of stock node `i` (flanneld picks a random one; any unicast LAA will do).
fn stock_vtep_mac(i: usize) -> String {
    format!("0e:4b:00:00:00:{:02x}", i + 1)
}

/// One path's topology, kept alive (everything is removed on drop).
pub struct PathTopo {
    pub id: PathId,
    /// Namespace of the client pod (on n0).
    pub client: String,
    /// Namespace of the server pod (on n1) and its address.
    pub server: String,
    pub server_ip: Ipv4Addr,
    /// The outside host's namespace and address (not for D).
    pub outside: Option<(String, Ipv4Addr)>,
    /// Devices whose offload settings the report records: (label, namespace, device).
    pub devices: Vec<(String, String, String)>,
    /// Kernel state worth showing a reader (for K and H: iptables-save, routes, fdb of n0).
    pub state: String,
    keep: Keep,
}

enum Keep {
    Cluster(Box<Cluster>),
    Direct(NetNs, NetNs),
}

impl PathTopo {
    /// The harness cluster (None for D).
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.keep {
            Keep::Cluster(c) => Some(c),
            Keep::Direct(..) => None,
        }
    }

    /// etcd's client address (in the cluster's underlay namespace).
    pub fn etcd_addr(&self) -> Option<SocketAddrV4> {
        self.cluster()
            .map(|_| SocketAddrV4::new(overlay_tests::UNDERLAY_GATEWAY, ETCD_PORT))
    }

    /// The nodes' bpf dirs (E, EH).
    pub fn bpf_dirs(&self) -> Vec<PathBuf> {
        self.cluster()
            .map(|c| c.nodes().iter().map(Node::bpf_dir).collect())
            .unwrap_or_default()
    }

    /// Builds the path in `mode`, checks that the client pod reaches the server pod (and the
    /// outside host), and returns it.
    pub fn build(id: PathId, mode: Mode) -> Result<Self> {
        let topo = match id {
            PathId::D => direct()?,
            PathId::K | PathId::H | PathId::R => stock(id)?,
            PathId::E | PathId::EH => ours(id, mode)?,
        };
        // Our agents were started with the offloads already set (see `ours`).
        if mode == Mode::Nic && !matches!(id, PathId::E | PathId::EH) {
            topo.nic_offloads()?;
        }
        topo.check_reachable()
            .with_context(|| format!("path {} ({}) does not work", id.name(), id.describe()))?;
        Ok(topo)
    }

    /// nic mode: TSO and GSO off on both ends of every underlay veth (the pods' link for D),
    /// GRO on at the receiving ends, so frames cross at MTU size and receivers aggregate them.
    fn nic_offloads(&self) -> Result<()> {
        match &self.keep {
            Keep::Direct(a, b) => {
                for ns in [a, b] {
                    ethtool_k(ns, "eth0", &["tso", "off", "gso", "off", "gro", "on"])?;
                }
            }
            Keep::Cluster(c) => cluster_nic_offloads(c)?,
        }
        Ok(())
    }

    fn check_reachable(&self) -> Result<()> {
        let limit = Duration::from_secs(20);
        ping_until(&self.client, self.server_ip, limit).context("client pod → server pod")?;
        if let Some((_, ip)) = &self.outside {
            ping_until(&self.client, *ip, limit).context("client pod → outside host")?;
        }
        Ok(())
    }
}

/// Pings `dst` from namespace `ns` until an echo comes back.
fn ping_until(ns: &str, dst: Ipv4Addr, limit: Duration) -> Result<()> {
    let dst = dst.to_string();
    wait_for(limit, || {
        let c = overlay_tests::cmd::command(
            "ip",
            &[
                "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-q", &dst,
            ],
        );
        Ok(overlay_tests::cmd::output(c)?.status.success())
    })
    .with_context(|| format!("no echo from {dst}"))
}

/// The nic mode's offloads on a cluster's underlay veths (both ends of each node's link).
fn cluster_nic_offloads(c: &Cluster) -> Result<()> {
    for node in c.nodes() {
        ethtool_k(
            node.ns(),
            "eth0",
            &["tso", "off", "gso", "off", "gro", "on"],
        )?;
        ethtool_k(c.underlay(), node.name(), &["tso", "off", "gso", "off"])?;
    }
    Ok(())
}

fn ethtool_k(ns: &NetNs, dev: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["-K", dev];
    args.extend(settings);
    ns.run("ethtool", &args)
        .with_context(|| format!("ethtool -K {dev} in {}", ns.name()))?;
    Ok(())
}

fn direct() -> Result<PathTopo> {
    overlay_tests::require_root();
    let id = overlay_tests::unique_id();
    let a = NetNs::new(format!("{id}-D-a"))?;
    let b = NetNs::new(format!("{id}-D-b"))?;
    add_veth(&a, "eth0", &b, "eth0")?;
    for (ns, i) in [(&a, 0), (&b, 1)] {
        ns.set_mtu("eth0", PLAIN_MTU)?;
        ns.add_addr("eth0", &format!("{}/12", pod_ip(i)))?;
        ns.link_up("eth0")?;
    }
    Ok(PathTopo {
        id: PathId::D,
        client: a.name().to_owned(),
        server: b.name().to_owned(),
        server_ip: pod_ip(1),
        outside: None,
        devices: vec![
            ("client pod eth0".into(), a.name().to_owned(), "eth0".into()),
            ("server pod eth0".into(), b.name().to_owned(), "eth0".into()),
        ],
        state: String::new(),
        keep: Keep::Direct(a, b),
    })
}

fn cluster_base(config: Option<&str>) -> Result<Cluster> {
    let mut b = Cluster::builder()
        .nodes(2)
        .outside(true)
        .start_agents(false);
    if let Some(c) = config {
        b = b.network_config(c);
    }
    b.build()
}

/// Docker's FORWARD policy on every node.
fn forward_drop(node: &Node) -> Result<()> {
    node.ns().run("iptables", &["-P", "FORWARD", "DROP"])?;
    Ok(())
}

/// flanneld's masquerade and forward rules (flannel-compat.md §6, as in flannel's
/// `pkg/trafficmngr/iptables`): nat FLANNEL-POSTRTG jumped to from POSTROUTING, filter
/// FLANNEL-FWD jumped to from FORWARD.
pub fn flannel_rule_commands(subnet: Ipv4Net) -> Vec<Vec<String>> {
    // `POD` and `NET` stand for the node's lease and the cluster network; `MASQ` and `FWD`
    // for flanneld's two comments (one argument each, with their space).
    const RULES: [&str; 12] = [
        "-t nat -N FLANNEL-POSTRTG",
        "-t nat -A POSTROUTING -m comment --comment MASQ -j FLANNEL-POSTRTG",
        "-t nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment MASQ -j RETURN",
        "-t nat -A FLANNEL-POSTRTG -s POD -d NET -m comment --comment MASQ -j RETURN",
        "-t nat -A FLANNEL-POSTRTG -s NET -d POD -m comment --comment MASQ -j RETURN",
        "-t nat -A FLANNEL-POSTRTG ! -s NET -d POD -m comment --comment MASQ -j RETURN",
        "-t nat -A FLANNEL-POSTRTG -s NET ! -d 224.0.0.0/4 -m comment --comment MASQ -j MASQUERADE --random-fully",
        "-t nat -A FLANNEL-POSTRTG ! -s NET -d NET -m comment --comment MASQ -j MASQUERADE --random-fully",
        "-t filter -N FLANNEL-FWD",
        "-t filter -A FORWARD -m comment --comment FWD -j FLANNEL-FWD",
        "-t filter -A FLANNEL-FWD -s NET -m comment --comment FWD -j ACCEPT",
        "-t filter -A FLANNEL-FWD -d NET -m comment --comment FWD -j ACCEPT",
    ];
    let pod = subnet.to_string();
    RULES
        .iter()
        .map(|rule| {
            rule.split_whitespace()
                .map(|word| match word {
                    "POD" => pod.clone(),
                    "NET" => NETWORK.to_owned(),
                    "MASQ" => "flanneld masq".to_owned(),
                    "FWD" => "flanneld forward".to_owned(),
                    w => w.to_owned(),
                })
                .collect()
        })
        .collect()
}

fn install_flannel_rules(node: &Node, subnet: Ipv4Net) -> Result<()> {
    for rule in flannel_rule_commands(subnet) {
        node.ns()
            .run("iptables", &rule)
            .with_context(|| format!("iptables {}", rule.join(" ")))?;
    }
    Ok(())
}

/// `ip route replace <dst> via <gw> <extra>` in `ns`.
fn route_via(ns: &NetNs, dst: Ipv4Net, gw: Ipv4Addr, extra: &[&str]) -> Result<()> {
    let (dst, gw) = (dst.to_string(), gw.to_string());
    let mut args = vec!["route", "replace", dst.as_str(), "via", gw.as_str()];
    args.extend(extra);
    ns.ip(&args)?;
    Ok(())
}

/// K or H: kernel state as flanneld builds it, no agent; R: H's routes alone.
fn stock(id: PathId) -> Result<PathTopo> {
    let cluster = cluster_base(None)?;
    let nodes = cluster.nodes();
    for (i, node) in nodes.iter().enumerate() {
        if id != PathId::R {
            forward_drop(node)?;
        }
        let peer_i = 1 - i;
        let peer = &nodes[peer_i];
        if id == PathId::K {
            let mac = stock_vtep_mac(peer_i);
            stock_vxlan_node(
                node.ns(),
                node.underlay_ip(),
                node_subnet(i),
                &stock_vtep_mac(i),
                &[StockPeer {
                    subnet: node_subnet(peer_i),
                    public_ip: peer.underlay_ip(),
                    vtep_mac: &mac,
                }],
            )?;
        } else {
            // flannel's host-gw route: via the peer's PublicIP on the external interface.
            route_via(
                node.ns(),
                node_subnet(peer_i),
                peer.underlay_ip(),
                &["dev", "eth0"],
            )?;
        }
        if id == PathId::R {
            // The outside host's answers go to the pod itself, not to a masquerading node.
            route_via(cluster.underlay(), node_subnet(i), node.underlay_ip(), &[])?;
        } else {
            install_flannel_rules(node, node_subnet(i))?;
        }
        let mtu = if id == PathId::K {
            VXLAN_MTU
        } else {
            PLAIN_MTU
        };
        node.add_pod_in("p0", bridge_cidr(i), mtu)?;
    }
    finish(id, cluster)
}

/// E or EH: our agent, subnet forced through the subnet file.
fn ours(id: PathId, mode: Mode) -> Result<PathTopo> {
    let backend = if id == PathId::E { "vxlan" } else { "host-gw" };
    let config = format!(r#"{{"Network": "{NETWORK}", "Backend": {{"Type": "{backend}"}}}}"#);
    let cluster = cluster_base(Some(&config))?;
    // Offloads before the agents, as a NIC has them before its node's agent starts.
    if mode == Mode::Nic {
        cluster_nic_offloads(&cluster)?;
    }
    let mtu = if id == PathId::E {
        VXLAN_MTU
    } else {
        PLAIN_MTU
    };
    for (i, node) in cluster.nodes().iter().enumerate() {
        forward_drop(node)?;
        let env = format!(
            "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n",
            bridge_cidr(i)
        );
        std::fs::write(node.subnet_file(), env)
            .with_context(|| format!("writing {}", node.subnet_file().display()))?;
        node.start_agent(&["--ip-masq"])?;
    }
    for (i, node) in cluster.nodes().iter().enumerate() {
        // The file is there already; wait until the agent has acquired the lease it names.
        let key = format!(
            "{}/subnets/{}-24",
            cluster.etcd_prefix(),
            node_subnet(i).network()
        );
        wait_for(Duration::from_secs(30), || {
            Ok(cluster.etcd().get(&key)?.is_some())
        })
        .with_context(|| format!("{}: the agent did not take the lease {key}", node.name()))?;
        let env = node.subnet_env()?;
        ensure!(
            env.subnet == bridge_cidr(i) && env.mtu == mtu,
            "{}: the agent chose {} MTU {}, not the forced {} MTU {mtu}",
            node.name(),
            env.subnet,
            env.mtu,
            bridge_cidr(i)
        );
        node.add_pod_in("p0", bridge_cidr(i), mtu)?;
    }
    finish(id, cluster)
}

fn finish(id: PathId, cluster: Cluster) -> Result<PathTopo> {
    let n0 = cluster.node(0);
    let n1 = cluster.node(1);
    let client = cluster.pod(0, 0);
    let server = cluster.pod(1, 0);
    ensure!(
        client.ip() == pod_ip(0) && server.ip() == pod_ip(1),
        "pods got {} and {}, not {} and {}",
        client.ip(),
        server.ip(),
        pod_ip(0),
        pod_ip(1)
    );
    let mut state = String::new();
    if matches!(id, PathId::K | PathId::H | PathId::R) {
        let show = |args: &[&str]| -> String {
            n0.ns()
                .run(args[0], &args[1..])
                .unwrap_or_else(|e| format!("({e:#})"))
        };
        let _ = writeln!(
            state,
            "$ iptables-save   # on n0\n{}",
            show(&["iptables-save"])
        );
        let _ = writeln!(state, "$ ip route   # on n0\n{}", show(&["ip", "route"]));
        if id == PathId::K {
            let _ = writeln!(
                state,
                "$ ip -d link show flannel.1\n{}",
                show(&["ip", "-d", "link", "show", "flannel.1"])
            );
            let _ = writeln!(
                state,
                "$ bridge fdb show dev flannel.1\n{}",
                show(&["bridge", "fdb", "show", "dev", "flannel.1"])
            );
            let _ = writeln!(
                state,
                "$ ip neigh show dev flannel.1\n{}",
                show(&["ip", "neigh", "show", "dev", "flannel.1"])
            );
        }
    }
    let mut devices: Vec<(String, String, String)> = [
        ("n0 eth0 (underlay, sender)", n0.ns().name(), "eth0"),
        ("underlay port of n0", cluster.underlay().name(), n0.name()),
        ("n1 eth0 (underlay, receiver)", n1.ns().name(), "eth0"),
        ("client pod eth0", client.ns().name(), "eth0"),
    ]
    .into_iter()
    .map(|(label, ns, dev)| (label.to_owned(), ns.to_owned(), dev.to_owned()))
    .collect();
    if id == PathId::K {
        let (ns, dev) = (n1.ns().name().to_owned(), "flannel.1".to_owned());
        devices.push(("n1 flannel.1".to_owned(), ns, dev));
    }
    let outside = cluster.outside();
    Ok(PathTopo {
        id,
        client: client.ns().name().to_owned(),
        server: server.ns().name().to_owned(),
        server_ip: server.ip(),
        outside: Some((outside.ns().name().to_owned(), outside.ip())),
        devices,
        state,
        keep: Keep::Cluster(Box::new(cluster)),
    })
}

/// Polls `cond` every 20 ms until it holds; fails after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond()? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
