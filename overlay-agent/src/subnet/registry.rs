//! The seam between lease logic and etcd, after flannel's `Registry` interface.
//!
//! Only the few etcd v3 operations flannel relies on are exposed, in etcd's own terms
//! (revisions, lease ids, "version 0" creates), so that [`super::etcd::EtcdRegistry`] stays a
//! thin translation and the in-memory fake (`super::fake`, test code only) can reproduce the semantics in memory
//! for the manager's unit tests.

use std::future::Future;
use std::time::Duration;

/// An etcd lease id (never 0; 0 means "no lease" in etcd).
pub type LeaseId = i64;

/// A key as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key (lossily decoded if it is not UTF-8).
    pub key: String,
    pub value: Vec<u8>,
    /// The etcd lease holding the key; `None` for a key that never expires, which flannel
    /// treats as a reservation.
    pub lease: Option<LeaseId>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

impl KeyValue {
    /// The value for log messages: lossily decoded, and cut to [`LOG_TEXT_MAX`] bytes (the
    /// store accepts values of megabytes, which must not go whole into the log).
    pub fn value_lossy(&self) -> std::borrow::Cow<'_, str> {
        if self.value.len() <= LOG_TEXT_MAX {
            return String::from_utf8_lossy(&self.value);
        }
        // A character cut in two shows as U+FFFD: fine for a log line.
        let head = String::from_utf8_lossy(&self.value[..LOG_TEXT_MAX]);
        std::borrow::Cow::Owned(format!("{head}… ({} bytes)", self.value.len()))
    }

    /// The key for log messages, cut as [`KeyValue::value_lossy`] cuts values.
    pub fn key_for_log(&self) -> std::borrow::Cow<'_, str> {
        cut_for_log(&self.key)
    }
}

/// How much of a key or value from the store goes into a log message.
pub const LOG_TEXT_MAX: usize = 256;

/// `text` cut to [`LOG_TEXT_MAX`] bytes (at a character boundary), with its full length.
pub fn cut_for_log(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= LOG_TEXT_MAX {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = LOG_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// The keys under a prefix, as of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The store revision the listing reflects; watch from `revision + 1` to see what follows.
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// One key (or its absence), as of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub revision: i64,
    pub kv: Option<KeyValue>,
}

/// A key written with a fresh etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub lease: LeaseId,
    /// The TTL the server granted (it may round up a very short request).
    pub ttl: Duration,
    /// The revision of the write.
    pub revision: i64,
}

/// Result of a create-if-absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(Granted),
    /// The key exists (its version is not 0): another node won the race.
    AlreadyExists,
}

/// Result of a lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewOutcome {
    Renewed(Granted),
    /// The key is gone, or no longer held by the lease we expected: it is not ours any more.
    Lost,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// A delete, including one caused by lease expiry.
    Delete {
        key: String,
        revision: i64,
    },
    /// The requested history is compacted away; the watch ends after this. Re-list, then watch
    /// from the listing's revision + 1.
    Compacted {
        compact_revision: i64,
    },
}

impl WatchEvent {
    /// The key this event is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Put(kv) => Some(&kv.key),
            Self::Delete { key, .. } => Some(key),
            Self::Compacted { .. } => None,
        }
    }

    /// The store revision of the change, if any.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Self::Put(kv) => Some(kv.mod_revision),
            Self::Delete { revision, .. } => Some(*revision),
            Self::Compacted { .. } => None,
        }
    }
}

/// A failed registry operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {op} on {key} failed: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("etcd canceled the watch on {prefix}: {reason}")]
    WatchCanceled { prefix: String, reason: String },
    /// A failure injected by `super::fake::FakeRegistry` (test code only).
    #[cfg(any(test, feature = "test-util"))]
    #[error("{op} on {key} failed: injected failure")]
    Injected { op: &'static str, key: String },
}

/// A stream of changes under a prefix. Dropping it cancels the watch.
pub trait Watcher: Send + 'static {
    /// The next change. `Ok(None)` means the stream ended (connection lost, or after
    /// [`WatchEvent::Compacted`]); the caller re-watches from the last revision it saw + 1.
    fn next(&mut self) -> impl Future<Output = Result<Option<WatchEvent>, RegistryError>> + Send;
}

/// The etcd operations lease management needs. Keys are full keys; values are UTF-8 JSON.
pub trait Registry: Send + Sync + 'static {
    type Watcher: Watcher;

    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Fetched, RegistryError>> + Send;

    /// Reads every key under `prefix`, with the revision of the read.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing, RegistryError>> + Send;

    /// Grants a lease of `ttl` and writes `key` with it only if the key does not exist
    /// (version 0), in one transaction; the lease is revoked when the key exists.
    fn create(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<CreateOutcome, RegistryError>> + Send;

    /// Renews as flannel does, by granting a new lease of `ttl` and writing `key` with it.
    /// With `expected` set, the write only happens while the key is still held by that lease,
    /// so a renewal never resurrects a key someone deleted or took over.
    fn renew(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        expected: Option<LeaseId>,
    ) -> impl Future<Output = Result<RenewOutcome, RegistryError>> + Send;

    /// Writes `key` without a lease (a reservation); returns the revision of the write.
    fn put(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<i64, RegistryError>> + Send;

    /// Deletes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Watches every key under `prefix` (an exact key is a prefix too), starting at
    /// `from_revision` inclusive.
    fn watch(
        &self,
        prefix: &str,
        from_revision: i64,
    ) -> impl Future<Output = Result<Self::Watcher, RegistryError>> + Send;
}
