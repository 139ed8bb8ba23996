//! The data path: plaintext reads and writes at any offset and length, turned into
//! whole-sector positional I/O on the encrypted data segment of the device.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::lock::RangeLock;
use super::{Cipher, Geometry};

thread_local! {
    /// One reusable buffer per FUSE worker thread: no allocation (and no page faults on
    /// fresh memory) per request.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The decrypted view of one LUKS2 data segment.
pub(crate) struct Disk {
    pub(crate) device: PathBuf,
    dev: File,
    geometry: Geometry,
    cipher: Cipher,
    locks: RangeLock,
}

impl Disk {
    pub(crate) fn new(device: PathBuf, dev: File, geometry: Geometry, cipher: Cipher) -> Self {
        Self {
            device,
            dev,
            geometry,
            cipher,
            locks: RangeLock::default(),
        }
    }

    /// Size of the plaintext in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.geometry.data_size
    }

    fn sector(&self) -> u64 {
        u64::from(self.geometry.sector_size)
    }

    /// Sector-aligned `[start, end)` covering `[offset, offset + len)`.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let ss = self.sector();
        let start = offset / ss * ss;
        let end = (offset + len).div_ceil(ss) * ss;
        (start, end)
    }

    /// Reads up to `len` plaintext bytes at `offset` (fewer at the end of the segment) and
    /// hands them, or the error, to `f`. The plaintext is wiped from the buffer afterwards.
    pub(crate) fn read<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(io::Result<&[u8]>) -> R,
    ) -> R {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return f(Ok(&[]));
        }
        let (start, end) = self.span(offset, len);
        BUF.with_borrow_mut(|buf| {
            let n = (end - start) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = &mut buf[..n];
            let res = {
                let _g = self.locks.lock(start, end, false);
                self.dev
                    .read_exact_at(chunk, self.geometry.data_offset + start)
            };
            let res = res.and_then(|()| self.cipher.decrypt(chunk, start));
            let skip = (offset - start) as usize;
            let r = f(res.map(|()| &chunk[skip..skip + len as usize]));
            chunk.fill(0);
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
            r
        })
    }

    /// Writes `data` at `offset`; returns how many bytes fit before the end of the
    /// segment. Partial sectors at either end are read, decrypted and merged under an
    /// exclusive lock on their range, so concurrent writes to one sector all land.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        let len = (data.len() as u64).min(self.size().saturating_sub(offset));
        if len == 0 {
            return if data.is_empty() {
                Ok(0)
            } else {
                Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
            };
        }
        let data = &data[..len as usize];
        let (start, end) = self.span(offset, len);
        let ss = self.sector();
        let pos = self.geometry.data_offset + start;
        BUF.with_borrow_mut(|buf| {
            let n = (end - start) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = &mut buf[..n];
            let skip = (offset - start) as usize;
            if offset == start && (offset + len) == end {
                // Whole sectors: encrypt outside the lock, hold it only for the write.
                chunk.copy_from_slice(data);
                self.cipher.encrypt(chunk, start)?;
                let _g = self.locks.lock(start, end, true);
                self.dev.write_all_at(chunk, pos)?;
                return Ok(len as usize);
            }
            let _g = self.locks.lock(start, end, true);
            let head = (offset != start).then_some(0);
            let last = n - ss as usize;
            let tail = (!(offset + len).is_multiple_of(ss) && head != Some(last)).then_some(last);
            for at in [head, tail].into_iter().flatten() {
                let sector = &mut chunk[at..at + ss as usize];
                self.dev.read_exact_at(sector, pos + at as u64)?;
                self.cipher.decrypt(sector, start + at as u64)?;
            }
            chunk[skip..skip + len as usize].copy_from_slice(data);
            self.cipher.encrypt(chunk, start)?;
            self.dev.write_all_at(chunk, pos)?;
            Ok(len as usize)
        })
    }

    /// Makes every completed write durable on the device.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.dev.sync_data()
    }
}

impl Cipher {
    fn encrypt(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Cipher::Xts(engine) => engine.encrypt(buf, offset).map_err(io::Error::other),
            #[cfg(feature = "passthrough")]
            Cipher::Passthrough => Ok(()),
        }
    }

    fn decrypt(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Cipher::Xts(engine) => engine.decrypt(buf, offset).map_err(io::Error::other),
            #[cfg(feature = "passthrough")]
            Cipher::Passthrough => Ok(()),
        }
    }
}
