//! The `nodecrypt.agent.v1` gRPC service: thin — checks the caller, calls
//! [`crate::volume`], maps errors to status codes. Served on a root-only Unix socket and,
//! optionally, on TCP with mTLS for admin identities.

use std::sync::Arc;

use nodecrypt_common::tls::Peer;
use nodecrypt_proto::agent::v1 as pb;
use pb::agent_server::Agent as AgentRpc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use std::path::PathBuf;

use nodecrypt_common::{status, VolumeId};

use crate::config::BackendChoice;
use crate::volume::types::{
    Backend, FormatRequest, OpenRequest, Repair, State, Target, UnlockResult, Volume,
};
use crate::volume::{Agent, VolumeError};

/// Who may call: root over the Unix socket, an admin certificate over TCP.
#[derive(Clone)]
pub enum Gate {
    /// Unix socket: the peer's uid must be 0.
    RootPeer,
    /// mTLS: the client certificate must carry an admin SPIFFE id of the trust domain the
    /// listener was set up with ([`nodecrypt_common::tls::incoming`]).
    Admin,
}

impl Gate {
    /// Admits or refuses a request; returns a description of the caller.
    pub fn check<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match self {
            Gate::RootPeer => {
                let cred = req
                    .extensions()
                    .get::<UdsConnectInfo>()
                    .and_then(|i| i.peer_cred)
                    .ok_or_else(|| Status::permission_denied("peer credentials unavailable"))?;
                if cred.uid() != 0 {
                    return Err(Status::permission_denied(format!(
                        "uid {} may not use the nodecrypt agent: root only",
                        cred.uid()
                    )));
                }
                Ok(format!("uid 0 pid {}", cred.pid().unwrap_or(0)))
            }
            Gate::Admin => {
                let peer = req
                    .extensions()
                    .get::<Peer>()
                    .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
                let (id, spiffe) = peer
                    .identity()
                    .map_err(|e| Status::permission_denied(e.to_string()))?;
                if !id.is_admin() {
                    return Err(Status::permission_denied(format!(
                        "{spiffe} is not an admin identity: the agent's TCP API is for the cluster manager only"
                    )));
                }
                Ok(spiffe.to_string())
            }
        }
    }
}

/// The gRPC service over one [`Agent`].
pub struct Service {
    agent: Arc<Agent>,
    gate: Gate,
}

impl Service {
    /// A service admitting callers through `gate`.
    pub fn new(agent: Arc<Agent>, gate: Gate) -> Self {
        Self { agent, gate }
    }
}

/// The status of a failed flow: its code from the one table, its message, and a
/// refusal's reason code as `nodecrypt-reason` metadata (read by `--json`).
fn status(e: VolumeError) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    if let Some(reason) = e.reason() {
        if let Ok(v) = reason.parse() {
            md.insert(status::REASON_KEY, v);
        }
    }
    Status::with_metadata(e.code(), e.to_string(), md)
}

macro_rules! call {
    ($self:ident, $req:ident, $rpc:literal, |$agent:ident, $inner:ident| $body:expr) => {{
        let peer = $self.gate.check(&$req)?;
        let $inner = $req.into_inner();
        let $agent = $self.agent.clone();
        let span = info_span!("rpc", rpc = $rpc, peer = %peer);
        async move { $body.await.map(Response::new).map_err(status) }
            .instrument(span)
            .await
    }};
}

// ---------------------------------------------------------------- wire ↔ domain

fn volume_id(s: &str) -> Result<VolumeId, VolumeError> {
    Ok(VolumeId::parse(s)?)
}

fn backend_choice(b: i32) -> Option<BackendChoice> {
    match pb::Backend::try_from(b).unwrap_or(pb::Backend::Unspecified) {
        pb::Backend::DmCrypt => Some(BackendChoice::DmCrypt),
        pb::Backend::Userspace => Some(BackendChoice::Userspace),
        pb::Backend::Auto => Some(BackendChoice::Auto),
        pb::Backend::Unspecified => None,
    }
}

fn format_request(r: pb::FormatVolumeRequest) -> Result<FormatRequest, VolumeError> {
    Ok(FormatRequest {
        volume_id: volume_id(&r.volume_id)?,
        device: r.device,
        sector_size: (r.sector_size != 0).then_some(r.sector_size),
        force: r.force,
        labels: r.labels,
    })
}

fn open_request(r: pb::OpenVolumeRequest) -> Result<OpenRequest, VolumeError> {
    let target = match (r.device.is_empty(), r.volume_id.is_empty()) {
        (true, true) => return Err(VolumeError::NoTarget),
        (false, no_id) => Target::Device {
            path: r.device,
            expect: if no_id {
                None
            } else {
                Some(volume_id(&r.volume_id)?)
            },
        },
        (true, false) => Target::Volume(volume_id(&r.volume_id)?),
    };
    Ok(OpenRequest {
        target,
        name: (!r.name.is_empty()).then_some(r.name),
        backend: backend_choice(r.backend),
        allow_discards: r.allow_discards,
    })
}

fn path_string(p: Option<PathBuf>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// A domain volume on the wire.
pub fn volume_pb(v: Volume) -> pb::Volume {
    let mut out = pb::Volume {
        volume_id: v.volume_id.unwrap_or_default(),
        device: path_string(v.device),
        key_version: v.layout.key_version,
        sector_size: v.layout.sector_size,
        cipher: v.layout.cipher,
        key_bits: v.layout.key_bits,
        luks_uuid: v.layout.luks_uuid,
        broker: v.layout.broker,
        data_size: v.layout.data_size,
        problem: v.note.unwrap_or_default(),
        ..Default::default()
    };
    out.state = match v.state {
        State::Closed => pb::VolumeState::Closed,
        State::Erased => pb::VolumeState::Erased,
        State::Open(m) => {
            out.backend = match m.backend {
                Backend::DmCrypt => pb::Backend::DmCrypt,
                Backend::Userspace => pb::Backend::Userspace,
            } as i32;
            out.name = m.name;
            out.mapped_device = path_string(m.mapped_device);
            out.mapped_file = path_string(m.mapped_file);
            pb::VolumeState::Open
        }
        State::Refused { reason, problem } => {
            out.reason = reason.unwrap_or_default().to_string();
            out.problem = problem;
            pb::VolumeState::Refused
        }
    } as i32;
    out
}

/// One unlock-all outcome on the wire: `code` is the canonical name from the one table.
fn unlock_pb(r: UnlockResult) -> pb::UnlockResult {
    let (ok, volume, code, reason, message) = match r.result {
        Ok(v) => (true, Some(volume_pb(v)), "", "", String::new()),
        Err(e) => (
            false,
            None,
            status::name(e.code()),
            e.reason().unwrap_or_default(),
            e.to_string(),
        ),
    };
    pb::UnlockResult {
        volume_id: r.volume_id.unwrap_or_default(),
        device: r.device.display().to_string(),
        ok,
        code: code.to_string(),
        message,
        duration_ms: r.duration.as_millis() as u64,
        volume,
        reason: reason.to_string(),
    }
}

fn repair_pb(r: Repair) -> pb::RepairHeaderResponse {
    let (from, to) = r.copy.unwrap_or_default();
    pb::RepairHeaderResponse {
        device: r.device.display().to_string(),
        problem: r.problem,
        from: from.into(),
        to: to.into(),
        offset: r.offset,
        length: r.length,
        done: r.done,
        volume: r.volume.map(volume_pb),
    }
}

#[tonic::async_trait]
impl AgentRpc for Service {
    async fn format_volume(
        &self,
        req: Request<pb::FormatVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "FormatVolume", |a, r| async move {
            a.format(format_request(r)?).await.map(volume_pb)
        })
    }

    async fn open_volume(
        &self,
        req: Request<pb::OpenVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "OpenVolume", |a, r| async move {
            a.open(open_request(r)?).await.map(volume_pb)
        })
    }

    async fn close_volume(
        &self,
        req: Request<pb::CloseVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "CloseVolume", |a, r| async move {
            a.close(&volume_id(&r.volume_id)?).await.map(volume_pb)
        })
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "GetVolume", |a, r| async move {
            a.get(&volume_id(&r.volume_id)?).await.map(volume_pb)
        })
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        call!(self, req, "ListVolumes", |a, _r| async move {
            a.list().await.map(|v| pb::ListVolumesResponse {
                volumes: v.into_iter().map(volume_pb).collect(),
            })
        })
    }

    async fn unlock_all(
        &self,
        req: Request<pb::UnlockAllRequest>,
    ) -> Result<Response<pb::UnlockAllResponse>, Status> {
        call!(self, req, "UnlockAll", |a, _r| async move {
            a.unlock_all().await.map(|r| pb::UnlockAllResponse {
                results: r.into_iter().map(unlock_pb).collect(),
            })
        })
    }

    async fn rotate_volume(
        &self,
        req: Request<pb::RotateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "RotateVolume", |a, r| async move {
            a.rotate(&volume_id(&r.volume_id)?).await.map(volume_pb)
        })
    }

    async fn erase_volume(
        &self,
        req: Request<pb::EraseVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "EraseVolume", |a, r| async move {
            a.erase(&volume_id(&r.volume_id)?, r.confirm)
                .await
                .map(volume_pb)
        })
    }

    async fn repair_header(
        &self,
        req: Request<pb::RepairHeaderRequest>,
    ) -> Result<Response<pb::RepairHeaderResponse>, Status> {
        call!(self, req, "RepairHeader", |a, r| async move {
            a.repair_header(&r.device, &r.from, r.confirm)
                .await
                .map(repair_pb)
        })
    }

    async fn doctor(
        &self,
        req: Request<pb::DoctorRequest>,
    ) -> Result<Response<pb::DoctorReport>, Status> {
        call!(self, req, "Doctor", |a, _r| async move {
            Ok::<_, VolumeError>(pb::DoctorReport {
                checks: a
                    .doctor()
                    .await
                    .into_iter()
                    .map(|c| pb::DoctorCheck {
                        name: c.name,
                        ok: c.ok,
                        detail: c.detail,
                    })
                    .collect(),
            })
        })
    }
}
