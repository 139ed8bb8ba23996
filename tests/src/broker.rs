//! The broker process of a test: its config in the test's [`Env`], started (after `init`
//! if the state has no KEK) until it announces its address, and stopped or killed.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::pki::{Env, TRUST_DOMAIN};
use crate::process::{bin, run_cli, run_ok, spawn_ready, CliOut};

impl Env {
    /// Runs `nodecrypt-keybroker admin --json` against `broker` with the admin identity
    /// (`admin-ops`), e.g. `["describe", "vol-a"]` or `["destroy", "vol-a", "--yes"]`.
    pub fn admin_cli(&self, broker: &Broker, args: &[&str]) -> CliOut {
        let t = self.tls_files("admin-ops");
        let mut cmd = Command::new(bin("nodecrypt-keybroker"));
        cmd.args(["admin", "--json", "--endpoint", &broker.addr])
            .arg("--cert")
            .arg(&t.cert)
            .arg("--key")
            .arg(&t.key)
            .arg("--ca")
            .arg(&t.ca)
            .args(args);
        run_cli(cmd)
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
        cmd.args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("NODECRYPT_LOG", "debug")
            .stderr(stderr);
        let (mut child, line) = spawn_ready(&mut cmd, Duration::from_secs(60));
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
    pub fn stop_status(mut self) -> ExitStatus {
        self.terminate().expect("wait for the broker")
    }

    /// SIGTERM and reap, once: a broker already reaped (stopped, killed, or dropped after
    /// either) is not signalled again, since its pid may belong to another process by now.
    fn terminate(&mut self) -> std::io::Result<ExitStatus> {
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
