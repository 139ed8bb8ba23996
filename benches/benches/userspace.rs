//! Userspace data path throughput: sequential 1 MiB O_DIRECT writes then reads on the loop
//! device of a userspace mapping, with the XTS engine and with the test-only passthrough
//! cipher, in the same run. Goal: XTS at least 50% of passthrough (crypto is not the
//! bottleneck). Needs root (FUSE, loop devices).
//!
//! The volume is a sparse file with a 16 MiB gap where a LUKS2 header would be and a
//! random 512-bit key: the header plays no part in the data path.
//!
//! `cargo bench -p nodecrypt-benches --bench userspace`; `NODECRYPT_BENCH_MIB` sets the
//! volume size (default 256), `NODECRYPT_BENCH_ROUNDS` the rounds (default 3, best kept).
//! Results: stdout and `target/bench/userspace.json`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nodecrypt_agent::userspace::{Cipher, Geometry, Mapping};
use rand::RngCore;

const BLOCK: usize = 1 << 20;
const HEADER: u64 = 16 << 20;

struct Figures {
    write_mbps: f64,
    read_mbps: f64,
    loop_direct_io: bool,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A 4096-aligned 1 MiB window into a larger buffer (O_DIRECT needs aligned memory).
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(4096);
    &mut buf[skip..skip + BLOCK]
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn measure(dir: &Path, img: &Path, geometry: Geometry, cipher: Cipher, rounds: u64) -> Figures {
    let mut mapping = Mapping::mount(dir, img, geometry, cipher, true).expect("mount");
    let dev = mapping.loop_device().expect("loop device");
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let loop_direct_io = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .is_ok_and(|s| s.trim() == "1");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(&dev)
        .expect("open the loop device with O_DIRECT");
    let mut raw = vec![0u8; BLOCK + 4096];
    let buf = aligned(&mut raw);
    rand::rng().fill_bytes(buf);
    let blocks = geometry.data_size / BLOCK as u64;
    let total = blocks * BLOCK as u64;
    let (mut best_w, mut best_r) = (0f64, 0f64);
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..blocks {
            buf[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all_at(buf, i * BLOCK as u64).expect("write");
        }
        f.sync_data().expect("fdatasync");
        best_w = best_w.max(mbps(total, t.elapsed().as_secs_f64()));

        let t = Instant::now();
        for i in 0..blocks {
            f.read_exact_at(buf, i * BLOCK as u64).expect("read");
            assert_eq!(
                buf[..8],
                i.to_le_bytes(),
                "block {i} reads back what was written"
            );
        }
        best_r = best_r.max(mbps(total, t.elapsed().as_secs_f64()));
    }
    drop(f);
    mapping.close().expect("close");
    Figures {
        write_mbps: best_w,
        read_mbps: best_r,
        loop_direct_io,
    }
}

fn engine_mbps(key: &[u8]) -> f64 {
    let engine = nodecrypt_xts::Engine::new(key, 4096).unwrap();
    let mut buf = vec![0u8; BLOCK];
    let n = 256u64;
    let t = Instant::now();
    for i in 0..n {
        engine.encrypt(&mut buf, i * BLOCK as u64).unwrap();
    }
    mbps(n * BLOCK as u64, t.elapsed().as_secs_f64())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / `cargo bench -- --list` discovery
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the userspace bench needs root"
    );
    let mib = env_u64("NODECRYPT_BENCH_MIB", 256);
    let rounds = env_u64("NODECRYPT_BENCH_ROUNDS", 3).max(1);
    let tmp = tempfile::tempdir().unwrap();
    let geometry = Geometry {
        data_offset: HEADER,
        data_size: mib << 20,
        sector_size: 4096,
    };
    let mut key = zeroize::Zeroizing::new([0u8; 64]);
    rand::rng().fill_bytes(&mut key[..]);

    let mut results = Vec::new();
    for name in ["xts", "passthrough"] {
        let img = tmp.path().join(format!("{name}.img"));
        File::create(&img)
            .unwrap()
            .set_len(HEADER + geometry.data_size)
            .unwrap();
        let cipher = match name {
            "xts" => Cipher::Xts(nodecrypt_xts::Engine::new(&key[..], 4096).unwrap()),
            _ => Cipher::Passthrough,
        };
        let fig = measure(&tmp.path().join(name), &img, geometry, cipher, rounds);
        println!(
            "userspace/{name:<11} {mib} MiB, 1 MiB O_DIRECT: write {:>7.1} MB/s  read {:>7.1} MB/s  \
             (loop direct-io {})",
            fig.write_mbps,
            fig.read_mbps,
            if fig.loop_direct_io { "on" } else { "off" }
        );
        results.push(fig);
        std::fs::remove_file(&img).unwrap();
    }
    let (xts, pass) = (&results[0], &results[1]);
    let ratio_w = xts.write_mbps / pass.write_mbps;
    let ratio_r = xts.read_mbps / pass.read_mbps;
    let engine = nodecrypt_xts::Engine::new(&key[..], 4096).unwrap();
    let engine_raw = engine_mbps(&key[..]);
    println!(
        "userspace/ratio        xts/passthrough: write {:.0}%  read {:.0}%  (goal >= 50%); \
         engine {} in memory: {engine_raw:.0} MB/s",
        ratio_w * 100.0,
        ratio_r * 100.0,
        engine.backend().name()
    );
    let json = serde_json::json!({
        "bench": "userspace",
        "volume_mib": mib,
        "block_bytes": BLOCK,
        "sector_size": 4096,
        "rounds": rounds,
        "engine_backend": engine.backend().name(),
        "engine_encrypt_mbps": engine_raw,
        "xts": { "write_mbps": xts.write_mbps, "read_mbps": xts.read_mbps },
        "passthrough": { "write_mbps": pass.write_mbps, "read_mbps": pass.read_mbps },
        "ratio": { "write": ratio_w, "read": ratio_r },
        "loop_direct_io": xts.loop_direct_io,
        "goal_ratio": 0.5,
        "goal_met": ratio_w >= 0.5 && ratio_r >= 0.5,
    });
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("userspace.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("userspace/results      {}", path.display());
}
