//! The userspace data path: a LUKS2 data segment decrypted by the in-process XTS engine
//! and served as one file, `disk`, in a FUSE mount, optionally attached to a loop device so
//! that `mkfs`, `mount` and `fsck` work on it. For hosts without device-mapper.
//!
//! The bytes on the device are exactly what dm-crypt's `aes-xts-plain64` writes for the
//! same volume key and geometry (see `nodecrypt_xts`): the two paths are interchangeable.
//!
//! Concurrency: the FUSE session runs several worker threads; requests touching the same
//! sectors are ordered by a sector-range lock (readers share, writers exclude), partial
//! sectors are read-modify-written under that lock, and `fsync`/`flush` reach the device
//! with `fdatasync`.

mod disk;
mod fs;
mod lock;
mod sys;

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::key::MasterKey;

/// Where the data segment lies on the device, in bytes, and its encryption sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Byte offset of the data segment from the start of the device (LUKS2 segment
    /// `offset`).
    pub data_offset: u64,
    /// Size of the data segment in bytes: the size of the plaintext file.
    pub data_size: u64,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
}

/// What turns device bytes into plaintext. No `Debug`: it holds a key.
// Built once per mapping and moved into it; the size difference (with the test-only
// variant) costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Cipher {
    /// AES-256-XTS (`aes-xts-plain64`), the LUKS2 volume key's engine.
    Xts(nodecrypt_xts::Engine),
    /// Test and benchmark only: no encryption at all.
    #[cfg(feature = "passthrough")]
    Passthrough,
}

impl Cipher {
    /// An XTS cipher from the LUKS2 volume key for the given encryption sector size.
    pub fn xts(key: &MasterKey, sector_size: u32) -> Result<Cipher, Error> {
        Ok(Cipher::Xts(nodecrypt_xts::Engine::new(
            key.expose(),
            sector_size as usize,
        )?))
    }

    fn sector_size(&self) -> Option<u32> {
        match self {
            Cipher::Xts(e) => Some(e.sector_size() as u32),
            #[cfg(feature = "passthrough")]
            Cipher::Passthrough => None,
        }
    }
}

/// What can go wrong; every variant names the device, directory or loop device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The geometry does not fit the device or is malformed.
    #[error("{device}: invalid data segment geometry: {reason}")]
    Geometry {
        /// The encrypted device.
        device: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key or sector size was refused by the XTS engine.
    #[error("cannot set up the XTS engine: {0}")]
    Cipher(#[from] nodecrypt_xts::Error),
    /// The device could not be opened or inspected.
    #[error("{device}: {op}: {source}")]
    Device {
        /// The encrypted device.
        device: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// The mount directory could not be prepared (or is not empty, or already mounted).
    #[error("{dir}: {reason}")]
    MountDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong (run `cleanup_stale` after a crash).
        reason: String,
    },
    /// Mounting or unmounting the FUSE filesystem failed.
    #[error("{dir}: {op} the FUSE filesystem failed: {source}")]
    Fuse {
        /// The mount directory.
        dir: PathBuf,
        /// `mounting` or `unmounting`.
        op: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// `losetup` failed.
    #[error("{file}: loop device: {detail}")]
    Loop {
        /// The file (or loop device) concerned.
        file: PathBuf,
        /// losetup's message.
        detail: String,
    },
    /// The mapping is in use and was left serving: nothing was changed.
    #[error("{path} is in use ({reason}): unmount it or stop its users, then close again")]
    InUse {
        /// The loop device or the mount directory.
        path: PathBuf,
        /// Who uses it.
        reason: String,
    },
}

/// How many FUSE worker threads serve one mapping.
fn fuse_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(4, 16)
}

/// How long `close` waits for the kernel to release the file after detaching the loop
/// device (the release is asynchronous; a process holding the loop device open delays it).
const RELEASE_DEADLINE: Duration = Duration::from_secs(5);

/// How long `close` lets a file that was just closed be released before calling it in use.
const SETTLE_DEADLINE: Duration = Duration::from_secs(1);

/// Whether the loop device is put in direct-I/O mode (no page cache on the FUSE file, and
/// several requests in flight at once).
const LOOP_DIRECT_IO: bool = true;

/// A mounted userspace mapping. Dropping it closes it if it can (see [`Mapping::close`]);
/// if it is in use it keeps serving until the process exits.
pub struct Mapping {
    dir: PathBuf,
    device: PathBuf,
    loop_dev: Option<PathBuf>,
    session: Option<fuser::BackgroundSession>,
    opens: Arc<fs::OpenCount>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("dir", &self.dir)
            .field("device", &self.device)
            .field("loop_device", &self.loop_dev)
            .field("open", &self.session.is_some())
            .finish()
    }
}

impl Mapping {
    /// FUSE-mounts `dir` (created 0700 if missing; must be empty) serving one file,
    /// [`Mapping::file`], holding the decrypted data segment of `device` (a block device
    /// or a regular file), and attaches it to a loop device if `attach_loop`.
    ///
    /// The key is held by `cipher` until the mapping is closed. On error nothing stays
    /// mounted or attached.
    pub fn mount(
        dir: &Path,
        device: &Path,
        geometry: Geometry,
        cipher: Cipher,
        attach_loop: bool,
    ) -> Result<Mapping, Error> {
        let geo_err = |reason: String| Error::Geometry {
            device: device.to_owned(),
            reason,
        };
        let ss = geometry.sector_size;
        if ss != 512 && ss != 4096 {
            return Err(geo_err(format!("sector size {ss} is not 512 or 4096")));
        }
        if let Some(c) = cipher.sector_size().filter(|c| *c != ss) {
            return Err(geo_err(format!(
                "cipher sector size {c} != segment sector size {ss}"
            )));
        }
        if geometry.data_size == 0 || !geometry.data_size.is_multiple_of(u64::from(ss)) {
            return Err(geo_err(format!(
                "data size {} is not a positive multiple of {ss}",
                geometry.data_size
            )));
        }
        if !geometry.data_offset.is_multiple_of(512) {
            return Err(geo_err(format!(
                "data offset {} is not 512-byte aligned",
                geometry.data_offset
            )));
        }
        let dev_err = |op, source| Error::Device {
            device: device.to_owned(),
            op,
            source,
        };
        let mut dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(|e| dev_err("open read-write", e))?;
        let kind = dev.metadata().map_err(|e| dev_err("stat", e))?.file_type();
        if !kind.is_block_device() && !kind.is_file() {
            return Err(dev_err(
                "check type",
                io::Error::other("neither a block device nor a regular file"),
            ));
        }
        let dev_size = dev.seek(SeekFrom::End(0)).map_err(|e| dev_err("size", e))?;
        let end = geometry.data_offset.checked_add(geometry.data_size);
        if end.is_none_or(|end| end > dev_size) {
            return Err(geo_err(format!(
                "segment {}+{} ends past the device's {dev_size} bytes",
                geometry.data_offset, geometry.data_size
            )));
        }

        let dir = prepare_dir(dir)?;
        let opens = Arc::new(fs::OpenCount::default());
        let disk = disk::Disk::new(device.to_owned(), dev, geometry, cipher);
        let filesystem = fs::DiskFs::new(disk, opens.clone());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("nodecrypt".into()),
            fuser::MountOption::Subtype("nodecrypt".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::RW,
        ];
        config.n_threads = Some(fuse_threads());
        config.clone_fd = true;
        let session =
            fuser::spawn_mount(filesystem, &dir, &config).map_err(|source| Error::Fuse {
                dir: dir.clone(),
                op: "mounting",
                source,
            })?;
        let mut mapping = Mapping {
            dir,
            device: device.to_owned(),
            loop_dev: None,
            session: Some(session),
            opens,
        };
        if attach_loop {
            match sys::loop_attach(&mapping.file(), ss, LOOP_DIRECT_IO) {
                Ok(dev) => mapping.loop_dev = Some(dev),
                Err(detail) => {
                    let file = mapping.file();
                    if let Err(e) = mapping.close() {
                        tracing::warn!(error = %e, "cleanup after a failed loop attach");
                    }
                    return Err(Error::Loop { file, detail });
                }
            }
        }
        tracing::info!(dir = %mapping.dir.display(), device = %device.display(),
            loop_device = ?mapping.loop_dev, "userspace mapping mounted");
        Ok(mapping)
    }

    /// The plaintext file: `<dir>/disk`.
    pub fn file(&self) -> PathBuf {
        self.dir.join(fs::FILE_NAME)
    }

    /// The loop device the file is attached to, if any.
    pub fn loop_device(&self) -> Option<PathBuf> {
        self.loop_dev.clone()
    }

    /// The mount directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The encrypted device.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Whether the mapping is still mounted (false after a successful [`Mapping::close`]).
    pub fn is_open(&self) -> bool {
        self.session.is_some()
    }

    /// Detaches the loop device, unmounts, and drops the key (the engine wipes it).
    /// Closing a closed mapping succeeds.
    ///
    /// If the loop device or the file is in use (a mounted filesystem, a holder such as
    /// device-mapper, an open file descriptor, a process inside the mount), returns
    /// [`Error::InUse`] and the mapping keeps serving, unchanged, so no data is lost.
    pub fn close(&mut self) -> Result<(), Error> {
        if self.session.is_none() {
            return Ok(());
        }
        let file = self.file();
        let in_use = |path: &Path, reason: String| Error::InUse {
            path: path.to_owned(),
            reason,
        };
        if let Some(loop_dev) = self.loop_dev.clone() {
            // A detach can be pending from an earlier close (the kernel defers it while
            // the device is open); the device is ours only while it still points at us.
            if sys::loop_backing_file(&loop_dev).as_deref() == Some(file.as_path()) {
                if let Some(reason) = sys::block_device_in_use(&loop_dev) {
                    return Err(in_use(&loop_dev, reason));
                }
                // The kernel releases a closed file asynchronously: give a user that just
                // closed it a moment.
                let opens = self.opens.wait_at_most(1, Instant::now() + SETTLE_DEADLINE);
                if opens > 1 {
                    return Err(in_use(&file, format!("open {} more time(s)", opens - 1)));
                }
                sys::loop_detach(&loop_dev).map_err(|detail| Error::Loop {
                    file: loop_dev.clone(),
                    detail,
                })?;
            }
            let left = self
                .opens
                .wait_at_most(0, Instant::now() + RELEASE_DEADLINE);
            if left > 0 {
                return Err(in_use(
                    &loop_dev,
                    "a process holds the loop device open; it detaches when closed".into(),
                ));
            }
            self.loop_dev = None;
        }
        let opens = self.opens.wait_at_most(0, Instant::now() + SETTLE_DEADLINE);
        if opens > 0 {
            return Err(in_use(&file, format!("open {opens} time(s)")));
        }
        match nix::mount::umount2(&self.dir, nix::mount::MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                return Err(in_use(&self.dir, "a process uses the mount".into()));
            }
            Err(e) => {
                return Err(Error::Fuse {
                    dir: self.dir.clone(),
                    op: "unmounting",
                    source: e.into(),
                })
            }
        }
        if let Some(session) = self.session.take() {
            // The workers see the unmount, stop, and drop the filesystem (and the key).
            if let Err(e) = session.join() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "FUSE session ended with an error");
            }
        }
        tracing::info!(dir = %self.dir.display(), device = %self.device.display(),
            "userspace mapping closed");
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "userspace mapping dropped while in use; it keeps serving");
        }
    }
}

/// Creates `dir` (0700, parents too) or checks that an existing one is an empty directory
/// that is not a mount point; returns its canonical path.
fn prepare_dir(dir: &Path) -> Result<PathBuf, Error> {
    let fail = |reason: String| Error::MountDir {
        dir: dir.to_owned(),
        reason,
    };
    match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(fail(format!("cannot create the mount directory: {e}"))),
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| fail(format!("cannot resolve the mount directory: {e}")))?;
    if sys::mounts().iter().any(|m| m.mount_point == dir) {
        return Err(fail(
            "already a mount point (cleanup_stale clears a stale one)".into(),
        ));
    }
    let mut entries =
        std::fs::read_dir(&dir).map_err(|e| fail(format!("cannot list the directory: {e}")))?;
    if entries.next().is_some() {
        return Err(fail("the mount directory is not empty".into()));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| fail(format!("cannot set mode 0700: {e}")))?;
    Ok(dir)
}

/// After a crash: detaches the loop devices backed by files under `run_dir` and lazily
/// unmounts the FUSE mounts under it, so that a restarted agent can open the volumes
/// again. Call it before opening any mapping: it does not spare live ones.
///
/// A filesystem still mounted on such a loop device is left alone (the kernel detaches
/// the loop device when it is unmounted). Every leftover is attempted; the first failure
/// is returned.
pub fn cleanup_stale(run_dir: &Path) -> Result<(), Error> {
    let Ok(run_dir) = run_dir.canonicalize() else {
        return Ok(()); // nothing was ever mounted there
    };
    let mut first: Option<Error> = None;
    for (dev, backing) in sys::loop_devices() {
        if backing.starts_with(&run_dir) {
            tracing::info!(loop_device = %dev.display(), file = %backing.display(),
                "detaching a stale loop device");
            if let Err(detail) = sys::loop_detach(&dev) {
                first.get_or_insert(Error::Loop { file: dev, detail });
            }
        }
    }
    let mut stale: Vec<PathBuf> = sys::mounts()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.mount_point.starts_with(&run_dir))
        .map(|m| m.mount_point)
        .collect();
    // Deepest first, in case mounts are nested.
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for dir in stale {
        tracing::info!(dir = %dir.display(), "lazily unmounting a stale FUSE mount");
        if let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
            first.get_or_insert(Error::Fuse {
                dir,
                op: "unmounting",
                source: e.into(),
            });
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_can_move_between_threads() {
        // The daemon keeps mappings in shared state and closes them from any thread.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Mapping>();
        send_sync::<Cipher>();
    }
}
