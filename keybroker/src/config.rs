//! The broker's TOML configuration. Unknown fields are rejected; every default is the
//! secure one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::TlsFiles;

/// `nodecrypt-keybroker serve --config FILE`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TCP address to listen on (TLS 1.3, client certificates required). Use a port of 0
    /// to let the kernel choose; the chosen address is printed on stdout when ready.
    pub listen: SocketAddr,
    /// SPIFFE trust domain of accepted identities (`spiffe://<trust_domain>/node/<id>`).
    pub trust_domain: String,
    /// State directory: the KEK file (`kek`) and the key store (`keys.redb`).
    pub state_dir: PathBuf,
    /// Audit log path (default `<state_dir>/audit.log`).
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// fsync the audit log before answering (default true: no key leaves unaudited on
    /// power loss).
    #[serde(default = "yes")]
    pub audit_fsync: bool,
    /// The broker's certificate and key, and the CA client certificates must chain to.
    pub tls: TlsFiles,
    /// A TLS handshake that takes longer is dropped (default 10 s).
    #[serde(default = "handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// A request that takes longer is cancelled (default 30 s).
    #[serde(default = "request_ms")]
    pub request_timeout_ms: u64,
}

fn yes() -> bool {
    true
}
fn handshake_ms() -> u64 {
    10_000
}
fn request_ms() -> u64 {
    30_000
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {what}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub what: String,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |what: String| ConfigError {
            path: path.to_path_buf(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if cfg.trust_domain.is_empty() || cfg.trust_domain.contains('/') {
            return Err(err(format!(
                "trust_domain {:?} is not a domain name",
                cfg.trust_domain
            )));
        }
        Ok(cfg)
    }

    /// The audit log path.
    pub fn audit_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.log"))
    }
}
