//! Userspace data path throughput: sequential 1 MiB O_DIRECT writes then reads on the loop
//! device of a userspace mapping, with the XTS engine and with the test-only passthrough
//! cipher, in the same run. Goal: XTS at least 50% of passthrough (crypto is not the
//! bottleneck). Needs root (FUSE, loop devices).
//!
//! The volume is a sparse file with a 16 MiB gap where a LUKS2 header would be and a
//! random 512-bit key: the header plays no part in the data path.
//!
//! `cargo bench -p nodecrypt-benches --bench userspace`; `NODECRYPT_BENCH_MIB` sets the
//! volume size (default 256), `NODECRYPT_BENCH_ROUNDS` the rounds (default 5): XTS and
//! passthrough alternate round by round, each on a fresh mapping; the figures are the
//! median with min and max, the ratio is taken per round.
//! Results: stdout and `target/bench/userspace.json`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nodecrypt_agent::userspace::{Cipher, Geometry, Mapping};
use nodecrypt_xts::Backend;
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

/// Median, min and max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// One write pass and one read pass over the whole volume through a fresh mapping.
fn measure(dir: &Path, img: &Path, geometry: Geometry, cipher: Cipher) -> Figures {
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
    let t = Instant::now();
    for i in 0..blocks {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(buf, i * BLOCK as u64).expect("write");
    }
    f.sync_data().expect("fdatasync");
    let write_mbps = mbps(total, t.elapsed().as_secs_f64());

    let t = Instant::now();
    for i in 0..blocks {
        f.read_exact_at(buf, i * BLOCK as u64).expect("read");
        assert_eq!(
            buf[..8],
            i.to_le_bytes(),
            "block {i} reads back what was written"
        );
    }
    let read_mbps = mbps(total, t.elapsed().as_secs_f64());
    drop(f);
    mapping.close().expect("close");
    Figures {
        write_mbps,
        read_mbps,
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
    let rounds = env_u64("NODECRYPT_BENCH_ROUNDS", 5).max(1);
    let tmp = tempfile::tempdir().unwrap();
    let geometry = Geometry {
        data_offset: HEADER,
        data_size: mib << 20,
        sector_size: 4096,
    };
    let mut key = zeroize::Zeroizing::new([0u8; 64]);
    rand::rng().fill_bytes(&mut key[..]);

    // Rounds interleaved (xts, passthrough, xts, ...), each on a fresh mapping and file, so
    // that a change in the machine's load hits both alike; ratios are taken per round.
    let mut figs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (n, name) in ["xts", "passthrough"].into_iter().enumerate() {
            let img = tmp.path().join(format!("{name}.img"));
            File::create(&img)
                .unwrap()
                .set_len(HEADER + geometry.data_size)
                .unwrap();
            let cipher = match name {
                "xts" => Cipher::Xts(nodecrypt_xts::Engine::new(&key[..], 4096).unwrap()),
                _ => Cipher::Passthrough,
            };
            let fig = measure(&tmp.path().join(name), &img, geometry, cipher);
            println!(
                "userspace/{name:<11} round {} of {rounds}, {mib} MiB, 1 MiB O_DIRECT: write {:>7.1} MB/s  \
                 read {:>7.1} MB/s  (loop direct-io {})",
                round + 1,
                fig.write_mbps,
                fig.read_mbps,
                if fig.loop_direct_io { "on" } else { "off" }
            );
            figs[n].push(fig);
            std::fs::remove_file(&img).unwrap();
        }
    }
    let [xts, pass] = &figs;
    let col = |v: &[Figures], w: bool| -> Vec<f64> {
        v.iter()
            .map(|f| if w { f.write_mbps } else { f.read_mbps })
            .collect()
    };
    let per_round = |w: bool| -> Vec<f64> {
        col(xts, w)
            .iter()
            .zip(col(pass, w))
            .map(|(a, b)| a / b)
            .collect()
    };
    let (ratio_w, ratio_r) = (stats(&per_round(true)), stats(&per_round(false)));
    let engine = nodecrypt_xts::Engine::new(&key[..], 4096).unwrap();
    let engine_raw = engine_mbps(&key[..]);
    for (name, v) in [("xts", xts), ("passthrough", pass)] {
        let (w, r) = (stats(&col(v, true)), stats(&col(v, false)));
        println!(
            "userspace/{name:<11} median [min-max] of {rounds}: write {:.0} [{:.0}-{:.0}] MB/s  \
             read {:.0} [{:.0}-{:.0}] MB/s",
            w.0, w.1, w.2, r.0, r.1, r.2
        );
    }
    println!(
        "userspace/ratio        xts/passthrough, per round, median [min-max]: write {:.0}% \
         [{:.0}-{:.0}]  read {:.0}% [{:.0}-{:.0}]  (goal >= 50%); engine {} in memory: \
         {engine_raw:.0} MB/s",
        ratio_w.0 * 100.0,
        ratio_w.1 * 100.0,
        ratio_w.2 * 100.0,
        ratio_r.0 * 100.0,
        ratio_r.1 * 100.0,
        ratio_r.2 * 100.0,
        engine.backend().name()
    );
    let three = |v: Vec<f64>| {
        let s = stats(&v);
        serde_json::json!({ "median": s.0, "min": s.1, "max": s.2, "runs": v })
    };
    let json = serde_json::json!({
        "bench": "userspace",
        "cpu": Backend::selection().cpu,
        "volume_mib": mib,
        "block_bytes": BLOCK,
        "sector_size": 4096,
        "rounds": rounds,
        "engine_backend": engine.backend().name(),
        "engine_encrypt_mbps": engine_raw,
        "xts": { "write_mbps": three(col(xts, true)), "read_mbps": three(col(xts, false)) },
        "passthrough": { "write_mbps": three(col(pass, true)), "read_mbps": three(col(pass, false)) },
        "ratio": { "write": three(per_round(true)), "read": three(per_round(false)) },
        "loop_direct_io": xts[0].loop_direct_io,
        "goal_ratio": 0.5,
        "goal_met": ratio_w.0 >= 0.5 && ratio_r.0 >= 0.5,
    });
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("userspace.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("userspace/results      {}", path.display());
}
