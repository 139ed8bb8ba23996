//! format: validate the device, create the key at the broker, luksFormat + keyslot +
//! token, verify. A device already carrying this volume is success; a crash at any step
//! resumes.

use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::types::{FormatRequest, Volume};
use super::{blocking, crash_point, judged, Agent, Result, VolumeError};
use crate::device::{self, Device, DeviceError, DeviceLock, Kind};
use crate::luks::{self, Header, Inspection, Stage, Token};

impl Agent {
    /// Formats `device` for `volume_id`. A device already carrying this volume is success.
    pub async fn format(self: &Arc<Self>, req: FormatRequest) -> Result<Volume> {
        if let Some(size) = req.sector_size.filter(|s| !matches!(s, 512 | 4096)) {
            return Err(VolumeError::InvalidSectorSize { size });
        }
        let volume_id = &req.volume_id;
        let dev = self.validate_device(&req.device)?;
        let me = self.clone();
        let d = dev.clone();
        let lock = blocking(move || Ok(DeviceLock::acquire(&me.cfg.run_dir, &d)?)).await?;
        let me = self.clone();
        let d = dev.clone();
        let id = volume_id.to_string();
        // What is on the device now decides: done, resume, or refuse.
        let state = blocking(move || me.format_precheck(&d, &id, req.force)).await?;
        let (key, version) = match state {
            Precheck::Done(h) => {
                // Prove the broker's key still opens it, then answer success.
                let tok = h.token().cloned().ok_or_else(|| VolumeError::NoToken {
                    device: dev.path.clone(),
                })?;
                let (key, _, _) = self
                    .broker
                    .get(&tok.volume_id, tok.key_version, self.deadline())
                    .await?;
                let d = dev.clone();
                blocking(move || Ok(luks::check_key(&d.path, Some(tok.keyslot), &key)?)).await?;
                info!(volume_id = %volume_id, device = %dev.path.display(), "already formatted");
                drop(lock);
                return Ok(self.volume_of(&dev, &h));
            }
            Precheck::Fresh | Precheck::Resume => {
                let r = self
                    .broker
                    .create(volume_id.as_str(), req.labels.clone(), self.deadline())
                    .await?;
                crash_point("format-after-broker-create");
                r
            }
        };
        let sector_size = match req.sector_size {
            None => {
                if dev.logical_block_size() <= 4096 && dev.size % 4096 == 0 {
                    4096
                } else {
                    512
                }
            }
            Some(s) => s,
        };
        if sector_size < dev.logical_block_size() {
            return Err(VolumeError::SectorBelowBlock {
                device: dev.path.clone(),
                sector: sector_size,
                block: dev.logical_block_size(),
            });
        }
        let token = Token {
            keyslot: 0,
            volume_id: volume_id.to_string(),
            key_version: version,
            broker: self.broker.endpoint().to_string(),
        };
        let d = dev.clone();
        let h = blocking(move || {
            // An interrupted format whose keyslot opens with our key only lacks its token
            // (the precheck judged that header with the token absent).
            let resume = matches!(
                luks::inspect(&d.path, d.size, Stage::Formatting)?,
                Inspection::Ours(ref h) if h.label == token.volume_id && !h.keyslots.is_empty()
            );
            let slot = if resume {
                luks::check_key(&d.path, None, &key)?
            } else {
                luks::format(&d.path, &token.volume_id, sector_size, &key, &crash_point)
                    .inspect_err(|_| rollback(&d))?
            };
            let token = Token {
                keyslot: slot,
                ..token
            };
            luks::set_token(&d.path, None, &token).inspect_err(|_| rollback(&d))?;
            crash_point("format-after-token");
            luks::check_key(&d.path, Some(slot), &key)?;
            // What we wrote must pass our own judge.
            Ok(judged(d.clone())?.header)
        })
        .await?;
        info!(volume_id = %volume_id, device = %dev.path.display(), sector_size, key_version = version, "formatted");
        drop(lock);
        Ok(self.volume_of(&dev, &h))
    }

    fn format_precheck(&self, dev: &Device, volume_id: &str, force: bool) -> Result<Precheck> {
        dev.check_not_in_use()?;
        if dev.size < device::MIN_DEVICE_SIZE {
            return Err(VolumeError::TooSmall {
                device: dev.path.clone(),
                size: dev.size,
            });
        }
        // One read of the header, judged for both stages it can be in.
        let prefix = luks::read_prefix(&dev.path, dev.size)?;
        let facts = Facts {
            usable: luks::judge_prefix(&prefix, dev.size, Stage::Usable),
            formatting: luks::judge_prefix(&prefix, dev.size, Stage::Formatting),
        };
        let decision = decide(&dev.path, facts, volume_id, force, &|| dev.signatures())?;
        if matches!(decision, Precheck::Resume) {
            info!(device = %dev.path.display(), volume_id, "resuming an interrupted format");
        }
        Ok(decision)
    }
}

/// What is on a device, judged for the two stages a format can meet.
struct Facts {
    /// Judged as a volume in use.
    usable: Inspection,
    /// Judged as a format that stopped before its token.
    formatting: Inspection,
}

/// Done, resume, fresh, or refuse: the format decision from what is on the device.
/// `signatures` (libblkid) is asked only when no LUKS2 header decided. Pure but for that.
fn decide(
    device: &Path,
    facts: Facts,
    volume_id: &str,
    force: bool,
    signatures: &dyn Fn() -> std::result::Result<Vec<String>, DeviceError>,
) -> Result<Precheck> {
    let overwrite = |what: String| {
        Err(VolumeError::WouldOverwrite {
            device: device.to_path_buf(),
            what,
        })
    };
    match facts.usable {
        Inspection::Ours(h) if h.token().is_some_and(|t| t.volume_id == volume_id) => {
            return Ok(Precheck::Done(Box::new(h)));
        }
        Inspection::Ours(h) if !force => {
            let other = h.token().map(|t| t.volume_id.clone()).unwrap_or_default();
            return overwrite(format!("holds nodecrypt volume {other}"));
        }
        Inspection::Refused { refusal, .. }
            if matches!(refusal.reason, "token.missing" | "keyslot.count") =>
        {
            // A format that stopped before its token: resume it if the rest is ours.
            match facts.formatting {
                Inspection::Ours(h) if h.label == volume_id => return Ok(Precheck::Resume),
                _ if !force => {
                    return overwrite(format!("carries a nodecrypt header without a token for another volume or in a state nodecrypt does not write ({refusal})"));
                }
                _ => {}
            }
        }
        Inspection::Refused { refusal, .. } if !force => {
            return overwrite(format!(
                "carries a nodecrypt LUKS2 header that is refused or damaged ({refusal}; `nodecrypt repair-header` can mend a damaged copy)"
            ));
        }
        Inspection::Foreign { uuid, label } if !force => {
            return overwrite(format!(
                "holds a LUKS2 volume (uuid {uuid}, label {label:?}) that is not nodecrypt's"
            ));
        }
        _ => {}
    }
    let sigs = signatures()?;
    if !sigs.is_empty() && !force {
        return Err(VolumeError::HoldsData {
            device: device.to_path_buf(),
            signatures: sigs,
        });
    }
    Ok(Precheck::Fresh)
}

/// Undoes a half-written format (error path, not a crash): wipes the header we wrote.
fn rollback(dev: &Device) {
    if dev.kind == Kind::File || dev.kind == Kind::Block {
        if let Err(e) = dev.wipe(0, 16 << 20) {
            warn!(device = %dev.path.display(), error = %e, "rollback of a failed format failed");
        }
    }
}

/// The format decision.
#[derive(Debug)]
enum Precheck {
    /// Nothing of ours: format.
    Fresh,
    /// Our header without its token: finish it.
    Resume,
    /// Already this volume: prove the key opens it, and succeed.
    Done(Box<Header>),
}

#[cfg(test)]
mod tests;
