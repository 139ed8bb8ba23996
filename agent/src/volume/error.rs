//! What a flow can fail with, and the one mapping of those failures to gRPC codes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;

use crate::broker::BrokerError;
use crate::device::DeviceError;
use crate::luks::{LuksError, Refusal};
use crate::mapping::MappingError;

/// What a flow can fail with; [`VolumeError::code`] is the one place that maps errors to
/// gRPC codes (and through them to CLI exit codes).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A volume id that breaks the rule (a DNS label).
    #[error(transparent)]
    InvalidVolumeId(#[from] nodecrypt_common::InvalidName),
    /// A mapping name that is not a safe file name.
    #[error("invalid mapping name {given:?}: use letters, digits, '-', '_' and '.'")]
    InvalidName {
        /// The name as given.
        given: String,
    },
    /// format: a sector size other than 512 or 4096.
    #[error("sector size {size} is not 512 or 4096")]
    InvalidSectorSize {
        /// The size asked for.
        size: u32,
    },
    /// format: a sector size below what the device can address.
    #[error("{device}: sector size {sector} is below the device's logical block size {block}")]
    SectorBelowBlock {
        /// The device.
        device: PathBuf,
        /// The sector size asked for.
        sector: u32,
        /// The device's logical block size.
        block: u32,
    },
    /// open: neither a device nor a volume id.
    #[error("give a device or a volume id")]
    NoTarget,
    /// erase: not confirmed.
    #[error("erasing {volume_id} destroys its data for good; confirm it (nodecrypt erase --yes)")]
    EraseNotConfirmed {
        /// The volume.
        volume_id: String,
    },
    /// repair-header: a copy name other than primary or secondary.
    #[error("--from {given:?}: give primary or secondary")]
    InvalidCopy {
        /// The name as given.
        given: String,
    },
    /// No scanned device carries the volume.
    #[error("no device carries volume {volume_id} (scanned {scanned})")]
    NotOnAnyDevice {
        /// The volume.
        volume_id: String,
        /// What was scanned.
        scanned: &'static str,
    },
    /// Several devices carry the volume; which one is meant is the caller's to say.
    #[error("volume {volume_id} is on several devices ({}); open it by device path", list(.devices))]
    OnSeveralDevices {
        /// The volume.
        volume_id: String,
        /// The devices.
        devices: Vec<PathBuf>,
    },
    /// The device carries another volume than the one asked for.
    #[error("{device} belongs to volume {found}, not {wanted}")]
    WrongVolume {
        /// The device.
        device: PathBuf,
        /// The volume its header names.
        found: String,
        /// The volume asked for.
        wanted: String,
    },
    /// format: the device is too small.
    #[error("{device}: {size} bytes is smaller than the minimum of 32 MiB")]
    TooSmall {
        /// The device.
        device: PathBuf,
        /// Its size.
        size: u64,
    },
    /// format: the device carries a LUKS2 header that is not this volume's.
    #[error("{device} {what}; refusing to overwrite it (--force overrides)")]
    WouldOverwrite {
        /// The device.
        device: PathBuf,
        /// What it carries.
        what: String,
    },
    /// format: the device holds a filesystem, partition table or other signature.
    #[error("{device} holds data ({}); refusing to format it (--force overrides)", .signatures.join(", "))]
    HoldsData {
        /// The device.
        device: PathBuf,
        /// What libblkid found.
        signatures: Vec<String>,
    },
    /// erase: the volume is open.
    #[error("volume {volume_id} is open; close it before erasing")]
    EraseWhileOpen {
        /// The volume.
        volume_id: String,
    },
    /// A device check failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// libcryptsetup failed, or a header was refused.
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
    /// The agent's run directory cannot be made.
    #[error("{path}: cannot create the agent's run directory: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A worker thread of a flow died (a bug).
    #[error("a worker thread failed: {detail}")]
    Worker {
        /// What the runtime said.
        detail: String,
    },
    /// A header that passed the judge for use has no token (a bug).
    #[error("{device}: the judged header has no token")]
    NoToken {
        /// The device.
        device: PathBuf,
    },
}

fn list(devices: &[PathBuf]) -> String {
    devices
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl VolumeError {
    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        use VolumeError as E;
        match self {
            E::InvalidVolumeId(_)
            | E::InvalidName { .. }
            | E::InvalidSectorSize { .. }
            | E::SectorBelowBlock { .. }
            | E::NoTarget
            | E::EraseNotConfirmed { .. }
            | E::InvalidCopy { .. } => Code::InvalidArgument,
            E::NotOnAnyDevice { .. } => Code::NotFound,
            E::OnSeveralDevices { .. }
            | E::WrongVolume { .. }
            | E::TooSmall { .. }
            | E::WouldOverwrite { .. }
            | E::HoldsData { .. }
            | E::EraseWhileOpen { .. }
            | E::OpenElsewhere { .. } => Code::FailedPrecondition,
            E::Device(e) => match e {
                DeviceError::BadPath { .. } => Code::InvalidArgument,
                DeviceError::NotFound(_) => Code::NotFound,
                DeviceError::Busy { .. } => Code::FailedPrecondition,
                DeviceError::Io { .. } => Code::Internal,
            },
            E::Luks(e) => match e {
                LuksError::WrongKey { .. } | LuksError::Refused { .. } => Code::FailedPrecondition,
                LuksError::Crypt { .. } | LuksError::Io { .. } => Code::Internal,
            },
            E::Broker(e) => e.code(),
            E::Mapping(e) => e.code(),
            E::Stuck { .. } => Code::DeadlineExceeded,
            E::RunDir { .. } | E::Worker { .. } | E::NoToken { .. } => Code::Internal,
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

    pub(crate) fn refused(device: &Path, refusal: Refusal) -> VolumeError {
        VolumeError::Luks(LuksError::Refused {
            device: device.to_path_buf(),
            refusal,
        })
    }
}

/// The result of a flow.
pub type Result<T> = std::result::Result<T, VolumeError>;
