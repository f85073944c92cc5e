//! [`Registry`] on etcd's v3 API, through `etcd-client`.
//!
//! Connection options follow flanneld's `--etcd-*` flags: several endpoints, optional
//! username/password, and TLS with a client certificate when both the key and the cert file
//! are given (the CA file is optional; without it the system roots are used).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KvClient, PutOptions, TlsOptions, Txn, TxnOp, WatchClient, WatchOptions, WatchStream,
};
use tracing::{debug, warn};

use super::registry::{
    CreateOutcome, Fetched, Granted, KeyValue, LeaseId, Listing, Registry, RegistryError,
    RenewOutcome, WatchEvent, Watcher,
};

/// flanneld's default `--etcd-endpoints`.
pub const DEFAULT_ENDPOINTS: &[&str] = &["http://127.0.0.1:4001", "http://127.0.0.1:2379"];

/// Evaluates the etcd request `$call` (ending in `.await`), and once more after logging in
/// again if etcd refused its auth token (only with `--etcd-username`; without credentials no
/// token is ever refused).
macro_rules! logged_in {
    ($registry:expr, $call:expr) => {
        match $call {
            Err(e) if refused_token(&e) => match $registry.log_in_again(&e).await {
                Ok(()) => $call,
                Err(e) => Err(e),
            },
            other => other,
        }
    };
}

/// The largest response we read from etcd: Go's client (and so flanneld) reads up to
/// `math.MaxInt32` bytes; tonic's default of 4 MiB would let a few values of etcd's maximum
/// request size (1.5 MiB by default) anywhere under the prefix make every listing fail.
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// URLs such as `http://127.0.0.1:2379` or `https://etcd-1:2379`.
    pub endpoints: Vec<String>,
    /// Authenticate as this user when set and not empty.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Client key (`--etcd-keyfile`), PEM.
    pub keyfile: Option<PathBuf>,
    /// Client certificate (`--etcd-certfile`), PEM.
    pub certfile: Option<PathBuf>,
    /// CA bundle (`--etcd-cafile`), PEM.
    pub cafile: Option<PathBuf>,
    /// Bounds connecting and each request; `None` leaves etcd-client's defaults.
    pub timeout: Option<Duration>,
}

impl EtcdOptions {
    /// Options for plain HTTP endpoints without auth.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// Why connecting to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    #[error("no etcd endpoints given")]
    NoEndpoints,
    /// Only one of the two client certificate files: flanneld (etcd's `TLSInfo`) refuses
    /// this too, rather than connect without the certificate the user meant to present.
    #[error(
        "KeyFile and CertFile must both be present (--etcd-keyfile: {key}, --etcd-certfile: {cert})",
        key = show(.key.as_deref()),
        cert = show(.cert.as_deref())
    )]
    HalfClientCert {
        key: Option<PathBuf>,
        cert: Option<PathBuf>,
    },
    #[error("cannot read {what} {path}: {source}", path = path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "etcd endpoints mix plain ({plain}) and TLS ({tls}) connections; use https:// for all of them or http:// for all of them"
    )]
    MixedSchemes { plain: String, tls: String },
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// A [`Registry`] backed by an etcd cluster. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").finish_non_exhaustive()
    }
}

fn show(path: Option<&Path>) -> String {
    path.map_or_else(|| "not given".to_owned(), |p| p.display().to_string())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdConnectError> {
    std::fs::read(path).map_err(|source| EtcdConnectError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

fn etcd_error(op: &'static str, key: &str, source: etcd_client::Error) -> RegistryError {
    RegistryError::Etcd {
        op,
        key: key.to_owned(),
        source: Box::new(source),
    }
}

fn seconds(ttl: Duration) -> i64 {
    // etcd counts TTLs in whole seconds; never ask for 0, which etcd would treat oddly.
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

impl EtcdRegistry {
    /// Connects to etcd. As with Go's client (and so flanneld), `https://` endpoints use TLS,
    /// `http://` ones do not, and endpoints without a scheme use TLS when a client key and
    /// certificate are given. One connection cannot mix TLS and plain endpoints.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, EtcdConnectError> {
        if options.endpoints.is_empty() {
            return Err(EtcdConnectError::NoEndpoints);
        }
        let client_cert = match (&options.keyfile, &options.certfile) {
            (Some(key), Some(cert)) => Some((key, cert)),
            (None, None) => None,
            (key, cert) => {
                return Err(EtcdConnectError::HalfClientCert {
                    key: key.clone(),
                    cert: cert.clone(),
                });
            }
        };
        let (tls_endpoints, plain_endpoints): (Vec<&String>, Vec<&String>) =
            options.endpoints.iter().partition(|ep| {
                ep.starts_with("https://") || (client_cert.is_some() && !ep.contains("://"))
            });
        if !tls_endpoints.is_empty() && !plain_endpoints.is_empty() {
            return Err(EtcdConnectError::MixedSchemes {
                plain: join(&plain_endpoints),
                tls: join(&tls_endpoints),
            });
        }

        // Like flanneld's watches (WithRequireLeader): a member cut off from the leader fails
        // requests instead of serving stale data, and we retry elsewhere.
        let mut connect = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(timeout) = options.timeout {
            connect = connect.with_connect_timeout(timeout).with_timeout(timeout);
        }
        if let Some(user) = options.username.as_deref().filter(|u| !u.is_empty()) {
            // etcd's tokens die with a restart of etcd (its default "simple" tokens live in its
            // memory) or at their TTL (JWT): log in again when one is refused, as Go's client
            // (and so flanneld) does. etcd-client does it for KV requests; `logged_in` below for
            // the lease and watch requests, which it leaves out.
            connect = connect
                .with_user(user, options.password.as_deref().unwrap_or_default())
                .with_auto_token_refresh(true);
        }

        if !tls_endpoints.is_empty() {
            let mut tls = TlsOptions::new();
            tls = match &options.cafile {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read("CA file", ca)?)),
                None => tls.with_enabled_roots(),
            };
            if let Some((key, cert)) = client_cert {
                tls = tls.identity(Identity::from_pem(
                    read("certificate file", cert)?,
                    read("key file", key)?,
                ));
            } else {
                // etcd refuses such clients only inside the TLS handshake, which reaches us as
                // a bare "connection closed" or "broken pipe": say up front what is missing.
                warn!(
                    endpoints = %join(&tls_endpoints),
                    "connecting to etcd over TLS without a client certificate (--etcd-certfile and --etcd-keyfile not given): an etcd that requires client certificates will refuse every request"
                );
            }
            connect = connect.with_tls(tls);
        } else if client_cert.is_some() {
            warn!(
                endpoints = %join(&plain_endpoints),
                "etcd TLS key and certificate given but every endpoint is http://: connecting without TLS"
            );
        } else {
            debug!("no certificate provided: connecting to etcd with http. This is insecure");
        }

        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|source| EtcdConnectError::Connect {
                endpoints: options.endpoints.join(","),
                source,
            })?;
        Ok(Self { client })
    }

    /// The underlying client, for tests and tools (compaction, status).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A KV client that reads responses up to [`MAX_RESPONSE_BYTES`].
    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// A watch client that reads responses up to [`MAX_RESPONSE_BYTES`] (one response can
    /// carry every event of a transaction).
    fn watcher(&self) -> WatchClient {
        self.client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }
}

fn join(endpoints: &[&String]) -> String {
    endpoints
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl Registry for EtcdRegistry {
    type Watcher = EtcdWatcher;

    async fn get(&self, key: &str) -> Result<Fetched, RegistryError> {
        let mut kv = self.kv();
        let response = kv
            .get(key, None)
            .await
            .map_err(|e| etcd_error("get", key, e))?;
        Ok(Fetched {
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            kv: response.kvs().first().map(key_value),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Listing, RegistryError> {
        let mut kv = self.kv();
        let response = kv
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_error("list", prefix, e))?;
        Ok(Listing {
            revision: response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            kvs: response.kvs().iter().map(key_value).collect(),
        })
    }

    async fn create(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<CreateOutcome, RegistryError> {
        let absent = Compare::version(key, CompareOp::Equal, 0);
        Ok(
            match self
                .put_with_new_lease("create", key, value, ttl, Some(absent))
                .await?
            {
                Some(granted) => CreateOutcome::Created(granted),
                None => CreateOutcome::AlreadyExists,
            },
        )
    }

    async fn renew(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        expected: Option<LeaseId>,
    ) -> Result<RenewOutcome, RegistryError> {
        let still_ours = expected.map(|lease| Compare::lease(key, CompareOp::Equal, lease));
        Ok(
            match self
                .put_with_new_lease("renew", key, value, ttl, still_ours)
                .await?
            {
                Some(granted) => RenewOutcome::Renewed(granted),
                None => RenewOutcome::Lost,
            },
        )
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, RegistryError> {
        let response = self
            .kv()
            .put(key, value, None)
            .await
            .map_err(|e| etcd_error("put", key, e))?;
        Ok(response
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision))
    }

    async fn delete(&self, key: &str) -> Result<bool, RegistryError> {
        let response = self
            .kv()
            .delete(key, None)
            .await
            .map_err(|e| etcd_error("delete", key, e))?;
        Ok(response.deleted() > 0)
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<EtcdWatcher, RegistryError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let stream = logged_in!(
            self,
            self.watcher().watch(prefix, Some(options.clone())).await
        )
        .map_err(|e| etcd_error("watch", prefix, e))?;
        Ok(EtcdWatcher {
            prefix: prefix.to_owned(),
            stream,
            pending: VecDeque::new(),
            done: false,
        })
    }
}

/// How often a write whose answer was lost is checked by reading the key back.
const LOST_ANSWER_READS: u32 = 3;
/// The pause before each read after the first.
const LOST_ANSWER_PAUSE: Duration = Duration::from_millis(200);

impl EtcdRegistry {
    /// Grants a lease of `ttl` and writes `key` with it in one transaction, if `condition`
    /// holds (always without one). `None` when it did not: the lease is revoked again.
    ///
    /// When the transaction's answer is lost (a broken connection, a timeout), etcd may still
    /// have committed it, and the key then lives on the new lease: revoking it would delete
    /// the key, which every peer takes as this node's removal. So the key is read back: held
    /// by the new lease, the write is a success; held otherwise or absent, the lease is
    /// revoked; unreadable, the lease is left to expire by itself and the error returned (the
    /// lease keeper's next renewal then finds the key not on the lease it knows, reads it, and
    /// writes our record back under a lease it holds).
    async fn put_with_new_lease(
        &self,
        op: &'static str,
        key: &str,
        value: &str,
        ttl: Duration,
        condition: Option<Compare>,
    ) -> Result<Option<Granted>, RegistryError> {
        let grant = logged_in!(
            self,
            self.client.lease_client().grant(seconds(ttl), None).await
        )
        .map_err(|e| etcd_error("lease grant", key, e))?;
        let lease = grant.id();
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        let txn = match condition {
            Some(condition) => Txn::new().when([condition]).and_then([put]),
            None => Txn::new().and_then([put]),
        };
        match self.kv().txn(txn).await {
            Ok(response) if response.succeeded() => Ok(Some(Granted {
                lease,
                ttl: Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0)),
                revision: response
                    .header()
                    .map_or(0, etcd_client::ResponseHeader::revision),
            })),
            Ok(_) => {
                self.revoke(lease).await;
                Ok(None)
            }
            Err(e) => {
                let error = etcd_error(op, key, e);
                match self.holder_after_lost_answer(key).await {
                    Some(Holder::Lease(holder, revision)) if holder == lease => {
                        warn!(key, lease, "{error}; the write took effect (read back)");
                        Ok(Some(Granted {
                            lease,
                            ttl: Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0)),
                            revision,
                        }))
                    }
                    Some(_) => {
                        self.revoke(lease).await;
                        Err(error)
                    }
                    None => {
                        warn!(
                            key,
                            lease,
                            "{error}; whether the write took effect is unknown, the new etcd lease is left to expire"
                        );
                        Err(error)
                    }
                }
            }
        }
    }

    /// Who holds `key` now, read up to [`LOST_ANSWER_READS`] times; `None` when no read
    /// succeeded.
    async fn holder_after_lost_answer(&self, key: &str) -> Option<Holder> {
        for attempt in 0..LOST_ANSWER_READS {
            if attempt > 0 {
                tokio::time::sleep(LOST_ANSWER_PAUSE).await;
            }
            match self.get(key).await {
                Ok(fetched) => {
                    return Some(match fetched.kv {
                        Some(kv) => Holder::Lease(kv.lease.unwrap_or(0), kv.mod_revision),
                        None => Holder::Nobody,
                    });
                }
                Err(e) => debug!(key, error = %e, "reading back a write whose answer was lost"),
            }
        }
        None
    }

    /// Best-effort revoke of a lease we granted but did not use; etcd expires it anyway.
    async fn revoke(&self, lease: LeaseId) {
        if let Err(e) = logged_in!(self, self.client.lease_client().revoke(lease).await) {
            debug!(lease, error = %e, "could not revoke an unused etcd lease; it will expire");
        }
    }
}

impl EtcdRegistry {
    async fn log_in_again(&self, refusal: &etcd_client::Error) -> Result<(), etcd_client::Error> {
        debug!("etcd refused our auth token ({refusal}); logging in again");
        self.client.refresh_token().await
    }
}

/// Whether etcd refused the request's auth token: gRPC's UNAUTHENTICATED (16), or etcd's
/// message where a proxy lost the code (as etcd-client itself tells them).
fn refused_token(error: &etcd_client::Error) -> bool {
    const UNAUTHENTICATED: i32 = 16;
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if i32::from(status.code()) == UNAUTHENTICATED
            || status.message() == "etcdserver: invalid auth token")
}

/// Who holds a key read back after a lost answer.
enum Holder {
    /// The lease (0: none) and the revision of the last write.
    Lease(LeaseId, i64),
    Nobody,
}

/// A watch on etcd. Dropping it closes the stream, which cancels the watch server-side.
pub struct EtcdWatcher {
    prefix: String,
    stream: WatchStream,
    pending: VecDeque<WatchEvent>,
    done: bool,
}

impl Watcher for EtcdWatcher {
    async fn next(&mut self) -> Result<Option<WatchEvent>, RegistryError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            let Some(response) = self
                .stream
                .message()
                .await
                .map_err(|e| etcd_error("watch", &self.prefix, e))?
            else {
                self.done = true;
                continue;
            };
            // A watch that starts below the compaction point is canceled with the compact
            // revision set; so is one that fell too far behind.
            if response.compact_revision() != 0 {
                self.done = true;
                return Ok(Some(WatchEvent::Compacted {
                    compact_revision: response.compact_revision(),
                }));
            }
            if response.canceled() {
                self.done = true;
                return Err(RegistryError::WatchCanceled {
                    prefix: self.prefix.clone(),
                    reason: response.cancel_reason().to_owned(),
                });
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                self.pending.push_back(match event.event_type() {
                    EventType::Put => WatchEvent::Put(key_value(kv)),
                    EventType::Delete => WatchEvent::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        revision: kv.mod_revision(),
                    },
                });
            }
        }
    }
}
