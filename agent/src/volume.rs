//! The flows — format, open, close, status, unlock-all, rotate, erase — shared by the gRPC
//! service, the CLI (through the service) and boot-time unlock. Each is idempotent and
//! safe to re-run after a crash at any step (crash points name every step).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodecrypt_proto::agent::v1 as pb;
use tonic::Code;
use tracing::{info, warn};

use crate::broker::{Broker, BrokerError};
use crate::config::{BackendChoice, Config};
use crate::device::{self, Device, DeviceError, DeviceLock, Kind};
use crate::key::SlotKey;
use crate::luks::{self, Header, LuksError, Token};
use crate::mapping::{self, Mapped, MappingError};

/// What a flow can fail with; [`VolumeError::code`] is the one place that maps errors to
/// gRPC codes (and through them to CLI exit codes).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The device or volume does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The device or volume is in a state that forbids the operation.
    #[error("{0}")]
    Precondition(String),
    /// A device check failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// libcryptsetup failed.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// The broker failed or refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Mapping (dm-crypt or userspace) failed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A bug or an unexpected system failure.
    #[error("{0}")]
    Internal(String),
}

impl VolumeError {
    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        match self {
            VolumeError::InvalidArgument(_) => Code::InvalidArgument,
            VolumeError::NotFound(_) => Code::NotFound,
            VolumeError::Precondition(_) => Code::FailedPrecondition,
            VolumeError::Device(e) => match e {
                DeviceError::BadPath { .. } => Code::InvalidArgument,
                DeviceError::NotFound(_) => Code::NotFound,
                DeviceError::Busy { .. } => Code::FailedPrecondition,
                DeviceError::Io { .. } => Code::Internal,
            },
            VolumeError::Luks(e) => match e {
                LuksError::WrongKey { .. } | LuksError::Policy { .. } => Code::FailedPrecondition,
                LuksError::Crypt { .. } | LuksError::Io { .. } => Code::Internal,
            },
            VolumeError::Broker(e) => e.code(),
            VolumeError::Mapping(e) => e.code(),
            VolumeError::Internal(_) => Code::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, VolumeError>;

/// Kills the process at a named step when the test-only `failpoints` feature is on and
/// `FAILPOINTS=<name>=return` is set: proves every flow resumes after a crash.
pub fn crash_point(name: &'static str) {
    let _ = name; // used only with the failpoints feature
    fail::fail_point!(name, |_| {
        warn!(failpoint = name, "failpoint: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    });
}

/// Validates a volume id: 1–63 characters of `[a-z0-9-]`, starting and ending with a
/// letter or digit (a DNS label; UUIDs qualify).
pub fn validate_volume_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "invalid volume id {:?}: use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-'",
            id.chars().take(80).collect::<String>()
        )))
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "invalid mapping name {name:?}: use letters, digits, '-', '_' and '.'"
        )))
    }
}

/// Runs blocking work (libcryptsetup, device I/O, flock) off the async reactor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VolumeError::Internal(format!("worker thread failed: {e}")))?
}

/// A discovered nodecrypt volume.
struct Found {
    device: Device,
    header: Header,
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
        std::fs::create_dir_all(&cfg.run_dir)
            .map_err(|e| VolumeError::Internal(format!("{}: {e}", cfg.run_dir.display())))?;
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

    /// Every device carrying a nodecrypt LUKS2 header. Read-only; unreadable or foreign
    /// devices are skipped.
    fn discover(&self) -> Vec<Found> {
        let mut found = Vec::new();
        for path in self.candidates() {
            let Some(p) = path.to_str() else { continue };
            let Ok(dev) = device::validate(p, self.cfg.allow_file_devices) else {
                continue;
            };
            if !luks::has_luks2_magic(&dev.path) {
                continue;
            }
            match luks::read_header(&dev.path, dev.size) {
                Ok(header) if header.token.is_some() => found.push(Found {
                    device: dev,
                    header,
                }),
                Ok(_) => {}
                Err(e) => {
                    warn!(device = %dev.path.display(), error = %e, "unreadable LUKS2 header skipped")
                }
            }
        }
        found
    }

    fn find(&self, volume_id: &str) -> Result<Found> {
        let mut hits: Vec<Found> = self
            .discover()
            .into_iter()
            .filter(|f| {
                f.header.token.as_ref().map(|(_, t)| t.volume_id.as_str()) == Some(volume_id)
            })
            .collect();
        match hits.len() {
            0 => Err(VolumeError::NotFound(format!(
                "no device carries volume {volume_id} (scanned block devices{})",
                if self.cfg.allow_file_devices {
                    " and configured files"
                } else {
                    ""
                }
            ))),
            1 => Ok(hits.remove(0)),
            _ => Err(VolumeError::Precondition(format!(
                "volume {volume_id} is on several devices ({}); open it by device path",
                hits.iter()
                    .map(|f| f.device.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn mapped(&self, volume_id: &str) -> Option<pb::Volume> {
        let maps = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        maps.get(volume_id).map(|m| m.describe())
    }

    fn volume_pb(&self, dev: &Device, h: &Header) -> pb::Volume {
        let token = h.token.as_ref().map(|(_, t)| t.clone());
        let volume_id = token
            .as_ref()
            .map(|t| t.volume_id.clone())
            .unwrap_or_default();
        let mut v = pb::Volume {
            volume_id: volume_id.clone(),
            device: dev.path.display().to_string(),
            state: pb::VolumeState::Closed as i32,
            key_version: token.as_ref().map(|t| t.key_version).unwrap_or(0),
            sector_size: h.sector_size,
            cipher: h.cipher.clone(),
            key_bits: h.key_bits,
            luks_uuid: h.uuid.clone(),
            broker: token.map(|t| t.broker).unwrap_or_default(),
            data_size: h.data_size,
            ..Default::default()
        };
        if let Some(m) = self
            .mapped(&volume_id)
            .or_else(|| mapping::dm_status(&volume_id).map(|m| m.describe()))
        {
            v.state = pb::VolumeState::Open as i32;
            v.backend = m.backend;
            v.mapped_device = m.mapped_device;
            v.mapped_file = m.mapped_file;
            v.name = m.name;
        }
        v
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

    // ---------------------------------------------------------------- format

    /// Formats `device` for `volume_id`. A device already carrying this volume is success.
    pub async fn format(self: &Arc<Self>, req: pb::FormatVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        if !matches!(req.sector_size, 0 | 512 | 4096) {
            return Err(VolumeError::InvalidArgument(format!(
                "sector size {} is not 512 or 4096",
                req.sector_size
            )));
        }
        let dev = self.validate_device(&req.device)?;
        let me = self.clone();
        let d = dev.clone();
        let lock = blocking(move || Ok(DeviceLock::acquire(&me.cfg.run_dir, &d)?)).await?;
        let me = self.clone();
        let d = dev.clone();
        let id = req.volume_id.clone();
        // What is on the device now decides: done, resume, or refuse.
        let state = blocking(move || me.format_precheck(&d, &id, req.force)).await?;
        let (key, version) = match state {
            Precheck::Done(h) => {
                // Prove the broker's key still opens it, then answer success.
                let (_, tok) = h.token.clone().expect("Done has a token");
                let (key, _, _) = self
                    .broker
                    .get(&tok.volume_id, tok.key_version, self.deadline())
                    .await?;
                let d = dev.clone();
                blocking(move || Ok(luks::check_key(&d.path, Some(tok.keyslot), &key)?)).await?;
                info!(volume_id = %req.volume_id, device = %dev.path.display(), "already formatted");
                drop(lock);
                return Ok(self.volume_pb(&dev, &h));
            }
            Precheck::Fresh | Precheck::Resume => {
                let r = self
                    .broker
                    .create(&req.volume_id, req.labels.clone(), self.deadline())
                    .await?;
                crash_point("format-after-broker-create");
                r
            }
        };
        let sector_size = match req.sector_size {
            0 => {
                if dev.logical_block_size() <= 4096 && dev.size % 4096 == 0 {
                    4096
                } else {
                    512
                }
            }
            s => s,
        };
        if sector_size < dev.logical_block_size() {
            return Err(VolumeError::InvalidArgument(format!(
                "{}: sector size {sector_size} is below the device's logical block size {}",
                dev.path.display(),
                dev.logical_block_size()
            )));
        }
        let token = Token {
            keyslot: 0,
            volume_id: req.volume_id.clone(),
            key_version: version,
            broker: self.broker.endpoint().to_string(),
        };
        let d = dev.clone();
        let h = blocking(move || {
            // An interrupted format whose keyslot opens with our key only lacks its token.
            let existing = if luks::has_luks2_magic(&d.path) {
                luks::read_header(&d.path, d.size).ok()
            } else {
                None
            };
            let slot = match existing.filter(|h| h.is_ours() && !h.keyslots.is_empty()) {
                Some(_) => luks::check_key(&d.path, None, &key)?,
                None => luks::format(&d.path, &token.volume_id, sector_size, &key, &crash_point)
                    .inspect_err(|_| rollback(&d))?,
            };
            let token = Token {
                keyslot: slot,
                ..token
            };
            luks::set_token(&d.path, None, &token).inspect_err(|_| rollback(&d))?;
            crash_point("format-after-token");
            luks::check_key(&d.path, Some(slot), &key)?;
            Ok(luks::read_header(&d.path, d.size)?)
        })
        .await?;
        info!(volume_id = %req.volume_id, device = %dev.path.display(), sector_size, key_version = version, "formatted");
        drop(lock);
        Ok(self.volume_pb(&dev, &h))
    }

    fn format_precheck(&self, dev: &Device, volume_id: &str, force: bool) -> Result<Precheck> {
        dev.check_not_in_use()?;
        if dev.size < device::MIN_DEVICE_SIZE {
            return Err(VolumeError::Precondition(format!(
                "{}: {} bytes is smaller than the minimum of 32 MiB",
                dev.path.display(),
                dev.size
            )));
        }
        if luks::has_luks2_magic(&dev.path) {
            match luks::read_header(&dev.path, dev.size) {
                Ok(h) => match &h.token {
                    Some((_, t)) if t.volume_id == volume_id => {
                        h.check_policy(&dev.path, Some(volume_id))?;
                        return Ok(Precheck::Done(Box::new(h)));
                    }
                    Some((_, t)) if !force => {
                        return Err(VolumeError::Precondition(format!(
                            "{} holds nodecrypt volume {}; refusing to overwrite it (--force overrides)",
                            dev.path.display(),
                            t.volume_id
                        )));
                    }
                    None if h.is_ours() && h.label == volume_id => {
                        info!(device = %dev.path.display(), volume_id, "resuming an interrupted format");
                        return Ok(Precheck::Resume);
                    }
                    _ if !force => {
                        return Err(VolumeError::Precondition(format!(
                            "{} holds a LUKS2 volume (uuid {}, label {:?}) that is not nodecrypt's; refusing to overwrite it (--force overrides)",
                            dev.path.display(),
                            h.uuid,
                            h.label
                        )));
                    }
                    _ => {}
                },
                Err(e) if !force => {
                    return Err(VolumeError::Precondition(format!(
                        "{} carries a damaged LUKS2 header ({e}); refusing to overwrite it (--force overrides)",
                        dev.path.display()
                    )));
                }
                Err(_) => {}
            }
        }
        let sigs = dev.signatures()?;
        if !sigs.is_empty() && !force {
            return Err(VolumeError::Precondition(format!(
                "{} holds data ({}); refusing to format it (--force overrides)",
                dev.path.display(),
                sigs.join(", ")
            )));
        }
        Ok(Precheck::Fresh)
    }

    // ---------------------------------------------------------------- open / close

    /// Opens (unlocks and maps) a volume; already open is success.
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
            (true, true) => Err(VolumeError::InvalidArgument(
                "give a device or a volume id".into(),
            )),
            (false, _) => {
                let dev = me.validate_device(&dev_path)?;
                if !luks::has_luks2_magic(&dev.path) {
                    return Err(VolumeError::Precondition(format!(
                        "{} is not a LUKS2 volume",
                        dev.path.display()
                    )));
                }
                let header = luks::read_header(&dev.path, dev.size).map_err(|e| {
                    VolumeError::Precondition(format!(
                        "{} has an unusable LUKS2 header: {e}",
                        dev.path.display()
                    ))
                })?;
                Ok(Found {
                    device: dev,
                    header,
                })
            }
            (true, false) => me.find(&vol),
        })
        .await?;
        let want = (!req.volume_id.is_empty()).then_some(req.volume_id.as_str());
        let token = found.header.check_policy(&found.device.path, want)?.clone();
        let backend = match pb::Backend::try_from(req.backend).unwrap_or(pb::Backend::Unspecified) {
            pb::Backend::DmCrypt => BackendChoice::DmCrypt,
            pb::Backend::Userspace => BackendChoice::Userspace,
            pb::Backend::Auto => BackendChoice::Auto,
            pb::Backend::Unspecified => self.cfg.backend,
        };
        let me = self.clone();
        let d = found.device.clone();
        let lock = blocking(move || Ok(DeviceLock::acquire(&me.cfg.run_dir, &d)?)).await?;
        if self.mapped(&token.volume_id).is_some() || mapping::dm_status(&token.volume_id).is_some()
        {
            drop(lock);
            return Ok(self.volume_pb(&found.device, &found.header));
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
        drop(lock);
        Ok(self.volume_pb(&found.device, &found.header))
    }

    /// Closes a volume; already closed is success, in use is a precondition failure.
    pub async fn close(self: &Arc<Self>, req: pb::CloseVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let id = req.volume_id.clone();
        let taken = self
            .mappings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let me = self.clone();
        let result = blocking(move || {
            let back = match taken.or_else(|| mapping::dm_status(&id)) {
                Some(m) => m.close(),
                None => Ok(()),
            };
            match back {
                Ok(()) => Ok(None),
                Err((m, e)) => Ok(Some((m, e))),
            }
        })
        .await?;
        if let Some((m, e)) = result {
            if let Some(m) = m {
                me.mappings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(req.volume_id.clone(), m);
            }
            return Err(e.into());
        }
        info!(volume_id = %req.volume_id, "closed");
        self.get(pb::GetVolumeRequest {
            volume_id: req.volume_id,
        })
        .await
        .or_else(|e| match e {
            VolumeError::NotFound(_) => Ok(pb::Volume {
                volume_id: String::new(),
                state: pb::VolumeState::Closed as i32,
                ..Default::default()
            }),
            e => Err(e),
        })
    }

    /// The state of one volume.
    pub async fn get(self: &Arc<Self>, req: pb::GetVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let f = blocking(move || me.find(&req.volume_id)).await?;
        Ok(self.volume_pb(&f.device, &f.header))
    }

    /// Every nodecrypt volume on this node's devices.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<pb::Volume>> {
        let me = self.clone();
        let found = blocking(move || Ok(me.discover())).await?;
        Ok(found
            .iter()
            .map(|f| self.volume_pb(&f.device, &f.header))
            .collect())
    }

    /// Opens every discovered volume in parallel; one failure never blocks the others.
    pub async fn unlock_all(self: &Arc<Self>) -> Result<Vec<pb::UnlockResult>> {
        let me = self.clone();
        let found = blocking(move || Ok(me.discover())).await?;
        let mut tasks = Vec::new();
        for f in found {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let volume_id = f
                    .header
                    .token
                    .as_ref()
                    .map(|(_, t)| t.volume_id.clone())
                    .unwrap_or_default();
                let device = f.device.path.display().to_string();
                let r = me
                    .open(pb::OpenVolumeRequest {
                        device: device.clone(),
                        volume_id: volume_id.clone(),
                        ..Default::default()
                    })
                    .await;
                let duration_ms = started.elapsed().as_millis() as u64;
                match r {
                    Ok(v) => pb::UnlockResult {
                        volume_id,
                        device,
                        ok: true,
                        duration_ms,
                        volume: Some(v),
                        ..Default::default()
                    },
                    Err(e) => {
                        warn!(%volume_id, %device, error = %e, "unlock failed");
                        pb::UnlockResult {
                            volume_id,
                            device,
                            ok: false,
                            code: format!("{:?}", e.code()),
                            message: e.to_string(),
                            duration_ms,
                            volume: None,
                        }
                    }
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| VolumeError::Internal(e.to_string()))?);
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- rotate / erase

    /// Moves a volume to a new key version: broker rotate → new keyslot → token → verify →
    /// old keyslots removed → old versions retired. Re-running after a crash finishes the
    /// pending rotation instead of starting another.
    pub async fn rotate(self: &Arc<Self>, req: pb::RotateVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let id = req.volume_id.clone();
        let f = blocking(move || me.find(&id)).await?;
        let me = self.clone();
        let d = f.device.clone();
        let lock = blocking(move || Ok(DeviceLock::acquire(&me.cfg.run_dir, &d)?)).await?;
        let d = f.device.clone();
        let h = blocking(move || Ok(luks::read_header(&d.path, d.size)?)).await?;
        let (token_id, old) = h
            .token
            .clone()
            .ok_or_else(|| VolumeError::Internal("token vanished".into()))?;
        h.check_policy(&f.device.path, Some(&req.volume_id))?;
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
            let h = luks::read_header(&d.path, d.size)?;
            for other in h.keyslots.iter().copied().filter(|&s| s != slot) {
                luks::destroy_keyslot(&d.path, other)?;
                crash_point("rotate-after-destroy-keyslot");
            }
            Ok(luks::read_header(&d.path, d.size)?)
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

    /// Crypto-erases a closed volume: every keyslot destroyed, header areas wiped, key
    /// destroyed at the broker. Re-running (or erasing a volume whose disk is gone)
    /// destroys the key at the broker.
    pub async fn erase(self: &Arc<Self>, req: pb::EraseVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        if !req.confirm {
            return Err(VolumeError::InvalidArgument(format!(
                "erasing {} destroys its data for good; confirm it (nodecrypt erase --yes)",
                req.volume_id
            )));
        }
        if self.mapped(&req.volume_id).is_some() || mapping::dm_status(&req.volume_id).is_some() {
            return Err(VolumeError::Precondition(format!(
                "volume {} is open; close it before erasing",
                req.volume_id
            )));
        }
        let me = self.clone();
        let id = req.volume_id.clone();
        let found = blocking(move || match me.find(&id) {
            Ok(f) => Ok(Some(f)),
            Err(VolumeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        let mut device = String::new();
        if let Some(f) = found {
            device = f.device.path.display().to_string();
            let me = self.clone();
            blocking(move || {
                let _lock = DeviceLock::acquire(&me.cfg.run_dir, &f.device)?;
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
            .destroy(&req.volume_id, "nodecrypt erase", self.deadline())
            .await?;
        info!(volume_id = %req.volume_id, device, "crypto-erased");
        Ok(pb::Volume {
            volume_id: req.volume_id,
            device,
            state: pb::VolumeState::Erased as i32,
            ..Default::default()
        })
    }

    /// The doctor's checks.
    pub async fn doctor(self: &Arc<Self>) -> Vec<pb::DoctorCheck> {
        let mut checks = Vec::new();
        let dm = mapping::dm_available();
        checks.push(pb::DoctorCheck {
            name: "kernel dm-crypt".into(),
            ok: dm,
            detail: if dm {
                "device-mapper present".into()
            } else {
                "no device-mapper in this kernel: volumes open through the userspace backend".into()
            },
        });
        let xts = nodecrypt_xts::Backend::best();
        checks.push(pb::DoctorCheck {
            name: "cpu aes".into(),
            ok: true,
            detail: format!("userspace XTS backend: {}", xts.name()),
        });
        let broker = self
            .broker
            .describe("doctor-probe", Instant::now() + Duration::from_secs(5))
            .await;
        let (ok, detail) = match broker {
            Ok(_) => (true, "reachable".to_string()),
            Err(BrokerError::Refused { status, .. }) if status.code() != Code::Unauthenticated => (
                true,
                format!("reachable (mTLS ok; probe answered {:?})", status.code()),
            ),
            Err(e) => (false, e.to_string()),
        };
        checks.push(pb::DoctorCheck {
            name: format!("broker {}", self.broker.endpoint()),
            ok,
            detail,
        });
        checks.push(cert_check(&self.cfg.broker.cert));
        checks
    }
}

fn cert_check(path: &Path) -> pb::DoctorCheck {
    let (ok, detail) = match nodecrypt_keybroker::tls::load_certs(path) {
        Ok(certs) if !certs.is_empty() => match x509_parser::parse_x509_certificate(&certs[0]) {
            Ok((_, cert)) => match cert.validity().time_to_expiration() {
                Some(left) => (
                    true,
                    format!(
                        "{} valid for {} more days",
                        path.display(),
                        left.whole_days()
                    ),
                ),
                None => (
                    false,
                    format!(
                        "{} is not valid now (valid {} to {})",
                        path.display(),
                        cert.validity().not_before,
                        cert.validity().not_after
                    ),
                ),
            },
            Err(e) => (false, format!("{}: {e}", path.display())),
        },
        Ok(_) => (false, format!("{}: no certificate", path.display())),
        Err(e) => (false, e.to_string()),
    };
    pb::DoctorCheck {
        name: "node certificate".into(),
        ok,
        detail,
    }
}

/// Undoes a half-written format (error path, not a crash): wipes the header we wrote.
fn rollback(dev: &Device) {
    if dev.kind == Kind::File || dev.kind == Kind::Block {
        if let Err(e) = dev.wipe(0, 16 << 20) {
            warn!(device = %dev.path.display(), error = %e, "rollback of a failed format failed");
        }
    }
}

enum Precheck {
    Fresh,
    Resume,
    Done(Box<Header>),
}
