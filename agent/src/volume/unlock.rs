//! unlock-all (boot): every nodecrypt-looking device opened in parallel or reported.

use std::sync::Arc;
use std::time::Instant;

use nodecrypt_common::VolumeId;
use tracing::warn;

use super::types::{OpenRequest, Target, UnlockResult};
use super::{blocking, Agent, Result, VolumeError};
use crate::discover::{self, Probe};

impl Agent {
    /// Opens every discovered volume in parallel; one failure never blocks the others,
    /// and every nodecrypt-looking device that cannot be opened is reported.
    pub async fn unlock_all(self: &Arc<Self>) -> Result<Vec<UnlockResult>> {
        let me = self.clone();
        let started = Instant::now();
        let found = blocking(move || Ok(me.discover())).await?;
        let mut out = Vec::new();
        let mut tasks = Vec::new();
        for p in found {
            let f = match p {
                Probe::Ours(f) => f,
                Probe::Refused {
                    device,
                    claimed_volume_id,
                    refusal,
                } => {
                    let e = VolumeError::refused(&device.path, refusal);
                    warn!(volume_id = ?claimed_volume_id, device = %device.path.display(), error = %e, "unlock refused");
                    out.push(UnlockResult {
                        volume_id: claimed_volume_id,
                        device: device.path,
                        result: Err(e),
                        duration: started.elapsed(),
                    });
                    continue;
                }
                Probe::Stuck { path } => {
                    let e = VolumeError::Stuck {
                        device: path.clone(),
                        waited: discover::PROBE_TIMEOUT,
                    };
                    warn!(device = %path.display(), error = %e, "unlock refused");
                    out.push(UnlockResult {
                        volume_id: None,
                        device: path,
                        result: Err(e),
                        duration: started.elapsed(),
                    });
                    continue;
                }
            };
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let volume_id = f.volume_id().to_string();
                let device = f.device.path.clone();
                let result = match VolumeId::parse(&volume_id) {
                    Ok(id) => {
                        me.open(OpenRequest {
                            target: Target::Device {
                                path: device.display().to_string(),
                                expect: Some(id),
                            },
                            name: None,
                            backend: None,
                            allow_discards: false,
                        })
                        .await
                    }
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = &result {
                    warn!(%volume_id, device = %device.display(), error = %e, "unlock failed");
                }
                UnlockResult {
                    volume_id: Some(volume_id),
                    device,
                    result,
                    duration: started.elapsed(),
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
