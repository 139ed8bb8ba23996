//! The file seal: the KEK is the file `<state_dir>/kek` (0600), as it always was.

use std::path::{Path, PathBuf};

use super::{Seal, SealError, SealedKek};
use crate::wrap::{Kek, KekSecret, KEK_FILE};

/// The KEK file of a state directory.
pub struct FileSeal {
    state_dir: PathBuf,
}

impl FileSeal {
    /// The KEK file of `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }
}

impl Seal for FileSeal {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        self.state_dir.join(KEK_FILE).display().to_string()
    }

    fn in_store(&self) -> bool {
        false
    }

    fn seal(&self, kek: &KekSecret) -> Result<Option<SealedKek>, SealError> {
        Kek::write_new(&self.state_dir, kek)?;
        Ok(None)
    }

    fn unseal(&self, _sealed: Option<&SealedKek>) -> Result<Kek, SealError> {
        Ok(Kek::load(&self.state_dir)?)
    }

    fn probe(&self) -> Result<(), SealError> {
        Kek::read_file(&self.state_dir.join(KEK_FILE))
            .map(drop)
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_seal_writes_once_and_unseals_the_same_kek() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let seal = FileSeal::new(&state);
        assert!(seal.probe().is_err(), "no KEK file yet");
        let kek = KekSecret::generate().unwrap();
        assert!(seal.seal(&kek).unwrap().is_none(), "nothing for the store");
        assert_eq!(seal.unseal(None).unwrap().id(), kek.id());
        seal.probe().unwrap();
        assert!(
            seal.seal(&KekSecret::generate().unwrap()).is_err(),
            "never overwrites"
        );
        assert_eq!(seal.unseal(None).unwrap().id(), kek.id());
    }
}
