//! The contract of [`Registry`]: what lease management relies on from etcd, written once and
//! run against both implementations (the fake in the unit tests, `EtcdRegistry` against a real
//! etcd in `tests/etcd_registry.rs`), so the fake cannot drift from etcd's semantics.
//!
//! Each check starts from an empty store under `prefix_root` and panics on a difference.

use std::time::Duration;

use tokio::time::timeout;

use super::{
    lease::{LeaseAttrs, Mac},
    registry::{CreateOutcome, Registry, RenewOutcome, WatchEvent, Watcher},
};

/// The next watch event, within 15 s (a hung watch fails the check).
pub async fn next(watcher: &mut impl Watcher) -> Option<WatchEvent> {
    timeout(Duration::from_secs(15), watcher.next())
        .await
        .expect("watch event within 15 s")
        .expect("watch works")
}

/// A vxlan lease record for `ip` with a VtepMAC ending in `mac_last`.
pub fn record(ip: &str, mac_last: u8) -> String {
    LeaseAttrs::vxlan(ip.parse().unwrap(), 1, Mac([2, 0, 0, 0, 0, mac_last])).to_json()
}

/// See the module comment.
pub async fn create_only_if_version_is_zero(registry: &impl Registry, prefix_root: &str) {
    let key = format!("{prefix_root}/subnets/10.10.1.0-24");
    let ttl = Duration::from_secs(60);

    let CreateOutcome::Created(granted) = registry
        .create(&key, &record("198.18.0.1", 1), ttl)
        .await
        .unwrap()
    else {
        panic!("first create failed");
    };
    assert_eq!(granted.ttl, ttl);
    assert!(granted.revision > 0);
    assert_eq!(
        registry
            .create(&key, &record("198.18.0.2", 2), ttl)
            .await
            .unwrap(),
        CreateOutcome::AlreadyExists
    );

    let fetched = registry.get(&key).await.unwrap();
    let kv = fetched.kv.expect("key exists");
    assert_eq!(kv.value, record("198.18.0.1", 1).into_bytes());
    assert_eq!(kv.lease, Some(granted.lease));
    assert_eq!(kv.version, 1);
    assert_eq!(kv.mod_revision, granted.revision);

    // A reservation: no lease.
    let reserved = format!("{prefix_root}/subnets/10.10.2.0-24");
    let revision = registry
        .put(&reserved, &record("198.18.0.3", 3))
        .await
        .unwrap();
    let kv = registry.get(&reserved).await.unwrap().kv.unwrap();
    assert_eq!(kv.lease, None);
    assert_eq!(kv.mod_revision, revision);
    assert_eq!(
        registry.create(&reserved, "x", ttl).await.unwrap(),
        CreateOutcome::AlreadyExists
    );

    assert!(registry.delete(&key).await.unwrap());
    assert!(!registry.delete(&key).await.unwrap());
    assert!(registry.get(&key).await.unwrap().kv.is_none());
    // Deleted keys have version 0 again.
    assert!(matches!(
        registry.create(&key, "again", ttl).await.unwrap(),
        CreateOutcome::Created(_)
    ));
}

/// See the module comment.
pub async fn list_returns_the_revision_to_watch_from(registry: &impl Registry, prefix_root: &str) {
    let prefix = format!("{prefix_root}/subnets/");
    for i in 1..=3 {
        registry
            .put(&format!("{prefix}10.10.{i}.0-24"), &record("198.18.0.1", i))
            .await
            .unwrap();
    }
    registry
        .put(&format!("{prefix_root}/config"), "{}")
        .await
        .unwrap();
    let listing = registry.list(&prefix).await.unwrap();
    assert_eq!(listing.kvs.len(), 3);
    assert!(listing.kvs.iter().all(|kv| kv.key.starts_with(&prefix)));
    assert!(
        listing
            .kvs
            .iter()
            .all(|kv| kv.mod_revision <= listing.revision)
    );
    assert_eq!(listing.kvs[0].key, format!("{prefix}10.10.1.0-24"));

    // Watching from revision + 1 sees what follows the listing, and nothing before it.
    let mut watcher = registry.watch(&prefix, listing.revision + 1).await.unwrap();
    registry
        .put(&format!("{prefix}10.10.4.0-24"), &record("198.18.0.4", 4))
        .await
        .unwrap();
    match next(&mut watcher).await {
        Some(WatchEvent::Put(kv)) => assert_eq!(kv.key, format!("{prefix}10.10.4.0-24")),
        other => panic!("unexpected {other:?}"),
    }
}

/// See the module comment.
pub async fn watch_reports_puts_and_deletes_under_the_prefix(
    registry: &impl Registry,
    prefix_root: &str,
) {
    let prefix = format!("{prefix_root}/subnets/");
    let start = registry.list(&prefix).await.unwrap().revision + 1;
    let mut watcher = registry.watch(&prefix, start).await.unwrap();

    let key = format!("{prefix}10.10.7.0-24");
    let CreateOutcome::Created(granted) = registry
        .create(&key, &record("198.18.0.7", 7), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("create failed");
    };
    registry
        .put(&format!("{prefix_root}/elsewhere"), "x")
        .await
        .unwrap();
    registry.delete(&key).await.unwrap();

    match next(&mut watcher).await {
        Some(WatchEvent::Put(kv)) => {
            assert_eq!(kv.key, key);
            assert_eq!(kv.value, record("198.18.0.7", 7).into_bytes());
            assert_eq!(kv.lease, Some(granted.lease));
            assert_eq!(kv.mod_revision, granted.revision);
        }
        other => panic!("unexpected {other:?}"),
    }
    match next(&mut watcher).await {
        Some(WatchEvent::Delete {
            key: deleted,
            revision,
        }) => {
            assert_eq!(deleted, key);
            // The unrelated put came in between.
            assert_eq!(revision, granted.revision + 2);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// See the module comment.
pub async fn renewal_moves_the_key_to_a_new_lease_only_while_it_is_ours(
    registry: &impl Registry,
    prefix_root: &str,
) {
    let key = format!("{prefix_root}/subnets/10.10.9.0-24");
    let ttl = Duration::from_secs(60);
    let CreateOutcome::Created(first) = registry
        .create(&key, &record("198.18.0.9", 9), ttl)
        .await
        .unwrap()
    else {
        panic!("create failed");
    };
    let RenewOutcome::Renewed(second) = registry
        .renew(&key, &record("198.18.0.9", 10), ttl, Some(first.lease))
        .await
        .unwrap()
    else {
        panic!("renewal refused");
    };
    assert_ne!(second.lease, first.lease);
    let kv = registry.get(&key).await.unwrap().kv.unwrap();
    assert_eq!(kv.lease, Some(second.lease));
    assert_eq!(kv.value, record("198.18.0.9", 10).into_bytes());

    // With the old lease id: refused.
    assert_eq!(
        registry
            .renew(&key, "x", ttl, Some(first.lease))
            .await
            .unwrap(),
        RenewOutcome::Lost
    );
    // Deleted: refused, and not resurrected.
    registry.delete(&key).await.unwrap();
    assert_eq!(
        registry
            .renew(&key, "x", ttl, Some(second.lease))
            .await
            .unwrap(),
        RenewOutcome::Lost
    );
    assert!(registry.get(&key).await.unwrap().kv.is_none());
    // Unconditional, as flannel's updateSubnet.
    assert!(matches!(
        registry.renew(&key, "y", ttl, None).await.unwrap(),
        RenewOutcome::Renewed(_)
    ));
}
