//! open and close: judge the header, fetch the key, map; unmap. Keyed by device identity.

use std::sync::Arc;
use std::time::Instant;

use nodecrypt_common::VolumeId;
use tracing::info;

use super::types::{Layout, OpenRequest, State, Target, Volume};
use super::{blocking, judged, validate_name, Agent, Result, VolumeError};
use crate::device::DeviceLock;
use crate::mapping::{self, Source};

impl Agent {
    /// Opens (unlocks and maps) a volume; already open (this device) is success. The
    /// header is judged before anything else; a second device naming a volume that is
    /// open from another device is refused.
    pub async fn open(self: &Arc<Self>, req: OpenRequest) -> Result<Volume> {
        if let Some(name) = &req.name {
            validate_name(name)?;
        }
        let me = self.clone();
        let target = req.target.clone();
        let found = blocking(move || match &target {
            Target::Device { path, .. } => judged(me.validate_device(path)?),
            Target::Volume(id) => me.find(id.as_str()),
        })
        .await?;
        let expect = match &req.target {
            Target::Device { expect, .. } => expect.as_ref(),
            Target::Volume(id) => Some(id),
        };
        let token = found
            .header
            .token()
            .cloned()
            .ok_or_else(|| VolumeError::NoToken {
                device: found.device.path.clone(),
            })?;
        if let Some(want) = expect.filter(|w| w.as_str() != token.volume_id) {
            return Err(VolumeError::WrongVolume {
                device: found.device.path.clone(),
                found: token.volume_id,
                wanted: want.to_string(),
            });
        }
        let backend = req.backend.unwrap_or(self.cfg.backend);
        let me = self.clone();
        let (d, id) = (found.device.clone(), token.volume_id.clone());
        let locks = blocking(move || {
            let dev = DeviceLock::acquire(&me.cfg.run_dir, &d)?;
            Ok((dev, DeviceLock::volume(&me.cfg.run_dir, &id)?))
        })
        .await?;
        match mapped_state(
            self.mapping_of(&token.volume_id).map(|(_, s)| s),
            &found.device.id,
        ) {
            Mapped::No => {}
            Mapped::Here => {
                drop(locks);
                return Ok(self.volume_of(&found.device, &found.header));
            }
            Mapped::Elsewhere(src) => {
                drop(locks);
                return Err(VolumeError::OpenElsewhere {
                    volume_id: token.volume_id,
                    open_from: src.path,
                    device: found.device.path,
                });
            }
        }
        let started = Instant::now();
        let (key, _, _) = self
            .broker
            .get(&token.volume_id, token.key_version, self.deadline())
            .await?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| mapping::default_name(&token.volume_id));
        let me = self.clone();
        let (d, h, t) = (found.device.clone(), found.header.clone(), token.clone());
        let allow_discards = req.allow_discards;
        let mapped = blocking(move || {
            Ok(mapping::open(
                &me.cfg.run_dir,
                backend,
                &d,
                &h,
                &t,
                &name,
                &key,
                allow_discards,
            )?)
        })
        .await?;
        let desc = mapped.describe();
        self.mappings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.volume_id.clone(), mapped);
        info!(volume_id = %token.volume_id, device = %found.device.path.display(), mapped = ?desc.mapped_device, took_ms = started.elapsed().as_millis() as u64, "opened");
        drop(locks);
        Ok(self.volume_of(&found.device, &found.header))
    }

    /// Closes a volume; already closed is success, in use is a precondition failure.
    /// Answers from the mapping it closed: no device scan, so a clone of the volume on
    /// another device changes nothing here.
    pub async fn close(self: &Arc<Self>, volume_id: &VolumeId) -> Result<Volume> {
        let me = self.clone();
        let id = volume_id.to_string();
        let lock = blocking(move || Ok(DeviceLock::volume(&me.cfg.run_dir, &id)?)).await?;
        let id = volume_id.to_string();
        let taken = self
            .mappings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let result = blocking(move || {
            let Some(m) = taken.or_else(|| mapping::dm_status(&id)) else {
                return Ok(Ok(None));
            };
            let source = m.source().cloned();
            Ok(m.close().map(|()| source))
        })
        .await?;
        let source = match result {
            Ok(source) => source,
            Err((m, e)) => {
                if let Some(m) = m {
                    self.mappings
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(volume_id.to_string(), m);
                }
                return Err(e.into());
            }
        };
        drop(lock);
        info!(%volume_id, "closed");
        Ok(Volume {
            volume_id: Some(volume_id.to_string()),
            device: source.map(|s| s.path),
            state: State::Closed,
            layout: Layout::default(),
            note: None,
        })
    }
}

/// Whether a volume is mapped, and from which device.
#[derive(Debug, PartialEq, Eq)]
enum Mapped {
    /// Not mapped: open it.
    No,
    /// Mapped from this device (or from one the kernel does not name): already open.
    Here,
    /// Mapped from another device that carries the same volume id.
    Elsewhere(Source),
}

/// Decides [`Mapped`] from the live mapping of the volume (`None`: none; `Some(None)`:
/// one whose device is unknown) and the identity of the device asked for. Pure.
fn mapped_state(mapping: Option<Option<Source>>, device_id: &str) -> Mapped {
    match mapping {
        None => Mapped::No,
        Some(Some(src)) if src.id != device_id => Mapped::Elsewhere(src),
        Some(_) => Mapped::Here,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn already_open_is_decided_by_the_device() {
        let src = |id: &str| Source {
            path: PathBuf::from(format!("/dev/{id}")),
            id: id.into(),
        };
        assert_eq!(mapped_state(None, "b7_0"), Mapped::No);
        assert_eq!(mapped_state(Some(Some(src("b7_0"))), "b7_0"), Mapped::Here);
        assert_eq!(
            mapped_state(Some(Some(src("b7_1"))), "b7_0"),
            Mapped::Elsewhere(src("b7_1"))
        );
        // A dm mapping whose device sysfs does not name: re-opening stays idempotent.
        assert_eq!(mapped_state(Some(None), "b7_0"), Mapped::Here);
    }
}
