//! The last step of the agent's pipeline, routes to maps: loading the embedded eBPF object,
//! attaching its programs and keeping its maps. Owns every map write and attachment (and the
//! inspection of pinned state: `inspect`, `print`); may call aya, the kernel's interface
//! tables and `overlay_common`, never etcd or the backends' decisions (it is told routes).
//!
//! The object is compiled by `cargo xtask build-ebpf` and embedded at build time (see build.rs),
//! so the agent binary is all a node needs. [`Datapath::load`] creates the maps and loads (so
//! verifies) every program up front; programs attach with tcx links (kernel ≥ 6.6), which
//! detach when the agent drops them.
//!
//! Where each program attaches (see the design notes in `overlay-ebpf`):
//!
//! | program            | hook                          | does                                  |
//! |--------------------|-------------------------------|---------------------------------------|
//! | `underlay_ingress` | tcx ingress, external iface   | decapsulates VXLAN for this node;     |
//! |                    |                               | delivers direct traffic (host-gw);    |
//! |                    |                               | translates masquerade replies back    |
//! | `underlay_xdp`     | native XDP, external iface    | decapsulates VXLAN before GRO, marks  |
//! |                    | (`--xdp on`, see `XdpPolicy`) | it for `underlay_ingress` (optional,  |
//! |                    |                               | never drops)                          |
//! | `underlay_egress`  | tcx egress, external iface    | counts; masquerades kernel-routed pod |
//! |                    |                               | traffic (`--ip-masq`)                 |
//! | `pod_port_egress`  | tcx ingress, pods' host-side  | the same in front of the bridge, for  |
//! |                    | veths (`--pod-hook port`)     | what it can finish (unpinned links)   |
//! | `pod_egress`       | tcx ingress, pod bridge       | encapsulates (or routes directly) pod |
//! |                    |                               | traffic to peers; masquerades pod     |
//! |                    |                               | traffic leaving the cluster           |
//! | `pod_ingress`      | tcx egress, pod bridge        | notes connections the kernel delivers |
//! |                    |                               | into pods from outside the cluster    |
//! |                    |                               | (their replies stay the kernel's)     |
//! | `host_egress`      | tcx egress, host device ovl0  | the same for host traffic; masquer-   |
//! |                    |                               | ades non-cluster sources to remote    |
//! |                    |                               | pods (flannel's last rule)            |
//! | `gro_device_ingress` | tcx ingress, GRO device     | delivers reassembled VXLAN fragments  |
//! |                    | ovl-gro (VXLAN backend)       | for us, drops the rest of what the    |
//! |                    |                               | kernel's VXLAN socket of that device  |
//! |                    |                               | received (the device exists so that   |
//! |                    |                               | GRO aggregates VXLAN)                 |
//!
//! Maps, all written only by the agent (layouts in `overlay_common`): `CONFIG` (the node's
//! settings and device indexes), `ROUTE_V4` (remote subnet → node), `NODE_V4` (member PublicIPs,
//! reference-counted), `ENDPOINT_V4` (local pod → host-side veth and MAC, kept by
//! `crate::endpoints`), `COUNTERS` (per-CPU, per reason). One map only the programs write:
//! `NEXT_HOP_V4`, their cache of the outer next hop per peer, valid under the routing generation
//! the agent keeps in `CONFIG` (renewed at every route, rule, address or link event and once a
//! second; [`Datapath::routing_changed`]), not pinned. The agent's copy of the peer state is
//! the [`PeerTable`]; everything else it writes is recomputed whole from [`NodeConfig`] and the
//! attached devices, so each map has one owner (this struct) and one writer.
//!
//! Pinning: several agents in different network namespaces share one bpffs, so the maps are
//! pinned per node under `--bpf-dir` (see `pin`) for each of [`STATE_MAPS`]; nothing in them
//! depends on the agent's memory: `NODE_V4` carries its own reference counts, `ROUTE_V4` and
//! `ENDPOINT_V4` can be listed to rebuild the agent's mirrors.
//!
//! At load the agent runs `probe_decap_l4_udp` once (`BPF_PROG_TEST_RUN`) to learn whether the
//! kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` ([`Datapath::decap_clears_tunnel_gso`]).

pub mod foreign;
mod inspect;
pub mod layout;
pub mod nat;
mod node_config;
mod peer_table;
pub mod pin;
pub mod print;
pub mod repair;

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapError},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use ipnet::Ipv4Net;
use overlay_common::{
    config::{CONFIG_INDEX, Config},
    counters::{Counter, Reason},
    endpoint::{Endpoint, EndpointKeyV4},
    route::{MemberNode, NodeKeyV4, RemoteNode, RouteKeyV4, route_key},
};

pub use self::{
    inspect::{pinned_counters, pinned_endpoints, pinned_peers, pinned_route_gen},
    node_config::{NodeConfig, Routing},
    peer_table::{MapOp, PeerTable},
};
use self::{
    node_config::{Devices, encode},
    pin::{PinDir, PinError},
};

/// The eBPF object, aligned for the ELF parser.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OVERLAY_EBPF_OBJECT"));

/// Program and map names: one spelling, shared with the eBPF crate (checked there).
pub use overlay_common::names::{
    self, GRO_DEVICE_INGRESS, HOST_EGRESS, POD_EGRESS, POD_INGRESS, POD_PORT_EGRESS,
    PROBE_DECAP_L4_UDP, TC_PROGRAMS as PROGRAMS, UNDERLAY_EGRESS, UNDERLAY_INGRESS, UNDERLAY_XDP,
};

/// The maps that hold state worth keeping across an agent restart (all pinned).
pub const STATE_MAPS: [&str; 15] = [
    names::CONFIG,
    names::ROUTE_V4,
    names::NODE_V4,
    names::ENDPOINT_V4,
    names::COUNTERS,
    // Flows the kernel forwarded for pods (Service traffic) and connections into pods: their
    // replies keep their way across a restart.
    names::KERNEL_FLOW_V4,
    names::KERNEL_FLOW_IN_V4,
    names::KERNEL_FLOW_PAIRS_V4,
    // Masquerade (`nat`): its settings and the flow tables, so connections survive a restart.
    names::NAT_MAPS[0],
    names::NAT_MAPS[1],
    names::NAT_MAPS[2],
    names::NAT_MAPS[3],
    names::NAT_MAPS[4],
    names::NAT_MAPS[5],
    // Pinned so that `monitor`, another process, can read it.
    names::DROP_EVENTS,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("failed to load the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("failed to load program {prog} into the kernel: {source}")]
    ProgramLoad {
        prog: &'static str,
        source: ProgramError,
    },
    #[error("the probe {prog} failed: {source}")]
    Probe {
        prog: &'static str,
        source: ProgramError,
    },
    #[error("failed to attach {prog} to {iface}: {source}")]
    Attach {
        prog: &'static str,
        iface: String,
        source: ProgramError,
    },
    #[error("failed to read map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("failed to update map {map}: {source}")]
    MapUpdate { map: &'static str, source: MapError },
    #[error("cannot use interface {iface}: {source}")]
    Device { iface: String, source: io::Error },
    #[error("invalid data path configuration: {0}")]
    InvalidConfig(String),
    #[error("refusing to route {subnet} to a peer: it is this node's own subnet")]
    OwnSubnet { subnet: Ipv4Net },
    #[error("link of {prog}: {source}")]
    Link {
        prog: &'static str,
        source: LinkError,
    },
    #[error("cannot ask the kernel for the programs on {iface}: {source}")]
    Query { iface: String, source: ProgramError },
    #[error(
        "{iface} already carries another overlay agent's data path: {programs}, held by links \
         not pinned under {dir}. Another agent runs on this node with another --bpf-dir, or one \
         stopped and left its data path pinned in another directory: stop that agent, or remove \
         its data path with `overlay-agent cleanup --bpf-dir <its directory>`",
        dir = dir.display()
    )]
    ForeignDataPath {
        iface: String,
        dir: PathBuf,
        programs: String,
    },
    #[error("the pinned link of {prog} no longer attaches to {iface}")]
    StaleLink { prog: &'static str, iface: String },
    #[error("cannot pin at {path}: {reason}", path = path.display())]
    Pin { path: PathBuf, reason: String },
    #[error(transparent)]
    PinDir(#[from] PinError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
}

/// A device a program is attached to, through a tcx link this struct holds.
#[derive(Debug)]
struct Attached {
    iface: String,
    #[expect(
        dead_code,
        reason = "held for its Drop: closing an unpinned link detaches it"
    )]
    link: FdLink,
}

/// The loaded data path. Dropping it detaches every program it attached, unless the data path
/// is pinned ([`Datapath::load_pinned`]): then links and maps stay for the next agent.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    node: Option<NodeConfig>,
    devices: Devices,
    /// By program name: each program is attached to at most one device.
    links: BTreeMap<&'static str, Attached>,
    peers: PeerTable,
    /// What `ENDPOINT_V4` holds.
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// `pod_port_egress` on pods' host-side veths, by interface index. Not pinned: without
    /// them `pod_egress` on the bridge does the same work, so a dead agent loses nothing.
    port_links: BTreeMap<u32, FdLink>,
    /// A ready `CONFIG` pinned by an earlier agent stays in force, untouched, until this agent
    /// knows its own node settings ([`Datapath::set_config`]): rewriting it without them would
    /// turn the data path off (not ready) in the middle of a restart.
    pinned_config_in_force: bool,
    /// The pin directory's lock (`pin::PinDir::lock`), held while this struct lives: one agent
    /// per `--bpf-dir`, and no `cleanup` under a running agent.
    _pin_lock: Option<std::os::fd::OwnedFd>,
}

// The agent owns the data path from an async task; it must be able to move there.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Datapath>();
};

impl Datapath {
    /// Loads the embedded object: creates the maps and loads (verifies) every program. Nothing
    /// is pinned: the data path lives as long as this struct.
    pub fn load() -> Result<Self, DatapathError> {
        Self::open(None)
    }

    /// Like [`Datapath::load`], but the state maps and the links are pinned under `dir`: maps
    /// already pinned there (by an earlier agent) are reused with their contents, and links
    /// pinned there get this agent's programs swapped in without detaching. Holds the
    /// directory's lock while it lives (`PinError::Locked` while another agent holds it).
    pub fn load_pinned(dir: &Path) -> Result<Self, DatapathError> {
        Self::load_pinned_checked(dir, crate::cli::LayoutMismatch::Refuse)
    }

    /// [`Datapath::load_pinned`], first reconciling the pinned maps' layout with this agent's
    /// (`layout`): maps of another shape are never reused; by `policy` they are replaced or
    /// the load is refused.
    pub fn load_pinned_checked(
        dir: &Path,
        policy: crate::cli::LayoutMismatch,
    ) -> Result<Self, DatapathError> {
        let pins = PinDir::prepare(dir)?;
        // Locked before the layout is looked at: a running agent's maps are never replaced.
        let lock = pins.lock()?;
        let reconciled = layout::reconcile(&pins, policy)?;
        for (map, why) in &reconciled.replaced {
            if reconciled.carried.iter().any(|(m, _)| m == map) {
                tracing::warn!("pinned map {map} replaced, its flows carried over ({why})");
            } else {
                tracing::warn!("pinned map {map} replaced by a new, empty one ({why})");
            }
        }
        // An agent from before the inbound table: its inbound connections move there.
        let inbound_table_new = !pins.map(names::KERNEL_FLOW_IN_V4).exists();
        let datapath = Self::open(Some((pins.clone(), lock)))?;
        for (map, n) in layout::restore_flows(&pins, &reconciled.carried) {
            tracing::info!("{n} masqueraded flows carried over into the new {map}");
        }
        if inbound_table_new {
            let n = layout::split_inbound_flows(&pins);
            if n > 0 {
                tracing::info!(
                    "{n} inbound connections moved from {} into the new {}",
                    names::KERNEL_FLOW_V4,
                    names::KERNEL_FLOW_IN_V4
                );
            }
        }
        layout::mark(pins.root(), &reconciled.fingerprint)?;
        Ok(datapath)
    }

    /// Loads the object; with `pins` (the directory and its lock, held while this lives) its
    /// state maps are pinned there.
    fn open(pins: Option<(PinDir, std::os::fd::OwnedFd)>) -> Result<Self, DatapathError> {
        let (pins, pin_lock) = pins.unzip();
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some(pins) = &pins {
            for name in STATE_MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        for prog in PROGRAMS.into_iter().chain([PROBE_DECAP_L4_UDP]) {
            classifier(&mut ebpf, prog)?
                .load()
                .map_err(|source| DatapathError::ProgramLoad { prog, source })?;
        }
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::ProgramLoad {
                prog: UNDERLAY_XDP,
                source,
            })?;
        let pinned = pins.is_some().then(|| pinned_config(&ebpf)).flatten();
        let devices = Devices {
            decap_l4_udp: probe_decap_l4_udp(&ebpf)?,
            ..pinned.map(adopt_devices).unwrap_or_default()
        };
        // Pinned maps may hold an earlier agent's peers and endpoints: mirror them, so that
        // later changes (and the daemon's clean-up of what left meanwhile) start from the truth.
        let (peers, endpoints) = if pins.is_some() {
            (adopt_peers(&ebpf)?, adopt_endpoints(&ebpf)?)
        } else {
            (PeerTable::default(), BTreeMap::new())
        };
        Ok(Self {
            ebpf,
            pins,
            node: None,
            devices,
            links: BTreeMap::new(),
            peers,
            endpoints,
            port_links: BTreeMap::new(),
            pinned_config_in_force: pinned.is_some(),
            _pin_lock: pin_lock,
        })
    }

    /// Whether decapsulation also clears the sender's UDP-tunnel GSO state
    /// (`BPF_F_ADJ_ROOM_DECAP_L4_UDP`, probed at load).
    #[must_use]
    pub fn decap_clears_tunnel_gso(&self) -> bool {
        self.devices.decap_l4_udp
    }

    /// Attaches `underlay_xdp` (native XDP) to the external interface: VXLAN for us is then
    /// decapsulated before GRO. Fails where the driver has no native XDP; the TC programs then
    /// decapsulate everything, as without this call.
    pub fn attach_underlay_xdp(&mut self, iface: &str) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            prog: UNDERLAY_XDP,
            iface: iface.to_owned(),
            source,
        };
        let link_err = |source| DatapathError::Link {
            prog: UNDERLAY_XDP,
            source,
        };
        let pin_path = self.pins.as_ref().map(|p| p.link(UNDERLAY_XDP));
        // A link pinned by an earlier agent gets this program swapped in; one whose device is
        // gone refuses the update and is replaced.
        let mut link = None;
        if let Some(path) = pin_path.as_ref().filter(|p| p.exists()) {
            let adopted = PinnedLink::from_pin(path)
                .map_err(link_err)
                .and_then(|pinned| XdpLink::try_from(FdLink::from(pinned)).map_err(link_err))
                .and_then(|old| {
                    let program = xdp_program(&mut self.ebpf)?;
                    let id = program.attach_to_link(old).map_err(attach_err)?;
                    program.take_link(id).map_err(attach_err)
                });
            match adopted {
                Ok(l) => {
                    tracing::info!("{UNDERLAY_XDP}: took over the pinned link on {iface}");
                    link = Some(l);
                }
                Err(e) => {
                    tracing::info!(
                        "{UNDERLAY_XDP}: not reusing the pinned link ({e}); attaching anew"
                    );
                    pin::remove_pin(path)?;
                }
            }
        }
        let link = match link {
            Some(l) => l,
            None => {
                let program = xdp_program(&mut self.ebpf)?;
                let id = program.attach(iface, XdpMode::Driver).map_err(attach_err)?;
                program.take_link(id).map_err(attach_err)?
            }
        };
        let mut link = FdLink::try_from(link).map_err(link_err)?;
        if let Some(path) = pin_path.filter(|p| !p.exists()) {
            let pinned = link.pin(&path).map_err(|e| DatapathError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            link = FdLink::from(pinned);
        }
        self.links.insert(
            UNDERLAY_XDP,
            Attached {
                iface: iface.to_owned(),
                link,
            },
        );
        // Keep the cookie an earlier agent wrote: frames it marked may still be in flight.
        if self.devices.xdp_cookie == 0 {
            self.devices.xdp_cookie = pinned_xdp_cookie(&self.ebpf).unwrap_or_else(new_cookie);
        }
        self.write_config()
    }

    /// Detaches `underlay_xdp`; the TC programs then decapsulate everything. No-op if detached.
    pub fn detach_underlay_xdp(&mut self) -> Result<(), DatapathError> {
        // Detach first, so that every frame marked so far still meets its cookie in TC.
        self.detach_tc(UNDERLAY_XDP)?;
        self.devices.xdp_cookie = 0;
        self.write_config()
    }

    /// The device `underlay_xdp` is attached to, if any.
    #[must_use]
    pub fn underlay_xdp(&self) -> Option<&str> {
        self.links.get(UNDERLAY_XDP).map(|a| a.iface.as_str())
    }

    /// Delivers traffic for the local pod `addr` straight into it: through its host-side veth
    /// `endpoint.ifindex`, to its MAC. Replaces what was there for `addr`.
    pub fn set_endpoint(
        &mut self,
        addr: Ipv4Addr,
        endpoint: Endpoint,
    ) -> Result<(), DatapathError> {
        if self.endpoints.get(&addr) == Some(&endpoint) {
            return Ok(());
        }
        let mut hash: HashMap<_, EndpointKeyV4, Endpoint> =
            map_mut(&mut self.ebpf, names::ENDPOINT_V4)?;
        hash.insert(addr.octets(), endpoint, 0)
            .map_err(|source| DatapathError::MapUpdate {
                map: names::ENDPOINT_V4,
                source,
            })?;
        self.endpoints.insert(addr, endpoint);
        Ok(())
    }

    /// Forgets the local pod `addr`: its traffic takes the bridge again. No-op if unknown.
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), DatapathError> {
        let mut hash: HashMap<_, EndpointKeyV4, Endpoint> =
            map_mut(&mut self.ebpf, names::ENDPOINT_V4)?;
        ignore_missing(hash.remove(&addr.octets())).map_err(|source| DatapathError::MapUpdate {
            map: names::ENDPOINT_V4,
            source,
        })?;
        self.endpoints.remove(&addr);
        Ok(())
    }

    /// What `ENDPOINT_V4` holds.
    #[must_use]
    pub fn endpoints(&self) -> &BTreeMap<Ipv4Addr, Endpoint> {
        &self.endpoints
    }

    /// Attaches `pod_port_egress` to the tcx ingress of the pod's host-side veth `ifindex`.
    /// No-op if attached already.
    pub fn attach_pod_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        if self.port_links.contains_key(&ifindex) {
            return Ok(());
        }
        let iface = ifname(ifindex).ok_or_else(|| DatapathError::Device {
            iface: format!("#{ifindex}"),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let attach_err = |source| DatapathError::Attach {
            prog: POD_PORT_EGRESS,
            iface: iface.clone(),
            source,
        };
        let program = classifier(&mut self.ebpf, POD_PORT_EGRESS)?;
        let id = program
            .attach(&iface, TcAttachType::Ingress)
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
            prog: POD_PORT_EGRESS,
            source,
        })?;
        self.port_links.insert(ifindex, link);
        Ok(())
    }

    /// Detaches `pod_port_egress` from the veth `ifindex` (a deleted device has detached it
    /// already; this closes the link). No-op if not attached.
    pub fn detach_pod_port(&mut self, ifindex: u32) {
        self.port_links.remove(&ifindex);
    }

    /// The veths `pod_port_egress` is attached to, by interface index.
    pub fn pod_ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.port_links.keys().copied()
    }

    /// Refuses `iface` when another agent's programs are on it (`foreign`): attached there,
    /// ours would never run. Checked before the lease, and before anything is attached.
    pub fn check_no_foreign_data_path(&self, iface: &str) -> Result<(), DatapathError> {
        let found = foreign::foreign_programs(iface, self.pins.as_ref()).map_err(|source| {
            DatapathError::Query {
                iface: iface.to_owned(),
                source,
            }
        })?;
        if found.is_empty() {
            return Ok(());
        }
        Err(DatapathError::ForeignDataPath {
            iface: iface.to_owned(),
            dir: self
                .pins
                .as_ref()
                .map_or_else(PathBuf::new, |p| p.root().to_owned()),
            programs: found
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Attaches `underlay_ingress` / `underlay_egress` to the external interface, which is also
    /// where encapsulated packets leave. Encapsulation and decapsulation start once both this
    /// and [`Datapath::set_config`] are done.
    pub fn attach_underlay(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex(iface)?;
        self.attach_tc(UNDERLAY_INGRESS, iface, TcAttachType::Ingress)?;
        self.attach_tc(UNDERLAY_EGRESS, iface, TcAttachType::Egress)?;
        self.devices.underlay = ifindex;
        self.write_config()
    }

    /// Writes the node's settings (validated) into `CONFIG`.
    pub fn set_config(&mut self, node: &NodeConfig) -> Result<(), DatapathError> {
        node.validate().map_err(DatapathError::InvalidConfig)?;
        self.node = Some(node.clone());
        self.write_config()
    }

    /// The settings last given to [`Datapath::set_config`].
    #[must_use]
    pub fn node_config(&self) -> Option<&NodeConfig> {
        self.node.as_ref()
    }

    /// Attaches `pod_egress` (ingress) and `pod_ingress` (egress) to the pod bridge
    /// (cni0/docker0) and delivers decapsulated pod traffic to it. Call again when the bridge
    /// was re-created (the old links are replaced).
    pub fn attach_pod_bridge(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex(iface)?;
        let mac = hw_addr(iface)?;
        if self.links.contains_key(POD_EGRESS) || self.links.contains_key(POD_INGRESS) {
            self.detach_pod_bridge()?;
        }
        self.attach_tc(POD_EGRESS, iface, TcAttachType::Ingress)?;
        self.attach_tc(POD_INGRESS, iface, TcAttachType::Egress)?;
        self.devices.bridge = ifindex;
        self.devices.bridge_mac = mac;
        self.write_config()
    }

    /// Takes the pod bridge's current MAC address. A bridge without an address of its own (the
    /// CNI bridge plugin's) takes the lowest of its ports' addresses, so its MAC changes when
    /// the first pod joins, often after the agent attached. `pod_port_egress` picks up only
    /// frames to the bridge's MAC and delivered frames carry it as their source: with a stale
    /// one, pods' traffic silently took the slower way through the bridge. No-op when unchanged
    /// or when no bridge is attached.
    pub fn refresh_bridge_mac(&mut self, mac: [u8; 6]) -> Result<bool, DatapathError> {
        if self.devices.bridge == 0 || self.devices.bridge_mac == mac {
            return Ok(false);
        }
        self.devices.bridge_mac = mac;
        self.write_config()?;
        Ok(true)
    }

    /// Stops using the pod bridge (it disappeared): decapsulated pod traffic is dropped and
    /// counted (`drop_no_bridge`) until [`Datapath::attach_pod_bridge`] again. No-op if detached.
    pub fn detach_pod_bridge(&mut self) -> Result<(), DatapathError> {
        self.devices.bridge = 0;
        self.devices.bridge_mac = [0; 6];
        self.write_config()?;
        self.detach_tc(POD_INGRESS)?;
        self.detach_tc(POD_EGRESS)
    }

    /// The interface index decapsulated pod traffic goes to (0: none), which may be an earlier
    /// agent's bridge until this agent attaches its own.
    #[must_use]
    pub fn bridge_ifindex(&self) -> u32 {
        self.devices.bridge
    }

    /// The pod bridge `pod_egress` is attached to, if any.
    #[must_use]
    pub fn pod_bridge(&self) -> Option<&str> {
        self.links.get(POD_EGRESS).map(|a| a.iface.as_str())
    }

    /// Attaches `host_egress` to the host device (`ovl0`: NOARP, `<subnet>.0/32`, MTU =
    /// underlay MTU − 50, route `<network> dev ovl0`) and delivers decapsulated traffic for
    /// the host there. Its MTU is also the tunnel MTU `pod_egress` checks against.
    pub fn attach_host_device(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex(iface)?;
        let mac = hw_addr(iface)?;
        if self
            .links
            .get(HOST_EGRESS)
            .is_some_and(|a| a.iface != iface)
        {
            self.detach_host_device()?;
        }
        self.attach_tc(HOST_EGRESS, iface, TcAttachType::Egress)?;
        self.devices.host = ifindex;
        self.devices.host_mac = mac;
        self.write_config()
    }

    /// Stops using the host device. No-op if detached.
    pub fn detach_host_device(&mut self) -> Result<(), DatapathError> {
        self.devices.host = 0;
        self.devices.host_mac = [0; 6];
        self.write_config()?;
        self.detach_tc(HOST_EGRESS)
    }

    /// Attaches `gro_device_ingress` to the GRO device (`ovl-gro`, see `crate::netdev`), which
    /// then delivers the reassembled fragments of VXLAN for us that the device's socket
    /// decapsulates and drops the rest.
    pub fn attach_gro_device(&mut self, iface: &str) -> Result<(), DatapathError> {
        if self
            .links
            .get(GRO_DEVICE_INGRESS)
            .is_some_and(|a| a.iface != iface)
        {
            self.detach_tc(GRO_DEVICE_INGRESS)?;
        }
        self.attach_tc(GRO_DEVICE_INGRESS, iface, TcAttachType::Ingress)
    }

    /// Lets go of the GRO device. No-op if detached.
    pub fn detach_gro_device(&mut self) -> Result<(), DatapathError> {
        self.detach_tc(GRO_DEVICE_INGRESS)
    }

    /// Routes `subnet` to the VXLAN peer at `public_ip` with `vtep_mac` (from its lease), and
    /// accepts VXLAN from `public_ip`. Replaces what was there for `subnet`.
    pub fn upsert_peer(
        &mut self,
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        vtep_mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.upsert_route(subnet, RemoteNode::vxlan(public_ip.octets(), vtep_mac))
    }

    /// Routes `subnet` to `node` (VXLAN or direct, as its flags say) and accepts its PublicIP
    /// as a member. Replaces what was there for `subnet`.
    pub fn upsert_route(&mut self, subnet: Ipv4Net, node: RemoteNode) -> Result<(), DatapathError> {
        if self
            .node
            .as_ref()
            .is_some_and(|n| n.subnet.trunc() == subnet.trunc())
        {
            return Err(DatapathError::OwnSubnet { subnet });
        }
        let mut next = self.peers.clone();
        let ops = next.upsert(subnet, node);
        self.apply(&ops)?;
        self.peers = next;
        Ok(())
    }

    /// Forgets the peer subnet `subnet` (no-op if unknown); its node stops being accepted once
    /// no other subnet uses its PublicIP.
    pub fn remove_peer(&mut self, subnet: Ipv4Net) -> Result<(), DatapathError> {
        let mut next = self.peers.clone();
        let ops = next.remove(subnet);
        self.apply(&ops)?;
        self.peers = next;
        Ok(())
    }

    /// What the peer maps hold.
    #[must_use]
    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    /// The loaded object, read-only: for diagnostics and tests (e.g. running a program on a
    /// crafted frame with `BPF_PROG_TEST_RUN` against the maps this struct wrote).
    #[must_use]
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// Every counter, summed over the CPUs, in [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        inspect::sum_counters(
            self.ebpf
                .map(names::COUNTERS)
                .ok_or(DatapathError::MissingMap(names::COUNTERS))?,
        )
    }

    /// Attaches `prog` to `iface` and keeps the link. With pins: a link pinned by an earlier
    /// agent on the same device gets this program swapped in (no gap); otherwise a new link is
    /// made and pinned.
    fn attach_tc(
        &mut self,
        prog: &'static str,
        iface: &str,
        direction: TcAttachType,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            prog,
            iface: iface.to_owned(),
            source,
        };
        let pin_path = self.pins.as_ref().map(|p| p.link(prog));
        if let Some(path) = &pin_path
            && path.exists()
        {
            match adopt_link(&mut self.ebpf, prog, iface, direction, path) {
                Ok(link) => {
                    tracing::info!("{prog}: took over the pinned link on {iface}");
                    self.links.insert(
                        prog,
                        Attached {
                            iface: iface.to_owned(),
                            link,
                        },
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!("{prog}: not reusing the pinned link ({e}); attaching anew");
                    pin::remove_pin(path)?;
                }
            }
        }
        let program = classifier(&mut self.ebpf, prog)?;
        let id = program.attach(iface, direction).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let mut link =
            FdLink::try_from(link).map_err(|e| DatapathError::Link { prog, source: e })?;
        if let Some(path) = pin_path {
            let pinned = link.pin(&path).map_err(|e| DatapathError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            link = FdLink::from(pinned);
        }
        self.links.insert(
            prog,
            Attached {
                iface: iface.to_owned(),
                link,
            },
        );
        Ok(())
    }

    /// Detaches `prog`: closes its link and removes its pin. No-op if not attached.
    fn detach_tc(&mut self, prog: &'static str) -> Result<(), DatapathError> {
        let Some(attached) = self.links.remove(prog) else {
            return Ok(());
        };
        if let Some(pins) = &self.pins {
            pin::remove_pin(&pins.link(prog))?;
        }
        // A link whose device is already gone was detached by the kernel; this only closes it.
        drop(attached);
        Ok(())
    }

    /// Tells the programs that routing may have changed: the next hops they cached are looked
    /// up again (a new routing generation in `CONFIG`).
    pub fn routing_changed(&mut self) -> Result<(), DatapathError> {
        self.write_config()
    }

    /// Rewrites `CONFIG` from the node settings and the attached devices (not while an earlier
    /// agent's ready `CONFIG` is still in force and this agent has no node settings yet), under
    /// a new routing generation: whatever changed (the local address, a device) may change the
    /// next hops the programs cached.
    fn write_config(&mut self) -> Result<(), DatapathError> {
        if self.node.is_none() && self.pinned_config_in_force {
            return Ok(());
        }
        self.pinned_config_in_force = false;
        self.devices.route_gen = self.devices.route_gen.wrapping_add(1).max(1);
        let value = encode(self.node.as_ref(), self.devices);
        let mut array: Array<_, Config> = map_mut(&mut self.ebpf, names::CONFIG)?;
        array
            .set(CONFIG_INDEX, value, 0)
            .map_err(|source| DatapathError::MapUpdate {
                map: names::CONFIG,
                source,
            })
    }

    fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        for op in ops {
            match *op {
                MapOp::SetRoute { subnet, node } => {
                    let mut trie: LpmTrie<_, RouteKeyV4, RemoteNode> =
                        map_mut(&mut self.ebpf, names::ROUTE_V4)?;
                    trie.insert(&key(subnet), node, 0).map_err(|source| {
                        DatapathError::MapUpdate {
                            map: names::ROUTE_V4,
                            source,
                        }
                    })?;
                }
                MapOp::DeleteRoute { subnet } => {
                    let mut trie: LpmTrie<_, RouteKeyV4, RemoteNode> =
                        map_mut(&mut self.ebpf, names::ROUTE_V4)?;
                    ignore_missing(trie.remove(&key(subnet))).map_err(|source| {
                        DatapathError::MapUpdate {
                            map: names::ROUTE_V4,
                            source,
                        }
                    })?;
                }
                MapOp::SetNode { ip, member } => {
                    let mut hash: HashMap<_, NodeKeyV4, MemberNode> =
                        map_mut(&mut self.ebpf, names::NODE_V4)?;
                    hash.insert(ip.octets(), member, 0).map_err(|source| {
                        DatapathError::MapUpdate {
                            map: names::NODE_V4,
                            source,
                        }
                    })?;
                }
                MapOp::DeleteNode { ip } => {
                    let mut hash: HashMap<_, NodeKeyV4, MemberNode> =
                        map_mut(&mut self.ebpf, names::NODE_V4)?;
                    ignore_missing(hash.remove(&ip.octets())).map_err(|source| {
                        DatapathError::MapUpdate {
                            map: names::NODE_V4,
                            source,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }
}

fn key(subnet: Ipv4Net) -> aya::maps::lpm_trie::Key<RouteKeyV4> {
    let subnet = subnet.trunc();
    route_key(subnet.network(), subnet.prefix_len())
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(UNDERLAY_XDP)
        .ok_or(DatapathError::MissingProgram(UNDERLAY_XDP))?
        .try_into()
        .map_err(|source| DatapathError::ProgramLoad {
            prog: UNDERLAY_XDP,
            source,
        })
}

/// Runs `probe_decap_l4_udp` on a VXLAN-sized IPv4 frame: bit 0 of its answer says the plain
/// decapsulation flags worked (so the frame was fit for the test), bit 1 that the kernel also
/// accepted `BPF_F_ADJ_ROOM_DECAP_L4_UDP`.
fn probe_decap_l4_udp(ebpf: &Ebpf) -> Result<bool, DatapathError> {
    let prog: &SchedClassifier = ebpf
        .program(PROBE_DECAP_L4_UDP)
        .ok_or(DatapathError::MissingProgram(PROBE_DECAP_L4_UDP))?
        .try_into()
        .map_err(|source| DatapathError::ProgramLoad {
            prog: PROBE_DECAP_L4_UDP,
            source,
        })?;
    let mut frame = [0u8; PROBE_FRAME_LEN];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&((PROBE_FRAME_LEN - 14) as u16).to_be_bytes());
    frame[22] = 64;
    frame[23] = 17;
    let mut out = [0u8; PROBE_FRAME_LEN];
    let result = aya::TestRun::test_run(
        prog,
        aya::TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        },
    )
    .map_err(|source| DatapathError::Probe {
        prog: PROBE_DECAP_L4_UDP,
        source,
    })?;
    if result.return_value & 1 == 0 {
        return Err(DatapathError::InvalidConfig(format!(
            "{PROBE_DECAP_L4_UDP} could not decapsulate its test frame (answer {})",
            result.return_value
        )));
    }
    Ok(result.return_value & 2 != 0)
}

/// The probe's frame: two rounds of 50 bytes to remove and an IPv4 header left over.
const PROBE_FRAME_LEN: usize = 14 + 2 * 50 + 40;

/// The ready `CONFIG` an earlier agent pinned, if any.
fn pinned_config(ebpf: &Ebpf) -> Option<Config> {
    let array = Array::<_, Config>::try_from(ebpf.map(names::CONFIG)?).ok()?;
    array.get(&CONFIG_INDEX, 0).ok().filter(Config::is_ready)
}

/// The XDP cookie an earlier agent left in the pinned `CONFIG`, if any.
fn pinned_xdp_cookie(ebpf: &Ebpf) -> Option<u32> {
    let cookie = pinned_config(ebpf)?.xdp_cookie;
    (cookie != 0).then_some(cookie)
}

/// The devices of an earlier agent's `CONFIG` that still exist (by interface index), so that
/// a restarted agent goes on delivering to them until it has found them again itself.
fn adopt_devices(cfg: Config) -> Devices {
    let exists = |index: u32| index != 0 && ifname(index).is_some();
    let (bridge, bridge_mac) = if exists(cfg.bridge_ifindex) {
        (cfg.bridge_ifindex, cfg.bridge_mac)
    } else {
        (0, [0; 6])
    };
    let (host, host_mac) = if exists(cfg.host_ifindex) {
        (cfg.host_ifindex, cfg.host_mac)
    } else {
        (0, [0; 6])
    };
    Devices {
        underlay: if exists(cfg.underlay_ifindex) {
            cfg.underlay_ifindex
        } else {
            0
        },
        bridge,
        bridge_mac,
        host,
        host_mac,
        xdp_cookie: cfg.xdp_cookie,
        decap_l4_udp: false,
        // Carried on so that generations keep increasing (the cache itself is per load).
        route_gen: cfg.route_gen,
    }
}

/// The name of the interface with index `index` in the agent's namespace, if there is one.
fn ifname(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index)
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
}

/// A random non-zero cookie for `underlay_xdp`'s mark.
fn new_cookie() -> u32 {
    loop {
        let cookie: u32 = rand::random();
        if cookie != 0 {
            return cookie;
        }
    }
}

/// Mirrors what pinned `ENDPOINT_V4` holds.
fn adopt_endpoints(ebpf: &Ebpf) -> Result<BTreeMap<Ipv4Addr, Endpoint>, DatapathError> {
    let map = ebpf
        .map(names::ENDPOINT_V4)
        .ok_or(DatapathError::MissingMap(names::ENDPOINT_V4))?;
    let err = |source| DatapathError::Map {
        map: names::ENDPOINT_V4,
        source,
    };
    let hash = HashMap::<_, EndpointKeyV4, Endpoint>::try_from(map).map_err(err)?;
    hash.iter()
        .map(|entry| entry.map(|(k, v)| (Ipv4Addr::from(k), v)).map_err(err))
        .collect()
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(prog)
        .ok_or(DatapathError::MissingProgram(prog))?
        .try_into()
        .map_err(|source| DatapathError::ProgramLoad { prog, source })
}

/// A typed view of a map for writing.
fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    M::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

/// Deleting what is already gone is success (the maps converge on the mirror's state).
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Swaps `prog` into the link pinned at `path`, after checking with the kernel that the link
/// still attaches to `iface` in `direction` (a re-created device would leave it dangling).
fn adopt_link(
    ebpf: &mut Ebpf,
    prog: &'static str,
    iface: &str,
    direction: TcAttachType,
    path: &Path,
) -> Result<FdLink, DatapathError> {
    let link_err = |source| DatapathError::Link { prog, source };
    let attach_err = |source| DatapathError::Attach {
        prog,
        iface: iface.to_owned(),
        source,
    };
    let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
    let old_prog = FdLink::from(pinned).info().map_err(link_err)?.program_id();
    let (_, attached) = SchedClassifier::query_tcx(iface, direction).map_err(attach_err)?;
    if !attached.iter().any(|p| p.id() == old_prog) {
        return Err(DatapathError::StaleLink {
            prog,
            iface: iface.to_owned(),
        });
    }
    let link = FdLink::from(PinnedLink::from_pin(path).map_err(link_err)?);
    let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
    let program = classifier(ebpf, prog)?;
    let id = program.attach_to_link(link).map_err(attach_err)?;
    let link = program.take_link(id).map_err(attach_err)?;
    FdLink::try_from(link).map_err(link_err)
}

/// Mirrors what pinned `ROUTE_V4` holds (the node reference counts follow from the routes).
fn adopt_peers(ebpf: &Ebpf) -> Result<PeerTable, DatapathError> {
    let map = ebpf
        .map(names::ROUTE_V4)
        .ok_or(DatapathError::MissingMap(names::ROUTE_V4))?;
    let trie = LpmTrie::<_, RouteKeyV4, RemoteNode>::try_from(map).map_err(|source| {
        DatapathError::Map {
            map: names::ROUTE_V4,
            source,
        }
    })?;
    let mut table = PeerTable::default();
    for entry in &trie {
        let (key, node) = entry.map_err(|source| DatapathError::Map {
            map: names::ROUTE_V4,
            source,
        })?;
        let data: RouteKeyV4 = key.data();
        let subnet = Ipv4Net::new(Ipv4Addr::from(data), key.prefix_len() as u8).map_err(|_| {
            DatapathError::InvalidConfig(format!("bad ROUTE_V4 key {data:?}/{}", key.prefix_len()))
        })?;
        let _ = table.upsert(subnet, node);
    }
    Ok(table)
}

/// The interface index of `iface` in the agent's network namespace.
fn ifindex(iface: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(iface).map_err(|errno| DatapathError::Device {
        iface: iface.to_owned(),
        source: errno.into(),
    })
}

/// The MAC address of `iface`, from the kernel's interface list (netlink under `getifaddrs`),
/// which resolves in the caller's network namespace, unlike /sys, which shows the namespace it
/// was mounted in.
fn hw_addr(iface: &str) -> Result<[u8; 6], DatapathError> {
    let device_err = |source| DatapathError::Device {
        iface: iface.to_owned(),
        source,
    };
    nix::ifaddrs::getifaddrs()
        .map_err(|errno| device_err(errno.into()))?
        .filter(|entry| entry.interface_name == iface)
        .find_map(|entry| entry.address?.as_link_addr()?.addr())
        .ok_or_else(|| device_err(io::Error::from(io::ErrorKind::NotFound)))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg, where raising
/// the limit is unnecessary (and may be refused without CAP_SYS_RESOURCE), so failure only warns.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(errno) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(
            "cannot raise RLIMIT_MEMLOCK ({errno}); fine on kernels with memcg-based BPF accounting"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_are_prefix_length_then_network_bytes() {
        let k = key("172.17.2.9/24".parse().unwrap());
        assert_eq!(k.prefix_len(), 24);
        assert_eq!(
            k.data(),
            [172, 17, 2, 0],
            "host bits cleared, network byte order"
        );
        // The kernel's struct bpf_lpm_trie_key_u8: __u32 prefixlen (host order), then data.
        // SAFETY: Key<[u8; 4]> is a packed 8-byte POD struct.
        let raw: [u8; 8] = unsafe { std::mem::transmute(k) };
        let mut expected = 24u32.to_ne_bytes().to_vec();
        expected.extend_from_slice(&[172, 17, 2, 0]);
        assert_eq!(raw.to_vec(), expected);
    }

    #[test]
    fn map_values_have_the_shared_layout() {
        let node = RemoteNode::vxlan([198, 18, 0, 2], [0x0e, 1, 2, 3, 4, 5]);
        assert_eq!(
            bytemuck::bytes_of(&node),
            &[198, 18, 0, 2, 0x0e, 1, 2, 3, 4, 5, 1, 0][..],
            "PublicIP, VtepMAC, flags (VXLAN) in host order"
        );
        assert_eq!(
            bytemuck::bytes_of(&MemberNode { routes: 2 }),
            &2u32.to_ne_bytes()[..]
        );
    }

    #[test]
    fn counter_names_are_unique_and_stable() {
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        assert_eq!(Reason::UnderlayRx.name(), "underlay_rx");
        assert!(
            Reason::ALL
                .iter()
                .filter(|r| r.is_drop())
                .all(|r| r.index() > 8)
        );
    }

    #[test]
    fn unknown_interfaces_are_reported() {
        let err = ifindex("no-such-if0").unwrap_err();
        assert!(err.to_string().contains("no-such-if0"), "{err}");
        assert!(hw_addr("").is_err());
        assert!(hw_addr("a-name-much-too-long").is_err());
    }
}
