//! rotate: a new keyslot key version, the data untouched; resumable at every step.

use std::sync::Arc;

use nodecrypt_common::VolumeId;
use tracing::info;

use super::types::Volume;
use super::{blocking, crash_point, judged, Agent, Result, VolumeError};
use crate::device::DeviceLock;
use crate::key::SlotKey;
use crate::luks::{self, LuksError, Token};

impl Agent {
    /// Moves a volume to a new key version: broker rotate → new keyslot → token → verify →
    /// old keyslots removed → old versions retired. Re-running after a crash finishes the
    /// pending rotation instead of starting another.
    pub async fn rotate(self: &Arc<Self>, volume_id: &VolumeId) -> Result<Volume> {
        let me = self.clone();
        let id = volume_id.to_string();
        let f = blocking(move || me.find(&id)).await?;
        let me = self.clone();
        let (d, id) = (f.device.clone(), volume_id.to_string());
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
        if old.volume_id != volume_id.as_str() {
            return Err(VolumeError::WrongVolume {
                device: f.device.path.clone(),
                found: old.volume_id,
                wanted: volume_id.to_string(),
            });
        }
        let deadline = self.deadline();
        let info = self.broker.describe(volume_id.as_str(), deadline).await?;
        let active_old: Vec<u64> = info
            .versions
            .iter()
            .filter(|v| {
                v.state == nodecrypt_proto::keybroker::v1::KeyState::Active as i32
                    && v.version != info.current_version
            })
            .map(|v| v.version)
            .collect();
        let step = next_step(
            old.key_version,
            info.current_version,
            h.keyslots.len(),
            &active_old,
        );
        let (old_key, _, _) = self
            .broker
            .get(volume_id.as_str(), old.key_version, deadline)
            .await?;
        // `None`: the token already names the current version; only cleanup is left, and
        // the key already fetched is the one to keep.
        let fresh: Option<(SlotKey, u64)> = match step {
            Step::Adopt(current) => {
                let (k, v, _) = self
                    .broker
                    .get(volume_id.as_str(), current, deadline)
                    .await?;
                Some((k, v))
            }
            Step::Cleanup => None,
            Step::Rotate => {
                let r = self
                    .broker
                    .rotate(volume_id.as_str(), old.key_version, deadline)
                    .await?;
                crash_point("rotate-after-broker-rotate");
                Some(r)
            }
        };
        let new_version = fresh.as_ref().map_or(old.key_version, |(_, v)| *v);
        let d = f.device.clone();
        let broker_ep = self.broker.endpoint().to_string();
        let vid = volume_id.to_string();
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
        for v in to_retire(active_old, old.key_version, new_version) {
            self.broker.retire(volume_id.as_str(), v, deadline).await?;
        }
        info!(volume_id = %volume_id, from = old.key_version, to = new_version, "rotated");
        drop(lock);
        Ok(self.volume_of(&f.device, &header))
    }
}

/// What a rotation (or its re-run after a crash) does first.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The broker already has a newer version (an earlier run rotated there): move the
    /// keyslot to it.
    Adopt(u64),
    /// The token names the current version, but an old keyslot or an active old version
    /// is left: finish the cleanup only.
    Cleanup,
    /// Nothing pending: ask the broker for a new version.
    Rotate,
}

/// Decides [`Step`] from the token's version, the broker's current one, the keyslots in
/// the header and the broker's active versions other than the current one. Pure.
fn next_step(token: u64, current: u64, keyslots: usize, active_old: &[u64]) -> Step {
    if current > token {
        Step::Adopt(current)
    } else if keyslots > 1 || !active_old.is_empty() {
        Step::Cleanup
    } else {
        Step::Rotate
    }
}

/// The versions to retire once the keyslot holds `new`: every active old version and
/// the one the token named before, never `new`. Pure.
fn to_retire(mut active_old: Vec<u64>, old: u64, new: u64) -> Vec<u64> {
    if old != new && !active_old.contains(&old) {
        active_old.push(old);
    }
    active_old.retain(|&v| v != new);
    active_old
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_rotation_or_its_rerun_does_first() {
        #[rustfmt::skip]
        let table = [
            // token, current, keyslots, active old versions → step
            ((1, 1, 1, vec![]), Step::Rotate),
            ((1, 2, 1, vec![1]), Step::Adopt(2)),   // crashed after the broker rotated
            ((1, 2, 2, vec![1]), Step::Adopt(2)),   // ... and after the keyslot was added
            ((2, 2, 2, vec![1]), Step::Cleanup),    // ... and after the token moved
            ((2, 2, 1, vec![1]), Step::Cleanup),    // ... and after the old keyslot went
            ((2, 2, 1, vec![]), Step::Rotate),      // a finished rotation: a new one
            ((3, 5, 1, vec![3, 4]), Step::Adopt(5)),
        ];
        for ((token, current, slots, active), want) in table {
            assert_eq!(
                next_step(token, current, slots, &active),
                want,
                "{token} {current} {slots} {active:?}"
            );
        }
    }

    #[test]
    fn what_is_retired() {
        assert_eq!(to_retire(vec![], 1, 2), [1]);
        assert_eq!(to_retire(vec![1], 1, 2), [1]);
        assert_eq!(to_retire(vec![1, 3], 3, 4), [1, 3]);
        assert!(
            to_retire(vec![], 2, 2).is_empty(),
            "cleanup of a version kept"
        );
        assert_eq!(to_retire(vec![2, 1], 2, 2), [1]);
    }
}
