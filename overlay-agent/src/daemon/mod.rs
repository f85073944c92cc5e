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
//! kernel and repairs them (also at once on netlink link events, `netevents`), and writes the
//! status file; an etcd prober task records reachability. All of it feeds `telemetry`, which
//! `/readyz`, `/metrics` and `overlay-agent status` report.
//!
//! This module is orchestration only: start-up order, the tasks and their shutdown, the main
//! loop. Applying decisions to the data path (lease, peer routes from `backend`, endpoints,
//! the pod bridge, repairs) is in `node`; options, the subnet file, health and status in
//! `setup`. The daemon may call every other module; nothing calls it but `main`.

mod node;
mod setup;

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use self::{
    node::{
        NodeDatapath, attach_xdp, check_and_repair, enable_ip_forwarding, keep_gro_device,
        remove_flanneld_routes, report_counters, retry_gro_device, routing_changed, sweep_nat,
        sync_endpoints, sync_pod_ports,
    },
    setup::{etcd_options, manager_options, probe_etcd, start_healthz, write_env, write_status},
};
use crate::{
    backend,
    cli::{Flags, LayoutMismatch, PodHook},
    datapath::{
        Datapath, DatapathError,
        foreign::foreign_programs,
        nat::NatSettings,
        pin::{PinDir, PinError},
    },
    endpoints::run_watcher,
    forward_rules, iface, kernel,
    netdev::{GRO_DEVICE, HOST_DEVICE, Netlink},
    netevents::NetlinkEvents,
    notify::Notifier,
    subnet::{
        EtcdRegistry, Lease, SubnetManager,
        config::NetworkConfig,
        file::{check_writable, previous_subnet},
        validate::check_public_ip,
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
/// that outlives the agent and no other agent holds it, and, once the network config is known,
/// the backend fits the interface (host-gw without NAT, a vxlan `MTU` not above the
/// interface's), `Network` takes over no network the node is on, peers would accept our
/// PublicIP, the programs load, and no other agent's data path is on the interface. A start-up
/// that fails later, before the node is ready, undoes what it created ([`Undo`]): the lease it
/// created (peers would route the subnet to a node that never came up) and a data path that no
/// agent had pinned before.
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

/// The route of the cluster network through `ovl0` must not take the place of a network the
/// node is on: one of the same prefix (replaced) or a wider one (cut into) would lose its
/// hosts, perhaps etcd among them. Pod bridges may still hold a runtime's default address
/// (Docker's `172.17.0.1/16` before it is restarted with `FLANNEL_SUBNET`) and are spared, as
/// are our own devices.
///
/// An etcd endpoint given as an address inside the network is refused unless a route more
/// specific than the network leads to it: the network's route would send its traffic into the
/// overlay, and the agent would lose etcd right after taking its lease.
async fn check_network_fits(
    config: &NetworkConfig,
    pod_bridge: Option<&str>,
    etcd_endpoints: &[String],
) -> Result<()> {
    let mut spared = vec![HOST_DEVICE, GRO_DEVICE, "docker0", "cni0"];
    spared.extend(pod_bridge);
    let (interfaces, routes) = iface::snapshot()
        .await
        .context("listing the node's interfaces and routes")?;
    let taken = iface::networks_taken_over(&interfaces, config.network, &spared);
    if let Some((name, net)) = taken.first() {
        anyhow::bail!(
            "Network {} overlaps {name}'s {net}: the network's route through {HOST_DEVICE} \
             would take the place of {name}'s and its hosts would become unreachable; choose a \
             Network that no interface of this node is on",
            config.network
        );
    }
    // Static routes the same way (a remote site's network through a gateway).
    let spared_oifs: Vec<u32> = interfaces
        .iter()
        .filter(|i| spared.contains(&i.name.as_str()))
        .map(|i| i.index)
        .collect();
    if let Some(route) = iface::routes_taken_over(&routes, config.network, &spared_oifs).first() {
        let name = |index| {
            interfaces
                .iter()
                .find(|i| Some(i.index) == index)
                .map_or_else(|| "?".to_owned(), |i| i.name.clone())
        };
        let via = route
            .gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        anyhow::bail!(
            "Network {} overlaps the route {}{via} dev {}: the network's route through \
             {HOST_DEVICE} would take its place and the hosts it leads to would become \
             unreachable; choose a Network that no route of this node covers",
            config.network,
            route.destination,
            name(route.oif)
        );
    }
    let captured = iface::etcd_endpoints_taken_over(etcd_endpoints, &routes, config.network);
    if let Some((endpoint, ip, now)) = captured.first() {
        let now = now.as_ref().map_or_else(
            || "no route".to_owned(),
            |r| {
                let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                format!("the route {}{via}", r.destination)
            },
        );
        anyhow::bail!(
            "etcd endpoint {endpoint} is inside Network {}: {ip} is reached through {now}, \
             which the network's route through {HOST_DEVICE} would take over, and the agent \
             would lose etcd; give etcd's address outside the Network, or choose another Network",
            config.network
        );
    }
    Ok(())
}

/// `--ip-masq` under Kubernetes must leave the Services alone (see
/// [`crate::datapath::nat::service_ip_masqueraded`]); flanneld's MASQUERADE runs after kube-proxy's
/// DNAT and needs no such setting, so a node set up as for flanneld would lose every pod →
/// Service connection without a word. Ours does too when kube-proxy's rules run between the
/// pods' veths and the masquerade of a new flow: `--pod-hook port` (a flow's first packet goes
/// on to the bridge) and a bridge that runs iptables (`br_netfilter`, which Kubernetes
/// requires).
async fn check_services_not_masqueraded(flags: &Flags, config: &NetworkConfig) -> Result<()> {
    let settings = NatSettings::from_flags(flags);
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    if !settings.enabled || host.is_none() {
        return Ok(());
    }
    let (interfaces, _) = iface::snapshot()
        .await
        .context("listing the node's addresses")?;
    let local: Vec<_> = interfaces.iter().flat_map(|i| i.ipv4.clone()).collect();
    if let Some(ip) = crate::datapath::nat::service_ip_masqueraded(
        &settings,
        config.network,
        host.as_deref(),
        &local,
    ) {
        let bridge_iptables = bridge_runs_iptables();
        if flags.pod_hook == PodHook::Port && bridge_iptables {
            info!(
                service = %ip,
                "--ip-masq under Kubernetes: the pod bridge runs kube-proxy's rules \
                 (br_netfilter) before a new flow is masqueraded, so Services need no \
                 --ip-masq-exclude"
            );
            return Ok(());
        }
        let why = if bridge_iptables {
            "with --pod-hook bridge"
        } else {
            "the bridge does not run iptables (net.bridge.bridge-nf-call-iptables is not 1: \
             modprobe br_netfilter, as Kubernetes requires), so"
        };
        anyhow::bail!(
            "--ip-masq under Kubernetes: the Service address {ip} (KUBERNETES_SERVICE_HOST) is \
             not in --ip-masq-exclude, and {why} the masquerade translates pod traffic before \
             kube-proxy's DNAT: pod → Service connections would leave translated and still \
             addressed to the ClusterIP. Load br_netfilter and keep --pod-hook port, or add \
             --ip-masq-exclude with the Service CIDR (kube-apiserver's \
             --service-cluster-ip-range; kubeadm's is 10.96.0.0/12). kube-proxy in IPVS mode, \
             whose ClusterIPs are local addresses on kube-ipvs0, needs neither"
        );
    }
    Ok(())
}

/// Whether the bridge hands bridged IPv4 to iptables in this network namespace
/// (`br_netfilter` loaded and `net.bridge.bridge-nf-call-iptables` = 1).
fn bridge_runs_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
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

    let can_reach = iface::parse_can_reach(flags.iface_can_reach.as_deref())?;
    let ext = iface::discover(&flags.iface, &flags.iface_regex, can_reach, flags.public_ip)
        .await
        .context("choosing the external interface")?;
    info!(
        "using interface {} (index {}, MTU {}), address {}, public IP {}",
        ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip
    );
    telemetry.set_interface(&ext.name, ext.iface_addr, ext.public_ip);

    telemetry.phase("connecting to etcd");
    let registry = EtcdRegistry::connect(&etcd_options(&flags))
        .await
        .context("connecting to etcd")?;
    let manager = SubnetManager::new(registry, &flags.etcd_prefix, manager_options(&flags)?)?;
    let running_config = Arc::new(std::sync::OnceLock::new());
    let mut prober = tokio::spawn(probe_etcd(
        manager.clone(),
        telemetry.clone(),
        running_config.clone(),
    ));
    telemetry.phase("waiting for the network config in etcd");

    let config = tokio::select! {
        config = manager.wait_for_network_config() => config,
        signal = signals.recv() => return shut_down(signal),
    };
    let _ = running_config.set(config.clone());
    backend::check(&config.backend, ext.public_ip, ext.iface_addr)?;
    backend::check_mtu(&config.backend, &ext.name, ext.mtu)?;
    check_network_fits(&config, flags.pod_bridge.as_deref(), &flags.etcd_endpoints).await?;
    check_services_not_masqueraded(&flags, &config).await?;
    // What every peer would refuse in our lease (`subnet::validate`) is refused here first.
    check_public_ip(&config, ext.public_ip).map_err(|refusal| {
        let source = if flags.public_ip.is_some() {
            "--public-ip".to_owned()
        } else {
            format!("interface {}", ext.name)
        };
        anyhow::anyhow!(
            "the PublicIP from {source} cannot be used: {refusal}. Peers would refuse this \
             node's lease; choose the external interface with --iface, or set --public-ip"
        )
    })?;
    telemetry.phase("acquiring a subnet lease");

    // The node's settings for the data path, among them the VtepMAC its lease publishes.
    let mut node = NodeDatapath::new(&flags, &config, &ext);
    let attrs = backend::lease_attrs(&config.backend, ext.public_ip, node.vtep_mac);
    let previous = previous_subnet(&flags.subnet_file);
    let mut datapath = load_datapath(&flags.bpf_dir, flags.pinned_layout_mismatch).await?;
    datapath.check_no_foreign_data_path(&ext.name)?;
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
    let mut netlink_events =
        NetlinkEvents::subscribe().context("subscribing to netlink link and neighbour events")?;
    enable_ip_forwarding()?;
    // flanneld's FORWARD accepts where the policy drops, before the node says it is ready.
    let _forward_rules = if flags.iptables_forward_rules {
        let first = forward_rules::first_check(config.network, &telemetry).await;
        let every = Duration::from_secs(flags.iptables_resync);
        Some(AbortOnDrop(tokio::spawn(forward_rules::keep(
            config.network,
            every,
            first,
            telemetry.clone(),
        ))))
    } else {
        info!("--iptables-forward-rules=false: FORWARD is left as it is");
        telemetry.set_forward("off (--iptables-forward-rules=false)".to_owned());
        None
    };
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
    attach_xdp(node.xdp, node.backend, &mut datapath, &ext)?;
    keep_gro_device(&mut node, &mut datapath, &netlink, &telemetry, true).await;
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
    let mut endpoint_watcher = tokio::spawn(run_watcher(
        node.scope.subscribe(),
        endpoints_tx,
        netlink_events.handle(),
        netlink_events.messages(),
    ));

    let mut subnet = lease.subnet;
    let mut bridge_poll = tokio::time::interval(BRIDGE_POLL);
    bridge_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            signal = signals.recv() => break shut_down(signal),
            _ = bridge_poll.tick() => {
                // Also a new routing generation each second, in case a netlink event was lost.
                routing_changed(&mut datapath);
                node.track_pod_bridge(&mut datapath, &netlink).await;
                let lease = lease_rx.borrow().clone();
                check_and_repair(&mut node, &mut datapath, &netlink, &ext, &lease, &telemetry).await;
                retry_gro_device(&mut node, &mut datapath, &netlink, &telemetry).await;
                remove_flanneld_routes(&netlink, &datapath).await;
                telemetry.set_bridge(datapath.pod_bridge());
                write_status(&telemetry, &flags.status_file);
            }
            _ = watchdog.tick(), if notifier.watchdog_interval().is_some() => notifier.watchdog(),
            Some(()) = netlink_events.routing.recv() => routing_changed(&mut datapath),
            Some(event) = netlink_events.links.recv() => {
                let ours = event.name == ext.name
                    || event.name == HOST_DEVICE
                    || event.name == GRO_DEVICE
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
                telemetry.set_lease_shared(lease.shared_with.map(|other| {
                    format!(
                        "another agent publishes this node's PublicIP {} and writes our lease of {} (etcd lease {other:x})",
                        lease.attrs.public_ip, lease.subnet
                    )
                }));
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
                endpoint_watcher = tokio::spawn(run_watcher(
                    node.scope.subscribe(),
                    tx,
                    netlink_events.handle(),
                    netlink_events.messages(),
                ));
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

/// `overlay-agent cleanup`: removes the pinned data path (its programs detach as their links
/// go), the host device and the GRO device. Refuses, removing nothing, while an agent runs
/// with `bpf_dir` (it holds the directory's lock): that agent would go on without its data
/// path.
pub async fn cleanup(bpf_dir: &Path) -> Result<()> {
    let pins = PinDir::existing(bpf_dir);
    let _lock = pins
        .as_ref()
        .map(PinDir::lock)
        .transpose()
        .context("cleanup removes the data path of a stopped agent only")?;
    let netlink = Netlink::new()?;
    // The devices are shared by name: another agent's data path on one (another --bpf-dir)
    // keeps it. Asked before our pins go, which tell our links from theirs.
    let in_use = |device: &str| -> Result<bool> {
        Ok(!foreign_programs(device, pins.as_ref())
            .with_context(|| format!("asking the kernel for the programs on {device}"))?
            .is_empty())
    };
    let (keep_gro, keep_host) = (in_use(GRO_DEVICE)?, in_use(HOST_DEVICE)?);
    // The GRO device goes before its program's link: up without it, it would deliver.
    if keep_gro {
        warn!("kept the GRO device {GRO_DEVICE}: another agent's data path uses it");
    } else if netlink.remove_gro_device().await? {
        info!("deleted the GRO device {GRO_DEVICE}");
    }
    match pins {
        Some(pins) => {
            let removed = pins.remove_all()?;
            info!("removed {} pins under {}", removed.len(), bpf_dir.display());
        }
        None => info!("nothing pinned under {}", bpf_dir.display()),
    }
    if keep_host {
        warn!("kept the host device {HOST_DEVICE}: another agent's data path uses it");
    } else if netlink.remove_host_device().await? {
        info!("deleted the host device {HOST_DEVICE}");
    }
    Ok(())
}

/// A background task that ends with the scope holding it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
