//! The system around a mapping: loop devices (`losetup`), the mount table, sysfs, and
//! running external programs with a deadline.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Deadline of one `losetup` run.
pub(crate) const LOSETUP_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `program args…` with no stdin and captured output; kills it at `deadline`.
pub(crate) fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    deadline: Duration,
) -> io::Result<Output> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out,
        Err(_) => {
            // The child has not been reaped (the waiting thread still owns it), so the pid
            // is still ours to signal.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{program} did not finish within {}s", deadline.as_secs()),
            ))
        }
    }
}

/// Runs a command that must succeed; the error is its stderr (or exit status).
pub(crate) fn run_ok<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    deadline: Duration,
) -> Result<String, String> {
    let out = run(program, args, deadline).map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(if err.is_empty() {
            format!("{program} failed: {}", out.status)
        } else {
            err
        })
    }
}

/// Attaches `file` to a free loop device with the given logical sector size.
pub(crate) fn loop_attach(
    file: &Path,
    sector_size: u32,
    direct_io: bool,
) -> Result<PathBuf, String> {
    let mut args: Vec<&OsStr> = vec!["--find".as_ref(), "--show".as_ref(), "--nooverlap".as_ref()];
    let ss = sector_size.to_string();
    args.extend(["--sector-size".as_ref(), ss.as_ref() as &OsStr]);
    if direct_io {
        args.push("--direct-io=on".as_ref());
    }
    args.push(file.as_os_str());
    let dev = run_ok("losetup", &args, LOSETUP_DEADLINE)?;
    if dev.starts_with("/dev/") {
        Ok(PathBuf::from(dev))
    } else {
        Err(format!("losetup printed no device: {dev:?}"))
    }
}

/// Detaches a loop device. The kernel defers the detach while the device is open.
pub(crate) fn loop_detach(dev: &Path) -> Result<(), String> {
    run_ok(
        "losetup",
        &[OsStr::new("-d"), dev.as_os_str()],
        LOSETUP_DEADLINE,
    )
    .map(drop)
}

/// `/dev/loop3` → `loop3`.
fn block_name(dev: &Path) -> Option<&str> {
    dev.file_name()?.to_str()
}

/// The file a loop device is attached to, if it is attached (`None` once detached).
pub(crate) fn loop_backing_file(dev: &Path) -> Option<PathBuf> {
    let name = block_name(dev)?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Every attached loop device with its backing file.
pub(crate) fn loop_devices() -> Vec<(PathBuf, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with("loop") {
                return None;
            }
            let dev = PathBuf::from("/dev").join(&name);
            let backing = loop_backing_file(&dev)?;
            Some((dev, backing))
        })
        .collect()
}

/// Why a block device cannot be released now, if it cannot: a filesystem on it is
/// mounted, another device (dm, md) holds it, or someone opened it exclusively.
pub(crate) fn block_device_in_use(dev: &Path) -> Option<String> {
    let meta = std::fs::metadata(dev).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let majmin = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    if let Some(m) = mounts().into_iter().find(|m| m.majmin == majmin) {
        return Some(format!(
            "a filesystem on it is mounted at {}",
            m.mount_point.display()
        ));
    }
    if let Some(name) = block_name(dev) {
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/block/{name}/holders"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !holders.is_empty() {
            return Some(format!("held by {}", holders.join(", ")));
        }
    }
    // O_EXCL on a block device fails with EBUSY while it (or a partition of it) is mounted
    // or claimed. Read-only, so closing it does not make udev probe the device.
    match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(dev)
    {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            Some("it or a partition of it is mounted or claimed by another process".into())
        }
        _ => None,
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// `major:minor` of the mounted device.
    pub(crate) majmin: String,
    /// Where it is mounted (unescaped).
    pub(crate) mount_point: PathBuf,
    /// Filesystem type, e.g. `ext4`, `fuse.nodecrypt`.
    pub(crate) fstype: String,
}

/// The current mount table (empty if it cannot be read).
pub(crate) fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default()
}

pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let fstype = right.split(' ').next()?;
            Some(MountEntry {
                majmin: (*f.get(2)?).to_owned(),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, …) in mountinfo paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    40 36 0:52 / /run/nodecrypt/v1 rw,nosuid,nodev - fuse.nodecrypt nodecrypt rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].majmin, "98:0");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].fstype, "fuse.nodecrypt");
        assert_eq!(m[1].mount_point, PathBuf::from("/run/nodecrypt/v1"));
    }

    #[test]
    fn escapes_at_the_end_and_lone_backslashes() {
        assert_eq!(unescape("a\\134"), "a\\");
        assert_eq!(unescape("a\\1"), "a\\1");
        assert_eq!(unescape("\\011x"), "\tx");
    }

    #[test]
    fn run_enforces_its_deadline() {
        let t = std::time::Instant::now();
        let e = run("sleep", &["30"], Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(
            run_ok("sh", &["-c", "echo hi"], Duration::from_secs(10)),
            Ok("hi".into())
        );
        assert_eq!(
            run_ok(
                "sh",
                &["-c", "echo bad >&2; exit 3"],
                Duration::from_secs(10)
            ),
            Err("bad".into())
        );
    }
}
