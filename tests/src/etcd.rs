//! A real etcd cluster for the broker's scale-out store tests: three members of Debian's
//! `etcd-server` (3.4) on 127.0.0.1 ports the kernel chose, client and peer TLS with
//! certificates required on both, in a private temporary directory. Readiness is polled
//! with `etcdctl endpoint health` under a deadline; every member is killed and reaped on
//! drop.
//!
//! The certificates come from the broker's own dev PKI code (a CA of their own, apart
//! from the nodes' CA): the `broker` certificate (serverAuth and clientAuth, SANs
//! 127.0.0.1 and localhost) is every member's server and peer certificate, and
//! `admin-keybroker` is the client certificate the brokers and `etcdctl` present.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nodecrypt_keybroker::pki;
use nodecrypt_keybroker::store::etcd::EtcdSettings;
use nodecrypt_keybroker::tls::TlsFiles;

/// Members of every test cluster.
pub const MEMBERS: usize = 3;

/// How long a cluster (or a restarted member) may take to become healthy.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// Path of an etcd binary; panics with what to install when it is missing.
fn etcd_bin(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is missing: the etcd store tests run a real cluster; install Debian's \
         etcd-server and etcd-client packages (scripts/deps.sh does)"
    );
}

/// Ports the kernel considers free right now: all bound at once (so distinct), then
/// released for etcd to take.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running three-member etcd cluster with TLS; killed and reaped on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts a cluster and waits until every member is healthy.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodecrypt-etcd")
            .tempdir()
            .expect("tempdir");
        pki::init(&pki::PkiRequest {
            dir: dir.path().join("pki"),
            trust_domain: "etcd.test".into(),
            nodes: Vec::new(),
            admins: vec!["keybroker".into()],
            recovery: Vec::new(),
            broker_dns: Vec::new(),
        })
        .expect("etcd PKI");
        let ports = free_ports(2 * MEMBERS);
        let members = (0..MEMBERS)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let mut cluster = Self { dir, members };
        for i in 0..MEMBERS {
            cluster.spawn(i);
        }
        cluster.wait_healthy(&(0..MEMBERS).collect::<Vec<_>>());
        cluster
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The client certificate, key and CA a broker presents to etcd.
    pub fn client_tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.pki().join("admin-keybroker.pem"),
            key: self.pki().join("admin-keybroker.key"),
            ca: self.pki().join(pki::files::CA_CERT),
        }
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(|i| self.endpoint(i)).collect()
    }

    /// Store settings for a client of this cluster under `prefix`.
    pub fn settings(&self, prefix: &str, timeout: Duration) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.endpoints(),
            prefix: prefix.to_string(),
            tls: self.client_tls(),
            timeout,
        }
    }

    /// The broker config's `[store]` section for this cluster under `prefix`.
    pub fn store_toml(&self, prefix: &str, timeout_ms: u64) -> String {
        let t = self.client_tls();
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"{prefix}\"\nca = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\ntimeout_ms = {timeout_ms}\n",
            endpoints.join(", "),
            t.ca.display(),
            t.cert.display(),
            t.key.display()
        )
    }

    fn spawn(&mut self, i: usize) {
        let pki = self.pki();
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(format!("{}.etcd", m.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("member log");
        let (cert, key) = (pki.join("broker.pem"), pki.join("broker.key"));
        let ca = pki.join(pki::files::CA_CERT);
        let client = format!("https://127.0.0.1:{}", m.client_port);
        let peer = format!("https://127.0.0.1:{}", m.peer_port);
        let child = Command::new(etcd_bin("etcd"))
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "nodecrypt-test"])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-client-cert-auth")
            // Short raft timers: a lost leader is replaced within about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Runs `etcdctl` with the client certificate against `endpoints`.
    pub fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Output {
        let t = self.client_tls();
        Command::new(etcd_bin("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--cacert={}", t.ca.display()))
            .arg(format!("--cert={}", t.cert.display()))
            .arg(format!("--key={}", t.key.display()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// Waits until each of `members` answers `endpoint health` (a quorum read through
    /// it), or panics with the members' logs after [`HEALTHY_WITHIN`].
    pub fn wait_healthy(&self, members: &[usize]) {
        let endpoints: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let out = self.etcdctl(&endpoints, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd members {members:?} not healthy within {HEALTHY_WITHIN:?}:\n{}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.logs()
                );
            }
            // Polling interval of a readiness check under a deadline.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the current leader, as the running members report it.
    pub fn leader(&self) -> usize {
        let running: Vec<usize> = (0..MEMBERS)
            .filter(|&i| self.members[i].child.is_some())
            .collect();
        let endpoints: Vec<String> = running.iter().map(|&i| self.endpoint(i)).collect();
        let out = self.etcdctl(&endpoints, &["endpoint", "status", "-w", "json"]);
        assert!(
            out.status.success(),
            "etcdctl endpoint status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("endpoint status JSON");
        let rows = status.as_array().expect("array of endpoints");
        let leader = rows[0]["Status"]["leader"].as_u64().expect("leader id");
        for row in rows {
            if row["Status"]["header"]["member_id"].as_u64() == Some(leader) {
                let ep = row["Endpoint"].as_str().expect("endpoint");
                return (0..MEMBERS)
                    .find(|&i| self.endpoint(i) == ep)
                    .expect("leader is a member");
            }
        }
        panic!("no running member is the leader {leader}: {status}");
    }

    /// Kills member `i` with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// Every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {} (last lines) ---\n", m.name));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..MEMBERS {
            self.kill9(i);
        }
    }
}
