//! `repair-header`: the one flow that mends a LUKS2 header, explicitly. Inspection never
//! writes (libcryptsetup would "repair" a damaged copy silently on load, which is why the
//! agent judges headers itself first); this copies the intact copy over the other only
//! when asked with `confirm`, and only if the result is a header the policy accepts.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use tracing::{info, warn};

use super::types::Repair;
use super::{Agent, VolumeError};
use crate::device::{self, DeviceError, DeviceLock, Kind};
use crate::luks::header::{self, Which};
use crate::luks::{self, Inspection, Refusal, Stage};

fn which(name: &str) -> Result<Option<Which>, VolumeError> {
    match name {
        "" => Ok(None),
        "primary" => Ok(Some(Which::Primary)),
        "secondary" => Ok(Some(Which::Secondary)),
        other => Err(VolumeError::InvalidCopy {
            given: other.chars().take(40).collect(),
        }),
    }
}

impl Agent {
    /// Plans, and with `confirm` performs, the repair of `device`'s header, keeping the
    /// copy `from` (`""`: the one intact copy). An intact header is success with nothing
    /// written (so re-running after a repair is safe).
    pub async fn repair_header(
        self: &Arc<Self>,
        device: &str,
        from: &str,
        confirm: bool,
    ) -> Result<Repair, VolumeError> {
        let from = which(from)?;
        let dev = device::validate(device, self.config().allow_file_devices)?;
        let run_dir = self.config().run_dir.clone();
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _lock = DeviceLock::acquire(&run_dir, &dev)?;
            let path = dev.path.display().to_string();
            let report = |problem: String| Repair {
                device: dev.path.clone(),
                problem,
                copy: None,
                offset: 0,
                length: 0,
                done: false,
                volume: None,
            };
            let prefix = luks::read_prefix(&dev.path, dev.size)?;
            let plan = match header::plan_repair(&prefix, from) {
                Ok(plan) => plan,
                Err(header::RepairError::Intact) => {
                    return Ok(Repair {
                        done: true,
                        volume: Some(me.describe_device(&dev)),
                        ..report("none: both header copies are intact and identical".into())
                    })
                }
                Err(e) => {
                    return Err(VolumeError::Luks(luks::LuksError::Refused {
                        device: dev.path.clone(),
                        refusal: Refusal::new("header.repair", e.to_string()),
                    }))
                }
            };
            // The mended header must be one the policy accepts, or nothing is written.
            let mut mended = prefix.clone();
            let at = plan.offset as usize;
            mended[at..at + plan.bytes.len()].copy_from_slice(&plan.bytes);
            if let Inspection::Refused { refusal, .. } =
                luks::judge_prefix(&mended, dev.size, Stage::Usable)
            {
                return Err(VolumeError::Luks(luks::LuksError::Refused {
                    device: dev.path.clone(),
                    refusal: Refusal::new(
                        "header.repair",
                        format!(
                            "the {} copy is intact but itself refused ({refusal}); not copying it",
                            plan.from.name()
                        ),
                    ),
                }));
            }
            let mut resp = Repair {
                copy: Some((plan.from.name(), plan.to.name())),
                offset: plan.offset,
                length: plan.bytes.len() as u64,
                ..report(plan.problem.to_string())
            };
            if !confirm {
                info!(device = %path, from = plan.from.name(), to = plan.to.name(), "header repair planned, not confirmed: nothing written");
                return Ok(resp);
            }
            let io = |source| DeviceError::Io {
                device: dev.path.clone(),
                source,
            };
            let mut opts = OpenOptions::new();
            opts.write(true);
            if dev.kind == Kind::Block {
                opts.custom_flags(nix::libc::O_EXCL);
            }
            let mut f = opts.open(&dev.path).map_err(io)?;
            f.seek(SeekFrom::Start(plan.offset)).map_err(io)?;
            f.write_all(&plan.bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            drop(f);
            warn!(target: "audit", device = %path, problem = %plan.problem, from = plan.from.name(), to = plan.to.name(), offset = plan.offset, length = plan.bytes.len(), "LUKS2 header repaired on request");
            resp.done = true;
            resp.volume = Some(me.describe_device(&dev));
            Ok(resp)
        })
        .await
        .map_err(|e| VolumeError::Worker {
            detail: e.to_string(),
        })?
    }
}
