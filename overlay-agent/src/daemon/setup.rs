//! What the daemon derives from its flags and keeps beside the data path: etcd and lease
//! options, the subnet file, the health endpoints, the etcd prober and the status file.
//! Called by the daemon's start-up and main loop; may call `subnet`, `healthz`, `telemetry`.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Result;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::{
    cli::Flags,
    healthz,
    iface::ExternalInterface,
    subnet::lease::config_key,
    subnet::{
        EtcdOptions, EtcdRegistry, Lease, ManagerOptions, SubnetManager,
        config::NetworkConfig,
        file::{SubnetEnv, write_subnet_file},
    },
    telemetry::Telemetry,
};

pub(super) fn etcd_options(flags: &Flags) -> EtcdOptions {
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

pub(super) fn manager_options(flags: &Flags) -> Result<ManagerOptions> {
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

pub(super) fn write_env(
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

pub(super) async fn start_healthz(
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
/// only notice on their own schedule). Once `running` holds the config the agent runs, the
/// answer is compared with it: the agent keeps its config, as flanneld does, but nodes
/// started after an edit refuse its lease and it theirs, so a change is logged (once per
/// value) and makes the node not ready until the config is back or the agent restarts.
/// Runs until aborted.
pub(super) async fn probe_etcd(
    manager: SubnetManager<EtcdRegistry>,
    telemetry: Arc<Telemetry>,
    running: Arc<OnceLock<NetworkConfig>>,
) {
    use crate::subnet::Registry as _;
    let key = config_key(manager.prefix());
    let mut reported: Option<String> = None;
    loop {
        let result = match tokio::time::timeout(ETCD_PROBE_TIMEOUT, manager.registry().get(&key))
            .await
        {
            Ok(Ok(fetched)) => {
                if let Some(running) = running.get() {
                    let change = config_change(running, fetched.kv.as_ref().map(|kv| &kv.value));
                    if change.is_some() && change != reported {
                        error!(
                            "the network config in {key} changed since this agent started ({}): it goes on with the config it started with; restart every agent",
                            change.as_deref().unwrap_or_default()
                        );
                    } else if change.is_none() && reported.is_some() {
                        info!("the network config in {key} is back to the one this agent runs");
                    }
                    telemetry.set_config_changed(change.clone());
                    reported = change;
                }
                Ok(())
            }
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

/// How the config text `now` (`None`: the key is gone) differs from `running`; `None` when
/// it does not.
fn config_change(running: &NetworkConfig, now: Option<&Vec<u8>>) -> Option<String> {
    let Some(text) = now else {
        return Some("the key was deleted".to_owned());
    };
    match NetworkConfig::parse(&String::from_utf8_lossy(text)) {
        Ok(now) => Some(running.changes_to(&now)).filter(|c| !c.is_empty()),
        Err(e) => Some(format!("it no longer parses: {e}")),
    }
}

pub(super) fn write_status(telemetry: &Telemetry, path: &Path) {
    if let Err(e) = telemetry.write_status_file(path) {
        tracing::debug!("cannot write the status file {}: {e}", path.display());
    }
}
