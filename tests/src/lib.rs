//! Harness for the end-to-end tests in `tests/tests/`: runs the real binaries (built by
//! `make test` before the tests), waits for readiness (never sleeps), and gives each
//! test a private directory, PKI and broker on 127.0.0.1 with a kernel-chosen port.
//! [`luks2`] is an independent LUKS2 header codec for building hostile images.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nodecrypt_keybroker::{client, tls};
use nodecrypt_proto::keybroker::v1::key_broker_client::KeyBrokerClient;
use tonic::transport::Channel;

pub mod etcd;
pub mod luks2;

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

/// A test directory with a dev PKI (nodes n1, n2, n3; admin ops; recovery officer).
pub struct Env {
    /// Owns the temporary directory.
    pub dir: tempfile::TempDir,
    /// Extra top-level TOML lines of the broker config (see [`Env::set_broker_extra`]).
    broker_extra: std::sync::Mutex<String>,
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
            broker_extra: std::sync::Mutex::new(String::new()),
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

    /// Writes the broker config (port 0) and returns its path.
    pub fn broker_config(&self) -> PathBuf {
        self.broker_config_on("127.0.0.1:0")
    }

    /// Top-level TOML lines (e.g. `max_connections = 10`) added to every broker config
    /// written from now on.
    pub fn set_broker_extra(&self, toml: &str) {
        *self.broker_extra.lock().unwrap_or_else(|p| p.into_inner()) = toml.to_string();
    }

    /// Writes the broker config listening on `listen` and returns its path.
    pub fn broker_config_on(&self, listen: &str) -> PathBuf {
        let path = self.path().join("broker.toml");
        let t = self.tls_files("broker");
        let extra = self
            .broker_extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        fs::write(
            &path,
            format!(
                "listen = \"{listen}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{}\"\n{extra}\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
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
        self.try_start_broker_on("127.0.0.1:0")
    }

    /// Starts the broker on `listen`; `Err(stderr)` if it exits before it is ready.
    pub fn try_start_broker_on(&self, listen: &str) -> Result<Broker, String> {
        self.try_start_broker_via(listen, &[])
    }

    /// Starts the broker on `listen` through `wrapper` (a command that runs the rest of
    /// its arguments, e.g. `setpriv …`; empty: directly).
    pub fn try_start_broker_via(&self, listen: &str, wrapper: &[&str]) -> Result<Broker, String> {
        if !self.state().join("kek").exists() {
            run_ok(
                Command::new(bin("nodecrypt-keybroker"))
                    .args(["init", "--state-dir"])
                    .arg(self.state()),
            );
        }
        let config = self.broker_config_on(listen);
        let log = self.path().join("broker.log");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("broker log");
        let mut cmd = match wrapper {
            [] => Command::new(bin("nodecrypt-keybroker")),
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("nodecrypt-keybroker"));
                c
            }
        };
        let mut child = cmd
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
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (a crash: nothing is flushed or closed) and reaps it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it gracefully and waits.
    pub fn stop(mut self) {
        let _ = self.terminate();
    }

    /// Sends SIGTERM and returns how it ended.
    pub fn stop_status(mut self) -> std::process::ExitStatus {
        self.terminate().expect("wait for the broker")
    }

    /// SIGTERM and reap, once: a broker already reaped (stopped, killed, or dropped after
    /// either) is not signalled again, since its pid may belong to another process by now.
    fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Asserts two keys are equal without printing either (`assert_eq!` would put the key
/// bytes in the test log when it fails).
pub fn assert_same_key(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: the keys differ ({} and {} bytes; first difference at byte {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// Asserts two keys differ, without printing them.
pub fn assert_other_key(what: &str, a: &[u8], b: &[u8]) {
    assert!(a != b, "{what}: the same {}-byte key twice", a.len());
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

/// Options of an agent started by a test.
#[derive(Clone)]
pub struct AgentOpts {
    /// Node identity (`n1`).
    pub node: String,
    /// `dm-crypt`, `userspace` or `auto`.
    pub backend: String,
    /// Broker retry deadline.
    pub unlock_deadline: String,
    /// Files unlock-all scans.
    pub file_devices: Vec<PathBuf>,
    /// Serve the admin TCP listener too.
    pub tcp: bool,
    /// Extra environment (e.g. FAILPOINTS), for the failpoints build.
    pub env: Vec<(String, String)>,
    /// Binary name (`nodecrypt-agent`, or `nodecrypt-agent-failpoints`).
    pub binary: String,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            node: "n1".into(),
            backend: "userspace".into(),
            unlock_deadline: "20s".into(),
            file_devices: Vec::new(),
            tcp: false,
            env: Vec::new(),
            binary: "nodecrypt-agent".into(),
        }
    }
}

/// A running agent; SIGTERM and reaped on drop.
pub struct Agent {
    child: Option<Child>,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its TCP listener (`127.0.0.1:PORT`), if asked for.
    pub tcp: Option<String>,
    /// Its stderr (JSON logs), appended across restarts.
    pub log: PathBuf,
    /// Its run directory.
    pub run_dir: PathBuf,
}

impl Env {
    /// Writes an agent config for `broker_addr` and returns its path.
    pub fn agent_config(&self, broker_addr: &str, o: &AgentOpts) -> PathBuf {
        let dir = self.path().join(format!("agent-{}", o.node));
        fs::create_dir_all(&dir).expect("agent dir");
        let t = self.tls_files(&format!("node-{}", o.node));
        let files = o
            .file_devices
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!(
            "socket = \"{}\"\nrun_dir = \"{}\"\nbackend = \"{}\"\nunlock_deadline = \"{}\"\nallow_file_devices = true\nfile_devices = [{files}]\n\n[broker]\nendpoint = \"{broker_addr}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nrequest_timeout = \"3s\"\n",
            dir.join("agent.sock").display(),
            dir.join("run").display(),
            o.backend,
            o.unlock_deadline,
            t.cert.display(),
            t.key.display(),
            t.ca.display(),
        );
        if o.tcp {
            let s = self.tls_files("broker");
            text += &format!(
                "\n[tcp]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n",
                s.cert.display(),
                s.key.display(),
                s.ca.display()
            );
        }
        let path = dir.join("agent.toml");
        fs::write(&path, text).expect("write agent config");
        path
    }

    /// Starts an agent against `broker_addr` and waits until it serves.
    pub fn start_agent(&self, broker_addr: &str, o: &AgentOpts) -> Agent {
        let config = self.agent_config(broker_addr, o);
        let dir = config.parent().expect("dir").to_path_buf();
        let log = dir.join("agent.log");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let mut cmd = Command::new(bin(&o.binary));
        cmd.arg("--config")
            .arg(&config)
            .env("NODECRYPT_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent did not start:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Agent {
            child: Some(child),
            socket: PathBuf::from(ready["socket"].as_str().expect("socket")),
            tcp: ready["tcp"].as_str().map(str::to_string),
            log,
            run_dir: dir.join("run"),
        }
    }
}

/// The result of one CLI run.
#[derive(Debug)]
pub struct CliOut {
    /// Exit code.
    pub code: i32,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl CliOut {
    /// Stdout parsed as JSON (panics with the output otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Asserts exit 0 and returns self.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }
}

impl Agent {
    /// Runs `nodecrypt --socket S ARGS...` to completion (deadline 5 minutes).
    pub fn cli(&self, args: &[&str]) -> CliOut {
        let mut cmd = Command::new(bin("nodecrypt"));
        cmd.arg("--socket").arg(&self.socket).args(args);
        run_cli(cmd)
    }

    /// Kills the agent with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to exit by itself (e.g. a failpoint) within `within`; kills it
    /// and returns `None` if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.take()?;
        wait_with_deadline(c, within)
    }

    /// Its logs so far.
    pub fn logs(&self) -> Vec<u8> {
        fs::read(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = wait_with_deadline(c, Duration::from_secs(15));
        }
    }
}

/// Waits for `child` to exit within `within`; SIGKILLs it (and returns `None`) otherwise.
pub fn wait_with_deadline(mut child: Child, within: Duration) -> Option<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(within) {
        Ok(st) => st.ok(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            None
        }
    }
}

/// Runs a prepared CLI command with a 5-minute deadline.
pub fn run_cli(mut cmd: Command) -> CliOut {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nodecrypt");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(o) => o.expect("wait nodecrypt"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("nodecrypt {cmd:?} did not finish within 5 minutes");
        }
    };
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A sparse file of `mib` MiB at `path`.
pub fn sparse_file(path: &Path, mib: u64) -> PathBuf {
    let f = fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
    path.to_path_buf()
}

/// SHA-256 of a whole file, hex.
pub fn file_hash(path: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(path).expect("open for hash");
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// A loop device over `file`, detached on drop.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDev {
    /// Attaches `file`.
    pub fn attach(file: &Path) -> LoopDev {
        let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        LoopDev {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The broker's key of `volume_id` (version 0 = current), fetched as the node the volume
/// is bound to (admins manage volumes and never read keys): the admin identity describes
/// the volume to learn its node, then that node's identity fetches the key.
pub fn node_key(env: &Env, broker: &Broker, volume_id: &str, version: u64) -> Vec<u8> {
    use nodecrypt_proto::keybroker::v1 as pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let node = env
            .client(broker, "admin-ops")
            .describe_volume(pb::DescribeVolumeRequest {
                volume_id: volume_id.to_string(),
            })
            .await
            .expect("admin DescribeVolume")
            .into_inner()
            .node_id;
        env.client(broker, &format!("node-{node}"))
            .get_volume_key(pb::GetVolumeKeyRequest {
                volume_id: volume_id.to_string(),
                version,
            })
            .await
            .unwrap_or_else(|e| panic!("node {node} GetVolumeKey {volume_id}: {e}"))
            .into_inner()
            .key
    })
}

/// A small ext4 filesystem in a file, attached to a loop device and mounted at
/// `mountpoint`; unmounted and detached on drop. Lets a test fill a filesystem.
pub struct SmallFs {
    /// The mount point.
    pub mountpoint: PathBuf,
    loop_dev: Option<LoopDev>,
}

impl SmallFs {
    /// Makes a `mib`-MiB ext4 (no reserved blocks) in `image` and mounts it at
    /// `mountpoint` (created if missing).
    pub fn new(image: &Path, mountpoint: &Path, mib: u64) -> SmallFs {
        sparse_file(image, mib);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(image),
        );
        let dev = LoopDev::attach(image);
        fs::create_dir_all(mountpoint).expect("mount point");
        run_ok(Command::new("mount").arg(&dev.path).arg(mountpoint));
        SmallFs {
            mountpoint: mountpoint.to_path_buf(),
            loop_dev: Some(dev),
        }
    }

    /// Writes `path` until the filesystem is full (ENOSPC); returns the bytes written.
    pub fn fill(&self, path: &Path) -> u64 {
        use std::io::Write;
        let mut f = fs::File::create(path).expect("create filler");
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
        // Smaller writes take the last partial blocks too.
        let small = [0x5au8; 512];
        while let Ok(n) = f.write(&small) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        drop(self.loop_dev.take());
    }
}

/// Whether the real `cryptsetup open --test-passphrase` accepts `key` for `dev` (the key
/// goes through a 0600 file in the test's own directory, removed at once).
pub fn cryptsetup_opens(env: &Env, dev: &Path, key: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let kf = env.path().join("keyfile");
    fs::write(&kf, key).expect("write key file");
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).expect("chmod key file");
    let ok = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&kf)
        .arg(dev)
        .status()
        .expect("run cryptsetup")
        .success();
    fs::remove_file(&kf).expect("remove key file");
    ok
}
