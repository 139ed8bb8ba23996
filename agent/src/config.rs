//! The agent's TOML configuration. Unknown fields are rejected; defaults are the secure
//! choice (block devices only, root-only socket, no TCP listener).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Which data path maps an opened volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// The kernel's dm-crypt (production).
    DmCrypt,
    /// The agent's own XTS engine behind a FUSE file and a loop device.
    Userspace,
    /// dm-crypt when the kernel has device-mapper, else userspace.
    #[default]
    Auto,
}

/// Agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unix socket of the local API (mode 0600, root peers only).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Runtime directory: device locks, userspace mounts.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Data path for opened volumes.
    #[serde(default)]
    pub backend: BackendChoice,
    /// How long open and unlock-all keep retrying an unreachable broker.
    #[serde(default = "default_deadline", deserialize_with = "duration")]
    pub unlock_deadline: Duration,
    /// Accept regular files as devices (tests, demo). Off in production.
    #[serde(default)]
    pub allow_file_devices: bool,
    /// Files that unlock-all scans besides block devices (needs `allow_file_devices`).
    #[serde(default)]
    pub file_devices: Vec<PathBuf>,
    /// The key broker.
    pub broker: BrokerConfig,
    /// Optional mTLS listener for the cluster manager (admin identities only).
    #[serde(default)]
    pub tcp: Option<TcpConfig>,
}

/// How to reach the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `host:port`.
    pub endpoint: String,
    /// This node's certificate (SPIFFE id `spiffe://TD/node/NAME`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// Deadline of one request (connect + TLS + answer).
    #[serde(default = "default_request", deserialize_with = "duration")]
    pub request_timeout: Duration,
}

/// The cluster manager's listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// `ip:port` (port 0: the kernel chooses; printed when ready).
    pub listen: std::net::SocketAddr,
    /// Server certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// CA for client certificates.
    pub ca: PathBuf,
    /// Trust domain of admin identities.
    pub trust_domain: String,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/nodecrypt/agent.sock")
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/nodecrypt")
}
fn default_deadline() -> Duration {
    Duration::from_secs(120)
}
fn default_request() -> Duration {
    Duration::from_secs(5)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

pub use nodecrypt_common::config::ConfigError;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |what: String| ConfigError::new(path, what);
        let cfg: Config = nodecrypt_common::config::load_toml(path)?;
        if !cfg.file_devices.is_empty() && !cfg.allow_file_devices {
            return Err(err(
                "file_devices needs allow_file_devices = true".to_string()
            ));
        }
        if cfg.unlock_deadline.is_zero() {
            return Err(err("unlock_deadline must be positive".to_string()));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_secure_and_unknown_fields_rejected() {
        let c: Config = toml::from_str(
            "[broker]\nendpoint = \"b:1\"\ncert = \"/c\"\nkey = \"/k\"\nca = \"/ca\"\n",
        )
        .unwrap();
        assert!(!c.allow_file_devices);
        assert!(c.tcp.is_none());
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.unlock_deadline, Duration::from_secs(120));
        assert!(toml::from_str::<Config>(
            "bogus = 1\n[broker]\nendpoint = \"b:1\"\ncert = \"/c\"\nkey = \"/k\"\nca = \"/ca\"\n"
        )
        .is_err());
        let c: Config = toml::from_str(
            "backend = \"dm-crypt\"\nunlock_deadline = \"3s\"\n[broker]\nendpoint = \"b:1\"\ncert = \"/c\"\nkey = \"/k\"\nca = \"/ca\"\n",
        )
        .unwrap();
        assert_eq!(c.backend, BackendChoice::DmCrypt);
        assert_eq!(c.unlock_deadline, Duration::from_secs(3));
    }
}
