//! Devices for the tests to encrypt: sparse image files, loop devices, whole-file hashes,
//! and a small mounted filesystem to fill.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_ok;

/// A sparse file of `mib` MiB at `path`.
pub fn sparse_file(path: &Path, mib: u64) -> PathBuf {
    let f = fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
    path.to_path_buf()
}

/// SHA-256 of a whole file, hex.
pub fn file_hash(path: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(path).expect("open for hash");
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// A loop device over `file`, detached on drop.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDev {
    /// Attaches `file`.
    pub fn attach(file: &Path) -> LoopDev {
        let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        LoopDev {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A small ext4 filesystem in a file, attached to a loop device and mounted at
/// `mountpoint`; unmounted and detached on drop. Lets a test fill a filesystem.
pub struct SmallFs {
    /// The mount point.
    pub mountpoint: PathBuf,
    loop_dev: Option<LoopDev>,
}

impl SmallFs {
    /// Makes a `mib`-MiB ext4 (no reserved blocks) in `image` and mounts it at
    /// `mountpoint` (created if missing).
    pub fn new(image: &Path, mountpoint: &Path, mib: u64) -> SmallFs {
        sparse_file(image, mib);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(image),
        );
        let dev = LoopDev::attach(image);
        fs::create_dir_all(mountpoint).expect("mount point");
        run_ok(Command::new("mount").arg(&dev.path).arg(mountpoint));
        SmallFs {
            mountpoint: mountpoint.to_path_buf(),
            loop_dev: Some(dev),
        }
    }

    /// Writes `path` until the filesystem is full (ENOSPC); returns the bytes written.
    pub fn fill(&self, path: &Path) -> u64 {
        use std::io::Write;
        let mut f = fs::File::create(path).expect("create filler");
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
        // Smaller writes take the last partial blocks too.
        let small = [0x5au8; 512];
        while let Ok(n) = f.write(&small) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        drop(self.loop_dev.take());
    }
}
