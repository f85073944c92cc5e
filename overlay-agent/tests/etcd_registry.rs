//! `EtcdRegistry` (and the subnet manager on top of it) against a real etcd.
//!
//! Each test starts its own etcd (Debian's `etcd-server`, 3.4) on 127.0.0.1 with random free
//! ports and a temporary data dir, through the harness's launcher (`overlay_tests::etcd`, with
//! its rcgen certificates for TLS); it is killed and its dir removed when the test ends, also on
//! failure. Without etcd the tests fail with a message saying so: they are never skipped.

use std::time::Duration;

use overlay_agent::subnet::config::NetworkConfig;
use overlay_agent::subnet::etcd::EtcdConnectError;
use overlay_agent::subnet::lease::{LeaseAttrs, Mac, subnet_key};
use overlay_agent::subnet::registry::{
    CreateOutcome, Registry, RegistryError, RenewOutcome, WatchEvent,
};
use overlay_agent::subnet::{
    EtcdOptions, EtcdRegistry, ManagerOptions, PeerEvent, SubnetManager,
    contract::{self, next, record},
};
use overlay_tests::etcd::{EtcdServer, TlsFiles, free_port};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};

const PREFIX: &str = "/coreos.com/network";

/// A private etcd on 127.0.0.1 (the harness's launcher), killed on drop, with the registry
/// options that reach it.
struct EtcdGuard {
    server: EtcdServer,
}

impl EtcdGuard {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With `tls`, etcd serves https only and requires a client certificate.
    async fn start_with(tls: bool) -> Self {
        let server = if tls {
            EtcdServer::start_local_tls()
        } else {
            EtcdServer::start_local()
        }
        .unwrap_or_else(|e| panic!("starting etcd (Debian's etcd-server): {e:#}"));
        Self { server }
    }

    fn endpoint(&self) -> String {
        self.server.endpoint().to_owned()
    }

    fn tls(&self) -> Option<TlsFiles> {
        self.server.tls().cloned()
    }

    fn options(&self) -> EtcdOptions {
        let mut options = EtcdOptions {
            timeout: Some(Duration::from_secs(5)),
            ..EtcdOptions::new([self.endpoint()])
        };
        if let Some(certs) = self.tls() {
            options.cafile = Some(certs.ca);
            options.certfile = Some(certs.client_cert);
            options.keyfile = Some(certs.client_key);
        }
        options
    }

    async fn registry(&self) -> EtcdRegistry {
        EtcdRegistry::connect(&self.options())
            .await
            .expect("connect to etcd")
    }
}

#[tokio::test]
async fn create_only_if_version_is_zero() {
    let etcd = EtcdGuard::start().await;
    contract::create_only_if_version_is_zero(&etcd.registry().await, PREFIX).await;
}

#[tokio::test]
async fn list_returns_the_revision_to_watch_from() {
    let etcd = EtcdGuard::start().await;
    contract::list_returns_the_revision_to_watch_from(&etcd.registry().await, PREFIX).await;
}

#[tokio::test]
async fn watch_reports_puts_and_deletes_under_the_prefix() {
    let etcd = EtcdGuard::start().await;
    contract::watch_reports_puts_and_deletes_under_the_prefix(&etcd.registry().await, PREFIX).await;
}

/// Junk of 5.6 MiB under the prefix (four values just under etcd's default 1.5 MiB request
/// limit), beside one real lease: more than tonic's default 4 MiB response limit.
#[tokio::test]
async fn listings_and_watches_over_four_mebibytes_are_read_whole() {
    let etcd = EtcdGuard::start().await;
    let registry = etcd.registry().await;
    let prefix = format!("{PREFIX}/subnets/");
    let before = registry.list(&prefix).await.unwrap().revision;
    let junk = "x".repeat(1_400_000);
    for i in 0..4 {
        registry
            .put(&format!("{prefix}junk-{i}"), &junk)
            .await
            .unwrap();
    }
    let real = format!("{prefix}10.10.9.0-24");
    registry.put(&real, &record("198.18.0.9", 9)).await.unwrap();

    let listing = registry
        .list(&prefix)
        .await
        .expect("a listing of 5.6 MiB is read");
    assert_eq!(listing.kvs.len(), 5);
    let total: usize = listing.kvs.iter().map(|kv| kv.value.len()).sum();
    assert!(total > 4 << 20, "listed {total} bytes");
    assert!(listing.kvs.iter().any(|kv| kv.key == real));

    // A watch from before the puts catches up with them in one response.
    let mut watcher = registry.watch(&prefix, before + 1).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..5 {
        match next(&mut watcher).await {
            Some(WatchEvent::Put(kv)) => keys.push(kv.key),
            other => panic!("expected a put, got {other:?}"),
        }
    }
    assert_eq!(keys.last(), Some(&real));
}

#[tokio::test]
async fn lease_expiry_is_seen_as_a_delete() {
    let etcd = EtcdGuard::start().await;
    let registry = etcd.registry().await;
    let prefix = format!("{PREFIX}/subnets/");
    let key = format!("{prefix}10.10.8.0-24");
    let mut watcher = registry
        .watch(&prefix, registry.list(&prefix).await.unwrap().revision + 1)
        .await
        .unwrap();
    let started = Instant::now();
    let CreateOutcome::Created(granted) = registry
        .create(&key, &record("198.18.0.8", 8), Duration::from_secs(2))
        .await
        .unwrap()
    else {
        panic!("create failed");
    };
    assert!(granted.ttl >= Duration::from_secs(2));
    assert!(matches!(next(&mut watcher).await, Some(WatchEvent::Put(_))));
    match next(&mut watcher).await {
        Some(WatchEvent::Delete { key: deleted, .. }) => assert_eq!(deleted, key),
        other => panic!("unexpected {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(registry.get(&key).await.unwrap().kv.is_none());
}

#[tokio::test]
async fn renewal_moves_the_key_to_a_new_lease_only_while_it_is_ours() {
    let etcd = EtcdGuard::start().await;
    contract::renewal_moves_the_key_to_a_new_lease_only_while_it_is_ours(
        &etcd.registry().await,
        PREFIX,
    )
    .await;
}

#[tokio::test]
async fn watching_a_compacted_revision_reports_compaction() {
    let etcd = EtcdGuard::start().await;
    let registry = etcd.registry().await;
    let prefix = format!("{PREFIX}/subnets/");
    let old = registry.list(&prefix).await.unwrap().revision;
    for i in 1..=5 {
        registry
            .put(&format!("{prefix}10.10.{i}.0-24"), &record("198.18.0.1", i))
            .await
            .unwrap();
    }
    let now = registry.list(&prefix).await.unwrap().revision;
    etcd.registry()
        .await
        .client()
        .compact(now, None)
        .await
        .expect("compact");

    let mut watcher = registry.watch(&prefix, old + 1).await.unwrap();
    assert_eq!(
        next(&mut watcher).await,
        Some(WatchEvent::Compacted {
            compact_revision: now
        })
    );
    assert_eq!(next(&mut watcher).await, None);

    // From the compact revision on, watching works.
    let mut watcher = registry.watch(&prefix, now + 1).await.unwrap();
    registry
        .put(&format!("{prefix}10.10.6.0-24"), &record("198.18.0.6", 6))
        .await
        .unwrap();
    assert!(matches!(next(&mut watcher).await, Some(WatchEvent::Put(_))));
}

#[tokio::test]
async fn unreachable_etcd_is_an_error_not_a_hang() {
    let port = free_port().expect("a free port");
    let options = EtcdOptions {
        timeout: Some(Duration::from_secs(2)),
        ..EtcdOptions::new([format!("http://127.0.0.1:{port}")])
    };
    // etcd-client connects lazily; the first request must fail within the timeout.
    let outcome = timeout(Duration::from_secs(20), async {
        let registry = EtcdRegistry::connect(&options)
            .await
            .map_err(|e| e.to_string())?;
        registry.list("/").await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    })
    .await
    .expect("no hang");
    let err = outcome.expect_err("nothing listens there");
    assert!(
        err.contains(&port.to_string()) || err.contains("/"),
        "{err}"
    );
}

#[tokio::test]
async fn username_and_password_are_used() {
    let etcd = EtcdGuard::start().await;
    let mut client = etcd.registry().await.client();
    client
        .user_add("root", "rootpw", None)
        .await
        .expect("add root");
    client
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    client.auth_enable().await.expect("enable auth");

    let anonymous = etcd.registry().await;
    assert!(anonymous.list("/").await.is_err(), "auth not enforced");
    let options = EtcdOptions {
        username: Some("root".to_owned()),
        password: Some("rootpw".to_owned()),
        ..etcd.options()
    };
    let authed = EtcdRegistry::connect(&options)
        .await
        .expect("connect with auth");
    authed.put("/x", "y").await.expect("authorized put");
    let wrong = EtcdOptions {
        password: Some("nope".to_owned()),
        ..options
    };
    assert!(EtcdRegistry::connect(&wrong).await.is_err());
}

/// The manager, keeper and peer watcher on real etcd with a short developer TTL.
#[tokio::test]
async fn manager_end_to_end_with_short_ttl() {
    let etcd = EtcdGuard::start().await;
    let registry = etcd.registry().await;
    registry
        .put(
            &format!("{PREFIX}/config"),
            r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#,
        )
        .await
        .unwrap();
    let options = ManagerOptions {
        lease_ttl: Duration::from_secs(4),
        renew_margin: Duration::from_secs(2),
        retry_period: Duration::from_secs(1),
        ..ManagerOptions::default()
    };
    let manager = SubnetManager::new(registry.clone(), PREFIX, options).unwrap();
    let config: NetworkConfig = manager.wait_for_network_config().await;
    let ours = LeaseAttrs::vxlan("198.18.0.1".parse().unwrap(), 1, Mac([2, 0, 0, 0, 0, 1]));
    let lease = manager
        .acquire_lease(&config, &ours, Some("172.17.33.0/24".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(lease.subnet, "172.17.33.0/24".parse().unwrap());
    assert_eq!(
        String::from_utf8(registry.get(&lease.key).await.unwrap().kv.unwrap().value).unwrap(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#
    );

    let (lease_tx, mut lease_rx) = watch::channel(lease.clone());
    let keeper = tokio::spawn({
        let manager = manager.clone();
        let config = config.clone();
        async move { manager.run_lease_keeper(config, lease_tx).await }
    });
    let (peer_tx, mut peer_rx) = mpsc::channel(16);
    let peers = tokio::spawn({
        let (manager, config) = (manager.clone(), config.clone());
        let own = lease_rx.clone();
        async move { manager.run_peer_watcher(config, own, peer_tx).await }
    });

    // The initial listing holds no peer: the watcher says so before any change.
    let event = timeout(Duration::from_secs(10), peer_rx.recv())
        .await
        .unwrap();
    assert_eq!(event, Some(PeerEvent::Synced(Vec::new())));

    // A stock node joins, with a short lease it lets lapse.
    let peer_key = subnet_key(PREFIX, "172.17.44.0/24".parse().unwrap());
    registry
        .create(&peer_key, &record("198.18.0.2", 2), Duration::from_secs(3))
        .await
        .unwrap();
    let event = timeout(Duration::from_secs(10), peer_rx.recv())
        .await
        .unwrap();
    assert!(
        matches!(&event, Some(PeerEvent::Added(p)) if p.public_ip.to_string() == "198.18.0.2"),
        "{event:?}"
    );
    let event = timeout(Duration::from_secs(15), peer_rx.recv())
        .await
        .unwrap();
    assert_eq!(
        event,
        Some(PeerEvent::Removed("172.17.44.0/24".parse().unwrap()))
    );

    // Our key outlives its TTL several times over: it is renewed.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let kv = registry
        .get(&lease.key)
        .await
        .unwrap()
        .kv
        .expect("our lease is alive");
    assert_ne!(kv.lease, lease.lease_id);

    // Revoked: acquired again, same subnet. Renewals also update the channel; only a lease
    // written after the delete is the re-acquired one.
    registry.delete(&lease.key).await.unwrap();
    let deleted_at = registry.get(&lease.key).await.unwrap().revision;
    let again = timeout(Duration::from_secs(10), async {
        loop {
            lease_rx.changed().await.unwrap();
            let current = lease_rx.borrow_and_update().clone();
            if current.revision > deleted_at {
                break current;
            }
        }
    })
    .await
    .expect("re-acquired");
    assert_eq!(again.subnet, lease.subnet);

    drop(lease_rx);
    drop(peer_rx);
    timeout(Duration::from_secs(5), keeper)
        .await
        .unwrap()
        .unwrap();
    timeout(Duration::from_secs(5), peers)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn tls_with_client_certificate() {
    let etcd = EtcdGuard::start_with(true).await;
    let certs = etcd.tls().unwrap();
    // https:// endpoint with key, cert and CA.
    let registry = etcd.registry().await;
    registry.put("/tls", "ok").await.expect("put over TLS");

    // A scheme-less endpoint uses TLS when key and cert are given, as Go's client does.
    let bare = EtcdOptions {
        endpoints: vec![etcd.endpoint().trim_start_matches("https://").to_owned()],
        ..etcd.options()
    };
    let registry = EtcdRegistry::connect(&bare).await.expect("connect");
    let kv = registry
        .get("/tls")
        .await
        .expect("get over TLS")
        .kv
        .unwrap();
    assert_eq!(kv.value, b"ok");

    // Without a client certificate the server refuses us.
    let no_client_cert = EtcdOptions {
        keyfile: None,
        certfile: None,
        ..etcd.options()
    };
    let outcome = async {
        EtcdRegistry::connect(&no_client_cert)
            .await
            .map_err(|e| e.to_string())?
            .list("/")
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        timeout(Duration::from_secs(20), outcome)
            .await
            .unwrap()
            .is_err()
    );

    // Plain and TLS endpoints cannot share a connection.
    let mixed = EtcdOptions {
        endpoints: vec![etcd.endpoint(), "http://127.0.0.1:1".to_owned()],
        ..etcd.options()
    };
    let err = EtcdRegistry::connect(&mixed).await.unwrap_err();
    assert!(
        matches!(err, EtcdConnectError::MixedSchemes { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("http://127.0.0.1:1"), "{err}");

    // Unreadable files are named.
    let missing_key = certs.client_key.with_extension("missing");
    let missing = EtcdOptions {
        keyfile: Some(missing_key.clone()),
        ..etcd.options()
    };
    let err = EtcdRegistry::connect(&missing).await.unwrap_err();
    assert!(
        err.to_string().contains(&missing_key.display().to_string()),
        "{err}"
    );

    // Only one of key and cert: refused up front, as flanneld (etcd's TLSInfo) refuses it.
    let half = EtcdOptions {
        keyfile: None,
        ..etcd.options()
    };
    let err = EtcdRegistry::connect(&half).await.unwrap_err();
    assert!(
        matches!(err, EtcdConnectError::HalfClientCert { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("KeyFile and CertFile must both be present")
            && text.contains("--etcd-keyfile: not given")
            && text.contains(&certs.client_cert.display().to_string()),
        "{text}"
    );
}

/// The value a lost-answer test writes; [`LosingRelay`] looks for its PublicIP.
fn renewed_record() -> String {
    record("198.18.7.77", 77)
}
const RENEWED_MARKER: &[u8] = b"198.18.7.77";

/// Renews `key` (created directly with `ttl`) through `relay`, which loses the answer to the
/// transaction; returns the renewal's result and the lease the creation granted.
async fn renew_through(
    etcd: &EtcdGuard,
    relay: &LosingRelay,
    key: &str,
) -> (Result<RenewOutcome, RegistryError>, i64) {
    let ttl = Duration::from_secs(60);
    let CreateOutcome::Created(created) = etcd
        .registry()
        .await
        .create(key, &record("198.18.0.7", 7), ttl)
        .await
        .unwrap()
    else {
        panic!("create failed");
    };
    let options = EtcdOptions {
        timeout: Some(Duration::from_secs(1)),
        ..EtcdOptions::new([format!("http://{}", relay.addr)])
    };
    let through = EtcdRegistry::connect(&options).await.unwrap();
    let outcome = through
        .renew(key, &renewed_record(), ttl, Some(created.lease))
        .await;
    (outcome, created.lease)
}

/// The connection breaks after etcd committed the renewal and before its answer arrived: the
/// key, now on the new etcd lease, is read back and the renewal is a success. Revoking the
/// lease, as a failed transaction would have it, deletes the key: every peer would remove
/// the node until its record is written again.
#[tokio::test]
async fn a_renewal_whose_answer_is_lost_in_a_broken_connection_is_read_back() {
    let etcd = EtcdGuard::start().await;
    let relay = LosingRelay::start(&etcd.endpoint(), true).await;
    let key = format!("{PREFIX}/subnets/10.10.7.0-24");
    let (outcome, old) = renew_through(&etcd, &relay, &key).await;
    assert!(relay.fired(), "the relay never saw the renewal");
    let Ok(RenewOutcome::Renewed(granted)) = outcome else {
        panic!("the committed renewal was reported as {outcome:?}");
    };
    assert_ne!(granted.lease, old);
    let kv = etcd.registry().await.get(&key).await.unwrap().kv;
    let kv = kv.expect("the renewed key is still in etcd");
    assert_eq!(kv.lease, Some(granted.lease));
    assert_eq!(kv.mod_revision, granted.revision);
    assert_eq!(kv.value, renewed_record().into_bytes());
}

/// etcd committed the renewal and nothing it sends arrives any more: the outcome cannot be
/// read back, so the renewal fails and the new lease is left alone, holding the key.
#[tokio::test]
async fn a_renewal_whose_outcome_cannot_be_read_leaves_the_key_on_its_new_lease() {
    let etcd = EtcdGuard::start().await;
    let relay = LosingRelay::start(&etcd.endpoint(), false).await;
    let key = format!("{PREFIX}/subnets/10.10.7.0-24");
    let (outcome, old) = renew_through(&etcd, &relay, &key).await;
    assert!(relay.fired(), "the relay never saw the renewal");
    assert!(outcome.is_err(), "nothing was answered, yet {outcome:?}");
    // A revoke sent through the relay would reach etcd: give it the time to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kv = etcd.registry().await.get(&key).await.unwrap().kv;
    let kv = kv.expect("the renewed key is still in etcd");
    assert_eq!(kv.value, renewed_record().into_bytes());
    assert!(kv.lease.is_some_and(|lease| lease != old), "{kv:?}");
}

/// A TCP relay to etcd that loses the answer to one request: once the client has sent
/// [`RENEWED_MARKER`], nothing etcd sends on that connection reaches the client; with `cut`,
/// the connection is closed 300 ms later (the client then connects again), otherwise it stays
/// open and silent.
struct LosingRelay {
    addr: std::net::SocketAddr,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LosingRelay {
    async fn start(endpoint: &str, cut: bool) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let upstream: std::net::SocketAddr = endpoint
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("etcd endpoint {endpoint}: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let fired = fired.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = tokio::net::TcpStream::connect(upstream)
                        .await
                        .expect("etcd accepts the relay");
                    tokio::spawn(relay_one(client, server, cut, fired.clone()));
                }
            }
        });
        Self { addr, fired, task }
    }

    fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for LosingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    cut: bool,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    // The end of what the client sent, so the marker is found across reads.
    let mut tail: Vec<u8> = Vec::new();
    let mut muted = false;
    let mut cut_at: Option<Instant> = None;
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                if !muted && !fired.load(Ordering::SeqCst) {
                    tail.extend_from_slice(&up[..n]);
                    if tail.windows(RENEWED_MARKER.len()).any(|w| w == RENEWED_MARKER)
                        && !fired.swap(true, Ordering::SeqCst)
                    {
                        muted = true;
                        cut_at = cut.then(|| Instant::now() + Duration::from_millis(300));
                    }
                    let keep = tail.len().saturating_sub(RENEWED_MARKER.len());
                    tail.drain(..keep);
                }
                if to_server.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = from_server.read(&mut down) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                if !muted && to_client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(cut_at.unwrap_or_else(Instant::now)), if cut_at.is_some() => return,
        }
    }
}
