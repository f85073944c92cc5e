//! Lease acquisition, renewal, revocation and the peer watch, against [`FakeRegistry`] on
//! tokio's paused clock.

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use super::fake::{FakeOp, FakeRegistry};
use super::lease::{LeaseAttrs, Mac, config_key, subnet_key};
use super::manager::{LEASE_REVOKED_MESSAGE, Lease, ManagerError, ManagerOptions, SubnetManager};
use super::watch::{Peer, PeerEvent};
use crate::subnet::config::NetworkConfig;

const PREFIX: &str = "/coreos.com/network";
const OUR_IP: &str = "198.18.0.1";
const TTL: Duration = Duration::from_secs(100);
const MARGIN: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(10);

fn options() -> ManagerOptions {
    ManagerOptions {
        lease_ttl: TTL,
        renew_margin: MARGIN,
        retry_period: RETRY,
        config_poll_period: Duration::from_secs(1),
        watch_retry_period: Duration::from_secs(1),
        race_retries: 10,
    }
}

fn manager(fake: &FakeRegistry) -> SubnetManager<FakeRegistry> {
    SubnetManager::new(fake.clone(), PREFIX, options()).unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn mac(last: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0, last])
}

fn attrs(public_ip: &str, mac_last: u8) -> LeaseAttrs {
    LeaseAttrs::vxlan(ip(public_ip), 1, mac(mac_last))
}

fn ours() -> LeaseAttrs {
    attrs(OUR_IP, 1)
}

fn key(subnet: &str) -> String {
    subnet_key(PREFIX, net(subnet))
}

fn config(text: &str) -> NetworkConfig {
    NetworkConfig::parse(text).unwrap()
}

fn default_config() -> NetworkConfig {
    config(r#"{"Network": "10.10.0.0/16"}"#)
}

/// A config with exactly the given number of /24 candidates from 10.10.1.0 on.
fn tiny_config(count: u8) -> NetworkConfig {
    config(&format!(
        r#"{{"Network": "10.10.0.0/16", "SubnetMin": "10.10.1.0", "SubnetMax": "10.10.{count}.0"}}"#
    ))
}

/// Another node's lease, with a TTL, as stock flanneld writes it.
fn add_peer(fake: &FakeRegistry, subnet: &str, public_ip: &str, mac_last: u8) {
    fake.set_with_ttl(
        &key(subnet),
        &attrs(public_ip, mac_last).to_json(),
        TTL * 10,
    );
}

fn peer(subnet: &str, public_ip: &str, mac_last: u8) -> Peer {
    Peer {
        subnet: net(subnet),
        public_ip: ip(public_ip),
        backend_type: "vxlan".to_owned(),
        vtep_mac: Some(mac(mac_last)),
        vni: Some(1),
    }
}

/// Collects formatted log lines of the current thread (tests run on one thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Network config

#[tokio::test]
async fn config_not_found_uses_flannels_message() {
    let fake = FakeRegistry::new();
    let err = manager(&fake).network_config().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
    );
}

#[tokio::test]
async fn config_is_read_and_validated() {
    let fake = FakeRegistry::new();
    let m = manager(&fake);
    fake.set(
        &config_key(PREFIX),
        r#"{"Network": "10.10.0.0/16", "SubnetLen": 31}"#,
    );
    let err = m.network_config().await.unwrap_err();
    assert_eq!(err.to_string(), "SubnetLen must be less than /31");
    fake.set(
        &config_key(PREFIX),
        r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    );
    assert_eq!(
        m.network_config().await.unwrap().network,
        net("172.17.0.0/16")
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_for_config_retries_every_second() {
    let fake = FakeRegistry::new();
    let m = manager(&fake);
    let start = Instant::now();
    let waiter = tokio::spawn({
        let m = m.clone();
        async move { m.wait_for_network_config().await }
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    fake.set(&config_key(PREFIX), r#"{"Network": "10.10.0.0/16"}"#);
    let config = waiter.await.unwrap();
    assert_eq!(config.network, net("10.10.0.0/16"));
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    // Tries at 0, 1, 2, 3 and 4 s.
    assert_eq!(fake.calls(FakeOp::Get), 5);
}

#[test]
fn options_are_validated() {
    let fake = FakeRegistry::new();
    let bad = [
        ManagerOptions {
            renew_margin: TTL,
            ..options()
        },
        ManagerOptions {
            renew_margin: Duration::ZERO,
            ..options()
        },
        ManagerOptions {
            lease_ttl: Duration::from_millis(500),
            renew_margin: Duration::from_millis(100),
            ..options()
        },
        ManagerOptions {
            retry_period: Duration::ZERO,
            ..options()
        },
        ManagerOptions {
            race_retries: 0,
            ..options()
        },
    ];
    for options in bad {
        assert!(
            matches!(
                SubnetManager::new(fake.clone(), PREFIX, options),
                Err(ManagerError::InvalidOptions { .. })
            ),
            "{options:?} accepted"
        );
    }
    SubnetManager::new(fake, PREFIX, ManagerOptions::default()).unwrap();
    assert_eq!(
        ManagerOptions::renew_margin_from_minutes(60).unwrap(),
        Duration::from_secs(3600)
    );
    assert_eq!(
        ManagerOptions::renew_margin_from_minutes(1439).unwrap(),
        Duration::from_secs(1439 * 60)
    );
    for bad in [0, 1440] {
        let err = ManagerOptions::renew_margin_from_minutes(bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("Invalid subnet-lease-renew-margin option, out of acceptable range"),
            "{err}"
        );
    }
}

#[test]
fn default_options_are_flannels() {
    let options = ManagerOptions::default();
    assert_eq!(options.lease_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(options.renew_margin, Duration::from_secs(3600));
    assert_eq!(options.retry_period, Duration::from_secs(60));
    assert_eq!(options.config_poll_period, Duration::from_secs(1));
    assert_eq!(options.race_retries, 10);
}

// ---------------------------------------------------------------------------------------------
// Acquisition

#[tokio::test(start_paused = true)]
async fn fresh_node_gets_a_random_free_subnet_with_a_ttl() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let lease = manager(&fake)
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert!(default_config().fits(lease.subnet), "{}", lease.subnet);
    assert_ne!(lease.subnet, net("10.10.1.0/24"));
    // Among the first 100 free subnets: 10.10.2.0 .. 10.10.101.0.
    assert!(lease.subnet <= net("10.10.101.0/24"), "{}", lease.subnet);
    assert_eq!(lease.key, subnet_key(PREFIX, lease.subnet));
    assert_eq!(lease.attrs, ours());
    assert!(!lease.is_reservation());
    assert_eq!(lease.expiration, Some(Instant::now() + TTL));

    let kv = fake.entry(&lease.key).unwrap();
    assert_eq!(
        String::from_utf8(kv.value).unwrap(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#
    );
    assert_eq!(kv.lease, lease.lease_id);
    assert_eq!(kv.mod_revision, lease.revision);
    assert_eq!(fake.expiry(&lease.key), Some(Instant::now() + TTL));
}

/// Issue 12, item 7: a start-up that fails after the lease gives up the lease it created
/// (no peer routes to a node that never came up), but never one it reused or someone else's.
#[tokio::test(start_paused = true)]
async fn a_created_lease_is_released_a_reused_one_is_marked_as_such() {
    let fake = FakeRegistry::new();
    let m = manager(&fake);
    let lease = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert!(lease.created);
    m.release_lease(&lease).await.unwrap();
    assert_eq!(fake.value(&lease.key), None, "released");

    // Reused: not created by this acquisition.
    fake.set_with_ttl(&key("10.10.42.0/24"), &ours().to_json(), TTL);
    let reused = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(reused.subnet, net("10.10.42.0/24"));
    assert!(!reused.created);
    // A key that holds another node's record by now is not ours to delete.
    fake.set_with_ttl(&reused.key, &attrs("198.18.0.2", 2).to_json(), TTL);
    m.release_lease(&reused).await.unwrap();
    assert!(fake.value(&reused.key).is_some());
}

#[tokio::test(start_paused = true)]
async fn own_lease_is_reused_and_rewritten() {
    let fake = FakeRegistry::new();
    // Written by our previous run, with an older VtepMAC.
    let old = fake.set_with_ttl(&key("10.10.42.0/24"), &attrs(OUR_IP, 9).to_json(), TTL);
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    tokio::time::advance(Duration::from_secs(50)).await;

    let lease = manager(&fake)
        .acquire_lease(&default_config(), &ours(), Some(net("10.10.7.0/24")))
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.42.0/24"));
    assert_ne!(lease.lease_id, Some(old));
    assert_eq!(fake.calls(FakeOp::Create), 0);
    assert_eq!(fake.value(&lease.key).unwrap(), ours().to_json());
    // A fresh TTL, on the new etcd lease.
    assert_eq!(fake.entry(&lease.key).unwrap().lease, lease.lease_id);
    assert_eq!(fake.expiry(&lease.key), Some(Instant::now() + TTL));
    assert_eq!(fake.keys(&format!("{PREFIX}/subnets/")).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn own_lease_outside_the_config_is_deleted() {
    let fake = FakeRegistry::new();
    // From before the network shrank to SubnetMax 10.10.3.0.
    fake.set_with_ttl(&key("10.10.200.0/24"), &ours().to_json(), TTL);
    let lease = manager(&fake)
        .acquire_lease(&tiny_config(3), &ours(), None)
        .await
        .unwrap();
    assert!(tiny_config(3).fits(lease.subnet));
    assert_eq!(fake.value(&key("10.10.200.0/24")), None);
    assert_eq!(fake.calls(FakeOp::Delete), 1);
}

#[tokio::test(start_paused = true)]
async fn own_lease_of_a_different_length_is_deleted() {
    let fake = FakeRegistry::new();
    fake.set_with_ttl(&key("10.10.4.0/23"), &ours().to_json(), TTL);
    let lease = manager(&fake)
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(lease.subnet.prefix_len(), 24);
    assert_eq!(fake.value(&key("10.10.4.0/23")), None);
}

#[tokio::test(start_paused = true)]
async fn subnet_file_subnet_is_used_when_free() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let lease = manager(&fake)
        .acquire_lease(&default_config(), &ours(), Some(net("10.10.77.0/24")))
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.77.0/24"));
    assert_eq!(fake.value(&key("10.10.77.0/24")).unwrap(), ours().to_json());
}

#[tokio::test(start_paused = true)]
async fn subnet_file_subnet_is_ignored_when_taken_or_unfit() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let m = manager(&fake);
    let config = tiny_config(3);
    // Taken by a peer.
    let lease = m
        .acquire_lease(&config, &ours(), Some(net("10.10.1.0/24")))
        .await
        .unwrap();
    assert!(lease.subnet == net("10.10.2.0/24") || lease.subnet == net("10.10.3.0/24"));
    assert_eq!(
        fake.value(&key("10.10.1.0/24")).unwrap(),
        attrs("198.18.0.2", 2).to_json()
    );

    // Outside SubnetMin..SubnetMax, or of the wrong length.
    for previous in ["10.10.9.0/24", "10.10.2.0/25"] {
        let fake = FakeRegistry::new();
        let lease = manager(&fake)
            .acquire_lease(&config, &ours(), Some(net(previous)))
            .await
            .unwrap();
        assert!(config.fits(lease.subnet), "{previous}: {}", lease.subnet);
    }
}

#[tokio::test(start_paused = true)]
async fn reservations_are_never_taken_or_touched() {
    let fake = FakeRegistry::new();
    let reserved = attrs("198.18.0.9", 9).to_json();
    fake.set(&key("10.10.1.0/24"), &reserved);
    let config = tiny_config(2);
    for _ in 0..20 {
        let other = FakeRegistry::new();
        other.set(&key("10.10.1.0/24"), &reserved);
        // Even when the subnet file asks for it.
        let lease = manager(&other)
            .acquire_lease(&config, &ours(), Some(net("10.10.1.0/24")))
            .await
            .unwrap();
        assert_eq!(lease.subnet, net("10.10.2.0/24"));
        let kv = other.entry(&key("10.10.1.0/24")).unwrap();
        assert_eq!(kv.lease, None);
        assert_eq!(String::from_utf8(kv.value).unwrap(), reserved);
        assert_eq!(kv.version, 1);
    }
    // And once everything else is gone, we are out of subnets rather than taking it.
    add_peer(&fake, "10.10.2.0/24", "198.18.0.2", 2);
    let err = manager(&fake)
        .acquire_lease(&config, &ours(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::OutOfSubnets(_)), "{err:?}");
    assert_eq!(fake.entry(&key("10.10.1.0/24")).unwrap().version, 1);
}

#[tokio::test(start_paused = true)]
async fn reservation_with_our_ip_is_ours_and_stays_a_reservation() {
    let fake = FakeRegistry::new();
    // An administrator reserved 10.10.5.0 for us, before our VtepMAC was known.
    fake.set(
        &key("10.10.5.0/24"),
        r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
    );
    let m = manager(&fake);
    let lease = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.5.0/24"));
    assert!(lease.is_reservation());
    assert_eq!(lease.expiration, None);
    let kv = fake.entry(&lease.key).unwrap();
    assert_eq!(kv.lease, None);
    assert_eq!(String::from_utf8(kv.value).unwrap(), ours().to_json());
    assert_eq!(fake.calls(FakeOp::Create), 0);

    // Already up to date: not written again.
    let again = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(again.subnet, lease.subnet);
    assert_eq!(fake.calls(FakeOp::Put), 1);
    // A reservation is never renewed.
    assert_eq!(m.renew_lease(&again).await.unwrap(), again);
    assert_eq!(fake.calls(FakeOp::Renew), 0);
}

#[tokio::test(start_paused = true)]
async fn reservation_with_our_ip_outside_the_config_is_left_alone() {
    let fake = FakeRegistry::new();
    fake.set(&key("10.10.200.0/24"), &ours().to_json());
    let lease = manager(&fake)
        .acquire_lease(&tiny_config(3), &ours(), None)
        .await
        .unwrap();
    assert!(tiny_config(3).fits(lease.subnet));
    assert!(fake.value(&key("10.10.200.0/24")).is_some());
    assert_eq!(fake.calls(FakeOp::Delete), 0);
}

#[tokio::test(start_paused = true)]
async fn out_of_subnets() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    let err = manager(&fake)
        .acquire_lease(&tiny_config(2), &ours(), None)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "out of subnets");
}

#[tokio::test(start_paused = true)]
async fn malformed_records_still_take_their_subnet() {
    let fake = FakeRegistry::new();
    fake.set_with_ttl(&key("10.10.1.0/24"), "garbage", TTL);
    fake.set_with_ttl(&format!("{PREFIX}/subnets/not-a-subnet"), "{}", TTL);
    let lease = manager(&fake)
        .acquire_lease(&tiny_config(2), &ours(), None)
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.2.0/24"));
    assert_eq!(fake.value(&key("10.10.1.0/24")).as_deref(), Some("garbage"));
}

#[tokio::test(start_paused = true)]
async fn dual_stack_keys_take_their_ipv4_subnet() {
    let fake = FakeRegistry::new();
    fake.set_with_ttl(
        &format!("{PREFIX}/subnets/10.10.1.0-24&fd00:10:1::-64"),
        &attrs("198.18.0.2", 2).to_json(),
        TTL,
    );
    let lease = manager(&fake)
        .acquire_lease(&tiny_config(2), &ours(), None)
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.2.0/24"));
}

#[tokio::test(start_paused = true)]
async fn own_dual_stack_lease_is_renewed_under_its_own_key() {
    let fake = FakeRegistry::new();
    let stored = format!("{PREFIX}/subnets/10.10.3.0-24&fd00:10:3::-64");
    fake.set_with_ttl(&stored, &ours().to_json(), TTL);
    let m = manager(&fake);
    let lease = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(lease.key, stored);
    assert_eq!(lease.subnet, net("10.10.3.0/24"));
    let renewed = m.renew_lease(&lease).await.unwrap();
    assert_eq!(fake.entry(&stored).unwrap().lease, renewed.lease_id);
}

#[tokio::test(start_paused = true)]
async fn lost_create_races_are_retried() {
    let fake = FakeRegistry::new();
    for i in 0..3 {
        fake.steal_next_create(&attrs("198.18.0.2", i).to_json());
    }
    let lease = manager(&fake)
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    assert_eq!(fake.calls(FakeOp::Create), 4);
    assert_eq!(fake.calls(FakeOp::List), 4);
    assert_eq!(fake.value(&lease.key).unwrap(), ours().to_json());
    // Three other leases were created by the "winners", ours is the fourth.
    assert_eq!(fake.keys(&format!("{PREFIX}/subnets/")).len(), 4);
}

#[tokio::test(start_paused = true)]
async fn lost_races_give_up_after_ten_attempts() {
    let fake = FakeRegistry::new();
    for i in 0..10 {
        fake.steal_next_create(&attrs("198.18.0.2", i).to_json());
    }
    let err = manager(&fake)
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::RaceRetriesExhausted { attempts: 10 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "max retries reached trying to acquire a subnet"
    );
    assert_eq!(fake.calls(FakeOp::Create), 10);
}

#[tokio::test(start_paused = true)]
async fn a_subnet_file_race_falls_back_to_another_subnet() {
    let fake = FakeRegistry::new();
    // Someone grabs the subnet-file subnet between our listing and our create.
    fake.steal_next_create(&attrs("198.18.0.2", 2).to_json());
    let lease = manager(&fake)
        .acquire_lease(&tiny_config(2), &ours(), Some(net("10.10.1.0/24")))
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.10.2.0/24"));
}

#[tokio::test(start_paused = true)]
async fn registry_errors_are_returned() {
    let fake = FakeRegistry::new();
    fake.fail_next(FakeOp::List, 1);
    let err = manager(&fake)
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::Registry(_)), "{err:?}");
    fake.fail_next(FakeOp::Create, 1);
    assert!(
        manager(&fake)
            .acquire_lease(&default_config(), &ours(), None)
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_of_a_vanished_lease_reports_it_lost() {
    let fake = FakeRegistry::new();
    let m = manager(&fake);
    let lease = m
        .acquire_lease(&default_config(), &ours(), None)
        .await
        .unwrap();
    fake.remove(&lease.key);
    let err = m.renew_lease(&lease).await.unwrap_err();
    assert!(matches!(err, ManagerError::LeaseLost { .. }), "{err:?}");
    // Not resurrected.
    assert_eq!(fake.value(&lease.key), None);
}

// ---------------------------------------------------------------------------------------------
// Lease keeper

struct Keeper {
    rx: watch::Receiver<Lease>,
    task: JoinHandle<()>,
}

async fn start_keeper(
    fake: &FakeRegistry,
    config: NetworkConfig,
    previous: Option<Ipv4Net>,
) -> Keeper {
    let m = manager(fake);
    let lease = m.acquire_lease(&config, &ours(), previous).await.unwrap();
    let (tx, rx) = watch::channel(lease);
    let task = tokio::spawn(async move { m.run_lease_keeper(config, tx).await });
    Keeper { rx, task }
}

impl Keeper {
    fn lease(&self) -> Lease {
        self.rx.borrow().clone()
    }

    /// The next lease the keeper publishes.
    async fn changed(&mut self, within: Duration) -> Lease {
        timeout(within, self.rx.changed())
            .await
            .expect("lease update in time")
            .expect("keeper running");
        self.rx.borrow_and_update().clone()
    }
}

#[tokio::test(start_paused = true)]
async fn lease_is_renewed_at_expiry_minus_margin() {
    let fake = FakeRegistry::new();
    let start = Instant::now();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();

    let renewed = keeper.changed(TTL).await;
    assert_eq!(start.elapsed(), TTL - MARGIN);
    assert_eq!(renewed.subnet, first.subnet);
    assert_ne!(renewed.lease_id, first.lease_id);
    assert_eq!(renewed.expiration, Some(Instant::now() + TTL));
    assert_eq!(fake.entry(&first.key).unwrap().lease, renewed.lease_id);
    assert_eq!(fake.calls(FakeOp::Renew), 1);

    // And again, one TTL minus the margin later; the key outlives several TTLs.
    keeper.changed(TTL).await;
    assert_eq!(start.elapsed(), 2 * (TTL - MARGIN));
    keeper.changed(TTL).await;
    fake.expire_leases();
    assert!(start.elapsed() > 2 * TTL);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_are_retried_every_retry_period() {
    let fake = FakeRegistry::new();
    let start = Instant::now();
    let (logs, _guard) = Logs::capture();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    fake.fail_next(FakeOp::Renew, 2);

    keeper.changed(TTL).await;
    assert_eq!(start.elapsed(), TTL - MARGIN + 2 * RETRY);
    assert_eq!(fake.calls(FakeOp::Renew), 3);
    assert!(
        logs.text()
            .contains("Error renewing lease (trying again in 10s)"),
        "{}",
        logs.text()
    );
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn revoked_lease_is_acquired_again_with_the_same_subnet() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();

    // An administrator deletes our lease.
    fake.remove(&first.key);
    let again = keeper.changed(Duration::from_secs(5)).await;
    assert_eq!(again.subnet, first.subnet);
    assert_ne!(again.lease_id, first.lease_id);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    assert!(
        logs.text().contains(LEASE_REVOKED_MESSAGE),
        "{}",
        logs.text()
    );
    assert!(logs.text().contains("WARN"), "{}", logs.text());
    assert_eq!(
        LEASE_REVOKED_MESSAGE,
        "Lease has been revoked. Shutting down daemon."
    );

    // And the keeper keeps going: renewal of the new lease.
    let renewed = keeper.changed(TTL).await;
    assert_eq!(renewed.subnet, first.subnet);
    assert_eq!(fake.calls(FakeOp::Renew), 1);
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn revoked_lease_whose_subnet_was_taken_moves_elsewhere() {
    let fake = FakeRegistry::new();
    let mut keeper = start_keeper(&fake, tiny_config(2), None).await;
    let first = keeper.lease();

    // Another node takes our key over (deleted and re-created by someone else).
    fake.remove(&first.key);
    add_peer(&fake, &first.subnet.to_string(), "198.18.0.2", 2);
    let moved = keeper.changed(Duration::from_secs(5)).await;
    assert_ne!(moved.subnet, first.subnet);
    assert!(tiny_config(2).fits(moved.subnet));
    assert_eq!(
        fake.value(&first.key).unwrap(),
        attrs("198.18.0.2", 2).to_json()
    );
    keeper.task.abort();
}

/// Issue 12, item 6: a node whose key someone overwrites with another node's record keeps its
/// subnet (its pods keep their addresses) and writes its record back, with or without an etcd
/// lease on the foreign write; the log says so once per overwrite, value cut to size.
#[tokio::test(start_paused = true)]
async fn an_overwritten_lease_is_written_back_and_the_subnet_kept() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    let mut keeper = start_keeper(&fake, tiny_config(2), None).await;
    let first = keeper.lease();
    for (n, foreign) in [
        attrs("198.18.0.2", 2).to_json(),
        format!(
            r#"{{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{{"VtepMAC":"02:00:00:00:00:03"}},"Pad":"{}"}}"#,
            "x".repeat(1 << 20)
        ),
        // Our PublicIP with another VtepMAC, VNI or backend type: peers accept those on a
        // live key, so they must not stand either.
        attrs(OUR_IP, 9).to_json(),
        LeaseAttrs::vxlan(ip(OUR_IP), 7, mac(1)).to_json(),
        LeaseAttrs::host_gw(ip(OUR_IP)).to_json(),
    ]
    .iter()
    .enumerate()
    {
        if n == 0 {
            fake.set_with_ttl(&first.key, foreign, TTL);
        } else {
            fake.set(&first.key, foreign);
        }
        let restored = keeper.changed(Duration::from_secs(5)).await;
        assert_eq!(restored.subnet, first.subnet, "overwrite {n}: subnet kept");
        assert_ne!(restored.lease_id, first.lease_id, "overwrite {n}: new lease");
        let kv = fake.entry(&first.key).unwrap();
        assert_eq!(kv.value, ours().to_json().into_bytes(), "overwrite {n}");
        assert_eq!(kv.lease, restored.lease_id, "overwrite {n}: held by our lease");
    }
    let text = logs.text();
    assert_eq!(
        text.matches("our lease was overwritten").count(),
        5,
        "{text}"
    );
    assert!(!text.contains(LEASE_REVOKED_MESSAGE), "{text}");
    assert!(text.len() < 16 * 1024, "a 1 MiB value went into the log");
    assert!(
        text.contains("(1048"),
        "the value's length is given: {text}"
    );

    // The restored lease is renewed as before.
    let renewed = keeper.changed(TTL).await;
    assert_eq!(renewed.subnet, first.subnet);
    keeper.task.abort();
}

/// Two agents publishing one PublicIP (a cluster-wide `FLANNELD_PUBLIC_IP`, a typo in
/// `--public-ip`): the second reuses the first's live lease, as a restarted node would, and
/// their pods get the same addresses. Each keeper sees our very record written under an etcd
/// lease it never held and reports it; each writes it back once (so the other sees a write
/// too), not in turns forever. Once the other agent is gone, a renewal that finds the key
/// still on our lease ends the report.
#[tokio::test(start_paused = true)]
async fn another_agent_with_our_public_ip_is_reported_by_both_without_a_write_loop() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    let mut first = start_keeper(&fake, default_config(), None).await;
    let taken = first.lease();
    tokio::time::advance(Duration::from_secs(1)).await;

    let second = start_keeper(&fake, default_config(), None).await;
    assert_eq!(
        second.lease().subnet,
        taken.subnet,
        "the live lease is reused"
    );
    let second_lease = second.lease().lease_id.unwrap();

    first.changed(Duration::from_secs(5)).await;
    let revision = fake.revision();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.revision(), revision, "no write loop");
    let (a, b) = (first.lease(), second.lease());
    let holder = fake.entry(&taken.key).unwrap().lease;
    assert!(
        a.shared_with.is_some() && b.shared_with.is_some(),
        "{a:?} {b:?}"
    );
    assert!(
        holder == a.lease_id || holder == b.lease_id,
        "{holder:?} {a:?} {b:?}"
    );
    assert_eq!(fake.value(&taken.key).unwrap(), ours().to_json());
    // The second's takeover, the first's write-back and the second's: one report each.
    let text = logs.text();
    assert_eq!(
        text.matches("another agent publishes this node's PublicIP 198.18.0.1")
            .count(),
        3,
        "{text}"
    );
    assert!(
        text.contains(&format!("our lease of {}", taken.subnet)),
        "{text}"
    );
    assert!(
        text.contains(&format!("etcd lease {second_lease:x}")),
        "{text}"
    );

    // The second agent goes away: within two renewals the key is on our lease again and a
    // renewal finds it there.
    second.task.abort();
    let mut cleared = false;
    for _ in 0..3 {
        if first.changed(TTL).await.shared_with.is_none() {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "{:?}", first.lease());
    first.task.abort();
}

/// A renewal whose answer is lost wrote our record under an etcd lease the keeper never
/// learnt of: that is not another agent, and nothing is reported.
#[tokio::test(start_paused = true)]
async fn our_own_renewal_with_a_lost_answer_is_not_taken_for_another_agent() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    fake.lose_next_renewal_answers(1);
    // The renewal after the lost answer expects the old lease, finds the key on the unknown
    // one, reads it (our record) and writes it back under a lease it knows.
    let settled = keeper.changed(TTL + RETRY).await;
    assert_eq!(settled.subnet, first.subnet);
    assert_eq!(settled.shared_with, None);
    assert_eq!(fake.entry(&first.key).unwrap().lease, settled.lease_id);
    let text = logs.text();
    assert!(!text.contains("another agent publishes"), "{text}");
    assert!(text.contains("Error renewing lease"), "{text}");
    keeper.task.abort();
}

/// An overwrite that the renewal finds before any watch event (the watch is down) is written
/// back too, not taken for a loss.
#[tokio::test(start_paused = true)]
async fn an_overwrite_found_by_the_renewal_is_written_back() {
    let fake = FakeRegistry::new();
    fake.fail_next(FakeOp::Watch, 1_000_000);
    let mut keeper = start_keeper(&fake, tiny_config(2), None).await;
    let first = keeper.lease();
    fake.set(&first.key, &attrs("198.18.0.2", 2).to_json());
    let restored = keeper.changed(TTL).await;
    assert_eq!(restored.subnet, first.subnet);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    assert_eq!(fake.entry(&first.key).unwrap().lease, restored.lease_id);
    keeper.task.abort();
}

/// Issue 12, item 5: etcd restored from nothing (revisions start over, our key gone): the
/// keeper notices when its watch breaks, and takes the same subnet again.
#[tokio::test(start_paused = true)]
async fn a_store_restored_from_nothing_gets_our_lease_back() {
    let fake = FakeRegistry::new();
    // Enough history that the old revision is well above the new store's.
    for n in 0..20 {
        fake.set(&format!("{PREFIX}/other/{n}"), "x");
    }
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fake.restore_empty();
    let again = keeper.changed(Duration::from_secs(10)).await;
    assert_eq!(again.subnet, first.subnet);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    // And the new store's changes reach it: a delete is seen again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fake.remove(&first.key);
    let third = keeper.changed(Duration::from_secs(10)).await;
    assert_eq!(third.subnet, first.subnet);
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn expiry_after_failed_renewals_is_recovered() {
    let fake = FakeRegistry::new();
    let start = Instant::now();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    // Renewals fail (at 70, 80, 90, 100 s) until the key expires at 100 s; the expiry shows
    // up as a delete, and the keeper acquires the same subnet again.
    fake.fail_next(FakeOp::Renew, 100);
    let again = keeper.changed(2 * TTL).await;
    assert_eq!(start.elapsed(), TTL);
    assert_eq!(fake.calls(FakeOp::Renew), 4);
    assert_eq!(again.subnet, first.subnet);
    assert_ne!(again.lease_id, first.lease_id);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn reacquisition_retries_until_it_succeeds() {
    let fake = FakeRegistry::new();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    fake.fail_next(FakeOp::List, 2);
    let revoked_at = Instant::now();
    fake.remove(&first.key);
    let again = keeper.changed(TTL).await;
    assert_eq!(again.subnet, first.subnet);
    assert_eq!(revoked_at.elapsed(), 2 * RETRY);
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn keeper_survives_compaction_and_broken_watches() {
    let fake = FakeRegistry::new();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    tokio::time::sleep(Duration::from_secs(5)).await;

    fake.compact();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    assert!(!keeper.rx.has_changed().unwrap());
    fake.break_watches();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.watcher_count(), 1);

    // Still watching: a deletion is noticed.
    fake.remove(&first.key);
    let again = keeper.changed(Duration::from_secs(5)).await;
    assert_eq!(again.subnet, first.subnet);
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn deletion_missed_during_compaction_is_noticed() {
    let fake = FakeRegistry::new();
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    let first = keeper.lease();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The watch breaks, the key goes, history is compacted past the delete: the keeper must
    // re-read the key to find out.
    fake.break_watches();
    fake.remove(&first.key);
    fake.set(&format!("{PREFIX}/unrelated"), "x");
    fake.compact();
    let again = keeper.changed(Duration::from_secs(10)).await;
    assert_eq!(again.subnet, first.subnet);
    assert_eq!(fake.value(&first.key).unwrap(), ours().to_json());
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn reservation_is_watched_but_never_renewed() {
    let fake = FakeRegistry::new();
    fake.set(&key("10.10.5.0/24"), &ours().to_json());
    let mut keeper = start_keeper(&fake, default_config(), None).await;
    assert!(keeper.lease().is_reservation());
    tokio::time::sleep(TTL * 5).await;
    assert_eq!(fake.calls(FakeOp::Renew), 0);
    assert_eq!(fake.entry(&key("10.10.5.0/24")).unwrap().lease, None);
    // If the administrator withdraws it, we take the same subnet again, now with a TTL.
    fake.remove(&key("10.10.5.0/24"));
    let again = keeper.changed(Duration::from_secs(5)).await;
    assert_eq!(again.subnet, net("10.10.5.0/24"));
    assert!(!again.is_reservation());
    keeper.task.abort();
}

#[tokio::test(start_paused = true)]
async fn keeper_stops_when_nobody_listens() {
    let fake = FakeRegistry::new();
    let keeper = start_keeper(&fake, default_config(), None).await;
    drop(keeper.rx);
    timeout(Duration::from_secs(1), keeper.task)
        .await
        .expect("keeper stopped")
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Peer watch

const OWN_SUBNET: &str = "10.10.9.0/24";

struct Peers {
    rx: mpsc::Receiver<PeerEvent>,
    own: watch::Sender<Lease>,
    task: JoinHandle<()>,
    /// `Synced` events, set aside by `next`/`quiet` so the tests of changes read only changes.
    synced: Vec<Vec<Ipv4Net>>,
}

fn own_lease() -> Lease {
    Lease {
        key: key(OWN_SUBNET),
        subnet: net(OWN_SUBNET),
        attrs: ours(),
        lease_id: Some(1),
        expiration: None,
        revision: 0,
        created: false,
        shared_with: None,
    }
}

fn start_peers(fake: &FakeRegistry, backend_type: &str) -> Peers {
    let m = manager(fake);
    let (own, own_rx) = watch::channel(own_lease());
    let (tx, rx) = mpsc::channel(64);
    let config = config(&format!(
        r#"{{"Network": "10.10.0.0/16", "Backend": {{"Type": "{backend_type}"}}}}"#
    ));
    let task = tokio::spawn(async move { m.run_peer_watcher(config, own_rx, tx).await });
    Peers {
        rx,
        own,
        task,
        synced: Vec::new(),
    }
}

impl Peers {
    /// The next change (Added, Changed, Removed); `Synced` events are recorded on the way.
    async fn next(&mut self) -> PeerEvent {
        loop {
            let event = timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .expect("peer event in time")
                .expect("peer watcher running");
            match event {
                PeerEvent::Synced(subnets) => self.synced.push(subnets),
                change => return change,
            }
        }
    }

    async fn next_n(&mut self, n: usize) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    /// Asserts that nothing more comes within a few (paused) seconds.
    async fn quiet(&mut self) {
        while let Ok(event) = timeout(Duration::from_secs(5), self.rx.recv()).await {
            match event {
                Some(PeerEvent::Synced(subnets)) => self.synced.push(subnets),
                other => panic!("unexpected peer event {other:?}"),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn initial_listing_reports_peers_but_not_us_or_other_backends() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    fake.set(&key(OWN_SUBNET), &ours().to_json());
    fake.set_with_ttl(
        &key("10.10.3.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.4")).to_json(),
        TTL,
    );
    // A reservation of another node is a peer like any other.
    fake.set(&key("10.10.4.0/24"), &attrs("198.18.0.5", 5).to_json());
    let mut peers = start_peers(&fake, "vxlan");
    let events = peers.next_n(3).await;
    assert_eq!(
        events,
        [
            PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2)),
            PeerEvent::Added(peer("10.10.2.0/24", "198.18.0.3", 3)),
            PeerEvent::Added(peer("10.10.4.0/24", "198.18.0.5", 5)),
        ]
    );
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn host_gw_watcher_sees_host_gw_peers() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    fake.set_with_ttl(
        &key("10.10.3.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.4")).to_json(),
        TTL,
    );
    let mut peers = start_peers(&fake, "host-gw");
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(Peer {
            subnet: net("10.10.3.0/24"),
            public_ip: ip("198.18.0.4"),
            backend_type: "host-gw".to_owned(),
            vtep_mac: None,
            vni: None,
        })
    );
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn puts_and_deletes_become_peer_events() {
    let fake = FakeRegistry::new();
    let mut peers = start_peers(&fake, "vxlan");
    peers.quiet().await;

    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    // A renewal rewrites the same record: nothing to report.
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    peers.quiet().await;
    // A restart with a new VtepMAC.
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 7);
    assert_eq!(
        peers.next().await,
        PeerEvent::Changed(peer("10.10.1.0/24", "198.18.0.2", 7))
    );
    fake.remove(&key("10.10.1.0/24"));
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    // Our own key and unknown deletes say nothing.
    fake.set(&key(OWN_SUBNET), &ours().to_json());
    fake.remove(&key(OWN_SUBNET));
    fake.remove(&key("10.10.1.0/24"));
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn expiry_removes_a_peer() {
    let fake = FakeRegistry::new();
    fake.set_with_ttl(&key("10.10.1.0/24"), &attrs("198.18.0.2", 2).to_json(), TTL);
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    tokio::time::sleep(TTL).await;
    fake.expire_leases();
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn malformed_records_are_logged_and_ignored() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    fake.set_with_ttl(&key("10.10.5.0/24"), "{not json", TTL);
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    peers.quiet().await;
    let text = logs.text();
    assert!(
        text.contains("10.10.5.0-24") && text.contains("{not json"),
        "{text}"
    );

    // A known peer's record turns bad: the last good one stays, nothing is removed.
    fake.set_with_ttl(
        &key("10.10.1.0/24"),
        r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
        TTL,
    );
    peers.quiet().await;
    assert!(
        logs.text().contains("keeping the last good record"),
        "{}",
        logs.text()
    );
    // When it is fixed with the same content, still nothing; with new content, Changed.
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    peers.quiet().await;
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 3);
    assert_eq!(
        peers.next().await,
        PeerEvent::Changed(peer("10.10.1.0/24", "198.18.0.2", 3))
    );
    // Keys that are not subnets are ignored too.
    fake.set(
        &format!("{PREFIX}/subnets/bogus"),
        &attrs("198.18.0.8", 8).to_json(),
    );
    peers.quiet().await;
    assert!(logs.text().contains("bogus"), "{}", logs.text());
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn every_listing_ends_with_synced_naming_all_current_peers() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    fake.set(&key(OWN_SUBNET), &ours().to_json());
    let mut peers = start_peers(&fake, "vxlan");
    peers.next_n(2).await;
    peers.quiet().await;
    assert_eq!(
        peers.synced,
        [vec![net("10.10.1.0/24"), net("10.10.2.0/24")]]
    );
    // After compaction the re-listing is followed by a Synced of its own.
    fake.remove(&key("10.10.1.0/24"));
    fake.compact();
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    peers.quiet().await;
    assert_eq!(peers.synced.last(), Some(&vec![net("10.10.2.0/24")]));
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_second_key_for_a_live_subnet_neither_replaces_nor_removes_it() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    let hijack = attrs("198.18.0.66", 66).to_json();
    let twin = format!("{PREFIX}/subnets/10.10.1.0-24&fd00:10:1::-64");
    let nested = format!("{PREFIX}/subnets/x/10.10.1.0-24");
    fake.set_with_ttl(&twin, &hijack, TTL * 10);
    fake.set_with_ttl(&nested, &hijack, TTL * 10);
    peers.quiet().await;
    let text = logs.text();
    assert!(
        text.contains("second key for subnet 10.10.1.0/24") && text.contains("&fd00:10:1::-64"),
        "{text}"
    );
    assert!(
        text.contains("x/10.10.1.0-24") && text.contains("not directly under"),
        "{text}"
    );
    // Their deletes leave the peer alone.
    fake.remove(&twin);
    fake.remove(&nested);
    peers.quiet().await;

    // A listing (after compaction) keeps the holder and the second key's place.
    fake.set_with_ttl(&twin, &hijack, TTL * 10);
    peers.quiet().await;
    fake.break_watches();
    fake.compact();
    peers.quiet().await;
    assert_eq!(
        peers.synced.last(),
        Some(&vec![net("10.10.1.0/24")]),
        "the relisting ran"
    );

    // When the holder's key goes, the other key takes the free subnet over.
    fake.remove(&key("10.10.1.0/24"));
    assert_eq!(
        peers.next().await,
        PeerEvent::Changed(peer("10.10.1.0/24", "198.18.0.66", 66))
    );
    fake.remove(&twin);
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    peers.quiet().await;
    peers.task.abort();
}

/// The holder's key deleted and created again while the watch is down is a new key: the
/// listing after compaction gives the subnet to the older second key, as the watch would have
/// (the delete promotes it, the new key comes second).
#[tokio::test(start_paused = true)]
async fn a_holder_key_created_again_unseen_is_a_new_key_in_the_listing() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let twin = format!("{PREFIX}/subnets/10.10.1.0-24&fd00:10:1::-64");
    fake.set_with_ttl(&twin, &attrs("198.18.0.66", 66).to_json(), TTL * 10);
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    peers.quiet().await;
    fake.break_watches();
    fake.remove(&key("10.10.1.0/24"));
    add_peer(&fake, "10.10.1.0/24", "198.18.0.3", 3);
    fake.compact();
    assert_eq!(
        peers.next().await,
        PeerEvent::Changed(peer("10.10.1.0/24", "198.18.0.66", 66))
    );
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn in_a_listing_the_oldest_key_holds_a_subnet() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    // The twin sorts after the real key but was written first.
    let twin = format!("{PREFIX}/subnets/10.10.1.0-24&fd00:10:1::-64");
    fake.set_with_ttl(&twin, &attrs("198.18.0.2", 2).to_json(), TTL * 10);
    fake.set_with_ttl(
        &key("10.10.1.0/24"),
        &attrs("198.18.0.66", 66).to_json(),
        TTL * 10,
    );
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    peers.quiet().await;
    assert!(
        logs.text().contains("second key for subnet 10.10.1.0/24"),
        "{}",
        logs.text()
    );
    // A put of the newer key changes nothing.
    fake.set_with_ttl(
        &key("10.10.1.0/24"),
        &attrs("198.18.0.67", 67).to_json(),
        TTL * 10,
    );
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_peer_switching_backend_is_removed() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    fake.set_with_ttl(
        &key("10.10.1.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.2")).to_json(),
        TTL,
    );
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn compaction_relists_and_reports_the_difference() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    add_peer(&fake, "10.10.3.0/24", "198.18.0.4", 4);
    add_peer(&fake, "10.10.4.0/24", "198.18.0.5", 5);
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(peers.next_n(4).await.len(), 4);
    peers.quiet().await;
    let lists = fake.calls(FakeOp::List);

    // The watch is cut; while it is down things change and history is compacted away.
    fake.break_watches();
    fake.remove(&key("10.10.1.0/24"));
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 33);
    add_peer(&fake, "10.10.5.0/24", "198.18.0.6", 6);
    // 10.10.3.0 turns malformed: the last good record is kept, not removed.
    fake.set_with_ttl(&key("10.10.3.0/24"), "oops", TTL);
    fake.compact();

    let mut events = peers.next_n(3).await;
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        [
            PeerEvent::Added(peer("10.10.5.0/24", "198.18.0.6", 6)),
            PeerEvent::Changed(peer("10.10.2.0/24", "198.18.0.3", 33)),
            PeerEvent::Removed(net("10.10.1.0/24")),
        ]
    );
    peers.quiet().await;
    assert_eq!(fake.calls(FakeOp::List), lists + 1);

    // And the new watch works.
    fake.remove(&key("10.10.4.0/24"));
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.4.0/24")));
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn compaction_of_a_live_watch_relists_without_duplicates() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    fake.compact();
    peers.quiet().await;
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.2.0/24", "198.18.0.3", 3))
    );
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn broken_watch_resumes_without_losing_events() {
    let fake = FakeRegistry::new();
    let mut peers = start_peers(&fake, "vxlan");
    peers.quiet().await;
    fake.break_watches();
    // Changes while the watch is down are replayed from history on the new watch.
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.1.0/24", "198.18.0.2", 2))
    );
    assert_eq!(fake.calls(FakeOp::List), 1);
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn registry_errors_are_retried() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    fake.fail_next(FakeOp::List, 2);
    fake.fail_next(FakeOp::Watch, 2);
    let start = Instant::now();
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    add_peer(&fake, "10.10.2.0/24", "198.18.0.3", 3);
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    assert_eq!(fake.calls(FakeOp::Watch), 3);
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn our_new_subnet_is_never_a_peer() {
    let fake = FakeRegistry::new();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));
    // We were re-assigned a subnet a peer record still claims (stale): drop that peer.
    peers.own.send_replace(Lease {
        key: key("10.10.1.0/24"),
        subnet: net("10.10.1.0/24"),
        ..own_lease()
    });
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    fake.set_with_ttl(&key("10.10.1.0/24"), &ours().to_json(), TTL);
    // And our old subnet, taken by someone else, becomes a peer.
    add_peer(&fake, OWN_SUBNET, "198.18.0.7", 7);
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer(OWN_SUBNET, "198.18.0.7", 7))
    );
    peers.quiet().await;
    peers.task.abort();
}

#[tokio::test(start_paused = true)]
async fn peer_watcher_stops_when_nobody_listens() {
    let fake = FakeRegistry::new();
    let peers = start_peers(&fake, "vxlan");
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(peers.rx);
    timeout(Duration::from_secs(1), peers.task)
        .await
        .expect("peer watcher stopped")
        .unwrap();
    // It keeps working without the lease keeper too (own sender dropped).
    let Peers {
        mut rx, own, task, ..
    } = start_peers(&fake, "vxlan");
    drop(own);
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let event = timeout(Duration::from_secs(30), rx.recv()).await.unwrap();
    assert!(matches!(event, Some(PeerEvent::Added(_))), "{event:?}");
    task.abort();
}

/// Issue 12, item 5: etcd restored from nothing while the watch was down: the watcher sees
/// the revision went back, lists again (the peers are gone until they write again) and
/// follows the new store, instead of waiting at its old revision for history that never comes.
#[tokio::test(start_paused = true)]
async fn a_store_restored_from_nothing_is_listed_again_and_followed() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    for n in 0..20 {
        add_peer(&fake, &format!("10.10.{}.0/24", 100 + n), "198.18.0.2", 2);
    }
    add_peer(&fake, "10.10.1.0/24", "198.18.0.3", 3);
    let mut peers = start_peers(&fake, "vxlan");
    assert_eq!(peers.next_n(21).await.len(), 21);
    peers.quiet().await;

    fake.restore_empty();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.3", 3);
    let mut events = peers.next_n(20).await;
    events.sort_by_key(|e| format!("{e:?}"));
    assert!(
        events.iter().all(|e| matches!(e, PeerEvent::Removed(_))),
        "{events:?}"
    );
    peers.quiet().await;
    assert_eq!(peers.synced.last().map(Vec::len), Some(1));
    assert!(
        logs.text().contains("etcd's revision went back"),
        "{}",
        logs.text()
    );
    // A node that joins the new store is seen.
    add_peer(&fake, "10.10.2.0/24", "198.18.0.4", 4);
    assert_eq!(
        peers.next().await,
        PeerEvent::Added(peer("10.10.2.0/24", "198.18.0.4", 4))
    );
    peers.task.abort();
}

/// Issue 12, item 6: records this network cannot route are refused with one warning naming
/// the key and the reason, and never reach the data path; an overwrite of a live node's lease
/// with another PublicIP keeps the last good record; another backend type is skipped with a
/// warning too. Values go into the log cut to size.
#[tokio::test(start_paused = true)]
async fn conflicting_records_are_refused_once_with_their_key_and_reason() {
    let fake = FakeRegistry::new();
    let (logs, _guard) = Logs::capture();
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    let mut peers = start_peers(&fake, "vxlan");
    assert!(matches!(peers.next().await, PeerEvent::Added(_)));

    let refused = [
        ("10.11.5.0/24", "outside the network 10.10.0.0/16"),
        ("10.10.1.128/25", "is not a /24"),
        ("10.10.1.7/32", "is not a /24"),
        ("10.10.0.0/20", "is not a /24"),
    ];
    for (subnet, _) in refused {
        add_peer(&fake, subnet, "198.18.0.66", 66);
    }
    // A live node's lease overwritten with another PublicIP (no etcd lease, as etcdctl put).
    fake.set(&key("10.10.1.0/24"), &attrs("198.18.0.66", 66).to_json());
    // A node of another backend; a record with a PublicIP nobody lives at; a huge value.
    fake.set_with_ttl(
        &key("10.10.7.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.7")).to_json(),
        TTL,
    );
    add_peer(&fake, "10.10.8.0/24", "0.0.0.0", 8);
    // Our own PublicIP under another subnet (a cloned machine, or a stale lease of ours).
    add_peer(&fake, "10.10.12.0/24", &ours().public_ip.to_string(), 12);
    // A PublicIP inside the network (a node whose --iface is a pod bridge).
    add_peer(&fake, "10.10.13.0/24", "10.10.13.1", 13);
    let huge = format!(
        r#"{{"PublicIP":"198.18.0.9","BackendType":"vxlan","BackendData":{{}},"x":"{}"}}"#,
        "y".repeat(1 << 20)
    );
    fake.set(&key("10.10.19.0/24"), &huge);
    peers.quiet().await;

    // The same records renewed, and listed again after compaction: no new warnings.
    for (subnet, _) in refused {
        add_peer(&fake, subnet, "198.18.0.66", 66);
    }
    fake.compact();
    peers.quiet().await;

    let text = logs.text();
    for (subnet, reason) in refused {
        let key = key(subnet);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&key)).collect();
        assert_eq!(lines.len(), 1, "{subnet}: one warning: {lines:?}");
        assert!(
            lines[0].contains("WARN") && lines[0].contains(reason),
            "{subnet}: {}",
            lines[0]
        );
    }
    let one = |needle: &str| {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        assert_eq!(lines.len(), 1, "{needle}: {lines:?}");
        lines[0].to_owned()
    };
    let overwrite = one("overwrites the live lease of 198.18.0.2 with PublicIP 198.18.0.66");
    assert!(
        overwrite.contains(&key("10.10.1.0/24"))
            && overwrite.contains("keeping the last good record"),
        "{overwrite}"
    );
    let other = one("backend type \"host-gw\"");
    assert!(other.contains(&key("10.10.7.0/24")), "{other}");
    assert!(one("PublicIP 0.0.0.0 is not a unicast address").contains(&key("10.10.8.0/24")));
    let own = format!("PublicIP {} is this node's own", ours().public_ip);
    assert!(one(&own).contains(&key("10.10.12.0/24")));
    assert!(
        one("PublicIP 10.10.13.1 is inside the network 10.10.0.0/16")
            .contains(&key("10.10.13.0/24"))
    );
    assert!(
        one("no BackendData.VtepMAC").contains("bytes)"),
        "the huge value is cut"
    );
    assert!(text.len() < 32 * 1024, "a 1 MiB value went into the log");

    // The holder restores its record: nothing changed for the data path all along.
    add_peer(&fake, "10.10.1.0/24", "198.18.0.2", 2);
    peers.quiet().await;
    // Overwritten again with another PublicIP, now claiming another backend type: refused
    // too, not skipped (which would remove the live node).
    fake.set(
        &key("10.10.1.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.67")).to_json(),
    );
    peers.quiet().await;
    assert!(
        logs.text()
            .contains("overwrites the live lease of 198.18.0.2 with PublicIP 198.18.0.67"),
        "{}",
        logs.text()
    );
    // A node that switches backend keeps its PublicIP: that is taken (the peer goes).
    fake.set(
        &key("10.10.1.0/24"),
        &LeaseAttrs::host_gw(ip("198.18.0.2")).to_json(),
    );
    assert_eq!(peers.next().await, PeerEvent::Removed(net("10.10.1.0/24")));
    peers.task.abort();
}

// The registry contract (`super::contract`) against the fake; `tests/etcd_registry.rs` runs the
// same checks against a real etcd.

#[tokio::test]
async fn fake_keeps_the_contract_create_only_if_version_is_zero() {
    super::contract::create_only_if_version_is_zero(&FakeRegistry::new(), PREFIX).await;
}

#[tokio::test]
async fn fake_keeps_the_contract_list_returns_the_revision_to_watch_from() {
    super::contract::list_returns_the_revision_to_watch_from(&FakeRegistry::new(), PREFIX).await;
}

#[tokio::test]
async fn fake_keeps_the_contract_watch_reports_puts_and_deletes_under_the_prefix() {
    super::contract::watch_reports_puts_and_deletes_under_the_prefix(&FakeRegistry::new(), PREFIX)
        .await;
}

#[tokio::test]
async fn fake_keeps_the_contract_renewal_moves_the_key_to_a_new_lease_only_while_it_is_ours() {
    super::contract::renewal_moves_the_key_to_a_new_lease_only_while_it_is_ours(
        &FakeRegistry::new(),
        PREFIX,
    )
    .await;
}
