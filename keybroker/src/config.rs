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
    /// Group commit: while more than one call waits on the audit log, its batch is held
    /// open for up to this many microseconds so that the calls arriving meanwhile share
    /// one fsync (default 1000; 0 never holds one). Every call is still answered only
    /// once its own line is durable; a lone call is never held, nor a batch that
    /// [`NO_DELAY_BATCH`](crate::audit::NO_DELAY_BATCH) calls already share. An fsync
    /// costs about as much CPU as a whole key fetch, so under load this is what keeps the
    /// audit log from halving the broker's capacity (README, "Key broker" benchmark).
    #[serde(default = "commit_delay_us")]
    pub audit_commit_delay_us: u64,
    /// The broker's certificate and key, and the CA client certificates must chain to.
    pub tls: TlsFiles,
    /// A TLS handshake that takes longer is dropped (default 10 s).
    #[serde(default = "handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// A request that takes longer is cancelled (default 30 s).
    #[serde(default = "request_ms")]
    pub request_timeout_ms: u64,
    /// After its TLS handshake, a connection must send the HTTP/2 preface and its first
    /// request's headers within this many milliseconds or it is closed (default 10 s): a
    /// client that completes TLS and says nothing holds a file descriptor no longer.
    #[serde(default = "first_request_ms")]
    pub first_request_timeout_ms: u64,
    /// A connection with no request in flight for this many milliseconds is closed
    /// (default 300 s; clients reconnect on their next call). HTTP/2 keepalive pings
    /// (every 20 s, 10 s to answer) close a dead peer's connection sooner.
    #[serde(default = "idle_ms")]
    pub idle_timeout_ms: u64,
    /// Open client connections at most, handshaking or established (default 4096). One
    /// more is closed right after `accept`, before any TLS work, so a flood of idle or
    /// half-open connections cannot exhaust the file descriptors `accept` needs. Keep it
    /// well under the unit's `LimitNOFILE` (65536): each connection is one descriptor.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// Serve `GetVolumeKey` to break-glass identities `spiffe://<trust_domain>/recovery/<name>`
    /// (default false: refused). Every such read, served or refused, is audited as
    /// `GetVolumeKey:RECOVERY_READ` and logged at WARN. Admin identities never read keys,
    /// whatever this says.
    #[serde(default)]
    pub allow_recovery_reads: bool,
    /// Where volume records live (default: redb in `state_dir`).
    #[serde(default)]
    pub store: StoreConfig,
    /// How the KEK is sealed (default: the KEK file `<state_dir>/kek`).
    #[serde(default)]
    pub seal: SealConfig,
}

/// Which store backend holds the volume records.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// One file (`<state_dir>/keys.redb`), one broker: the default.
    #[default]
    Redb,
    /// An etcd cluster, shared by several broker replicas.
    Etcd,
}

/// `[store]`: the key store. With `backend = "etcd"`, every replica that shares
/// `endpoints` and `prefix` serves the same volumes (and must load the same KEK).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `"redb"` (default) or `"etcd"`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd client URLs, `https://host:port` each (etcd only; required there).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix in etcd (default `/nodecrypt`): records under `<prefix>/volumes/`,
    /// metadata under `<prefix>/meta/`.
    #[serde(default = "store_prefix")]
    pub prefix: String,
    /// PEM CA certificate(s) etcd's certificates chain to (etcd only; required there).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate the broker presents to etcd (etcd only; required there).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (mode 0600; etcd only; required there).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Deadline of every etcd call in milliseconds (default 2000): past it the call is
    /// answered `UNAVAILABLE`, never from a stale copy.
    #[serde(default = "store_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redb,
            endpoints: Vec::new(),
            prefix: store_prefix(),
            ca: None,
            cert: None,
            key: None,
            timeout_ms: store_timeout_ms(),
        }
    }
}

fn store_prefix() -> String {
    "/nodecrypt".into()
}
fn store_timeout_ms() -> u64 {
    2000
}

impl StoreConfig {
    /// Checks the section; `Err(what is wrong)`.
    fn check(&self) -> Result<(), String> {
        let etcd_only = !self.endpoints.is_empty()
            || self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some();
        match self.backend {
            StoreBackend::Redb if etcd_only => Err(
                "[store] endpoints, ca, cert and key are for backend = \"etcd\"; the redb store \
                 lives in state_dir"
                    .into(),
            ),
            StoreBackend::Redb => Ok(()),
            StoreBackend::Etcd => {
                if self.endpoints.is_empty() {
                    return Err("[store] backend = \"etcd\" needs endpoints = \
                                [\"https://host:2379\", …], the cluster's client URLs"
                        .into());
                }
                if let Some(e) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
                    return Err(format!(
                        "[store] endpoint {e:?} is not https://: the broker talks to etcd over \
                         TLS with a client certificate only"
                    ));
                }
                for (name, v) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
                    if v.is_none() {
                        return Err(format!(
                            "[store] backend = \"etcd\" needs {name} (the broker authenticates \
                             to etcd with a client certificate: ca, cert and key)"
                        ));
                    }
                }
                if self.prefix.is_empty()
                    || !self.prefix.starts_with('/')
                    || self.prefix.ends_with('/')
                {
                    return Err(format!(
                        "[store] prefix {:?} must start with / and not end with one (e.g. \
                         \"/nodecrypt\")",
                        self.prefix
                    ));
                }
                if self.timeout_ms == 0 {
                    return Err(
                        "[store] timeout_ms = 0 would fail every call; leave it out \
                                for the default (2000)"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }

    /// The etcd client settings (`None` for the redb backend).
    pub fn etcd(&self) -> Option<crate::store::etcd::EtcdSettings> {
        match (self.backend, &self.ca, &self.cert, &self.key) {
            (StoreBackend::Etcd, Some(ca), Some(cert), Some(key)) => {
                Some(crate::store::etcd::EtcdSettings {
                    endpoints: self.endpoints.clone(),
                    prefix: self.prefix.clone(),
                    tls: TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        ca: ca.clone(),
                    },
                    timeout: std::time::Duration::from_millis(self.timeout_ms),
                })
            }
            _ => None,
        }
    }
}

/// `[seal]`: where the KEK comes from at start.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SealConfig {
    /// `kind = "file"`: the KEK is the file `<state_dir>/kek` (0600). For development and
    /// the demo: whoever reads the state directory holds every key.
    File {},
    /// `kind = "pkcs11"`: the KEK is stored only wrapped (AES-256-GCM) by a non-extractable
    /// key inside an HSM, in the store's metadata; unwrapped once, at start.
    Pkcs11(Pkcs11Config),
}

/// `[seal] kind = "pkcs11"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Label of the token that holds the wrapping key.
    pub token_label: String,
    /// Label of the wrapping key (an AES-256 secret key, sensitive, not extractable).
    pub key_label: String,
    /// File holding the token's user PIN (one line), mode 0600 or stricter, e.g. a
    /// systemd credential (`LoadCredentialEncrypted=`). Never argv or the environment.
    pub pin_file: PathBuf,
}

impl Default for SealConfig {
    fn default() -> Self {
        SealConfig::File {}
    }
}

impl SealConfig {
    /// `file` or `pkcs11`.
    pub fn kind(&self) -> &'static str {
        match self {
            SealConfig::File {} => "file",
            SealConfig::Pkcs11(_) => "pkcs11",
        }
    }
}

fn yes() -> bool {
    true
}
/// The longest group-commit delay a configuration may ask for.
pub const MAX_COMMIT_DELAY_US: u64 = 100_000;

fn commit_delay_us() -> u64 {
    1000
}
fn handshake_ms() -> u64 {
    10_000
}
fn request_ms() -> u64 {
    30_000
}
fn first_request_ms() -> u64 {
    10_000
}
fn idle_ms() -> u64 {
    300_000
}
fn max_connections() -> usize {
    4096
}

pub use nodecrypt_common::config::ConfigError;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |what: String| ConfigError::new(path, what);
        let cfg: Config = nodecrypt_common::config::load_toml(path)?;
        if cfg.audit_commit_delay_us > MAX_COMMIT_DELAY_US {
            return Err(err(format!(
                "audit_commit_delay_us = {} is more than {MAX_COMMIT_DELAY_US} ({} ms): every \
                 call made under load would wait that long for its audit line",
                cfg.audit_commit_delay_us,
                MAX_COMMIT_DELAY_US / 1000
            )));
        }
        if cfg.max_connections == 0 {
            return Err(err(
                "max_connections = 0 would refuse every client; leave it out for the default \
                 (4096)"
                    .into(),
            ));
        }
        for (name, ms) in [
            ("handshake_timeout_ms", cfg.handshake_timeout_ms),
            ("first_request_timeout_ms", cfg.first_request_timeout_ms),
            ("idle_timeout_ms", cfg.idle_timeout_ms),
        ] {
            if ms == 0 {
                return Err(err(format!(
                    "{name} = 0 would close every connection at once; leave it out for the \
                     default"
                )));
            }
        }
        cfg.store.check().map_err(err)?;
        if let SealConfig::Pkcs11(p) = &cfg.seal {
            for (name, v) in [("token_label", &p.token_label), ("key_label", &p.key_label)] {
                if v.is_empty() {
                    return Err(err(format!("[seal] {name} is empty")));
                }
            }
        }
        if cfg.trust_domain.is_empty() || cfg.trust_domain.contains('/') {
            return Err(err(format!(
                "trust_domain {:?} is not a domain name",
                cfg.trust_domain
            )));
        }
        Ok(cfg)
    }

    /// The audit log's group-commit delay.
    pub fn audit_commit_delay(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.audit_commit_delay_us)
    }

    /// The connection bounds of the listener.
    pub fn limits(&self) -> crate::conn::Limits {
        use std::time::Duration;
        crate::conn::Limits {
            handshake: Duration::from_millis(self.handshake_timeout_ms),
            first_request: Duration::from_millis(self.first_request_timeout_ms),
            idle: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
        }
    }

    /// The audit log path.
    pub fn audit_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\ntrust_domain = \"t\"\nstate_dir = \"/s\"\n{extra}\n\
                 [tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n"
            ),
        )
        .unwrap();
        Config::load(&path)
    }

    #[test]
    fn audit_defaults_are_durable_with_a_bounded_commit_delay() {
        let cfg = load("").unwrap();
        assert!(cfg.audit_fsync);
        assert_eq!(
            cfg.audit_commit_delay(),
            std::time::Duration::from_millis(1)
        );
        assert_eq!(
            load("audit_commit_delay_us = 0")
                .unwrap()
                .audit_commit_delay_us,
            0
        );
    }

    #[test]
    fn connection_bounds_and_recovery_reads_have_safe_defaults() {
        let cfg = load("").unwrap();
        assert!(!cfg.allow_recovery_reads);
        let l = cfg.limits();
        assert_eq!(l.max_connections, 4096);
        assert_eq!(l.first_request, std::time::Duration::from_secs(10));
        assert_eq!(l.idle, std::time::Duration::from_secs(300));
        assert!(load("max_connections = 0").is_err());
        assert!(load("first_request_timeout_ms = 0").is_err());
        assert!(
            load("max_connection = 5").is_err(),
            "unknown fields are refused"
        );
        let cfg = load("max_connections = 10\nallow_recovery_reads = true").unwrap();
        assert_eq!(cfg.limits().max_connections, 10);
        assert!(cfg.allow_recovery_reads);
    }

    #[test]
    fn the_store_is_redb_by_default_and_etcd_needs_endpoints_and_tls() {
        let cfg = load("").unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::Redb);
        assert!(cfg.store.etcd().is_none());
        let tls = "ca = \"/a\"\ncert = \"/c\"\nkey = \"/k\"";
        let e = load("[store]\nbackend = \"etcd\"").unwrap_err().to_string();
        assert!(e.contains("needs endpoints"), "{e}");
        let e = load("[store]\nbackend = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs ca"), "{e}");
        let e = load(&format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n{tls}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not https://"), "{e}");
        let e = load("[store]\nendpoints = [\"https://127.0.0.1:2379\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("are for backend = \"etcd\""), "{e}");
        assert!(
            load("[store]\nbackend = \"etcd\"\nendpoint = []").is_err(),
            "unknown fields are refused"
        );
        assert!(load("[store]\nbackend = \"consul\"").is_err());
        let cfg = load(&format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\", \
             \"https://127.0.0.1:2381\"]\nprefix = \"/rack-7\"\ntimeout_ms = 500\n{tls}"
        ))
        .unwrap();
        let s = cfg.store.etcd().unwrap();
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.prefix, "/rack-7");
        assert_eq!(s.timeout, std::time::Duration::from_millis(500));
        assert_eq!(s.tls.key, PathBuf::from("/k"));
        let e = load(&format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"https://h:1\"]\nprefix = \"/p/\"\n{tls}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn the_seal_defaults_to_the_kek_file_and_refuses_unknown_fields() {
        assert_eq!(load("").unwrap().seal, SealConfig::File {});
        assert_eq!(
            load("[seal]\nkind = \"file\"\n").unwrap().seal,
            SealConfig::File {}
        );
        assert!(
            load("[seal]\nkind = \"file\"\nmodule = \"/m.so\"\n").is_err(),
            "the file seal takes no HSM fields"
        );
        let p = "[seal]\nkind = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\n\
                 key_label = \"k\"\npin_file = \"/p\"\n";
        // The [seal] table goes after the top-level keys, before [tls].
        let cfg = load(p).unwrap();
        assert_eq!(cfg.seal.kind(), "pkcs11");
        assert!(
            load(&format!("{p}pin = \"1234\"\n")).is_err(),
            "no PIN in the config"
        );
        assert!(load("[seal]\nkind = \"tpm\"\n").is_err());
        assert!(load(&p.replace("key_label = \"k\"", "key_label = \"\"")).is_err());
    }

    #[test]
    fn a_commit_delay_over_100_ms_is_refused() {
        let e = load("audit_commit_delay_us = 100001").unwrap_err();
        assert!(
            e.to_string().contains("audit_commit_delay_us = 100001"),
            "{e}"
        );
        assert!(load("audit_commit_delay_us = 100000").is_ok());
    }
}
