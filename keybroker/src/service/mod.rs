//! The `nodecrypt.keybroker.v1.KeyBroker` service: request validation → the flows of
//! [`crate::keys`] (authorization, store, wrap) → audit → response; key errors become
//! status codes in one place (`status`). Every outcome, success or refusal, is audited
//! before the response leaves; a call whose audit line cannot be written fails
//! (UNAVAILABLE) and returns no key.

use std::sync::Arc;

use nodecrypt_proto::keybroker::v1 as pb;
use pb::key_broker_server::KeyBroker;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::audit::{AuditEvent, AuditLog};
use crate::authz::Policy;
use crate::identity::{Identity, IdentityError};
use crate::keys::{Keys, KeysError, ServedKey};
use crate::store::{KeyState, KeyStore, StoreError, VolumeRecord};
use crate::tls::Peer;
use crate::validate;
use crate::wrap::{Kek, WrapError};

/// The broker service state.
pub struct Broker {
    keys: Keys,
    audit: AuditLog,
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

/// The one mapping of a flow's error to the caller's status; the message is the error's.
fn status(e: KeysError) -> Status {
    let code = match &e {
        KeysError::Denied { .. } => Code::PermissionDenied,
        KeysError::NotFound { .. }
        | KeysError::NoVersion { .. }
        | KeysError::NoVersionToRetire { .. } => Code::NotFound,
        KeysError::Destroyed { .. }
        | KeysError::Retired { .. }
        | KeysError::AheadOfBroker { .. }
        | KeysError::RetireCurrent { .. }
        | KeysError::NotOnExpectedNode { .. } => Code::FailedPrecondition,
        KeysError::ActiveWithoutKey { .. } => Code::DataLoss,
        KeysError::BoundElsewhere { .. } => Code::AlreadyExists,
        KeysError::NoVersionsLeft { .. } => Code::ResourceExhausted,
        KeysError::Contention { .. } => Code::Aborted,
        KeysError::Store { source, .. } => match source {
            StoreError::Conflict(_) => Code::Aborted,
            StoreError::Corrupt { .. } => Code::DataLoss,
            StoreError::Backend(_) | StoreError::Io { .. } => Code::Unavailable,
        },
        KeysError::Wrap { source, .. } => match source {
            WrapError::Unwrap { .. } | WrapError::WrongKek { .. } => Code::DataLoss,
            _ => Code::Internal,
        },
    };
    Status::new(code, e.to_string())
}

/// The wire form of a served key (its bytes only where the flow unwrapped them), and its
/// version for the audit line.
fn key_message(served: ServedKey) -> (pb::VolumeKey, Option<u64>) {
    let ServedKey {
        volume_id,
        version,
        current_version,
        key,
    } = served;
    let message = pb::VolumeKey {
        volume_id,
        version,
        key: key.map(|k| k.expose().to_vec()).unwrap_or_default(),
        current_version,
    };
    (message, Some(version))
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
            keys: Keys::new(store, kek, Policy::default()),
            audit,
        }
    }

    /// The same service under `policy` (default: [`Policy::default`], no recovery reads).
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.keys = self.keys.with_policy(policy);
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
        let labels = r.labels.clone().into_iter().collect();
        let served = self
            .keys
            .create(&c.identity, &r.volume_id, &r.node_id, labels)
            .await
            .map_err(status)?;
        Ok(key_message(served))
    }

    async fn get(
        &self,
        c: &Caller,
        r: &pb::GetVolumeKeyRequest,
    ) -> Result<(pb::VolumeKey, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.version, true).map_err(invalid)?;
        let served = self
            .keys
            .get(&c.identity, &r.volume_id, r.version)
            .await
            .map_err(status)?;
        Ok(key_message(served))
    }

    async fn rotate(
        &self,
        c: &Caller,
        r: &pb::RotateVolumeKeyRequest,
    ) -> Result<(pb::VolumeKey, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.expected_current_version, true).map_err(invalid)?;
        let served = self
            .keys
            .rotate(&c.identity, &r.volume_id, r.expected_current_version)
            .await
            .map_err(status)?;
        Ok(key_message(served))
    }

    async fn retire(
        &self,
        c: &Caller,
        r: &pb::RetireVolumeKeyVersionRequest,
    ) -> Result<(pb::VolumeInfo, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        validate::version(r.version, false).map_err(invalid)?;
        let rec = self
            .keys
            .retire(&c.identity, &r.volume_id, r.version)
            .await
            .map_err(status)?;
        Ok((volume_info(&rec, self.keys.kek_id()), Some(r.version)))
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
        let rec = self
            .keys
            .destroy(&c.identity, &r.volume_id, &r.reason)
            .await
            .map_err(status)?;
        Ok((volume_info(&rec, self.keys.kek_id()), None))
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
        let rec = self
            .keys
            .rebind(
                &c.identity,
                &r.volume_id,
                &r.new_node_id,
                &r.expected_node_id,
            )
            .await
            .map_err(status)?;
        Ok((volume_info(&rec, self.keys.kek_id()), None))
    }

    async fn list(
        &self,
        c: &Caller,
        r: &pb::ListVolumeKeysRequest,
    ) -> Result<(pb::ListVolumeKeysResponse, Option<u64>), Status> {
        if !r.node_id.is_empty() {
            validate::node_id(&r.node_id).map_err(invalid)?;
        }
        let all = self
            .keys
            .list(&c.identity, &r.node_id)
            .await
            .map_err(status)?;
        let volumes = all
            .iter()
            .map(|rec| volume_info(rec, self.keys.kek_id()))
            .collect();
        Ok((pb::ListVolumeKeysResponse { volumes }, None))
    }

    async fn describe(
        &self,
        c: &Caller,
        r: &pb::DescribeVolumeRequest,
    ) -> Result<(pb::VolumeInfo, Option<u64>), Status> {
        validate::volume_id(&r.volume_id).map_err(invalid)?;
        let rec = self
            .keys
            .describe(&c.identity, &r.volume_id)
            .await
            .map_err(status)?;
        Ok((volume_info(&rec, self.keys.kek_id()), None))
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
            |c, r| async move { Outcome::of(self.list(&c, &r).await) },
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
            |c, r| async move { Outcome::of(self.describe(&c, &r).await) },
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

#[cfg(test)]
mod tests;
