//! The flows against an in-memory store: no tonic, no file, no certificates.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::store::memory::MemoryStore;
use crate::store::Revision;

fn node(n: &str) -> Identity {
    Identity::Node(n.into())
}

fn admin() -> Identity {
    Identity::Admin("ops".into())
}

/// Flows over `store`, with a fresh KEK (its directory is kept alive alongside).
fn keys_over(store: Arc<dyn KeyStore>) -> (Keys, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kek = Arc::new(Kek::create(&dir.path().join("state")).unwrap());
    (Keys::new(store, kek, Policy::default()), dir)
}

fn keys() -> (Keys, tempfile::TempDir) {
    keys_over(Arc::new(MemoryStore::new()))
}

fn bytes(k: &ServedKey) -> Vec<u8> {
    k.key.as_ref().expect("key bytes served").expose().to_vec()
}

async fn create(keys: &Keys, who: &Identity, vol: &str) -> Result<ServedKey, KeysError> {
    keys.create(who, vol, "", BTreeMap::new()).await
}

#[tokio::test]
async fn a_repeated_create_serves_the_same_key_and_version() {
    let (keys, _d) = keys();
    let first = create(&keys, &node("n1"), "vol-a").await.unwrap();
    let again = create(&keys, &node("n1"), "vol-a").await.unwrap();
    assert_eq!((first.version, again.version), (1, 1));
    assert_eq!(again.current_version, 1);
    assert_eq!(bytes(&first), bytes(&again));
    let got = keys.get(&node("n1"), "vol-a", 0).await.unwrap();
    assert_eq!(bytes(&got), bytes(&first));
    // The same volume for another node (by an admin) is refused, naming the rebind.
    let err = keys
        .create(&admin(), "vol-a", "n2", BTreeMap::new())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeysError::BoundElsewhere { .. }), "{err}");
    assert!(err.to_string().contains("rebind it instead"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_creates_make_exactly_one_version() {
    let (keys, _d) = keys();
    let keys = Arc::new(keys);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move {
                let k = create(&keys, &node("n1"), "vol-race").await.unwrap();
                (k.version, bytes(&k))
            })
        })
        .collect();
    let mut served = Vec::new();
    for t in tasks {
        served.push(t.await.unwrap());
    }
    assert!(served.iter().all(|s| s == &served[0]), "one key for all");
    assert_eq!(served[0].0, 1);
    let rec = keys.describe(&node("n1"), "vol-race").await.unwrap();
    assert_eq!(rec.versions.len(), 1);
}

#[tokio::test]
async fn rotate_follows_the_expected_current_version() {
    let (keys, _d) = keys();
    let v1 = create(&keys, &node("n1"), "vol-r").await.unwrap();
    let v2 = keys.rotate(&node("n1"), "vol-r", 1).await.unwrap();
    assert_eq!((v2.version, v2.current_version), (2, 2));
    assert_ne!(bytes(&v1), bytes(&v2));
    // A retry of that rotate (the caller still saw 1) adds nothing: it gets version 2.
    let retry = keys.rotate(&node("n1"), "vol-r", 1).await.unwrap();
    assert_eq!(retry.version, 2);
    assert_eq!(bytes(&retry), bytes(&v2));
    // Expecting a version the broker does not have yet is refused.
    let err = keys
        .rotate(&node("n1"), "vol-r", 5)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            KeysError::AheadOfBroker {
                expected: 5,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "volume vol-r: expected current version 5, but the broker's is 2"
    );
    // 0: rotate whatever is current.
    assert_eq!(
        keys.rotate(&node("n1"), "vol-r", 0).await.unwrap().version,
        3
    );
    let err = keys
        .rotate(&node("n1"), "vol-none", 0)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeysError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn retire_wipes_an_old_version_and_never_the_current_one() {
    let (keys, _d) = keys();
    create(&keys, &node("n1"), "vol-t").await.unwrap();
    let err = keys
        .retire(&node("n1"), "vol-t", 1)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, KeysError::RetireCurrent { version: 1, .. }),
        "{err}"
    );
    keys.rotate(&node("n1"), "vol-t", 1).await.unwrap();
    let rec = keys.retire(&node("n1"), "vol-t", 1).await.unwrap();
    let v1 = rec.version(1).unwrap();
    assert_eq!(v1.state, KeyState::Retired);
    assert!(v1.wrapped.is_none() && v1.retired_at.is_some());
    // Retiring it again changes nothing.
    let again = keys.retire(&node("n1"), "vol-t", 1).await.unwrap();
    assert_eq!(again.version(1), rec.version(1));
    // Its key is gone; the current one is still served.
    let err = keys
        .get(&node("n1"), "vol-t", 1)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, KeysError::Retired { current: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("retired"), "{err}");
    assert_eq!(keys.get(&node("n1"), "vol-t", 0).await.unwrap().version, 2);
    let err = keys
        .retire(&node("n1"), "vol-t", 9)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, KeysError::NoVersionToRetire { version: 9, .. }),
        "{err}"
    );
    let err = keys
        .get(&node("n1"), "vol-t", 9)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            KeysError::NoVersion {
                version: 9,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn destroy_leaves_a_tombstone_that_every_later_call_names() {
    let (keys, _d) = keys();
    create(&keys, &node("n1"), "vol-d").await.unwrap();
    keys.rotate(&node("n1"), "vol-d", 0).await.unwrap();
    let rec = keys
        .destroy(&node("n1"), "vol-d", "decommissioned")
        .await
        .unwrap();
    let at = rec.destroyed_at.clone().expect("tombstone");
    assert!(rec
        .versions
        .iter()
        .all(|v| v.state == KeyState::Destroyed && v.wrapped.is_none()));
    let refusals = [
        keys.get(&node("n1"), "vol-d", 0).await.err(),
        keys.rotate(&node("n1"), "vol-d", 0).await.err(),
        create(&keys, &node("n1"), "vol-d").await.err(),
        keys.rebind(&admin(), "vol-d", "n2", "").await.err(),
    ];
    for err in refusals {
        let err = err.expect("refused after destroy");
        assert!(
            matches!(&err, KeysError::Destroyed { at: a, .. } if *a == at),
            "{err}"
        );
        assert!(err.to_string().contains("destroyed at"), "{err}");
    }
    // Destroying again and describing show the same tombstone.
    let again = keys.destroy(&admin(), "vol-d", "").await.unwrap();
    assert_eq!(again.destroyed_at.as_deref(), Some(at.as_str()));
    let seen = keys.describe(&node("n1"), "vol-d").await.unwrap();
    assert_eq!(seen.destroyed_at.as_deref(), Some(at.as_str()));
}

#[tokio::test]
async fn only_an_admin_rebinds() {
    let (keys, _d) = keys();
    let k = create(&keys, &node("n1"), "vol-b").await.unwrap();
    let err = keys
        .rebind(&node("n1"), "vol-b", "n2", "")
        .await
        .expect_err("refused");
    assert!(matches!(err, KeysError::Denied { .. }), "{err}");
    let err = keys
        .rebind(&admin(), "vol-b", "n2", "n3")
        .await
        .expect_err("refused");
    assert!(matches!(err, KeysError::NotOnExpectedNode { .. }), "{err}");
    let rec = keys.rebind(&admin(), "vol-b", "n2", "n1").await.unwrap();
    assert_eq!(rec.node_id, "n2");
    // Rebinding where it already is changes nothing.
    let same = keys.rebind(&admin(), "vol-b", "n2", "n1").await.unwrap();
    assert_eq!(same.node_id, "n2");
    // The key moves with the binding.
    let err = keys
        .get(&node("n1"), "vol-b", 0)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeysError::Denied { .. }), "{err}");
    let moved = keys.get(&node("n2"), "vol-b", 0).await.unwrap();
    assert_eq!(bytes(&moved), bytes(&k));
}

#[tokio::test]
async fn a_node_never_sees_another_nodes_volume() {
    let (keys, _d) = keys();
    create(&keys, &node("n1"), "vol-n1").await.unwrap();
    create(&keys, &node("n2"), "vol-n2").await.unwrap();
    let spy = node("n2");
    let refusals = [
        keys.get(&spy, "vol-n1", 0).await.err(),
        keys.rotate(&spy, "vol-n1", 0).await.err(),
        keys.retire(&spy, "vol-n1", 1).await.err(),
        keys.destroy(&spy, "vol-n1", "").await.err(),
        keys.describe(&spy, "vol-n1").await.err(),
        create(&keys, &spy, "vol-n1").await.err(),
    ];
    for err in refusals {
        let err = err.expect("refused");
        assert!(matches!(err, KeysError::Denied { .. }), "{err}");
        assert!(
            !err.to_string().contains("node n1"),
            "names no owner: {err}"
        );
    }
    let listed = keys.list(&spy, "").await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| r.volume_id.as_str())
            .collect::<Vec<_>>(),
        ["vol-n2"]
    );
    assert!(matches!(
        keys.list(&spy, "n1").await,
        Err(KeysError::Denied { .. })
    ));
    // Nothing it tried changed the volume.
    let rec = keys.describe(&node("n1"), "vol-n1").await.unwrap();
    assert_eq!(
        (rec.current_version(), rec.destroyed_at.as_ref()),
        (1, None)
    );
    assert_eq!(keys.list(&admin(), "").await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_admin_never_gets_key_bytes() {
    let (keys, _d) = keys();
    let made = keys
        .create(&admin(), "vol-adm", "n1", BTreeMap::new())
        .await
        .unwrap();
    assert!(made.key.is_none());
    assert_eq!(made.version, 1);
    let rotated = keys.rotate(&admin(), "vol-adm", 0).await.unwrap();
    assert!(rotated.key.is_none());
    assert_eq!(rotated.version, 2);
    let err = keys
        .get(&admin(), "vol-adm", 0)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeysError::Denied { .. }), "{err}");
    assert!(err.to_string().contains("never read"), "{err}");
    // The node it was created for gets the bytes.
    assert!(keys
        .get(&node("n1"), "vol-adm", 2)
        .await
        .unwrap()
        .key
        .is_some());
}

/// A store where another writer gets in before each of the first `races` puts: it
/// rewrites the stored record (bumping its revision), so that put's CAS fails.
struct Racing {
    inner: MemoryStore,
    races: AtomicUsize,
    puts: AtomicUsize,
}

impl Racing {
    fn new(races: usize) -> Self {
        Self {
            inner: MemoryStore::new(),
            races: AtomicUsize::new(races),
            puts: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for Racing {
    async fn get(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Revision, Arc<VolumeRecord>)>, StoreError> {
        self.inner.get(volume_id).await
    }

    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        let race = self
            .races
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if race {
            if let Some((rev, current)) = self.inner.get(&record.volume_id).await? {
                self.inner.put(&current, Some(rev)).await?;
            }
        }
        self.inner.put(record, expected).await
    }

    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        self.inner.list().await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta_get(key).await
    }

    async fn meta_put(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner.meta_put(key, value).await
    }

    async fn scrub(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_lost_compare_and_swap_is_retried_and_succeeds() {
    let store = Arc::new(Racing::new(0));
    let (keys, _d) = keys_over(store.clone());
    create(&keys, &node("n1"), "vol-cas").await.unwrap();
    store.races.store(1, Ordering::SeqCst);
    store.puts.store(0, Ordering::SeqCst);
    let rotated = keys.rotate(&node("n1"), "vol-cas", 1).await.unwrap();
    assert_eq!(rotated.version, 2);
    assert_eq!(
        store.puts.load(Ordering::SeqCst),
        2,
        "one lost put, one retry"
    );
    let rec = keys.describe(&node("n1"), "vol-cas").await.unwrap();
    assert_eq!(rec.versions.len(), 2, "exactly one new version");
}

#[tokio::test]
async fn exhausted_retries_give_a_clear_error() {
    let store = Arc::new(Racing::new(0));
    let (mut keys, _d) = keys_over(store.clone());
    keys.attempts = 3;
    create(&keys, &node("n1"), "vol-hot").await.unwrap();
    store.races.store(usize::MAX, Ordering::SeqCst);
    store.puts.store(0, Ordering::SeqCst);
    let err = keys
        .rotate(&node("n1"), "vol-hot", 0)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, KeysError::Contention { volume_id } if volume_id == "vol-hot"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "volume vol-hot: too much contention, retry"
    );
    assert_eq!(
        store.puts.load(Ordering::SeqCst),
        3,
        "bounded by the attempts"
    );
    let rec = keys.describe(&node("n1"), "vol-hot").await.unwrap();
    assert_eq!(rec.versions.len(), 1, "no version added");
}
