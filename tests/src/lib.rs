//! Harness for the end-to-end tests in `tests/tests/`: runs the real binaries (built by
//! `make test` before the tests), waits for readiness (never sleeps), and gives each
//! test a private directory, PKI and broker on 127.0.0.1 with a kernel-chosen port.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nodecrypt_keybroker::{client, tls};
use nodecrypt_proto::keybroker::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::Channel;

/// The trust domain of every test PKI.
pub const TRUST_DOMAIN: &str = "nodecrypt.test";

/// Path of a workspace binary in the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`make test` runs `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A test directory with a dev PKI (nodes n1, n2, n3; admin ops).
pub struct Env {
    /// Owns the temporary directory.
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A new directory and PKI.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodecrypt-e2e")
            .tempdir()
            .expect("tempdir");
        let env = Self { dir };
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

    /// Writes the broker config (port 0) and returns its path.
    pub fn broker_config(&self) -> PathBuf {
        let path = self.path().join("broker.toml");
        let t = self.tls_files("broker");
        fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
                self.state().display(),
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            ),
        )
        .expect("write broker config");
        path
    }

    /// Starts the broker (running `init` first if the state has no KEK).
    pub fn start_broker(&self) -> Broker {
        self.try_start_broker()
            .unwrap_or_else(|e| panic!("broker did not start: {e}"))
    }

    /// Starts the broker; `Err(stderr)` if it exits before it is ready.
    pub fn try_start_broker(&self) -> Result<Broker, String> {
        if !self.state().join("kek").exists() {
            run_ok(
                Command::new(bin("nodecrypt-keybroker"))
                    .args(["init", "--state-dir"])
                    .arg(self.state()),
            );
        }
        let config = self.broker_config();
        let log = self.path().join("broker.log");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("broker log");
        let mut child = Command::new(bin("nodecrypt-keybroker"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("NODECRYPT_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let addr = ready["listen"]
            .as_str()
            .expect("listen address")
            .to_string();
        Ok(Broker { child, addr, log })
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

/// A running broker process; stopped (SIGTERM, then reaped) on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Its stderr (JSON logs).
    pub log: PathBuf,
}

impl Broker {
    /// Stops it gracefully and waits.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Asserts that none of `keys` appears in `haystack` raw, as lower or upper hex, or as
/// any 16-byte window of the key (partial leaks).
pub fn assert_no_key_material(what: &str, haystack: &[u8], keys: &[Vec<u8>]) {
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    for key in keys {
        assert!(!key.is_empty());
        let hexed = hex::encode(key);
        for w in key.windows(16) {
            assert!(
                !haystack.windows(16).any(|h| h == w),
                "{what}: contains raw key bytes"
            );
        }
        for start in (0..hexed.len().saturating_sub(32)).step_by(2) {
            assert!(
                !text.contains(&hexed[start..start + 32]),
                "{what}: contains key bytes in hex"
            );
        }
        // Decimal byte lists, as a Debug print of Vec<u8> would show them.
        let dec = key[..8]
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            !text.contains(&dec),
            "{what}: contains key bytes as a Debug list"
        );
    }
}
