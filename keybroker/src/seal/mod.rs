//! KEK sealing: where the broker's KEK comes from at start, behind one trait.
//!
//! - [`file::FileSeal`]: the KEK file `<state_dir>/kek` (0600), for development and the
//!   demo; whoever reads the state directory holds every key.
//! - [`pkcs11::Pkcs11Seal`]: an AES-256 key inside an HSM, sensitive and not extractable,
//!   encrypts the KEK (CKM_AES_GCM, in the HSM); only that [`SealedKek`] is stored, in the
//!   key store's metadata under [`META_SEALED_KEK`], so every replica reads the same one.
//!   The broker unseals it once, at start ("auto-unseal"); the HSM is not on the per-fetch
//!   path.
//!
//! Unsealing writes nothing: the broker reads the sealed KEK from the store without
//! writing to it, and opens the store only once the KEK is known to be the one the store
//! was written with.

pub mod file;
pub mod init;
pub mod pkcs11;
pub mod status;

use std::path::{Path, PathBuf};

use crate::config::SealConfig;
use crate::wrap::{Kek, KekSecret, WrapError};

/// Store metadata key holding the sealed KEK (seals that keep it in the store).
pub const META_SEALED_KEK: &str = "sealed_kek";

/// A sealed KEK as stored: text (JSON) safe to store, copy and back up; only the seal that
/// made it can open it. It names its KEK's id, so a broker can tell which KEK it holds
/// without opening it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedKek(String);

impl SealedKek {
    /// The stored text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Stored text read back.
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    /// The id of the KEK it seals, as it says (not proof: only unsealing proves it).
    pub fn kek_id(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.0).ok()?;
        v.get("kek_id")?.as_str().map(str::to_string)
    }
}

/// Why the KEK could not be sealed or unsealed. Each variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The KEK file (file seal).
    #[error(transparent)]
    File(#[from] WrapError),
    /// The PIN file is missing, unreadable, empty or readable by others.
    #[error("PIN file {path}: {what}")]
    PinFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The PKCS#11 module could not be loaded.
    #[error("PKCS#11 module {module}: cannot load it: {cause}")]
    Module {
        /// The module path.
        module: PathBuf,
        /// Why.
        cause: String,
    },
    /// No token with that label is present.
    #[error("PKCS#11 token {token:?} is not present (module {module}; tokens present: {found:?}); is the HSM connected, and is this its label?")]
    TokenAbsent {
        /// The label looked for.
        token: String,
        /// The module.
        module: PathBuf,
        /// Labels of the tokens present.
        found: Vec<String>,
    },
    /// The token refused the PIN.
    #[error("PKCS#11 token {token:?} refused the PIN read from {pin_file}: {cause}")]
    Login {
        /// The token.
        token: String,
        /// The PIN file.
        pin_file: PathBuf,
        /// Incorrect, locked, …
        cause: String,
    },
    /// The wrapping key is not on the token.
    #[error("PKCS#11 token {token:?} holds no AES key labelled {key:?}: the wrapping key is gone (without it the sealed KEK cannot be opened; restore the HSM from its backup), or create it with `nodecrypt-keybroker init --seal pkcs11 --create-key`")]
    KeyMissing {
        /// The token.
        token: String,
        /// The key label.
        key: String,
    },
    /// `--create-key` with a key of that label already on the token.
    #[error("PKCS#11 token {token:?} already holds a key labelled {key:?}; refusing to create another (the sealed KEK may depend on it)")]
    KeyExists {
        /// The token.
        token: String,
        /// The key label.
        key: String,
    },
    /// The key of that label is not fit to wrap the KEK.
    #[error("PKCS#11 key {key:?} on token {token:?} {what}; refusing to seal or unseal with it")]
    KeyUnfit {
        /// The token.
        token: String,
        /// The key label.
        key: String,
        /// What is wrong (extractable, not sensitive, several keys, …).
        what: String,
    },
    /// The store holds no sealed KEK.
    #[error("the store {store} holds no sealed KEK; create one with `nodecrypt-keybroker init --seal pkcs11 --config FILE [--create-key]`")]
    NotSealed {
        /// The store.
        store: String,
    },
    /// The sealed KEK does not open with this key (another key of the same label, or an
    /// altered sealed KEK).
    #[error("the sealed KEK {kek_id} does not open with key {key:?} on token {token:?}: this is not the key that sealed it, or the sealed KEK was altered")]
    Unseal {
        /// The sealed KEK's id.
        kek_id: String,
        /// The token.
        token: String,
        /// The key label.
        key: String,
    },
    /// The stored sealed KEK does not decode.
    #[error("the sealed KEK in the store is corrupt: {0}")]
    Corrupt(String),
    /// Another PKCS#11 call failed.
    #[error("PKCS#11 {step} failed (module {module}): {cause}")]
    Pkcs11 {
        /// The call.
        step: &'static str,
        /// The module.
        module: PathBuf,
        /// The return value.
        cause: String,
    },
}

/// A way of sealing the KEK.
pub trait Seal: Send + Sync {
    /// `file` or `pkcs11`.
    fn kind(&self) -> &'static str;

    /// What it is, for messages (a file path; module, token and key labels). No secret.
    fn describe(&self) -> String;

    /// Whether the sealed KEK lives in the store's metadata ([`META_SEALED_KEK`]); the
    /// file seal keeps its KEK itself.
    fn in_store(&self) -> bool;

    /// Seals `kek`: the text to store under [`META_SEALED_KEK`], or `None` where the seal
    /// keeps the KEK itself (the file seal writes its file, refusing to overwrite one).
    fn seal(&self, kek: &KekSecret) -> Result<Option<SealedKek>, SealError>;

    /// The KEK, unsealed into zeroizing memory. `sealed` is what the store holds under
    /// [`META_SEALED_KEK`] (ignored by the file seal). Writes nothing.
    fn unseal(&self, sealed: Option<&SealedKek>) -> Result<Kek, SealError>;

    /// Checks the seal can be used (HSM reachable, PIN accepted, wrapping key present and
    /// fit), without unsealing anything.
    fn probe(&self) -> Result<(), SealError>;
}

/// The seal `cfg` describes, for a broker whose state directory is `state_dir`.
pub fn from_config(cfg: &SealConfig, state_dir: &Path) -> Box<dyn Seal> {
    match cfg {
        SealConfig::File {} => Box::new(file::FileSeal::new(state_dir)),
        SealConfig::Pkcs11(p) => Box::new(pkcs11::Pkcs11Seal::new(p.clone())),
    }
}
