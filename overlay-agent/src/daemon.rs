//! The node daemon: joins the cluster as flanneld does, then keeps the lease and the data path
//! current until SIGTERM/SIGINT.
//!
//! Start-up order: external interface → etcd → network config (waits while missing or bad) →
//! subnet lease → data path → subnet file → ready. After that four tasks run under this one
//! owner: the lease keeper (renewal, re-acquisition after revocation), the peer watcher (etcd
//! leases of the other nodes, as add/change/remove events), the endpoint watcher (the pods on
//! the bridge, from netlink, for delivery straight into them) and the health endpoints. If
//! either control-plane task ends unexpectedly the daemon fails rather than run half-blind; if
//! the endpoint watcher fails, its endpoints are withdrawn (pods are then reached through the
//! bridge) and it is restarted.
//!
//! Operations: the effective flags are logged and flanneld's other flags checked
//! (`compat`), the kernel's features checked (`kernel`) before anything is touched; systemd
//! hears `READY=1` once the node is ready and `WATCHDOG=1` while the main loop runs
//! (`notify`). Every second the main loop checks the data path's attachments against the
//! kernel and repairs them (also at once on netlink link events, `linkwatch`), and writes the
//! status file; an etcd prober task records reachability. All of it feeds `telemetry`, which
//! `/readyz`, `/metrics` and `overlay-agent status` report.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use ipnet::Ipv4Net;
use overlay_common::endpoint::Endpoint;

use crate::{
    backend::{self, RouteChange},
    cli::{Flags, LayoutMismatch, PodHook, XdpPolicy},
    datapath::repair,
    datapath::{
        Datapath, DatapathError, NodeConfig,
        nat::{NatSettings, pinned_nat_flows},
        pin::{PinDir, PinError},
        pinned_counters, pinned_endpoints, pinned_peers,
    },
    endpoints::{BridgeScope, run_watcher},
    healthz,
    iface::{self, ExternalInterface},
    kernel, linkwatch,
    netdev::{HOST_DEVICE, HostDeviceSpec, Netlink, find_pod_bridge},
    notify::Notifier,
    subnet::lease::config_key,
    subnet::{
        EtcdOptions, EtcdRegistry, Lease, Mac, ManagerOptions, PeerEvent, SubnetManager,
        config::{Backend, NetworkConfig},
        file::{SubnetEnv, check_writable, first_usable, previous_subnet, write_subnet_file},
    },
    telemetry::Telemetry,
};

/// Room for bursts of peer events (e.g. the initial listing of a large cluster) before the
/// watcher waits for the data path to catch up.
const PEER_EVENT_QUEUE: usize = 1024;

/// Runs the agent until a signal arrives or something fails for good.
///
/// What can be checked without taking anything from the cluster is checked before the lease:
/// the subnet file's location can be written (first of all), the pin directory is on a bpffs
/// that outlives the agent and no other agent holds it, the programs load (once the network
/// config is known). A start-up that fails later, before the node is ready, undoes what it
/// created ([`Undo`]): the lease it created (peers would route the subnet to a node that never
/// came up) and a data path that no agent had pinned before.
pub async fn run(flags: Flags) -> Result<()> {
    // Handlers first, so that a signal during start-up still ends the agent cleanly.
    let signals = Signals::new()?;
    check_writable(&flags.subnet_file).context("--subnet-file cannot be written")?;
    let mut undo = Undo {
        fresh_datapath: PinDir::existing(&flags.bpf_dir).is_none(),
        bpf_dir: flags.bpf_dir.clone(),
        lease: None,
        ready: false,
    };
    let outcome = serve(flags, signals, &mut undo).await;
    if outcome.is_err() && !undo.ready {
        undo.run().await;
    }
    outcome
}

/// How long a starting agent waits for the agent that holds its `--bpf-dir` to exit (a
/// restart whose predecessor is still shutting down).
const PIN_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Loads the data path pinned under `bpf_dir`, waiting up to [`PIN_LOCK_WAIT`] while another
/// agent holds the directory. Pinned maps of another layout are replaced or refused by
/// `layout` (`--pinned-layout-mismatch`).
async fn load_datapath(bpf_dir: &Path, layout: LayoutMismatch) -> Result<Datapath> {
    let deadline = tokio::time::Instant::now() + PIN_LOCK_WAIT;
    let mut said = false;
    loop {
        match Datapath::load_pinned_checked(bpf_dir, layout) {
            Err(DatapathError::PinDir(PinError::Locked { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    info!(
                        "waiting up to {PIN_LOCK_WAIT:?} for the agent holding {} to exit",
                        bpf_dir.display()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map_err(Into::into),
        }
    }
}

/// What a start-up created that must not outlive a failure before the node is ready.
struct Undo {
    /// No data path was pinned under `bpf_dir` before this agent.
    fresh_datapath: bool,
    bpf_dir: std::path::PathBuf,
    /// The lease acquired, with the manager to give it up.
    lease: Option<(SubnetManager<EtcdRegistry>, Lease)>,
    /// The node became ready: nothing to undo any more.
    ready: bool,
}

impl Undo {
    /// Gives up a lease created by this start and removes a data path no agent had before
    /// (pins, links, host device); a reused lease and an adopted data path stay, as they were.
    async fn run(self) {
        if let Some((manager, lease)) = &self.lease
            && lease.created
        {
            match manager.release_lease(lease).await {
                Ok(()) => info!("start-up failed: gave up the lease of {}", lease.subnet),
                Err(e) => warn!(
                    "start-up failed, and the lease of {} could not be given up (it expires by itself): {e}",
                    lease.subnet
                ),
            }
        }
        if self.fresh_datapath {
            match cleanup(&self.bpf_dir).await {
                Ok(()) => info!("start-up failed: removed the data path it had installed"),
                Err(e) => warn!("start-up failed, and its data path could not be removed: {e:#}"),
            }
        }
    }
}

/// The agent: joins the cluster, installs the data path, serves.
async fn serve(flags: Flags, mut signals: Signals, undo: &mut Undo) -> Result<()> {
    info!("CLI flags config: {}", flags.effective());
    for warning in flags.compat.check()? {
        warn!("{warning}");
    }
    let release = kernel::check()?;
    info!("kernel {release}: tcx, BTF and every helper the data path uses are available");
    let notifier = Notifier::from_env().context("systemd notification socket")?;
    let telemetry = Arc::new(Telemetry::new(
        flags.health_etcd_timeout,
        flags.etcd_endpoints.clone(),
    ));
    let mut healthz = start_healthz(&flags, telemetry.clone()).await?;

    let ext = iface::discover(&flags.iface, &flags.iface_regex, flags.public_ip)
        .await
        .context("choosing the external interface")?;
    info!(
        "using interface {} (index {}, MTU {}), address {}, public IP {}",
        ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip
    );
    telemetry.set_interface(&ext.name, ext.public_ip);

    telemetry.phase("connecting to etcd");
    let registry = EtcdRegistry::connect(&etcd_options(&flags))
        .await
        .context("connecting to etcd")?;
    let manager = SubnetManager::new(registry, &flags.etcd_prefix, manager_options(&flags)?)?;
    let mut prober = tokio::spawn(probe_etcd(manager.clone(), telemetry.clone()));
    telemetry.phase("waiting for the network config in etcd");

    let config = tokio::select! {
        config = manager.wait_for_network_config() => config,
        signal = signals.recv() => return shut_down(signal),
    };
    backend::check(&config.backend, ext.public_ip, ext.iface_addr)?;
    telemetry.phase("acquiring a subnet lease");

    // The node's settings for the data path, among them the VtepMAC its lease publishes.
    let mut node = NodeDatapath::new(&flags, &config, &ext);
    let attrs = backend::lease_attrs(&config.backend, ext.public_ip, node.vtep_mac);
    let previous = previous_subnet(&flags.subnet_file);
    let mut datapath = load_datapath(&flags.bpf_dir, flags.pinned_layout_mismatch).await?;
    let lease = tokio::select! {
        lease = manager.acquire_lease(&config, &attrs, previous) => lease?,
        signal = signals.recv() => return shut_down(signal),
    };
    info!("Lease acquired: {}", lease.subnet);
    telemetry.set_lease(
        lease.subnet,
        lease.expiration.map(tokio::time::Instant::into_std),
        manager.options().renew_margin,
    );
    telemetry.phase("attaching the data path");
    undo.lease = Some((manager.clone(), lease.clone()));

    let netlink = Netlink::new()?;
    // Subscribed before the first attachment, so no deletion goes unheard.
    let mut links = linkwatch::subscribe().context("subscribing to netlink link events")?;
    enable_ip_forwarding()?;
    datapath.attach_underlay(&ext.name)?;
    info!("data path attached to {}", ext.name);
    if datapath.decap_clears_tunnel_gso() {
        info!(
            "decapsulation: the kernel accepts BPF_F_ADJ_ROOM_DECAP_L4_UDP; the sender's tunnel GSO state is cleared"
        );
    } else {
        info!(
            "decapsulation: the kernel lacks BPF_F_ADJ_ROOM_DECAP_L4_UDP; the sender's tunnel GSO state stays \
             (harmless for delivery straight into pods; the bridge fallback segments in software)"
        );
    }
    attach_xdp(node.xdp, &mut datapath, &netlink, &ext).await?;
    node.apply_lease(&mut datapath, &netlink, &lease).await?;
    telemetry.set_host_device(Some(HOST_DEVICE));
    node.track_pod_bridge(&mut datapath, &netlink).await;

    // Masquerade (`--ip-masq`) in the data path; off means off (flows forgotten).
    let nat = NatSettings::from_flags(&flags);
    datapath.set_nat(&nat)?;
    if nat.enabled {
        info!(
            "masquerading {} to outside (ports {}..={}, except {:?})",
            config.network, nat.ports.0, nat.ports.1, nat.exclude
        );
    }
    let mut nat_sweep = tokio::time::interval(nat.timeouts.sweep_interval());

    telemetry.set_network(config.backend.type_name(), config.network, nat.enabled);
    write_env(&flags, &config, &ext, &lease)?;
    telemetry.set_bridge(datapath.pod_bridge());
    telemetry.started();
    write_status(&telemetry, &flags.status_file);
    notifier.ready(&format!("serving {} on {}", lease.subnet, ext.name));
    undo.ready = true;
    if let Some(every) = notifier.watchdog_interval() {
        info!("systemd watchdog: notifying every {every:?}");
    }
    let mut watchdog = tokio::time::interval(
        notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600)),
    );

    let (lease_tx, mut lease_rx) = watch::channel(lease.clone());
    let (peer_tx, mut peers) = mpsc::channel(PEER_EVENT_QUEUE);
    let mut keeper = tokio::spawn({
        let (manager, config) = (manager.clone(), config.clone());
        async move { manager.run_lease_keeper(config, lease_tx).await }
    });
    let mut watcher = tokio::spawn({
        let (manager, own, config) = (manager.clone(), lease_rx.clone(), config.clone());
        async move { manager.run_peer_watcher(config, own, peer_tx).await }
    });

    let (endpoints_tx, mut endpoints) = watch::channel(BTreeMap::new());
    let mut endpoint_watcher = tokio::spawn(run_watcher(node.scope.subscribe(), endpoints_tx));

    let mut subnet = lease.subnet;
    let mut bridge_poll = tokio::time::interval(BRIDGE_POLL);
    bridge_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            signal = signals.recv() => break shut_down(signal),
            _ = bridge_poll.tick() => {
                node.track_pod_bridge(&mut datapath, &netlink).await;
                let lease = lease_rx.borrow().clone();
                check_and_repair(&mut node, &mut datapath, &netlink, &ext, &lease, &telemetry).await;
                telemetry.set_bridge(datapath.pod_bridge());
                write_status(&telemetry, &flags.status_file);
            }
            _ = watchdog.tick(), if notifier.watchdog_interval().is_some() => notifier.watchdog(),
            Some(event) = links.events.recv() => {
                let ours = event.name == ext.name
                    || event.name == HOST_DEVICE
                    || datapath.pod_bridge() == Some(event.name.as_str());
                if ours {
                    tracing::debug!("link event: {event:?}");
                    // The bridge first: one that went away is let go, not "repaired".
                    node.track_pod_bridge(&mut datapath, &netlink).await;
                    let lease = lease_rx.borrow().clone();
                    check_and_repair(&mut node, &mut datapath, &netlink, &ext, &lease, &telemetry).await;
                }
            }
            _ = nat_sweep.tick(), if nat.enabled => sweep_nat(&mut datapath),
            changed = lease_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the lease keeper stopped"));
                }
                let lease = lease_rx.borrow_and_update().clone();
                telemetry.set_lease(
                    lease.subnet,
                    lease.expiration.map(tokio::time::Instant::into_std),
                    manager.options().renew_margin,
                );
                if lease.subnet != subnet {
                    info!("subnet changed from {subnet} to {} after re-acquisition", lease.subnet);
                    subnet = lease.subnet;
                    if let Err(e) = node.apply_lease(&mut datapath, &netlink, &lease).await {
                        error!("cannot move the data path to subnet {subnet}: {e:#}");
                    }
                    if let Err(e) = write_env(&flags, &config, &ext, &lease) {
                        error!("{e:#}");
                    }
                }
            }
            changed = endpoints.changed() => {
                if changed.is_ok() {
                    let desired = endpoints.borrow_and_update().clone();
                    sync_endpoints(&mut datapath, &desired);
                    if flags.pod_hook == PodHook::Port {
                        sync_pod_ports(&mut datapath, &desired);
                    }
                }
            }
            result = &mut endpoint_watcher => {
                match result {
                    Ok(Err(e)) => error!("endpoint watcher: {e}; pods are reached through the bridge until it is back"),
                    other => error!("endpoint watcher stopped ({other:?}); restarting it"),
                }
                sync_endpoints(&mut datapath, &BTreeMap::new());
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (tx, rx) = watch::channel(BTreeMap::new());
                endpoints = rx;
                endpoint_watcher = tokio::spawn(run_watcher(node.scope.subscribe(), tx));
            }
            event = peers.recv() => match event {
                Some(event) => node.apply_peer_event(&mut datapath, &netlink, &event).await,
                None => break Err(anyhow::anyhow!("the peer watcher stopped")),
            },
            result = &mut healthz => {
                break Err(anyhow::anyhow!("the health endpoint server stopped: {result:?}"));
            }
        }
    };

    // Stop the control-plane tasks; dropping the receivers ends them. The data path stays: its
    // links and maps are pinned, so pods keep talking until the next agent takes over
    // (`overlay-agent cleanup` removes it for good).
    drop(peers);
    drop(lease_rx);
    for (name, task) in [
        ("lease keeper", &mut keeper),
        ("peer watcher", &mut watcher),
    ] {
        if tokio::time::timeout(Duration::from_secs(5), &mut *task)
            .await
            .is_err()
        {
            warn!("the {name} did not stop within 5 s; aborting it");
            task.abort();
        }
    }
    healthz.abort();
    endpoint_watcher.abort();
    prober.abort();
    let _ = (&mut prober).await;
    notifier.stopping();
    report_counters(&datapath);
    drop(datapath);
    info!(
        "exiting; the data path stays pinned under {}",
        flags.bpf_dir.display()
    );
    outcome
}

/// How often the agent looks for the pod bridge appearing, disappearing or being re-created.
const BRIDGE_POLL: Duration = Duration::from_secs(1);

/// What the data path needs from the node's settings, and the pod bridge it currently serves.
struct NodeDatapath {
    backend: Backend,
    network: Ipv4Net,
    public_ip: std::net::Ipv4Addr,
    vtep_mac: [u8; 6],
    pod_mtu: u32,
    bridge_name: Option<String>,
    /// The gateway address of our subnet: what identifies the pod bridge.
    gateway: std::net::Ipv4Addr,
    /// Our subnet (the lease).
    subnet: Ipv4Net,
    /// The bridge `pod_egress` is attached to: name and interface index.
    bridge: Option<(String, u32)>,
    /// The bridge and subnet the endpoint watcher looks at.
    scope: watch::Sender<Option<BridgeScope>>,
    /// `--xdp`, for re-attaching after a repair.
    xdp: XdpPolicy,
}

impl NodeDatapath {
    fn new(flags: &Flags, config: &NetworkConfig, ext: &ExternalInterface) -> Self {
        Self {
            backend: config.backend,
            network: config.network,
            public_ip: ext.public_ip,
            vtep_mac: Mac::for_public_ip(ext.public_ip).octets(),
            pod_mtu: config.backend.pod_mtu(ext.mtu),
            bridge_name: flags.pod_bridge.clone(),
            gateway: std::net::Ipv4Addr::UNSPECIFIED,
            subnet: config.network,
            bridge: None,
            scope: watch::Sender::new(None),
            xdp: flags.xdp,
        }
    }

    /// Points the endpoint watcher at the current bridge and subnet.
    fn update_scope(&self) {
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
    async fn apply_lease(
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
                self.public_ip,
                self.vtep_mac,
                lease.subnet,
                self.network,
            )
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
    async fn track_pod_bridge(&mut self, datapath: &mut Datapath, netlink: &Netlink) {
        let found = match netlink.interfaces().await {
            Ok(list) => find_pod_bridge(&list, self.bridge_name.as_deref(), self.gateway)
                .map(|i| (i.name.clone(), i.index)),
            Err(e) => {
                warn!("cannot list interfaces to find the pod bridge: {e}");
                return;
            }
        };
        // Nothing to do when the data path already serves what was found (after a restart it
        // may still hold the earlier agent's bridge, which must then be attached or dropped).
        let serving = found.as_ref().map_or(0, |(_, index)| *index);
        if found == self.bridge && datapath.bridge_ifindex() == serving {
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
    async fn apply_peer_event(
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

/// Attaches the XDP decapsulation as `policy` says (see `XdpPolicy`).
async fn attach_xdp(
    policy: XdpPolicy,
    datapath: &mut Datapath,
    netlink: &Netlink,
    ext: &ExternalInterface,
) -> Result<()> {
    let wanted = match policy {
        XdpPolicy::Off => false,
        XdpPolicy::On => true,
        XdpPolicy::Auto => netlink
            .receives_mtu_sized_frames(ext.index, &ext.name)
            .await
            .unwrap_or_else(|e| {
                warn!("{e}; not using XDP decapsulation");
                false
            }),
    };
    if !wanted {
        datapath.detach_underlay_xdp()?;
        info!(
            "XDP decapsulation off on {} ({}): VXLAN is decapsulated in TC",
            ext.name,
            if policy == XdpPolicy::Off {
                "--xdp off"
            } else {
                "its frames may arrive as TSO super-packets"
            }
        );
        return Ok(());
    }
    match datapath.attach_underlay_xdp(&ext.name) {
        Ok(()) => {
            info!(
                "XDP decapsulation on {}: VXLAN is decapsulated before GRO",
                ext.name
            );
            Ok(())
        }
        Err(e) if policy == XdpPolicy::Auto => {
            warn!("{e}; VXLAN is decapsulated in TC (no native XDP here)");
            Ok(())
        }
        Err(e) => Err(e).context("--xdp on"),
    }
}

/// Writes `desired` into the data path's endpoint map, removing what is not in it. Failures
/// are logged; the next change retries.
fn sync_endpoints(datapath: &mut Datapath, desired: &BTreeMap<std::net::Ipv4Addr, Endpoint>) {
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
fn sync_pod_ports(datapath: &mut Datapath, endpoints: &BTreeMap<std::net::Ipv4Addr, Endpoint>) {
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
fn enable_ip_forwarding() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    if current.trim() != "1" {
        std::fs::write(PATH, "1")
            .with_context(|| format!("turning on IPv4 forwarding in {PATH}"))?;
        info!("IPv4 forwarding turned on ({PATH})");
    }
    Ok(())
}

fn report_counters(datapath: &Datapath) {
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

fn etcd_options(flags: &Flags) -> EtcdOptions {
    EtcdOptions {
        endpoints: flags.etcd_endpoints.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
        keyfile: flags.etcd_keyfile.clone(),
        certfile: flags.etcd_certfile.clone(),
        cafile: flags.etcd_cafile.clone(),
        timeout: Some(Duration::from_secs(10)),
    }
}

fn manager_options(flags: &Flags) -> Result<ManagerOptions> {
    let mut options = ManagerOptions {
        renew_margin: ManagerOptions::renew_margin_from_minutes(
            flags.subnet_lease_renew_margin.into(),
        )?,
        ..ManagerOptions::default()
    };
    if let Some(ttl) = flags.dev_lease_ttl {
        // A short developer TTL would be shorter than any margin in minutes: renew at half-life.
        options.lease_ttl = ttl;
        options.renew_margin = options.renew_margin.min(ttl / 2);
        options.retry_period = options
            .retry_period
            .min(ttl / 4)
            .max(Duration::from_millis(100));
    }
    Ok(options)
}

fn write_env(
    flags: &Flags,
    config: &NetworkConfig,
    ext: &ExternalInterface,
    lease: &Lease,
) -> Result<()> {
    let env = SubnetEnv {
        network: config.network,
        subnet: lease.subnet,
        mtu: config.backend.pod_mtu(ext.mtu),
        ip_masq: flags.ip_masq,
    };
    write_subnet_file(&flags.subnet_file, &env)?;
    info!(
        "wrote {} (subnet {}, MTU {})",
        flags.subnet_file.display(),
        lease.subnet,
        env.mtu
    );
    Ok(())
}

async fn start_healthz(
    flags: &Flags,
    telemetry: Arc<Telemetry>,
) -> Result<JoinHandle<std::io::Result<()>>> {
    if flags.healthz_port == 0 {
        // Off, as in flanneld: a task that never ends keeps the main loop uniform.
        return Ok(tokio::spawn(std::future::pending()));
    }
    let ready = healthz::Readiness {
        telemetry,
        bpf_dir: flags.bpf_dir.clone(),
    };
    let server =
        healthz::bind(SocketAddr::new(flags.healthz_ip, flags.healthz_port), ready).await?;
    Ok(tokio::spawn(server))
}

/// How often the prober asks etcd, and how long it waits for an answer.
const ETCD_PROBE_PERIOD: Duration = Duration::from_secs(1);
const ETCD_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks etcd for the network config key every second and records whether it answered, so
/// that readiness and metrics know etcd's reachability (the lease keeper and the peer watcher
/// only notice on their own schedule). Runs until aborted.
async fn probe_etcd(manager: SubnetManager<EtcdRegistry>, telemetry: Arc<Telemetry>) {
    use crate::subnet::Registry as _;
    let key = config_key(manager.prefix());
    loop {
        let result =
            match tokio::time::timeout(ETCD_PROBE_TIMEOUT, manager.registry().get(&key)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {ETCD_PROBE_TIMEOUT:?}")),
            };
        if let Err(e) = &result
            && telemetry.etcd_reachable()
        {
            warn!("etcd became unreachable: {e}");
        } else if result.is_ok() && !telemetry.etcd_reachable() {
            info!("etcd is reachable");
        }
        telemetry.etcd_probe(result);
        tokio::time::sleep(ETCD_PROBE_PERIOD).await;
    }
}

fn write_status(telemetry: &Telemetry, path: &Path) {
    if let Err(e) = telemetry.write_status_file(path) {
        tracing::debug!("cannot write the status file {}: {e}", path.display());
    }
}

/// Asks the kernel whether every program is still attached where the agent put it, and
/// re-attaches what is not: the underlay programs on the external interface, `ovl0` recreated
/// with its program (through the lease's settings), `pod_egress` on the bridge. What cannot be
/// repaired is reported as not ready until a later check succeeds.
async fn check_and_repair(
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
    let (underlay, host, pod) = repair::affects(&problems);
    if underlay {
        if let Err(e) = datapath.attach_underlay(&ext.name) {
            warn!("cannot re-attach to {}: {e}", ext.name);
        } else if let Err(e) = attach_xdp(node.xdp, datapath, netlink, ext).await {
            warn!("cannot re-attach XDP to {}: {e:#}", ext.name);
        }
    }
    if host && let Err(e) = node.apply_lease(datapath, netlink, lease).await {
        warn!("cannot recreate {HOST_DEVICE}: {e:#}");
    }
    if pod
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

/// `overlay-agent counters`: the pinned counters, one `<name> <packets> <bytes>` per line.
pub fn print_counters(bpf_dir: &Path) -> Result<()> {
    for (reason, c) in pinned_counters(bpf_dir)? {
        println!("{} {} {}", reason.name(), c.packets, c.bytes);
    }
    Ok(())
}

/// Frees idle masqueraded flows; failures are logged (the next sweep retries).
fn sweep_nat(datapath: &mut Datapath) {
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

/// `overlay-agent nat`: the masqueraded flows, then `entries <n> capacity <max>`.
pub fn print_nat(bpf_dir: &Path) -> Result<()> {
    let (flows, capacity) = pinned_nat_flows(bpf_dir)?;
    for flow in &flows {
        println!("{flow}");
    }
    println!("entries {} capacity {capacity}", flows.len());
    Ok(())
}

/// `overlay-agent endpoints`: the local pods delivered to directly, one
/// `<pod address> <host-side veth index> <pod MAC>` per line.
pub fn print_endpoints(bpf_dir: &Path) -> Result<()> {
    for (addr, ep) in pinned_endpoints(bpf_dir)? {
        println!("{addr} {} {}", ep.ifindex, Mac::from(ep.mac));
    }
    Ok(())
}

/// `overlay-agent peers`: the routed subnets, one `<subnet> <public IP> <VtepMAC>` per line
/// (`direct` in place of the VtepMAC for peers routed without encapsulation).
pub fn print_peers(bpf_dir: &Path) -> Result<()> {
    for (subnet, node) in pinned_peers(bpf_dir)? {
        if node.is_direct() {
            println!("{subnet} {} direct", node.public_ip());
        } else {
            println!("{subnet} {} {}", node.public_ip(), Mac::from(node.vtep_mac));
        }
    }
    Ok(())
}

/// `overlay-agent cleanup`: removes the pinned data path (its programs detach as their links
/// go) and the host device. Refuses, removing nothing, while an agent runs with `bpf_dir`
/// (it holds the directory's lock): that agent would go on without its data path.
pub async fn cleanup(bpf_dir: &Path) -> Result<()> {
    match PinDir::existing(bpf_dir) {
        Some(pins) => {
            let _lock = pins
                .lock()
                .context("cleanup removes the data path of a stopped agent only")?;
            let removed = pins.remove_all()?;
            info!("removed {} pins under {}", removed.len(), bpf_dir.display());
        }
        None => info!("nothing pinned under {}", bpf_dir.display()),
    }
    if Netlink::new()?.remove_host_device().await? {
        info!("deleted the host device {HOST_DEVICE}");
    }
    Ok(())
}

/// SIGTERM and SIGINT, whichever comes first.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn shut_down(signal: &str) -> Result<()> {
    info!("{signal} received, shutting down");
    Ok(())
}
