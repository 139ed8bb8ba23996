//! Volume records and the [`KeyStore`] trait: get, compare-and-swap put on a record
//! revision, list, and store metadata. The embedded implementation is [`redb::RedbStore`];
//! the scale-out one is [`etcd::EtcdStore`] (revisions are etcd's mod_revision), shared
//! by several broker replicas. [`memory::MemoryStore`] keeps records in memory, for tests
//! and benchmarks.

pub mod etcd;
pub mod memory;
pub mod redb;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::wrap::WrappedKey;

/// A record revision; every successful put returns a new, larger one.
pub type Revision = u64;

/// State of one key version.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Fetchable.
    Active,
    /// No longer used by the disk; wrapped key wiped.
    Retired,
    /// Crypto-erased with its volume.
    Destroyed,
}

/// One version of a volume's key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyVersion {
    /// 1, 2, …
    pub version: u64,
    /// Active, retired or destroyed.
    pub state: KeyState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, once retired or destroyed.
    pub retired_at: Option<String>,
    /// The wrapped key; `None` once retired or destroyed.
    pub wrapped: Option<WrappedKey>,
}

/// Everything the broker knows of one volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// The caller-chosen id.
    pub volume_id: String,
    /// The node it is bound to.
    pub node_id: String,
    /// Every version ever created, in order.
    pub versions: Vec<KeyVersion>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, once destroyed (tombstone).
    pub destroyed_at: Option<String>,
}

impl VolumeRecord {
    /// The newest version number.
    pub fn current_version(&self) -> u64 {
        self.versions.last().map_or(0, |v| v.version)
    }

    /// A version by number.
    pub fn version(&self, v: u64) -> Option<&KeyVersion> {
        self.versions.iter().find(|k| k.version == v)
    }

    /// A version by number, mutable.
    pub fn version_mut(&mut self, v: u64) -> Option<&mut KeyVersion> {
        self.versions.iter_mut().find(|k| k.version == v)
    }
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record changed since it was read (or exists when it was expected not to).
    #[error("volume {0}: concurrent update, retry")]
    Conflict(String),
    /// A record does not decode.
    #[error("volume {volume_id}: stored record is corrupt: {what}")]
    Corrupt {
        /// The volume.
        volume_id: String,
        /// What failed.
        what: String,
    },
    /// The backend failed.
    #[error("key store: {0}")]
    Backend(String),
    /// The store's file could not be read or written (e.g. its filesystem is full). The
    /// store recovers by itself once the cause is gone (it reopens its file); nothing
    /// was served from a half-written state.
    #[error("key broker store: {what} on {path}; {hint}")]
    Io {
        /// The store file.
        path: String,
        /// What failed ("no space left on device").
        what: String,
        /// What to do.
        hint: &'static str,
    },
}

/// Metadata key holding the id of the KEK the store was written with.
pub const META_KEK_ID: &str = "kek_id";

/// A store before it is opened: where it is, which KEK it was written with, and how to
/// open it. The broker reads the KEK id first and opens (and so writes to) the store only
/// once the loaded KEK is known to be that one.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Where the store is, for messages (a file path; endpoints for a remote store).
    fn location(&self) -> String;

    /// The KEK id recorded in the store's metadata ([`META_KEK_ID`]), read without
    /// writing to the store, even after a crash left it unclosed; `None` for a store
    /// that does not exist yet or records no id.
    async fn recorded_kek_id(&self) -> Result<Option<String>, StoreError>;

    /// A metadata value (e.g. the sealed KEK), read as [`Backend::recorded_kek_id`] reads
    /// the KEK id: without writing to the store. A backend that cannot says so.
    async fn recorded_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Err(StoreError::Backend(format!(
            "{}: this store cannot read metadata {key:?} before it is opened",
            self.location()
        )))
    }

    /// Opens (or creates) the store for reading and writing.
    async fn open(&self) -> Result<Arc<dyn KeyStore>, StoreError>;
}

/// Persistent storage of volume records with compare-and-swap.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record and its revision, if any. Shared (a backend may hand out the same
    /// record to every reader until it changes); clone it to build an update.
    async fn get(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Revision, Arc<VolumeRecord>)>, StoreError>;

    /// Writes `record` if the stored revision is `expected` (`None`: must not exist).
    /// Returns the new revision, or [`StoreError::Conflict`].
    async fn put(
        &self,
        record: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError>;

    /// Every record (for listing; metadata is what callers use).
    async fn list(&self) -> Result<Vec<VolumeRecord>, StoreError>;

    /// A metadata value (e.g. the KEK id the store was written with).
    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Sets a metadata value.
    async fn meta_put(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Makes space freed by retired and destroyed keys unreadable in the backing file
    /// (compaction); called after a key is wiped. A no-op where the backend cannot.
    async fn scrub(&self) -> Result<(), StoreError>;
}
