//! The broker's scale-out store on a real etcd cluster (three members, client and peer
//! TLS, tests/src/etcd.rs): real broker binaries with `backend = "etcd"`, two replicas
//! over one cluster, a leader killed under load, quorum lost and regained, and the
//! store's own compare-and-swap and paged listing.
//!
//! The tests run one at a time (each starts its own cluster): their timings (the gap
//! after a leader kill, the destroy batch) mean something only on an otherwise idle
//! cluster host.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodecrypt_keybroker::store::etcd::{EtcdStore, LIST_PAGE};
use nodecrypt_keybroker::store::{KeyStore, StoreError, VolumeRecord, META_KEK_ID};
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_proto::keybroker::v1::key_broker_client::KeyBrokerClient;
use nodecrypt_tests::etcd::EtcdCluster;
use nodecrypt_tests::{assert_no_key_material, assert_other_key, assert_same_key, Broker, Env};
use tonic::transport::Channel;
use tonic::Code;

/// Runs one test's body alone, on its own runtime.
fn serial(body: impl Future<Output = ()>) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body);
}

fn get(volume_id: &str, version: u64) -> pb::GetVolumeKeyRequest {
    pb::GetVolumeKeyRequest {
        volume_id: volume_id.into(),
        version,
    }
}

fn create(volume_id: &str) -> pb::CreateVolumeKeyRequest {
    pb::CreateVolumeKeyRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

fn destroy(volume_id: &str) -> pb::DestroyVolumeKeyRequest {
    pb::DestroyVolumeKeyRequest {
        volume_id: volume_id.into(),
        reason: "etcd test".into(),
    }
}

/// Starts a broker replica of `env` over `cluster` under `prefix`, with its own audit
/// log (`audit-<name>.log`); every replica of one env shares its state directory, so
/// its KEK.
fn replica(env: &Env, cluster: &EtcdCluster, prefix: &str, name: &str) -> Broker {
    replica_with_timeout(env, cluster, prefix, name, SLOW_HOST_MS)
}

/// The store timeout of the tests that do not measure failover: a shared, loaded test
/// host can take a second to fsync etcd's log.
const SLOW_HOST_MS: u64 = 5000;

/// [`replica`] with the store's `timeout_ms`.
fn replica_with_timeout(
    env: &Env,
    cluster: &EtcdCluster,
    prefix: &str,
    name: &str,
    timeout_ms: u64,
) -> Broker {
    env.set_broker_extra(&format!(
        "audit_log = \"{}\"\n{}",
        env.path().join(format!("audit-{name}.log")).display(),
        cluster.store_toml(prefix, timeout_ms)
    ));
    env.try_start_broker()
        .unwrap_or_else(|e| panic!("broker replica {name} did not start: {e}"))
}

#[test]
fn a_broker_on_etcd_serves_create_get_rotate_destroy_and_checks_its_kek() {
    serial(async {
        let mut cluster = EtcdCluster::start();
        let env = Env::new();
        let broker = replica(&env, &cluster, "/e2e", "a");
        let mut n1 = env.client(&broker, "node-n1");

        let k1 = n1
            .create_volume_key(create("vol-e"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((k1.version, k1.current_version, k1.key.len()), (1, 1, 64));
        let got = n1
            .get_volume_key(get("vol-e", 0))
            .await
            .unwrap()
            .into_inner();
        assert_same_key("get after create", &got.key, &k1.key);
        let k2 = n1
            .rotate_volume_key(pb::RotateVolumeKeyRequest {
                volume_id: "vol-e".into(),
                expected_current_version: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(k2.version, 2);
        assert_other_key("rotation", &k2.key, &k1.key);
        let old = n1
            .get_volume_key(get("vol-e", 1))
            .await
            .unwrap()
            .into_inner();
        assert_same_key("version 1 after rotate", &old.key, &k1.key);

        // The record is where the layout says, and holds no key in the clear.
        let dump = cluster.etcdctl(
            &cluster.endpoints(),
            &["get", "--prefix", "/e2e/", "--write-out", "json"],
        );
        assert!(dump.status.success());
        let keys = cluster.etcdctl(
            &cluster.endpoints(),
            &["get", "--prefix", "/e2e/", "--keys-only"],
        );
        let keys = String::from_utf8_lossy(&keys.stdout).to_string();
        assert!(keys.contains("/e2e/volumes/vol-e"), "{keys}");
        assert!(keys.contains("/e2e/meta/kek_id"), "{keys}");
        assert_no_key_material(
            "etcd's copy of the record",
            &dump.stdout,
            &[k1.key.clone(), k2.key.clone()],
        );

        // A restarted broker (no state of its own but the KEK) serves the same keys.
        broker.stop();
        let broker = replica(&env, &cluster, "/e2e", "a");
        let mut n1 = env.client(&broker, "node-n1");
        let got = n1
            .get_volume_key(get("vol-e", 2))
            .await
            .unwrap()
            .into_inner();
        assert_same_key("get after a broker restart", &got.key, &k2.key);

        let mut admin = env.client(&broker, "admin-ops");
        admin.destroy_volume_key(destroy("vol-e")).await.unwrap();
        let e = n1.get_volume_key(get("vol-e", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("destroyed"), "{e}");

        // A broker with another KEK refuses this store and changes nothing.
        let other = Env::new();
        other.set_broker_extra(&cluster.store_toml("/e2e", SLOW_HOST_MS));
        let e = other
            .try_start_broker()
            .err()
            .expect("another KEK is refused");
        assert!(
            e.contains("is not the KEK this store was written with"),
            "{e}"
        );

        // A broker whose etcd is not there does not start, and says why.
        for i in 0..3 {
            cluster.kill9(i);
        }
        let e = env.try_start_broker().err().expect("no etcd, no broker");
        assert!(e.contains("key store: etcd (https://127.0.0.1:"), "{e}");
    });
}

#[test]
fn fifty_concurrent_creates_over_two_replicas_make_one_version() {
    serial(async {
        let cluster = EtcdCluster::start();
        let env = Env::new();
        let a = replica(&env, &cluster, "/race", "a");
        let b = replica(&env, &cluster, "/race", "b");
        let clients = [env.client(&a, "node-n1"), env.client(&b, "node-n1")];
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..50 {
            let mut c = clients[i % 2].clone();
            calls.spawn(async move { c.create_volume_key(create("vol-race")).await });
        }
        let mut keys = Vec::new();
        while let Some(r) = calls.join_next().await {
            let k = r.unwrap().expect("every create succeeds").into_inner();
            assert_eq!((k.version, k.current_version), (1, 1));
            keys.push(k.key);
        }
        assert_eq!(keys.len(), 50);
        for k in &keys {
            assert_same_key("every caller's key", k, &keys[0]);
        }
        for broker in [&a, &b] {
            let info = env
                .client(broker, "admin-ops")
                .describe_volume(pb::DescribeVolumeRequest {
                    volume_id: "vol-race".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((info.current_version, info.versions.len()), (1, 1));
        }
    });
}

/// Volumes in the destroy-then-fetch batch (about 20 s on a 2-core test host).
const DESTROY_BATCH: usize = 1000;

#[test]
fn a_destroy_on_one_replica_is_seen_at_once_by_the_other() {
    serial(async {
        let cluster = EtcdCluster::start();
        let env = Env::new();
        let a = replica(&env, &cluster, "/destroy", "a");
        let b = replica(&env, &cluster, "/destroy", "b");
        let (n1_a, admin_a, n1_b) = (
            env.client(&a, "node-n1"),
            env.client(&a, "admin-ops"),
            env.client(&b, "node-n1"),
        );
        let started = Instant::now();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        const WORKERS: usize = 16;
        for w in 0..WORKERS {
            let (mut n1_a, mut admin_a, mut n1_b) = (n1_a.clone(), admin_a.clone(), n1_b.clone());
            let served = served.clone();
            workers.spawn(async move {
                for i in (w..DESTROY_BATCH).step_by(WORKERS) {
                    let id = format!("vol-d{i}");
                    n1_a.create_volume_key(create(&id)).await.unwrap();
                    // B has read the record (so a cache, if B had one, would hold it).
                    n1_b.get_volume_key(get(&id, 0)).await.unwrap();
                    admin_a.destroy_volume_key(destroy(&id)).await.unwrap();
                    match n1_b.get_volume_key(get(&id, 0)).await {
                        Ok(_) => {
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{id}: {e}"),
                    }
                }
            });
        }
        while let Some(r) = workers.join_next().await {
            r.unwrap();
        }
        let took = started.elapsed();
        let served = served.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "destroy on A, fetch on B: {DESTROY_BATCH} volumes in {took:.1?}, {served} keys \
             served after their destroy"
        );
        assert_eq!(served, 0, "replica B served {served} destroyed keys");
    });
}

/// One fetch of a failover test: when it ended, and served or why not.
type Fetch = (Instant, Result<(), (Code, String)>);

/// Every fetch of a failover test.
type Log = Arc<Mutex<Vec<Fetch>>>;

/// Fetches `volume_id` in a loop until `stop`, recording for each call when it ended and
/// whether it was served; a served key must be `want` (a wrong answer panics).
async fn fetch_loop(
    mut client: KeyBrokerClient<Channel>,
    volume_id: String,
    want: Vec<u8>,
    log: Log,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_volume_key(get(&volume_id, 1)),
        )
        .await;
        let entry = match r {
            Ok(Ok(k)) => {
                assert_same_key(
                    "a key served during the failover",
                    &k.into_inner().key,
                    &want,
                );
                Ok(())
            }
            Ok(Err(e)) => {
                assert_eq!(
                    e.code(),
                    Code::Unavailable,
                    "only UNAVAILABLE may fail a fetch: {e}"
                );
                Err((e.code(), e.message().to_string()))
            }
            Err(_) => panic!("a fetch took more than 10 s: the store's timeout did not hold"),
        };
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), entry));
    }
}

/// Waits until `n` fetches after `since` were served (or panics after `within`).
async fn served_after(log: &Log, since: Instant, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ok = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, r)| *t > since && r.is_ok())
            .count();
        if ok >= n {
            return;
        }
        if Instant::now() > deadline {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            let recent: Vec<&Fetch> = log.iter().rev().take(5).collect();
            panic!("fetches did not resume within {within:?}; the last ones: {recent:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn fetches_survive_a_leader_kill_and_a_lost_quorum_is_unavailable_not_wrong() {
    serial(async {
        let mut cluster = EtcdCluster::start();
        let env = Env::new();
        // The default timeout_ms (2000): what a quorum loss costs a caller.
        let a = replica_with_timeout(&env, &cluster, "/failover", "a", 2000);
        let mut n1 = env.client(&a, "node-n1");
        let want = n1
            .create_volume_key(create("vol-f"))
            .await
            .unwrap()
            .into_inner()
            .key;

        let log: Log = Arc::default();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let fetcher = tokio::spawn(fetch_loop(
            n1.clone(),
            "vol-f".into(),
            want.clone(),
            log.clone(),
            stop.clone(),
        ));
        served_after(&log, Instant::now(), 20, Duration::from_secs(10)).await;

        // kill -9 the leader: fetches resume on the two others.
        let leader = cluster.leader();
        let killed_at = Instant::now();
        cluster.kill9(leader);
        served_after(&log, killed_at, 20, Duration::from_secs(20)).await;
        let gap = {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            let mut last_ok = killed_at;
            let mut longest = Duration::ZERO;
            for (t, r) in log.iter().filter(|(t, _)| *t > killed_at) {
                if r.is_ok() {
                    longest = longest.max(t.duration_since(last_ok));
                    last_ok = *t;
                }
            }
            longest
        };
        let failed: Vec<String> = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, _)| *t > killed_at)
            .filter_map(|(_, r)| r.clone().err().map(|(_, m)| m))
            .collect();
        eprintln!(
            "leader m{leader} killed: longest gap between served fetches {gap:.2?}, {} fetches \
             UNAVAILABLE meanwhile: {failed:#?}",
            failed.len()
        );
        assert!(
            gap < Duration::from_secs(10),
            "fetches resumed only after {gap:?}"
        );
        cluster.restart(leader);
        cluster.wait_healthy(&[0, 1, 2]);

        // Two of three members gone: no quorum, so UNAVAILABLE naming etcd, never a key.
        let survivor = (leader + 1) % 3;
        let down: Vec<usize> = (0..3).filter(|&i| i != survivor).collect();
        for &i in &down {
            cluster.kill9(i);
        }
        let lost_at = Instant::now();
        let deadline = lost_at + Duration::from_secs(15);
        let unavailable = loop {
            let hit = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(t, _)| *t > lost_at)
                .find_map(|(_, r)| r.clone().err());
            if let Some(e) = hit {
                break e;
            }
            assert!(Instant::now() < deadline, "no fetch failed without quorum");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            unavailable.1.contains("etcd"),
            "the reason names the store: {unavailable:?}"
        );
        // Let the survivor be alone for a few more calls: none is served (every get is a
        // linearizable read, which needs a quorum). Fetches that were in flight at the
        // kill may end just after it, served from before: a second of margin.
        let watched_until = Instant::now() + Duration::from_secs(3);
        tokio::time::sleep_until(watched_until.into()).await;
        let (served_without_quorum, refused) = {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            let alone: Vec<_> = log
                .iter()
                .filter(|(t, _)| *t > lost_at + Duration::from_secs(1))
                .collect();
            (
                alone.iter().filter(|(_, r)| r.is_ok()).count(),
                alone.iter().filter(|(_, r)| r.is_err()).count(),
            )
        };
        assert_eq!(
            served_without_quorum, 0,
            "keys were served without a quorum"
        );
        assert!(refused > 0, "fetches went on while the quorum was lost");
        let mut reasons = std::collections::BTreeMap::<String, usize>::new();
        for (t, r) in log.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let (true, Err((_, m))) = (*t > lost_at, r) {
                *reasons.entry(m.clone()).or_default() += 1;
            }
        }
        eprintln!("quorum lost: {refused} fetches UNAVAILABLE, none served; reasons: {reasons:#?}");

        // Back to three: served again.
        for &i in &down {
            cluster.restart(i);
        }
        let back_at = Instant::now();
        cluster.wait_healthy(&[0, 1, 2]);
        served_after(&log, back_at, 20, Duration::from_secs(20)).await;
        stop_tx.send(true).unwrap();
        fetcher.await.unwrap();
    });
}

fn record(id: &str) -> VolumeRecord {
    VolumeRecord {
        volume_id: id.into(),
        node_id: "n1".into(),
        versions: Vec::new(),
        labels: Default::default(),
        created_at: "2026-12-07T00:00:00Z".into(),
        destroyed_at: None,
    }
}

#[test]
fn the_store_compares_and_swaps_and_lists_page_by_page_on_a_real_cluster() {
    serial(async {
        nodecrypt_keybroker::tls::install_default_provider();
        let cluster = EtcdCluster::start();
        let timeout = Duration::from_secs(5);
        let store = Arc::new(
            EtcdStore::connect(cluster.settings("/paged", timeout))
                .await
                .unwrap(),
        );

        // Compare-and-swap on mod_revision; create = must not exist.
        assert!(store.get("vol-cas").await.unwrap().is_none());
        assert!(matches!(
            store.put(&record("vol-cas"), Some(1)).await,
            Err(StoreError::Conflict(_))
        ));
        let r1 = store.put(&record("vol-cas"), None).await.unwrap();
        assert!(matches!(
            store.put(&record("vol-cas"), None).await,
            Err(StoreError::Conflict(_))
        ));
        let mut moved = record("vol-cas");
        moved.node_id = "n2".into();
        let r2 = store.put(&moved, Some(r1)).await.unwrap();
        assert!(r2 > r1);
        assert!(matches!(
            store.put(&record("vol-cas"), Some(r1)).await,
            Err(StoreError::Conflict(_))
        ));
        let (rev, got) = store.get("vol-cas").await.unwrap().unwrap();
        assert_eq!((rev, got.node_id.as_str()), (r2, "n2"));

        // The KEK id is recorded once; another one is refused.
        assert_eq!(store.meta_get(META_KEK_ID).await.unwrap(), None);
        store.meta_put(META_KEK_ID, "kek-1").await.unwrap();
        store.meta_put(META_KEK_ID, "kek-1").await.unwrap();
        let e = store.meta_put(META_KEK_ID, "kek-2").await.unwrap_err();
        assert!(
            e.to_string().contains("already records KEK id kek-1"),
            "{e}"
        );

        // More records than two pages, and neighbours under other prefixes.
        let n = 2 * LIST_PAGE as usize + 234;
        let mut puts = tokio::task::JoinSet::new();
        for w in 0..16 {
            let store = store.clone();
            puts.spawn(async move {
                for i in (w..n).step_by(16) {
                    store
                        .put(&record(&format!("vol-p{i:05}")), None)
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(r) = puts.join_next().await {
            r.unwrap();
        }
        let neighbour = EtcdStore::connect(cluster.settings("/paged-other", timeout))
            .await
            .unwrap();
        neighbour.put(&record("vol-elsewhere"), None).await.unwrap();
        let listed = store.list().await.unwrap();
        let ids: BTreeSet<String> = listed.iter().map(|r| r.volume_id.clone()).collect();
        assert_eq!(listed.len(), n + 1, "every record once, nothing else");
        assert_eq!(ids.len(), n + 1);
        assert!(ids.contains("vol-cas") && ids.contains("vol-p00000"));
        assert!(ids.contains(&format!("vol-p{:05}", n - 1)));
        assert!(!ids.contains("vol-elsewhere"));
        assert_eq!(neighbour.list().await.unwrap().len(), 1);

        // Scrub compacts the history away; the store reads and lists on.
        store.scrub().await.unwrap();
        store.scrub().await.unwrap();
        assert_eq!(store.list().await.unwrap().len(), n + 1);
        let (rev, _) = store.get("vol-cas").await.unwrap().unwrap();
        assert_eq!(rev, r2);
    });
}
