//! Loading a daemon's TOML config: one error that names the file, the same for both.
//! (Each config type rejects unknown fields itself, with `deny_unknown_fields`.)

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {what}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub what: String,
}

impl ConfigError {
    /// An error about `path`.
    pub fn new(path: &Path, what: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// Reads and parses `path` as TOML into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("nodecrypt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.toml");
        std::fs::write(&p, "a = 1\nb = 2\n").unwrap();
        let e = load_toml::<T>(&p).unwrap_err();
        assert!(
            e.to_string().contains("x.toml") && e.what.contains("unknown field"),
            "{e}"
        );
        std::fs::write(&p, "a = 1\n").unwrap();
        assert_eq!(load_toml::<T>(&p).unwrap().a, 1);
        let e = load_toml::<T>(&dir.join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
