//! The userspace data path through the real agent: ext4 round trip, open twice, close
//! while in use, bytes on the device equal to what the XTS engine produces for the
//! volume key, kill -9 during writes, rotation while being written.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nodecrypt_tests::*;
use rand::{Rng, RngCore, SeedableRng};

fn opts(files: &[PathBuf]) -> AgentOpts {
    AgentOpts {
        backend: "userspace".into(),
        file_devices: files.to_vec(),
        ..Default::default()
    }
}

fn open(agent: &Agent, id: &str) -> serde_json::Value {
    let v = agent
        .cli(&["--json", "open", "--volume-id", id])
        .ok()
        .json();
    assert_eq!(v["state"], "open", "{v}");
    assert_eq!(v["backend"], "userspace", "{v}");
    v
}

struct Mount(PathBuf);
impl Mount {
    fn new(dev: &str, at: &Path) -> Mount {
        fs::create_dir_all(at).unwrap();
        run_ok(Command::new("mount").arg(dev).arg(at));
        Mount(at.to_path_buf())
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn write_files(dir: &Path, n: usize, seed: u64) -> Vec<(PathBuf, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(0..200_000);
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            let p = dir.join(format!("f{seed}-{i}"));
            fs::write(&p, &data).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn ext4_round_trip_open_twice_and_close_in_use() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("v.img"), 128);
    let agent = env.start_agent(&broker.addr, &opts(std::slice::from_ref(&img)));
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-u"])
        .ok();
    let v = open(&agent, "vol-u");
    let dev = v["mapped_device"].as_str().unwrap().to_string();
    assert!(dev.starts_with("/dev/loop"), "{v}");
    assert!(v["mapped_file"].as_str().unwrap().ends_with("/disk"), "{v}");
    // Erase refuses an open volume and changes nothing.
    let before = file_hash(&img);
    let out = agent.cli(&["erase", "--volume-id", "vol-u", "--yes"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("is open"), "{out:?}");
    assert_eq!(file_hash(&img), before);
    // Open twice: the same single mapping.
    let again = open(&agent, "vol-u");
    assert_eq!(again["mapped_device"], v["mapped_device"]);
    let loops = run_ok(Command::new("losetup").args(["-j", v["mapped_file"].as_str().unwrap()]));
    assert_eq!(loops.lines().count(), 1, "{loops}");
    let st = agent.cli(&["status", "--volume-id", "vol-u"]).ok();
    assert!(
        st.stdout.contains("backend=userspace") && st.stdout.contains(&dev),
        "{st:?}"
    );

    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = env.path().join("mnt");
    let files;
    {
        let _m = Mount::new(&dev, &mnt);
        files = write_files(&mnt, 100, 1);
        // Close while mounted: refused, nothing lost.
        let out = agent.cli(&["close", "--volume-id", "vol-u"]);
        assert_eq!(out.code, 3, "{out:?}");
        assert!(out.stderr.contains("in use"), "{out:?}");
        for (p, d) in &files[..5] {
            assert_eq!(&fs::read(p).unwrap(), d);
        }
    }
    agent.cli(&["close", "--volume-id", "vol-u"]).ok();
    agent.cli(&["close", "--volume-id", "vol-u"]).ok(); // already closed: success
    let v = open(&agent, "vol-u");
    let dev = v["mapped_device"].as_str().unwrap();
    run_ok(Command::new("fsck.ext4").arg("-n").arg(dev));
    {
        let _m = Mount::new(dev, &mnt);
        for (p, d) in &files {
            assert!(fs::read(p).unwrap() == *d, "{} differs", p.display());
        }
    }
    agent.cli(&["close", "--volume-id", "vol-u"]).ok();
    let key = node_key(&env, &broker, "vol-u", 0);
    assert_no_key_material("agent log", &agent.logs(), &[key]);
}

/// The LUKS2 volume key of `img`, read by the real cryptsetup with the broker's key
/// (test-only files in the test's own directory).
fn volume_key(env: &Env, img: &Path, slot_key: &[u8]) -> Vec<u8> {
    let kf = env.path().join("slot.key");
    let vk = env.path().join("volume.key");
    fs::write(&kf, slot_key).unwrap();
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args([
                "luksDump",
                "--batch-mode",
                "--dump-volume-key",
                "--volume-key-file",
            ])
            .arg(&vk)
            .arg("--key-file")
            .arg(&kf)
            .arg(img),
    );
    let key = fs::read(&vk).unwrap();
    fs::remove_file(&vk).unwrap();
    fs::remove_file(&kf).unwrap();
    key
}

#[test]
fn device_bytes_are_exactly_what_the_engine_writes() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("k.img"), 64);
    let agent = env.start_agent(&broker.addr, &opts(std::slice::from_ref(&img)));
    agent
        .cli(&[
            "format",
            img.to_str().unwrap(),
            "--volume-id",
            "vol-k",
            "--sector-size",
            "512",
        ])
        .ok();
    let v = open(&agent, "vol-k");
    let dev = v["mapped_device"].as_str().unwrap().to_string();
    let mut pattern = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut pattern);
    {
        let mut f = fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    agent.cli(&["close", "--volume-id", "vol-k"]).ok();

    // Decrypt the device independently: the data segment holds exactly what the XTS
    // engine (tweak = byte offset / 512) produces for the LUKS2 volume key.
    let json = run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&img),
    );
    let vk = volume_key(&env, &img, &node_key(&env, &broker, "vol-k", 0));
    let meta: serde_json::Value = serde_json::from_str(&json).unwrap();
    let seg = &meta["segments"]["0"];
    let offset: u64 = seg["offset"].as_str().unwrap().parse().unwrap();
    let sector = seg["sector_size"].as_u64().unwrap() as usize;
    assert_eq!(sector, 512);
    let mut raw = vec![0u8; pattern.len()];
    {
        let mut f = fs::File::open(&img).unwrap();
        f.seek(SeekFrom::Start(offset + (1 << 20))).unwrap();
        f.read_exact(&mut raw).unwrap();
    }
    assert_ne!(raw, pattern);
    let engine =
        nodecrypt_xts::Engine::with_backend(&vk, sector, nodecrypt_xts::Backend::Portable).unwrap();
    engine.decrypt(&mut raw, 1 << 20).unwrap();
    assert!(
        raw == pattern,
        "device bytes are not the engine's encryption"
    );
}

#[test]
fn kill9_of_the_agent_during_writes_loses_nothing_synced() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("c.img"), 96);
    let mut agent = env.start_agent(&broker.addr, &opts(std::slice::from_ref(&img)));
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-c"])
        .ok();
    let v = open(&agent, "vol-c");
    let dev = v["mapped_device"].as_str().unwrap().to_string();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = env.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    run_ok(Command::new("mount").arg(&dev).arg(&mnt));
    let synced = write_files(&mnt, 30, 5);
    run_ok(&mut Command::new("sync"));
    // A writer keeps going while the agent is killed; its writes start failing.
    let writer = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            for i in 0..400 {
                if fs::write(mnt.join(format!("late-{i}")), vec![i as u8; 64 << 10]).is_err() {
                    break;
                }
            }
        })
    };
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ls {} | wc -l", mnt.display())),
    );
    assert!(out.trim().parse::<u32>().unwrap() >= 30);
    agent.kill9();
    writer.join().unwrap();
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();

    let agent = env.start_agent(&broker.addr, &opts(std::slice::from_ref(&img)));
    let json = run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&img),
    );
    assert!(json.contains("\"nodecrypt\""), "header damaged: {json}");
    let v = open(&agent, "vol-c");
    let dev = v["mapped_device"].as_str().unwrap();
    let st = Command::new("fsck.ext4")
        .args(["-y"])
        .arg(dev)
        .status()
        .unwrap();
    assert!(
        matches!(st.code(), Some(0 | 1)),
        "fsck could not repair: {st:?}"
    );
    run_ok(Command::new("fsck.ext4").arg("-n").arg(dev));
    let _m = Mount::new(dev, &mnt);
    for (p, d) in &synced {
        assert!(fs::read(p).unwrap() == *d, "{} lost", p.display());
    }
}

#[test]
fn rotation_while_written_loses_nothing() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("w.img"), 96);
    let agent = env.start_agent(&broker.addr, &opts(std::slice::from_ref(&img)));
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-w"])
        .ok();
    let v = open(&agent, "vol-w");
    let dev = v["mapped_device"].as_str().unwrap().to_string();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = env.path().join("mnt");
    let mut files = Vec::new();
    {
        let _m = Mount::new(&dev, &mnt);
        let writer = {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                for round in 0..6 {
                    all.extend(write_files(&mnt, 15, 100 + round));
                    run_ok(&mut Command::new("sync"));
                }
                all
            })
        };
        for want in [2, 3] {
            let r = agent
                .cli(&["--json", "rotate", "--volume-id", "vol-w"])
                .ok()
                .json();
            assert_eq!(r["key_version"], want);
        }
        files.extend(writer.join().unwrap());
    }
    agent.cli(&["close", "--volume-id", "vol-w"]).ok();
    let v = open(&agent, "vol-w");
    let dev = v["mapped_device"].as_str().unwrap();
    run_ok(Command::new("fsck.ext4").arg("-n").arg(dev));
    let _m = Mount::new(dev, &mnt);
    assert_eq!(files.len(), 90);
    for (p, d) in &files {
        assert!(fs::read(p).unwrap() == *d, "{} differs", p.display());
    }
}
