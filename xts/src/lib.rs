//! AES-256-XTS engine, byte-compatible with dm-crypt's `aes-xts-plain64` as cryptsetup
//! activates it for LUKS2.
//!
//! Each encryption sector (512 or 4096 bytes) is one XTS data unit. Its tweak is the
//! sector's byte offset from the start of the LUKS2 data segment divided by **512**
//! (cryptsetup does not set `iv_large_sectors` for LUKS2), as a 128-bit little-endian
//! number: a 4096-byte sector `k` has tweak `8·k`.
//!
//! The API is safe and backend-agnostic: [`Engine::new`] picks a backend for the CPU by
//! the rule of [`Backend::selection`]; [`Engine::with_backend`] forces one (tests,
//! benchmarks). Backends:
//!
//! - [`Backend::Portable`]: RustCrypto `aes` + `xts-mode`, any CPU (the reference);
//! - [`Backend::AesNi`]: AES-NI + PCLMULQDQ on 128-bit registers, 8 blocks in flight;
//! - [`Backend::Vaes`]: VAES + VPCLMULQDQ on 256-bit registers (AVX2), 16 blocks in flight;
//! - [`Backend::Vaes512`]: VAES + VPCLMULQDQ on 512-bit registers (AVX-512), 32 blocks.
//!
//! `unsafe` lives only in the three x86-64 backend modules.

#![deny(unsafe_code)]

use std::sync::Mutex;

use zeroize::Zeroizing;

mod bench;
mod direction;
mod portable;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod aesni;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vaes;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vaes512;

mod select;
#[cfg(test)]
mod tests;

pub use bench::{bench, BenchResult, BENCH_BUFFER};
pub use direction::Direction;
pub use select::Selection;

/// Length of an XTS-AES-256 key: two AES-256 keys (data key, tweak key).
pub const KEY_LEN: usize = 64;

/// The unit of the tweak: dm-crypt's `plain64` IV counts 512-byte sectors.
pub const TWEAK_UNIT: u64 = 512;

/// Requests at least this large are split across the engine's threads (when it has more
/// than one, see [`Engine::with_threads`]); smaller ones run on the calling thread.
///
/// Measured with `examples/threshold.rs` (fastest of 100-400 runs per point, 4096-byte
/// sectors) on the 2-core AMD EPYC (Zen 4) build machine: spawning and joining a scoped
/// thread costs 16.7 µs; one core encrypts 12.9 GB/s (VAES) or 6.4 GB/s (AES-NI). On an
/// idle core, splitting `n` bytes in two saves `n / 2R` for those 16.7 µs: break-even at
/// ~430 KB (VAES), 1.65x at 2 MiB. But that machine was shared (load 4-6), like the
/// hosts this runs on, which are busy with VMs; there the second core is often not free
/// at once, and two threads measured 0.77-1.00x at 1 MiB, 1.06-1.40x at 2 MiB, 1.3-1.6x
/// at 4 MiB and up to 1.98x at 64 MiB. 2 MiB is the smallest size that won in every run.
pub const PARALLEL_MIN_BYTES: usize = 2 * 1024 * 1024;

/// A backend of the engine. Every backend produces identical bytes. Ordered by register
/// width, like [`Backend::ALL`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// RustCrypto `aes` + `xts-mode`: the reference, and the fallback on any CPU.
    Portable,
    /// AES-NI and PCLMULQDQ (x86-64): 8 blocks interleaved, tweaks computed ahead.
    AesNi,
    /// VAES and VPCLMULQDQ on 256-bit registers with AVX2 (x86-64): 16 blocks interleaved.
    Vaes,
    /// VAES and VPCLMULQDQ on 512-bit registers with AVX-512 F/BW/VL (x86-64): 32 blocks
    /// interleaved.
    Vaes512,
}

impl Backend {
    /// Every backend, narrowest registers first.
    pub const ALL: [Backend; 4] = [
        Backend::Portable,
        Backend::AesNi,
        Backend::Vaes,
        Backend::Vaes512,
    ];

    /// Whether this CPU can run the backend.
    pub fn is_supported(self) -> bool {
        #[cfg(test)]
        if tests::hidden(self) {
            return false;
        }
        match self {
            Backend::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => aesni::supported(),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes => vaes::supported(),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes512 => vaes512::supported(),
            #[cfg(not(target_arch = "x86_64"))]
            Backend::AesNi | Backend::Vaes | Backend::Vaes512 => false,
        }
    }

    /// The backend [`Engine::new`] uses on this CPU: [`Backend::selection`]'s choice.
    pub fn best() -> Backend {
        Backend::selection().backend
    }

    /// The backend for this CPU and why, by the rule in [`Selection`]'s documentation.
    pub fn selection() -> Selection {
        select::select()
    }

    /// A short lowercase name (`portable`, `aesni`, `vaes`, `vaes512`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::AesNi => "aesni",
            Backend::Vaes => "vaes",
            Backend::Vaes512 => "vaes512",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What can go wrong; every variant is a caller error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The key is not 64 bytes.
    #[error("an XTS-AES-256 key must be {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    /// The sector size is not 512 or 4096.
    #[error("sector size must be 512 or 4096 bytes, got {0}")]
    SectorSize(usize),
    /// The buffer is not a whole number of sectors.
    #[error("buffer of {len} bytes is not a whole number of {sector_size}-byte sectors")]
    PartialSector {
        /// Buffer length.
        len: usize,
        /// Sector size.
        sector_size: usize,
    },
    /// The offset is not at a sector boundary.
    #[error("offset {offset} is not a multiple of the {sector_size}-byte sector size")]
    Misaligned {
        /// Byte offset in the data segment.
        offset: u64,
        /// Sector size.
        sector_size: usize,
    },
    /// The CPU lacks the instructions the backend needs.
    #[error("the {0} backend is not supported by this CPU")]
    Unsupported(Backend),
}

/// The key schedules of one backend, boxed (about 1 KiB each). Each variant wipes its
/// schedules on drop.
enum Inner {
    Portable(Box<portable::Cipher>),
    #[cfg(target_arch = "x86_64")]
    AesNi(Box<aesni::Cipher>),
    #[cfg(target_arch = "x86_64")]
    Vaes(Box<vaes::Cipher>),
    #[cfg(target_arch = "x86_64")]
    Vaes512(Box<vaes512::Cipher>),
}

impl Inner {
    fn new(key: &[u8; KEY_LEN], backend: Backend) -> Result<Self, Error> {
        let unsupported = || Error::Unsupported(backend);
        Ok(match backend {
            Backend::Portable => Inner::Portable(Box::new(portable::Cipher::new(key))),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => {
                Inner::AesNi(Box::new(aesni::Cipher::new(key).ok_or_else(unsupported)?))
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes => Inner::Vaes(Box::new(vaes::Cipher::new(key).ok_or_else(unsupported)?)),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes512 => {
                Inner::Vaes512(Box::new(vaes512::Cipher::new(key).ok_or_else(unsupported)?))
            }
            #[cfg(not(target_arch = "x86_64"))]
            Backend::AesNi | Backend::Vaes | Backend::Vaes512 => return Err(unsupported()),
        })
    }

    /// Runs whole sectors of `buf` (length already checked) through the cipher; sector
    /// `i` gets tweak `first_tweak + i * step`.
    fn process(&self, dir: Direction, buf: &mut [u8], sector_size: usize, first_tweak: u128) {
        let step = (sector_size as u64 / TWEAK_UNIT) as u128;
        let decrypt = dir == Direction::Decrypt;
        match self {
            Inner::Portable(c) => c.process(decrypt, buf, sector_size, first_tweak, step),
            #[cfg(target_arch = "x86_64")]
            Inner::AesNi(c) => c.process(decrypt, buf, sector_size, first_tweak, step),
            #[cfg(target_arch = "x86_64")]
            Inner::Vaes(c) => c.process(decrypt, buf, sector_size, first_tweak, step),
            #[cfg(target_arch = "x86_64")]
            Inner::Vaes512(c) => c.process(decrypt, buf, sector_size, first_tweak, step),
        }
    }
}

/// An XTS-AES-256 engine bound to one key and one sector size. `Send + Sync`: one engine
/// serves concurrent requests. No `Debug`, no `Clone`: the key schedules stay put and are
/// wiped on drop; the raw key is not kept.
pub struct Engine {
    backend: Backend,
    sector_size: usize,
    threads: usize,
    parallel_min: usize,
    inner: Inner,
}

impl Engine {
    /// An engine on the backend [`Backend::best`] picks for this CPU, running on the
    /// calling thread.
    pub fn new(key: &[u8], sector_size: usize) -> Result<Self, Error> {
        Self::with_backend(key, sector_size, Backend::best())
    }

    /// An engine on a chosen backend; [`Error::Unsupported`] if the CPU lacks it.
    pub fn with_backend(key: &[u8], sector_size: usize, backend: Backend) -> Result<Self, Error> {
        if key.len() != KEY_LEN {
            return Err(Error::KeyLength(key.len()));
        }
        if sector_size != 512 && sector_size != 4096 {
            return Err(Error::SectorSize(sector_size));
        }
        if !backend.is_supported() {
            return Err(Error::Unsupported(backend));
        }
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(key);
        Ok(Self {
            backend,
            sector_size,
            threads: 1,
            parallel_min: PARALLEL_MIN_BYTES,
            inner: Inner::new(&k, backend)?,
        })
    }

    /// Lets each request of at least [`PARALLEL_MIN_BYTES`] (see
    /// [`Engine::with_parallel_min`]) use up to `threads` threads
    /// (scoped: they are joined before the call returns). `0` means 1. The default is 1:
    /// the userspace data path already calls the engine from several threads.
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Sets the request size from which [`Engine::with_threads`] splits requests
    /// (default [`PARALLEL_MIN_BYTES`]; for measuring it, see `examples/threshold.rs`).
    #[must_use]
    pub fn with_parallel_min(mut self, bytes: usize) -> Self {
        self.parallel_min = bytes;
        self
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The encryption sector size in bytes.
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// The most threads one request may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Encrypts `buf` in place. `offset` is the byte offset of `buf[0]` from the start of
    /// the data segment; both it and `buf.len()` must be multiples of the sector size.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.run(Direction::Encrypt, buf, offset)
    }

    /// Decrypts `buf` in place; same rules as [`Engine::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.run(Direction::Decrypt, buf, offset)
    }

    fn run(&self, dir: Direction, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(buf, offset)?;
        let ss = self.sector_size;
        let sectors = buf.len() / ss;
        let threads = if buf.len() >= self.parallel_min {
            self.threads.min(sectors)
        } else {
            1
        };
        let first_tweak = (offset / TWEAK_UNIT) as u128;
        if threads <= 1 {
            self.inner.process(dir, buf, ss, first_tweak);
            return Ok(());
        }
        // Whole sectors per thread, the remainder spread over the first shares. Each share
        // sits in a mutex so that, should the OS refuse a thread, this thread takes it over.
        let per = sectors / threads;
        let extra = sectors % threads;
        let step = (ss as u64 / TWEAK_UNIT) as u128;
        let mut shares = Vec::with_capacity(threads);
        let mut rest = buf;
        let mut tweak = first_tweak;
        for t in 0..threads {
            let n = per + usize::from(t < extra);
            let (share, tail) = rest.split_at_mut(n * ss);
            rest = tail;
            shares.push(Mutex::new(Some((share, tweak))));
            tweak += n as u128 * step;
        }
        let work = |share: &Mutex<Option<(&mut [u8], u128)>>| {
            let taken = share.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((chunk, tweak)) = taken {
                self.inner.process(dir, chunk, ss, tweak);
            }
        };
        std::thread::scope(|scope| {
            let Some((last, others)) = shares.split_last() else {
                return;
            };
            for share in others {
                if std::thread::Builder::new()
                    .spawn_scoped(scope, move || work(share))
                    .is_err()
                {
                    work(share);
                }
            }
            work(last);
        });
        Ok(())
    }

    fn check(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        if !buf.len().is_multiple_of(self.sector_size) {
            return Err(Error::PartialSector {
                len: buf.len(),
                sector_size: self.sector_size,
            });
        }
        if !offset.is_multiple_of(self.sector_size as u64) {
            return Err(Error::Misaligned {
                offset,
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }
}
