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

    pub(crate) fn refused(device: &Path, refusal: Refusal) -> VolumeError {
        VolumeError::Luks(LuksError::Refused {
            device: device.to_path_buf(),
            refusal,
        })
    }
}

/// The result of a flow.
pub type Result<T> = std::result::Result<T, VolumeError>;
