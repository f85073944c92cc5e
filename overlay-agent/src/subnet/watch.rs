//! The other nodes of the network, from their leases (flannel-compat.md §2, "Peers").
//!
//! List `<prefix>/subnets/` at a revision, then watch from revision + 1: a put adds or
//! changes a peer, a delete (or an expiry, which etcd reports as a delete) removes it. When
//! the watch falls behind compaction, list again and emit the difference; so too when the
//! store's revision went back while the watch was broken (etcd restored from a backup or
//! emptied: watching from the old revision would wait for history that never comes). Our own
//! subnet is skipped; leases of another backend type are skipped with a warning. A record
//! that cannot be parsed, or that this node refuses to route (`super::validate`), is logged
//! once with its key and value (cut to a few hundred bytes) and otherwise ignored; if it
//! replaces a good record, the last good one stays in force. Only keys directly under the
//! prefix name a subnet, and a subnet is held by one key: a second key naming it (anyone who
//! can write the prefix can add one) is logged and neither replaces nor removes the peer.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep;
use tracing::{debug, info, warn};

use super::lease::{LeaseAttrs, Mac, parse_lease_key, subnets_prefix};
use super::manager::{Lease, SubnetManager, next_event};
use super::registry::{KeyValue, Registry, WatchEvent, cut_for_log};
use super::validate::{Installed, check_peer, check_replacement};
use crate::subnet::config::NetworkConfig;

/// Another node, as its lease describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub backend_type: String,
    /// The peer's VTEP MAC (vxlan only).
    pub vtep_mac: Option<Mac>,
    /// The VNI the peer publishes (vxlan only, when present).
    pub vni: Option<u32>,
}

impl Peer {
    fn from_attrs(subnet: Ipv4Net, attrs: LeaseAttrs) -> Self {
        let vxlan = attrs.vxlan_data().copied();
        Self {
            subnet,
            public_ip: attrs.public_ip,
            vtep_mac: vxlan.map(|data| data.vtep_mac),
            vni: vxlan.and_then(|data| data.vni),
            backend_type: attrs.backend_type,
        }
    }
}

/// A change in the set of peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Added(Peer),
    /// A known peer's record changed (new PublicIP or VtepMAC, typically after a restart).
    Changed(Peer),
    Removed(Ipv4Net),
    /// A full listing was applied: these are all the peers there are now. Sent after each
    /// (re-)listing, so a consumer that had state of its own (e.g. pinned maps from an earlier
    /// agent) can drop what no longer exists.
    Synced(Vec<Ipv4Net>),
}

/// What one lease key means to the watcher.
enum Record {
    Peer(Peer, Installed),
    /// Ours: not a peer.
    Skip,
    /// Of another backend type: not ours to route (a known peer that switched goes).
    Other,
    /// Unparseable or refused (logged): keep whatever we knew.
    Refused,
}

/// Of several keys naming one subnet, the one that holds it: the oldest (lowest creation
/// revision; the key decides a tie, which etcd never makes).
fn oldest<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> Option<&'a KeyValue> {
    kvs.into_iter()
        .min_by_key(|kv| (kv.create_revision, kv.key.as_str()))
}

/// Receivers are gone: stop.
struct Closed;

/// A peer installed from a record, and what the record was.
#[derive(Clone)]
struct Known {
    peer: Peer,
    installed: Installed,
}

/// The keys that name one subnet. flannel writes one key per subnet, but anyone who can write
/// the prefix can add a second (a dual-stack `&…` twin of a live node's key): only the
/// holder's record is routed, and the other keys' puts and deletes leave the peer alone. When
/// the holder's key goes, the oldest other key (lowest creation revision) takes over.
struct SubnetKeys {
    holder: String,
    /// The holder key's creation revision: a key deleted and created again while the watch
    /// was down is a new key, and the next listing does not keep it as holder for its name.
    created: i64,
    others: BTreeMap<String, KeyValue>,
}

struct PeerState<'a> {
    config: &'a NetworkConfig,
    /// `<prefix>/subnets/`: lease keys are directly under it.
    subnets: String,
    own: Ipv4Net,
    /// Our PublicIP: no peer's (it stays the same when our subnet changes).
    own_public_ip: Ipv4Addr,
    known: BTreeMap<Ipv4Net, Known>,
    keys: BTreeMap<Ipv4Net, SubnetKeys>,
    /// The last warning logged about each subnet's record: a bad record renewed every day
    /// (or listed again) is reported once, not at every sight.
    warned: BTreeMap<Ipv4Net, String>,
    events: &'a mpsc::Sender<PeerEvent>,
}

impl PeerState<'_> {
    async fn send(&self, event: PeerEvent) -> Result<(), Closed> {
        debug!(?event, "peer event");
        self.events.send(event).await.map_err(|_| Closed)
    }

    /// Logs `message` about the record `kv` of `subnet`, unless it is what was logged last.
    fn warn_once(&mut self, subnet: Ipv4Net, kv: &KeyValue, message: String) {
        if self.warned.get(&subnet) != Some(&message) {
            warn!(key = %kv.key_for_log(), value = %kv.value_lossy(), "{message}");
            self.warned.insert(subnet, message);
        }
    }

    /// The subnet a listed or watched key names; other keys are logged and `None`.
    fn lease_subnet(&self, kv: &KeyValue) -> Option<Ipv4Net> {
        match parse_lease_key(&self.subnets, &kv.key) {
            Ok(subnet) => Some(subnet),
            Err(e) => {
                warn!(value = %kv.value_lossy(), "ignoring a key that is not a subnet lease: {e}");
                None
            }
        }
    }

    /// Interprets one lease record; logs the ones it does not install.
    fn classify(&mut self, subnet: Ipv4Net, kv: &KeyValue) -> Record {
        if subnet == self.own {
            return Record::Skip;
        }
        let kept = if self.known.contains_key(&subnet) {
            "; keeping the last good record"
        } else {
            ""
        };
        let attrs = match LeaseAttrs::from_json(&kv.value) {
            Ok(attrs) => attrs,
            Err(e) => {
                self.warn_once(
                    subnet,
                    kv,
                    format!("ignoring a malformed subnet lease: {e}{kept}"),
                );
                return Record::Refused;
            }
        };
        // An overwrite of a live lease is refused whatever backend type it claims: skipped as
        // another backend's, it would remove the live node.
        let replacement = self.known.get(&subnet).map_or(Ok(()), |known| {
            check_replacement(&known.installed, kv.create_revision, attrs.public_ip)
        });
        if let Err(refusal) = replacement {
            self.warn_once(
                subnet,
                kv,
                format!("refusing a subnet lease: {refusal}{kept}"),
            );
            return Record::Refused;
        }
        let ours = self.config.backend.type_name();
        if attrs.backend_type != ours {
            self.warn_once(
                subnet,
                kv,
                format!(
                    "skipping the subnet lease of a node with backend type {:?}: this node runs {ours}",
                    attrs.backend_type
                ),
            );
            return Record::Other;
        }
        if let Err(refusal) = check_peer(self.config, subnet, attrs.public_ip, self.own_public_ip) {
            self.warn_once(
                subnet,
                kv,
                format!("refusing a subnet lease: {refusal}{kept}"),
            );
            return Record::Refused;
        }
        self.warned.remove(&subnet);
        let installed = Installed {
            public_ip: attrs.public_ip,
            create_revision: kv.create_revision,
            leased: kv.lease.is_some(),
        };
        Record::Peer(Peer::from_attrs(subnet, attrs), installed)
    }

    /// Logs a key that names a subnet another key holds.
    fn warn_second_key(subnet: Ipv4Net, holder: &str, kv: &KeyValue) {
        warn!(
            key = %kv.key_for_log(),
            value = %kv.value_lossy(),
            holder = %cut_for_log(holder),
            "ignoring a second key for subnet {subnet}: the holder's key was there first, and only its record is routed"
        );
    }

    async fn put(&mut self, kv: &KeyValue) -> Result<(), Closed> {
        let Some(subnet) = self.lease_subnet(kv) else {
            return Ok(());
        };
        match self.keys.get_mut(&subnet) {
            None => {
                self.keys.insert(
                    subnet,
                    SubnetKeys {
                        holder: kv.key.clone(),
                        created: kv.create_revision,
                        others: BTreeMap::new(),
                    },
                );
            }
            Some(keys) if keys.holder == kv.key => {}
            Some(keys) => {
                if keys.others.insert(kv.key.clone(), kv.clone()).is_none() {
                    Self::warn_second_key(subnet, &keys.holder, kv);
                }
                return Ok(());
            }
        }
        self.apply(subnet, kv, None).await
    }

    /// Installs the holder's record `kv` of `subnet` and reports the change. `previous` is the
    /// peer a key that just went had installed (the record is then a successor, not an update
    /// of what is installed).
    async fn apply(
        &mut self,
        subnet: Ipv4Net,
        kv: &KeyValue,
        previous: Option<Known>,
    ) -> Result<(), Closed> {
        match self.classify(subnet, kv) {
            Record::Refused | Record::Skip => {
                if previous.is_some() {
                    self.send(PeerEvent::Removed(subnet)).await?;
                }
                Ok(())
            }
            Record::Other => {
                // A known peer that switched backend is no longer reachable our way.
                if self.known.remove(&subnet).or(previous).is_some() {
                    self.send(PeerEvent::Removed(subnet)).await?;
                }
                Ok(())
            }
            Record::Peer(peer, installed) => {
                let known = Known {
                    peer: peer.clone(),
                    installed,
                };
                match self.known.insert(subnet, known).or(previous) {
                    None => self.send(PeerEvent::Added(peer)).await,
                    Some(old) if old.peer != peer => self.send(PeerEvent::Changed(peer)).await,
                    // A renewal: same record, nothing to tell.
                    Some(_) => Ok(()),
                }
            }
        }
    }

    async fn delete(&mut self, key: &str) -> Result<(), Closed> {
        let Ok(subnet) = parse_lease_key(&self.subnets, key) else {
            return Ok(());
        };
        let Some(keys) = self.keys.get_mut(&subnet) else {
            return Ok(());
        };
        if keys.holder != key {
            keys.others.remove(key);
            return Ok(());
        }
        self.warned.remove(&subnet);
        let successor = oldest(keys.others.values()).cloned();
        let previous = self.known.remove(&subnet);
        let Some(successor) = successor else {
            self.keys.remove(&subnet);
            if previous.is_some() {
                self.send(PeerEvent::Removed(subnet)).await?;
            }
            return Ok(());
        };
        keys.others.remove(&successor.key);
        keys.holder.clone_from(&successor.key);
        keys.created = successor.create_revision;
        info!(
            gone = %cut_for_log(key),
            holder = %successor.key_for_log(),
            "the key holding subnet {subnet} is gone; the oldest other key for it takes over"
        );
        self.apply(subnet, &successor, previous).await
    }

    /// Replaces what we know with a fresh listing and emits the difference.
    async fn reset(&mut self, kvs: &[KeyValue]) -> Result<(), Closed> {
        let mut by_subnet: BTreeMap<Ipv4Net, Vec<&KeyValue>> = BTreeMap::new();
        for kv in kvs {
            if let Some(subnet) = self.lease_subnet(kv) {
                by_subnet.entry(subnet).or_default().push(kv);
            }
        }
        let mut fresh = BTreeMap::new();
        let mut keys = BTreeMap::new();
        for (subnet, mut candidates) in by_subnet {
            // The holder we knew keeps its subnet while its key is listed (the same key, not
            // one created again); otherwise the oldest key takes it, as the watch would have.
            let before = self.keys.get(&subnet);
            let holds = |kv: &KeyValue| {
                before.is_some_and(|b| b.holder == kv.key && b.created == kv.create_revision)
            };
            let holder_at = candidates
                .iter()
                .position(|kv| holds(kv))
                .or_else(|| {
                    let first = oldest(candidates.iter().copied())?;
                    candidates.iter().position(|kv| kv.key == first.key)
                })
                .unwrap_or(0);
            let holder = candidates.swap_remove(holder_at);
            let same_holder = holds(holder);
            let mut others = BTreeMap::new();
            for kv in candidates {
                if !before.is_some_and(|b| b.others.contains_key(&kv.key)) {
                    Self::warn_second_key(subnet, &holder.key, kv);
                }
                others.insert(kv.key.clone(), kv.clone());
            }
            keys.insert(
                subnet,
                SubnetKeys {
                    holder: holder.key.clone(),
                    created: holder.create_revision,
                    others,
                },
            );
            match self.classify(subnet, holder) {
                Record::Peer(peer, installed) => {
                    fresh.insert(subnet, Known { peer, installed });
                }
                Record::Refused if same_holder => {
                    if let Some(old) = self.known.get(&subnet) {
                        fresh.insert(subnet, old.clone());
                    }
                }
                Record::Refused | Record::Skip | Record::Other => {}
            }
        }
        self.keys = keys;
        self.warned
            .retain(|subnet, _| self.keys.contains_key(subnet));
        let gone: Vec<Ipv4Net> = self
            .known
            .keys()
            .filter(|subnet| !fresh.contains_key(subnet))
            .copied()
            .collect();
        let old = std::mem::replace(&mut self.known, fresh);
        for subnet in gone {
            self.send(PeerEvent::Removed(subnet)).await?;
        }
        for (subnet, known) in &self.known {
            match old.get(subnet) {
                None => self.send(PeerEvent::Added(known.peer.clone())).await?,
                Some(before) if before.peer != known.peer => {
                    self.send(PeerEvent::Changed(known.peer.clone())).await?;
                }
                Some(_) => {}
            }
        }
        self.send(PeerEvent::Synced(self.known.keys().copied().collect()))
            .await
    }

    /// Our subnet changed (re-acquired after a revocation): a peer known under the new
    /// subnet can only be stale.
    async fn set_own(&mut self, own: Ipv4Net) -> Result<(), Closed> {
        if own == self.own {
            return Ok(());
        }
        self.own = own;
        if self.known.remove(&own).is_some() {
            self.send(PeerEvent::Removed(own)).await?;
        }
        Ok(())
    }
}

impl<R: Registry> SubnetManager<R> {
    /// Streams the peers of `config`'s network and backend type to `events` until its
    /// receiver is dropped; records this node refuses to route are logged (`super::validate`).
    ///
    /// First every current peer comes as [`PeerEvent::Added`], then the changes. `own`
    /// carries our lease (from [`SubnetManager::run_lease_keeper`]'s channel); its subnet is
    /// never reported. Registry errors are logged and retried every `watch_retry_period`.
    pub async fn run_peer_watcher(
        &self,
        config: NetworkConfig,
        mut own: watch::Receiver<Lease>,
        events: mpsc::Sender<PeerEvent>,
    ) {
        let (own_subnet, own_public_ip) = {
            let lease = own.borrow_and_update();
            (lease.subnet, lease.attrs.public_ip)
        };
        let mut state = PeerState {
            config: &config,
            subnets: subnets_prefix(&self.prefix),
            own: own_subnet,
            own_public_ip,
            known: BTreeMap::new(),
            keys: BTreeMap::new(),
            warned: BTreeMap::new(),
            events: &events,
        };
        let _ = self.watch_peers(&mut state, &mut own).await;
        debug!("peer watcher stopped: nobody listens for peer events");
    }

    async fn watch_peers(
        &self,
        state: &mut PeerState<'_>,
        own: &mut watch::Receiver<Lease>,
    ) -> Result<(), Closed> {
        let prefix = state.subnets.clone();
        let retry = self.options.watch_retry_period;
        let mut own_open = true;

        // Each pass: list, emit the difference, then follow the watch until it breaks.
        loop {
            let listing = tokio::select! {
                () = state.events.closed() => return Err(Closed),
                listing = self.registry.list(&prefix) => listing,
            };
            let listing = match listing {
                Ok(listing) => listing,
                Err(e) => {
                    warn!("cannot list subnet leases (retrying in {retry:?}): {e}");
                    self.pause(state, retry).await?;
                    continue;
                }
            };
            state.reset(&listing.kvs).await?;
            let mut last_revision = listing.revision;

            // Follow the watch; come back here only to re-list after compaction, or when the
            // store went back in time while the watch was broken.
            let mut resumed = false;
            'watch: loop {
                if resumed {
                    match self.store_went_back(&prefix, last_revision).await {
                        Ok(false) => {}
                        Ok(true) => break 'watch,
                        Err(e) => {
                            warn!("cannot read the store's revision (retrying in {retry:?}): {e}");
                            self.pause(state, retry).await?;
                            continue 'watch;
                        }
                    }
                }
                resumed = true;
                let watcher = tokio::select! {
                    () = state.events.closed() => return Err(Closed),
                    watcher = self.registry.watch(&prefix, last_revision + 1) => watcher,
                };
                let mut watcher = match watcher {
                    Ok(w) => Some(w),
                    Err(e) => {
                        warn!("cannot watch subnet leases (retrying in {retry:?}): {e}");
                        self.pause(state, retry).await?;
                        continue 'watch;
                    }
                };
                loop {
                    tokio::select! {
                        () = state.events.closed() => return Err(Closed),
                        changed = own.changed(), if own_open => {
                            if changed.is_ok() {
                                let subnet = own.borrow_and_update().subnet;
                                state.set_own(subnet).await?;
                            } else {
                                // The lease keeper is gone; keep the subnet we know.
                                own_open = false;
                            }
                        }
                        event = next_event(&mut watcher) => match event {
                            Ok(Some(WatchEvent::Put(kv))) => {
                                last_revision = last_revision.max(kv.mod_revision);
                                state.put(&kv).await?;
                            }
                            Ok(Some(WatchEvent::Delete { key, revision })) => {
                                last_revision = last_revision.max(revision);
                                state.delete(&key).await?;
                            }
                            Ok(Some(WatchEvent::Compacted { compact_revision })) => {
                                info!(
                                    compact_revision,
                                    "watch of subnet leases fell behind compaction; listing them again"
                                );
                                crate::telemetry::WATCH_RESYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break 'watch;
                            }
                            Ok(None) => {
                                debug!("watch of subnet leases ended; watching again from revision {}", last_revision + 1);
                                crate::telemetry::WATCH_RESYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                self.pause(state, retry).await?;
                                continue 'watch;
                            }
                            Err(e) => {
                                warn!("watch of subnet leases failed (retrying in {retry:?}): {e}");
                                crate::telemetry::WATCH_RESYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                self.pause(state, retry).await?;
                                continue 'watch;
                            }
                        },
                    }
                }
            }
        }
    }

    /// Whether the store's revision is now below `last_revision`, the last one this watch saw:
    /// etcd was restored from a backup or emptied while the watch was down. A watch from the
    /// old revision would wait for history that never comes (etcd accepts a start revision in
    /// the future), so the caller lists again. Reads `key` (any key) for the revision.
    async fn store_went_back(
        &self,
        key: &str,
        last_revision: i64,
    ) -> Result<bool, super::registry::RegistryError> {
        let now = self.registry.get(key).await?.revision;
        if now < last_revision {
            warn!(
                "etcd's revision went back from {last_revision} to {now} while the watch was \
                 down (restored from a backup, or emptied?): listing the subnet leases again"
            );
        }
        Ok(now < last_revision)
    }

    /// Sleeps, unless the receiver goes away first.
    async fn pause(
        &self,
        state: &PeerState<'_>,
        period: std::time::Duration,
    ) -> Result<(), Closed> {
        tokio::select! {
            () = state.events.closed() => Err(Closed),
            () = sleep(period) => Ok(()),
        }
    }
}
