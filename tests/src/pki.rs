//! Each test's private directory and dev PKI: [`Env`], the TLS files of its identities,
//! and broker clients speaking as them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodecrypt_keybroker::{client, tls};
use nodecrypt_proto::keybroker::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::Channel;

use crate::broker::Broker;
use crate::process::{bin, run_ok};

/// The trust domain of every test PKI.
pub const TRUST_DOMAIN: &str = "nodecrypt.test";

/// A test directory with a dev PKI (nodes n1, n2, n3; admin ops; recovery officer).
pub struct Env {
    /// Owns the temporary directory.
    pub dir: tempfile::TempDir,
    /// Extra top-level TOML lines of the broker config (see [`Env::set_broker_extra`]).
    pub(crate) broker_extra: Mutex<String>,
}

impl Env {
    /// A new directory and PKI.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodecrypt-e2e")
            .tempdir()
            .expect("tempdir");
        let env = Self {
            dir,
            broker_extra: Mutex::new(String::new()),
        };
        run_ok(
            Command::new(bin("nodecrypt-keybroker"))
                .args(["pki", "init", "--dir"])
                .arg(env.pki())
                .args([
                    "--trust-domain",
                    TRUST_DOMAIN,
                    "--node",
                    "n1",
                    "--node",
                    "n2",
                    "--node",
                    "n3",
                    "--admin",
                    "ops",
                    "--recovery",
                    "officer",
                ]),
        );
        env
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.path().join("pki")
    }

    /// TLS files of an identity stem (`node-n1`, `admin-ops`, `broker`).
    pub fn tls_files(&self, stem: &str) -> tls::TlsFiles {
        tls::TlsFiles {
            cert: self.pki().join(format!("{stem}.pem")),
            key: self.pki().join(format!("{stem}.key")),
            ca: self.pki().join("ca.pem"),
        }
    }

    /// The broker's state directory.
    pub fn state(&self) -> PathBuf {
        self.path().join("broker-state")
    }

    /// A broker client speaking as `stem` (`node-n1`, `admin-ops`).
    pub fn client(&self, broker: &Broker, stem: &str) -> KeyBrokerClient<Channel> {
        let cfg = tls::client_config(&self.tls_files(stem)).expect("client TLS config");
        client_for(&broker.addr, Arc::new(cfg))
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// A client for `addr` with `cfg`.
pub fn client_for(addr: &str, cfg: Arc<rustls::ClientConfig>) -> KeyBrokerClient<Channel> {
    let deadlines = client::Deadlines {
        connect: Duration::from_secs(5),
        request: Duration::from_secs(20),
    };
    KeyBrokerClient::new(client::channel(addr, cfg, deadlines).expect("channel"))
}
