//! The broker's key flows: create, get, rotate, retire, destroy, rebind, describe and
//! list, over a [`KeyStore`] and the [`Kek`]. They take domain arguments (an
//! [`Identity`], a volume id, versions, labels), authorize with [`crate::authz`], and
//! return domain results or a [`KeysError`]; the gRPC service validates the wire,
//! calls them and maps their errors to status codes. Nothing here knows of gRPC.
//!
//! Every flow that changes a record goes through one compare-and-swap loop
//! (`Keys::update`): read the record and its revision, decide, write if the revision
//! is unchanged, and read again on a conflict, at most [`CAS_ATTEMPTS`] times.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use crate::authz::{self, Action, Denied, Policy};
use crate::identity::Identity;
use crate::store::{KeyState, KeyStore, KeyVersion, StoreError, VolumeRecord};
use crate::validate;
use crate::wrap::{Kek, VolumeKey, WrapError};

mod error;
#[cfg(test)]
mod tests;

pub use error::KeysError;

/// How often a compare-and-swap is tried under contention before giving up
/// ([`KeysError::Contention`]).
pub const CAS_ATTEMPTS: usize = 256;

/// A key version served to a caller.
pub struct ServedKey {
    /// The volume.
    pub volume_id: String,
    /// The version served.
    pub version: u64,
    /// The volume's current version.
    pub current_version: u64,
    /// The key; `None` where the caller may not receive key bytes (an admin's create or
    /// rotate: nothing is unwrapped then).
    pub key: Option<VolumeKey>,
}

/// What an [`Keys::update`] closure decided about the record it was shown.
enum Step<T> {
    /// Nothing to write (an idempotent repeat): answer `T`.
    Keep(T),
    /// Write this record if the revision read is still the stored one, then answer `T`.
    Write(VolumeRecord, T),
}

/// What [`Keys::update`] did.
struct Applied<T> {
    /// The record as it now stands.
    record: Arc<VolumeRecord>,
    /// Whether it was written.
    written: bool,
    /// The closure's answer.
    value: T,
}

/// The key flows over one store and KEK, under one authorization policy.
pub struct Keys {
    store: Arc<dyn KeyStore>,
    kek: Arc<Kek>,
    policy: Policy,
    attempts: usize,
}

fn store_err(volume_id: &str) -> impl FnOnce(StoreError) -> KeysError + '_ {
    move |source| KeysError::Store {
        volume_id: volume_id.to_string(),
        source,
    }
}

fn wrap_err(volume_id: &str) -> impl FnOnce(WrapError) -> KeysError + '_ {
    move |source| KeysError::Wrap {
        volume_id: volume_id.to_string(),
        source,
    }
}

fn denied(volume_id: &str) -> impl FnOnce(Denied) -> KeysError + '_ {
    move |reason| KeysError::Denied {
        volume_id: volume_id.to_string(),
        reason,
    }
}

fn not_found(volume_id: &str) -> KeysError {
    KeysError::NotFound {
        volume_id: volume_id.to_string(),
    }
}

/// The record, or [`KeysError::NotFound`].
fn existing<'a>(
    volume_id: &str,
    rec: Option<&'a Arc<VolumeRecord>>,
) -> Result<&'a Arc<VolumeRecord>, KeysError> {
    rec.ok_or_else(|| not_found(volume_id))
}

/// [`KeysError::Destroyed`] if the record is a tombstone.
fn alive(rec: &VolumeRecord) -> Result<(), KeysError> {
    match &rec.destroyed_at {
        Some(at) => Err(KeysError::Destroyed {
            volume_id: rec.volume_id.clone(),
            at: at.clone(),
        }),
        None => Ok(()),
    }
}

impl Keys {
    /// The flows over `store`, wrapping with `kek`, under `policy`.
    pub fn new(store: Arc<dyn KeyStore>, kek: Arc<Kek>, policy: Policy) -> Self {
        Self {
            store,
            kek,
            policy,
            attempts: CAS_ATTEMPTS,
        }
    }

    /// The same flows under `policy`.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The id of the KEK that wraps every key (shown in volume metadata).
    pub fn kek_id(&self) -> &str {
        self.kek.id()
    }

    /// The one compare-and-swap loop of every flow that changes a record: reads the
    /// record of `volume_id` (`None` if there is none), lets `decide` look at it, and
    /// writes what it returns if the record has not changed since it was read; on a
    /// conflict it reads again and asks again, at most `attempts` times.
    async fn update<T>(
        &self,
        volume_id: &str,
        mut decide: impl FnMut(Option<&Arc<VolumeRecord>>) -> Result<Step<T>, KeysError>,
    ) -> Result<Applied<T>, KeysError> {
        for _ in 0..self.attempts {
            let current = self
                .store
                .get(volume_id)
                .await
                .map_err(store_err(volume_id))?;
            let (rev, rec) = match &current {
                Some((rev, rec)) => (Some(*rev), Some(rec)),
                None => (None, None),
            };
            match decide(rec)? {
                Step::Keep(value) => {
                    let record = existing(volume_id, rec)?.clone();
                    return Ok(Applied {
                        record,
                        written: false,
                        value,
                    });
                }
                Step::Write(record, value) => match self.store.put(&record, rev).await {
                    Ok(_) => {
                        return Ok(Applied {
                            record: Arc::new(record),
                            written: true,
                            value,
                        })
                    }
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => return Err(store_err(volume_id)(e)),
                },
            }
        }
        Err(KeysError::Contention {
            volume_id: volume_id.to_string(),
        })
    }

    /// The record of `volume_id` (shared with the store's cache).
    async fn load(&self, volume_id: &str) -> Result<Arc<VolumeRecord>, KeysError> {
        self.store
            .get(volume_id)
            .await
            .map_err(store_err(volume_id))?
            .map(|(_, rec)| rec)
            .ok_or_else(|| not_found(volume_id))
    }

    /// `version` of `rec`, unwrapped if `with_key`.
    fn serve(
        &self,
        rec: &VolumeRecord,
        version: u64,
        with_key: bool,
    ) -> Result<ServedKey, KeysError> {
        let kv = rec.version(version).ok_or_else(|| KeysError::NoVersion {
            volume_id: rec.volume_id.clone(),
            version,
            current: rec.current_version(),
        })?;
        let wrapped = match (kv.state, &kv.wrapped) {
            (KeyState::Active, Some(w)) => w,
            (KeyState::Active, None) => {
                return Err(KeysError::ActiveWithoutKey {
                    volume_id: rec.volume_id.clone(),
                    version,
                })
            }
            (_, _) => {
                return Err(KeysError::Retired {
                    volume_id: rec.volume_id.clone(),
                    version,
                    retired_at: kv.retired_at.as_deref().unwrap_or("?").to_string(),
                    current: rec.current_version(),
                })
            }
        };
        let key = if with_key {
            Some(
                self.kek
                    .unwrap(&rec.volume_id, version, wrapped)
                    .map_err(wrap_err(&rec.volume_id))?,
            )
        } else {
            None
        };
        Ok(ServedKey {
            volume_id: rec.volume_id.clone(),
            version,
            current_version: rec.current_version(),
            key,
        })
    }

    /// A fresh key for `version` of `volume_id`, wrapped.
    fn new_version(&self, volume_id: &str, version: u64) -> Result<KeyVersion, KeysError> {
        let key = VolumeKey::generate().map_err(wrap_err(volume_id))?;
        let wrapped = self
            .kek
            .wrap(volume_id, version, &key)
            .map_err(wrap_err(volume_id))?;
        Ok(KeyVersion {
            version,
            state: KeyState::Active,
            created_at: crate::now_rfc3339(),
            retired_at: None,
            wrapped: Some(wrapped),
        })
    }

    async fn scrub(&self) {
        if let Err(e) = self.store.scrub().await {
            warn!(error = %e, "store scrub after wiping a key failed; the key is unreadable without the KEK, and the next scrub retries");
        }
    }

    /// Creates `volume_id`'s key bound to `node` (empty: the calling node), or, if it
    /// exists bound to that node already, serves its current version (a retried create
    /// gets the same key). The key bytes are served to a node only.
    pub async fn create(
        &self,
        who: &Identity,
        volume_id: &str,
        node: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<ServedKey, KeysError> {
        let target = authz::create_target(who, node).map_err(denied(volume_id))?;
        let with_key = authz::receives_key_bytes(who);
        let applied = self
            .update(volume_id, |rec| match rec {
                Some(rec) => {
                    authz::check(who, Action::Create { node }, Some(rec), self.policy)
                        .map_err(denied(volume_id))?;
                    alive(rec)?;
                    if rec.node_id != target {
                        return Err(KeysError::BoundElsewhere {
                            volume_id: rec.volume_id.clone(),
                            node_id: rec.node_id.clone(),
                        });
                    }
                    Ok(Step::Keep(()))
                }
                None => Ok(Step::Write(
                    VolumeRecord {
                        volume_id: volume_id.to_string(),
                        node_id: target.to_string(),
                        versions: vec![self.new_version(volume_id, 1)?],
                        labels: labels.clone(),
                        created_at: crate::now_rfc3339(),
                        destroyed_at: None,
                    },
                    (),
                )),
            })
            .await?;
        if applied.written {
            info!(node = %target, "volume key created");
        }
        let rec = &applied.record;
        self.serve(rec, rec.current_version(), with_key)
    }

    /// Serves `version` (0: the current one) of `volume_id`'s key.
    pub async fn get(
        &self,
        who: &Identity,
        volume_id: &str,
        version: u64,
    ) -> Result<ServedKey, KeysError> {
        let rec = self.load(volume_id).await?;
        authz::check(who, Action::Get, Some(&rec), self.policy).map_err(denied(volume_id))?;
        alive(&rec)?;
        let v = if version == 0 {
            rec.current_version()
        } else {
            version
        };
        self.serve(&rec, v, true)
    }

    /// Adds a version to `volume_id` and serves it (its bytes to a node only). With
    /// `expected_current` set (non-zero), a volume already rotated past it gets no new
    /// version (a retry after a crash): its current version is served.
    pub async fn rotate(
        &self,
        who: &Identity,
        volume_id: &str,
        expected_current: u64,
    ) -> Result<ServedKey, KeysError> {
        let with_key = authz::receives_key_bytes(who);
        let applied = self
            .update(volume_id, |rec| {
                let rec = existing(volume_id, rec)?;
                authz::check(who, Action::Rotate, Some(rec), self.policy)
                    .map_err(denied(volume_id))?;
                alive(rec)?;
                let cur = rec.current_version();
                let expected = expected_current;
                if expected != 0 && cur > expected {
                    return Ok(Step::Keep(cur));
                }
                if expected != 0 && cur < expected {
                    return Err(KeysError::AheadOfBroker {
                        volume_id: rec.volume_id.clone(),
                        expected,
                        current: cur,
                    });
                }
                if cur >= validate::MAX_VERSION {
                    return Err(KeysError::NoVersionsLeft {
                        volume_id: rec.volume_id.clone(),
                    });
                }
                let mut rec = VolumeRecord::clone(rec);
                rec.versions
                    .push(self.new_version(&rec.volume_id, cur + 1)?);
                Ok(Step::Write(rec, cur + 1))
            })
            .await?;
        if applied.written {
            info!(version = applied.value, "volume key rotated");
        }
        self.serve(&applied.record, applied.value, with_key)
    }

    /// Retires `version` of `volume_id`: its wrapped key is wiped (and the store
    /// scrubbed). Retiring a version that is no longer active changes nothing; the
    /// current version cannot be retired.
    pub async fn retire(
        &self,
        who: &Identity,
        volume_id: &str,
        version: u64,
    ) -> Result<Arc<VolumeRecord>, KeysError> {
        let applied = self
            .update(volume_id, |rec| {
                let rec = existing(volume_id, rec)?;
                authz::check(who, Action::Retire, Some(rec), self.policy)
                    .map_err(denied(volume_id))?;
                let cur = rec.current_version();
                let Some(kv) = rec.version(version) else {
                    return Err(KeysError::NoVersionToRetire {
                        volume_id: volume_id.to_string(),
                        version,
                    });
                };
                if kv.state != KeyState::Active {
                    return Ok(Step::Keep(()));
                }
                if version == cur {
                    return Err(KeysError::RetireCurrent {
                        volume_id: volume_id.to_string(),
                        version,
                    });
                }
                let mut rec = VolumeRecord::clone(rec);
                if let Some(kv) = rec.version_mut(version) {
                    kv.state = KeyState::Retired;
                    kv.retired_at = Some(crate::now_rfc3339());
                    kv.wrapped = None;
                }
                Ok(Step::Write(rec, ()))
            })
            .await?;
        if applied.written {
            info!(version, "key version retired");
            self.scrub().await;
        }
        Ok(applied.record)
    }

    /// Destroys every key of `volume_id` (crypto-erase), leaving a tombstone; the store
    /// is scrubbed. Destroying a destroyed volume changes nothing. `reason` is logged.
    pub async fn destroy(
        &self,
        who: &Identity,
        volume_id: &str,
        reason: &str,
    ) -> Result<Arc<VolumeRecord>, KeysError> {
        let applied = self
            .update(volume_id, |rec| {
                let rec = existing(volume_id, rec)?;
                authz::check(who, Action::Destroy, Some(rec), self.policy)
                    .map_err(denied(volume_id))?;
                if rec.destroyed_at.is_some() {
                    return Ok(Step::Keep(()));
                }
                let mut rec = VolumeRecord::clone(rec);
                let now = crate::now_rfc3339();
                for kv in &mut rec.versions {
                    kv.state = KeyState::Destroyed;
                    kv.wrapped = None;
                    kv.retired_at.get_or_insert_with(|| now.clone());
                }
                rec.destroyed_at = Some(now);
                Ok(Step::Write(rec, ()))
            })
            .await?;
        if applied.written {
            warn!(reason = %reason, "volume key destroyed (crypto-erase)");
            self.scrub().await;
        }
        Ok(applied.record)
    }

    /// Binds `volume_id` to `new_node` (admins only). With `expected_node` set
    /// (non-empty), refuses unless the volume is bound to it. Rebinding to the node it is
    /// bound to changes nothing.
    pub async fn rebind(
        &self,
        who: &Identity,
        volume_id: &str,
        new_node: &str,
        expected_node: &str,
    ) -> Result<Arc<VolumeRecord>, KeysError> {
        authz::check(who, Action::Rebind, None, self.policy).map_err(denied(volume_id))?;
        let applied = self
            .update(volume_id, |rec| {
                let rec = existing(volume_id, rec)?;
                alive(rec)?;
                if rec.node_id == new_node {
                    return Ok(Step::Keep(String::new()));
                }
                if !expected_node.is_empty() && rec.node_id != expected_node {
                    return Err(KeysError::NotOnExpectedNode {
                        volume_id: rec.volume_id.clone(),
                        bound: rec.node_id.clone(),
                        expected: expected_node.to_string(),
                    });
                }
                let mut rec = VolumeRecord::clone(rec);
                let from = std::mem::replace(&mut rec.node_id, new_node.to_string());
                Ok(Step::Write(rec, from))
            })
            .await?;
        if applied.written {
            info!(from = %applied.value, to = %new_node, "volume rebound");
        }
        Ok(applied.record)
    }

    /// The metadata of `volume_id`.
    pub async fn describe(
        &self,
        who: &Identity,
        volume_id: &str,
    ) -> Result<Arc<VolumeRecord>, KeysError> {
        let rec = self.load(volume_id).await?;
        authz::check(who, Action::Describe, Some(&rec), self.policy).map_err(denied(volume_id))?;
        Ok(rec)
    }

    /// The volumes of `node` (empty: a node's own, or every volume for an admin), by
    /// volume id. A node lists only its own volumes.
    pub async fn list(&self, who: &Identity, node: &str) -> Result<Vec<VolumeRecord>, KeysError> {
        authz::check(who, Action::List { node }, None, self.policy).map_err(denied(""))?;
        let node = match (who, node) {
            (Identity::Node(me), _) => Some(me.as_str()),
            (_, "") => None,
            (_, n) => Some(n),
        };
        let mut all = self.store.list().await.map_err(store_err(""))?;
        all.retain(|rec| node.is_none_or(|n| rec.node_id == n));
        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(all)
    }
}
