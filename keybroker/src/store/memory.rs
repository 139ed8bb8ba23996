//! An in-memory [`KeyStore`]: records in a `Mutex<BTreeMap>`, with the same
//! revision-based compare-and-swap as [`super::redb::RedbStore`]. Nothing survives the
//! process; it is for tests and benchmarks of the flows above the store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{KeyStore, Revision, StoreError, VolumeRecord};

/// Volume records and metadata held in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<String, (Revision, Arc<VolumeRecord>)>,
    meta: BTreeMap<String, String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every change is one
        // insert), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn get(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Revision, Arc<VolumeRecord>)>, StoreError> {
        Ok(self.lock().records.get(volume_id).cloned())
    }

    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let mut inner = self.lock();
        let current = inner.records.get(&record.volume_id).map(|(rev, _)| *rev);
        let matches = match expected {
            None => current.is_none(),
            Some(e) => current == Some(e),
        };
        if !matches {
            return Err(StoreError::Conflict(record.volume_id.clone()));
        }
        let rev = current.unwrap_or(0) + 1;
        inner
            .records
            .insert(record.volume_id.clone(), (rev, Arc::new(record.clone())));
        Ok(rev)
    }

    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        Ok(self
            .lock()
            .records
            .values()
            .map(|(_, r)| VolumeRecord::clone(r))
            .collect())
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    async fn meta_put(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock().meta.insert(key.to_string(), value.to_string());
        Ok(())
    }

    async fn scrub(&self) -> Result<(), StoreError> {
        Ok(()) // nothing is written anywhere a wiped key could linger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: "vol-m".into(),
            node_id: node.into(),
            versions: Vec::new(),
            labels: Default::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            destroyed_at: None,
        }
    }

    #[tokio::test]
    async fn put_is_a_compare_and_swap_on_the_revision() {
        let store = MemoryStore::new();
        assert!(store.get("vol-m").await.unwrap().is_none());
        assert!(matches!(
            store.put(&rec("n1"), Some(1)).await,
            Err(StoreError::Conflict(_))
        ));
        let r1 = store.put(&rec("n1"), None).await.unwrap();
        assert!(matches!(
            store.put(&rec("n2"), None).await,
            Err(StoreError::Conflict(_))
        ));
        let r2 = store.put(&rec("n2"), Some(r1)).await.unwrap();
        assert!(r2 > r1);
        assert!(matches!(
            store.put(&rec("n3"), Some(r1)).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.get("vol-m").await.unwrap().unwrap(),
            (r2, rec("n2").into())
        );
        assert_eq!(store.list().await.unwrap(), vec![rec("n2")]);
        store.meta_put("kek_id", "kek-1").await.unwrap();
        assert_eq!(
            store.meta_get("kek_id").await.unwrap().as_deref(),
            Some("kek-1")
        );
    }
}
