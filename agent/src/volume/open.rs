//! open and close: judge the header, fetch the key, map; unmap. Keyed by device identity.

use std::sync::Arc;
use std::time::Instant;

use nodecrypt_proto::agent::v1 as pb;
use tracing::info;

use super::{blocking, judged, validate_name, validate_volume_id, Agent, Result, VolumeError};
use crate::config::BackendChoice;
use crate::device::DeviceLock;
use crate::mapping::{self, Source};

impl Agent {
    /// Opens (unlocks and maps) a volume; already open (this device) is success. The
    /// header is judged before anything else; a second device naming a volume that is
    /// open from another device is refused.
    pub async fn open(self: &Arc<Self>, req: pb::OpenVolumeRequest) -> Result<pb::Volume> {
        if !req.volume_id.is_empty() {
            validate_volume_id(&req.volume_id)?;
        }
        if !req.name.is_empty() {
            validate_name(&req.name)?;
        }
        let me = self.clone();
        let (dev_path, vol) = (req.device.clone(), req.volume_id.clone());
        let found = blocking(move || match (dev_path.is_empty(), vol.is_empty()) {
            (true, true) => Err(VolumeError::NoTarget),
            (false, _) => judged(me.validate_device(&dev_path)?),
            (true, false) => me.find(&vol),
        })
        .await?;
        let token = found
            .header
            .token()
            .cloned()
            .ok_or_else(|| VolumeError::NoToken {
                device: found.device.path.clone(),
            })?;
        if !req.volume_id.is_empty() && token.volume_id != req.volume_id {
            return Err(VolumeError::WrongVolume {
                device: found.device.path.clone(),
                found: token.volume_id,
                wanted: req.volume_id,
            });
        }
        let backend = match pb::Backend::try_from(req.backend).unwrap_or(pb::Backend::Unspecified) {
            pb::Backend::DmCrypt => BackendChoice::DmCrypt,
            pb::Backend::Userspace => BackendChoice::Userspace,
            pb::Backend::Auto => BackendChoice::Auto,
            pb::Backend::Unspecified => self.cfg.backend,
        };
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
                return Ok(self.volume_pb(&found.device, &found.header));
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
        let name = if req.name.is_empty() {
            mapping::default_name(&token.volume_id)
        } else {
            req.name.clone()
        };
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
        info!(volume_id = %token.volume_id, device = %found.device.path.display(), mapped = %desc.mapped_device, took_ms = started.elapsed().as_millis() as u64, "opened");
        drop(locks);
        Ok(self.volume_pb(&found.device, &found.header))
    }

    /// Closes a volume; already closed is success, in use is a precondition failure.
    /// Answers from the mapping it closed: no device scan, so a clone of the volume on
    /// another device changes nothing here.
    pub async fn close(self: &Arc<Self>, req: pb::CloseVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let id = req.volume_id.clone();
        let lock = blocking(move || Ok(DeviceLock::volume(&me.cfg.run_dir, &id)?)).await?;
        let id = req.volume_id.clone();
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
                        .insert(req.volume_id.clone(), m);
                }
                return Err(e.into());
            }
        };
        drop(lock);
        info!(volume_id = %req.volume_id, "closed");
        Ok(pb::Volume {
            volume_id: req.volume_id,
            device: source
                .map(|s| s.path.display().to_string())
                .unwrap_or_default(),
            state: pb::VolumeState::Closed as i32,
            ..Default::default()
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
