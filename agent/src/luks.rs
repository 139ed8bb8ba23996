//! The only module that calls libcryptsetup (through libcryptsetup-rs, `mutex` feature:
//! the library is not thread-safe). Every function opens a fresh context on the calling
//! (blocking) thread and drops it before returning; no `CryptDevice` escapes.
//!
//! Keys reach libcryptsetup from memory only (`&[u8]` of a zeroizing buffer), never a
//! file, an argument vector or the environment.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::Read;
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either,
    LibcryptErr, TokenInput,
};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::key::{MasterKey, SlotKey, KEY_LEN};

/// Cipher and mode of every nodecrypt volume.
pub const CIPHER: &str = "aes";
/// XTS with the plain64 IV, as dm-crypt names it.
pub const CIPHER_MODE: &str = "xts-plain64";
/// Full cipher spec as it appears in the LUKS2 segment.
pub const CIPHER_SPEC: &str = "aes-xts-plain64";
/// The header `subsystem` field of every nodecrypt volume.
pub const SUBSYSTEM: &str = "nodecrypt";
/// The LUKS2 token type that links a keyslot to the broker.
pub const TOKEN_TYPE: &str = "nodecrypt";
/// PBKDF2 iterations: libcryptsetup's minimum. The keyslot key is 512 random bits from the
/// broker, so key stretching adds boot time and no security.
pub const PBKDF2_ITERATIONS: u32 = 1000;
/// The LUKS2 magic of the primary header.
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Sends libcryptsetup's own log messages to `trace!` (target `libcryptsetup`, with the
/// library's level as a field). Call once at the top of `main`, before other threads run.
/// Without it the library prints its debug output to stdout and drops the rest; what an
/// operator needs from a failure is in our errors, which name the device and operation.
pub fn route_library_log() {
    libcryptsetup_rs::set_log_callback::<()>(Some(library_log), None);
}

/// libcryptsetup's log callback. Lossy on bytes that are not UTF-8 (a hostile header's
/// strings must not abort the process, as a panic across this boundary would).
unsafe extern "C" fn library_log(level: c_int, msg: *const c_char, _usrptr: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string that outlives the call.
    let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    tracing::trace!(target: "libcryptsetup", level, "{}", msg.trim_end());
}

/// What went wrong in libcryptsetup, with the device it concerned.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// A libcryptsetup call failed.
    #[error("{device}: {op}: {source}")]
    Crypt {
        /// Device path.
        device: PathBuf,
        /// The operation.
        op: &'static str,
        /// libcryptsetup's error.
        source: LibcryptErr,
    },
    /// The key does not open any keyslot of the device.
    #[error("{device}: the key does not open any keyslot")]
    WrongKey {
        /// Device path.
        device: PathBuf,
    },
    /// The header is not one nodecrypt accepts (untrusted input).
    #[error("{device}: {what}")]
    Policy {
        /// Device path.
        device: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// Plain I/O on the device failed.
    #[error("{device}: {source}")]
    Io {
        /// Device path.
        device: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl LuksError {
    fn crypt<'a>(device: &'a Path, op: &'static str) -> impl FnOnce(LibcryptErr) -> LuksError + 'a {
        move |source| LuksError::Crypt {
            device: device.to_path_buf(),
            op,
            source,
        }
    }
}

/// The `nodecrypt` token: links a keyslot to a broker key version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Token {
    /// The keyslot this token opens.
    pub keyslot: u32,
    /// The broker's volume id.
    pub volume_id: String,
    /// The broker key version in that keyslot.
    pub key_version: u64,
    /// The broker endpoint that formatted the volume (informational).
    pub broker: String,
}

impl Token {
    fn to_json(&self) -> Value {
        json!({
            "type": TOKEN_TYPE,
            "keyslots": [self.keyslot.to_string()],
            "volume_id": self.volume_id,
            "key_version": self.key_version,
            "broker": self.broker,
        })
    }

    fn from_json(v: &Value) -> Option<Token> {
        if v.get("type")?.as_str()? != TOKEN_TYPE {
            return None;
        }
        let keyslots = v.get("keyslots")?.as_array()?;
        let keyslot = match keyslots.as_slice() {
            [one] => one.as_str()?.parse().ok()?,
            _ => return None,
        };
        Some(Token {
            keyslot,
            volume_id: v.get("volume_id")?.as_str()?.to_string(),
            key_version: v.get("key_version")?.as_u64()?,
            broker: v
                .get("broker")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// A LUKS2 header as read from a device, before any key is used.
#[derive(Debug, Clone)]
pub struct Header {
    /// The header UUID.
    pub uuid: String,
    /// The header label (nodecrypt: the volume id).
    pub label: String,
    /// The header subsystem (nodecrypt: `nodecrypt`).
    pub subsystem: String,
    /// Cipher spec of segment 0 (`aes-xts-plain64`).
    pub cipher: String,
    /// Volume key size in bits.
    pub key_bits: u32,
    /// Encryption sector size of segment 0.
    pub sector_size: u32,
    /// Byte offset of the data segment.
    pub data_offset: u64,
    /// Byte size of the data segment (device size minus offset for `dynamic`).
    pub data_size: u64,
    /// Keyslots in use.
    pub keyslots: Vec<u32>,
    /// The token id and contents of the nodecrypt token, if any.
    pub token: Option<(u32, Token)>,
    /// Number of tokens of other types.
    pub foreign_tokens: usize,
    /// Mandatory requirement flags the header declares.
    pub requirements: Vec<String>,
    /// Number of segments.
    pub segments: usize,
}

impl Header {
    /// Whether the header looks like one nodecrypt wrote (label and subsystem), token or not.
    pub fn is_ours(&self) -> bool {
        self.subsystem == SUBSYSTEM
    }

    /// Checks the header against nodecrypt's policy before any key is used: LUKS2, one
    /// crypt segment of aes-xts-plain64 with a 512-bit key inside the device, no
    /// requirement flags, a nodecrypt token naming `volume_id` (when given).
    pub fn check_policy(
        &self,
        device: &Path,
        volume_id: Option<&str>,
    ) -> Result<&Token, LuksError> {
        let bad = |what: String| LuksError::Policy {
            device: device.to_path_buf(),
            what,
        };
        if self.segments != 1 {
            return Err(bad(format!(
                "has {} data segments; nodecrypt volumes have exactly one",
                self.segments
            )));
        }
        if self.cipher != CIPHER_SPEC || self.key_bits != 512 {
            return Err(bad(format!(
                "cipher {} with a {}-bit key is not nodecrypt's {CIPHER_SPEC} with a 512-bit key",
                self.cipher, self.key_bits
            )));
        }
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(bad(format!("unsupported sector size {}", self.sector_size)));
        }
        if !self.requirements.is_empty() {
            return Err(bad(format!(
                "declares requirements {:?} (e.g. an unfinished reencryption); refusing to use it",
                self.requirements
            )));
        }
        if self.data_size == 0 {
            return Err(bad("data segment lies outside the device".into()));
        }
        let (_, token) = self.token.as_ref().ok_or_else(|| {
            bad("LUKS2 volume without a nodecrypt token: not a nodecrypt volume".into())
        })?;
        if !self.keyslots.contains(&token.keyslot) {
            return Err(bad(format!(
                "the nodecrypt token names keyslot {} which is not in use",
                token.keyslot
            )));
        }
        if let Some(id) = volume_id {
            if token.volume_id != id {
                return Err(bad(format!(
                    "belongs to volume {:?}, not {id:?}",
                    token.volume_id
                )));
            }
        }
        Ok(token)
    }
}

/// Whether the first bytes of `device` carry the LUKS magic with version 2. Plain reads
/// only: cheap enough for discovery across every block device.
pub fn has_luks2_magic(device: &Path) -> bool {
    let mut buf = [0u8; 8];
    std::fs::File::open(device)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|_| &buf[..6] == LUKS_MAGIC && buf[6..8] == [0, 2])
        .unwrap_or(false)
}

/// Label and subsystem from the primary binary header (libcryptsetup has no getter).
fn label_and_subsystem(device: &Path) -> Result<(String, String), LuksError> {
    let mut buf = vec![0u8; 256];
    std::fs::File::open(device)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| LuksError::Io {
            device: device.to_path_buf(),
            source,
        })?;
    let field = |range: std::ops::Range<usize>| {
        let raw = &buf[range];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    };
    Ok((field(24..72), field(208..256)))
}

fn init(device: &Path) -> Result<CryptDevice, LuksError> {
    CryptInit::init(device).map_err(LuksError::crypt(device, "init"))
}

fn load(device: &Path) -> Result<CryptDevice, LuksError> {
    let mut cd = init(device)?;
    cd.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(LuksError::crypt(device, "load LUKS2 header"))?;
    Ok(cd)
}

fn set_pbkdf(cd: &mut CryptDevice, device: &Path) -> Result<(), LuksError> {
    let pbkdf = pbkdf();
    cd.settings_handle()
        .set_pbkdf_type(&pbkdf)
        .map_err(LuksError::crypt(device, "set pbkdf"))
}

fn pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_string()),
        time_ms: 0,
        iterations: PBKDF2_ITERATIONS,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// Reads and parses the LUKS2 header of `device` (never writes). `device_size` bounds
/// the data segment.
pub fn read_header(device: &Path, device_size: u64) -> Result<Header, LuksError> {
    let mut cd = load(device)?;
    let meta = cd
        .status_handle()
        .dump_json()
        .map_err(LuksError::crypt(device, "read LUKS2 metadata"))?;
    let uuid = cd
        .status_handle()
        .get_uuid()
        .map(|u| u.to_string())
        .unwrap_or_default();
    drop(cd);
    let (label, subsystem) = label_and_subsystem(device)?;
    let bad = |what: &str| LuksError::Policy {
        device: device.to_path_buf(),
        what: format!("malformed LUKS2 metadata: {what}"),
    };
    let segments = meta
        .get("segments")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no segments"))?;
    let seg = segments.get("0").ok_or_else(|| bad("no segment 0"))?;
    let num = |v: Option<&Value>| -> Option<u64> {
        match v? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    };
    let data_offset = num(seg.get("offset")).ok_or_else(|| bad("segment offset"))?;
    let data_size = match seg.get("size").and_then(Value::as_str) {
        Some("dynamic") => device_size.saturating_sub(data_offset),
        _ => {
            let size = num(seg.get("size")).ok_or_else(|| bad("segment size"))?;
            if data_offset.saturating_add(size) > device_size {
                0
            } else {
                size
            }
        }
    };
    let keyslots_obj = meta.get("keyslots").and_then(Value::as_object);
    let mut keyslots: Vec<u32> = keyslots_obj
        .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    keyslots.sort_unstable();
    let key_bits = keyslots_obj
        .and_then(|m| m.values().next())
        .and_then(|k| k.get("key_size"))
        .and_then(Value::as_u64)
        .map(|b| (b * 8) as u32)
        .unwrap_or(0);
    let mut token = None;
    let mut foreign_tokens = 0;
    if let Some(tokens) = meta.get("tokens").and_then(Value::as_object) {
        for (id, t) in tokens {
            match (id.parse::<u32>().ok(), Token::from_json(t)) {
                (Some(id), Some(tok)) if token.is_none() => token = Some((id, tok)),
                _ => foreign_tokens += 1,
            }
        }
    }
    let requirements = meta
        .pointer("/config/requirements/mandatory")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(Header {
        uuid,
        label,
        subsystem,
        cipher: seg
            .get("encryption")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        key_bits,
        sector_size: seg.get("sector_size").and_then(Value::as_u64).unwrap_or(0) as u32,
        data_offset,
        data_size,
        keyslots,
        token,
        foreign_tokens,
        requirements,
        segments: segments.len(),
    })
}

/// Writes a fresh LUKS2 header (aes-xts-plain64, 512-bit volume key generated by
/// libcryptsetup, pbkdf2 at minimum iterations, label = `volume_id`, subsystem
/// `nodecrypt`) and adds keyslot 0 opened by `key`. Returns the keyslot.
/// `between` runs after the header and after the keyslot are written (crash points).
pub fn format(
    device: &Path,
    volume_id: &str,
    sector_size: u32,
    key: &SlotKey,
    between: &dyn Fn(&'static str),
) -> Result<u32, LuksError> {
    let mut cd = init(device)?;
    set_pbkdf(&mut cd, device)?;
    let params = CryptParamsLuks2 {
        pbkdf: Some(pbkdf()),
        integrity: None,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size,
        label: Some(volume_id.to_string()),
        subsystem: Some(SUBSYSTEM.to_string()),
    };
    let mut params_ref: CryptParamsLuks2Ref<'_> = (&params)
        .try_into()
        .map_err(LuksError::crypt(device, "LUKS2 parameters"))?;
    cd.context_handle()
        .format(
            EncryptionFormat::Luks2,
            (CIPHER, CIPHER_MODE),
            None,
            Either::Right(KEY_LEN),
            Some(&mut params_ref),
        )
        .map_err(LuksError::crypt(device, "luksFormat"))?;
    between("format-after-luksformat");
    let slot = cd
        .keyslot_handle()
        .add_by_key(None, None, key.expose(), CryptVolumeKey::empty())
        .map_err(LuksError::crypt(device, "add keyslot"))?;
    between("format-after-keyslot");
    Ok(slot)
}

/// Writes (adds or replaces) the nodecrypt token; returns its id.
pub fn set_token(device: &Path, replace: Option<u32>, token: &Token) -> Result<u32, LuksError> {
    let mut cd = load(device)?;
    let json = token.to_json();
    let input = match replace {
        Some(id) => TokenInput::ReplaceToken(id, &json),
        None => TokenInput::AddToken(&json),
    };
    cd.token_handle()
        .json_set(input)
        .map_err(LuksError::crypt(device, "write nodecrypt token"))
}

/// The keyslot `key` opens (`slot` restricts the search), without activating anything.
pub fn check_key(device: &Path, slot: Option<u32>, key: &SlotKey) -> Result<u32, LuksError> {
    let mut cd = load(device)?;
    cd.activate_handle()
        .activate_by_passphrase(None, slot, key.expose(), CryptActivate::empty())
        .map_err(|e| wrong_key_or(device, "verify keyslot", e))
}

fn wrong_key_or(device: &Path, op: &'static str, e: LibcryptErr) -> LuksError {
    match &e {
        LibcryptErr::IOError(io) if matches!(io.raw_os_error(), Some(c) if c == nix::libc::EPERM || c == nix::libc::ENOENT) => {
            LuksError::WrongKey {
                device: device.to_path_buf(),
            }
        }
        _ => LuksError::Crypt {
            device: device.to_path_buf(),
            op,
            source: e,
        },
    }
}

/// Adds a keyslot opened by `new`, authorised by `old`; returns the new slot.
pub fn add_keyslot(device: &Path, old: &SlotKey, new: &SlotKey) -> Result<u32, LuksError> {
    let mut cd = load(device)?;
    set_pbkdf(&mut cd, device)?;
    cd.keyslot_handle()
        .add_by_passphrase(None, old.expose(), new.expose())
        .map_err(|e| wrong_key_or(device, "add keyslot", e))
}

/// Destroys one keyslot (its key material area is wiped by libcryptsetup).
pub fn destroy_keyslot(device: &Path, slot: u32) -> Result<(), LuksError> {
    let mut cd = load(device)?;
    cd.keyslot_handle()
        .destroy(slot)
        .map_err(LuksError::crypt(device, "destroy keyslot"))
}

/// The LUKS2 volume (master) key, unlocked with `key`: for the userspace data path.
pub fn volume_key(device: &Path, slot: u32, key: &SlotKey) -> Result<MasterKey, LuksError> {
    let mut cd = load(device)?;
    let mut buf = Zeroizing::new(vec![0u8; KEY_LEN]);
    let (_, len) = cd
        .volume_key_handle()
        .get(Some(slot), &mut buf, Some(key.expose()))
        .map_err(|e| wrong_key_or(device, "read volume key", e))?;
    buf.truncate(len);
    Ok(MasterKey::new(buf))
}

/// Activates a dm-crypt mapping `name` with the volume key in the kernel keyring (not in
/// the dm table) and the no_read/no_write workqueue flags.
pub fn activate(
    device: &Path,
    name: &str,
    slot: u32,
    key: &SlotKey,
    allow_discards: bool,
) -> Result<(), LuksError> {
    let mut cd = load(device)?;
    cd.context_handle()
        .volume_key_keyring(true)
        .map_err(LuksError::crypt(device, "enable keyring"))?;
    let mut flags = CryptActivate::NO_READ_WORKQUEUE | CryptActivate::NO_WRITE_WORKQUEUE;
    if allow_discards {
        flags |= CryptActivate::ALLOW_DISCARDS;
    }
    cd.activate_handle()
        .activate_by_passphrase(Some(name), Some(slot), key.expose(), flags)
        .map(|_| ())
        .map_err(|e| wrong_key_or(device, "activate dm-crypt mapping", e))
}

/// Removes the dm-crypt mapping `name`.
pub fn deactivate(name: &str) -> Result<(), LuksError> {
    let dev = PathBuf::from("/dev/mapper").join(name);
    let mut cd = CryptInit::init_by_name_and_header(name, None)
        .map_err(LuksError::crypt(&dev, "find mapping"))?;
    cd.activate_handle()
        .deactivate(name, CryptDeactivate::empty())
        .map_err(LuksError::crypt(&dev, "remove mapping"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A tracing writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn library_messages_reach_trace_with_their_target() {
        route_library_log();
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("missing.img");
        tracing::subscriber::with_default(subscriber, || {
            // A message through the library's own log function, and a real failure.
            libcryptsetup_rs::log(
                libcryptsetup_rs::consts::vals::CryptLogLevel::Error,
                "nodecrypt probe",
            )
            .unwrap();
            assert!(load(&device).is_err(), "there is no such device");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("TRACE libcryptsetup: nodecrypt probe"),
            "probe not routed: {text}"
        );
        let lines = text
            .lines()
            .filter(|l| l.contains("TRACE libcryptsetup:"))
            .count();
        assert!(
            text.contains("missing.img") && lines >= 2,
            "the failed load logged nothing: {text}"
        );
    }
}
