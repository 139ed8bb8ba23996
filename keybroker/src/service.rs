//! The `nodecrypt.keybroker.v1.KeyBroker` service: request validation → authorization →
//! store/wrap → audit → response. Every outcome, success or refusal, is audited before
//! the response leaves; a call whose audit line cannot be written fails (UNAVAILABLE) and
//! returns no key.

use std::sync::Arc;

use nodecrypt_proto::keybroker::v1 as pb;
use pb::key_broker_server::KeyBroker;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::audit::{AuditEvent, AuditLog};
use crate::authz::{self, Action, Policy};
use crate::identity::{Identity, IdentityError};
use crate::store::{KeyState, KeyStore, KeyVersion, Revision, StoreError, VolumeRecord};
use crate::tls::Peer;
use crate::validate;
use crate::wrap::{Kek, VolumeKey, WrapError};

/// How often a compare-and-swap is retried under contention before giving up (ABORTED).
const CAS_ATTEMPTS: usize = 256;

/// The broker service state.
pub struct Broker {
    store: Arc<dyn KeyStore>,
    kek: Arc<Kek>,
    audit: AuditLog,
    policy: Policy,
}

/// The audit `rpc` of a break-glass key read: distinct from `GetVolumeKey`, so that a
/// search of the audit log for recovery reads finds every one.
pub const RECOVERY_READ_RPC: &str = "GetVolumeKey:RECOVERY_READ";

/// The authenticated caller of one request.
struct Caller {
    identity: Identity,
}

/// Whether an RPC only reads or changes state: it sets the level of the RPC's span (see
/// [`Broker::run`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Change,
}

/// What a call did, for the audit line.
struct Outcome<T> {
    result: Result<T, Status>,
    version: Option<u64>,
    detail: Option<String>,
}

impl<T> Outcome<T> {
    fn of(result: Result<(T, Option<u64>), Status>) -> Self {
        match result {
            Ok((v, version)) => Self {
                result: Ok(v),
                version,
                detail: None,
            },
            Err(e) => Self {
                detail: Some(e.message().to_string()),
                result: Err(e),
                version: None,
            },
        }
    }
}

fn invalid(e: validate::Invalid) -> Status {
    Status::invalid_argument(e.0)
}

fn denied(e: authz::Denied) -> Status {
    Status::permission_denied(e.0)
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::Conflict(v) => {
            Status::aborted(format!("volume {v}: too much contention, retry"))
        }
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        StoreError::Backend(_) | StoreError::Io { .. } => Status::unavailable(e.to_string()),
    }
}

fn wrap_err(e: WrapError) -> Status {
    match e {
        WrapError::Unwrap { .. } | WrapError::WrongKek { .. } => Status::data_loss(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn not_found(volume_id: &str) -> Status {
    Status::not_found(format!("volume {volume_id} has no key at this broker"))
}

fn destroyed(rec: &VolumeRecord) -> Option<Status> {
    rec.destroyed_at.as_ref().map(|at| {
        Status::failed_precondition(format!(
            "volume {} was destroyed at {at}: its key no longer exists and its data is unrecoverable",
            rec.volume_id
        ))
    })
}

/// Volume ids from the wire may be anything; the audit log keeps a bounded, printable form.
fn audit_safe(s: &str) -> Arc<str> {
    if s.len() <= 128 && !s.chars().any(char::is_control) {
        return s.into();
    }
    let clean: String = s
        .chars()
        .take(128)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 128 {
        format!("{clean}…").into()
    } else {
        clean.into()
    }
}

/// Builds the wire form of a record (metadata only).
pub fn volume_info(rec: &VolumeRecord, kek_id: &str) -> pb::VolumeInfo {
    pb::VolumeInfo {
        volume_id: rec.volume_id.clone(),
        node_id: rec.node_id.clone(),
        current_version: rec.current_version(),
        versions: rec
            .versions
            .iter()
            .map(|v| pb::KeyVersionInfo {
                version: v.version,
                state: match v.state {
                    KeyState::Active => pb::KeyState::Active,
                    KeyState::Retired => pb::KeyState::Retired,
                    KeyState::Destroyed => pb::KeyState::Destroyed,
                } as i32,
                created_at: v.created_at.clone(),
                retired_at: v.retired_at.clone().unwrap_or_default(),
            })
            .collect(),
        labels: rec.labels.clone().into_iter().collect(),
        created_at: rec.created_at.clone(),
        destroyed_at: rec.destroyed_at.clone().unwrap_or_default(),
        kek_id: kek_id.to_string(),
    }
}

impl Broker {
    /// A service over `store`, wrapping with `kek`, auditing to `audit`. Callers are
    /// identified by the [`Peer`] their connection established
    /// ([`crate::tls::incoming`] decides the trust domain).
    pub fn new(store: Arc<dyn KeyStore>, kek: Arc<Kek>, audit: AuditLog) -> Self {
        Self {
            store,
            kek,
            audit,
            policy: Policy::default(),
        }
    }

    /// The same service under `policy` (default: [`Policy::default`], no recovery reads).
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The caller, from the identity its connection established at the TLS handshake.
    /// Also returns its SPIFFE id, shared with the peer.
    fn caller(peer: Option<&Peer>) -> Result<(Caller, Arc<str>), Status> {
        let peer = peer.ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let (identity, spiffe) = peer.identity().map_err(|e| match e {
            IdentityError::NoCertificate => Status::unauthenticated(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        })?;
        let caller = Caller {
            identity: identity.clone(),
        };
        Ok((caller, spiffe.clone()))
    }

    /// Runs one RPC: identifies the caller, runs `op` in a span, audits, answers.
    async fn run<Req, T, F, Fut>(
        &self,
        rpc: &'static str,
        access: Access,
        req: Request<Req>,
        volume_id: impl Fn(&Req) -> &str,
        op: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller, Req) -> Fut,
        Fut: std::future::Future<Output = Outcome<T>>,
    {
        let peer = req.extensions().get::<Peer>().cloned();
        let caller = Self::caller(peer.as_ref());
        let inner = req.into_inner();
        let vid = audit_safe(volume_id(&inner));
        // Who, as the span, the log and the audit line name it: shared with the
        // connection's Peer, so naming the caller copies nothing.
        let (who, addr): (Arc<str>, Arc<str>) = match &caller {
            Ok((_, spiffe)) => (
                spiffe.clone(),
                peer.as_ref()
                    .map_or_else(|| "".into(), |p| p.addr().clone()),
            ),
            Err(e) => (
                format!("unauthenticated: {}", e.message()).into(),
                "".into(),
            ),
        };
        // A span per request. Calls that change state get it at info level (what they log
        // inside is a state change a human wants to see, with its volume and peer); reads
        // (key fetches, descriptions, listings) log nothing at info when they succeed and
        // are all in the audit log, so their span is debug (cheaper by ~4 % of a fetch's
        // CPU), and a refusal names rpc, volume and peer in its own fields.
        let span = match access {
            Access::Read => tracing::debug_span!("rpc", rpc, volume_id = %vid, peer = %who),
            Access::Change => tracing::info_span!("rpc", rpc, volume_id = %vid, peer = %who),
        };
        let outcome = match caller {
            Ok((c, _)) => op(c, inner).instrument(span.clone()).await,
            Err(e) => Outcome {
                result: Err(e),
                version: None,
                detail: None,
            },
        };
        let Outcome {
            result,
            version,
            detail,
        } = outcome;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        let event = AuditEvent {
            peer: who.clone(),
            peer_addr: addr,
            rpc,
            volume_id: vid.clone(),
            version,
            result: code_name(code),
            detail,
        };
        if let Err(e) = self.audit.record(event).await {
            let _g = span.enter();
            warn!(rpc, volume_id = %vid, peer = %who, error = %e, "audit failed; the call is refused");
            // A call that had already failed keeps its own cause first (a full state
            // filesystem fails the store before the audit log).
            return Err(match result {
                Err(s) => Status::new(
                    s.code(),
                    format!("{}; the audit log is unavailable too: {e}", s.message()),
                ),
                Ok(_) => Status::unavailable(format!("audit log unavailable, nothing served: {e}")),
            });
        }
        {
            let _g = span.enter();
            match &result {
                Ok(_) => tracing::debug!(version = ?version, "ok"),
                Err(s) => info!(
                    rpc,
                    volume_id = %vid,
                    peer = %who,
                    code = code_name(s.code()),
                    message = s.message(),
                    "refused"
                ),
            }
        }
        result.map(Response::new)
    }

    /// The record of `volume_id` (shared with the store's cache: clone it to change it).
    async fn load(&self, volume_id: &str) -> Result<(Revision, Arc<VolumeRecord>), Status> {
        self.store
            .get(volume_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| not_found(volume_id))
    }

    /// The answer carrying `version`'s key; with `with_key` false (an admin's create or
    /// rotate) the key field is left empty and nothing is unwrapped.
    fn key_message(
        &self,
        rec: &VolumeRecord,
        version: u64,
        with_key: bool,
    ) -> Result<pb::VolumeKey, Status> {
        let kv = rec.version(version).ok_or_else(|| {
            Status::not_found(format!(
                "volume {} has no key version {version} (current is {})",
                rec.volume_id,
                rec.current_version()
            ))
        })?;
        let wrapped = match (kv.state, &kv.wrapped) {
            (KeyState::Active, Some(w)) => w,
            (KeyState::Active, None) => {
                return Err(Status::data_loss(format!(
                    "volume {} version {version}: active but no wrapped key is stored",
                    rec.volume_id
                )))
            }
            (_, _) => {
                return Err(Status::failed_precondition(format!(
                    "version {version} of volume {} was retired at {}; use the current version {}",
                    rec.volume_id,
                    kv.retired_at.as_deref().unwrap_or("?"),
                    rec.current_version()
                )))
            }
        };
        let key = if with_key {
            let key = self
                .kek
                .unwrap(&rec.volume_id, version, wrapped)
                .map_err(wrap_err)?;
            key.expose().to_vec()
        } else {
            Vec::new()
        };
        Ok(pb::VolumeKey {
            volume_id: rec.volume_id.clone(),
            version,
            key,
            current_version: rec.current_version(),
        })
    }

    fn new_version(&self, volume_id: &str, version: u64) -> Result<KeyVersion, Status> {
        let key = VolumeKey::generate().map_err(wrap_err)?;
        let wrapped = self.kek.wrap(volume_id, version, &key).map_err(wrap_err)?;
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

    async fn create(
        &self,
        c: &Caller,
        r: &pb::CreateVolumeKeyRequest,
    ) -> Result<(pb::VolumeKey, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        if !r.node_id.is_empty() {
            validate::node_id(&r.node_id).map_err(invalid)?;
        }
        validate::labels(r.labels.iter()).map_err(invalid)?;
        let target = authz::create_target(&c.identity, &r.node_id)
            .map_err(denied)?
            .to_string();
        let with_key = authz::receives_key_bytes(&c.identity);
        for _ in 0..CAS_ATTEMPTS {
            if let Some((_, rec)) = self.store.get(&r.volume_id).await.map_err(store_err)? {
                authz::check(
                    &c.identity,
                    Action::Create { node: &r.node_id },
                    Some(&rec),
                    self.policy,
                )
                .map_err(denied)?;
                if let Some(s) = destroyed(&rec) {
                    return Err(s);
                }
                if rec.node_id != target {
                    return Err(Status::already_exists(format!(
                        "volume {} already exists, bound to node {}; rebind it instead",
                        rec.volume_id, rec.node_id
                    )));
                }
                let v = rec.current_version();
                return Ok((self.key_message(&rec, v, with_key)?, Some(v)));
            }
            let now = crate::now_rfc3339();
            let rec = VolumeRecord {
                volume_id: r.volume_id.clone(),
                node_id: target.clone(),
                versions: vec![self.new_version(&r.volume_id, 1)?],
                labels: r.labels.clone().into_iter().collect(),
                created_at: now,
                destroyed_at: None,
            };
            match self.store.put(&rec, None).await {
                Ok(_) => {
                    info!(node = %target, "volume key created");
                    return Ok((self.key_message(&rec, 1, with_key)?, Some(1)));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(store_err(StoreError::Conflict(r.volume_id.clone())))
    }

    async fn get(
        &self,
        c: &Caller,
        r: &pb::GetVolumeKeyRequest,
    ) -> Result<(pb::VolumeKey, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.version, true).map_err(invalid)?;
        let (_, rec) = self.load(&r.volume_id).await?;
        authz::check(&c.identity, Action::Get, Some(&rec), self.policy).map_err(denied)?;
        if let Some(s) = destroyed(&rec) {
            return Err(s);
        }
        let v = if r.version == 0 {
            rec.current_version()
        } else {
            r.version
        };
        Ok((self.key_message(&rec, v, true)?, Some(v)))
    }

    async fn rotate(
        &self,
        c: &Caller,
        r: &pb::RotateVolumeKeyRequest,
    ) -> Result<(pb::VolumeKey, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.expected_current_version, true).map_err(invalid)?;
        let with_key = authz::receives_key_bytes(&c.identity);
        for _ in 0..CAS_ATTEMPTS {
            let (rev, rec) = self.load(&r.volume_id).await?;
            let mut rec = Arc::unwrap_or_clone(rec);
            authz::check(&c.identity, Action::Rotate, Some(&rec), self.policy).map_err(denied)?;
            if let Some(s) = destroyed(&rec) {
                return Err(s);
            }
            let cur = rec.current_version();
            let expected = r.expected_current_version;
            if expected != 0 && cur > expected {
                // Already rotated past what the caller saw (a retry after a crash): no new version.
                return Ok((self.key_message(&rec, cur, with_key)?, Some(cur)));
            }
            if expected != 0 && cur < expected {
                return Err(Status::failed_precondition(format!(
                    "volume {}: expected current version {expected}, but the broker's is {cur}",
                    rec.volume_id
                )));
            }
            if cur >= validate::MAX_VERSION {
                return Err(Status::resource_exhausted(format!(
                    "volume {}: no versions left",
                    rec.volume_id
                )));
            }
            rec.versions
                .push(self.new_version(&rec.volume_id, cur + 1)?);
            match self.store.put(&rec, Some(rev)).await {
                Ok(_) => {
                    info!(version = cur + 1, "volume key rotated");
                    return Ok((self.key_message(&rec, cur + 1, with_key)?, Some(cur + 1)));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(store_err(StoreError::Conflict(r.volume_id.clone())))
    }

    async fn retire(
        &self,
        c: &Caller,
        r: &pb::RetireVolumeKeyVersionRequest,
    ) -> Result<(pb::VolumeInfo, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.version, false).map_err(invalid)?;
        for _ in 0..CAS_ATTEMPTS {
            let (rev, rec) = self.load(&r.volume_id).await?;
            let mut rec = Arc::unwrap_or_clone(rec);
            authz::check(&c.identity, Action::Retire, Some(&rec), self.policy).map_err(denied)?;
            let cur = rec.current_version();
            let kek_id = self.kek.id().to_string();
            let Some(kv) = rec.version_mut(r.version) else {
                return Err(Status::not_found(format!(
                    "volume {} has no key version {}",
                    r.volume_id, r.version
                )));
            };
            if kv.state != KeyState::Active {
                return Ok((volume_info(&rec, &kek_id), Some(r.version)));
            }
            if r.version == cur {
                return Err(Status::failed_precondition(format!(
                    "version {} is the current version of volume {}; rotate before retiring it",
                    r.version, r.volume_id
                )));
            }
            kv.state = KeyState::Retired;
            kv.retired_at = Some(crate::now_rfc3339());
            kv.wrapped = None;
            match self.store.put(&rec, Some(rev)).await {
                Ok(_) => {
                    info!(version = r.version, "key version retired");
                    self.scrub().await;
                    return Ok((volume_info(&rec, &kek_id), Some(r.version)));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(store_err(StoreError::Conflict(r.volume_id.clone())))
    }

    async fn destroy(
        &self,
        c: &Caller,
        r: &pb::DestroyVolumeKeyRequest,
    ) -> Result<(pb::VolumeInfo, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        if r.reason.len() > 256 {
            return Err(Status::invalid_argument("reason is at most 256 bytes"));
        }
        for _ in 0..CAS_ATTEMPTS {
            let (rev, rec) = self.load(&r.volume_id).await?;
            let mut rec = Arc::unwrap_or_clone(rec);
            authz::check(&c.identity, Action::Destroy, Some(&rec), self.policy).map_err(denied)?;
            if rec.destroyed_at.is_some() {
                return Ok((volume_info(&rec, self.kek.id()), None));
            }
            let now = crate::now_rfc3339();
            for kv in &mut rec.versions {
                kv.state = KeyState::Destroyed;
                kv.wrapped = None;
                kv.retired_at.get_or_insert_with(|| now.clone());
            }
            rec.destroyed_at = Some(now);
            match self.store.put(&rec, Some(rev)).await {
                Ok(_) => {
                    warn!(reason = %r.reason, "volume key destroyed (crypto-erase)");
                    self.scrub().await;
                    return Ok((volume_info(&rec, self.kek.id()), None));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(store_err(StoreError::Conflict(r.volume_id.clone())))
    }

    async fn rebind(
        &self,
        c: &Caller,
        r: &pb::RebindVolumeKeyRequest,
    ) -> Result<(pb::VolumeInfo, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::node_id(&r.new_node_id).map_err(invalid)?;
        if !r.expected_node_id.is_empty() {
            validate::node_id(&r.expected_node_id).map_err(invalid)?;
        }
        authz::check(&c.identity, Action::Rebind, None, self.policy).map_err(denied)?;
        for _ in 0..CAS_ATTEMPTS {
            let (rev, rec) = self.load(&r.volume_id).await?;
            let mut rec = Arc::unwrap_or_clone(rec);
            if let Some(s) = destroyed(&rec) {
                return Err(s);
            }
            if rec.node_id == r.new_node_id {
                return Ok((volume_info(&rec, self.kek.id()), None));
            }
            if !r.expected_node_id.is_empty() && rec.node_id != r.expected_node_id {
                return Err(Status::failed_precondition(format!(
                    "volume {} is bound to node {}, not {}",
                    rec.volume_id, rec.node_id, r.expected_node_id
                )));
            }
            let from = std::mem::replace(&mut rec.node_id, r.new_node_id.clone());
            match self.store.put(&rec, Some(rev)).await {
                Ok(_) => {
                    info!(from = %from, to = %r.new_node_id, "volume rebound");
                    return Ok((volume_info(&rec, self.kek.id()), None));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(store_err(StoreError::Conflict(r.volume_id.clone())))
    }
}

#[tonic::async_trait]
impl KeyBroker for Broker {
    async fn create_volume_key(
        &self,
        req: Request<pb::CreateVolumeKeyRequest>,
    ) -> Result<Response<pb::VolumeKey>, Status> {
        self.run(
            "CreateVolumeKey",
            Access::Change,
            req,
            |r| &r.volume_id,
            |c, r| async move { Outcome::of(self.create(&c, &r).await) },
        )
        .await
    }

    async fn get_volume_key(
        &self,
        req: Request<pb::GetVolumeKeyRequest>,
    ) -> Result<Response<pb::VolumeKey>, Status> {
        // A break-glass read is audited under its own rpc name, with a WARN line, whether
        // it is served or refused.
        let recovery = req
            .extensions()
            .get::<Peer>()
            .is_some_and(|p| matches!(p.identity(), Ok((Identity::Recovery(_), _))));
        let rpc = if recovery {
            RECOVERY_READ_RPC
        } else {
            "GetVolumeKey"
        };
        self.run(
            rpc,
            Access::Read,
            req,
            |r| &r.volume_id,
            |c, r| async move {
                let mut o = Outcome::of(self.get(&c, &r).await);
                o.version = o.version.or(Some(r.version));
                if let Identity::Recovery(name) = &c.identity {
                    let served = o.result.is_ok();
                    warn!(
                        recovery = %name,
                        volume_id = %audit_safe(&r.volume_id),
                        served,
                        "BREAK-GLASS recovery read of a volume key"
                    );
                    let note = if served {
                        "break-glass recovery read: key served"
                    } else {
                        "break-glass recovery read: refused"
                    };
                    o.detail = Some(match o.detail.take() {
                        Some(d) => format!("{note}: {d}"),
                        None => note.to_string(),
                    });
                }
                o
            },
        )
        .await
    }

    async fn rotate_volume_key(
        &self,
        req: Request<pb::RotateVolumeKeyRequest>,
    ) -> Result<Response<pb::VolumeKey>, Status> {
        self.run(
            "RotateVolumeKey",
            Access::Change,
            req,
            |r| &r.volume_id,
            |c, r| async move { Outcome::of(self.rotate(&c, &r).await) },
        )
        .await
    }

    async fn retire_volume_key_version(
        &self,
        req: Request<pb::RetireVolumeKeyVersionRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        self.run(
            "RetireVolumeKeyVersion",
            Access::Change,
            req,
            |r| &r.volume_id,
            |c, r| async move {
                let mut o = Outcome::of(self.retire(&c, &r).await);
                o.version = Some(r.version);
                o
            },
        )
        .await
    }

    async fn destroy_volume_key(
        &self,
        req: Request<pb::DestroyVolumeKeyRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        self.run(
            "DestroyVolumeKey",
            Access::Change,
            req,
            |r| &r.volume_id,
            |c, r| async move {
                let mut o = Outcome::of(self.destroy(&c, &r).await);
                if o.result.is_ok() && !r.reason.is_empty() {
                    o.detail = Some(format!("reason: {}", audit_safe(&r.reason)));
                }
                o
            },
        )
        .await
    }

    async fn rebind_volume_key(
        &self,
        req: Request<pb::RebindVolumeKeyRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        self.run(
            "RebindVolumeKey",
            Access::Change,
            req,
            |r| &r.volume_id,
            |c, r| async move {
                let mut o = Outcome::of(self.rebind(&c, &r).await);
                if o.result.is_ok() {
                    o.detail = Some(format!("bound to node {}", audit_safe(&r.new_node_id)));
                }
                o
            },
        )
        .await
    }

    async fn list_volume_keys(
        &self,
        req: Request<pb::ListVolumeKeysRequest>,
    ) -> Result<Response<pb::ListVolumeKeysResponse>, Status> {
        self.run(
            "ListVolumeKeys",
            Access::Read,
            req,
            |_| "",
            |c, r| async move {
                Outcome::of(
                    async {
                        if !r.node_id.is_empty() {
                            validate::node_id(&r.node_id).map_err(invalid)?;
                        }
                        authz::check(
                            &c.identity,
                            Action::List { node: &r.node_id },
                            None,
                            self.policy,
                        )
                        .map_err(denied)?;
                        let node = match (&c.identity, r.node_id.as_str()) {
                            (Identity::Node(me), _) => Some(me.as_str()),
                            (_, "") => None,
                            (_, n) => Some(n),
                        };
                        let mut all = self.store.list().await.map_err(store_err)?;
                        all.retain(|rec| node.is_none_or(|n| rec.node_id == n));
                        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
                        let volumes = all
                            .iter()
                            .map(|rec| volume_info(rec, self.kek.id()))
                            .collect();
                        Ok((pb::ListVolumeKeysResponse { volumes }, None))
                    }
                    .await,
                )
            },
        )
        .await
    }

    async fn describe_volume(
        &self,
        req: Request<pb::DescribeVolumeRequest>,
    ) -> Result<Response<pb::VolumeInfo>, Status> {
        self.run(
            "DescribeVolume",
            Access::Read,
            req,
            |r| &r.volume_id,
            |c, r| async move {
                Outcome::of(
                    async {
                        validate::volume_id(&r.volume_id).map_err(invalid)?;
                        let (_, rec) = self.load(&r.volume_id).await?;
                        authz::check(&c.identity, Action::Describe, Some(&rec), self.policy)
                            .map_err(denied)?;
                        Ok((volume_info(&rec, self.kek.id()), None))
                    }
                    .await,
                )
            },
        )
        .await
    }
}

/// The canonical gRPC name of a status code ("PERMISSION_DENIED").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
