//! The host side of the VM harness: builds (through the scripts in `tests/vm/`) the
//! kernel, the initramfs and the root image, boots QEMU one guest at a time, and reads
//! the guest's results back from its serial console and its disk images.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nodecrypt_tests::bin;
use sha2::{Digest, Sha256};

/// The project's binaries every guest gets.
pub const BINARIES: [&str; 3] = ["nodecrypt-keybroker", "nodecrypt-agent", "nodecrypt"];

/// `tests/vm/`: the scripts, the guest init and the guest scenarios.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
}

/// `target/vm/`: the cache of the kernel, the root tree and the initramfs.
pub fn vm_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/vm-<hash> → target/
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target directory above target/<profile>/deps");
    target.join("vm")
}

/// Runs `cmd` under `timeout(1)`, so it cannot outlive `limit`; returns its stdout and
/// panics with its output if it fails or times out.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> String {
    let mut wrapped = Command::new("timeout");
    wrapped
        .arg("--kill-after=5")
        .arg(format!("{}", limit.as_secs()))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped.env("VM_DIR", vm_dir());
    let started = Instant::now();
    let out = wrapped
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed after {:.1?} ({}; 124 = timed out after {limit:?}):\n{stdout}{stderr}",
        started.elapsed(),
        out.status
    );
    stdout
}

fn script(name: &str) -> Command {
    Command::new(scripts().join(name))
}

/// The kernel and initramfs, built once per test process.
pub struct Vm {
    /// The cloud kernel's directory (vmlinuz, lib/modules, kver).
    pub kernel: PathBuf,
    /// The initramfs with busybox, the modules, the binaries and the scenarios.
    pub initramfs: PathBuf,
}

/// One guest at a time: the machine has two cores.
static BOOT_LOCK: Mutex<()> = Mutex::new(());

/// Holds the boot lock (a failed test that held it does not block the others).
pub fn boot_lock() -> MutexGuard<'static, ()> {
    BOOT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vm {
    /// The shared kernel + initramfs (fetched/built on first use).
    pub fn get() -> &'static Vm {
        static VM: OnceLock<Vm> = OnceLock::new();
        VM.get_or_init(|| {
            let kernel = run_limited(&mut script("kernel.sh"), Duration::from_secs(300));
            let kernel = PathBuf::from(kernel.trim());
            let initramfs = vm_dir().join("initramfs.cpio");
            let mut cmd = script("initramfs.sh");
            cmd.arg(&kernel).arg(&initramfs);
            for b in BINARIES {
                cmd.arg(bin(b));
            }
            run_limited(&mut cmd, Duration::from_secs(300));
            Vm { kernel, initramfs }
        })
    }

    /// The Debian root tree (debootstrap, cached).
    pub fn rootfs(&self) -> PathBuf {
        let out = run_limited(
            script("rootfs.sh").arg(&self.kernel),
            Duration::from_secs(480),
        );
        PathBuf::from(out.trim())
    }

    /// Boots the initramfs guest running scenario `name` with `disks` (vda, vdb, ...),
    /// the console in `dir/<name>.console`. Panics (with the console's tail) unless the
    /// scenario ends with `NCVM:END rc=0` within `limit`.
    pub fn run_scenario(
        &self,
        dir: &Path,
        name: &str,
        disks: &[&Path],
        limit: Duration,
    ) -> Console {
        let console = self.boot(
            dir,
            name,
            &format!("nc.scenario={name}"),
            &self.initramfs,
            disks,
            limit,
        );
        console.assert_end_ok();
        console
    }

    /// Boots once; returns the console whatever the guest did (the caller asserts).
    pub fn boot(
        &self,
        dir: &Path,
        name: &str,
        append: &str,
        initrd: &Path,
        disks: &[&Path],
        limit: Duration,
    ) -> Console {
        let log = dir.join(format!("{name}.console"));
        let mut cmd = script("boot.sh");
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(initrd)
            .arg("--console")
            .arg(&log)
            .arg("--timeout")
            .arg(limit.as_secs().to_string())
            .arg("--append")
            .arg(append);
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        cmd.env("VM_DIR", vm_dir());
        let _guard = boot_lock();
        let started = Instant::now();
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("spawn boot.sh: {e}"));
        let elapsed = started.elapsed();
        let text = fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned());
        let console = Console {
            name: name.to_string(),
            text: text.unwrap_or_default(),
        };
        eprintln!("vm: {name}: guest ran {elapsed:.1?} ({status})");
        for line in console.text.lines() {
            if let Some(i) = line.find("NCVM:") {
                if !line[i..].starts_with("NCVM:LOG") {
                    eprintln!("vm: {name}: {}", line[i..].trim_end());
                }
            }
        }
        if !status.success() {
            console.fail(&format!(
                "qemu exited with {status} after {elapsed:.1?} (124 = the {limit:?} timeout)"
            ));
        }
        console
    }
}

/// A guest's serial console.
pub struct Console {
    /// The scenario or boot name.
    pub name: String,
    /// Everything the guest printed.
    pub text: String,
}

impl Console {
    /// Panics with `why` and the last lines of the console.
    pub fn fail(&self, why: &str) -> ! {
        let lines: Vec<&str> = self.text.lines().collect();
        let markers: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("NCVM:"))
            .collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!(
            "guest {}: {why}\n--- guest report ---\n{}\n--- console tail ---\n{tail}\n--- end ---",
            self.name,
            markers.join("\n")
        );
    }

    /// The rest of every line that carries `NCVM:<tag> `, in order.
    pub fn markers(&self, tag: &str) -> Vec<String> {
        let needle = format!("NCVM:{tag} ");
        self.text
            .lines()
            .filter_map(|l| {
                l.find(&needle)
                    .map(|i| l[i + needle.len()..].trim().to_string())
            })
            .collect()
    }

    /// The one `NCVM:<tag> <key> <value>` line for `key`.
    pub fn marker(&self, tag: &str, key: &str) -> String {
        let found: Vec<String> = self
            .markers(tag)
            .into_iter()
            .filter_map(|m| m.strip_prefix(&format!("{key} ")).map(str::to_string))
            .collect();
        if found.len() != 1 {
            self.fail(&format!(
                "expected one NCVM:{tag} {key} line, found {found:?}"
            ));
        }
        found.into_iter().next().unwrap_or_default()
    }

    /// Asserts the guest's scenario ended with rc=0.
    pub fn assert_end_ok(&self) {
        match self.markers("END").last().map(String::as_str) {
            Some("rc=0") => {}
            Some(other) => self.fail(&format!("scenario failed: {other}")),
            None => self.fail("no NCVM:END line: the guest did not finish its scenario"),
        }
    }
}

/// Writes `size` bytes of zeros as a sparse raw disk image.
pub fn raw_disk(path: &Path, size: u64) {
    let f = fs::File::create(path).expect("create disk image");
    f.set_len(size).expect("size disk image");
}

/// An ext4 image of `size_mib` holding the tree `dir` (mkfs.ext4 -d).
pub fn ext4_image(dir: &Path, img: &Path, size_mib: u64) {
    raw_disk(img, size_mib << 20);
    run_limited(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(img),
        Duration::from_secs(120),
    );
}

/// Copies the directory `from` (absolute, in the ext4 image `img`) to `to` on the host.
pub fn ext4_read_dir(img: &Path, from: &str, to: &Path) {
    fs::create_dir_all(to).expect("create rdump target");
    run_limited(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump {from} {}", to.display()))
            .arg(img),
        Duration::from_secs(60),
    );
}

/// `len` deterministic pseudo-random bytes from `seed` (SHA-256 in counter mode).
pub fn pattern(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
