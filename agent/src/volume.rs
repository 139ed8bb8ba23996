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
use crate::discover::{self, Found, Probe};
use crate::key::SlotKey;
use crate::luks::{self, Header, Inspection, LuksError, Refusal, Stage, Token};
use crate::mapping::{self, Mapped, MappingError, Source};
use crate::status;

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
    /// The volume is already open from another device carrying the same volume id.
    #[error("volume {volume_id} is already open from {open_from}; {device} carries the same volume id (a copy?) and is not opened beside it: close {volume_id} first")]
    OpenElsewhere {
        /// The volume id both devices carry.
        volume_id: String,
        /// The device the open mapping reads.
        open_from: PathBuf,
        /// The device asked for.
        device: PathBuf,
    },
    /// The device did not answer a header read in time.
    #[error("{device}: did not answer a header read within {waited:?}; nothing was changed")]
    Stuck {
        /// The device.
        device: PathBuf,
        /// How long discovery waited.
        waited: Duration,
    },
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
                LuksError::WrongKey { .. } | LuksError::Refused { .. } => Code::FailedPrecondition,
                LuksError::Crypt { .. } | LuksError::Io { .. } => Code::Internal,
            },
            VolumeError::Broker(e) => e.code(),
            VolumeError::Mapping(e) => e.code(),
            VolumeError::OpenElsewhere { .. } => Code::FailedPrecondition,
            VolumeError::Stuck { .. } => Code::DeadlineExceeded,
            VolumeError::Internal(_) => Code::Internal,
        }
    }

    /// The stable reason code of a refusal (`segment.offset`, `volume.open_elsewhere`,
    /// …), which `--json` and `UnlockResult.reason` carry; `None` for other errors.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            VolumeError::Luks(LuksError::Refused { refusal, .. })
            | VolumeError::Mapping(MappingError::Luks(LuksError::Refused { refusal, .. })) => {
                Some(refusal.reason)
            }
            VolumeError::OpenElsewhere { .. } => Some("volume.open_elsewhere"),
            VolumeError::Stuck { .. } => Some("device.timeout"),
            _ => None,
        }
    }

    fn refused(device: &Path, refusal: Refusal) -> VolumeError {
        VolumeError::Luks(LuksError::Refused {
            device: device.to_path_buf(),
            refusal,
        })
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
            0 => Err(refused.unwrap_or_else(|| {
                VolumeError::NotFound(format!(
                    "no device carries volume {volume_id} (scanned block devices{})",
                    if self.cfg.allow_file_devices {
                        " and configured files"
                    } else {
                        ""
                    }
                ))
            })),
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

    /// The live mapping of `volume_id` (ours, or a dm-crypt mapping the kernel holds).
    fn mapping_of(&self, volume_id: &str) -> Option<(pb::Volume, Option<Source>)> {
        let maps = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = maps.get(volume_id) {
            return Some((m.describe(), m.source().cloned()));
        }
        drop(maps);
        mapping::dm_status(volume_id).map(|m| (m.describe(), m.source().cloned()))
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
        if let Some((m, _)) = self
            .mapping_of(&volume_id)
            .filter(|(_, src)| src.as_ref().is_none_or(|s| s.id == dev.id))
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
                let tok = h.token().cloned().ok_or_else(|| {
                    VolumeError::Internal("a judged header without its token".into())
                })?;
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
        let overwrite = |what: String| {
            Err(VolumeError::Precondition(format!(
                "{} {what}; refusing to overwrite it (--force overrides)",
                dev.path.display()
            )))
        };
        match luks::inspect(&dev.path, dev.size, Stage::Usable)? {
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
                match luks::inspect(&dev.path, dev.size, Stage::Formatting)? {
                    Inspection::Ours(h) if h.label == volume_id => {
                        info!(device = %dev.path.display(), volume_id, "resuming an interrupted format");
                        return Ok(Precheck::Resume);
                    }
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
            (true, true) => Err(VolumeError::InvalidArgument(
                "give a device or a volume id".into(),
            )),
            (false, _) => judged(me.validate_device(&dev_path)?),
            (true, false) => me.find(&vol),
        })
        .await?;
        let token = found
            .header
            .token()
            .cloned()
            .ok_or_else(|| VolumeError::Internal("a judged header without its token".into()))?;
        if !req.volume_id.is_empty() && token.volume_id != req.volume_id {
            return Err(VolumeError::Precondition(format!(
                "{} belongs to volume {}, not {}",
                found.device.path.display(),
                token.volume_id,
                req.volume_id
            )));
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
        if let Some((_, src)) = self.mapping_of(&token.volume_id) {
            drop(locks);
            return match src {
                Some(src) if src.id != found.device.id => Err(VolumeError::OpenElsewhere {
                    volume_id: token.volume_id,
                    open_from: src.path,
                    device: found.device.path,
                }),
                _ => Ok(self.volume_pb(&found.device, &found.header)),
            };
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

    /// The state of one volume.
    pub async fn get(self: &Arc<Self>, req: pb::GetVolumeRequest) -> Result<pb::Volume> {
        validate_volume_id(&req.volume_id)?;
        let me = self.clone();
        let f = blocking(move || me.find(&req.volume_id)).await?;
        Ok(self.volume_pb(&f.device, &f.header))
    }

    /// Every nodecrypt-looking device on this node: usable volumes with their state, and
    /// refused or unreadable headers with the reason (state `REFUSED`).
    pub async fn list(self: &Arc<Self>) -> Result<Vec<pb::Volume>> {
        let me = self.clone();
        let found = blocking(move || Ok(me.discover())).await?;
        Ok(found.iter().map(|p| self.probe_pb(p)).collect())
    }

    fn probe_pb(&self, p: &Probe) -> pb::Volume {
        let refused = |volume_id: Option<&String>, e: VolumeError| pb::Volume {
            volume_id: volume_id.cloned().unwrap_or_default(),
            device: p.path().display().to_string(),
            state: pb::VolumeState::Refused as i32,
            reason: e.reason().unwrap_or_default().to_string(),
            problem: e.to_string(),
            ..Default::default()
        };
        match p {
            Probe::Ours(f) => self.volume_pb(&f.device, &f.header),
            Probe::Refused {
                device,
                claimed_volume_id,
                refusal,
            } => refused(
                claimed_volume_id.as_ref(),
                VolumeError::refused(&device.path, refusal.clone()),
            ),
            Probe::Stuck { path } => refused(
                None,
                VolumeError::Stuck {
                    device: path.clone(),
                    waited: discover::PROBE_TIMEOUT,
                },
            ),
        }
    }

    /// The state of the volume on `dev`, or why its header is refused.
    pub(crate) fn describe_device(&self, dev: &Device) -> pb::Volume {
        match judged(dev.clone()) {
            Ok(f) => self.volume_pb(&f.device, &f.header),
            Err(e) => pb::Volume {
                device: dev.path.display().to_string(),
                state: pb::VolumeState::Refused as i32,
                reason: e.reason().unwrap_or_default().to_string(),
                problem: e.to_string(),
                ..Default::default()
            },
        }
    }

    /// Opens every discovered volume in parallel; one failure never blocks the others,
    /// and every nodecrypt-looking device that cannot be opened is reported.
    pub async fn unlock_all(self: &Arc<Self>) -> Result<Vec<pb::UnlockResult>> {
        let me = self.clone();
        let started = Instant::now();
        let found = blocking(move || Ok(me.discover())).await?;
        let mut out = Vec::new();
        let mut tasks = Vec::new();
        for p in found {
            let f = match p {
                Probe::Ours(f) => f,
                other => {
                    let v = self.probe_pb(&other);
                    warn!(volume_id = %v.volume_id, device = %v.device, reason = %v.reason, error = %v.problem, "unlock refused");
                    out.push(pb::UnlockResult {
                        volume_id: v.volume_id,
                        device: v.device,
                        ok: false,
                        code: status::name(if matches!(other, Probe::Stuck { .. }) {
                            Code::DeadlineExceeded
                        } else {
                            Code::FailedPrecondition
                        })
                        .to_string(),
                        message: v.problem,
                        reason: v.reason,
                        duration_ms: started.elapsed().as_millis() as u64,
                        volume: None,
                    });
                    continue;
                }
            };
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let volume_id = f.volume_id().to_string();
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
                            code: status::name(e.code()).to_string(),
                            reason: e.reason().unwrap_or_default().to_string(),
                            message: e.to_string(),
                            duration_ms,
                            volume: None,
                        }
                    }
                }
            }));
        }
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
        let (d, id) = (f.device.clone(), req.volume_id.clone());
        let lock = blocking(move || {
            let dev = DeviceLock::acquire(&me.cfg.run_dir, &d)?;
            Ok((dev, DeviceLock::volume(&me.cfg.run_dir, &id)?))
        })
        .await?;
        // Judged again under the lock: the header decides what is left to do.
        let d = f.device.clone();
        let h = blocking(move || Ok(judged(d)?.header)).await?;
        let (token_id, old) = h
            .token
            .clone()
            .ok_or_else(|| VolumeError::Internal("a judged header without its token".into()))?;
        if old.volume_id != req.volume_id {
            return Err(VolumeError::Precondition(format!(
                "{} now carries volume {}, not {}",
                f.device.path.display(),
                old.volume_id,
                req.volume_id
            )));
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
        if self.mapping_of(&req.volume_id).is_some() {
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
            // An erase that stopped after destroying the keyslots left a header with
            // none: judged for that stage, it is finished.
            Err(VolumeError::Luks(LuksError::Refused { device, refusal }))
                if refusal.reason == "keyslot.count" =>
            {
                let dev = me.validate_device(&device.display().to_string())?;
                match luks::inspect(&dev.path, dev.size, Stage::Erasing)? {
                    Inspection::Ours(header) if header.keyslots.is_empty() => Ok(Some(Found {
                        device: dev,
                        header,
                    })),
                    _ => Err(VolumeError::refused(&device, refusal)),
                }
            }
            Err(e) => Err(e),
        })
        .await?;
        let mut device = String::new();
        if let Some(f) = found {
            device = f.device.path.display().to_string();
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
        // Without device-mapper the userspace backend serves: a failure only when the
        // agent is configured for dm-crypt alone.
        let dm = mapping::dm_available();
        checks.push(pb::DoctorCheck {
            name: "kernel dm-crypt".into(),
            ok: dm || self.cfg.backend != BackendChoice::DmCrypt,
            detail: match (dm, self.cfg.backend) {
                (true, _) => "device-mapper present".into(),
                (false, BackendChoice::DmCrypt) => "no device-mapper in this kernel, and backend = \"dm-crypt\" is configured: no volume can open (set backend = \"auto\" or \"userspace\")".into(),
                (false, _) => "no device-mapper in this kernel: volumes open through the userspace backend".into(),
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

/// Judges the header of a device given by path: usable, or the refusal (read-only).
fn judged(dev: Device) -> Result<Found> {
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
