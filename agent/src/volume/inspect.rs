//! status: what is on the node's devices and what is mapped, read-only.

use std::sync::Arc;

use nodecrypt_proto::agent::v1 as pb;

use super::{blocking, judged, validate_volume_id, Agent, Result, VolumeError};
use crate::device::Device;
use crate::discover::{self, Probe};

impl Agent {
    /// The state of one volume.
    pub async fn get(self: &Arc<Self>, req: pb::GetVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let f = blocking(move || me.find(&req.volume_id)).await?;
        Ok(self.volume_pb(&f.device, &f.header))
    }

    /// Every nodecrypt-looking device on this node: usable volumes with their state, and
    /// refused or unreadable headers with the reason (state `REFUSED`).
    pub async fn list(self: &Arc<Self>) -> Result<Vec<pb::Volume>> {
        let me = self.clone();
        let found = blocking(move || Ok(me.discover())).await?;
        Ok(found.iter().map(|p| self.probe_pb(p)).collect())
    }

    pub(super) fn probe_pb(&self, p: &Probe) -> pb::Volume {
        let refused = |volume_id: Option<&String>, e: VolumeError| pb::Volume {
            volume_id: volume_id.cloned().unwrap_or_default(),
            device: p.path().display().to_string(),
            state: pb::VolumeState::Refused as i32,
            reason: e.reason().unwrap_or_default().to_string(),
            problem: e.to_string(),
            ..Default::default()
        };
        match p {
            Probe::Ours(f) => self.volume_pb(&f.device, &f.header),
            Probe::Refused {
                device,
                claimed_volume_id,
                refusal,
            } => refused(
                claimed_volume_id.as_ref(),
                VolumeError::refused(&device.path, refusal.clone()),
            ),
            Probe::Stuck { path } => refused(
                None,
                VolumeError::Stuck {
                    device: path.clone(),
                    waited: discover::PROBE_TIMEOUT,
                },
            ),
        }
    }

    /// The state of the volume on `dev`, or why its header is refused.
    pub(crate) fn describe_device(&self, dev: &Device) -> pb::Volume {
        match judged(dev.clone()) {
            Ok(f) => self.volume_pb(&f.device, &f.header),
            Err(e) => pb::Volume {
                device: dev.path.display().to_string(),
                state: pb::VolumeState::Refused as i32,
                reason: e.reason().unwrap_or_default().to_string(),
                problem: e.to_string(),
                ..Default::default()
            },
        }
    }
}
