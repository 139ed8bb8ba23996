//! Mapping an unlocked volume: the kernel's dm-crypt, or the agent's userspace engine
//! (FUSE file + loop device) where the kernel has no device-mapper.

use std::fs;
use std::path::{Path, PathBuf};

use tonic::Code;
use tracing::warn;

use crate::config::BackendChoice;
use crate::device::Device;
use crate::key::SlotKey;
use crate::luks::{self, Header, LuksError, Token};
use crate::userspace;
use crate::volume::types::{Backend, MappingInfo};

/// Mapping failures.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// dm-crypt was asked for on a kernel without device-mapper.
    #[error("{device}: this kernel has no device-mapper, so dm-crypt cannot map the volume; open it with the userspace backend (`nodecrypt open --userspace`, or backend = \"userspace\" or \"auto\" in the agent config)")]
    NoDeviceMapper {
        /// Device path.
        device: PathBuf,
    },
    /// The mapping is in use (mounted, held, open).
    #[error("volume {volume_id} is in use: {what}; unmount it first (nothing was changed)")]
    InUse {
        /// Volume.
        volume_id: String,
        /// By what.
        what: String,
    },
    /// libcryptsetup failed.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// The userspace data path failed.
    #[error("userspace mapping of {volume_id}: {what}")]
    Userspace {
        /// Volume.
        volume_id: String,
        /// What failed.
        what: String,
    },
}

impl MappingError {
    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            MappingError::NoDeviceMapper { .. } | MappingError::InUse { .. } => {
                Code::FailedPrecondition
            }
            MappingError::Luks(LuksError::WrongKey { .. } | LuksError::Refused { .. }) => {
                Code::FailedPrecondition
            }
            _ => Code::Internal,
        }
    }
}

/// The default mapping name of a volume.
pub fn default_name(volume_id: &str) -> String {
    format!("nodecrypt-{volume_id}")
}

/// Whether this kernel has device-mapper.
pub fn dm_available() -> bool {
    // Not /dev/mapper/control: libdevmapper creates that node even where the kernel has
    // no device-mapper.
    Path::new("/sys/module/dm_mod").exists()
        || fs::read_to_string("/proc/misc")
            .map(|m| m.lines().any(|l| l.ends_with(" device-mapper")))
            .unwrap_or(false)
}

/// The device a mapping reads and writes: its path and identity ([`Device::id`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The device path as opened.
    pub path: PathBuf,
    /// The device identity (`st_rdev`, or `st_dev`:`st_ino` of a file).
    pub id: String,
}

impl Source {
    /// The source of a validated device.
    pub fn of(dev: &Device) -> Source {
        Source {
            path: dev.path.clone(),
            id: dev.id.clone(),
        }
    }
}

/// A live mapping.
pub enum Mapped {
    /// A dm-crypt mapping `/dev/mapper/<name>`.
    Dm {
        /// Volume.
        volume_id: String,
        /// Mapping name.
        name: String,
        /// The device it maps, if the kernel says (it does for every live mapping).
        source: Option<Source>,
    },
    /// The userspace engine.
    User {
        /// Volume.
        volume_id: String,
        /// Mapping name (informational).
        name: String,
        /// The device it maps.
        source: Source,
        /// The FUSE file and loop device.
        mapping: userspace::Mapping,
    },
}

impl Mapped {
    /// The device this mapping reads and writes, if known.
    pub fn source(&self) -> Option<&Source> {
        match self {
            Mapped::Dm { source, .. } => source.as_ref(),
            Mapped::User { source, .. } => Some(source),
        }
    }

    /// Whether this mapping is of `dev` (a dm mapping whose device the kernel does not
    /// name counts as of every device: it cannot be told apart, and refusing would make
    /// re-opening after an agent restart fail).
    pub fn is_of(&self, dev: &Device) -> bool {
        self.source().is_none_or(|s| s.id == dev.id)
    }

    /// Backend, name, mapped device and file, as a partial `Volume`.
    pub fn describe(&self) -> MappingInfo {
        match self {
            Mapped::Dm { name, .. } => MappingInfo {
                backend: Backend::DmCrypt,
                mapped_device: Some(PathBuf::from("/dev/mapper").join(name)),
                mapped_file: None,
                name: name.clone(),
            },
            Mapped::User { name, mapping, .. } => MappingInfo {
                backend: Backend::Userspace,
                mapped_device: mapping.loop_device(),
                mapped_file: Some(mapping.file()),
                name: name.clone(),
            },
        }
    }

    /// Unmaps; on failure the mapping is handed back, still serving.
    #[allow(clippy::result_large_err)]
    pub fn close(self) -> Result<(), (Option<Mapped>, MappingError)> {
        match self {
            Mapped::Dm {
                name, volume_id, ..
            } => close_dm(&name, &volume_id).map_err(|e| (None, e)),
            Mapped::User {
                volume_id,
                name,
                source,
                mut mapping,
            } => match mapping.close() {
                Ok(()) => Ok(()),
                Err(e) => {
                    let err = match e {
                        userspace::Error::InUse { path, reason } => MappingError::InUse {
                            volume_id: volume_id.clone(),
                            what: format!("{} ({reason})", path.display()),
                        },
                        e => MappingError::Userspace {
                            volume_id: volume_id.clone(),
                            what: e.to_string(),
                        },
                    };
                    Err((
                        Some(Mapped::User {
                            volume_id,
                            name,
                            source,
                            mapping,
                        }),
                        err,
                    ))
                }
            },
        }
    }
}

/// Removes a dm-crypt mapping; busy is [`MappingError::InUse`].
pub fn close_dm(name: &str, volume_id: &str) -> Result<(), MappingError> {
    match luks::deactivate(name) {
        Ok(()) => Ok(()),
        Err(LuksError::Crypt { source, .. }) if matches!(&source, libcryptsetup_rs::LibcryptErr::IOError(e) if e.raw_os_error() == Some(nix::libc::EBUSY)) => {
            Err(MappingError::InUse {
                volume_id: volume_id.to_string(),
                what: format!("/dev/mapper/{name} is busy (mounted or held open)"),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// A dm-crypt mapping of `volume_id` that exists in the kernel (survives agent restarts),
/// with the device it maps as sysfs names it. Reads only sysfs and /dev.
pub fn dm_status(volume_id: &str) -> Option<Mapped> {
    let name = default_name(volume_id);
    let node = Path::new("/dev/mapper").join(&name);
    node.exists().then(|| Mapped::Dm {
        volume_id: volume_id.to_string(),
        source: dm_source(&node),
        name,
    })
}

/// The one device under a dm mapping node (`/sys/block/dm-N/slaves/`).
fn dm_source(node: &Path) -> Option<Source> {
    let dm = fs::canonicalize(node).ok()?;
    let dm = dm.file_name()?.to_str()?.to_string();
    let mut slaves = fs::read_dir(format!("/sys/block/{dm}/slaves"))
        .ok()?
        .flatten();
    let slave = slaves.next()?.file_name();
    if slaves.next().is_some() {
        return None;
    }
    let slave = slave.to_str()?;
    let majmin = fs::read_to_string(format!("/sys/class/block/{slave}/dev")).ok()?;
    let (maj, min) = majmin.trim().split_once(':')?;
    Some(Source {
        path: PathBuf::from("/dev").join(slave),
        id: format!("b{maj}_{min}"),
    })
}

/// Maps an unlocked volume with the chosen backend.
#[allow(clippy::too_many_arguments)]
pub fn open(
    run_dir: &Path,
    backend: BackendChoice,
    dev: &Device,
    header: &Header,
    token: &Token,
    name: &str,
    key: &SlotKey,
    allow_discards: bool,
) -> Result<Mapped, MappingError> {
    let dm = match backend {
        BackendChoice::DmCrypt => {
            if !dm_available() {
                return Err(MappingError::NoDeviceMapper {
                    device: dev.path.clone(),
                });
            }
            true
        }
        BackendChoice::Userspace => false,
        BackendChoice::Auto => dm_available(),
    };
    if dm {
        luks::activate(&dev.path, name, token.keyslot, key, allow_discards)?;
        return Ok(Mapped::Dm {
            volume_id: token.volume_id.clone(),
            name: name.to_string(),
            source: Some(Source::of(dev)),
        });
    }
    let master = luks::volume_key(&dev.path, token.keyslot, key)?;
    let uerr = |e: userspace::Error| MappingError::Userspace {
        volume_id: token.volume_id.clone(),
        what: e.to_string(),
    };
    let cipher = userspace::Cipher::xts(&master, header.sector_size).map_err(uerr)?;
    drop(master);
    let geometry = userspace::Geometry {
        data_offset: header.data_offset,
        data_size: header.data_size,
        sector_size: header.sector_size,
    };
    let dir = run_dir.join("mnt").join(&token.volume_id);
    let mapping =
        userspace::Mapping::mount(&dir, &dev.path, geometry, cipher, true).map_err(uerr)?;
    Ok(Mapped::User {
        volume_id: token.volume_id.clone(),
        name: name.to_string(),
        source: Source::of(dev),
        mapping,
    })
}

/// After an agent crash: tears down what a dead agent left (FUSE mounts, loop devices).
pub fn cleanup_stale(run_dir: &Path) {
    if let Err(e) = userspace::cleanup_stale(&run_dir.join("mnt")) {
        warn!(error = %e, "cleanup of stale userspace mappings failed");
    }
}
