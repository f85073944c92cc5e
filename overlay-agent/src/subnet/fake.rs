//! An in-memory [`Registry`] with etcd's semantics, for tests of the lease logic.
//!
//! It keeps revisions (one per write, starting at 1 as etcd does), key versions, leases with
//! expiry on tokio's clock (so `tokio::time::pause`/`advance` drive it), a history that
//! watches replay from, and compaction. Expiry is applied lazily at the start of every
//! operation and on [`FakeRegistry::expire_leases`]; nothing runs in the background.
//!
//! Test hooks: injected failures per operation, renewals whose answer is lost, a competing create that wins the next race,
//! compaction that cancels running watches, broken watch streams, a store restored from
//! nothing (revisions start over), and call counters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::registry::{
    CreateOutcome, Fetched, Granted, KeyValue, LeaseId, Listing, Registry, RegistryError,
    RenewOutcome, WatchEvent, Watcher,
};

/// The operations of [`Registry`], for failure injection and call counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    Get,
    List,
    Create,
    Renew,
    Put,
    Delete,
    Watch,
}

impl FakeOp {
    const fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Create => "create",
            Self::Renew => "renew",
            Self::Put => "put",
            Self::Delete => "delete",
            Self::Watch => "watch",
        }
    }
}

/// A cheaply clonable handle; clones share one store.
#[derive(Clone, Default)]
pub struct FakeRegistry {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    lease: Option<LeaseId>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

struct LeaseState {
    expires: Instant,
}

struct WatchSlot {
    prefix: String,
    /// Events below this revision are not for this watch (etcd's start revision).
    from_revision: i64,
    tx: mpsc::UnboundedSender<WatchEvent>,
}

struct State {
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    /// Every change since the last compaction, in revision order.
    history: Vec<WatchEvent>,
    watchers: Vec<WatchSlot>,
    failures: HashMap<FakeOp, u32>,
    /// Renewals still to take effect and then fail, as when etcd's answer is lost.
    lost_renewal_answers: u32,
    /// Values another node writes to the key just before our next creates.
    steals: VecDeque<String>,
    calls: HashMap<FakeOp, u32>,
    /// The smallest TTL the "server" grants, like etcd's minimum lease TTL.
    min_ttl: Duration,
}

impl Default for State {
    fn default() -> Self {
        Self {
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 0x7000,
            history: Vec::new(),
            watchers: Vec::new(),
            failures: HashMap::new(),
            lost_renewal_answers: 0,
            steals: VecDeque::new(),
            calls: HashMap::new(),
            min_ttl: Duration::from_secs(1),
        }
    }
}

impl State {
    fn kv(key: &str, entry: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: entry.value.clone(),
            lease: entry.lease,
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
            version: entry.version,
        }
    }

    fn emit(&mut self, event: WatchEvent) {
        let key = event.key().unwrap_or_default().to_owned();
        let revision = event.revision().unwrap_or_default();
        self.watchers.retain(|slot| {
            !key.starts_with(&slot.prefix)
                || revision < slot.from_revision
                || slot.tx.send(event.clone()).is_ok()
        });
        self.history.push(event);
    }

    fn write(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>) -> i64 {
        self.revision += 1;
        let revision = self.revision;
        let entry = match self.kvs.get(key) {
            Some(old) => Entry {
                value: value.to_vec(),
                lease,
                create_revision: old.create_revision,
                mod_revision: revision,
                version: old.version + 1,
            },
            None => Entry {
                value: value.to_vec(),
                lease,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            },
        };
        let kv = Self::kv(key, &entry);
        self.kvs.insert(key.to_owned(), entry);
        self.emit(WatchEvent::Put(kv));
        revision
    }

    fn remove(&mut self, key: &str) -> bool {
        if self.kvs.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        let revision = self.revision;
        self.emit(WatchEvent::Delete {
            key: key.to_owned(),
            revision,
        });
        true
    }

    fn grant(&mut self, ttl: Duration) -> (LeaseId, Duration) {
        // etcd grants whole seconds, at least its minimum.
        let ttl = Duration::from_secs(ttl.as_secs()).max(self.min_ttl);
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            LeaseState {
                expires: Instant::now() + ttl,
            },
        );
        (id, ttl)
    }

    /// Deletes the keys of every lease past its expiry, as etcd's lessor does.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable();
        for id in expired {
            self.leases.remove(&id);
            let keys: Vec<String> = self
                .kvs
                .iter()
                .filter(|(_, entry)| entry.lease == Some(id))
                .map(|(key, _)| key.clone())
                .collect();
            for key in keys {
                self.remove(&key);
            }
        }
    }

    /// Counts the call, applies expiry, and fails it if a failure is pending.
    fn begin(&mut self, op: FakeOp, key: &str) -> Result<(), RegistryError> {
        *self.calls.entry(op).or_default() += 1;
        self.expire();
        match self.failures.get_mut(&op) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(RegistryError::Injected {
                    op: op.name(),
                    key: key.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl FakeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the store from the others.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `key` without a lease (a config, or a reservation); returns the revision.
    pub fn set(&self, key: &str, value: &str) -> i64 {
        self.state().write(key, value.as_bytes(), None)
    }

    /// Writes `key` with a new lease of `ttl`, as another node would; returns the lease.
    pub fn set_with_ttl(&self, key: &str, value: &str, ttl: Duration) -> LeaseId {
        let mut state = self.state();
        let (lease, _) = state.grant(ttl);
        state.write(key, value.as_bytes(), Some(lease));
        lease
    }

    /// Deletes `key`, as an administrator would; returns whether it existed.
    pub fn remove(&self, key: &str) -> bool {
        self.state().remove(key)
    }

    /// The current value of `key`, as text.
    pub fn value(&self, key: &str) -> Option<String> {
        let mut state = self.state();
        state.expire();
        state
            .kvs
            .get(key)
            .map(|entry| String::from_utf8_lossy(&entry.value).into_owned())
    }

    /// The current state of `key`.
    pub fn entry(&self, key: &str) -> Option<KeyValue> {
        let mut state = self.state();
        state.expire();
        state.kvs.get(key).map(|entry| State::kv(key, entry))
    }

    /// Every key under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut state = self.state();
        state.expire();
        state
            .kvs
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// When the lease holding `key` expires, if it has one.
    pub fn expiry(&self, key: &str) -> Option<Instant> {
        let state = self.state();
        let lease = state.kvs.get(key)?.lease?;
        state.leases.get(&lease).map(|lease| lease.expires)
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.state().revision
    }

    /// Applies lease expiry now (after `tokio::time::advance`, say).
    pub fn expire_leases(&self) {
        self.state().expire();
    }

    /// Makes the next `count` calls of `op` fail.
    pub fn fail_next(&self, op: FakeOp, count: u32) {
        self.state().failures.insert(op, count);
    }

    /// Makes the next `count` renewals take effect and then fail, as a renewal whose answer
    /// is lost does (the caller cannot tell it was written).
    pub fn lose_next_renewal_answers(&self, count: u32) {
        self.state().lost_renewal_answers = count;
    }

    /// Before our next create, another node writes `value` (with a lease) to the key we are
    /// about to create, so we lose the race. Queue several to lose several races.
    pub fn steal_next_create(&self, value: &str) {
        self.state().steals.push_back(value.to_owned());
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: FakeOp) -> u32 {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// How many watches are running.
    pub fn watcher_count(&self) -> usize {
        let mut state = self.state();
        state.watchers.retain(|slot| !slot.tx.is_closed());
        state.watchers.len()
    }

    /// Sets the smallest TTL granted (default 1 s).
    pub fn set_min_ttl(&self, ttl: Duration) {
        self.state().min_ttl = ttl;
    }

    /// Compacts the history at the current revision (changes below it are forgotten) and
    /// cancels every running watch with [`WatchEvent::Compacted`], as etcd does to a watcher
    /// that fell behind.
    pub fn compact(&self) {
        let mut state = self.state();
        let compact_revision = state.revision;
        state.compact_revision = compact_revision;
        state
            .history
            .retain(|event| event.revision().is_some_and(|rev| rev >= compact_revision));
        for slot in state.watchers.drain(..) {
            let _ = slot.tx.send(WatchEvent::Compacted { compact_revision });
        }
    }

    /// Ends every running watch stream without compaction, like a lost connection.
    pub fn break_watches(&self) {
        self.state().watchers.clear();
    }

    /// Replaces the store with an empty one whose revision starts again at 1, as an etcd
    /// restored from nothing (a fresh data directory): every key, lease and bit of history is
    /// gone, and the running watches break (the server restarted). A watch from a revision
    /// above the new one then waits, as etcd's does, for history that does not come.
    pub fn restore_empty(&self) {
        let mut state = self.state();
        state.kvs.clear();
        state.leases.clear();
        state.history.clear();
        state.watchers.clear();
        state.revision = 1;
        state.compact_revision = 0;
    }
}

/// A watch on a [`FakeRegistry`].
pub struct FakeWatcher {
    rx: mpsc::UnboundedReceiver<WatchEvent>,
}

impl Watcher for FakeWatcher {
    async fn next(&mut self) -> Result<Option<WatchEvent>, RegistryError> {
        Ok(self.rx.recv().await)
    }
}

impl Registry for FakeRegistry {
    type Watcher = FakeWatcher;

    async fn get(&self, key: &str) -> Result<Fetched, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Get, key)?;
        Ok(Fetched {
            revision: state.revision,
            kv: state.kvs.get(key).map(|entry| State::kv(key, entry)),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Listing, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::List, prefix)?;
        Ok(Listing {
            revision: state.revision,
            kvs: state
                .kvs
                .iter()
                .filter(|(key, _)| key.starts_with(prefix))
                .map(|(key, entry)| State::kv(key, entry))
                .collect(),
        })
    }

    async fn create(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<CreateOutcome, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Create, key)?;
        if let Some(winner) = state.steals.pop_front() {
            let (lease, _) = state.grant(ttl);
            state.write(key, winner.as_bytes(), Some(lease));
        }
        if state.kvs.contains_key(key) {
            return Ok(CreateOutcome::AlreadyExists);
        }
        let (lease, ttl) = state.grant(ttl);
        let revision = state.write(key, value.as_bytes(), Some(lease));
        Ok(CreateOutcome::Created(Granted {
            lease,
            ttl,
            revision,
        }))
    }

    async fn renew(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        expected: Option<LeaseId>,
    ) -> Result<RenewOutcome, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Renew, key)?;
        if let Some(expected) = expected
            && state.kvs.get(key).and_then(|entry| entry.lease) != Some(expected)
        {
            return Ok(RenewOutcome::Lost);
        }
        // The old lease stays until it expires, holding no key, as in etcd.
        let (lease, ttl) = state.grant(ttl);
        let revision = state.write(key, value.as_bytes(), Some(lease));
        if state.lost_renewal_answers > 0 {
            state.lost_renewal_answers -= 1;
            return Err(RegistryError::Injected {
                op: FakeOp::Renew.name(),
                key: key.to_owned(),
            });
        }
        Ok(RenewOutcome::Renewed(Granted {
            lease,
            ttl,
            revision,
        }))
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Put, key)?;
        Ok(state.write(key, value.as_bytes(), None))
    }

    async fn delete(&self, key: &str) -> Result<bool, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Delete, key)?;
        Ok(state.remove(key))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<FakeWatcher, RegistryError> {
        let mut state = self.state();
        state.begin(FakeOp::Watch, prefix)?;
        let (tx, rx) = mpsc::unbounded_channel();
        if from_revision > 0 && from_revision < state.compact_revision {
            // The receiver is alive, so this cannot fail; the sender is dropped: stream ends.
            let _ = tx.send(WatchEvent::Compacted {
                compact_revision: state.compact_revision,
            });
            return Ok(FakeWatcher { rx });
        }
        for event in &state.history {
            let wanted = event.revision().is_some_and(|rev| rev >= from_revision)
                && event.key().is_some_and(|key| key.starts_with(prefix));
            if wanted {
                let _ = tx.send(event.clone());
            }
        }
        state.watchers.push(WatchSlot {
            prefix: prefix.to_owned(),
            from_revision,
            tx,
        });
        Ok(FakeWatcher { rx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "/p/subnets/10.0.1.0-24";

    async fn next(watcher: &mut FakeWatcher) -> Option<WatchEvent> {
        tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .expect("watch event")
            .unwrap()
    }

    #[tokio::test]
    async fn create_only_when_version_is_zero() {
        let fake = FakeRegistry::new();
        let ttl = Duration::from_secs(60);
        let CreateOutcome::Created(granted) = fake.create(KEY, "a", ttl).await.unwrap() else {
            panic!("not created");
        };
        assert_eq!(granted.ttl, ttl);
        assert_eq!(
            fake.create(KEY, "b", ttl).await.unwrap(),
            CreateOutcome::AlreadyExists
        );
        assert_eq!(fake.value(KEY).as_deref(), Some("a"));
        let kv = fake.entry(KEY).unwrap();
        assert_eq!(kv.lease, Some(granted.lease));
        assert_eq!(kv.version, 1);
        assert_eq!(kv.mod_revision, granted.revision);
    }

    #[tokio::test]
    async fn revisions_and_versions_advance() {
        let fake = FakeRegistry::new();
        assert_eq!(fake.revision(), 1);
        let r1 = fake.set(KEY, "a");
        let r2 = fake.put(KEY, "b").await.unwrap();
        assert_eq!((r1, r2), (2, 3));
        let kv = fake.entry(KEY).unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        assert!(fake.delete(KEY).await.unwrap());
        assert!(!fake.delete(KEY).await.unwrap());
        assert_eq!(fake.revision(), 4);
        let listing = fake.list("/p/").await.unwrap();
        assert_eq!(
            listing,
            Listing {
                revision: 4,
                kvs: vec![]
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_into_deletes() {
        let fake = FakeRegistry::new();
        let mut watcher = fake.watch("/p/", 0).await.unwrap();
        fake.set_with_ttl(KEY, "a", Duration::from_secs(10));
        assert!(matches!(next(&mut watcher).await, Some(WatchEvent::Put(_))));
        tokio::time::advance(Duration::from_secs(9)).await;
        fake.expire_leases();
        assert!(fake.value(KEY).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        fake.expire_leases();
        assert!(fake.value(KEY).is_none());
        assert!(matches!(
            next(&mut watcher).await,
            Some(WatchEvent::Delete { key, .. }) if key == KEY
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn renew_moves_the_key_to_a_new_lease() {
        let fake = FakeRegistry::new();
        let ttl = Duration::from_secs(10);
        let CreateOutcome::Created(first) = fake.create(KEY, "a", ttl).await.unwrap() else {
            panic!("not created");
        };
        tokio::time::advance(Duration::from_secs(8)).await;
        let RenewOutcome::Renewed(second) =
            fake.renew(KEY, "b", ttl, Some(first.lease)).await.unwrap()
        else {
            panic!("not renewed");
        };
        assert_ne!(first.lease, second.lease);
        // The first lease expiring takes nothing with it.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(fake.value(KEY).as_deref(), Some("b"));
        // A renewal expecting the old lease is refused.
        assert_eq!(
            fake.renew(KEY, "c", ttl, Some(first.lease)).await.unwrap(),
            RenewOutcome::Lost
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(fake.value(KEY), None);
        assert_eq!(
            fake.renew(KEY, "c", ttl, Some(second.lease)).await.unwrap(),
            RenewOutcome::Lost
        );
        // Without an expectation it writes unconditionally, as flannel's updateSubnet.
        assert!(matches!(
            fake.renew(KEY, "d", ttl, None).await.unwrap(),
            RenewOutcome::Renewed(_)
        ));
    }

    #[tokio::test]
    async fn watch_replays_history_from_a_revision() {
        let fake = FakeRegistry::new();
        fake.set("/p/subnets/a", "1");
        let r = fake.set("/p/subnets/b", "2");
        fake.set("/other/x", "3");
        fake.remove("/p/subnets/a");
        let mut watcher = fake.watch("/p/subnets/", r).await.unwrap();
        assert!(
            matches!(next(&mut watcher).await, Some(WatchEvent::Put(kv)) if kv.key == "/p/subnets/b")
        );
        assert!(matches!(
            next(&mut watcher).await,
            Some(WatchEvent::Delete { key, revision: 5 }) if key == "/p/subnets/a"
        ));
        fake.set("/p/subnets/c", "4");
        assert!(
            matches!(next(&mut watcher).await, Some(WatchEvent::Put(kv)) if kv.key == "/p/subnets/c")
        );
    }

    #[tokio::test]
    async fn compaction_cancels_watches_and_old_revisions() {
        let fake = FakeRegistry::new();
        let mut watcher = fake.watch("/p/", 0).await.unwrap();
        fake.set("/p/a", "1");
        fake.set("/p/a", "2");
        fake.compact();
        assert!(matches!(next(&mut watcher).await, Some(WatchEvent::Put(_))));
        assert!(matches!(next(&mut watcher).await, Some(WatchEvent::Put(_))));
        assert_eq!(
            next(&mut watcher).await,
            Some(WatchEvent::Compacted {
                compact_revision: 3
            })
        );
        assert_eq!(next(&mut watcher).await, None);
        let mut old = fake.watch("/p/", 2).await.unwrap();
        assert_eq!(
            next(&mut old).await,
            Some(WatchEvent::Compacted {
                compact_revision: 3
            })
        );
        assert_eq!(next(&mut old).await, None);
        // From the compact revision on is fine, and still sees the change made at it.
        let mut fresh = fake.watch("/p/", 3).await.unwrap();
        assert!(
            matches!(next(&mut fresh).await, Some(WatchEvent::Put(kv)) if kv.mod_revision == 3)
        );
        fake.set("/p/b", "3");
        assert!(matches!(next(&mut fresh).await, Some(WatchEvent::Put(kv)) if kv.key == "/p/b"));
    }

    #[tokio::test]
    async fn injected_failures_and_stolen_creates() {
        let fake = FakeRegistry::new();
        fake.fail_next(FakeOp::List, 2);
        assert!(fake.list("/").await.is_err());
        assert!(fake.list("/").await.is_err());
        assert!(fake.list("/").await.is_ok());
        assert_eq!(fake.calls(FakeOp::List), 3);

        fake.steal_next_create("theirs");
        let ttl = Duration::from_secs(60);
        assert_eq!(
            fake.create(KEY, "ours", ttl).await.unwrap(),
            CreateOutcome::AlreadyExists
        );
        assert_eq!(fake.value(KEY).as_deref(), Some("theirs"));
        assert!(fake.entry(KEY).unwrap().lease.is_some());
    }

    #[tokio::test]
    async fn broken_watches_end() {
        let fake = FakeRegistry::new();
        let mut watcher = fake.watch("/p/", 0).await.unwrap();
        assert_eq!(fake.watcher_count(), 1);
        fake.break_watches();
        assert_eq!(next(&mut watcher).await, None);
        assert_eq!(fake.watcher_count(), 0);
    }
}
