//! The systemd units in `systemd/`: `systemd-analyze verify` is clean, the hardening
//! exposure scores stay under their limits, and the documented fstab entry gives the
//! mount unit the dependencies we promise (checked with the real
//! `systemd-fstab-generator`, and with a cycle check by `systemd-analyze verify`).
//!
//! Everything runs against a private root directory (`--root`): the host's unit files
//! (for `sysinit.target`, `network-online.target`, …), our units in `etc/systemd/system`
//! and executables at the `ExecStart=` paths. `verify` checks that those paths are
//! executable files and never runs them, so they are two-line scripts: what is under
//! test is the unit files, not the binaries.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nodecrypt_tests::run_with_deadline;

const OUR_UNITS: &[&str] = &[
    "nodecrypt-agent.service",
    "nodecrypt-unlock.service",
    "nodecrypt-volumes.target",
    "nodecrypt-keybroker.service",
    "nodecrypt-keybroker-init.service",
];

const BINARIES: &[&str] = &["nodecrypt-agent", "nodecrypt", "nodecrypt-keybroker"];

/// Every external command gets this long, then is killed and the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// Runs `cmd` to completion within [`DEADLINE`]; kills it and panics past that
/// (scripts/deps.sh installs systemd).
fn run(cmd: &mut Command) -> Output {
    run_with_deadline(cmd.stdin(Stdio::null()), DEADLINE)
}

/// A private root: the host's unit files, ours, and executables at our ExecStart paths.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodecrypt-systemd")
            .tempdir()
            .expect("tempdir");
        let root = Self { dir };
        let lib = root.path().join("usr/lib/systemd");
        fs::create_dir_all(&lib).unwrap();
        let out = run(Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(&lib));
        assert!(out.status.success(), "copy host units: {out:?}");
        // Host units link to /lib/systemd/...; resolve it inside the root as the host does.
        std::os::unix::fs::symlink("usr/lib", root.path().join("lib")).unwrap();
        let etc = root.path().join("etc/systemd/system");
        fs::create_dir_all(&etc).unwrap();
        for unit in OUR_UNITS {
            fs::copy(units_dir().join(unit), etc.join(unit))
                .unwrap_or_else(|e| panic!("systemd/{unit}: {e}"));
        }
        fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        for bin in BINARIES {
            let path = root.path().join("usr/bin").join(bin);
            fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::create_dir_all(root.path().join("run/systemd/system")).unwrap();
        root
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `systemd-analyze verify --root` on `units`; returns (success, stderr).
    fn verify(&self, units: &[&str]) -> (bool, String) {
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", self.path().display()))
            .arg("--man=no")
            .args(units)
            .env("SYSTEMD_LOG_LEVEL", "notice"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the real fstab generator on a one-line fstab; its units go to
    /// `run/systemd/system` of the root, where `verify` finds them.
    fn generate_fstab(&self, line: &str) -> PathBuf {
        let out_dir = self.path().join("run/systemd/system");
        fs::remove_dir_all(&out_dir).unwrap();
        fs::create_dir_all(&out_dir).unwrap();
        let fstab = self.path().join("fstab");
        fs::write(&fstab, format!("{line}\n")).unwrap();
        let early = self.path().join("run/systemd/generator.early");
        let late = self.path().join("run/systemd/generator.late");
        let out = run(
            Command::new("/usr/lib/systemd/system-generators/systemd-fstab-generator")
                .arg(&out_dir)
                .arg(&early)
                .arg(&late)
                .env("SYSTEMD_FSTAB", &fstab)
                .env("SYSTEMD_LOG_LEVEL", "err"),
        );
        assert!(out.status.success(), "fstab generator failed: {out:?}");
        out_dir
    }
}

/// Lines of `stderr` that are about our units or the test mount.
fn about_us(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("nodecrypt") || l.contains("srv-data"))
        .collect()
}

#[test]
fn units_verify_clean() {
    let root = Root::new();
    let (ok, stderr) = root.verify(OUR_UNITS);
    assert!(ok, "systemd-analyze verify failed:\n{stderr}");
    assert!(
        about_us(&stderr).is_empty(),
        "systemd-analyze verify warns about our units:\n{stderr}"
    );

    // The check has teeth: a missing ExecStart binary and a misspelt directive are caught.
    fs::remove_file(root.path().join("usr/bin/nodecrypt-agent")).unwrap();
    let unit = root
        .path()
        .join("etc/systemd/system/nodecrypt-keybroker.service");
    let text = fs::read_to_string(&unit).unwrap();
    fs::write(
        &unit,
        text.replacen("ProtectHostname=yes", "ProtectHostnme=yes", 1),
    )
    .unwrap();
    let (ok, stderr) = root.verify(OUR_UNITS);
    assert!(
        !ok,
        "verify passed with a missing ExecStart binary:\n{stderr}"
    );
    assert!(
        stderr.contains("/usr/bin/nodecrypt-agent is not executable"),
        "{stderr}"
    );
    assert!(stderr.contains("ProtectHostnme"), "{stderr}");
}

/// The overall exposure level `systemd-analyze security --offline=true` gives `unit`,
/// also checked against `limit` by the tool itself (`--threshold`, in tenths).
fn exposure(root: &Root, unit: &str, limit: f64) -> (f64, bool, String) {
    let out = run(Command::new("systemd-analyze")
        .arg("security")
        .arg("--offline=true")
        .arg(format!("--root={}", root.path().display()))
        .arg(format!("--threshold={}", (limit * 10.0).round() as u32))
        .arg("--no-pager")
        .arg(unit));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("Overall exposure level for {unit}: ");
    let score = text
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.to_string()))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level for {unit} in:\n{text}"));
    (score, out.status.success(), text)
}

#[test]
fn hardening_exposure_within_limits() {
    let root = Root::new();
    let limits = [
        ("nodecrypt-keybroker.service", 2.0),
        ("nodecrypt-agent.service", 4.5),
        ("nodecrypt-unlock.service", 2.0),
        ("nodecrypt-keybroker-init.service", 2.0),
    ];
    for (unit, limit) in limits {
        let (score, within, text) = exposure(&root, unit, limit);
        eprintln!("{unit}: exposure {score} (limit {limit})");
        assert!(
            score <= limit,
            "{unit}: exposure {score} > {limit}:\n{text}"
        );
        assert!(
            within,
            "{unit}: above --threshold by the tool's own measure:\n{text}"
        );
    }
    // A unit without our sandbox scores far worse: the measure is not vacuous.
    let bare = root.path().join("etc/systemd/system/bare.service");
    fs::write(
        &bare,
        "[Service]\nExecStart=/usr/bin/nodecrypt-agent --config /etc/nodecrypt/agent.toml\n",
    )
    .unwrap();
    let (score, within, text) = exposure(&root, "bare.service", 4.5);
    assert!(
        score > 9.0 && !within,
        "unhardened unit scored {score}:\n{text}"
    );
}

/// The fstab line documented in `nodecrypt-unlock.service` (and the README), with `<id>`
/// replaced by `vol1`.
fn documented_fstab_line() -> String {
    let find = |file: &str| -> String {
        let text = fs::read_to_string(units_dir().join(file)).unwrap();
        let line = text
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .find(|l| l.starts_with("/dev/mapper/nodecrypt-<id> "))
            .unwrap_or_else(|| panic!("systemd/{file} documents no fstab line"))
            .to_string();
        line
    };
    let in_unit = find("nodecrypt-unlock.service");
    assert_eq!(
        in_unit,
        find("README.md"),
        "the unit and the README document different fstab lines"
    );
    in_unit.replace("<id>", "vol1")
}

#[test]
fn fstab_entry_waits_for_unlock_without_cycles() {
    let root = Root::new();
    let line = documented_fstab_line();
    assert!(
        line.contains("nofail") && line.contains("_netdev"),
        "{line}"
    );
    let dir = root.generate_fstab(&line);

    let mount = fs::read_to_string(dir.join("srv-data.mount")).expect("generated mount unit");
    for dep in [
        "Requires=nodecrypt-unlock.service",
        "After=nodecrypt-unlock.service",
        "What=/dev/mapper/nodecrypt-vol1",
    ] {
        assert!(
            mount.lines().any(|l| l == dep),
            "mount unit lacks {dep}:\n{mount}"
        );
    }
    // _netdev: a remote mount, wanted (nofail: not required) by remote-fs.target.
    assert!(dir.join("remote-fs.target.wants/srv-data.mount").exists());
    assert!(!dir
        .join("remote-fs.target.requires/srv-data.mount")
        .exists());
    assert!(!dir.join("local-fs.target.wants/srv-data.mount").exists());
    let device = dir.join("dev-mapper-nodecrypt\\x2dvol1.device.d");
    let netdev = fs::read_to_string(device.join("50-netdev-dependencies.conf")).unwrap();
    assert!(netdev.contains("After=network-online.target"), "{netdev}");
    let timeout = fs::read_to_string(device.join("50-device-timeout.conf")).unwrap();
    assert!(timeout.contains("JobRunningTimeoutSec=5min"), "{timeout}");

    // The boot transaction (multi-user with the mount and our target) has no cycle.
    let units = [
        "srv-data.mount",
        "multi-user.target",
        "nodecrypt-volumes.target",
    ];
    let (ok, stderr) = root.verify(&units);
    assert!(ok && about_us(&stderr).is_empty(), "{stderr}");
    assert!(!stderr.contains("ordering cycle"), "{stderr}");

    // Without nofail,_netdev the mount is required by local-fs.target, which unlock
    // comes after: verify reports the cycle, so the check above is not vacuous.
    let local = line.replace("nofail,_netdev,", "");
    root.generate_fstab(&local);
    let (_, stderr) = root.verify(&units);
    assert!(
        stderr.contains("ordering cycle") && stderr.contains("nodecrypt-unlock.service"),
        "no cycle reported for a local-fs mount requiring unlock:\n{stderr}"
    );
}
