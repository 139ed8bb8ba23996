//! Key types. Each holds its bytes in zeroizing memory and has no `Debug`, `Display`,
//! `Clone` or `Serialize`: a key can be used, not printed, copied or stored by accident.

use zeroize::Zeroizing;

/// Length of a keyslot key and of a LUKS2 volume key for aes-xts-plain64 with AES-256.
pub const KEY_LEN: usize = 64;

/// The broker-held key of one volume version: the LUKS2 *keyslot* key (passphrase),
/// handed to libcryptsetup from memory only.
pub struct SlotKey(Zeroizing<[u8; KEY_LEN]>);

impl SlotKey {
    /// Takes the key out of `bytes` (which is wiped whatever the outcome).
    /// Fails unless exactly [`KEY_LEN`] bytes are given.
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Self, KeyLengthError> {
        let bytes_z = Zeroizing::new(std::mem::take(&mut bytes));
        if bytes_z.len() != KEY_LEN {
            return Err(KeyLengthError(bytes_z.len()));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&bytes_z);
        Ok(Self(key))
    }

    /// The key bytes, for the one call that needs them.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// The LUKS2 *volume* (master) key, as read from a header with a keyslot key; needed only
/// by the userspace data path.
pub struct MasterKey(Zeroizing<Vec<u8>>);

impl MasterKey {
    /// Wraps bytes already in zeroizing memory.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    /// The key bytes, for the one call that needs them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// A key of the wrong length was offered.
#[derive(Debug, thiserror::Error)]
#[error("a volume key must be {KEY_LEN} bytes, got {0}")]
pub struct KeyLengthError(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_64_byte_keys_are_accepted() {
        assert!(SlotKey::from_vec(vec![1; 63]).is_err());
        assert!(SlotKey::from_vec(vec![1; 65]).is_err());
        let k = SlotKey::from_vec(vec![7; 64]).unwrap();
        assert_eq!(k.expose()[63], 7);
    }
}
