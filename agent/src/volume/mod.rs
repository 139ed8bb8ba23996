//! The flows — format, open, close, status, unlock-all, rotate, erase — shared by the gRPC
//! service, the CLI (through the service) and boot-time unlock. Each is idempotent and
//! safe to re-run after a crash at any step (crash points name every step).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::warn;

use crate::broker::Broker;
use crate::config::Config;
use crate::device::{self, Device};
use crate::discover::{self, Found, Probe};
use crate::luks::{self, Header, Inspection, Refusal, Stage};
use crate::mapping::{self, Mapped, Source};

mod doctor;
mod erase;
mod error;
mod format;
mod inspect;
mod open;
mod repair;
mod rotate;
pub mod types;
mod unlock;

pub use error::{Result, VolumeError};
use types::{Layout, MappingInfo, State, Volume};

/// Kills the process at a named step when the test-only `failpoints` feature is on and
/// `FAILPOINTS=<name>=return` is set: proves every flow resumes after a crash.
pub fn crash_point(name: &'static str) {
    let _ = name; // used only with the failpoints feature
    fail::fail_point!(name, |_| {
        warn!(failpoint = name, "failpoint: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    });
}

/// Validates a volume id with the one rule ([`nodecrypt_common::VolumeId`]).
pub fn validate_volume_id(id: &str) -> Result<()> {
    nodecrypt_common::VolumeId::parse(id)?;
    Ok(())
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName {
            given: name.chars().take(120).collect(),
        })
    }
}

/// Runs blocking work (libcryptsetup, device I/O, flock) off the async reactor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VolumeError::Worker {
            detail: e.to_string(),
        })?
}

/// The agent: configuration, broker client, live mappings.
pub struct Agent {
    cfg: Config,
    broker: Broker,
    mappings: Mutex<HashMap<String, Mapped>>,
}

impl Agent {
    /// An agent for `cfg` (no I/O until a flow runs).
    pub fn new(cfg: Config) -> Result<Arc<Agent>> {
        let broker = Broker::new(&cfg.broker)?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| VolumeError::RunDir {
            path: cfg.run_dir.clone(),
            source,
        })?;
        mapping::cleanup_stale(&cfg.run_dir);
        Ok(Arc::new(Agent {
            cfg,
            broker,
            mappings: Mutex::new(HashMap::new()),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.unlock_deadline
    }

    fn validate_device(&self, path: &str) -> Result<Device> {
        Ok(device::validate(path, self.cfg.allow_file_devices)?)
    }

    /// Every device the agent may look at: block devices, and configured files.
    fn candidates(&self) -> Vec<PathBuf> {
        let mut out = device::block_devices();
        if self.cfg.allow_file_devices {
            out.extend(self.cfg.file_devices.iter().cloned());
        }
        out
    }

    /// Every device that looks like nodecrypt's, judged. Read-only; foreign and
    /// unreadable devices are left out, a device that hangs is reported.
    fn discover(&self) -> Vec<Probe> {
        discover::discover(
            self.candidates(),
            self.cfg.allow_file_devices,
            discover::PROBE_TIMEOUT,
        )
    }

    /// The one usable device carrying `volume_id`. A device whose header is refused but
    /// claims this id makes the error that refusal, so the operator learns why.
    fn find(&self, volume_id: &str) -> Result<Found> {
        let mut hits = Vec::new();
        let mut refused = None;
        for p in self.discover() {
            match p {
                Probe::Ours(f) if f.volume_id() == volume_id => hits.push(f),
                Probe::Refused {
                    device,
                    claimed_volume_id: Some(id),
                    refusal,
                } if id == volume_id => {
                    refused.get_or_insert(VolumeError::refused(&device.path, refusal));
                }
                _ => {}
            }
        }
        match hits.len() {
            0 => Err(refused.unwrap_or_else(|| VolumeError::NotOnAnyDevice {
                volume_id: volume_id.to_string(),
                scanned: if self.cfg.allow_file_devices {
                    "block devices and configured files"
                } else {
                    "block devices"
                },
            })),
            1 => Ok(hits.remove(0)),
            _ => Err(VolumeError::OnSeveralDevices {
                volume_id: volume_id.to_string(),
                devices: hits.into_iter().map(|f| f.device.path).collect(),
            }),
        }
    }

    /// The live mapping of `volume_id` (ours, or a dm-crypt mapping the kernel holds).
    fn mapping_of(&self, volume_id: &str) -> Option<(MappingInfo, Option<Source>)> {
        let maps = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = maps.get(volume_id) {
            return Some((m.describe(), m.source().cloned()));
        }
        drop(maps);
        mapping::dm_status(volume_id).map(|m| (m.describe(), m.source().cloned()))
    }

    /// A usable volume on `dev`: its header's facts and whether it is mapped from `dev`.
    fn volume_of(&self, dev: &Device, h: &Header) -> Volume {
        let token = h.token();
        let volume_id = token.map(|t| t.volume_id.clone()).unwrap_or_default();
        let state = match self
            .mapping_of(&volume_id)
            .filter(|(_, src)| src.as_ref().is_none_or(|s| s.id == dev.id))
        {
            Some((m, _)) => State::Open(m),
            None => State::Closed,
        };
        Volume {
            volume_id: Some(volume_id),
            device: Some(dev.path.clone()),
            state,
            layout: Layout {
                key_version: token.map_or(0, |t| t.key_version),
                sector_size: h.sector_size,
                cipher: h.cipher.clone(),
                key_bits: h.key_bits,
                luks_uuid: h.uuid.clone(),
                broker: token.map(|t| t.broker.clone()).unwrap_or_default(),
                data_size: h.data_size,
            },
            note: None,
        }
    }

    /// Stops: closes userspace mappings that are not in use (dm-crypt mappings live in
    /// the kernel and stay).
    pub fn shutdown(&self) {
        let maps: Vec<(String, Mapped)> = self
            .mappings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (id, m) in maps {
            if matches!(m, Mapped::User { .. }) {
                if let Err((_, e)) = m.close() {
                    warn!(volume_id = %id, error = %e, "userspace mapping left behind at shutdown");
                }
            }
        }
    }
}

/// Judges the header of a device given by path: usable, or the refusal (read-only).
pub(crate) fn judged(dev: Device) -> Result<Found> {
    let refuse = |reason, message: String| {
        Err(VolumeError::refused(
            &dev.path,
            Refusal::new(reason, message),
        ))
    };
    match luks::inspect(&dev.path, dev.size, Stage::Usable)? {
        Inspection::Ours(header) => Ok(Found {
            device: dev,
            header,
        }),
        Inspection::Refused { refusal, .. } => Err(VolumeError::refused(&dev.path, refusal)),
        Inspection::NotLuks => refuse(
            "header.none",
            "no LUKS2 header: not a LUKS2 volume".into(),
        ),
        Inspection::Foreign { uuid, label } => refuse(
            "header.foreign",
            format!("a LUKS2 header that is not nodecrypt's (uuid {uuid:?}, label {label:?}): not a nodecrypt volume"),
        ),
    }
}
