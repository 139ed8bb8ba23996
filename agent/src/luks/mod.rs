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

pub mod header;
pub mod policy;

pub use header::Refusal;
pub use policy::Stage;

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

/// Sends libcryptsetup's own log messages to `trace!` (target `libcryptsetup`, with the
/// library's level as a field). Call once at the top of `main`, before other threads run.
/// Without it the library prints its debug output to stdout and drops the rest; what an
/// operator needs from a failure is in our errors, which name the device and operation.
pub fn route_library_log() {
    libcryptsetup_rs::set_log_callback::<()>(Some(library_log), None);
}

/// libcryptsetup's log callback. Lossy on bytes that are not UTF-8 (a hostile header's
/// strings must not abort the process, as a panic across this boundary would).
// FFI: a C callback receives a raw C string; the one unsafe item of the agent's library.
#[allow(unsafe_code)]
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
    /// The header is not one nodecrypt accepts (untrusted input): judged from its bytes,
    /// before any key was fetched.
    #[error("{device}: LUKS2 header refused ({}): {}", .refusal.reason, .refusal.message)]
    Refused {
        /// Device path.
        device: PathBuf,
        /// The reason code and what is wrong.
        refusal: Refusal,
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
}

/// A LUKS2 header that passed [`policy::judge`]: exactly what nodecrypt writes.
#[derive(Debug, Clone)]
pub struct Header {
    /// The header UUID.
    pub uuid: String,
    /// The header label (nodecrypt: the volume id).
    pub label: String,
    /// The header subsystem (`nodecrypt`).
    pub subsystem: String,
    /// Cipher spec of segment 0 (`aes-xts-plain64`).
    pub cipher: String,
    /// Volume key size in bits (512).
    pub key_bits: u32,
    /// Encryption sector size of segment 0 (512 or 4096).
    pub sector_size: u32,
    /// Byte offset of the data segment.
    pub data_offset: u64,
    /// Byte size of the data segment (device size minus offset for `dynamic`).
    pub data_size: u64,
    /// Keyslots in use (one; two while a rotation is under way).
    pub keyslots: Vec<u32>,
    /// The token id and contents of the nodecrypt token (`None` only when judged with
    /// [`Stage::Formatting`]).
    pub token: Option<(u32, Token)>,
    /// Size of one header copy.
    pub hdr_size: u64,
    /// The header's sequence id.
    pub seqid: u64,
}

impl Header {
    /// The nodecrypt token (present whenever the header was judged with a token).
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref().map(|(_, t)| t)
    }
}

/// What a device holds, judged from its bytes alone (nothing is written, libcryptsetup is
/// not involved).
#[derive(Debug)]
pub enum Inspection {
    /// No LUKS2 header at all.
    NotLuks,
    /// A LUKS2 header that is not nodecrypt's (another subsystem, no nodecrypt token).
    Foreign {
        /// Its UUID, if readable.
        uuid: String,
        /// Its label, if readable.
        label: String,
    },
    /// A header that looks like nodecrypt's but is not usable as it is.
    Refused {
        /// The volume id the header claims (token, else label), if any: untrusted.
        claimed_volume_id: Option<String>,
        /// Why.
        refusal: Refusal,
    },
    /// A usable nodecrypt header.
    Ours(Header),
}

/// Reads the bytes [`header::parse`] needs from the start of `device`: the primary
/// binary header, then both copies of the size it declares (or, when the primary is
/// unreadable, up to the secondary copy it can find). Bounded by [`header::MAX_PREFIX`].
pub fn read_prefix(device: &Path, device_size: u64) -> Result<Vec<u8>, LuksError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| LuksError::Io {
        device: device.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(device).map_err(io)?;
    let mut read_at = |offset: u64, len: u64| -> Result<Vec<u8>, LuksError> {
        let len = len.min(device_size.saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    };
    let first = read_at(0, header::BINARY_SIZE as u64)?;
    let want = match header::declared_size(&first) {
        Some(size) => 2 * size,
        None => {
            // The primary is unreadable: look for a secondary copy where one may lie.
            let mut found = 0;
            for &o in &header::SECONDARY_OFFSETS {
                if o + 8 > device_size {
                    break;
                }
                if header::has_secondary_magic(&read_at(o, 8)?) {
                    found = 2 * o;
                    break;
                }
            }
            found
        }
    };
    if want <= first.len() as u64 {
        return Ok(first);
    }
    read_at(0, want.min(header::MAX_PREFIX))
}

/// Whether any header copy in `prefix` says it is nodecrypt's (subsystem, or a nodecrypt
/// token in its JSON), however damaged the rest is, and the volume id it claims.
fn looks_ours(prefix: &[u8]) -> (bool, Option<String>) {
    let mut ours = header::subsystem_of(prefix).is_some_and(|s| s == SUBSYSTEM);
    let mut claimed: Option<String> = None;
    if let Some(c) = header::copies(prefix) {
        for copy in [&c.primary, &c.secondary].into_iter().flatten() {
            ours |= copy.binary.subsystem == SUBSYSTEM;
            let token = copy.json["tokens"].as_object().and_then(|t| {
                t.values()
                    .find(|v| v["type"] == TOKEN_TYPE)
                    .and_then(|v| v["volume_id"].as_str())
            });
            ours |= token.is_some();
            if claimed.is_none() {
                claimed = token
                    .map(str::to_string)
                    .or_else(|| (!copy.binary.label.is_empty()).then(|| copy.binary.label.clone()));
            }
        }
        let end = (2 * c.hdr_size as usize).min(prefix.len());
        ours |= prefix[..end]
            .windows(TOKEN_NEEDLE.len())
            .any(|w| w == TOKEN_NEEDLE);
    }
    let claimed = claimed.filter(|id| crate::volume::validate_volume_id(id).is_ok());
    (ours, claimed)
}

/// How a nodecrypt token's type appears in a JSON area libcryptsetup wrote.
const TOKEN_NEEDLE: &[u8] = b"\"type\":\"nodecrypt\"";

/// Judges the header of `device` (`device_size` bytes) from its bytes alone: integrity of
/// both copies, then nodecrypt's allowlist ([`policy::judge`]). Reads at most
/// [`header::MAX_PREFIX`] bytes and never writes.
pub fn inspect(device: &Path, device_size: u64, rule: Stage) -> Result<Inspection, LuksError> {
    let prefix = read_prefix(device, device_size)?;
    Ok(judge_prefix(&prefix, device_size, rule))
}

/// [`inspect`] over bytes already read: pure.
pub fn judge_prefix(prefix: &[u8], device_size: u64, rule: Stage) -> Inspection {
    let primary_magic = prefix.len() >= 6 && &prefix[..4] == b"LUKS";
    let (ours, claimed_volume_id) = looks_ours(prefix);
    if !primary_magic && !ours {
        return match header::copies(prefix) {
            Some(_) => Inspection::Foreign {
                uuid: String::new(),
                label: String::new(),
            },
            None => Inspection::NotLuks,
        };
    }
    let parsed = match header::parse(prefix) {
        Ok(p) => p,
        Err(refusal) if ours => {
            return Inspection::Refused {
                claimed_volume_id,
                refusal,
            }
        }
        Err(_) => {
            return Inspection::Foreign {
                uuid: String::new(),
                label: String::new(),
            }
        }
    };
    if !ours {
        return Inspection::Foreign {
            uuid: parsed.binary().uuid.clone(),
            label: parsed.binary().label.clone(),
        };
    }
    match policy::judge(&parsed, device_size, rule) {
        Ok(h) => Inspection::Ours(h),
        Err(refusal) => Inspection::Refused {
            claimed_volume_id,
            refusal,
        },
    }
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
