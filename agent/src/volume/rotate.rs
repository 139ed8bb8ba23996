//! rotate: a new keyslot key version, the data untouched; resumable at every step.

use std::sync::Arc;

use nodecrypt_proto::agent::v1 as pb;
use tracing::info;

use super::{blocking, crash_point, judged, validate_volume_id, Agent, Result, VolumeError};
use crate::device::DeviceLock;
use crate::key::SlotKey;
use crate::luks::{self, LuksError, Token};

impl Agent {
    /// Moves a volume to a new key version: broker rotate → new keyslot → token → verify →
    /// old keyslots removed → old versions retired. Re-running after a crash finishes the
    /// pending rotation instead of starting another.
    pub async fn rotate(self: &Arc<Self>, req: pb::RotateVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let id = req.volume_id.clone();
        let f = blocking(move || me.find(&id)).await?;
        let me = self.clone();
        let (d, id) = (f.device.clone(), req.volume_id.clone());
        let lock = blocking(move || {
            let dev = DeviceLock::acquire(&me.cfg.run_dir, &d)?;
            Ok((dev, DeviceLock::volume(&me.cfg.run_dir, &id)?))
        })
        .await?;
        // Judged again under the lock: the header decides what is left to do.
        let d = f.device.clone();
        let h = blocking(move || Ok(judged(d)?.header)).await?;
        let (token_id, old) = h.token.clone().ok_or_else(|| VolumeError::NoToken {
            device: f.device.path.clone(),
        })?;
        if old.volume_id != req.volume_id {
            return Err(VolumeError::WrongVolume {
                device: f.device.path.clone(),
                found: old.volume_id,
                wanted: req.volume_id,
            });
        }
        let deadline = self.deadline();
        let info = self.broker.describe(&req.volume_id, deadline).await?;
        let active_old: Vec<u64> = info
            .versions
            .iter()
            .filter(|v| {
                v.state == nodecrypt_proto::keybroker::v1::KeyState::Active as i32
                    && v.version != info.current_version
            })
            .map(|v| v.version)
            .collect();
        let pending = info.current_version > old.key_version
            || h.keyslots.len() > 1
            || !active_old.is_empty();
        let (old_key, _, _) = self
            .broker
            .get(&req.volume_id, old.key_version, deadline)
            .await?;
        // `None`: the token already names the current version; only cleanup is left, and
        // the key already fetched is the one to keep.
        let fresh: Option<(SlotKey, u64)> = if info.current_version > old.key_version {
            let (k, v, _) = self
                .broker
                .get(&req.volume_id, info.current_version, deadline)
                .await?;
            Some((k, v))
        } else if pending {
            None
        } else {
            let r = self
                .broker
                .rotate(&req.volume_id, old.key_version, deadline)
                .await?;
            crash_point("rotate-after-broker-rotate");
            Some(r)
        };
        let new_version = fresh.as_ref().map_or(old.key_version, |(_, v)| *v);
        let d = f.device.clone();
        let broker_ep = self.broker.endpoint().to_string();
        let vid = req.volume_id.clone();
        let header = blocking(move || {
            let new_key = fresh.as_ref().map_or(&old_key, |(k, _)| k);
            let slot = match luks::check_key(&d.path, None, new_key) {
                Ok(slot) => slot,
                Err(LuksError::WrongKey { .. }) => {
                    let slot = luks::add_keyslot(&d.path, &old_key, new_key)?;
                    crash_point("rotate-after-add-keyslot");
                    slot
                }
                Err(e) => return Err(e.into()),
            };
            let token = Token {
                keyslot: slot,
                volume_id: vid,
                key_version: new_version,
                broker: broker_ep,
            };
            luks::set_token(&d.path, Some(token_id), &token)?;
            crash_point("rotate-after-token");
            luks::check_key(&d.path, Some(slot), new_key)?;
            let h = judged(d.clone())?.header;
            for other in h.keyslots.iter().copied().filter(|&s| s != slot) {
                luks::destroy_keyslot(&d.path, other)?;
                crash_point("rotate-after-destroy-keyslot");
            }
            Ok(judged(d)?.header)
        })
        .await?;
        let mut retire: Vec<u64> = active_old;
        if old.key_version != new_version && !retire.contains(&old.key_version) {
            retire.push(old.key_version);
        }
        for v in retire.into_iter().filter(|&v| v != new_version) {
            self.broker.retire(&req.volume_id, v, deadline).await?;
        }
        info!(volume_id = %req.volume_id, from = old.key_version, to = new_version, "rotated");
        drop(lock);
        Ok(self.volume_pb(&f.device, &header))
    }
}
