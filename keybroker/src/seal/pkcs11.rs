//! The PKCS#11 seal: an AES-256 key inside an HSM (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE
//! true, CKA_EXTRACTABLE false; encrypt/decrypt only) encrypts the 32-byte KEK with
//! CKM_AES_GCM (96-bit IV from the broker's CSPRNG, AAD naming the KEK id, 128-bit tag),
//! inside the HSM. The result, a [`SealedKek`], is all that is stored.
//!
//! Every operation opens the module, finds the token by label, logs in with the PIN read
//! from `pin_file` at that moment, does its work and finalizes the module: the broker
//! keeps no session open, and the HSM is used at start only.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Seal, SealError, SealedKek};
use crate::config::Pkcs11Config;
use crate::wrap::{Kek, KekSecret, KEK_LEN};

/// GCM IV length (NIST SP 800-38D's recommended 96 bits).
const IV_LEN: usize = 12;
/// GCM tag length in bytes.
const TAG_LEN: usize = 16;
/// The longest PIN file read (PKCS#11 PINs are short).
const MAX_PIN_LEN: u64 = 256;

/// The AAD of a sealed KEK: the format and the KEK's id, so a sealed KEK's id cannot be
/// swapped for another's.
fn aad(kek_id: &str) -> Vec<u8> {
    format!("nodecrypt/sealed-kek/v1|{kek_id}").into_bytes()
}

/// The stored form (JSON): every field is public (labels, id, IV, ciphertext).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// Format version, 1.
    v: u32,
    /// `pkcs11`.
    seal: String,
    /// `CKM_AES_GCM`.
    mechanism: String,
    /// Token and key that sealed it (for messages).
    token_label: String,
    key_label: String,
    /// The KEK's id ([`Kek::id`]).
    kek_id: String,
    /// Hex.
    iv: String,
    /// Ciphertext and tag, hex.
    ciphertext: String,
}

/// A KEK sealed by a key in a PKCS#11 token.
pub struct Pkcs11Seal {
    cfg: Pkcs11Config,
}

/// An open, logged-in session on the configured token; finalizes the module on drop.
struct Token {
    session: Option<Session>,
    ctx: Option<Pkcs11>,
}

impl Drop for Token {
    fn drop(&mut self) {
        drop(self.session.take());
        if let Some(ctx) = self.ctx.take() {
            let _ = ctx.finalize();
        }
    }
}

impl Token {
    fn session(&self) -> &Session {
        self.session.as_ref().expect("open until dropped")
    }
}

/// Reads the PIN from `path`: a regular file, not readable or writable by group or
/// others; one line (a trailing newline is dropped).
pub fn read_pin(path: &Path) -> Result<AuthPin, SealError> {
    let err = |what: String| SealError::PinFile {
        path: path.to_path_buf(),
        what,
    };
    let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "mode {mode:o} lets others read or change it; it must be 0600 or stricter (chmod 600, or a systemd credential)"
        )));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_PIN_LEN as usize + 1));
    fs::File::open(path)
        .and_then(|f| f.take(MAX_PIN_LEN + 1).read_to_end(&mut buf))
        .map_err(|e| err(e.to_string()))?;
    if buf.len() as u64 > MAX_PIN_LEN {
        return Err(err(format!("is longer than {MAX_PIN_LEN} bytes")));
    }
    let mut end = buf.len();
    while end > 0 && matches!(buf[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let pin = std::str::from_utf8(&buf[..end]).map_err(|_| err("is not UTF-8".into()))?;
    if pin.is_empty() || pin.contains('\n') {
        return Err(err("must hold the PIN alone, on one line".into()));
    }
    // Exact capacity: `into_boxed_str` does not reallocate, so no copy is left behind.
    let mut s = String::with_capacity(pin.len());
    s.push_str(pin);
    Ok(AuthPin::new(s.into_boxed_str()))
}

impl Pkcs11Seal {
    /// The seal `cfg` describes; nothing is opened until it is used.
    pub fn new(cfg: Pkcs11Config) -> Self {
        Self { cfg }
    }

    fn ck(&self, step: &'static str) -> impl Fn(CkError) -> SealError + '_ {
        move |e| SealError::Pkcs11 {
            step,
            module: self.cfg.module.clone(),
            cause: e.to_string(),
        }
    }

    /// Opens the module, finds the token, logs in (read-write for `rw`).
    fn open(&self, rw: bool) -> Result<Token, SealError> {
        let c = &self.cfg;
        // Read (and judge) the PIN first: a loose PIN file is refused before the HSM is
        // asked anything.
        let pin = read_pin(&c.pin_file)?;
        if !c.module.is_file() {
            return Err(SealError::Module {
                module: c.module.clone(),
                cause: "no such file (is the HSM's PKCS#11 library installed?)".into(),
            });
        }
        let ctx = Pkcs11::new(&c.module).map_err(|e| SealError::Module {
            module: c.module.clone(),
            cause: e.to_string(),
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(self.ck("C_Initialize"))?;
        let mut token = Token {
            session: None,
            ctx: Some(ctx),
        };
        let ctx = token.ctx.as_ref().expect("just set");
        let mut found = Vec::new();
        let mut slot = None;
        for s in ctx
            .get_slots_with_token()
            .map_err(self.ck("C_GetSlotList"))?
        {
            let info = ctx.get_token_info(s).map_err(self.ck("C_GetTokenInfo"))?;
            let label = info.label().trim_end().to_string();
            if label == c.token_label && slot.is_none() {
                slot = Some(s);
            }
            found.push(label);
        }
        let Some(slot) = slot else {
            return Err(SealError::TokenAbsent {
                token: c.token_label.clone(),
                module: c.module.clone(),
                found,
            });
        };
        let session = if rw {
            ctx.open_rw_session(slot)
        } else {
            ctx.open_ro_session(slot)
        }
        .map_err(self.ck("C_OpenSession"))?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(rv, _)) => {
                let cause = match rv {
                    RvError::PinIncorrect => "the PIN is incorrect".to_string(),
                    RvError::PinLocked => "the PIN is locked (too many wrong tries)".to_string(),
                    rv => format!("{rv}"),
                };
                return Err(SealError::Login {
                    token: c.token_label.clone(),
                    pin_file: c.pin_file.clone(),
                    cause,
                });
            }
            Err(e) => return Err(self.ck("C_Login")(e)),
        }
        token.session = Some(session);
        Ok(token)
    }

    fn key_template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(self.cfg.key_label.as_bytes().to_vec()),
        ]
    }

    /// The wrapping key, if present; refuses one that is extractable or not sensitive,
    /// or a label shared by several keys.
    fn find_key(&self, t: &Token) -> Result<Option<ObjectHandle>, SealError> {
        let c = &self.cfg;
        let keys = t
            .session()
            .find_objects(&self.key_template())
            .map_err(self.ck("C_FindObjects"))?;
        let unfit = |what: String| SealError::KeyUnfit {
            token: c.token_label.clone(),
            key: c.key_label.clone(),
            what,
        };
        let key = match keys.as_slice() {
            [] => return Ok(None),
            [k] => *k,
            more => return Err(unfit(format!("names {} keys, not one", more.len()))),
        };
        let attrs = t
            .session()
            .get_attributes(
                key,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Token,
                ],
            )
            .map_err(self.ck("C_GetAttributeValue"))?;
        for a in attrs {
            match a {
                Attribute::Sensitive(false) => return Err(unfit("is not sensitive".into())),
                Attribute::Extractable(true) => return Err(unfit("is extractable".into())),
                Attribute::Token(false) => return Err(unfit("is a session object".into())),
                _ => {}
            }
        }
        Ok(Some(key))
    }

    fn require_key(&self, t: &Token) -> Result<ObjectHandle, SealError> {
        self.find_key(t)?.ok_or_else(|| SealError::KeyMissing {
            token: self.cfg.token_label.clone(),
            key: self.cfg.key_label.clone(),
        })
    }

    /// Creates the wrapping key on the token: AES-256, generated inside the HSM, never
    /// extractable. Refuses if a key of that label exists.
    pub fn create_key(&self) -> Result<(), SealError> {
        let t = self.open(true)?;
        if !t
            .session()
            .find_objects(&self.key_template())
            .map_err(self.ck("C_FindObjects"))?
            .is_empty()
        {
            return Err(SealError::KeyExists {
                token: self.cfg.token_label.clone(),
                key: self.cfg.key_label.clone(),
            });
        }
        let mut template = self.key_template();
        template.extend([
            Attribute::ValueLen((KEK_LEN as u64).into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ]);
        t.session()
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(self.ck("C_GenerateKey"))?;
        Ok(())
    }

    /// Whether the wrapping key exists (and is fit).
    pub fn has_key(&self) -> Result<bool, SealError> {
        let t = self.open(false)?;
        Ok(self.find_key(&t)?.is_some())
    }
}

impl Seal for Pkcs11Seal {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn describe(&self) -> String {
        format!(
            "PKCS#11 key {:?} on token {:?} (module {})",
            self.cfg.key_label,
            self.cfg.token_label,
            self.cfg.module.display()
        )
    }

    fn in_store(&self) -> bool {
        true
    }

    fn seal(&self, kek: &KekSecret) -> Result<Option<SealedKek>, SealError> {
        let t = self.open(false)?;
        let key = self.require_key(&t)?;
        let kek_id = kek.id();
        let mut iv = [0u8; IV_LEN];
        getrandom::fill(&mut iv)
            .map_err(|e| SealError::File(crate::wrap::WrapError::Random(e.to_string())))?;
        let stored_iv = hex::encode(iv);
        let aad = aad(&kek_id);
        let params =
            GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into()).map_err(self.ck("GCM"))?;
        let ct = t
            .session()
            .encrypt(&Mechanism::AesGcm(params), key, kek.expose())
            .map_err(self.ck("C_Encrypt"))?;
        let stored = Stored {
            v: 1,
            seal: "pkcs11".into(),
            mechanism: "CKM_AES_GCM".into(),
            token_label: self.cfg.token_label.clone(),
            key_label: self.cfg.key_label.clone(),
            kek_id,
            iv: stored_iv,
            ciphertext: hex::encode(ct),
        };
        let text = serde_json::to_string(&stored).map_err(|e| SealError::Corrupt(e.to_string()))?;
        Ok(Some(SealedKek(text)))
    }

    fn unseal(&self, sealed: Option<&SealedKek>) -> Result<Kek, SealError> {
        let sealed = sealed.ok_or_else(|| SealError::Corrupt("nothing to unseal".into()))?;
        let s: Stored =
            serde_json::from_str(sealed.as_str()).map_err(|e| SealError::Corrupt(e.to_string()))?;
        if s.v != 1 || s.seal != "pkcs11" || s.mechanism != "CKM_AES_GCM" {
            return Err(SealError::Corrupt(format!(
                "format v{} seal {:?} mechanism {:?} is not v1 pkcs11 CKM_AES_GCM",
                s.v, s.seal, s.mechanism
            )));
        }
        let mut iv = [0u8; IV_LEN];
        hex::decode_to_slice(&s.iv, &mut iv)
            .map_err(|_| SealError::Corrupt("the IV is not 12 bytes of hex".into()))?;
        let ct = hex::decode(&s.ciphertext)
            .map_err(|_| SealError::Corrupt("the ciphertext is not hex".into()))?;
        if ct.len() != KEK_LEN + TAG_LEN {
            return Err(SealError::Corrupt(format!(
                "the ciphertext is {} bytes, not {}",
                ct.len(),
                KEK_LEN + TAG_LEN
            )));
        }
        let t = self.open(false)?;
        let key = self.require_key(&t)?;
        let aad = aad(&s.kek_id);
        let params =
            GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into()).map_err(self.ck("GCM"))?;
        let unseal_failed = || SealError::Unseal {
            kek_id: s.kek_id.clone(),
            token: self.cfg.token_label.clone(),
            key: self.cfg.key_label.clone(),
        };
        // The plaintext lands in one allocation (cryptoki sizes it, then truncates) that
        // is zeroized when it drops, right after it is copied into the KEK.
        let plain = Zeroizing::new(
            match t.session().decrypt(&Mechanism::AesGcm(params), key, &ct) {
                Ok(p) => p,
                Err(CkError::Pkcs11(RvError::EncryptedDataInvalid, _))
                | Err(CkError::Pkcs11(RvError::EncryptedDataLenRange, _)) => {
                    return Err(unseal_failed())
                }
                Err(e) => return Err(self.ck("C_Decrypt")(e)),
            },
        );
        drop(t);
        let secret = KekSecret::from_slice(&plain).ok_or_else(unseal_failed)?;
        if secret.id() != s.kek_id {
            return Err(unseal_failed());
        }
        Ok(Kek::from_secret(secret))
    }

    fn probe(&self) -> Result<(), SealError> {
        let t = self.open(false)?;
        self.require_key(&t).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn pin_file(dir: &Path, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join("pin");
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn the_pin_file_is_one_line_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = pin_file(dir.path(), "123456\n", 0o600);
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "123456");
        let p = pin_file(dir.path(), "123456", 0o400);
        assert_eq!(read_pin(&p).unwrap().expose_secret(), "123456");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let p = pin_file(dir.path(), "123456\n", mode);
            let e = read_pin(&p).unwrap_err().to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("0600"),
                "{e}"
            );
        }
        for bad in ["", "\n", "12\n34\n"] {
            let p = pin_file(dir.path(), bad, 0o600);
            assert!(read_pin(&p).is_err(), "{bad:?}");
        }
        assert!(read_pin(&dir.path().join("absent")).is_err());
        assert!(
            read_pin(dir.path()).is_err(),
            "a directory is not a PIN file"
        );
    }

    #[test]
    fn a_corrupt_sealed_kek_is_refused_before_the_hsm_is_asked() {
        // The module does not exist: every refusal below comes from decoding alone.
        let seal = Pkcs11Seal::new(Pkcs11Config {
            module: "/nonexistent/module.so".into(),
            token_label: "t".into(),
            key_label: "k".into(),
            pin_file: "/nonexistent/pin".into(),
        });
        for text in [
            "not json",
            r#"{"v":2,"seal":"pkcs11","mechanism":"CKM_AES_GCM","token_label":"t","key_label":"k","kek_id":"kek-1","iv":"000000000000000000000000","ciphertext":""}"#,
            r#"{"v":1,"seal":"pkcs11","mechanism":"CKM_AES_GCM","token_label":"t","key_label":"k","kek_id":"kek-1","iv":"00","ciphertext":""}"#,
            r#"{"v":1,"seal":"pkcs11","mechanism":"CKM_AES_GCM","token_label":"t","key_label":"k","kek_id":"kek-1","iv":"000000000000000000000000","ciphertext":"00"}"#,
        ] {
            let e = seal.unseal(Some(&SealedKek::from_stored(text.into())));
            assert!(matches!(e, Err(SealError::Corrupt(_))), "{text}");
        }
        let sealed = SealedKek::from_stored(r#"{"v":1,"kek_id":"kek-0123456789abcdef"}"#.into());
        assert_eq!(sealed.kek_id().as_deref(), Some("kek-0123456789abcdef"));
    }
}
