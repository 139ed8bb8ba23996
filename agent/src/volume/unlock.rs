//! unlock-all (boot): every nodecrypt-looking device opened in parallel or reported.

use std::sync::Arc;
use std::time::Instant;

use nodecrypt_proto::agent::v1 as pb;
use tonic::Code;
use tracing::warn;

use super::{blocking, Agent, Result, VolumeError};
use crate::discover::Probe;
use nodecrypt_common::status;

impl Agent {
    /// Opens every discovered volume in parallel; one failure never blocks the others,
    /// and every nodecrypt-looking device that cannot be opened is reported.
    pub async fn unlock_all(self: &Arc<Self>) -> Result<Vec<pb::UnlockResult>> {
        let me = self.clone();
        let started = Instant::now();
        let found = blocking(move || Ok(me.discover())).await?;
        let mut out = Vec::new();
        let mut tasks = Vec::new();
        for p in found {
            let f = match p {
                Probe::Ours(f) => f,
                other => {
                    let v = self.probe_pb(&other);
                    warn!(volume_id = %v.volume_id, device = %v.device, reason = %v.reason, error = %v.problem, "unlock refused");
                    out.push(pb::UnlockResult {
                        volume_id: v.volume_id,
                        device: v.device,
                        ok: false,
                        code: status::name(if matches!(other, Probe::Stuck { .. }) {
                            Code::DeadlineExceeded
                        } else {
                            Code::FailedPrecondition
                        })
                        .to_string(),
                        message: v.problem,
                        reason: v.reason,
                        duration_ms: started.elapsed().as_millis() as u64,
                        volume: None,
                    });
                    continue;
                }
            };
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let volume_id = f.volume_id().to_string();
                let device = f.device.path.display().to_string();
                let r = me
                    .open(pb::OpenVolumeRequest {
                        device: device.clone(),
                        volume_id: volume_id.clone(),
                        ..Default::default()
                    })
                    .await;
                let duration_ms = started.elapsed().as_millis() as u64;
                match r {
                    Ok(v) => pb::UnlockResult {
                        volume_id,
                        device,
                        ok: true,
                        duration_ms,
                        volume: Some(v),
                        ..Default::default()
                    },
                    Err(e) => {
                        warn!(%volume_id, %device, error = %e, "unlock failed");
                        pb::UnlockResult {
                            volume_id,
                            device,
                            ok: false,
                            code: status::name(e.code()).to_string(),
                            reason: e.reason().unwrap_or_default().to_string(),
                            message: e.to_string(),
                            duration_ms,
                            volume: None,
                        }
                    }
                }
            }));
        }
        for t in tasks {
            out.push(t.await.map_err(|e| VolumeError::Worker {
                detail: e.to_string(),
            })?);
        }
        Ok(out)
    }
}
