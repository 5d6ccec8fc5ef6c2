//! The replicated store on a real three-member etcd cluster (Debian's etcd-server): what the
//! etcd operator can read, the lease lock and its fenced writes, a member down, a wrong endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{sync::Arc, time::Duration};

use dstack_mesh::acme::{
    etcd::{EtcdError, EtcdSettings, EtcdStore},
    seal::{Kind, Sealer},
};
use e2e::etcd::EtcdCluster;

const SECRET: &[u8] = b"app A's sealing secret (GetKey at dstack-mesh/store-seal/v1)";
const KEY_PEM: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
const CHAIN_PEM: &[u8] =
    b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";

fn settings(endpoints: Vec<String>) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        prefix: "/dstack-mesh/a1a1".into(),
        ca_file: None,
        cert_file: None,
        key_file: None,
        // Room for a leader election when a test kills the leader.
        timeout: Duration::from_secs(10),
    }
}

async fn store(cluster: &EtcdCluster, secret: &[u8]) -> EtcdStore {
    EtcdStore::connect(
        settings(cluster.endpoints()),
        Arc::new(Sealer::from_secret(secret)),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_etcd_operator_sees_no_key_no_certificate_and_no_domain_and_cannot_change_one() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(dir.path(), 3);
    let store = store(&cluster, SECRET).await;
    let lock = store
        .lock("shop.test", Duration::from_secs(5))
        .await
        .unwrap();
    store
        .put_fenced(&lock, Kind::PrivateKey, "certs/shop.test/key.pem", KEY_PEM)
        .await
        .unwrap();
    store
        .put_fenced(
            &lock,
            Kind::Certificate,
            "certs/shop.test/chain.pem",
            CHAIN_PEM,
        )
        .await
        .unwrap();

    // What etcdctl shows: keys and values, none of them readable.
    let dump = cluster.etcdctl(&["get", "--prefix", "/dstack-mesh/"]);
    assert!(dump.status.success(), "{dump:?}");
    assert!(!dump.stdout.is_empty());
    let text = String::from_utf8_lossy(&dump.stdout);
    for secret in ["BEGIN", "PRIVATE", "shop", "MIGHAgEA", "MIIBszCC"] {
        assert!(!text.contains(secret), "{secret} readable in etcd:\n{text}");
    }
    // And what is stored opens again for the app.
    assert_eq!(
        store
            .get(Kind::PrivateKey, "certs/shop.test/key.pem")
            .await
            .unwrap()
            .as_deref(),
        Some(KEY_PEM)
    );

    // A flipped byte, another app's value copied in, and a value moved from another name: each
    // refused, never returned.
    let key = store.key(Kind::Certificate, "certs/shop.test/chain.pem");
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let sealed = raw.get(key.clone(), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    let mut flipped = sealed.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let other_app = Sealer::from_secret(b"app B's secret")
        .seal(Kind::Certificate, "certs/shop.test/chain.pem", CHAIN_PEM)
        .unwrap();
    let moved = raw
        .get(store.key(Kind::PrivateKey, "certs/shop.test/key.pem"), None)
        .await
        .unwrap()
        .kvs()[0]
        .value()
        .to_vec();
    for bad in [flipped, other_app, moved] {
        raw.put(key.clone(), bad, None).await.unwrap();
        let got = store
            .get(Kind::Certificate, "certs/shop.test/chain.pem")
            .await;
        assert!(matches!(got, Err(EtcdError::Sealed { .. })), "{got:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_holder_at_a_time_and_a_holder_that_lost_its_lease_cannot_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(dir.path(), 3);
    let (a, b) = (store(&cluster, SECRET).await, store(&cluster, SECRET).await);
    let ttl = Duration::from_secs(3);
    let held = a.lock("shop.test", ttl).await.unwrap();
    a.put_fenced(&held, Kind::Order, "order/shop.test", b"a's order")
        .await
        .unwrap();

    // B waits for the lock; while A holds it, the lock key still carries A's lease.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("shop.test", ttl).await })
    };
    let lock_key = a.key(Kind::Lock, "shop.test");
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    assert_eq!(
        raw.get(lock_key.clone(), None).await.unwrap().kvs()[0].lease(),
        held.lease()
    );
    assert!(!waiter.is_finished());

    // A is paused long enough to lose its lease (revoked here, as expiry would): B gets the
    // lock, and A's late write is refused while B's lands.
    raw.lease_revoke(held.lease()).await.unwrap();
    let b_lock = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("B gets the lock once A's lease is gone")
        .unwrap()
        .unwrap();
    assert_ne!(b_lock.lease(), held.lease());
    let late = a
        .put_fenced(&held, Kind::Order, "order/shop.test", b"a's stale result")
        .await;
    assert!(matches!(late, Err(EtcdError::LostLock(_))), "{late:?}");
    b.put_fenced(&b_lock, Kind::Order, "order/shop.test", b"b's result")
        .await
        .unwrap();
    assert_eq!(
        a.get(Kind::Order, "order/shop.test")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"b's result"[..])
    );

    // Released: the next taker gets it at once.
    b.release(b_lock).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), a.lock("shop.test", ttl))
        .await
        .expect("a released lock is free")
        .unwrap();
    a.release(again).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_member_down_changes_nothing_for_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(dir.path(), 3);
    let store = store(&cluster, SECRET).await;
    cluster.stop_member(0);
    let lock = store
        .lock("shop.test", Duration::from_secs(5))
        .await
        .unwrap();
    store
        .put_fenced(
            &lock,
            Kind::Certificate,
            "certs/shop.test/chain.pem",
            CHAIN_PEM,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .get(Kind::Certificate, "certs/shop.test/chain.pem")
            .await
            .unwrap()
            .as_deref(),
        Some(CHAIN_PEM)
    );
    // Back again, it catches up and serves the same value.
    cluster.start_member(0);
    cluster.wait_healthy(&[0]);
    let only_m0 = EtcdStore::connect(
        settings(vec![cluster.endpoints()[0].clone()]),
        Arc::new(Sealer::from_secret(SECRET)),
    )
    .await
    .unwrap();
    let mut seen = None;
    e2e::wait_until("m0 to catch up", Duration::from_secs(20), || {
        seen = futures_lite_block(only_m0.get(Kind::Certificate, "certs/shop.test/chain.pem"));
        seen.is_some()
    });
    assert_eq!(seen.as_deref(), Some(CHAIN_PEM));
}

/// A store call from a synchronous wait loop (`wait_until` takes a plain closure).
fn futures_lite_block(
    call: impl std::future::Future<Output = Result<Option<Vec<u8>>, EtcdError>>,
) -> Option<Vec<u8>> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(call))
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_wrong_endpoint_is_a_clear_error_naming_it() {
    let nobody = format!("http://127.0.0.1:{}", e2e::free_port());
    let err = EtcdStore::connect(
        EtcdSettings {
            timeout: Duration::from_secs(2),
            ..settings(vec![nobody.clone()])
        },
        Arc::new(Sealer::from_secret(SECRET)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&nobody), "{err}");
}
