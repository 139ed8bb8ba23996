//! The agent process of a test: its config in the test's [`Env`], started until it
//! announces its socket, the `nodecrypt` CLI against it, and crash or graceful stop.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::pki::{Env, TRUST_DOMAIN};
use crate::process::{bin, run_cli, spawn_ready, stop_within, wait_with_deadline, CliOut};

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
            .stderr(stderr);
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let (mut child, line) = spawn_ready(&mut cmd, Duration::from_secs(60));
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
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
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
            let _ = stop_within(c, Duration::from_secs(15));
        }
    }
}
