//! The userspace data path end to end (run as root: FUSE mounts and loop devices).
//!
//! Volumes are made by the real `cryptsetup` CLI; the bytes the mapping leaves on the
//! image are checked by decrypting it independently with OpenSSL's AES-256-XTS.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nodecrypt_agent::key::MasterKey;
use nodecrypt_agent::userspace::{cleanup_stale, Cipher, Error, Geometry, Mapping};
use rand::{Rng, RngCore, SeedableRng};
use zeroize::Zeroizing;

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs a command with a deadline; panics (with its stderr) unless it succeeds.
fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let out = run_status(program, args);
    assert!(
        out.status.success(),
        "{program} {:?} failed: {}\n{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command with a deadline and returns its output, whatever its exit status.
fn run_status<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{program} did not finish within {DEADLINE:?}");
        }
    }
}

/// A LUKS2 image made by cryptsetup, with its geometry and volume key (test only: the key
/// stays in this test's temp dir and memory).
struct Volume {
    tmp: tempfile::TempDir,
    img: PathBuf,
    key: Zeroizing<Vec<u8>>,
    geometry: Geometry,
}

impl Volume {
    fn new(data_mib: u64, sector_size: u32) -> Volume {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("img");
        let keyslot_key = tmp.path().join("K");
        let mut k = [0u8; 64];
        rand::rng().fill_bytes(&mut k);
        std::fs::write(&keyslot_key, k).unwrap();
        File::create(&img)
            .unwrap()
            .set_len((16 + data_mib) << 20)
            .unwrap();
        let ss = sector_size.to_string();
        run(
            "cryptsetup",
            &[
                "luksFormat",
                "--type",
                "luks2",
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "512",
                "--sector-size",
                &ss,
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--batch-mode",
                "--key-file",
            ]
            .map(OsStr::new)
            .into_iter()
            .chain([keyslot_key.as_os_str(), img.as_os_str()])
            .collect::<Vec<_>>(),
        );
        let json = run(
            "cryptsetup",
            &[
                OsStr::new("luksDump"),
                "--dump-json-metadata".as_ref(),
                img.as_os_str(),
            ],
        );
        let meta: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let seg = &meta["segments"]["0"];
        let data_offset: u64 = seg["offset"].as_str().unwrap().parse().unwrap();
        let data_size = match seg["size"].as_str().unwrap() {
            "dynamic" => std::fs::metadata(&img).unwrap().len() - data_offset,
            n => n.parse().unwrap(),
        };
        let geometry = Geometry {
            data_offset,
            data_size,
            sector_size: seg["sector_size"].as_u64().unwrap() as u32,
        };
        assert_eq!(geometry.sector_size, sector_size);
        let vk_file = tmp.path().join("F");
        run(
            "cryptsetup",
            &[
                OsStr::new("luksDump"),
                "--dump-volume-key".as_ref(),
                "--volume-key-file".as_ref(),
                vk_file.as_os_str(),
                "--key-file".as_ref(),
                keyslot_key.as_os_str(),
                "--batch-mode".as_ref(),
                img.as_os_str(),
            ],
        );
        let key = Zeroizing::new(std::fs::read(&vk_file).unwrap());
        assert_eq!(key.len(), 64);
        Volume {
            tmp,
            img,
            key,
            geometry,
        }
    }

    fn cipher(&self) -> Cipher {
        let key = MasterKey::new(self.key.clone());
        Cipher::xts(&key, self.geometry.sector_size).unwrap()
    }

    fn mount(&self, name: &str, attach_loop: bool) -> Mapping {
        let dir = self.tmp.path().join("run").join(name);
        Mapping::mount(&dir, &self.img, self.geometry, self.cipher(), attach_loop).unwrap()
    }

    /// The data segment decrypted with OpenSSL, sector by sector, tweak = offset / 512.
    fn decrypt_independently(&self) -> Vec<u8> {
        let g = self.geometry;
        let mut raw = vec![0u8; g.data_size as usize];
        File::open(&self.img)
            .unwrap()
            .read_exact_at(&mut raw, g.data_offset)
            .unwrap();
        let ss = g.sector_size as usize;
        let mut plain = vec![0u8; raw.len()];
        for (i, (c, p)) in raw.chunks(ss).zip(plain.chunks_mut(ss)).enumerate() {
            let iv = (((i * ss) / 512) as u128).to_le_bytes();
            let mut out = vec![0u8; ss + 16];
            let mut cr = openssl::symm::Crypter::new(
                openssl::symm::Cipher::aes_256_xts(),
                openssl::symm::Mode::Decrypt,
                &self.key,
                Some(&iv),
            )
            .unwrap();
            cr.pad(false);
            let n = cr.update(c, &mut out).unwrap();
            let m = cr.finalize(&mut out[n..]).unwrap();
            assert_eq!(n + m, ss);
            p.copy_from_slice(&out[..ss]);
        }
        plain
    }
}

/// A filesystem mounted for the test; lazily unmounted if the test fails half-way.
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &Path, at: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &[
                OsStr::new("-t"),
                "ext4".as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
            ]
            .into_iter()
            .chain([dev.as_os_str(), at.as_os_str()])
            .collect::<Vec<_>>(),
        );
        Mounted(at.to_owned())
    }

    fn umount(self) {
        run("umount", &[self.0.as_os_str()]);
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run_status("umount", &[OsStr::new("-l"), self.0.as_os_str()]);
    }
}

fn mkfs_ext4(dev: &Path) {
    run(
        "mkfs.ext4",
        &[
            OsStr::new("-q"),
            "-F".as_ref(),
            "-E".as_ref(),
            "nodiscard".as_ref(),
            dev.as_os_str(),
        ],
    );
}

fn fsck_clean(dev: &Path) {
    let out = run_status(
        "fsck.ext4",
        &[OsStr::new("-n"), "-f".as_ref(), dev.as_os_str()],
    );
    assert!(
        out.status.success(),
        "fsck.ext4 -n found problems: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_mount_point(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

fn backing_file(loop_dev: &Path) -> Option<String> {
    let name = loop_dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

#[test]
fn ext4_round_trip_through_the_loop_device() {
    let t = Instant::now();
    let vol = Volume::new(64, 4096);
    let mut m = vol.mount("a", true);
    let dev = m.loop_device().expect("a loop device");
    assert_eq!(
        backing_file(&dev).unwrap().trim(),
        m.file().to_str().unwrap(),
        "the loop device is backed by the FUSE file"
    );
    mkfs_ext4(&dev);
    let mnt = vol.tmp.path().join("mnt");
    let fs = Mounted::new(&dev, &mnt, "rw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut files = HashMap::new();
    for i in 0..100 {
        let len = match i % 10 {
            0 => 0,
            1 => rng.random_range(1..4096),
            _ => rng.random_range(1..400_000),
        };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        std::fs::write(mnt.join(format!("f{i}")), &data).unwrap();
        files.insert(format!("f{i}"), data);
    }
    fs.umount();
    m.close().unwrap();
    assert!(!m.is_open());
    assert!(!is_mount_point(m.dir()), "FUSE unmounted");
    assert_ne!(
        backing_file(&dev).map(|s| s.trim().to_owned()).as_deref(),
        Some(m.file().to_str().unwrap()),
        "loop device detached"
    );
    m.close().expect("closing twice is fine");
    drop(m);

    let mut m = vol.mount("b", true);
    let dev = m.loop_device().unwrap();
    fsck_clean(&dev);
    let fs = Mounted::new(&dev, &mnt, "ro");
    for (name, data) in &files {
        assert!(
            std::fs::read(mnt.join(name)).unwrap() == *data,
            "{name} differs"
        );
    }
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 101); // + lost+found
    fs.umount();
    m.close().unwrap();
    eprintln!("ext4 round trip: {:?}", t.elapsed());
}

/// Byte-range locks for the test's model: an operation holds exactly the bytes it touches
/// (shared for reads), so operations on disjoint bytes of one sector run concurrently in
/// the mapping, and overlapping ones happen in the order the model records.
#[derive(Default)]
struct ByteLocks {
    held: Mutex<Vec<(u64, u64, u64, bool)>>,
    cv: Condvar,
}

impl ByteLocks {
    fn with<R>(&self, start: u64, end: u64, excl: bool, id: u64, f: impl FnOnce() -> R) -> R {
        let mut h = self.held.lock().unwrap();
        while h
            .iter()
            .any(|&(_, s, e, x)| s < end && start < e && (x || excl))
        {
            h = self.cv.wait(h).unwrap();
        }
        h.push((id, start, end, excl));
        drop(h);
        let r = f();
        self.held.lock().unwrap().retain(|&(i, ..)| i != id);
        self.cv.notify_all();
        r
    }
}

fn fuzz(sector_size: u32, data_mib: u64, ops_per_thread: usize) {
    let t = Instant::now();
    let vol = Volume::new(data_mib, sector_size);
    let mut m = vol.mount("fuzz", false);
    let size = vol.geometry.data_size;
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.file())
            .unwrap(),
    );
    assert_eq!(file.metadata().unwrap().len(), size);
    let mut initial = vec![0u8; size as usize];
    file.read_exact_at(&mut initial, 0).unwrap();
    let model = Arc::new(Mutex::new(initial));
    let locks = Arc::new(ByteLocks::default());
    let ss = u64::from(sector_size);
    let threads: Vec<_> = (0..8u64)
        .map(|tid| {
            let (file, model, locks) = (file.clone(), model.clone(), locks.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(tid);
                for op in 0..ops_per_thread {
                    // Half the operations crowd into a few sectors so that requests on
                    // the same sector meet; the rest roam, some of them large.
                    let hot = rng.random_bool(0.5);
                    let off = if hot {
                        rng.random_range(0..4 * ss)
                    } else {
                        rng.random_range(0..size)
                    };
                    let max = if rng.random_ratio(1, 20) {
                        300_000
                    } else {
                        3 * ss + 17
                    };
                    let len = rng.random_range(1..=max).min(size - off);
                    let id = tid << 32 | op as u64;
                    if rng.random_bool(0.6) {
                        let mut data = vec![0u8; len as usize];
                        rng.fill_bytes(&mut data);
                        locks.with(off, off + len, true, id, || {
                            file.write_all_at(&data, off).unwrap();
                            model.lock().unwrap()[off as usize..(off + len) as usize]
                                .copy_from_slice(&data);
                        });
                    } else {
                        let mut got = vec![0u8; len as usize];
                        locks.with(off, off + len, false, id, || {
                            file.read_exact_at(&mut got, off).unwrap();
                            let model = model.lock().unwrap();
                            assert!(
                                got == model[off as usize..(off + len) as usize],
                                "read {off}+{len} differs from the model"
                            );
                        });
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    file.sync_all().unwrap();
    let model = model.lock().unwrap().clone();
    let mut whole = vec![0u8; size as usize];
    file.read_exact_at(&mut whole, 0).unwrap();
    assert!(whole == model, "the file differs from the model");

    // The end of the segment: short reads, then nothing; writes past it are refused.
    let mut buf = [0u8; 100];
    assert_eq!(file.read_at(&mut buf, size - 10).unwrap(), 10);
    assert_eq!(&buf[..10], &model[size as usize - 10..]);
    assert_eq!(file.read_at(&mut buf, size).unwrap(), 0);
    let e = file.write_at(&buf, size).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC));
    // The size is fixed.
    assert!(file.set_len(size - ss).is_err());
    assert_eq!(std::fs::metadata(m.file()).unwrap().len(), size);

    // An open file keeps the mapping from closing.
    match m.close() {
        Err(Error::InUse { path, .. }) => assert_eq!(path, m.file()),
        other => panic!("close with the file open: {other:?}"),
    }
    drop(file);
    m.close().unwrap();
    assert!(
        vol.decrypt_independently() == model,
        "the device does not hold the model encrypted as aes-xts-plain64"
    );
    eprintln!("fuzz {sector_size}: {:?}", t.elapsed());
}

#[test]
fn fuzz_4096_byte_sectors_against_a_model_and_openssl() {
    fuzz(4096, 8, 400);
}

#[test]
fn fuzz_512_byte_sectors_against_a_model_and_openssl() {
    fuzz(512, 4, 300);
}

#[test]
fn close_refuses_while_the_loop_device_is_mounted_and_keeps_serving() {
    let vol = Volume::new(32, 512);
    let mut m = vol.mount("busy", true);
    let dev = m.loop_device().unwrap();
    mkfs_ext4(&dev);
    let mnt = vol.tmp.path().join("mnt");
    let fs = Mounted::new(&dev, &mnt, "rw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut a = vec![0u8; 300_000];
    rng.fill_bytes(&mut a);
    std::fs::write(mnt.join("a"), &a).unwrap();

    match m.close() {
        Err(Error::InUse { path, reason }) => {
            assert_eq!(path, dev);
            assert!(reason.contains("mounted"), "{reason}");
        }
        other => panic!("close of a mounted loop device: {other:?}"),
    }
    assert!(m.is_open());
    assert_eq!(m.loop_device(), Some(dev.clone()));
    // Still serving: a new file written and synced goes through the mapping.
    let mut b = vec![0u8; 123_457];
    rng.fill_bytes(&mut b);
    std::fs::write(mnt.join("b"), &b).unwrap();
    run("sync", &[mnt.as_os_str()]);
    fs.umount();
    m.close().unwrap();

    let mut m = vol.mount("again", true);
    let dev = m.loop_device().unwrap();
    fsck_clean(&dev);
    let fs = Mounted::new(&dev, &mnt, "ro");
    assert!(std::fs::read(mnt.join("a")).unwrap() == a);
    assert!(std::fs::read(mnt.join("b")).unwrap() == b);
    fs.umount();
    m.close().unwrap();
}

#[test]
fn mount_rejects_bad_geometry_and_busy_directories() {
    let vol = Volume::new(4, 4096);
    let bad = |g: Geometry| {
        let dir = vol.tmp.path().join("bad");
        match Mapping::mount(&dir, &vol.img, g, vol.cipher(), false) {
            Err(Error::Geometry { device, .. }) => assert_eq!(device, vol.img),
            other => panic!("geometry {g:?}: {other:?}"),
        }
    };
    let g = vol.geometry;
    bad(Geometry {
        data_size: g.data_size + 4096,
        ..g
    });
    bad(Geometry {
        data_size: 1000,
        ..g
    });
    bad(Geometry {
        sector_size: 512,
        ..g
    }); // the engine was made for 4096
    bad(Geometry {
        data_offset: g.data_offset + 1,
        ..g
    });

    let dir = vol.tmp.path().join("run").join("x");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("junk"), b"x").unwrap();
    match Mapping::mount(&dir, &vol.img, g, vol.cipher(), false) {
        Err(Error::MountDir { .. }) => {}
        other => panic!("non-empty directory: {other:?}"),
    }
    std::fs::remove_file(dir.join("junk")).unwrap();
    let mut m = Mapping::mount(&dir, &vol.img, g, vol.cipher(), false).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(m.file()).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    match Mapping::mount(&dir, &vol.img, g, vol.cipher(), false) {
        Err(Error::MountDir { .. }) => {}
        other => panic!("mount on a mount point: {other:?}"),
    }
    assert!(!format!("{m:?}").is_empty());
    m.close().unwrap();
}

const CHILD_ENV: &str = "NODECRYPT_USERSPACE_TEST_CHILD";

/// Not a test of its own: the body of the process `cleanup_stale_after_a_killed_mount`
/// kills. Run as a test without its environment variable, it does nothing.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let s = |k: &str| PathBuf::from(v[k].as_str().unwrap());
    let geometry = Geometry {
        data_offset: v["data_offset"].as_u64().unwrap(),
        data_size: v["data_size"].as_u64().unwrap(),
        sector_size: v["sector_size"].as_u64().unwrap() as u32,
    };
    let key = MasterKey::new(Zeroizing::new(std::fs::read(s("key")).unwrap()));
    let cipher = Cipher::xts(&key, geometry.sector_size).unwrap();
    let m = Mapping::mount(&s("dir"), &s("img"), geometry, cipher, true).unwrap();
    // Write through the mapping, then report readiness and wait to be killed.
    let f = OpenOptions::new().write(true).open(m.file()).unwrap();
    f.write_all_at(b"written before the crash", 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    println!("READY {}", m.loop_device().unwrap().display());
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    std::mem::forget(m);
    std::process::abort();
}

#[test]
fn cleanup_stale_after_a_killed_mount() {
    let vol = Volume::new(8, 4096);
    let run_dir = vol.tmp.path().join("run");
    let dir = run_dir.join("vol");
    let key_file = vol.tmp.path().join("F");
    let spec = serde_json::json!({
        "dir": dir, "img": vol.img, "key": key_file,
        "data_offset": vol.geometry.data_offset, "data_size": vol.geometry.data_size,
        "sector_size": vol.geometry.sector_size,
    });
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, spec.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints the test's name on the same line first.
            if let Some((_, dev)) = line.split_once("READY ") {
                let _ = tx.send(PathBuf::from(dev));
                return;
            }
        }
    });
    let ready = rx.recv_timeout(DEADLINE);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let loop_dev = ready.expect("the child mounted and printed READY");

    // What a crash leaves: a dead FUSE mount and a loop device still attached to it.
    let file = dir.canonicalize().unwrap_or(dir.clone()).join("disk");
    assert!(is_mount_point(&dir), "the dead FUSE mount is still there");
    assert_eq!(
        std::fs::metadata(&file).unwrap_err().raw_os_error(),
        Some(nix::libc::ENOTCONN)
    );
    assert!(backing_file(&loop_dev)
        .unwrap()
        .starts_with(run_dir.to_str().unwrap()));
    match Mapping::mount(&dir, &vol.img, vol.geometry, vol.cipher(), false) {
        Err(Error::MountDir { .. }) => {}
        other => panic!("mount over a stale mount: {other:?}"),
    }

    cleanup_stale(&run_dir).unwrap();
    assert!(!is_mount_point(&dir), "the stale mount is gone");
    assert!(
        !backing_file(&loop_dev).is_some_and(|b| b.starts_with(run_dir.to_str().unwrap())),
        "the stale loop device is detached"
    );
    cleanup_stale(&run_dir).expect("nothing left to clean is fine");

    // The volume opens again and holds what was written before the crash.
    let mut m = vol.mount("vol", false);
    let mut got = [0u8; 24];
    File::open(m.file())
        .unwrap()
        .read_exact_at(&mut got, 8192)
        .unwrap();
    assert_eq!(&got, b"written before the crash");
    m.close().unwrap();
}
