//! Running the real binaries: where they are, commands run to completion within a
//! deadline, processes that announce readiness on their first stdout line, and reaping
//! with a deadline. Tests and benches share these, so every wait here is bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::Signal;

/// `target/<profile>/` of the running test or bench executable (which cargo put in its
/// `deps/`): where the workspace's binaries of the same build are.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..")
        .to_path_buf()
}

/// Path of a workspace binary in the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`make test` runs `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// Sends `sig` to process `pid`, ignoring a process already gone.
fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Runs `cmd` to completion with its stdout and stderr captured (stdin as the caller set
/// it) and returns how it ended, whatever its exit status. Past `deadline` it is
/// SIGKILLed and this panics.
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}")),
        Err(_) => {
            signal(pid, Signal::SIGKILL);
            panic!("{cmd:?} did not finish within {deadline:?}");
        }
    }
}

/// Runs a command to completion (no deadline); panics with its output if it fails, and
/// returns its stdout followed by its stderr.
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

/// Spawns `cmd` with its stdout piped and waits up to `deadline` for the first line it
/// writes there (the broker's and the agent's readiness announcement). Returns the child
/// and that line, which is empty if the process closed its stdout first or the deadline
/// passed; the child is the caller's to reap either way.
pub fn spawn_ready(cmd: &mut Command, deadline: Duration) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(deadline).unwrap_or_default();
    (child, line)
}

/// Waits for `child` to exit within `within`; SIGKILLs it (and returns `None`) otherwise.
pub fn wait_with_deadline(mut child: Child, within: Duration) -> Option<ExitStatus> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(within) {
        Ok(st) => st.ok(),
        Err(_) => {
            signal(pid, Signal::SIGKILL);
            let _ = waiter.join();
            None
        }
    }
}

/// Stops `child` with SIGTERM and reaps it, SIGKILLing it (and returning `None`) if it
/// has not exited within `within`.
pub fn stop_within(child: Child, within: Duration) -> Option<ExitStatus> {
    signal(child.id(), Signal::SIGTERM);
    wait_with_deadline(child, within)
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

/// Runs a prepared CLI command with a 5-minute deadline.
pub fn run_cli(mut cmd: Command) -> CliOut {
    let out = run_with_deadline(&mut cmd, Duration::from_secs(300));
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
