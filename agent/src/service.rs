//! The `nodecrypt.agent.v1` gRPC service: thin — checks the caller, calls
//! [`crate::volume`], maps errors to status codes. Served on a root-only Unix socket and,
//! optionally, on TCP with mTLS for admin identities.

use std::sync::Arc;

use nodecrypt_keybroker::tls::Peer;
use nodecrypt_proto::agent::v1 as pb;
use pb::agent_server::Agent as AgentRpc;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::volume::{Agent, VolumeError};

/// Who may call: root over the Unix socket, an admin certificate over TCP.
#[derive(Clone)]
pub enum Gate {
    /// Unix socket: the peer's uid must be 0.
    RootPeer,
    /// mTLS: the client certificate must carry an admin SPIFFE id of the trust domain the
    /// listener was set up with ([`nodecrypt_keybroker::tls::incoming`]).
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
            md.insert(nodecrypt_common::status::REASON_KEY, v);
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

#[tonic::async_trait]
impl AgentRpc for Service {
    async fn format_volume(
        &self,
        req: Request<pb::FormatVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "FormatVolume", |a, r| a.format(r))
    }

    async fn open_volume(
        &self,
        req: Request<pb::OpenVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "OpenVolume", |a, r| a.open(r))
    }

    async fn close_volume(
        &self,
        req: Request<pb::CloseVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "CloseVolume", |a, r| a.close(r))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "GetVolume", |a, r| a.get(r))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        call!(self, req, "ListVolumes", |a, _r| async move {
            a.list()
                .await
                .map(|volumes| pb::ListVolumesResponse { volumes })
        })
    }

    async fn unlock_all(
        &self,
        req: Request<pb::UnlockAllRequest>,
    ) -> Result<Response<pb::UnlockAllResponse>, Status> {
        call!(self, req, "UnlockAll", |a, _r| async move {
            a.unlock_all()
                .await
                .map(|results| pb::UnlockAllResponse { results })
        })
    }

    async fn rotate_volume(
        &self,
        req: Request<pb::RotateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "RotateVolume", |a, r| a.rotate(r))
    }

    async fn erase_volume(
        &self,
        req: Request<pb::EraseVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        call!(self, req, "EraseVolume", |a, r| a.erase(r))
    }

    async fn repair_header(
        &self,
        req: Request<pb::RepairHeaderRequest>,
    ) -> Result<Response<pb::RepairHeaderResponse>, Status> {
        call!(self, req, "RepairHeader", |a, r| a.repair_header(r))
    }

    async fn doctor(
        &self,
        req: Request<pb::DoctorRequest>,
    ) -> Result<Response<pb::DoctorReport>, Status> {
        call!(self, req, "Doctor", |a, _r| async move {
            Ok::<_, VolumeError>(pb::DoctorReport {
                checks: a.doctor().await,
            })
        })
    }
}
