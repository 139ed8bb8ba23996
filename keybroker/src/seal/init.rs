//! `nodecrypt-keybroker init --seal pkcs11`: creates the HSM wrapping key if asked, and
//! seals a KEK (new, or imported from a KEK file) into the store's metadata. Idempotent:
//! with a sealed KEK in the store it checks that it unseals and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pkcs11::Pkcs11Seal;
use super::{Seal, SealError, SealedKek, META_SEALED_KEK};
use crate::config::{Config, SealConfig};
use crate::store::redb::{RedbBackend, STORE_FILE};
use crate::store::{Backend, StoreError, META_KEK_ID};
use crate::wrap::{Kek, KekSecret};

/// What `init --seal pkcs11` did.
#[derive(Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// The store already held a sealed KEK, and it unseals: nothing was changed.
    AlreadySealed {
        /// Its id.
        kek_id: String,
    },
    /// A KEK was sealed into the store.
    Sealed {
        /// Its id.
        kek_id: String,
        /// The wrapping key was created.
        created_key: bool,
        /// The KEK came from a KEK file (`--import-kek`), not the CSPRNG.
        imported: bool,
    },
}

/// Why `init --seal pkcs11` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The configuration does not say `[seal] kind = "pkcs11"`.
    #[error("config {config}: [seal] kind is {kind:?}, not \"pkcs11\"; add a [seal] section with kind = \"pkcs11\"")]
    NotPkcs11 {
        /// The configuration file.
        config: PathBuf,
        /// The kind it says.
        kind: &'static str,
    },
    /// The HSM, the PIN, the wrapping key.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store's records are wrapped by another KEK than the one to seal.
    #[error("the store {store} was written with KEK {recorded}, not {kek_id}; refusing to seal a KEK that cannot open its records (to move a file-sealed store to the HSM, pass its KEK file with --import-kek)")]
    OtherKek {
        /// The store.
        store: String,
        /// The id it records.
        recorded: String,
        /// The id of the KEK to seal.
        kek_id: String,
    },
    /// `--import-kek` names another KEK than the one already sealed.
    #[error("the store {store} already holds sealed KEK {sealed}; refusing to import KEK {imported} over it")]
    AlreadyOther {
        /// The store.
        store: String,
        /// The sealed KEK's id.
        sealed: String,
        /// The imported KEK's id.
        imported: String,
    },
    /// The state directory.
    #[error("state directory {path}: {what}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// A blocking task failed.
    #[error("{0}")]
    Join(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SealError> + Send + 'static,
) -> Result<T, InitError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| InitError::Join(e.to_string()))?
        .map_err(InitError::Seal)
}

/// Runs `init --seal pkcs11` for `cfg` (read from `config`).
pub async fn init_pkcs11(
    cfg: &Config,
    config: &Path,
    create_key: bool,
    import_kek: Option<&Path>,
) -> Result<InitOutcome, InitError> {
    let SealConfig::Pkcs11(p) = &cfg.seal else {
        return Err(InitError::NotPkcs11 {
            config: config.to_path_buf(),
            kind: cfg.seal.kind(),
        });
    };
    let seal = Arc::new(Pkcs11Seal::new(p.clone()));
    let backend = RedbBackend::new(cfg.state_dir.join(STORE_FILE));
    let imported = match import_kek {
        Some(path) => Some(Kek::read_file(path).map_err(SealError::File)?),
        None => None,
    };

    // Already sealed: prove it unseals, change nothing.
    if let Some(text) = backend.recorded_meta(META_SEALED_KEK).await? {
        let sealed = SealedKek::from_stored(text);
        let s = seal.clone();
        let kek = blocking(move || s.unseal(Some(&sealed))).await?;
        if let Some(other) = imported.as_ref().filter(|i| i.id() != kek.id()) {
            return Err(InitError::AlreadyOther {
                store: backend.location(),
                sealed: kek.id().to_string(),
                imported: other.id(),
            });
        }
        return Ok(InitOutcome::AlreadySealed {
            kek_id: kek.id().to_string(),
        });
    }

    let secret = match imported {
        Some(s) => s,
        None => KekSecret::generate().map_err(SealError::File)?,
    };
    let kek_id = secret.id();
    if let Some(recorded) = backend.recorded_kek_id().await? {
        if recorded != kek_id {
            return Err(InitError::OtherKek {
                store: backend.location(),
                recorded,
                kek_id,
            });
        }
    }
    if create_key {
        let s = seal.clone();
        blocking(move || s.create_key()).await?;
    }
    let s = seal.clone();
    let (sealed, secret) = blocking(move || {
        let sealed = s
            .seal(&secret)?
            .expect("the pkcs11 seal stores its sealed KEK");
        // Prove the round trip before anything is written.
        let back = s.unseal(Some(&sealed))?;
        if back.id() != secret.id() {
            return Err(SealError::Corrupt(
                "the HSM returned another KEK than it sealed".into(),
            ));
        }
        Ok((sealed, secret))
    })
    .await?;
    drop(secret);

    let dir = &cfg.state_dir;
    let dir_err = |e: std::io::Error| InitError::StateDir {
        path: dir.clone(),
        what: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
    let store = backend.open().await?;
    store.meta_put(META_SEALED_KEK, sealed.as_str()).await?;
    if store.meta_get(META_KEK_ID).await?.is_none() {
        store.meta_put(META_KEK_ID, &kek_id).await?;
    }
    Ok(InitOutcome::Sealed {
        kek_id,
        created_key: create_key,
        imported: import_kek.is_some(),
    })
}
