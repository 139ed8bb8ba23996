//! The embedded [`KeyStore`]: a single-file ACID store (redb) under the state directory.
//!
//! Each record is a JSON document in table `volumes` with its revision in `revisions`;
//! put is a compare-and-swap inside one write transaction (redb serialises writers), so
//! concurrent creates of one volume produce exactly one record.
//!
//! Reads are served from an in-memory cache of decoded records (wrapped keys only, never
//! plaintext) that every committed put updates: redb locks the file to one process, so
//! this process sees every write. A key fetch then costs no blocking-pool hop, no read
//! transaction and no JSON decode.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{KeyStore, Revision, StoreError, VolumeRecord};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("revisions");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The store file name inside the state directory.
pub const STORE_FILE: &str = "keys.redb";

/// redb-backed store.
pub struct RedbStore {
    // The write lock is taken only to compact the file (scrub); every transaction holds a
    // read lock, so compaction never races a transaction.
    db: Arc<RwLock<Database>>,
    cache: RwLock<HashMap<String, (Revision, Arc<VolumeRecord>)>>,
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // It holds wrapped keys only, but it is no one else's to read: 0600 whatever the
        // umask (redb initialises an empty file like a missing one).
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let w = db.begin_write().map_err(backend)?;
        {
            w.open_table(VOLUMES).map_err(backend)?;
            w.open_table(REVISIONS).map_err(backend)?;
            w.open_table(META).map_err(backend)?;
        }
        w.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(RwLock::new(db)),
            cache: RwLock::new(HashMap::new()),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let guard = db.read().map_err(|_| backend("store lock poisoned"))?;
            f(&guard)
        })
        .await
        .map_err(backend)?
    }
}

impl RedbStore {
    fn cached(&self, volume_id: &str) -> Option<(Revision, Arc<VolumeRecord>)> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(volume_id).cloned()
    }

    /// Caches a committed record unless a newer revision is already cached (two puts
    /// can finish in either order).
    fn remember(&self, rev: Revision, record: Arc<VolumeRecord>) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        match cache.get(&record.volume_id) {
            Some((cached, _)) if *cached >= rev => {}
            _ => {
                cache.insert(record.volume_id.clone(), (rev, record));
            }
        }
    }
}

fn decode(volume_id: &str, bytes: &[u8]) -> Result<VolumeRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        volume_id: volume_id.to_string(),
        what: e.to_string(),
    })
}

#[async_trait::async_trait]
impl KeyStore for RedbStore {
    async fn get(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Revision, Arc<VolumeRecord>)>, StoreError> {
        if let Some(hit) = self.cached(volume_id) {
            return Ok(Some(hit));
        }
        let id = volume_id.to_string();
        let found = self
            .blocking(move |db| {
                let r = db.begin_read().map_err(backend)?;
                let vols = r.open_table(VOLUMES).map_err(backend)?;
                let revs = r.open_table(REVISIONS).map_err(backend)?;
                let Some(bytes) = vols.get(id.as_str()).map_err(backend)? else {
                    return Ok(None);
                };
                let rev = revs
                    .get(id.as_str())
                    .map_err(backend)?
                    .map_or(0, |g| g.value());
                Ok(Some((rev, Arc::new(decode(&id, bytes.value())?))))
            })
            .await?;
        if let Some((rev, rec)) = &found {
            self.remember(*rev, rec.clone());
        }
        Ok(found)
    }

    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(backend)?;
        let id = record.volume_id.clone();
        let new_rev = self
            .blocking(move |db| {
                let w = db.begin_write().map_err(backend)?;
                let new_rev;
                {
                    let mut vols = w.open_table(VOLUMES).map_err(backend)?;
                    let mut revs = w.open_table(REVISIONS).map_err(backend)?;
                    let exists = vols.get(id.as_str()).map_err(backend)?.is_some();
                    let current = revs.get(id.as_str()).map_err(backend)?.map(|g| g.value());
                    let matches = match expected {
                        None => !exists,
                        Some(e) => exists && current == Some(e),
                    };
                    if !matches {
                        return Err(StoreError::Conflict(id));
                    }
                    new_rev = current.unwrap_or(0) + 1;
                    vols.insert(id.as_str(), bytes.as_slice())
                        .map_err(backend)?;
                    revs.insert(id.as_str(), new_rev).map_err(backend)?;
                }
                w.commit().map_err(backend)?;
                Ok(new_rev)
            })
            .await?;
        self.remember(new_rev, Arc::new(record.clone()));
        Ok(new_rev)
    }

    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        self.blocking(|db| {
            let r = db.begin_read().map_err(backend)?;
            let vols = r.open_table(VOLUMES).map_err(backend)?;
            let mut out = Vec::new();
            for item in vols.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(backend)?;
            let meta = r.open_table(META).map_err(backend)?;
            Ok(meta
                .get(key.as_str())
                .map_err(backend)?
                .map(|g| g.value().to_string()))
        })
        .await
    }

    async fn meta_put(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.blocking(move |db| {
            let w = db.begin_write().map_err(backend)?;
            w.open_table(META)
                .map_err(backend)?
                .insert(key.as_str(), value.as_str())
                .map_err(backend)?;
            w.commit().map_err(backend)
        })
        .await
    }

    async fn scrub(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = db.write().map_err(|_| backend("store lock poisoned"))?;
            // Two empty commits release the pages the last real commit freed, then
            // compaction moves live pages over them and truncates the file.
            for _ in 0..2 {
                guard
                    .begin_write()
                    .map_err(backend)?
                    .commit()
                    .map_err(backend)?;
            }
            while guard.compact().map_err(backend)? {}
            Ok(())
        })
        .await
        .map_err(backend)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: "vol-c".into(),
            node_id: node.into(),
            versions: Vec::new(),
            labels: Default::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            destroyed_at: None,
        }
    }

    #[tokio::test]
    async fn the_read_cache_follows_every_commit_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join(STORE_FILE)).unwrap();
        assert!(store.get("vol-c").await.unwrap().is_none());
        let r1 = store.put(&rec("n1"), None).await.unwrap();
        assert_eq!(
            store.get("vol-c").await.unwrap().unwrap(),
            (r1, rec("n1").into())
        );
        let r2 = store.put(&rec("n2"), Some(r1)).await.unwrap();
        assert_eq!(
            store.get("vol-c").await.unwrap().unwrap(),
            (r2, rec("n2").into())
        );
        // A put that finishes late with an older revision does not overwrite the cache.
        store.remember(r1, rec("n1").into());
        assert_eq!(store.get("vol-c").await.unwrap().unwrap().1.node_id, "n2");
        // A stale CAS is refused and leaves the cache alone.
        assert!(store.put(&rec("n3"), Some(r1)).await.is_err());
        assert_eq!(store.get("vol-c").await.unwrap().unwrap().1.node_id, "n2");
        // A fresh store on the same file (a restart) reads what was committed.
        drop(store);
        let store = RedbStore::open(&dir.path().join(STORE_FILE)).unwrap();
        assert_eq!(
            store.get("vol-c").await.unwrap().unwrap(),
            (r2, rec("n2").into())
        );
    }
}
