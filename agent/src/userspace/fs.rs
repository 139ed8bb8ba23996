//! The FUSE filesystem: a root directory holding one regular file, `disk`, backed by
//! [`Disk`]. Nothing can be created, renamed, removed or resized.

use std::ffi::OsStr;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use super::disk::Disk;

/// Name of the one file in the mount.
pub(crate) const FILE_NAME: &str = "disk";
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read/write request the kernel sends (its default page limit allows 1 MiB).
const MAX_IO: u32 = 1 << 20;

/// How many times the file is open through the mount (a loop device counts as one).
#[derive(Default)]
pub(crate) struct OpenCount {
    n: Mutex<usize>,
    changed: Condvar,
}

impl OpenCount {
    fn add(&self, delta: isize) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_add_signed(delta);
        drop(n);
        self.changed.notify_all();
    }

    /// Waits until the count is at most `max`, up to `deadline`; returns the last count.
    pub(crate) fn wait_at_most(&self, max: usize, deadline: Instant) -> usize {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        while *n > max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = self
                .changed
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n
    }
}

pub(crate) struct DiskFs {
    disk: Disk,
    opens: Arc<OpenCount>,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
}

impl DiskFs {
    pub(crate) fn new(disk: Disk, opens: Arc<OpenCount>) -> Self {
        Self {
            disk,
            opens,
            mounted_at: SystemTime::now(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o700, 2, 0),
            FILE_INO => (FileType::RegularFile, 0o600, 1, self.disk.size()),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno(e: &io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) if code > 0 => Errno::from_i32(code),
        _ => Errno::EIO,
    }
}

impl fuser::Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // Asynchronous direct I/O lets a loop device in direct-I/O mode keep several
        // requests in flight, which the worker threads then serve in parallel.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.to_str()) {
            (INodeNo::ROOT, Some(FILE_NAME)) => match self.attr(FILE_INO) {
                Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The size is the data segment's and ownership and mode are fixed; timestamps are
        // accepted and ignored (touch works, nothing is stored).
        let resize = size.is_some_and(|s| s != attr.size);
        let chown = uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        let chmod = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        if resize || chown || chmod {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        self.opens.add(1);
        // Direct I/O: the plaintext is not cached a second time in this file's page cache
        // (a filesystem on the loop device has its own), and writes to the file reach the
        // data path with their exact offsets; parallel direct writes are not serialized by
        // the kernel's inode lock (the range lock orders what must be ordered).
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        self.disk.read(offset, u64::from(size), |res| match res {
            Ok(plain) => reply.data(plain),
            Err(e) => {
                tracing::warn!(device = %self.disk.device.display(), offset, size, error = %e,
                    "userspace read failed");
                reply.error(errno(&e))
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        match self.disk.write(offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                if e.raw_os_error() != Some(nix::libc::ENOSPC) {
                    tracing::warn!(device = %self.disk.device.display(), offset,
                        len = data.len(), error = %e, "userspace write failed");
                }
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.disk.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == FILE_INO {
            self.opens.add(-1);
        }
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.disk.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // No discard or preallocation on an encrypted segment.
        reply.error(Errno::EOPNOTSUPP)
    }
}
