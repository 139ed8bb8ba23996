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
//!
//! After an I/O error (a full filesystem, most often) redb refuses every later
//! transaction until the database is reopened. So the store marks itself broken, and
//! the next call reopens the file (redb repairs it to its last committed state), drops
//! the read cache (a commit that failed part way may or may not have reached the disk)
//! and goes on; while the cause persists, each call is refused with
//! [`StoreError::Io`], naming it, and at most one reopen is tried per
//! [`REOPEN_INTERVAL`].

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, KeyStore, Revision, StoreError, VolumeRecord, META_KEK_ID};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("revisions");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The store file name inside the state directory.
pub const STORE_FILE: &str = "keys.redb";

/// After a failed reopen, calls within this interval are refused without trying again.
pub const REOPEN_INTERVAL: Duration = Duration::from_millis(250);

type Cache = HashMap<String, (Revision, Arc<VolumeRecord>)>;

/// redb-backed store.
pub struct RedbStore {
    // The write lock is taken only to compact the file (scrub) and to reopen it after an
    // I/O error; every transaction holds a read lock, so neither races a transaction.
    // `None` only while a reopen is under way (or failed).
    db: Arc<RwLock<Option<Database>>>,
    shared: Arc<Shared>,
}

/// What the blocking closures need besides the database.
struct Shared {
    path: PathBuf,
    cache: RwLock<Cache>,
    /// Bumped at every reopen: a read that started before it caches nothing.
    epoch: AtomicU64,
    /// An I/O error happened; the next call reopens.
    broken: AtomicBool,
    /// The last failed reopen: when, and why.
    last_reopen: Mutex<Option<(Instant, StoreError)>>,
}

/// A redb error as a [`StoreError`]; I/O errors (and redb's "a previous I/O error
/// occurred") become [`Failure::Io`] so that the store reopens.
enum Failure {
    Io(std::io::Error),
    Other(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Other(e)
    }
}

fn backend<E: Into<redb::Error>>(e: E) -> Failure {
    match e.into() {
        redb::Error::Io(io) => Failure::Io(io),
        redb::Error::PreviousIo => Failure::Io(std::io::Error::other(
            "an earlier write failed and the store must be reopened",
        )),
        e => Failure::Other(StoreError::Backend(e.to_string())),
    }
}

fn other(what: impl std::fmt::Display) -> Failure {
    Failure::Other(StoreError::Backend(what.to_string()))
}

impl Shared {
    fn io_error(&self, e: &std::io::Error) -> StoreError {
        let path = self.path.display().to_string();
        if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)
            || e.kind() == std::io::ErrorKind::StorageFull
        {
            StoreError::Io {
                path,
                what: "no space left on device".into(),
                hint: "free space on the broker's state filesystem (the broker recovers by \
                       itself once there is room, no restart needed)",
            }
        } else {
            StoreError::Io {
                path,
                what: format!("I/O error: {e}"),
                hint: "check the broker's state filesystem and its kernel log (the broker \
                       reopens its store on the next call)",
            }
        }
    }

    /// Turns a failure into the caller's error, marking the store broken on I/O errors.
    fn fail(&self, f: Failure) -> StoreError {
        match f {
            Failure::Other(e) => e,
            Failure::Io(e) => {
                if !self.broken.swap(true, Ordering::AcqRel) {
                    tracing::warn!(store = %self.path.display(), error = %e, "key store I/O error; it is reopened on the next call");
                }
                self.io_error(&e)
            }
        }
    }
}

fn open_db(path: &Path) -> Result<Database, Failure> {
    let db = Database::create(path).map_err(|e| match backend(e) {
        Failure::Other(StoreError::Backend(m)) => {
            Failure::Other(StoreError::Backend(format!("{}: {m}", path.display())))
        }
        f => f,
    })?;
    let w = db.begin_write().map_err(backend)?;
    {
        w.open_table(VOLUMES).map_err(backend)?;
        w.open_table(REVISIONS).map_err(backend)?;
        w.open_table(META).map_err(backend)?;
    }
    w.commit().map_err(backend)?;
    Ok(db)
}

/// Reopens the database if an I/O error broke it (at most once per
/// [`REOPEN_INTERVAL`] while that keeps failing); drops the read cache when it does.
fn recover(db: &RwLock<Option<Database>>, shared: &Shared) -> Result<(), StoreError> {
    if !shared.broken.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut last = shared.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
    if !shared.broken.load(Ordering::Acquire) {
        return Ok(()); // another call reopened it meanwhile
    }
    if let Some((at, why)) = last.as_ref() {
        if at.elapsed() < REOPEN_INTERVAL {
            return Err(match why {
                StoreError::Io { path, what, hint } => StoreError::Io {
                    path: path.clone(),
                    what: what.clone(),
                    hint,
                },
                e => StoreError::Backend(e.to_string()),
            });
        }
    }
    let mut guard = db
        .write()
        .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
    // redb locks its file: the old handle must be gone before the new one opens it.
    drop(guard.take());
    shared.epoch.fetch_add(1, Ordering::AcqRel);
    shared
        .cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    match open_db(&shared.path) {
        Ok(new) => {
            *guard = Some(new);
            shared.broken.store(false, Ordering::Release);
            *last = None;
            tracing::info!(store = %shared.path.display(), "key store reopened after an I/O error; read cache rebuilt from disk");
            Ok(())
        }
        Err(f) => {
            let e = match f {
                Failure::Io(e) => shared.io_error(&e),
                Failure::Other(e) => e,
            };
            let copy = match &e {
                StoreError::Io { path, what, hint } => StoreError::Io {
                    path: path.clone(),
                    what: what.clone(),
                    hint,
                },
                e => StoreError::Backend(e.to_string()),
            };
            *last = Some((Instant::now(), copy));
            Err(e)
        }
    }
}

/// The redb store file at a path, before it is opened.
pub struct RedbBackend {
    path: PathBuf,
}

impl RedbBackend {
    /// The store file at `path` (usually `STATE_DIR/`[`STORE_FILE`]).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Every record, read without writing to the store (for `status`); empty for a store
    /// that does not exist. Fails while a broker holds the store open.
    pub async fn recorded_records(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            Ok(read_only(&path, |db| {
                let r = db
                    .begin_read()
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                let vols = match r.open_table(VOLUMES) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(StoreError::Backend(e.to_string())),
                };
                let mut out = Vec::new();
                for item in vols
                    .iter()
                    .map_err(|e| StoreError::Backend(e.to_string()))?
                {
                    let (k, v) = item.map_err(|e| StoreError::Backend(e.to_string()))?;
                    out.push(decode(k.value(), v.value())?);
                }
                Ok(out)
            })?
            .unwrap_or_default())
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

#[async_trait::async_trait]
impl Backend for RedbBackend {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    async fn recorded_kek_id(&self) -> Result<Option<String>, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || recorded_meta(&path, META_KEK_ID))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    async fn recorded_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let (path, key) = (self.path.clone(), key.to_string());
        tokio::task::spawn_blocking(move || recorded_meta(&path, &key))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    async fn open(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(Arc::new(RedbStore::open(&self.path)?))
    }
}

/// Reads the metadata value `key` (the KEK id, the sealed KEK) without writing to the
/// store (a read-only open).
fn recorded_meta(path: &Path, key: &str) -> Result<Option<String>, StoreError> {
    Ok(read_only(path, |db| meta_in(db, key))?.flatten())
}

/// Runs `f` on the store opened read-only, without writing to it; `None` for a store that
/// does not exist.
///
/// After a crash or power loss the store was not closed, and a read-only open cannot
/// rebuild redb's allocator state; `f` then reads a repaired private copy, so the store
/// itself is not touched before the KEK is known to be the right one (the real open
/// repairs it afterwards).
fn read_only<T>(
    path: &Path,
    f: impl Fn(&dyn ReadableDatabase) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let backend =
        |e: &dyn std::fmt::Display| StoreError::Backend(format!("{}: {e}", path.display()));
    match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => f(&db).map(Some),
        Err(redb::DatabaseError::RepairAborted) => {
            let copy = path.with_extension("redb.kek-check");
            let _ = std::fs::remove_file(&copy); // a stale copy of a crash during this check
            let out = private_copy(path, &copy)
                .map_err(|e| backend(&e))
                .and_then(|()| {
                    // Opening read-write repairs the copy.
                    f(&Database::create(&copy).map_err(|e| backend(&e))?)
                });
            let _ = std::fs::remove_file(&copy);
            out.map(Some)
        }
        Err(e) => Err(backend(&e)),
    }
}

/// Copies `from` to a new file `to`, readable by the owner only.
fn private_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    std::io::copy(&mut std::fs::File::open(from)?, &mut out)?;
    Ok(())
}

/// The value of `key` in the store's `meta` table, if any.
fn meta_in(db: &dyn ReadableDatabase, key: &str) -> Result<Option<String>, StoreError> {
    let r = db
        .begin_read()
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    match r.open_table(META) {
        Ok(t) => Ok(t
            .get(key)
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .map(|g| g.value().to_string())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(StoreError::Backend(e.to_string())),
    }
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
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            cache: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
        });
        let db = open_db(path).map_err(|f| match f {
            Failure::Io(e) => shared.io_error(&e),
            Failure::Other(e) => e,
        })?;
        Ok(Self {
            db: Arc::new(RwLock::new(Some(db))),
            shared,
        })
    }

    /// Runs `f` on a blocking thread with the database (reopened first if an I/O error
    /// broke it).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (db, shared) = (self.db.clone(), self.shared.clone());
        tokio::task::spawn_blocking(move || {
            recover(&db, &shared)?;
            let guard = db
                .read()
                .map_err(|_| shared.fail(other("store lock poisoned")))?;
            let Some(d) = guard.as_ref() else {
                return Err(shared.fail(Failure::Io(std::io::Error::other(
                    "the store is being reopened",
                ))));
            };
            f(d).map_err(|e| shared.fail(e))
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

impl RedbStore {
    fn cached(&self, volume_id: &str) -> Option<(Revision, Arc<VolumeRecord>)> {
        let cache = self.shared.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(volume_id).cloned()
    }

    /// Caches a committed record unless a newer revision is already cached (two puts
    /// can finish in either order), or the store was reopened since `epoch` (what was
    /// read before a reopen is not known to be on disk).
    fn remember(&self, epoch: u64, rev: Revision, record: Arc<VolumeRecord>) {
        let mut cache = self.shared.cache.write().unwrap_or_else(|p| p.into_inner());
        if self.shared.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        match cache.get(&record.volume_id) {
            Some((cached, _)) if *cached >= rev => {}
            _ => {
                cache.insert(record.volume_id.clone(), (rev, record));
            }
        }
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
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
        let epoch = self.epoch();
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
            self.remember(epoch, *rev, rec.clone());
        }
        Ok(found)
    }

    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = record.volume_id.clone();
        let epoch = self.epoch();
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
                        return Err(StoreError::Conflict(id).into());
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
        // A reopen during the put means its epoch is stale: not cached, read from disk.
        self.remember(epoch, new_rev, Arc::new(record.clone()));
        Ok(new_rev)
    }

    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        self.blocking(|db| {
            let r = db.begin_read().map_err(backend)?;
            let vols = r.open_table(VOLUMES).map_err(backend)?;
            let mut out = Vec::new();
            for item in vols.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                out.push(decode(k.value(), v.value()).map_err(Failure::Other)?);
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
        let (db, shared) = (self.db.clone(), self.shared.clone());
        tokio::task::spawn_blocking(move || {
            recover(&db, &shared)?;
            let mut guard = db
                .write()
                .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
            let Some(d) = guard.as_mut() else {
                return Err(shared.fail(Failure::Io(std::io::Error::other(
                    "the store is being reopened",
                ))));
            };
            let run = |d: &mut Database| -> Result<(), Failure> {
                // Two empty commits release the pages the last real commit freed, then
                // compaction moves live pages over them and truncates the file.
                for _ in 0..2 {
                    d.begin_write()
                        .map_err(backend)?
                        .commit()
                        .map_err(backend)?;
                }
                while d.compact().map_err(backend)? {}
                Ok(())
            };
            run(d).map_err(|f| shared.fail(f))
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
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
        store.remember(store.epoch(), r1, rec("n1").into());
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

    #[tokio::test]
    async fn the_backend_reads_the_kek_id_without_writing_to_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let backend = RedbBackend::new(path.clone());
        assert_eq!(backend.recorded_kek_id().await.unwrap(), None);
        assert!(!path.exists(), "the check creates nothing");
        let store = backend.open().await.unwrap();
        assert_eq!(backend.location(), path.display().to_string());
        store.meta_put(META_KEK_ID, "kek-1").await.unwrap();
        drop(store);
        let before = std::fs::read(&path).unwrap();
        assert_eq!(
            backend.recorded_kek_id().await.unwrap().as_deref(),
            Some("kek-1")
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the store is unchanged"
        );
    }
}
