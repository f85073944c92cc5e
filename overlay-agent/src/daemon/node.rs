//! The node's side of the pipeline's last step: applies what the control plane decided (the
//! lease, peer route changes from `backend`, the pods from the endpoint watcher, the pod
//! bridge) to the `datapath`, and keeps the attachments repaired. Called by the daemon's main
//! loop only; it may call `backend` (pure decisions), `datapath` and `netdev` (netlink).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use overlay_common::endpoint::Endpoint;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    backend::{self, RouteChange},
    cli::{Flags, XdpPolicy},
    datapath::repair,
    datapath::{Datapath, NodeConfig},
    endpoints::BridgeScope,
    iface::{self, ExternalInterface},
    netdev::{GRO_DEVICE, HOST_DEVICE, HostDeviceSpec, Netlink, find_pod_bridge},
    subnet::{
        Lease, Mac, PeerEvent,
        config::{Backend, NetworkConfig},
        file::first_usable,
    },
    telemetry::Telemetry,
};

/// What the data path needs from the node's settings, and the pod bridge it currently serves.
pub(super) struct NodeDatapath {
    pub(super) backend: Backend,
    pub(super) network: Ipv4Net,
    /// The external interface's address: outer source, masquerade address (`Config.local_ip`).
    pub(super) iface_addr: std::net::Ipv4Addr,
    /// The PublicIP of the lease (`--public-ip`, else `iface_addr`): what peers send to.
    pub(super) public_ip: std::net::Ipv4Addr,
    pub(super) vtep_mac: [u8; 6],
    pub(super) pod_mtu: u32,
    pub(super) bridge_name: Option<String>,
    /// The gateway address of our subnet: what identifies the pod bridge.
    pub(super) gateway: std::net::Ipv4Addr,
    /// Our subnet (the lease).
    pub(super) subnet: Ipv4Net,
    /// The bridge `pod_egress` is attached to: name and interface index.
    pub(super) bridge: Option<(String, u32)>,
    /// The bridge and subnet the endpoint watcher looks at.
    pub(super) scope: watch::Sender<Option<BridgeScope>>,
    /// `--xdp`, for re-attaching after a repair.
    pub(super) xdp: XdpPolicy,
    /// Why the GRO device cannot be up (another VXLAN device holds the port), as last
    /// reported; retried every second until it is gone.
    pub(super) gro_blocked: Option<String>,
}

impl NodeDatapath {
    /// Records why the GRO device cannot be up (`None`: it can, or need not); logs a change
    /// once and makes the node not ready while it holds.
    fn report_gro_blocked(&mut self, blocked: Option<String>, telemetry: &Telemetry) {
        if blocked == self.gro_blocked {
            return;
        }
        match &blocked {
            Some(why) => error!("{why}"),
            None if self.gro_blocked.is_some() => {
                info!("GRO device {GRO_DEVICE}: the other VXLAN device is gone; it is up now");
            }
            None => {}
        }
        telemetry.set_gro_blocked(blocked.clone());
        self.gro_blocked = blocked;
    }

    pub(super) fn new(flags: &Flags, config: &NetworkConfig, ext: &ExternalInterface) -> Self {
        Self {
            backend: config.backend,
            network: config.network,
            iface_addr: ext.iface_addr,
            public_ip: ext.public_ip,
            vtep_mac: Mac::for_public_ip(ext.public_ip).octets(),
            pod_mtu: config.backend.pod_mtu(ext.mtu),
            bridge_name: flags.pod_bridge.clone(),
            gateway: std::net::Ipv4Addr::UNSPECIFIED,
            subnet: config.network,
            bridge: None,
            scope: watch::Sender::new(None),
            xdp: flags.xdp,
            gro_blocked: None,
        }
    }

    /// Points the endpoint watcher at the current bridge and subnet.
    pub(super) fn update_scope(&self) {
        let scope = self.bridge.as_ref().map(|(_, ifindex)| BridgeScope {
            ifindex: *ifindex,
            subnet: self.subnet,
        });
        self.scope.send_if_modified(|current| {
            let changed = *current != scope;
            *current = scope;
            changed
        });
    }

    /// Points the data path and the host device at `lease`'s subnet.
    pub(super) async fn apply_lease(
        &mut self,
        datapath: &mut Datapath,
        netlink: &Netlink,
        lease: &Lease,
    ) -> Result<()> {
        self.gateway = first_usable(lease.subnet).addr();
        self.subnet = lease.subnet;
        self.update_scope();
        let (vni, port, routing) = backend::tunnel(&self.backend);
        datapath.set_config(
            &NodeConfig::new(
                vni,
                port,
                self.iface_addr,
                self.vtep_mac,
                lease.subnet,
                self.network,
            )
            .with_public_ip(self.public_ip)
            .with_routing(routing),
        )?;
        let spec = HostDeviceSpec {
            mac: self.vtep_mac,
            mtu: self.pod_mtu,
            addr: lease.subnet.network(),
            network: self.network,
        };
        netlink.ensure_host_device(&spec).await?;
        datapath.attach_host_device(HOST_DEVICE)?;
        info!(
            "host device {HOST_DEVICE} serves {} (address {}/32)",
            self.network, spec.addr
        );
        Ok(())
    }

    /// Attaches to the pod bridge when it appears (or was re-created) and lets go when it
    /// disappears. Failures are logged and retried at the next poll.
    pub(super) async fn track_pod_bridge(&mut self, datapath: &mut Datapath, netlink: &Netlink) {
        let (found, mac) = match netlink.interfaces().await {
            Ok(list) => {
                let bridge = find_pod_bridge(&list, self.bridge_name.as_deref(), self.gateway);
                (
                    bridge.map(|i| (i.name.clone(), i.index)),
                    bridge.and_then(|i| i.mac),
                )
            }
            Err(e) => {
                warn!("cannot list interfaces to find the pod bridge: {e}");
                return;
            }
        };
        // Nothing to do when the data path already serves what was found (after a restart it
        // may still hold the earlier agent's bridge, which must then be attached or dropped),
        // except following its MAC address.
        let serving = found.as_ref().map_or(0, |(_, index)| *index);
        if found == self.bridge && datapath.bridge_ifindex() == serving {
            if let (Some((name, _)), Some(mac)) = (&found, mac) {
                match datapath.refresh_bridge_mac(mac) {
                    Ok(true) => info!("pod bridge {name} now has MAC {}", Mac::from(mac)),
                    Ok(false) => {}
                    Err(e) => warn!("cannot take the new MAC of pod bridge {name}: {e}"),
                }
            }
            return;
        }
        let result = match &found {
            Some((name, index)) => datapath.attach_pod_bridge(name).map(|()| {
                info!("pod bridge {name} (index {index}) attached");
            }),
            None => datapath.detach_pod_bridge().map(|()| {
                info!("pod bridge gone; decapsulated pod traffic is dropped until it returns");
            }),
        };
        match result {
            Ok(()) => {
                self.bridge = found;
                self.update_scope();
            }
            Err(e) => warn!("cannot switch the pod bridge to {found:?}: {e}"),
        }
    }

    /// Applies one change of the set of peers to the data path (`backend` decides the route).
    /// A record the data path cannot use is logged and skipped; it never stops the agent or
    /// disturbs other peers.
    pub(super) async fn apply_peer_event(
        &self,
        datapath: &mut Datapath,
        netlink: &Netlink,
        event: &PeerEvent,
    ) {
        let mut on_link = false;
        match event {
            PeerEvent::Added(peer) | PeerEvent::Changed(peer) => {
                let kind = if matches!(event, PeerEvent::Added(_)) {
                    "added"
                } else {
                    "changed"
                };
                info!(
                    "peer {kind}: subnet {} public IP {} backend {} VtepMAC {}",
                    peer.subnet,
                    peer.public_ip,
                    peer.backend_type,
                    peer.vtep_mac
                        .map_or_else(|| "-".to_owned(), |m| m.to_string()),
                );
                // flannel's DirectRouting test, per peer as its event arrives: the kernel's
                // route to the PublicIP has no gateway (same L2 segment).
                if backend::wants_on_link(&self.backend) && peer.vtep_mac.is_some() {
                    on_link = match netlink.route_is_on_link(peer.public_ip).await {
                        Ok(on_link) => on_link,
                        Err(e) => {
                            warn!("{e}; reaching {} through VXLAN", peer.subnet);
                            false
                        }
                    };
                    info!(
                        "peer {} at {}: {}",
                        peer.subnet,
                        peer.public_ip,
                        if on_link {
                            "on our L2 segment, routed directly"
                        } else {
                            "behind a gateway, through VXLAN"
                        }
                    );
                }
            }
            PeerEvent::Removed(subnet) => info!("peer removed: subnet {subnet}"),
            PeerEvent::Synced(_) => {}
        }
        // What is routed now matters only to a sync (and listing it per event would cost).
        let installed: Vec<Ipv4Net> = if matches!(event, PeerEvent::Synced(_)) {
            datapath.peers().subnets().collect()
        } else {
            Vec::new()
        };
        let result = backend::route_change(&self.backend, event, on_link, installed)
            .map_err(anyhow::Error::from)
            .and_then(|change| match change {
                RouteChange::Upsert { subnet, node } => {
                    datapath.upsert_route(subnet, node).map_err(Into::into)
                }
                RouteChange::Remove(subnets) => subnets
                    .into_iter()
                    .try_for_each(|subnet| {
                        if matches!(event, PeerEvent::Synced(_)) {
                            // Entries an earlier agent pinned for peers that left while no
                            // agent ran.
                            info!("peer removed: subnet {subnet} (gone while the agent was down)");
                        }
                        datapath.remove_peer(subnet)
                    })
                    .map_err(Into::into),
            });
        if let Err(e) = result {
            error!("peer event {event:?} not applied to the data path: {e:#}");
        }
    }
}

/// Attaches the XDP decapsulation as `policy` says (see `XdpPolicy`): only with `--xdp on`,
/// and never for host-gw, which has no VXLAN to decapsulate.
pub(super) fn attach_xdp(
    policy: XdpPolicy,
    backend: Backend,
    datapath: &mut Datapath,
    ext: &ExternalInterface,
) -> Result<()> {
    let host_gw = matches!(backend, Backend::HostGw);
    if host_gw || policy != XdpPolicy::On {
        datapath.detach_underlay_xdp()?;
        info!(
            "XDP decapsulation off on {} ({}): VXLAN is decapsulated in TC",
            ext.name,
            if host_gw {
                "host-gw: no VXLAN"
            } else if policy == XdpPolicy::Off {
                "--xdp off"
            } else {
                "--xdp auto: after the kernel's GRO, which aggregates VXLAN through the GRO device"
            }
        );
        return Ok(());
    }
    datapath
        .attach_underlay_xdp(&ext.name)
        .context("--xdp on")?;
    info!(
        "XDP decapsulation on {}: VXLAN is decapsulated before GRO",
        ext.name
    );
    Ok(())
}

/// Keeps the GRO device (`crate::netdev`) on the VXLAN port, with `gro_device_ingress`
/// attached before the device goes up, or removes it where the backend has no VXLAN; then
/// [`NodeDatapath::report_gro_blocked`]. VXLAN works without it, only not aggregated by GRO
/// where frames arrive MTU-sized, and without the socket that receives fragmented VXLAN, so
/// failures are logged, not fatal. Another VXLAN device on the port (a `flannel.1` that
/// flanneld left behind) keeps it down: that is reported as not ready, since fragmented VXLAN
/// then goes to that device, which drops it (its MAC is not our VtepMAC), and retried every
/// second ([`retry_gro_device`]) until the device is gone. `announce` logs the other devices
/// on the port (at start and after a repair).
pub(super) async fn keep_gro_device(
    node: &mut NodeDatapath,
    datapath: &mut Datapath,
    netlink: &Netlink,
    telemetry: &Telemetry,
    announce: bool,
) {
    let blocked = match node.backend {
        Backend::HostGw => {
            if let Err(e) = remove_gro_device(datapath, netlink).await {
                warn!("GRO device {GRO_DEVICE}: {e:#}");
            }
            None
        }
        Backend::Vxlan { port, vni, .. } => {
            if announce {
                warn_of_other_vxlan_devices(port, vni, netlink).await;
            }
            match add_gro_device(port, datapath, netlink).await {
                Ok(()) => None,
                Err(e) => gro_blocker(port, netlink).await.or_else(|| {
                    warn!(
                        "GRO device {GRO_DEVICE}: {e:#}; VXLAN frames are not aggregated before \
                         decapsulation"
                    );
                    None
                }),
            }
        }
    };
    node.report_gro_blocked(blocked, telemetry);
}

/// Removes flanneld's routes to live peers' subnets ([`iface::flanneld_peer_routes`]), which a
/// flanneld that ran on this node leaves behind (host-gw, DirectRouting): the data path reaches
/// those peers itself, and through such a route the kernel would send what it forwards for
/// their pods (a Service connection) past `ovl0`, where its replies are filed. Checked every
/// second with the bridge; the main table is small (we add no route per peer).
pub(super) async fn remove_flanneld_routes(netlink: &Netlink, datapath: &Datapath) {
    let table = datapath.peers();
    let peers: Vec<(Ipv4Net, std::net::Ipv4Addr)> = table
        .subnets()
        .filter_map(|s| table.route(s).map(|n| (s, n.public_ip.into())))
        .collect();
    if peers.is_empty() {
        return;
    }
    let routes = match netlink.main_routes().await {
        Ok(routes) => routes,
        Err(e) => {
            warn!("cannot list the routes to look for flanneld's: {e}");
            return;
        }
    };
    for route in iface::flanneld_peer_routes(&routes, &peers) {
        let via = route.gateway.map(|g| g.to_string()).unwrap_or_default();
        match netlink.delete_route(&route).await {
            Ok(()) => info!(
                "removed the route {} via {via}: flanneld's route to that peer, left by a flanneld \
                 that ran on this node; the data path reaches the peer itself, and through the \
                 route the kernel would send what it forwards for the peer's pods (Service \
                 connections) past {HOST_DEVICE}",
                route.destination
            ),
            Err(e) => warn!(
                "cannot remove flanneld's route {} via {via}: {e}",
                route.destination
            ),
        }
    }
}

/// [`keep_gro_device`] again while another VXLAN device kept it down.
pub(super) async fn retry_gro_device(
    node: &mut NodeDatapath,
    datapath: &mut Datapath,
    netlink: &Netlink,
    telemetry: &Telemetry,
) {
    if node.gro_blocked.is_some() {
        keep_gro_device(node, datapath, netlink, telemetry, false).await;
    }
}

/// Why the GRO device cannot be up on `port`, when other VXLAN devices hold it.
async fn gro_blocker(port: u16, netlink: &Netlink) -> Option<String> {
    let devices = netlink.other_vxlan_devices_on(port).await.ok()?;
    let names: Vec<&str> = devices.iter().map(|(name, _)| name.as_str()).collect();
    let first = names.first()?;
    let what_to_do = if first.starts_with("flannel.") {
        format!(
            "; flanneld's routes through it take host traffic past {HOST_DEVICE}. If flanneld \
             no longer runs here, delete it (ip link delete {first})"
        )
    } else {
        format!(
            ". Give this network or the other overlay another port, or delete {first} if \
             nothing uses it"
        )
    };
    Some(format!(
        "VXLAN device {} holds port {port}, so the GRO device {GRO_DEVICE} cannot be up: \
         fragmented VXLAN (an underlay path with a smaller MTU) goes to {first}, which drops \
         it{what_to_do}",
        names.join(", ")
    ))
}

/// Another VXLAN device on our port (a stock `flannel.1` left from before, or another overlay)
/// does not see the VXLAN sent to this node's address: `underlay_ingress` takes it first,
/// delivers what is ours (our VNI, from a member node) and drops the rest. For a `flannel.1`
/// of our VNI that loses nothing but what the GRO device would have taken (reported by
/// [`keep_gro_device`]); another overlay's traffic is lost, which is worth an error.
async fn warn_of_other_vxlan_devices(port: u16, vni: u32, netlink: &Netlink) {
    let devices = match netlink.other_vxlan_devices_on(port).await {
        Ok(devices) => devices,
        Err(e) => {
            warn!("cannot list the VXLAN devices on port {port}: {e}");
            return;
        }
    };
    for (name, their_vni) in devices {
        if their_vni == Some(vni) {
            info!(
                "VXLAN device {name} (VNI {vni}) also listens on port {port}: VXLAN to this node \
                 on that port is decapsulated by our data path first (ours: VNI {vni} from member \
                 nodes)"
            );
        } else {
            let theirs = their_vni.map_or_else(|| "any VNI".to_owned(), |v| format!("VNI {v}"));
            error!(
                "VXLAN device {name} ({theirs}) also listens on port {port}: our data path takes \
                 VXLAN to this node on that port first and drops what is not VNI {vni} from a \
                 member node (drop_wrong_vni, drop_unknown_peer), so {name}'s traffic is lost; \
                 give this network or the other overlay another port"
            );
        }
    }
}

async fn add_gro_device(port: u16, datapath: &mut Datapath, netlink: &Netlink) -> Result<()> {
    let index = netlink.ensure_gro_device(port).await?;
    // Already there, as the kernel confirms, when this retries while another VXLAN device held
    // the port: attaching again would only take over the pinned link once a second.
    let attached = datapath.attached_to(crate::datapath::GRO_DEVICE_INGRESS) == Some(GRO_DEVICE)
        && !repair::affects(&datapath.attachment_problems()).gro;
    if !attached {
        datapath.attach_gro_device(GRO_DEVICE)?;
    }
    netlink.set_up(index, GRO_DEVICE).await?;
    info!(
        "GRO device {GRO_DEVICE}: the kernel aggregates VXLAN to port {port} before decapsulation"
    );
    Ok(())
}

async fn remove_gro_device(datapath: &mut Datapath, netlink: &Netlink) -> Result<()> {
    datapath.detach_gro_device()?;
    if netlink.remove_gro_device().await? {
        info!("deleted the GRO device {GRO_DEVICE} (host-gw: no VXLAN)");
    }
    Ok(())
}

/// Writes `desired` into the data path's endpoint map, removing what is not in it. Failures
/// are logged; the next change retries.
pub(super) fn sync_endpoints(
    datapath: &mut Datapath,
    desired: &BTreeMap<std::net::Ipv4Addr, Endpoint>,
) {
    let stale: Vec<_> = datapath
        .endpoints()
        .keys()
        .filter(|addr| !desired.contains_key(addr))
        .copied()
        .collect();
    for addr in stale {
        match datapath.remove_endpoint(addr) {
            Ok(()) => tracing::debug!("endpoint {addr} removed"),
            Err(e) => warn!("cannot remove endpoint {addr}: {e}"),
        }
    }
    for (addr, endpoint) in desired {
        if datapath.endpoints().get(addr) == Some(endpoint) {
            continue;
        }
        match datapath.set_endpoint(*addr, *endpoint) {
            Ok(()) => tracing::debug!(
                "endpoint {addr}: ifindex {} MAC {}",
                endpoint.ifindex,
                Mac::from(endpoint.mac)
            ),
            Err(e) => warn!("cannot add endpoint {addr}: {e}"),
        }
    }
}

/// Attaches `pod_port_egress` to the veth of every endpoint and lets go of the others.
pub(super) fn sync_pod_ports(
    datapath: &mut Datapath,
    endpoints: &BTreeMap<std::net::Ipv4Addr, Endpoint>,
) {
    let wanted: std::collections::BTreeSet<u32> = endpoints.values().map(|e| e.ifindex).collect();
    let gone: Vec<u32> = datapath
        .pod_ports()
        .filter(|i| !wanted.contains(i))
        .collect();
    for ifindex in gone {
        datapath.detach_pod_port(ifindex);
    }
    for ifindex in wanted {
        if let Err(e) = datapath.attach_pod_port(ifindex) {
            warn!("{e}; that pod's traffic is picked up on the bridge");
        }
    }
}

/// Pods' traffic to anything outside the cluster is routed by the kernel, and the data path
/// hands it packets it must answer with ICMP (TTL, MTU): both need forwarding on, as flanneld's
/// users get from Docker or kubelet. The setting is per network namespace.
pub(super) fn enable_ip_forwarding() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    if current.trim() != "1" {
        std::fs::write(PATH, "1")
            .with_context(|| format!("turning on IPv4 forwarding in {PATH}"))?;
        info!("IPv4 forwarding turned on ({PATH})");
    }
    Ok(())
}

pub(super) fn report_counters(datapath: &Datapath) {
    match datapath.counters() {
        Ok(counters) => {
            for (reason, c) in counters {
                info!(
                    "counter {}: {} packets, {} bytes",
                    reason.name(),
                    c.packets,
                    c.bytes
                );
            }
        }
        Err(e) => warn!("cannot read the data path counters: {e}"),
    }
}

/// Asks the kernel whether every program is still attached where the agent put it, and
/// re-attaches what is not: the underlay programs on the external interface, `ovl0` recreated
/// with its program (through the lease's settings), the GRO device likewise, `pod_egress` on
/// the bridge. What cannot be repaired is reported as not ready until a later check succeeds.
pub(super) async fn check_and_repair(
    node: &mut NodeDatapath,
    datapath: &mut Datapath,
    netlink: &Netlink,
    ext: &ExternalInterface,
    lease: &Lease,
    telemetry: &Telemetry,
) {
    let problems = datapath.attachment_problems();
    if problems.is_empty() {
        telemetry.set_datapath_problem(None);
        return;
    }
    for p in &problems {
        warn!("data path: {p}; repairing");
    }
    let affected = repair::affects(&problems);
    if affected.underlay {
        if let Err(e) = datapath.attach_underlay(&ext.name) {
            warn!("cannot re-attach to {}: {e}", ext.name);
        } else if let Err(e) = attach_xdp(node.xdp, node.backend, datapath, ext) {
            warn!("cannot re-attach XDP to {}: {e:#}", ext.name);
        }
    }
    if affected.host
        && let Err(e) = node.apply_lease(datapath, netlink, lease).await
    {
        warn!("cannot recreate {HOST_DEVICE}: {e:#}");
    }
    if affected.gro {
        keep_gro_device(node, datapath, netlink, telemetry, true).await;
    }
    if affected.pod
        && let Some(bridge) = datapath
            .attached_to(crate::datapath::POD_EGRESS)
            .map(str::to_owned)
        && let Err(e) = datapath.attach_pod_bridge(&bridge)
    {
        warn!("cannot re-attach to the pod bridge {bridge}: {e}");
    }
    let left = datapath.attachment_problems();
    if left.is_empty() {
        let what: Vec<String> = problems.iter().map(ToString::to_string).collect();
        info!("data path repaired ({})", what.join("; "));
        telemetry.count_repair();
        telemetry.set_datapath_problem(None);
    } else {
        let what: Vec<String> = left.iter().map(ToString::to_string).collect();
        telemetry.set_datapath_problem(Some(what.join("; ")));
    }
}

/// Frees idle masqueraded flows; failures are logged (the next sweep retries).
pub(super) fn sweep_nat(datapath: &mut Datapath) {
    match datapath.sweep_nat() {
        Ok(r) if r.removed > 0 => {
            tracing::debug!(
                "masquerade: {} idle entries removed, {} flows left",
                r.removed,
                r.flows
            );
        }
        Ok(_) => {}
        Err(e) => warn!("cannot sweep the masquerade table: {e}"),
    }
}

/// A new routing generation for the programs' next-hop cache (see `Datapath::routing_changed`).
/// On failure the cached next hops stay in use until the next attempt, at most a second later.
pub(super) fn routing_changed(datapath: &mut Datapath) {
    if let Err(e) = datapath.routing_changed() {
        warn!("cannot renew the routing generation: {e}");
    }
}
