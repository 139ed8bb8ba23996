//! The KEK envelope: every volume key is stored only as AES-256-GCM ciphertext under the
//! broker's key-encryption key, with a random 96-bit nonce and
//! AAD = `nodecrypt/v1|<volume_id>|<version>`, so a wrapped key moved to another record
//! (or version) fails to unwrap.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a volume key in bytes (a LUKS2 keyslot key for aes-xts-plain64).
pub const VOLUME_KEY_LEN: usize = 64;
/// Length of the AES-GCM tag that follows a wrapped key's ciphertext.
const TAG_LEN: usize = 16;
/// The KEK file name inside the state directory.
pub const KEK_FILE: &str = "kek";

/// A volume key in memory: zeroized on drop; no Debug, Display, Clone or Serialize.
pub struct VolumeKey(Zeroizing<[u8; VOLUME_KEY_LEN]>);

impl VolumeKey {
    /// 64 fresh bytes from the OS CSPRNG.
    pub fn generate() -> Result<Self, WrapError> {
        let mut k = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        getrandom::fill(&mut k[..]).map_err(|e| WrapError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    /// The key bytes, for the one call that needs them.
    pub fn expose(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.0
    }
}

/// A wrapped (encrypted) volume key as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrappedKey {
    /// Id of the KEK that wrapped it.
    pub kek_id: String,
    /// 12-byte GCM nonce, hex.
    pub nonce: String,
    /// Ciphertext and tag, hex.
    pub ciphertext: String,
}

/// Wrapping and KEK errors.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// The OS CSPRNG failed.
    #[error("the OS random generator failed: {0}")]
    Random(String),
    /// The KEK file problem.
    #[error("KEK file {path}: {what}")]
    KekFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Authentication failed: the ciphertext, nonce or AAD was altered, or the KEK is wrong.
    #[error("stored key of volume {volume_id} version {version} failed authentication: the record was altered or the KEK is not the one that wrapped it")]
    Unwrap {
        /// The volume.
        volume_id: String,
        /// The version.
        version: u64,
    },
    /// The record was wrapped by another KEK than the loaded one.
    #[error("stored key of volume {volume_id} version {version} is wrapped by KEK {found}, but this broker holds KEK {loaded}")]
    WrongKek {
        /// The volume.
        volume_id: String,
        /// The version.
        version: u64,
        /// The record's KEK id.
        found: String,
        /// The loaded KEK id.
        loaded: String,
    },
}

/// Length of the KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;

/// The KEK's 32 bytes, on their way from the CSPRNG or a seal into a [`Kek`] (or from a
/// KEK file into a seal): zeroized on drop; no Debug, Display, Clone or Serialize.
pub struct KekSecret(Zeroizing<[u8; KEK_LEN]>);

impl KekSecret {
    /// 32 fresh bytes from the OS CSPRNG.
    pub fn generate() -> Result<Self, WrapError> {
        let mut k = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::fill(&mut k[..]).map_err(|e| WrapError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    /// Takes the bytes a seal unsealed; `None` unless exactly [`KEK_LEN`] bytes. The
    /// caller's buffer stays the caller's to zeroize (hand it in as `Zeroizing`).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut k = Zeroizing::new([0u8; KEK_LEN]);
        if bytes.len() != KEK_LEN {
            return None;
        }
        k.copy_from_slice(bytes);
        Some(Self(k))
    }

    /// The bytes, for the one call that seals them.
    pub fn expose(&self) -> &[u8; KEK_LEN] {
        &self.0
    }

    /// The id the [`Kek`] made of these bytes has (a hash, safe to store and log).
    pub fn id(&self) -> String {
        kek_id(&self.0)
    }
}

fn kek_id(bytes: &[u8; KEK_LEN]) -> String {
    let digest = Sha256::new_with_prefix(b"nodecrypt kek id v1\0")
        .chain_update(bytes)
        .finalize();
    format!("kek-{}", hex::encode(&digest[..8]))
}

/// The broker's key-encryption key (256 bits) and its id. The AES key schedule is
/// zeroized on drop (`aes` with its `zeroize` feature); the process locks its memory
/// (`process::harden`), so no page of it reaches swap.
pub struct Kek {
    cipher: Aes256Gcm,
    id: String,
}

fn aad(volume_id: &str, version: u64) -> Vec<u8> {
    format!("nodecrypt/v1|{volume_id}|{version}").into_bytes()
}

impl Kek {
    fn from_bytes(bytes: &[u8; KEK_LEN]) -> Self {
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
            id: kek_id(bytes),
        }
    }

    /// The KEK made of `secret` (which is dropped, and so zeroized, here).
    pub fn from_secret(secret: KekSecret) -> Self {
        Self::from_bytes(&secret.0)
    }

    /// The id of this KEK: a hash of it, safe to store and log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Creates a new KEK file (mode 0600) in `state_dir` (created 0700). Refuses to
    /// overwrite an existing one.
    pub fn create(state_dir: &Path) -> Result<Self, WrapError> {
        let key = KekSecret::generate()?;
        Self::write_new(state_dir, &key)?;
        Ok(Self::from_secret(key))
    }

    /// Writes `key` as a new KEK file (mode 0600) in `state_dir` (created 0700). Refuses
    /// to overwrite an existing one.
    pub fn write_new(state_dir: &Path, key: &KekSecret) -> Result<(), WrapError> {
        let err = |path: &Path, what: String| WrapError::KekFile {
            path: path.to_path_buf(),
            what,
        };
        fs::create_dir_all(state_dir).map_err(|e| err(state_dir, e.to_string()))?;
        fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| err(state_dir, e.to_string()))?;
        let path = state_dir.join(KEK_FILE);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => err(
                    &path,
                    "already exists; refusing to overwrite it (every key it wraps would be lost)"
                        .into(),
                ),
                _ => err(&path, e.to_string()),
            })?;
        f.write_all(&key.expose()[..])
            .and_then(|_| f.sync_all())
            .map_err(|e| err(&path, e.to_string()))
    }

    /// Loads the KEK file of `state_dir`; it must be exactly 32 bytes and not readable by
    /// group or others.
    pub fn load(state_dir: &Path) -> Result<Self, WrapError> {
        Ok(Self::from_secret(Self::read_file(
            &state_dir.join(KEK_FILE),
        )?))
    }

    /// The bytes of the KEK file `path`, checked as [`Kek::load`] checks them: for sealing
    /// a file KEK into another seal (`init --seal pkcs11 --import-kek FILE`).
    pub fn read_file(path: &Path) -> Result<KekSecret, WrapError> {
        let state_dir = path.parent().unwrap_or(Path::new("."));
        let path = path.to_path_buf();
        let err = |what: String| WrapError::KekFile {
            path: path.clone(),
            what,
        };
        let meta = fs::metadata(&path).map_err(|e| {
            err(format!(
                "{e}; create one with `nodecrypt-keybroker init --state-dir {}`",
                state_dir.display()
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets others read it; chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(33));
        fs::File::open(&path)
            .and_then(|f| f.take(33).read_to_end(&mut buf))
            .map_err(|e| err(e.to_string()))?;
        let key: &[u8; KEK_LEN] = buf
            .as_slice()
            .try_into()
            .map_err(|_| err(format!("is {} bytes; a KEK is exactly 32", buf.len())))?;
        let mut k = Zeroizing::new([0u8; KEK_LEN]);
        k.copy_from_slice(key);
        Ok(KekSecret(k))
    }

    /// Wraps `key` for (`volume_id`, `version`).
    pub fn wrap(
        &self,
        volume_id: &str,
        version: u64,
        key: &VolumeKey,
    ) -> Result<WrappedKey, WrapError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| WrapError::Random(e.to_string()))?;
        let aad = aad(volume_id, version);
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: key.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| WrapError::Random("AES-GCM encryption failed".into()))?;
        Ok(WrappedKey {
            kek_id: self.id.clone(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
        })
    }

    /// Unwraps the key of (`volume_id`, `version`); any alteration fails authentication.
    pub fn unwrap(
        &self,
        volume_id: &str,
        version: u64,
        w: &WrappedKey,
    ) -> Result<VolumeKey, WrapError> {
        if w.kek_id != self.id {
            return Err(WrapError::WrongKek {
                volume_id: volume_id.into(),
                version,
                found: w.kek_id.clone(),
                loaded: self.id.clone(),
            });
        }
        let bad = || WrapError::Unwrap {
            volume_id: volume_id.into(),
            version,
        };
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(&w.nonce, &mut nonce).map_err(|_| bad())?;
        // Ciphertext and tag: decrypted in place into the zeroizing key, no heap copy.
        let mut k = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        let mut tag = [0u8; TAG_LEN];
        let ct = w.ciphertext.as_bytes();
        if ct.len() != 2 * (VOLUME_KEY_LEN + TAG_LEN) {
            return Err(bad());
        }
        let (ct_key, ct_tag) = ct.split_at(2 * VOLUME_KEY_LEN);
        hex::decode_to_slice(ct_key, &mut k[..]).map_err(|_| bad())?;
        hex::decode_to_slice(ct_tag, &mut tag).map_err(|_| bad())?;
        self.cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                &aad(volume_id, version),
                (&mut k[..]).into(),
                &Tag::from(tag),
            )
            .map_err(|_| bad())?;
        Ok(VolumeKey(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(dir.path()).unwrap();
        assert!(Kek::create(dir.path()).is_err(), "never overwrites a KEK");
        let again = Kek::load(dir.path()).unwrap();
        assert_eq!(kek.id(), again.id());

        let key = VolumeKey::generate().unwrap();
        let w = kek.wrap("vol-a", 1, &key).unwrap();
        // assert! rather than assert_eq!: a failure must not print the key.
        assert!(again.unwrap("vol-a", 1, &w).unwrap().expose() == key.expose());
        // Moved to another volume or version: refused.
        assert!(kek.unwrap("vol-b", 1, &w).is_err());
        assert!(kek.unwrap("vol-a", 2, &w).is_err());
        // One flipped bit anywhere in the ciphertext: refused.
        let mut ct = hex::decode(&w.ciphertext).unwrap();
        ct[10] ^= 1;
        let t = WrappedKey {
            ciphertext: hex::encode(ct),
            ..w.clone()
        };
        assert!(matches!(
            kek.unwrap("vol-a", 1, &t),
            Err(WrapError::Unwrap { .. })
        ));
        // A flipped bit in the tag, a truncated or non-hex ciphertext, a bad nonce: refused.
        let mut ct = hex::decode(&w.ciphertext).unwrap();
        ct[VOLUME_KEY_LEN + 3] ^= 0x80;
        for t in [
            WrappedKey {
                ciphertext: hex::encode(ct),
                ..w.clone()
            },
            WrappedKey {
                ciphertext: w.ciphertext[..w.ciphertext.len() - 2].into(),
                ..w.clone()
            },
            WrappedKey {
                ciphertext: w.ciphertext.replacen(&w.ciphertext[..1], "g", 1),
                ..w.clone()
            },
            WrappedKey {
                nonce: "00".into(),
                ..w.clone()
            },
        ] {
            assert!(matches!(
                kek.unwrap("vol-a", 1, &t),
                Err(WrapError::Unwrap { .. })
            ));
        }
        // Another KEK: refused by id.
        let other = Kek::create(&dir.path().join("other")).unwrap();
        assert!(matches!(
            other.unwrap("vol-a", 1, &w),
            Err(WrapError::WrongKek { .. })
        ));
    }

    #[test]
    fn loose_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        Kek::create(dir.path()).unwrap();
        fs::set_permissions(dir.path().join(KEK_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Kek::load(dir.path()).is_err());
    }
}
