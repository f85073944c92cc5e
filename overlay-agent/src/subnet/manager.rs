//! Lease management in flannel's order (flannel-compat.md §2), over any [`Registry`].
//!
//! * [`SubnetManager::wait_for_network_config`] reads `<prefix>/config`, retrying every second.
//! * [`SubnetManager::acquire_lease`]: reuse a lease holding our PublicIP, else the subnet from
//!   the subnet file, else a random one of the first 100 free; created with a TTL through a
//!   "version is 0" transaction, retried when another node wins the race.
//! * [`SubnetManager::run_lease_keeper`]: renews before expiry and, when our lease is deleted
//!   by someone else, logs flannel's `Lease has been revoked. Shutting down daemon.` and
//!   acquires a lease again (our choice: the node keeps running), preferring the same subnet;
//!   when it is overwritten with another node's record, writes ours back; when another agent
//!   writes our very record under an etcd lease we never held (it publishes our PublicIP, so
//!   two nodes share the subnet), reports it on the lease (`shared_with`) and writes back once.
//! * [`SubnetManager::run_peer_watcher`] (in `watch.rs`) streams the other nodes' leases.
//!
//! Keys without an etcd lease are reservations made by an administrator: never deleted,
//! never allocated, never given a TTL; a reservation holding our PublicIP is ours to use.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use super::alloc::{self, OutOfSubnets};
use super::lease::{
    LeaseAttrs, RecordError, config_key, parse_lease_key, subnet_key, subnets_prefix,
};
use super::registry::{
    CreateOutcome, Granted, KeyValue, LeaseId, Registry, RegistryError, RenewOutcome, WatchEvent,
    Watcher,
};
use crate::subnet::config::{ConfigError, NetworkConfig};

/// flannel's lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_hours(24);
/// flannel's `--subnet-lease-renew-margin` default: 60 minutes.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_hours(1);
/// How many lost create races are retried before giving up.
pub const RACE_RETRIES: u32 = 10;

/// The message flanneld logs when its lease disappears. Kept word for word.
pub const LEASE_REVOKED_MESSAGE: &str = "Lease has been revoked. Shutting down daemon.";

/// Timing knobs. The defaults are flannel's; tests and the hidden developer option shorten
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerOptions {
    /// TTL of the etcd lease attached to our key (flannel: 24 h).
    pub lease_ttl: Duration,
    /// Renew this long before expiry (flannel: `--subnet-lease-renew-margin`, 60 min).
    pub renew_margin: Duration,
    /// Wait after a failed renewal or re-acquisition (flannel: 1 min).
    pub retry_period: Duration,
    /// Wait between attempts to read the network config (flannel: 1 s).
    pub config_poll_period: Duration,
    /// Wait before re-establishing a broken watch or re-listing after an error.
    pub watch_retry_period: Duration,
    /// Attempts at creating a lease when other nodes keep winning the race.
    pub race_retries: u32,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            lease_ttl: DEFAULT_LEASE_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            retry_period: Duration::from_mins(1),
            config_poll_period: Duration::from_secs(1),
            watch_retry_period: Duration::from_secs(1),
            race_retries: RACE_RETRIES,
        }
    }
}

impl ManagerOptions {
    /// flannel's `--subnet-lease-renew-margin` check: 1 to 1439 minutes.
    pub fn renew_margin_from_minutes(minutes: u64) -> Result<Duration, ManagerError> {
        if (1..24 * 60).contains(&minutes) {
            Ok(Duration::from_mins(minutes))
        } else {
            Err(ManagerError::InvalidOptions {
                reason: format!(
                    "Invalid subnet-lease-renew-margin option, out of acceptable range: {minutes} (allowed: 1 to 1439 minutes)"
                ),
            })
        }
    }

    fn validate(&self) -> Result<(), ManagerError> {
        let invalid = |reason: String| Err(ManagerError::InvalidOptions { reason });
        if self.lease_ttl < Duration::from_secs(1) {
            return invalid(format!(
                "lease TTL {:?} is below one second",
                self.lease_ttl
            ));
        }
        if self.renew_margin.is_zero() || self.renew_margin >= self.lease_ttl {
            return invalid(format!(
                "renew margin {:?} must be above zero and below the lease TTL {:?}",
                self.renew_margin, self.lease_ttl
            ));
        }
        if self.retry_period.is_zero()
            || self.config_poll_period.is_zero()
            || self.watch_retry_period.is_zero()
        {
            return invalid("retry periods must be above zero".to_owned());
        }
        if self.race_retries == 0 {
            return invalid("race retries must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Our lease on a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The etcd key, as stored (it may carry a dual-stack suffix written by an older flanneld).
    pub key: String,
    pub subnet: Ipv4Net,
    /// What the key holds: our PublicIP and backend data.
    pub attrs: LeaseAttrs,
    /// The etcd lease holding the key; `None` for a reservation, which never expires.
    pub lease_id: Option<LeaseId>,
    /// When the etcd lease runs out, on tokio's clock; `None` for a reservation.
    pub expiration: Option<Instant>,
    /// The store revision of our last write or read of the key.
    pub revision: i64,
    /// This acquisition created the key (rather than reusing a lease or reservation of ours):
    /// a start-up that fails before the node is ready deletes it again, so no node routes to
    /// a subnet nobody serves.
    pub created: bool,
    /// Another agent publishing our PublicIP wrote our record to the key, under this etcd
    /// lease that we never held: two nodes share the subnet. Cleared by a renewal that finds
    /// the key still on our own etcd lease (nobody wrote it since).
    pub shared_with: Option<LeaseId>,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.lease_id.is_none()
    }

    /// The same lease, now held by the etcd lease `granted` (a renewal, or our record
    /// written back).
    fn held_by(&self, granted: Granted) -> Self {
        Self {
            lease_id: Some(granted.lease),
            expiration: Some(Instant::now() + granted.ttl),
            revision: granted.revision,
            ..self.clone()
        }
    }
}

/// Why a lease or config operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("flannel config not found in etcd store. Did you create your config using etcdv3 API?")]
    ConfigNotFound { key: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    OutOfSubnets(#[from] OutOfSubnets),
    #[error("max retries reached trying to acquire a subnet")]
    RaceRetriesExhausted { attempts: u32 },
    #[error("lease {key} is gone or held by someone else")]
    LeaseLost { key: String },
    #[error("invalid subnet manager options: {reason}")]
    InvalidOptions { reason: String },
}

/// Lease management for one node. Cheap to clone when the registry is (both registries
/// here are), so each long-running task can own a copy.
#[derive(Debug, Clone)]
pub struct SubnetManager<R> {
    pub(crate) registry: R,
    pub(crate) prefix: String,
    pub(crate) options: ManagerOptions,
}

/// A lease key found in a listing.
struct Listed {
    kv: KeyValue,
    subnet: Ipv4Net,
    attrs: Result<LeaseAttrs, RecordError>,
}

enum Attempt {
    Done(Lease),
    LostRace,
}

enum KeepOutcome {
    Lost,
    Shutdown,
}

impl<R: Registry> SubnetManager<R> {
    /// A manager for the network under `prefix` (flannel's `--etcd-prefix`, default
    /// `/coreos.com/network`).
    pub fn new(
        registry: R,
        prefix: impl Into<String>,
        options: ManagerOptions,
    ) -> Result<Self, ManagerError> {
        options.validate()?;
        Ok(Self {
            registry,
            prefix: prefix.into(),
            options,
        })
    }

    pub fn registry(&self) -> &R {
        &self.registry
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn options(&self) -> &ManagerOptions {
        &self.options
    }

    /// Reads and validates `<prefix>/config` once.
    pub async fn network_config(&self) -> Result<NetworkConfig, ManagerError> {
        let key = config_key(&self.prefix);
        let fetched = self.registry.get(&key).await?;
        let kv = fetched.kv.ok_or(ManagerError::ConfigNotFound { key })?;
        let text = String::from_utf8_lossy(&kv.value);
        Ok(NetworkConfig::parse(&text)?)
    }

    /// Reads the network config, retrying every `config_poll_period` until it is there and
    /// valid, as flanneld does; each failure is logged. Cancel by dropping the future.
    pub async fn wait_for_network_config(&self) -> NetworkConfig {
        loop {
            match self.network_config().await {
                Ok(config) => {
                    info!(
                        "Found network config - Backend type: {}",
                        config.backend.type_name()
                    );
                    return config;
                }
                Err(e) => error!("Couldn't fetch network config: {e}"),
            }
            sleep(self.options.config_poll_period).await;
        }
    }

    /// Acquires a lease for the node publishing `attrs` (its PublicIP identifies it), in
    /// flannel's order. `previous` is the subnet from the subnet file, if any.
    pub async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
    ) -> Result<Lease, ManagerError> {
        for attempt in 1..=self.options.race_retries {
            match self.try_acquire(config, attrs, previous).await? {
                Attempt::Done(lease) => return Ok(lease),
                Attempt::LostRace => {
                    info!(
                        attempt,
                        "another node took the subnet we picked (or our lease changed under us); trying again"
                    );
                }
            }
        }
        Err(ManagerError::RaceRetriesExhausted {
            attempts: self.options.race_retries,
        })
    }

    async fn try_acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
    ) -> Result<Attempt, ManagerError> {
        let subnets = subnets_prefix(&self.prefix);
        let listing = self.registry.list(&subnets).await?;
        let leases: Vec<Listed> = listing
            .kvs
            .into_iter()
            .filter_map(|kv| match parse_lease_key(&subnets, &kv.key) {
                Ok(subnet) => Some(Listed {
                    attrs: LeaseAttrs::from_json(&kv.value),
                    subnet,
                    kv,
                }),
                Err(e) => {
                    warn!(value = %kv.value_lossy(), "ignoring a key that is not a subnet lease: {e}");
                    None
                }
            })
            .collect();
        let public_ip = attrs.public_ip;

        // (1) A lease that already holds our PublicIP, in key order as flannel does.
        let ours = leases
            .iter()
            .filter(|l| l.attrs.as_ref().is_ok_and(|a| a.public_ip == public_ip));
        for listed in ours {
            let key = &listed.kv.key;
            if listed.kv.lease.is_none() {
                if config.fits(listed.subnet) {
                    info!(
                        "Found reservation ({}) for current IP ({public_ip}), reusing",
                        listed.subnet
                    );
                    return self.use_reservation(listed, attrs).await.map(Attempt::Done);
                }
                warn!(
                    key = %key,
                    "Found reservation ({}) for current IP ({public_ip}) that does not fit the network config; leaving it alone",
                    listed.subnet
                );
                continue;
            }
            if config.fits(listed.subnet) {
                info!(
                    "Found lease ({}) for current IP ({public_ip}), reusing",
                    listed.subnet
                );
                let value = attrs.to_json();
                let renewed = self
                    .registry
                    .renew(key, &value, self.options.lease_ttl, listed.kv.lease)
                    .await?;
                return Ok(match renewed {
                    RenewOutcome::Renewed(granted) => Attempt::Done(Lease {
                        key: key.clone(),
                        subnet: listed.subnet,
                        attrs: attrs.clone(),
                        lease_id: Some(granted.lease),
                        expiration: Some(Instant::now() + granted.ttl),
                        revision: granted.revision,
                        created: false,
                        shared_with: None,
                    }),
                    // It expired or changed hands between the listing and now: start over.
                    RenewOutcome::Lost => Attempt::LostRace,
                });
            }
            info!(
                "Found lease ({}) for current IP ({public_ip}) but not compatible with current config, deleting",
                listed.subnet
            );
            self.registry.delete(key).await?;
        }

        let taken: Vec<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
        let overlaps_taken = |subnet: Ipv4Net| {
            taken
                .iter()
                .any(|t| t.contains(&subnet.network()) || subnet.contains(&t.network()))
        };

        // (2) The subnet of the subnet file, when it is free and still fits.
        let mut chosen = None;
        if let Some(previous) = previous {
            if overlaps_taken(previous) {
                info!(
                    "Found previously leased subnet ({previous}) that is already taken, ignoring"
                );
            } else if !config.fits(previous) {
                error!(
                    "Found previously leased subnet ({previous}) that is not compatible with the Etcd network config, ignoring"
                );
            } else {
                info!("Found previously leased subnet ({previous}), reusing");
                chosen = Some(previous);
            }
        }

        // (3) One of the first 100 free subnets, at random.
        let subnet = match chosen {
            Some(subnet) => subnet,
            None => {
                info!(
                    "Picking subnet in range {} ... {}",
                    config.subnet_min, config.subnet_max
                );
                alloc::allocate(config, &taken, &mut rand::rng())?
            }
        };

        let key = subnet_key(&self.prefix, subnet);
        let value = attrs.to_json();
        match self
            .registry
            .create(&key, &value, self.options.lease_ttl)
            .await?
        {
            CreateOutcome::Created(granted) => {
                info!("Allocated lease ({subnet}) to current node ({public_ip})");
                Ok(Attempt::Done(Lease {
                    key,
                    subnet,
                    attrs: attrs.clone(),
                    lease_id: Some(granted.lease),
                    expiration: Some(Instant::now() + granted.ttl),
                    revision: granted.revision,
                    created: true,
                    shared_with: None,
                }))
            }
            CreateOutcome::AlreadyExists => Ok(Attempt::LostRace),
        }
    }

    /// Takes a reservation holding our PublicIP. Its value is brought up to date (peers need
    /// our VtepMAC) but it stays without an etcd lease, so it keeps never expiring.
    async fn use_reservation(
        &self,
        listed: &Listed,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, ManagerError> {
        let revision = if listed.attrs.as_ref().ok() == Some(attrs) {
            listed.kv.mod_revision
        } else {
            self.registry.put(&listed.kv.key, &attrs.to_json()).await?
        };
        Ok(Lease {
            key: listed.kv.key.clone(),
            subnet: listed.subnet,
            attrs: attrs.clone(),
            lease_id: None,
            expiration: None,
            revision,
            created: false,
            shared_with: None,
        })
    }

    /// Gives up `lease` (a start-up that failed before the node was ready): deletes the key
    /// when it still holds our record, so peers stop routing our subnet to us.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), ManagerError> {
        let fetched = self.registry.get(&lease.key).await?;
        if fetched
            .kv
            .is_some_and(|kv| holds_our_ip(&kv, lease.attrs.public_ip))
        {
            self.registry.delete(&lease.key).await?;
        }
        Ok(())
    }

    /// Renews `lease` once: a new etcd lease of the configured TTL, and our record written
    /// with it, provided the key is still held by the etcd lease we know. A reservation needs
    /// no renewal and comes back unchanged. `LeaseLost` means the key is no longer ours.
    pub async fn renew_lease(&self, lease: &Lease) -> Result<Lease, ManagerError> {
        let Some(current) = lease.lease_id else {
            return Ok(lease.clone());
        };
        let outcome = self
            .registry
            .renew(
                &lease.key,
                &lease.attrs.to_json(),
                self.options.lease_ttl,
                Some(current),
            )
            .await?;
        match outcome {
            // The key was still on our etcd lease: nobody else wrote it since our last write.
            RenewOutcome::Renewed(granted) => Ok(Lease {
                shared_with: None,
                ..lease.held_by(granted)
            }),
            RenewOutcome::Lost => Err(ManagerError::LeaseLost {
                key: lease.key.clone(),
            }),
        }
    }

    /// Keeps the lease in `updates` alive until every receiver of `updates` is dropped.
    ///
    /// Renews at expiry minus the renew margin (retrying every `retry_period` on errors) and
    /// watches our key. When the key is deleted (or gone after etcd was restored), logs
    /// [`LEASE_REVOKED_MESSAGE`] and acquires a lease again with `config`, asking for the same
    /// subnet first. When someone overwrites it with another node's record, writes ours back
    /// (we hold the subnet's etcd lease; moving would leave our pods with addresses of a
    /// subnet that is no longer ours). Every new, renewed or restored lease is published
    /// through `updates`; the subnet in it changes only after a revocation.
    pub async fn run_lease_keeper(&self, config: NetworkConfig, updates: watch::Sender<Lease>) {
        let mut lease = updates.borrow().clone();
        loop {
            match self.keep(&mut lease, &updates).await {
                KeepOutcome::Shutdown => return,
                KeepOutcome::Lost => warn!("{LEASE_REVOKED_MESSAGE}"),
            }
            // Our choice (flannel-compat.md §2): acquire again instead of exiting.
            lease = loop {
                let attempt = tokio::select! {
                    () = updates.closed() => return,
                    attempt = self.acquire_lease(&config, &lease.attrs, Some(lease.subnet)) => attempt,
                };
                match attempt {
                    Ok(new) => {
                        info!(
                            "Acquired lease {} again after revocation (previously {})",
                            new.subnet, lease.subnet
                        );
                        break new;
                    }
                    Err(e) => {
                        error!(
                            "Failed to acquire a lease after revocation (trying again in {:?}): {e}",
                            self.options.retry_period
                        );
                        tokio::select! {
                            () = updates.closed() => return,
                            () = sleep(self.options.retry_period) => {}
                        }
                    }
                }
            };
            updates.send_replace(lease.clone());
        }
    }

    fn renew_deadline(&self, lease: &Lease) -> Option<Instant> {
        let expiration = lease.expiration?;
        Some(
            expiration
                .checked_sub(self.options.renew_margin)
                .unwrap_or_else(Instant::now),
        )
    }

    /// Renews and watches `lease` until it is lost or nobody listens any more.
    ///
    /// Our key overwritten with a record of another node is not a loss: we hold the subnet's
    /// etcd lease, so our record is written back (`restore`), and the node keeps its subnet
    /// (its pods keep their addresses). After the watch breaks or falls behind compaction, the
    /// key is read again before watching from the store's revision of that read: the store may
    /// have been restored from a backup or emptied (revisions start over), and a key that is
    /// gone then is a lost lease.
    async fn keep(&self, lease: &mut Lease, updates: &watch::Sender<Lease>) -> KeepOutcome {
        let mut renew_at = self.renew_deadline(lease);
        if let Some(at) = renew_at {
            debug!(subnet = %lease.subnet, "renewing the lease in {:?}", at.saturating_duration_since(Instant::now()));
        }
        let mut last_revision = lease.revision;
        let mut watcher: Option<R::Watcher> = None;
        let mut rewatch_at = Instant::now();
        // Read our key again before the next watch.
        let mut reread = false;
        // A renewal found the key no longer held by our etcd lease: the read decides.
        let mut renewal_lost = false;
        // When to write our record back over a foreign one.
        let mut restore_at: Option<Instant> = None;
        // A write of ours failed without saying whether it took effect (its answer lost):
        // until one succeeds, our record under an etcd lease we do not know may be ours.
        let mut unconfirmed_write = false;
        // Stands in for "never" in disabled select branches.
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);

        loop {
            if watcher.is_none() && Instant::now() >= rewatch_at {
                if reread {
                    match self.registry.get(&lease.key).await {
                        Ok(fetched) => {
                            match fetched.kv {
                                None => {
                                    warn!(
                                        "our lease {} is no longer in etcd (deleted, expired, or etcd restored from a backup or emptied)",
                                        lease.key
                                    );
                                    return KeepOutcome::Lost;
                                }
                                Some(kv) if !holds_our_record(&kv, &lease.attrs) => {
                                    warn_overwritten(&kv);
                                    restore_at = Some(Instant::now());
                                }
                                // Our record, but not under the etcd lease we hold: write
                                // it again under one we hold.
                                Some(_) if renewal_lost => restore_at = Some(Instant::now()),
                                Some(_) => {}
                            }
                            // The store's revision now, which may be below what we saw.
                            last_revision = fetched.revision;
                            reread = false;
                            renewal_lost = false;
                        }
                        Err(e) => {
                            warn!("cannot re-read our lease {} (retrying): {e}", lease.key);
                            rewatch_at = Instant::now() + self.options.watch_retry_period;
                        }
                    }
                }
                if !reread {
                    match self.registry.watch(&lease.key, last_revision + 1).await {
                        Ok(w) => watcher = Some(w),
                        Err(e) => {
                            warn!("cannot watch our lease {} (retrying): {e}", lease.key);
                            rewatch_at = Instant::now() + self.options.watch_retry_period;
                        }
                    }
                }
            }

            tokio::select! {
                () = updates.closed() => return KeepOutcome::Shutdown,

                () = sleep_until(renew_at.unwrap_or(far)), if renew_at.is_some() => {
                    let renewal = self.renew_lease(lease).await;
                    note_write(&renewal, &mut unconfirmed_write);
                    match renewal {
                        Ok(renewed) => {
                            *lease = renewed;
                            renew_at = self.renew_deadline(lease);
                            info!(
                                "Lease renewed, new expiration in {:?}",
                                lease.expiration.map(|e| e.saturating_duration_since(Instant::now())).unwrap_or_default()
                            );
                            updates.send_replace(lease.clone());
                        }
                        // Our record is being restored: that renews too. Otherwise the key
                        // is gone, or overwritten before the watch told us: read it again
                        // to know which (a foreign record is written back, not a loss).
                        Err(ManagerError::LeaseLost { .. }) => {
                            renew_at = None;
                            if restore_at.is_none() {
                                renewal_lost = true;
                                reread = true;
                                watcher = None;
                                rewatch_at = Instant::now();
                            }
                        }
                        Err(e) => {
                            error!(
                                "Error renewing lease (trying again in {:?}): {e}",
                                self.options.retry_period
                            );
                            renew_at = Some(Instant::now() + self.options.retry_period);
                        }
                    }
                }

                () = sleep_until(restore_at.unwrap_or(far)), if restore_at.is_some() => {
                    let restored = self.restore(lease).await;
                    note_write(&restored, &mut unconfirmed_write);
                    match restored {
                        Ok(restored) => {
                            *lease = restored;
                            last_revision = last_revision.max(lease.revision);
                            renew_at = self.renew_deadline(lease);
                            restore_at = None;
                            info!("our lease {} holds our record again", lease.key);
                            updates.send_replace(lease.clone());
                        }
                        Err(e) => {
                            error!(
                                "cannot write our lease {} back (trying again in {:?}): {e}",
                                lease.key, self.options.retry_period
                            );
                            restore_at = Some(Instant::now() + self.options.retry_period);
                        }
                    }
                }

                () = sleep_until(rewatch_at), if watcher.is_none() => {}

                event = next_event(&mut watcher) => {
                    match event {
                        Ok(Some(WatchEvent::Delete { key, revision })) => {
                            last_revision = last_revision.max(revision);
                            if key == lease.key {
                                debug!(key, revision, "our lease was deleted");
                                return KeepOutcome::Lost;
                            }
                        }
                        Ok(Some(WatchEvent::Put(kv))) => {
                            last_revision = last_revision.max(kv.mod_revision);
                            if kv.key == lease.key && !holds_our_record(&kv, &lease.attrs) {
                                warn_overwritten(&kv);
                                restore_at = Some(Instant::now());
                            } else if kv.key == lease.key
                                && let Some(other) =
                                    written_by_another_agent(&kv, lease, unconfirmed_write)
                            {
                                error_shared_public_ip(lease, other);
                                // Written back once, so that the other agent sees a write
                                // it did not make and reports too; not again while the
                                // report stands, or the two would write in turns forever.
                                if lease.shared_with.is_none() {
                                    restore_at = Some(Instant::now());
                                }
                                lease.shared_with = Some(other);
                                updates.send_replace(lease.clone());
                            }
                        }
                        Ok(Some(WatchEvent::Compacted { compact_revision })) => {
                            debug!(compact_revision, "watch on our lease compacted; re-reading it");
                            watcher = None;
                            reread = true;
                        }
                        Ok(None) => {
                            debug!("watch on our lease ended; re-reading it, then watching again");
                            watcher = None;
                            reread = true;
                            rewatch_at = Instant::now() + self.options.watch_retry_period;
                        }
                        Err(e) => {
                            warn!("watch on our lease failed (retrying): {e}");
                            watcher = None;
                            reread = true;
                            rewatch_at = Instant::now() + self.options.watch_retry_period;
                        }
                    }
                }
            }
        }
    }

    /// Writes our record back over a foreign one: with a new etcd lease of the configured TTL
    /// (the foreign write may have detached the key from ours), or without one for a
    /// reservation.
    async fn restore(&self, lease: &Lease) -> Result<Lease, ManagerError> {
        let value = lease.attrs.to_json();
        if lease.is_reservation() {
            let revision = self.registry.put(&lease.key, &value).await?;
            return Ok(Lease {
                revision,
                ..lease.clone()
            });
        }
        match self
            .registry
            .renew(&lease.key, &value, self.options.lease_ttl, None)
            .await?
        {
            RenewOutcome::Renewed(granted) => Ok(lease.held_by(granted)),
            RenewOutcome::Lost => Err(ManagerError::LeaseLost {
                key: lease.key.clone(),
            }),
        }
    }
}

/// Logs a foreign record found on our key (cut for the log).
fn warn_overwritten(kv: &KeyValue) {
    warn!(
        key = %kv.key_for_log(),
        value = %kv.value_lossy(),
        "our lease was overwritten with a record that is not ours (another PublicIP, backend type, VNI or VtepMAC); writing ours back (this node holds the subnet)"
    );
}

/// The etcd lease of another agent that wrote our very record (our PublicIP, so our
/// VtepMAC too) to our key after our last write: one we never held, while no write of ours
/// is in doubt. A key without an etcd lease is an administrator's reservation, and a
/// reservation of ours is written without one, so neither counts.
fn written_by_another_agent(
    kv: &KeyValue,
    lease: &Lease,
    unconfirmed_write: bool,
) -> Option<LeaseId> {
    let (Some(ours), Some(theirs)) = (lease.lease_id, kv.lease) else {
        return None;
    };
    (theirs != ours && kv.mod_revision > lease.revision && !unconfirmed_write).then_some(theirs)
}

/// Whether a write of ours is in doubt after `outcome`: a registry error may have lost the
/// answer to a write that took effect; a success settles every earlier doubt (an earlier
/// write's event comes with a lower revision than the success's, which
/// [`written_by_another_agent`] ignores); a refused write changes nothing.
fn note_write(outcome: &Result<Lease, ManagerError>, unconfirmed_write: &mut bool) {
    match outcome {
        Ok(_) => *unconfirmed_write = false,
        Err(ManagerError::Registry(_)) => *unconfirmed_write = true,
        Err(_) => {}
    }
}

/// Logs that another agent publishes our PublicIP (one error per write it makes).
fn error_shared_public_ip(lease: &Lease, other: LeaseId) {
    error!(
        key = %lease.key,
        "another agent publishes this node's PublicIP {}: it wrote our record to our lease of \
         {} under etcd lease {other:x}, which this agent never held. Two nodes with one PublicIP \
         share the subnet and their pods get the same addresses; give each node its own \
         PublicIP (--public-ip, FLANNELD_PUBLIC_IP or --iface), then restart the agents",
        lease.attrs.public_ip, lease.subnet
    );
}

/// Whether `kv` holds our record `ours` in everything peers route by: PublicIP, backend type,
/// VNI and VtepMAC. Peers accept a new VtepMAC on a live key (a flanneld that rebooted reuses
/// its lease with a new one), so a record that changes only that would otherwise send our
/// traffic to a MAC we refuse, and nobody would put it right.
fn holds_our_record(kv: &KeyValue, ours: &LeaseAttrs) -> bool {
    LeaseAttrs::from_json(&kv.value).is_ok_and(|attrs| {
        attrs.public_ip == ours.public_ip
            && attrs.backend_type == ours.backend_type
            && attrs.vxlan_data() == ours.vxlan_data()
    })
}

/// Whether `kv` holds a record with our PublicIP (our own renewal, seen through the watch).
fn holds_our_ip(kv: &KeyValue, public_ip: Ipv4Addr) -> bool {
    LeaseAttrs::from_json(&kv.value).is_ok_and(|attrs| attrs.public_ip == public_ip)
}

/// The next event of `watcher`, or never when there is none.
pub(crate) async fn next_event<W: Watcher>(
    watcher: &mut Option<W>,
) -> Result<Option<WatchEvent>, RegistryError> {
    match watcher {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
