//! A cluster of node namespaces on one underlay bridge, with etcd, agents and pods.
//!
//! Addresses: node `i` is `198.18.0.<i+1>/24` on its `eth0`; the underlay namespace holds
//! `198.18.0.254` on its bridge `br0` (etcd listens there on 2379, and it routes to the optional
//! outside host `198.19.0.1`). Nodes have a default route via `198.18.0.254` (the agent picks the
//! default route's interface unless `--iface` says otherwise) and `ip_forward=1`. Pods hang off a
//! bridge `cni0` in their node, addressed from the node's `FLANNEL_SUBNET` like Docker's `--bip`.
//! Optionally ([`ClusterBuilder::second_segment`]) some nodes sit on a second segment
//! `198.18.1.0/24` (bridge `br1`, gateway `198.18.1.254`), routed to the first by the underlay
//! namespace.

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;

use crate::{
    agent::{AgentProcess, TERM_GRACE},
    cmd,
    etcd::{DEFAULT_ETCD_PREFIX, EtcdServer, TlsFiles},
    netns::{NetNs, add_veth},
    traffic::{self, PingReport, TransferReport, UdpReport},
};

/// The underlay namespace's address on the node bridge: default gateway of the nodes, etcd.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// Prefix length of the node network 198.18.0.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The underlay namespace's address on the second segment's bridge `br1` (198.18.1.0/24, see
/// [`ClusterBuilder::second_segment`]): the default gateway of the nodes there.
pub const SECOND_SEGMENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
/// The outside host's address.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The underlay namespace's address towards the outside host.
pub const OUTSIDE_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;
/// What an agent logs when it has attached its programs to the pod bridge the pods are on.
const BRIDGE_ATTACHED_LOG: &str = "pod bridge cni0 (index ";
/// How long [`ClusterBuilder::build`] waits for every agent to log [`BRIDGE_ATTACHED_LOG`].
const BRIDGE_ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Node::subnet_env`] waits for the agent to write the subnet file.
pub const SUBNET_ENV_TIMEOUT: Duration = Duration::from_secs(30);
/// Most nodes a cluster can have (198.18.0.1 ..= 198.18.0.200).
pub const MAX_NODES: usize = 200;

/// Something with a namespace and an address that traffic can be sent from or to.
pub trait Endpoint {
    /// Its network namespace.
    fn ns(&self) -> &NetNs;
    /// Its (primary) IPv4 address.
    fn ip(&self) -> Ipv4Addr;
    /// A short name for messages, e.g. `n0/p1`.
    fn label(&self) -> String;
}

/// Inherent traffic methods for an [`Endpoint`] type, so tests need no trait import.
macro_rules! endpoint_methods {
    ($t:ty) => {
        impl $t {
            /// `ping -c count` to `dst` (≤ 1 s per echo); lost echoes are reported, not errors.
            pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<PingReport> {
                traffic::ping(Endpoint::ns(self), dst, count)
            }

            /// Pings `dst` until one echo comes back; fails after `timeout`.
            pub fn ping_until(&self, dst: Ipv4Addr, timeout: Duration) -> Result<PingReport> {
                traffic::ping_until(Endpoint::ns(self), dst, timeout)
            }

            /// Sends `bytes` bytes over TCP to `to` (server in `to`'s namespace), verifying every
            /// byte; fails unless all arrived intact.
            pub fn tcp_transfer(&self, to: &dyn Endpoint, bytes: u64) -> Result<TransferReport> {
                traffic::tcp_transfer(self, to, bytes)
            }

            /// Sends `count` UDP datagrams to `to`, which echoes them back.
            pub fn udp_echo(&self, to: &dyn Endpoint, count: u64) -> Result<UdpReport> {
                traffic::udp_echo(self, to, count)
            }
        }
    };
}

/// The parsed subnet file (`--subnet-file`) written by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`, e.g. 172.17.0.0/16.
    pub network: Ipv4Net,
    /// `FLANNEL_SUBNET`: the first usable address of the lease with its prefix, e.g.
    /// 172.17.5.1/24 (`subnet.addr()` is the bridge address, `subnet.trunc()` the lease).
    pub subnet: Ipv4Net,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
    /// All `KEY=value` lines in file order (including any IPv6 keys).
    pub entries: Vec<(String, String)>,
}

impl SubnetEnv {
    /// Parses the file's contents; fails unless the four IPv4 keys are present and valid.
    pub fn parse(text: &str) -> Result<Self> {
        let entries: Vec<(String, String)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .with_context(|| format!("bad line {l:?}"))
            })
            .collect::<Result<_>>()?;
        let get = |key: &str| -> Result<&str> {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .with_context(|| format!("no {key}"))
        };
        Ok(Self {
            network: get("FLANNEL_NETWORK")?.parse().context("FLANNEL_NETWORK")?,
            subnet: get("FLANNEL_SUBNET")?.parse().context("FLANNEL_SUBNET")?,
            mtu: get("FLANNEL_MTU")?.parse().context("FLANNEL_MTU")?,
            ipmasq: get("FLANNEL_IPMASQ")?.parse().context("FLANNEL_IPMASQ")?,
            entries,
        })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The keys in file order.
    pub fn keys(&self) -> Vec<&str> {
        self.entries.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Builds a [`Cluster`]; see [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    pods_per_node: usize,
    network_config: Option<String>,
    etcd_prefix: Option<String>,
    outside: bool,
    agent_args: Vec<String>,
    node_agent_args: BTreeMap<usize, Vec<String>>,
    start_agents: Option<bool>,
    underlay_mtu: u32,
    etcd_tls: bool,
    second_segment: Vec<usize>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 0,
            network_config: None,
            etcd_prefix: None,
            outside: false,
            agent_args: Vec::new(),
            node_agent_args: BTreeMap::new(),
            start_agents: None,
            underlay_mtu: 1500,
            etcd_tls: false,
            second_segment: Vec::new(),
        }
    }
}

impl ClusterBuilder {
    /// Number of nodes (default 2, at most [`MAX_NODES`]).
    #[must_use]
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Pods `p0..p<k-1>` per node (default 0). Needs agents (they write the subnet file the pods
    /// are addressed from), so `k > 0` starts them unless `start_agents(false)` (then `build`
    /// fails).
    #[must_use]
    pub fn pods_per_node(mut self, k: usize) -> Self {
        self.pods_per_node = k;
        self
    }

    /// The flannel network config (JSON) written to `<prefix>/config` before agents start.
    /// Without it no config is written.
    #[must_use]
    pub fn network_config(mut self, json: impl Into<String>) -> Self {
        self.network_config = Some(json.into());
        self
    }

    /// The etcd prefix (default flannel's `/coreos.com/network`). When set, agents get
    /// `--etcd-prefix <prefix>`.
    #[must_use]
    pub fn etcd_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.etcd_prefix = Some(prefix.into());
        self
    }

    /// Adds the outside host ([`OUTSIDE_IP`]), routed by the underlay namespace.
    #[must_use]
    pub fn outside(mut self, yes: bool) -> Self {
        self.outside = yes;
        self
    }

    /// Extra arguments for the agents the builder starts (e.g. `["--ip-masq"]`).
    #[must_use]
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Arguments for node `i`'s agent instead of [`ClusterBuilder::agent_args`] (a cluster
    /// whose nodes differ, e.g. one without `--ip-masq`).
    #[must_use]
    pub fn node_agent_args(mut self, i: usize, args: &[&str]) -> Self {
        self.node_agent_args
            .insert(i, args.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Whether `build` starts an agent on every node and waits for its subnet file (default:
    /// only when pods are requested).
    #[must_use]
    pub fn start_agents(mut self, yes: bool) -> Self {
        self.start_agents = Some(yes);
        self
    }

    /// Puts the nodes with these indexes on a second L2 segment, 198.18.1.0/24: bridge `br1` in
    /// the underlay namespace, which routes between the two segments (it has `ip_forward=1`)
    /// and holds [`SECOND_SEGMENT_GATEWAY`], the default gateway of those nodes. Node `i` there
    /// is `198.18.1.<i+1>`; etcd stays at 198.18.0.254, reached through that router. Default:
    /// every node on the first segment. Nodes added later with [`Cluster::add_node`] follow
    /// the same list.
    #[must_use]
    pub fn second_segment(mut self, nodes: &[usize]) -> Self {
        self.second_segment = nodes.to_vec();
        self
    }

    /// MTU of the underlay links (default 1500).
    #[must_use]
    pub fn underlay_mtu(mut self, mtu: u32) -> Self {
        self.underlay_mtu = mtu;
        self
    }

    /// Serve etcd over TLS only (default false): `build` makes a throwaway CA, a server
    /// certificate for [`UNDERLAY_GATEWAY`] and a client certificate ([`TlsFiles::generate`],
    /// in `<cluster dir>/tls`), etcd requires client certificates, nodes reach it at
    /// `https://198.18.0.254:2379`, and [`Node::start_agent`] passes the three `--etcd-*file`
    /// flags.
    #[must_use]
    pub fn etcd_tls(mut self, yes: bool) -> Self {
        self.etcd_tls = yes;
        self
    }

    /// Builds the cluster: checks for root and tools ([`crate::require_root`], panics if
    /// missing), removes leftovers of crashed runs, creates the underlay, etcd, the outside host
    /// and the nodes; then, if agents are to start, starts them, waits for their subnet files,
    /// adds the pods and waits for the agents to attach to the pods' bridge. Whatever was created is removed again if a step fails.
    pub fn build(self) -> Result<Cluster> {
        crate::require_root();
        if let Err(e) = crate::cleanup_leftovers() {
            eprintln!("overlay-tests: warning: {e:#}");
        }
        ensure!(
            (1..=MAX_NODES).contains(&self.nodes),
            "nodes must be 1..={MAX_NODES}"
        );
        ensure!(
            (576..=9000).contains(&self.underlay_mtu),
            "underlay MTU must be 576..=9000"
        );
        let start_agents = self.start_agents.unwrap_or(self.pods_per_node > 0);
        ensure!(
            start_agents || self.pods_per_node == 0,
            "pods_per_node needs agents (they write the subnet file); use Node::add_pod_in without agents"
        );
        ensure!(
            !start_agents || self.network_config.is_some(),
            "agents are started, so set network_config (or start_agents(false) and write it yourself)"
        );

        let id = crate::unique_id();
        let dir = crate::temp_dir(&id)?;
        let mtu = self.underlay_mtu;

        let ul = Arc::new(NetNs::new(format!("{id}-ul"))?);
        ul.add_bridge("br0")?;
        ul.set_mtu("br0", mtu)?;
        ul.add_addr("br0", &format!("{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN}"))?;
        ul.sysctl("net.ipv4.ip_forward", "1")?;
        if !self.second_segment.is_empty() {
            ul.add_bridge("br1")?;
            ul.set_mtu("br1", mtu)?;
            ul.add_addr(
                "br1",
                &format!("{SECOND_SEGMENT_GATEWAY}/{UNDERLAY_PREFIX_LEN}"),
            )?;
        }
        let etcd = if self.etcd_tls {
            let tls = TlsFiles::generate(&dir.path().join("tls"), UNDERLAY_GATEWAY)?;
            EtcdServer::start_in_tls(&ul, UNDERLAY_GATEWAY, tls)
                .context("starting etcd with TLS in the underlay namespace")?
        } else {
            EtcdServer::start_in(&ul, UNDERLAY_GATEWAY)
                .context("starting etcd in the underlay namespace")?
        };
        if let Some(cfg) = &self.network_config {
            etcd.put_network_config(self.etcd_prefix.as_deref(), cfg)?;
        }

        let outside = if self.outside {
            let ns = Arc::new(NetNs::new(format!("{id}-out"))?);
            add_veth(&ns, "eth0", &ul, "out0")?;
            for (n, dev, addr) in [(&ns, "eth0", OUTSIDE_IP), (&ul, "out0", OUTSIDE_GATEWAY)] {
                n.set_mtu(dev, mtu)?;
                n.add_addr(dev, &format!("{addr}/24"))?;
                n.link_up(dev)?;
            }
            ns.add_default_route(&OUTSIDE_GATEWAY.to_string(), "eth0")?;
            Some(Host {
                name: "outside".to_owned(),
                ns,
                ip: OUTSIDE_IP,
            })
        } else {
            None
        };

        let mut cluster = Cluster {
            id,
            ul,
            etcd,
            nodes: Vec::new(),
            outside,
            etcd_prefix: self.etcd_prefix,
            underlay_mtu: mtu,
            second_segment: self.second_segment,
            dir: Some(dir),
        };
        for _ in 0..self.nodes {
            cluster.add_node()?;
        }
        if start_agents {
            for (i, node) in cluster.nodes.iter().enumerate() {
                let args = self.node_agent_args.get(&i).unwrap_or(&self.agent_args);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                node.start_agent(&args)?;
            }
            for node in &cluster.nodes {
                node.subnet_env()?;
            }
            for node in &cluster.nodes {
                for j in 0..self.pods_per_node {
                    node.add_pod(&format!("p{j}"))?;
                }
            }
            // The agents find the bridge the first pod created by themselves; until then the
            // pods' traffic takes the kernel's way, which a test would take for ours.
            for node in cluster.nodes.iter().filter(|_| self.pods_per_node > 0) {
                if let Some(agent) = node.agent() {
                    agent.wait_for_log(BRIDGE_ATTACHED_LOG, BRIDGE_ATTACH_TIMEOUT)?;
                }
            }
        }
        Ok(cluster)
    }
}

/// A test cluster; everything in it is removed on drop: agents stopped first (SIGTERM, then
/// SIGKILL), then pods, nodes, the outside host, etcd, the underlay, the temporary directory.
/// When dropped during a panic, it prints etcd's keys under the prefix and the agents' logs.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    ul: Arc<NetNs>,
    etcd: EtcdServer,
    nodes: Vec<Node>,
    outside: Option<Host>,
    etcd_prefix: Option<String>,
    underlay_mtu: u32,
    second_segment: Vec<usize>,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// A builder: 2 nodes, no pods, no agents, no config, no outside host.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// `ovl-<pid>-<n>`: prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cluster's temporary directory (logs, subnet files).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), tempfile::TempDir::path)
    }

    /// The etcd server (in the underlay namespace at `http://198.18.0.254:2379`, or `https://`
    /// with [`ClusterBuilder::etcd_tls`]).
    pub fn etcd(&self) -> &EtcdServer {
        &self.etcd
    }

    /// The etcd prefix agents use.
    pub fn etcd_prefix(&self) -> &str {
        self.etcd_prefix.as_deref().unwrap_or(DEFAULT_ETCD_PREFIX)
    }

    /// Writes the flannel network config at `<prefix>/config`.
    pub fn put_network_config(&self, json: &str) -> Result<()> {
        self.etcd.put_network_config(Some(self.etcd_prefix()), json)
    }

    /// The underlay namespace (bridge `br0`, ports `n<i>` and `out0`), e.g. for captures.
    pub fn underlay(&self) -> &NetNs {
        &self.ul
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`. Panics when out of range.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes.get(i).unwrap_or_else(|| {
            panic!(
                "cluster {} has no node {i} ({} nodes)",
                self.id,
                self.nodes.len()
            )
        })
    }

    /// Pod `j` (in creation order) of node `i`. Panics when absent.
    pub fn pod(&self, i: usize, j: usize) -> Pod {
        let node = self.node(i);
        node.pods()
            .get(j)
            .cloned()
            .unwrap_or_else(|| panic!("node {} has no pod #{j}", node.name()))
    }

    /// The outside host. Panics unless the builder enabled it.
    pub fn outside(&self) -> &Host {
        self.outside
            .as_ref()
            .unwrap_or_else(|| panic!("cluster built without .outside(true)"))
    }

    /// Adds node `n<len>` (no agent started).
    pub fn add_node(&mut self) -> Result<&Node> {
        let index = self.nodes.len();
        ensure!(index < MAX_NODES, "at most {MAX_NODES} nodes");
        let node = Node::create(self, index)?;
        self.nodes.push(node);
        Ok(&self.nodes[index])
    }

    /// Starts an agent on every node with `extra_args`; returns them in node order.
    /// Deletes node `i`'s `eth0` (and with it its port on the underlay bridge), as an
    /// operator's mistake or a driver reset does to the agent's external interface.
    pub fn remove_underlay_link(&self, i: usize) -> Result<()> {
        self.node(i).ns().ip(&["link", "del", "eth0"]).map(drop)
    }

    /// Creates node `i`'s `eth0` again as the cluster built it (same name, address, route; a
    /// new interface index), after [`Cluster::remove_underlay_link`].
    pub fn restore_underlay_link(&self, i: usize) -> Result<()> {
        let node = self.node(i);
        Node::connect_underlay(self, node.ns(), i, node.underlay_ip())
    }

    pub fn start_agents(&self, extra_args: &[&str]) -> Result<Vec<AgentProcess>> {
        self.nodes
            .iter()
            .map(|n| n.start_agent(extra_args))
            .collect()
    }

    fn teardown(&mut self) {
        if thread::panicking() {
            // Short limits: etcd itself may be what failed.
            let c = self.etcd.etcdctl_command(&[
                "get",
                "--prefix",
                self.etcd_prefix(),
                "-w",
                "json",
                "--command-timeout=3s",
            ]);
            let kvs = cmd::check_with(c, None, Duration::from_secs(5))
                .and_then(|out| crate::etcd::parse_get(&out));
            match kvs {
                Ok(kvs) => {
                    eprintln!(
                        "----- etcd keys under {} (cluster {}) -----",
                        self.etcd_prefix(),
                        self.id
                    );
                    for kv in kvs {
                        eprintln!("{} (lease {:x}) = {}", kv.key, kv.lease, kv.value);
                    }
                    eprintln!("----- end of etcd keys -----");
                }
                Err(e) => eprintln!("overlay-tests: cannot list etcd keys: {e:#}"),
            }
        }
        let agents: Vec<AgentProcess> = self
            .nodes
            .iter()
            .flat_map(|n| n.state().agents.clone())
            .collect();
        AgentProcess::stop_all(&agents, TERM_GRACE);
        drop(agents);
        for node in &self.nodes {
            let pods = std::mem::take(&mut node.state().pods);
            for pod in pods {
                warn(pod.ns.delete());
            }
        }
        for node in &self.nodes {
            // Drops the cluster's agent handles: logs are printed here when panicking.
            node.state().agents.clear();
            warn(node.ns.delete());
            // After the namespace: its devices (and so the pinned links' hooks) are gone.
            warn(crate::unmount(&node.dir.join(BPFFS_DIR)));
        }
        if let Some(h) = &self.outside {
            warn(h.ns.delete());
        }
        self.etcd.stop();
        warn(self.ul.delete());
        drop(self.dir.take());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn warn(r: Result<()>) {
    if let Err(e) = r {
        eprintln!("overlay-tests: cleanup: {e:#}");
    }
}

#[derive(Debug)]
struct NodeState {
    bridge: Option<Bridge>,
    pods: Vec<Pod>,
    /// Addresses of removed pods, never handed out again (so tests can tell old from new).
    retired: Vec<Ipv4Addr>,
    agents: Vec<AgentProcess>,
    veths: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bridge {
    gateway: Ipv4Net,
    mtu: u32,
}

/// Directory in a node's dir where its bpffs is mounted.
const BPFFS_DIR: &str = "bpffs";

/// A node: a namespace with `eth0` on the underlay, where an agent runs and pods attach.
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    ns: Arc<NetNs>,
    ip: Ipv4Addr,
    dir: PathBuf,
    cluster_id: String,
    etcd_endpoint: String,
    etcd_prefix: Option<String>,
    etcd_tls: Option<TlsFiles>,
    state: Mutex<NodeState>,
}

impl Node {
    fn create(cluster: &Cluster, index: usize) -> Result<Self> {
        let name = format!("n{index}");
        let segment = u8::from(cluster.second_segment.contains(&index));
        let ip = Ipv4Addr::new(198, 18, segment, u8::try_from(index + 1)?);
        let ns = Arc::new(NetNs::new(format!("{}-{name}", cluster.id))?);
        Self::connect_underlay(cluster, &ns, index, ip)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let dir = cluster.dir().join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // The agent pins its data path under --bpf-dir. `ip netns exec` gives every agent a
        // private /sys, so /sys/fs/bpf would vanish with the agent process: a bpffs of the
        // node's own, mounted here, lets pins outlive one agent as they do on a real host.
        crate::mount_bpffs(&dir.join(BPFFS_DIR))?;
        Ok(Self {
            index,
            name,
            ns,
            ip,
            dir,
            cluster_id: cluster.id.clone(),
            etcd_endpoint: cluster.etcd.endpoint().to_owned(),
            etcd_prefix: cluster.etcd_prefix.clone(),
            etcd_tls: cluster.etcd.tls().cloned(),
            state: Mutex::new(NodeState {
                bridge: None,
                pods: Vec::new(),
                retired: Vec::new(),
                agents: Vec::new(),
                veths: 0,
            }),
        })
    }

    /// The node's `eth0` (address `ip`), a veth whose other end `n<index>` is a port of the
    /// underlay bridge of its segment, and the default route through that segment's gateway.
    fn connect_underlay(cluster: &Cluster, ns: &NetNs, index: usize, ip: Ipv4Addr) -> Result<()> {
        let name = format!("n{index}");
        let (bridge, gateway) = if cluster.second_segment.contains(&index) {
            ("br1", SECOND_SEGMENT_GATEWAY)
        } else {
            ("br0", UNDERLAY_GATEWAY)
        };
        let mtu = cluster.underlay_mtu;
        add_veth(ns, "eth0", &cluster.ul, &name)?;
        cluster.ul.set_mtu(&name, mtu)?;
        cluster.ul.set_master(&name, bridge)?;
        cluster.ul.link_up(&name)?;
        ns.set_mtu("eth0", mtu)?;
        ns.add_addr("eth0", &format!("{ip}/{UNDERLAY_PREFIX_LEN}"))?;
        ns.link_up("eth0")?;
        ns.add_default_route(&gateway.to_string(), "eth0")
    }

    fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Its index in the cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `n<index>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Its address on the underlay (`198.18.0.<index+1>`, or `198.18.1.<index+1>` on the second
    /// segment; on `eth0`).
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its directory (agent logs, subnet file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `--bpf-dir` given to its agents: on the node's own bpffs.
    pub fn bpf_dir(&self) -> PathBuf {
        self.dir.join(BPFFS_DIR).join("overlay")
    }

    /// The `--subnet-file` given to its agents.
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The `--status-file` given to its agents (and to [`Node::agent_cmd`]).
    pub fn status_file(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    /// The etcd URL reachable from the node.
    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd_endpoint
    }

    /// Starts the agent in this node: `--etcd-endpoints http://198.18.0.254:2379 --iface eth0
    /// --subnet-file <dir>/subnet.env` (and `--etcd-prefix` when the cluster has one), each
    /// left out when `extra_args` gives that flag itself, then `extra_args`. With
    /// [`ClusterBuilder::etcd_tls`] the endpoint is `https://` and `--etcd-cafile`,
    /// `--etcd-certfile`, `--etcd-keyfile` are added as a group, unless `extra_args` gives any
    /// of the three. Log in `<dir>/agent-<k>.log`. The cluster stops it on drop; the returned
    /// handle can stop it earlier.
    pub fn start_agent(&self, extra_args: &[&str]) -> Result<AgentProcess> {
        self.start_agent_env(extra_args, &[])
    }

    /// [`Node::start_agent`] with environment variables `envs` for the agent (e.g. flanneld's
    /// `FLANNELD_ETCD_PREFIX`). A default flag is also left out when `envs` sets its
    /// `FLANNELD_<NAME>` variable, so that the variable is what the agent sees.
    pub fn start_agent_env(
        &self,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let given =
            |flag: &str| has_flag(&extra, flag) || envs.iter().any(|(k, _)| *k == env_name(flag));
        let mut args = Vec::new();
        let mut default = |flag: &str, value: String| {
            if !given(flag) {
                args.push(flag.to_owned());
                args.push(value);
            }
        };
        default("--etcd-endpoints", self.etcd_endpoint.clone());
        default("--iface", "eth0".to_owned());
        default("--subnet-file", self.subnet_file().display().to_string());
        default("--bpf-dir", self.bpf_dir().display().to_string());
        default("--status-file", self.status_file().display().to_string());
        if let Some(p) = &self.etcd_prefix {
            default("--etcd-prefix", p.clone());
        }
        let tls_flags = ["--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"];
        if let Some(tls) = &self.etcd_tls
            && !tls_flags.iter().any(|f| given(f))
        {
            for (flag, path) in tls_flags
                .iter()
                .zip([&tls.ca, &tls.client_cert, &tls.client_key])
            {
                args.push((*flag).to_owned());
                args.push(path.display().to_string());
            }
        }
        args.extend(extra);
        self.spawn_agent(&args, &envs)
    }

    /// Starts the agent with exactly `args` (no defaults).
    pub fn start_agent_raw(&self, args: &[&str]) -> Result<AgentProcess> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        self.spawn_agent(&args, &[])
    }

    /// The TLS files when the cluster's etcd serves over TLS ([`ClusterBuilder::etcd_tls`]).
    pub fn etcd_tls(&self) -> Option<&TlsFiles> {
        self.etcd_tls.as_ref()
    }

    fn spawn_agent(&self, args: &[String], envs: &[(String, String)]) -> Result<AgentProcess> {
        let bin = crate::agent_bin()?;
        let mut state = self.state();
        let log = self.dir.join(format!("agent-{}.log", state.agents.len()));
        let label = format!("{}#{}", self.name, state.agents.len());
        let agent = AgentProcess::spawn_with_env(&self.ns, &bin, args, envs, log, &label)?;
        state.agents.push(agent.clone());
        Ok(agent)
    }

    /// Runs `overlay-agent <args> --bpf-dir <`[`Node::bpf_dir`]`> --status-file
    /// <`[`Node::status_file`]`>` in the node (the agent's inspection and maintenance
    /// subcommands: `counters`, `peers`, `nat`, `status`, `cleanup`, …) and returns its stdout;
    /// fails when it exits non-zero.
    pub fn agent_cmd(&self, args: &[&str]) -> Result<String> {
        let bin = crate::agent_bin()?;
        let dir = self.bpf_dir().display().to_string();
        let status = self.status_file().display().to_string();
        let mut all = args.to_vec();
        all.extend(["--bpf-dir", dir.as_str(), "--status-file", status.as_str()]);
        self.ns.run(&bin, &all).with_context(|| {
            format!(
                "`overlay-agent {} --bpf-dir {dir}` in {}",
                args.join(" "),
                self.name
            )
        })
    }

    /// The agent started last on this node, if any.
    pub fn agent(&self) -> Option<AgentProcess> {
        self.state().agents.last().cloned()
    }

    /// Reads the subnet file, waiting up to [`SUBNET_ENV_TIMEOUT`] for it to appear (fails early
    /// if the node's agent exits).
    pub fn subnet_env(&self) -> Result<SubnetEnv> {
        self.wait_subnet_env(SUBNET_ENV_TIMEOUT)
    }

    /// The subnet file now, None when absent.
    pub fn try_subnet_env(&self) -> Result<Option<SubnetEnv>> {
        match std::fs::read_to_string(self.subnet_file()) {
            Ok(text) => SubnetEnv::parse(&text)
                .map(Some)
                .with_context(|| format!("parsing {}", self.subnet_file().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.subnet_file().display())),
        }
    }

    /// Reads the subnet file, waiting up to `timeout` for a complete one.
    pub fn wait_subnet_env(&self, timeout: Duration) -> Result<SubnetEnv> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.try_subnet_env();
            if let Ok(Some(env)) = last {
                return Ok(env);
            }
            let agent = self.agent();
            if let Some(a) = &agent
                && let Some(status) = a.exit_status()
            {
                bail!(
                    "agent {} exited ({status}) before writing {}; log:\n{}",
                    a.label(),
                    self.subnet_file().display(),
                    cmd::tail(&a.log(), 6000)
                );
            }
            if Instant::now() >= deadline {
                let why = match last {
                    Err(e) => format!("{e:#}"),
                    _ => "it does not exist".to_owned(),
                };
                let log = agent.map_or_else(
                    || "(no agent started)".to_owned(),
                    |a| cmd::tail(&a.log(), 6000),
                );
                bail!(
                    "no valid {} on {} within {timeout:?} ({why}); agent log:\n{log}",
                    self.subnet_file().display(),
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adds pod `name` addressed from the subnet file (waits for it): bridge `cni0` with the
    /// `FLANNEL_SUBNET` address and `FLANNEL_MTU`, the pod's `eth0` on it with the next free
    /// address, default route via the bridge.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let env = self.subnet_env()?;
        self.add_pod_in(name, env.subnet, env.mtu)
    }

    /// Adds pod `name` on bridge `cni0` whose address is `gateway` (e.g. 172.16.5.1/24) with MTU
    /// `mtu`; the bridge is created by the first pod (and re-created by the next pod if it was
    /// deleted), later pods must give the same values. The pod gets the next free address of the
    /// subnet. Works without an agent.
    pub fn add_pod_in(&self, name: &str, gateway: Ipv4Net, mtu: u32) -> Result<Pod> {
        self.add_pod_at(name, gateway, mtu, None)
    }

    /// Adds pod `name` as [`Node::add_pod`] does, its host-side veth created with the interface
    /// index `ifindex` (as a runtime may get an index back that a removed pod had).
    pub fn add_pod_with_ifindex(&self, name: &str, ifindex: u32) -> Result<Pod> {
        let env = self.subnet_env()?;
        self.add_pod_at(name, env.subnet, env.mtu, Some(ifindex))
    }

    /// Removes pod `name`: its namespace goes, and with it both ends of its veth, as when a
    /// container runtime deletes a container. Its address is not given to later pods.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let pod = {
            let mut state = self.state();
            let at = state
                .pods
                .iter()
                .position(|p| p.name == name)
                .with_context(|| format!("node {} has no pod {name}", self.name))?;
            let pod = state.pods.remove(at);
            state.retired.push(pod.ip);
            pod
        };
        pod.ns.delete()
    }

    fn add_pod_at(
        &self,
        name: &str,
        gateway: Ipv4Net,
        mtu: u32,
        ifindex: Option<u32>,
    ) -> Result<Pod> {
        ensure!(
            !name.is_empty()
                && name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "bad pod name {name:?} (1..=32 of [A-Za-z0-9_-])"
        );
        ensure!(
            (576..=9000).contains(&mtu),
            "pod MTU {mtu} out of 576..=9000"
        );
        let mut state = self.state();
        ensure!(
            !state.pods.iter().any(|p| p.name == name),
            "node {} already has pod {name}",
            self.name
        );
        let create_bridge = || -> Result<()> {
            self.ns.add_bridge("cni0")?;
            self.ns.set_mtu("cni0", mtu)?;
            self.ns.add_addr("cni0", &gateway.to_string())
        };
        match state.bridge {
            None => {
                create_bridge()?;
                state.bridge = Some(Bridge { gateway, mtu });
            }
            Some(b) => {
                ensure!(
                    b.gateway == gateway && b.mtu == mtu,
                    "node {} bridge cni0 is {} mtu {}, not {gateway} mtu {mtu} (did the subnet change?)",
                    self.name,
                    b.gateway,
                    b.mtu
                );
                // Deleted behind the harness's back (`ip link del cni0` in a test): re-created
                // as the first pod created it, as the CNI bridge plugin does. Earlier pods stay
                // detached from it.
                if self.ns.ip(&["link", "show", "dev", "cni0"]).is_err() {
                    create_bridge()?;
                }
            }
        }
        let ip = gateway
            .hosts()
            .find(|a| {
                *a != gateway.addr()
                    && !state.pods.iter().any(|p| p.ip == *a)
                    && !state.retired.contains(a)
            })
            .with_context(|| format!("no free address left in {gateway} on {}", self.name))?;

        let ns = Arc::new(NetNs::new(format!(
            "{}-{}-{name}",
            self.cluster_id, self.name
        ))?);
        let veth = format!("veth{}", state.veths);
        state.veths += 1;
        match ifindex {
            None => add_veth(&ns, "eth0", &self.ns, &veth)?,
            Some(index) => {
                let index = index.to_string();
                self.ns.ip(&[
                    "link",
                    "add",
                    &veth,
                    "index",
                    &index,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name(),
                ])?;
            }
        }
        self.ns.set_mtu(&veth, mtu)?;
        self.ns.set_master(&veth, "cni0")?;
        self.ns.link_up(&veth)?;
        ns.set_mtu("eth0", mtu)?;
        ns.add_addr("eth0", &format!("{ip}/{}", gateway.prefix_len()))?;
        ns.link_up("eth0")?;
        ns.add_default_route(&gateway.addr().to_string(), "eth0")?;
        let pod = Pod {
            name: name.to_owned(),
            node: self.name.clone(),
            host_veth: veth,
            ns,
            ip,
            prefix_len: gateway.prefix_len(),
            gateway: gateway.addr(),
        };
        state.pods.push(pod.clone());
        Ok(pod)
    }

    /// Its pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.state().pods.clone()
    }

    /// Pod `name`, if it exists.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.state().pods.iter().find(|p| p.name == name).cloned()
    }
}

impl Endpoint for Node {
    fn ns(&self) -> &NetNs {
        &self.ns
    }

    fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn label(&self) -> String {
        self.name.clone()
    }
}

endpoint_methods!(Node);

/// A pod: a namespace with `eth0` on its node's `cni0` bridge. Cheap to clone; the cluster
/// deletes its namespace on drop.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    node: String,
    host_veth: String,
    ns: Arc<NetNs>,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
}

impl Pod {
    /// Its name within the node (e.g. `p0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its node's name (e.g. `n0`).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Its namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Its address on `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its address with the subnet's prefix.
    pub fn cidr(&self) -> Ipv4Net {
        Ipv4Net::new(self.ip, self.prefix_len)
            .unwrap_or_else(|_| unreachable!("prefix checked at creation"))
    }

    /// Its default gateway (the `cni0` address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The node-side end of its veth (in the node namespace), e.g. `veth0`.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
}

impl Endpoint for Pod {
    fn ns(&self) -> &NetNs {
        &self.ns
    }

    fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn label(&self) -> String {
        format!("{}/{}", self.node, self.name)
    }
}

endpoint_methods!(Pod);

/// A plain host namespace (the outside host).
#[derive(Debug, Clone)]
pub struct Host {
    name: String,
    ns: Arc<NetNs>,
    ip: Ipv4Addr,
}

impl Host {
    /// Its namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

impl Endpoint for Host {
    fn ns(&self) -> &NetNs {
        &self.ns
    }

    fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn label(&self) -> String {
        self.name.clone()
    }
}

endpoint_methods!(Host);

impl fmt::Display for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.node, self.name, self.ip)
    }
}

/// flanneld's environment variable for `flag`: `--etcd-prefix` → `FLANNELD_ETCD_PREFIX`.
fn env_name(flag: &str) -> String {
    format!(
        "FLANNELD_{}",
        flag.trim_start_matches('-')
            .replace('-', "_")
            .to_uppercase()
    )
}

/// Whether `args` set `flag` (`--flag value` or `--flag=value`).
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| {
        a == flag
            || a.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subnet_env() {
        let text = "FLANNEL_NETWORK=172.16.0.0/16\nFLANNEL_SUBNET=172.16.57.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(env.network, "172.16.0.0/16".parse().unwrap());
        assert_eq!(env.subnet.addr(), Ipv4Addr::new(172, 16, 57, 1));
        assert_eq!(env.subnet.trunc(), "172.16.57.0/24".parse().unwrap());
        assert_eq!(env.mtu, 1450);
        assert!(env.ipmasq);
        assert_eq!(
            env.keys(),
            [
                "FLANNEL_NETWORK",
                "FLANNEL_SUBNET",
                "FLANNEL_MTU",
                "FLANNEL_IPMASQ"
            ]
        );
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=172.16.0.0/16\n").is_err());
        assert!(SubnetEnv::parse(&text.replace("1450", "x")).is_err());
    }

    #[test]
    fn flag_detection() {
        let args: Vec<String> = ["--iface=eth1", "--ip-masq", "--public-ip", "1.2.3.4"]
            .map(String::from)
            .to_vec();
        assert!(has_flag(&args, "--iface"));
        assert!(has_flag(&args, "--public-ip"));
        assert!(!has_flag(&args, "--ip"));
        assert!(!has_flag(&args, "--etcd-endpoints"));
        assert_eq!(env_name("--etcd-prefix"), "FLANNELD_ETCD_PREFIX");
    }
}
