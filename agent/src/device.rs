//! Block-device probing and safety checks: path validation, kind, size, mounts, holders,
//! signatures (libblkid), the per-device lock, header wipes. Inspection never writes.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use libblkid_rs::{BlkidProbe, BlkidSafeprobeRet};
use nix::fcntl::{Flock, FlockArg};

/// The smallest device nodecrypt formats: 16 MiB of LUKS2 header plus 16 MiB of data.
pub const MIN_DEVICE_SIZE: u64 = 32 << 20;

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The path is not acceptable as given.
    #[error("{path:?}: {what}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The device does not exist.
    #[error("{0}: no such device or file")]
    NotFound(PathBuf),
    /// The device holds data or is in use.
    #[error("{device}: {what}")]
    Busy {
        /// Device path.
        device: PathBuf,
        /// What was found.
        what: String,
    },
    /// I/O error.
    #[error("{device}: {source}")]
    Io {
        /// Device path.
        device: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(device: &Path) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
    move |source| DeviceError::Io {
        device: device.to_path_buf(),
        source,
    }
}

/// What kind of device a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A block device.
    Block,
    /// A regular file (tests and the demo, with `allow_file_devices`).
    File,
}

/// A validated device: canonical absolute path, kind, size, identity.
#[derive(Debug, Clone)]
pub struct Device {
    /// Canonical path.
    pub path: PathBuf,
    /// Block device or file.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// `st_rdev` (block) or `st_dev`:`st_ino` (file), for locks.
    pub id: String,
    /// major:minor of a block device.
    pub majmin: Option<(u64, u64)>,
}

/// Validates `path` as given by a caller: absolute, no `..`, exists, a block device (or a
/// regular file when `allow_files`). Reads nothing from the device but its size.
pub fn validate(path: &str, allow_files: bool) -> Result<Device, DeviceError> {
    let bad = |what: &str| DeviceError::BadPath {
        path: path.to_string(),
        what: what.to_string(),
    };
    if path.is_empty() {
        return Err(bad("no device given"));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(bad("not a valid path"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad("device paths must be absolute"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad("device paths must not contain `..`"));
    }
    let canonical = fs::canonicalize(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DeviceError::NotFound(p.to_path_buf()),
        _ => DeviceError::Io {
            device: p.to_path_buf(),
            source: e,
        },
    })?;
    let meta = fs::metadata(&canonical).map_err(io(&canonical))?;
    let ft = meta.file_type();
    let (kind, id, majmin) = if ft.is_block_device() {
        let rdev = meta.rdev();
        let mm = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        (Kind::Block, format!("b{}_{}", mm.0, mm.1), Some(mm))
    } else if ft.is_file() {
        if !allow_files {
            return Err(bad(
                "is a regular file; only block devices are accepted (set allow_file_devices = true in the agent config for tests)",
            ));
        }
        (Kind::File, format!("f{}_{}", meta.dev(), meta.ino()), None)
    } else if ft.is_dir() {
        return Err(bad("is a directory, not a block device"));
    } else if ft.is_char_device() {
        return Err(bad("is a character device, not a block device"));
    } else {
        return Err(bad("is not a block device"));
    };
    let size = match kind {
        Kind::File => meta.len(),
        Kind::Block => File::open(&canonical)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(io(&canonical))?,
    };
    Ok(Device {
        path: canonical,
        kind,
        size,
        id,
        majmin,
    })
}

impl Device {
    /// Refuses a device that is mounted, has holders, or backs a loop device.
    pub fn check_not_in_use(&self) -> Result<(), DeviceError> {
        let busy = |what: String| DeviceError::Busy {
            device: self.path.clone(),
            what,
        };
        if let Some((maj, min)) = self.majmin {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mine = format!("{maj}:{min}");
            let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
            let mut parts = vec![mine.clone()];
            if let Ok(entries) = fs::read_dir(&sys) {
                for e in entries.flatten() {
                    if let Ok(dev) = fs::read_to_string(e.path().join("dev")) {
                        parts.push(dev.trim().to_string());
                    }
                }
            }
            for line in mountinfo.lines() {
                let mut f = line.split_whitespace();
                let (_, _, majmin, _, mountpoint) =
                    (f.next(), f.next(), f.next(), f.next(), f.next());
                if let (Some(mm), Some(mp)) = (majmin, mountpoint) {
                    if parts.iter().any(|p| p == mm) {
                        return Err(busy(format!("is mounted at {mp}")));
                    }
                }
            }
            if let Ok(holders) = fs::read_dir(sys.join("holders")) {
                let names: Vec<String> = holders
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                if !names.is_empty() {
                    return Err(busy(format!("is in use by {}", names.join(", "))));
                }
            }
        } else if let Some(loopdev) = loop_backing(&self.path) {
            return Err(busy(format!("backs loop device {loopdev}")));
        }
        Ok(())
    }

    /// The signatures libblkid finds (filesystem, partition table, LUKS, RAID...), as
    /// `TYPE` names; empty when the device looks blank.
    pub fn signatures(&self) -> Result<Vec<String>, DeviceError> {
        let err = |e: libblkid_rs::BlkidErr| DeviceError::Io {
            device: self.path.clone(),
            source: std::io::Error::other(format!("libblkid probe: {e}")),
        };
        let mut probe = BlkidProbe::new_from_filename(&self.path).map_err(err)?;
        probe.enable_superblocks(true).map_err(err)?;
        probe.enable_partitions(true).map_err(err)?;
        let mut found = Vec::new();
        match probe.do_safeprobe().map_err(err)? {
            BlkidSafeprobeRet::Success => {
                for key in ["TYPE", "PTTYPE"] {
                    if let Ok(v) = probe.lookup_value(key) {
                        found.push(if key == "PTTYPE" {
                            format!("{v} partition table")
                        } else {
                            v
                        });
                    }
                }
                if found.is_empty() {
                    found.push("an unidentified signature".into());
                }
            }
            BlkidSafeprobeRet::Ambiguous => found.push("several conflicting signatures".into()),
            BlkidSafeprobeRet::None => {}
        }
        Ok(found)
    }

    /// Logical block size (512 for files).
    pub fn logical_block_size(&self) -> u32 {
        self.majmin
            .and_then(|(maj, min)| {
                fs::read_to_string(format!(
                    "/sys/dev/block/{maj}:{min}/queue/logical_block_size"
                ))
                .ok()
            })
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512)
    }

    /// Whether the device is rotational (the dm-crypt workqueues help there).
    pub fn rotational(&self) -> bool {
        self.majmin
            .and_then(|(maj, min)| {
                fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/queue/rotational")).ok()
            })
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Overwrites `[start, end)` with zeros and syncs (header areas of an erased volume).
    pub fn wipe(&self, start: u64, end: u64) -> Result<(), DeviceError> {
        let mut opts = OpenOptions::new();
        opts.write(true);
        if self.kind == Kind::Block {
            // O_EXCL on a block device: fails while anything has it mounted or mapped.
            opts.custom_flags(nix::libc::O_EXCL);
        }
        let mut f = opts.open(&self.path).map_err(io(&self.path))?;
        let end = end.min(self.size);
        let zeros = vec![0u8; 1 << 20];
        let mut pos = start;
        f.seek(SeekFrom::Start(pos)).map_err(io(&self.path))?;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n]).map_err(io(&self.path))?;
            pos += n as u64;
        }
        f.sync_all().map_err(io(&self.path))
    }
}

/// The loop device backed by `file`, if any.
pub fn loop_backing(file: &Path) -> Option<String> {
    for e in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()) == file {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

/// Every whole disk and partition the kernel lists (for discovery), skipping
/// device-mapper devices, which are our own mappings.
pub fn block_devices() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/class/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("dm-") || name.starts_with("ram") || name.starts_with("zram") {
                continue;
            }
            if name.starts_with("loop") && !e.path().join("loop/backing_file").exists() {
                continue;
            }
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    out.sort();
    out
}

/// An exclusive advisory lock on one device, held for the length of a flow. The lock file
/// lives under the agent's run directory, keyed by the device identity, so two paths to
/// one device share a lock (libcryptsetup takes its own locks on the device itself).
pub struct DeviceLock {
    _lock: Flock<File>,
}

impl DeviceLock {
    /// Blocks until the lock of `device` is held.
    pub fn acquire(run_dir: &Path, device: &Device) -> Result<DeviceLock, DeviceError> {
        Self::named(run_dir, &device.id)
    }

    /// Blocks until the lock of volume `volume_id` is held: whichever device carries it,
    /// one flow at a time decides what is mapped for it. Taken after a device's lock.
    pub fn volume(run_dir: &Path, volume_id: &str) -> Result<DeviceLock, DeviceError> {
        Self::named(run_dir, &format!("v-{volume_id}"))
    }

    fn named(run_dir: &Path, key: &str) -> Result<DeviceLock, DeviceError> {
        let dir = run_dir.join("locks");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| DeviceError::Io {
                device: path.clone(),
                source: e.into(),
            })?;
        Ok(DeviceLock { _lock: lock })
    }
}
