//! status: what is on the node's devices and what is mapped, read-only.

use std::sync::Arc;

use nodecrypt_common::VolumeId;

use super::types::{Layout, State, Volume};
use super::{blocking, judged, Agent, Result, VolumeError};
use crate::device::Device;
use crate::discover::{self, Probe};

impl Agent {
    /// The state of one volume.
    pub async fn get(self: &Arc<Self>, volume_id: &VolumeId) -> Result<Volume> {
        let me = self.clone();
        let id = volume_id.clone();
        let f = blocking(move || me.find(id.as_str())).await?;
        Ok(self.volume_of(&f.device, &f.header))
    }

    /// Every nodecrypt-looking device on this node: usable volumes with their state, and
    /// refused or unreadable headers with the reason ([`State::Refused`]).
    pub async fn list(self: &Arc<Self>) -> Result<Vec<Volume>> {
        let me = self.clone();
        let found = blocking(move || Ok(me.discover())).await?;
        Ok(found.iter().map(|p| self.probe_volume(p)).collect())
    }

    /// What discovery found on one device, as a volume.
    pub(super) fn probe_volume(&self, p: &Probe) -> Volume {
        match p {
            Probe::Ours(f) => self.volume_of(&f.device, &f.header),
            Probe::Refused {
                device,
                claimed_volume_id,
                refusal,
            } => refused(
                claimed_volume_id.clone(),
                VolumeError::refused(&device.path, refusal.clone()),
                p,
            ),
            Probe::Stuck { path } => refused(
                None,
                VolumeError::Stuck {
                    device: path.clone(),
                    waited: discover::PROBE_TIMEOUT,
                },
                p,
            ),
        }
    }

    /// The state of the volume on `dev`, or why its header is refused.
    pub(crate) fn describe_device(&self, dev: &Device) -> Volume {
        match judged(dev.clone()) {
            Ok(f) => self.volume_of(&f.device, &f.header),
            Err(e) => Volume {
                volume_id: None,
                device: Some(dev.path.clone()),
                state: State::Refused {
                    reason: e.reason(),
                    problem: e.to_string(),
                },
                layout: Layout::default(),
                note: None,
            },
        }
    }
}

fn refused(volume_id: Option<String>, e: VolumeError, p: &Probe) -> Volume {
    Volume {
        volume_id,
        device: Some(p.path().to_path_buf()),
        state: State::Refused {
            reason: e.reason(),
            problem: e.to_string(),
        },
        layout: Layout::default(),
        note: None,
    }
}
