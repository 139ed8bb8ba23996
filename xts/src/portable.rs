//! The portable backend: RustCrypto `aes` (which uses AES-NI itself where it can, one or
//! a few blocks at a time) driven by `xts-mode`, one sector at a time. It is the reference
//! the fast backends are checked against, and the fallback on any CPU.

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use crate::KEY_LEN;

/// Both AES-256 key schedules (the `aes` crate's `zeroize` feature wipes them on drop).
pub(crate) struct Cipher {
    xts: Xts128<Aes256>,
}

impl Cipher {
    /// Expands the data key (`key[..32]`) and the tweak key (`key[32..]`).
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        let (k1, k2) = key.split_at(KEY_LEN / 2);
        let c1 = Aes256::new(k1.try_into().expect("32-byte half of a 64-byte key"));
        let c2 = Aes256::new(k2.try_into().expect("32-byte half of a 64-byte key"));
        Self {
            xts: Xts128::new(c1, c2),
        }
    }

    /// Encrypts or decrypts whole sectors in place; sector `i` of `buf` has tweak
    /// `first_tweak + i * step`.
    pub(crate) fn process(
        &self,
        decrypt: bool,
        buf: &mut [u8],
        sector_size: usize,
        first_tweak: u128,
        step: u128,
    ) {
        let mut tweak = first_tweak;
        for sector in buf.chunks_exact_mut(sector_size) {
            if decrypt {
                self.xts.decrypt_sector(sector, get_tweak_default(tweak));
            } else {
                self.xts.encrypt_sector(sector, get_tweak_default(tweak));
            }
            tweak += step;
        }
    }
}
