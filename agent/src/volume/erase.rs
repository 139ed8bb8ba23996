//! erase: crypto-erase by destroying the keyslots, the header areas and the broker's key.

use std::sync::Arc;

use nodecrypt_common::VolumeId;
use tracing::{info, warn};

use super::types::{Layout, State, Volume};
use super::{blocking, crash_point, Agent, Result, VolumeError};
use crate::device::DeviceLock;
use crate::discover::Found;
use crate::luks::{self, Inspection, LuksError, Stage};

impl Agent {
    /// Crypto-erases a closed volume: every keyslot destroyed, header areas wiped, key
    /// destroyed at the broker. Re-running (or erasing a volume whose disk is gone)
    /// destroys the key at the broker.
    pub async fn erase(self: &Arc<Self>, volume_id: &VolumeId, confirm: bool) -> Result<Volume> {
        if !confirm {
            return Err(VolumeError::EraseNotConfirmed {
                volume_id: volume_id.to_string(),
            });
        }
        if self.mapping_of(volume_id.as_str()).is_some() {
            return Err(VolumeError::EraseWhileOpen {
                volume_id: volume_id.to_string(),
            });
        }
        let me = self.clone();
        let id = volume_id.to_string();
        // What is found decides what is wiped locally; the key is destroyed at the broker
        // in every case but a failure, which is what makes the data unrecoverable.
        let found = blocking(move || match me.find(&id) {
            Ok(f) => Ok(Local::Wipe(Box::new(f))),
            Err(VolumeError::NotOnAnyDevice { .. }) => Ok(Local::Gone),
            // An erase that stopped after destroying the keyslots left a header with
            // none: judged for that stage, it is finished.
            Err(VolumeError::Luks(LuksError::Refused { device, refusal }))
                if refusal.reason == "keyslot.count" =>
            {
                let dev = me.validate_device(&device.display().to_string())?;
                match luks::inspect(&dev.path, dev.size, Stage::Erasing)? {
                    Inspection::Ours(header) if header.keyslots.is_empty() => {
                        Ok(Local::Wipe(Box::new(Found {
                            device: dev,
                            header,
                        })))
                    }
                    _ => Ok(Local::Refused(VolumeError::refused(&device, refusal))),
                }
            }
            // A header that claims the volume but is refused is not trusted enough to be
            // wiped by what it says of itself: it is left as it is, and reported.
            Err(e @ VolumeError::Luks(LuksError::Refused { .. })) => Ok(Local::Refused(e)),
            Err(e) => Err(e),
        })
        .await?;
        let mut device = None;
        let mut note = None;
        let found = match found {
            Local::Wipe(f) => Some(f),
            Local::Gone => None,
            Local::Refused(e) => {
                warn!(volume_id = %volume_id, error = %e, "erase: the device's header is refused and left untouched; the key is destroyed at the broker");
                note = Some(format!("{e}; the device was left untouched (its data is unrecoverable once the key is destroyed)"));
                None
            }
        };
        if let Some(f) = found {
            device = Some(f.device.path.clone());
            let me = self.clone();
            blocking(move || {
                let _lock = DeviceLock::acquire(&me.cfg.run_dir, &f.device)?;
                let _vol = DeviceLock::volume(&me.cfg.run_dir, f.volume_id())?;
                for slot in &f.header.keyslots {
                    luks::destroy_keyslot(&f.device.path, *slot)?;
                }
                crash_point("erase-after-keyslots");
                // Both header copies and every keyslot area live before the data segment.
                f.device.wipe(0, f.header.data_offset)?;
                crash_point("erase-after-wipe");
                Ok(())
            })
            .await?;
        }
        self.broker
            .destroy(volume_id.as_str(), "nodecrypt erase", self.deadline())
            .await?;
        info!(%volume_id, device = ?device, "crypto-erased");
        Ok(Volume {
            volume_id: Some(volume_id.to_string()),
            device,
            state: State::Erased,
            layout: Layout::default(),
            note,
        })
    }
}

/// What an erase does on this node.
enum Local {
    /// Destroy the keyslots and wipe the header areas of this device.
    Wipe(Box<Found>),
    /// No device carries the volume (the disk left the rack): the broker's key only.
    Gone,
    /// A device claims the volume but its header is refused: left as it is.
    Refused(VolumeError),
}
