//! AES-256-XTS engine, byte-compatible with dm-crypt's `aes-xts-plain64` as cryptsetup
//! activates it for LUKS2.
//!
//! Each encryption sector (512 or 4096 bytes) is one XTS data unit. Its tweak is the
//! sector's byte offset from the start of the LUKS2 data segment divided by **512**
//! (cryptsetup does not set `iv_large_sectors` for LUKS2), as a 128-bit little-endian
//! number: a 4096-byte sector `k` has tweak `8·k`.
//!
//! The API is safe and backend-agnostic: [`Engine::new`] picks the fastest backend the
//! CPU supports; [`Engine::with_backend`] forces one (tests, benchmarks).

#![deny(unsafe_code)]

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::Xts128;
use zeroize::Zeroizing;

/// Length of an XTS-AES-256 key: two AES-256 keys (data key, tweak key).
pub const KEY_LEN: usize = 64;

/// The unit of the tweak: dm-crypt's `plain64` IV counts 512-byte sectors.
pub const TWEAK_UNIT: u64 = 512;

/// A backend of the engine. Every backend produces identical bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// RustCrypto `aes` + `xts-mode`: the reference, and the fallback on any CPU.
    Portable,
}

impl Backend {
    /// Every backend, fastest last.
    pub const ALL: [Backend; 1] = [Backend::Portable];

    /// Whether this CPU can run the backend.
    pub fn is_supported(self) -> bool {
        match self {
            Backend::Portable => true,
        }
    }

    /// The fastest backend this CPU supports.
    pub fn best() -> Backend {
        Backend::ALL
            .iter()
            .rev()
            .copied()
            .find(|b| b.is_supported())
            .unwrap_or(Backend::Portable)
    }

    /// A short lowercase name (`portable`, …).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
        }
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
    #[error("the {0:?} backend is not supported by this CPU")]
    Unsupported(Backend),
}

/// An XTS-AES-256 engine bound to one key and one sector size. `Send + Sync`: one engine
/// serves concurrent requests. No `Debug`, no `Clone`: the key schedule stays put and is
/// wiped on drop.
pub struct Engine {
    backend: Backend,
    sector_size: usize,
    portable: Xts128<Aes256>,
    _key: Zeroizing<[u8; KEY_LEN]>,
}

impl Engine {
    /// An engine on the fastest backend this CPU supports.
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
        let c1 = Aes256::new_from_slice(&k[..32]).map_err(|_| Error::KeyLength(key.len()))?;
        let c2 = Aes256::new_from_slice(&k[32..]).map_err(|_| Error::KeyLength(key.len()))?;
        Ok(Self {
            backend,
            sector_size,
            portable: Xts128::new(c1, c2),
            _key: k,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The encryption sector size in bytes.
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// Encrypts `buf` in place. `offset` is the byte offset of `buf[0]` from the start of
    /// the data segment; both it and `buf.len()` must be multiples of the sector size.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(buf, offset)?;
        for (i, sector) in buf.chunks_exact_mut(self.sector_size).enumerate() {
            let tweak = self.tweak(offset, i);
            self.portable
                .encrypt_sector(sector, xts_mode::get_tweak_default(tweak));
        }
        Ok(())
    }

    /// Decrypts `buf` in place; same rules as [`Engine::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(buf, offset)?;
        for (i, sector) in buf.chunks_exact_mut(self.sector_size).enumerate() {
            let tweak = self.tweak(offset, i);
            self.portable
                .decrypt_sector(sector, xts_mode::get_tweak_default(tweak));
        }
        Ok(())
    }

    fn tweak(&self, offset: u64, index: usize) -> u128 {
        (offset / TWEAK_UNIT) as u128 + (index * (self.sector_size / TWEAK_UNIT as usize)) as u128
    }

    fn check(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        if buf.len() % self.sector_size != 0 {
            return Err(Error::PartialSector {
                len: buf.len(),
                sector_size: self.sector_size,
            });
        }
        if offset % self.sector_size as u64 != 0 {
            return Err(Error::Misaligned {
                offset,
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }
}
