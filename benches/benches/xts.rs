//! AES-256-XTS throughput, side by side in one run: every backend of `nodecrypt-xts` this
//! CPU runs, Debian's OpenSSL (the `openssl` crate as the workspace links it) and the
//! newest OpenSSL built from source (`benches/openssl-new`, a subprocess: two OpenSSL
//! builds cannot link into one binary), both called once per sector (key set once, IV
//! reset per sector), and RustCrypto `xts-mode` — 64 MiB buffers, 1 and 2 threads, 512-
//! and 4096-byte sectors, encrypt and decrypt, in place.
//!
//! Beside them, two references measured in the same rounds: the **ceiling**, a pure
//! AES-256 loop (14 rounds on 8 independent registers, no memory, no tweaks) on the
//! widest registers this CPU has — the most one core can encrypt — and the **floor**, one
//! read-XOR-write pass over the same 64 MiB buffer — what memory allows at that size.
//!
//! `make bench` (which builds `openssl-new` first), or `cargo bench -p nodecrypt-benches
//! --bench xts` (about 3 minutes). Every measurement runs for ~0.6 s; the whole set runs
//! 3 times, interleaved (round 1 of everything, then round 2, …), so each figure is the
//! median of 3 runs with their min and max, and each ratio is taken within a round and
//! then the median. The table goes to stdout and `target/bench/xts.json`. At the end the
//! bench checks that the chosen backend is at least as fast as every other one (a
//! WARNING line if not) and prints each goal of docs/benchmarks.md as met or missed.
//!
//! Two-thread runs split each 64 MiB request in two at a sector boundary: the engine
//! through `Engine::with_threads(2)`, the peers with one scoped thread per half.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use aes::cipher::KeyInit;
use aes::Aes256;
use nodecrypt_xts::{Backend, Direction, Engine};
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use xts_mode::{get_tweak_default, Xts128};

#[path = "xts/ceiling.rs"]
// The per-core ceiling and memory-floor kernels are raw AES/AVX intrinsics.
#[allow(unsafe_code)]
mod ceiling;

/// Bytes per request.
const BUF: usize = 64 << 20;

/// Bytes per request of the in-cache reference rows.
const IN_CACHE: usize = 1 << 20;

/// Interleaved rounds.
const ROUNDS: usize = 3;

/// Seconds per measurement.
const SECONDS: f64 = 0.6;

/// A fixed, non-secret benchmark key (distinct halves, as OpenSSL requires). The same
/// function is in benches/openssl-new/src/main.rs.
fn key() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5c)
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Impl {
    Engine(Backend),
    /// Debian's OpenSSL, in process.
    OpenSsl,
    /// OpenSSL from `openssl-src`, in the `openssl-new` subprocess.
    OpenSslNew,
    XtsMode,
}

impl Impl {
    fn name(self) -> String {
        match self {
            Impl::Engine(b) => format!("nodecrypt-{b}"),
            Impl::OpenSsl => "openssl-debian".into(),
            Impl::OpenSslNew => "openssl-new".into(),
            Impl::XtsMode => "xts-mode".into(),
        }
    }
}

/// Runs `f(part, first_tweak)` on `threads` (1 or 2) sector-aligned parts of `buf`.
fn split(buf: &mut [u8], sector_size: usize, threads: usize, f: impl Fn(&mut [u8], u128) + Sync) {
    if threads <= 1 {
        return f(buf, 0);
    }
    let half = buf.len() / sector_size / 2 * sector_size;
    let (a, b) = buf.split_at_mut(half);
    let tweak_b = (half / 512) as u128;
    std::thread::scope(|s| {
        s.spawn(|| f(a, 0));
        f(b, tweak_b);
    });
}

/// OpenSSL EVP, one EVP_CipherInit_ex (IV only) + EVP_CipherUpdate per sector.
fn openssl_sectors(decrypt: bool, buf: &mut [u8], sector_size: usize, first_tweak: u128) {
    let key = key();
    let cipher = Cipher::aes_256_xts();
    let mut ctx = CipherCtx::new().unwrap();
    fn init(
        ctx: &mut CipherCtx,
        decrypt: bool,
        c: Option<&CipherRef>,
        k: Option<&[u8]>,
        iv: Option<&[u8]>,
    ) {
        if decrypt {
            ctx.decrypt_init(c, k, iv).unwrap()
        } else {
            ctx.encrypt_init(c, k, iv).unwrap()
        }
    }
    init(&mut ctx, decrypt, Some(cipher), Some(&key[..]), None);
    let step = (sector_size / 512) as u128;
    for (i, s) in buf.chunks_exact_mut(sector_size).enumerate() {
        let iv = (first_tweak + i as u128 * step).to_le_bytes();
        init(&mut ctx, decrypt, None, None, Some(&iv[..]));
        ctx.cipher_update_inplace(s, sector_size).unwrap();
    }
}

/// The `openssl-new` helper binary, built by `make bench` into its own target dir.
fn openssl_new() -> Option<PathBuf> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openssl-new/target/release/openssl-new");
    p.is_file().then_some(p)
}

/// Runs the helper with `args` (and `env`), returning its stdout.
fn helper(exe: &PathBuf, args: &[&str], env: Option<(&str, &str)>) -> String {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run openssl-new");
    assert!(out.status.success(), "openssl-new {args:?} failed");
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_string()
}

/// The helper's `run`, as a [`Rate`].
fn helper_rate(
    exe: &PathBuf,
    ss: usize,
    dir: Direction,
    threads: usize,
    env: Option<(&str, &str)>,
) -> Rate {
    let out = helper(
        exe,
        &[
            "run",
            &ss.to_string(),
            dir.name(),
            &threads.to_string(),
            &BUF.to_string(),
            &SECONDS.to_string(),
        ],
        env,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("helper JSON");
    Rate {
        wall: v["gb_per_s"].as_f64().expect("gb_per_s"),
        cpu: v["cpu_gb_per_s"].as_f64(),
    }
}

/// A ready-to-run in-process implementation for one (sector size, threads) configuration.
enum Runner {
    Engine(Engine),
    OpenSsl,
    XtsMode(Box<Xts128<Aes256>>),
}

impl Runner {
    fn new(imp: Impl, sector_size: usize, threads: usize) -> Self {
        let key = key();
        match imp {
            Impl::Engine(b) => Runner::Engine(
                Engine::with_backend(&key, sector_size, b)
                    .expect("supported backend")
                    .with_threads(threads),
            ),
            Impl::OpenSsl => Runner::OpenSsl,
            Impl::XtsMode => Runner::XtsMode(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..32]).unwrap(),
                Aes256::new_from_slice(&key[32..]).unwrap(),
            ))),
            Impl::OpenSslNew => unreachable!("a subprocess"),
        }
    }

    fn run(&self, dir: Direction, buf: &mut [u8], sector_size: usize, threads: usize) {
        let decrypt = dir == Direction::Decrypt;
        match self {
            Runner::Engine(e) => match dir {
                Direction::Encrypt => e.encrypt(buf, 0).unwrap(),
                Direction::Decrypt => e.decrypt(buf, 0).unwrap(),
            },
            Runner::OpenSsl => split(buf, sector_size, threads, |part, tweak| {
                openssl_sectors(decrypt, part, sector_size, tweak)
            }),
            Runner::XtsMode(xts) => split(buf, sector_size, threads, |part, t0| {
                let step = (sector_size / 512) as u128;
                for (i, s) in part.chunks_exact_mut(sector_size).enumerate() {
                    let tweak = get_tweak_default(t0 + i as u128 * step);
                    if decrypt {
                        xts.decrypt_sector(s, tweak);
                    } else {
                        xts.encrypt_sector(s, tweak);
                    }
                }
            }),
        }
    }
}

/// Nanoseconds this thread has run on a CPU (time slices lost to other processes do not
/// count), from /proc/thread-self/schedstat.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One measurement: GB/s per wall-clock second, and per second of the calling thread's
/// CPU time (meaningful when all the work runs on the calling thread).
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: Option<f64>,
}

/// [`Rate`] of `f` over whole calls for about [`SECONDS`], after one untimed call.
fn rate(bytes: usize, mut f: impl FnMut()) -> Rate {
    f();
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    let mut calls = 0u64;
    while calls == 0 || start.elapsed().as_secs_f64() < SECONDS {
        f();
        calls += 1;
    }
    let total = calls as f64 * bytes as f64;
    let cpu = cpu0
        .zip(thread_cpu_ns())
        .map(|(a, b)| total / ((b - a).max(1) as f64 / 1e9) / 1e9);
    Rate {
        wall: total / start.elapsed().as_secs_f64() / 1e9,
        cpu,
    }
}

fn implementations(new: bool) -> Vec<Impl> {
    let mut v: Vec<Impl> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_supported())
        .map(Impl::Engine)
        .collect();
    v.push(Impl::OpenSsl);
    if new {
        v.push(Impl::OpenSslNew);
    }
    v.push(Impl::XtsMode);
    v
}

/// Every implementation must produce Debian OpenSSL's bytes before it is timed.
fn check_agreement(new: Option<&PathBuf>) {
    for ss in [512usize, 4096] {
        let sample: Vec<u8> = (0..64 * 4096).map(|i| (i * 7 + 3) as u8).collect();
        let mut want = sample.clone();
        openssl_sectors(false, &mut want, ss, 0);
        for imp in implementations(false) {
            for threads in [1, 2] {
                let mut got = sample.clone();
                Runner::new(imp, ss, threads).run(Direction::Encrypt, &mut got, ss, threads);
                assert!(
                    got == want,
                    "{} disagrees with OpenSSL ({ss}, {threads}t)",
                    imp.name()
                );
            }
        }
        if let Some(exe) = new {
            let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                helper(exe, &["check", &ss.to_string()], None) == hex,
                "openssl-new disagrees with Debian's OpenSSL ({ss})"
            );
        }
    }
}

/// (sector size, threads, direction, what) → one GB/s figure per round.
type Key = (usize, usize, &'static str, String);

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `target/` of this build: the bench binary is `target/<profile>/deps/xts-<hash>`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("bench executable path");
    exe.ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default()
}

fn main() {
    let load_before = loadavg();
    let sel = Backend::selection();
    println!("CPU: {} ({})", cpu_name(), sel.cpu);
    println!("chosen backend: {sel}");
    let new = openssl_new();
    let new_version = new.as_ref().map(|exe| helper(exe, &["version"], None));
    let debian_version = openssl::version::version().to_string();
    match &new_version {
        Some(v) => {
            println!("peers: {debian_version} (Debian, in process); {v} (openssl-src, subprocess)")
        }
        None => println!(
            "WARNING: benches/openssl-new is not built (`make bench` builds it): \
             no figures for the newest OpenSSL in this run"
        ),
    }
    check_agreement(new.as_ref());

    // Which XTS code each OpenSSL runs: 3.0 has only its AES-NI XTS; 3.2 and later pick
    // their AVX-512 (VAES on zmm) XTS where the CPU has AVX-512 F/BW/DQ/VL, VAES,
    // VPCLMULQDQ and VBMI2. OPENSSL_ia32cap=":~0x10000" (AVX512F off) forces the AES-NI
    // path: the difference shows which one ran.
    let avx512_path = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
        && is_x86_feature_detected!("avx512vbmi2");
    println!("XTS path: {debian_version}: AES-NI (aesni_xts_*; 3.0 has no wider XTS code)");
    let mut path_note = serde_json::Value::Null;
    if let (Some(exe), Some(v)) = (&new, &new_version) {
        let on = helper_rate(exe, 4096, Direction::Encrypt, 1, None).wall;
        let off = helper_rate(
            exe,
            4096,
            Direction::Encrypt,
            1,
            Some(("OPENSSL_ia32cap", ":~0x10000")),
        )
        .wall;
        let path = if avx512_path {
            "AVX-512 (aesni_xts_avx512)"
        } else {
            "AES-NI (no AVX-512 XTS on this CPU)"
        };
        println!(
            "XTS path: {v}: {path}; 4096 encrypt {on:.2} GB/s, {off:.2} GB/s with \
             OPENSSL_ia32cap=\":~0x10000\" (AVX-512 off)"
        );
        path_note = serde_json::json!({"path": path, "gb_per_s": on, "gb_per_s_avx512_off": off});
    }

    let imps = implementations(new.is_some());
    let mut buf = vec![0x3au8; BUF];
    let mut runs: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    let mut cpu_runs: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    let mut record = |key: Key, r: Rate, threads: usize| {
        if let (1, Some(c)) = (threads, r.cpu) {
            cpu_runs.entry(key.clone()).or_default().push(c);
        }
        runs.entry(key).or_default().push(r.wall);
    };
    let started = Instant::now();
    for round in 0..ROUNDS {
        eprintln!(
            "round {} of {ROUNDS} ({:.0} s so far)",
            round + 1,
            started.elapsed().as_secs_f64()
        );
        for threads in [1usize, 2] {
            if threads == 1 {
                for (name, r) in ceiling::ceilings() {
                    record((0, 1, "aes", name), r, 1);
                }
                // The chosen backend on a buffer that stays in the L2 cache: the kernel
                // without the memory traffic of 64 MiB.
                for ss in [512usize, 4096] {
                    let e = Engine::with_backend(&key(), ss, sel.backend).expect("chosen backend");
                    let mut small = vec![0x3au8; IN_CACHE];
                    let r = rate(IN_CACHE, || e.encrypt(&mut small, 0).unwrap());
                    let what = if ss == 512 { "512 enc" } else { "4096 enc" };
                    record((0, 1, what, "chosen, 1 MiB".into()), r, 1);
                }
            }
            let floor = rate(BUF, || {
                split(&mut buf, 4096, threads, |part, _| ceiling::xor_pass(part))
            });
            record(
                (0, threads, "read-xor-write", "floor".into()),
                floor,
                threads,
            );
            for ss in [512usize, 4096] {
                for dir in Direction::ALL {
                    for &imp in &imps {
                        let r = match imp {
                            Impl::OpenSslNew => {
                                helper_rate(new.as_ref().expect("helper"), ss, dir, threads, None)
                            }
                            Impl::XtsMode if threads == 2 => continue,
                            _ => {
                                let r = Runner::new(imp, ss, threads);
                                rate(BUF, || r.run(dir, &mut buf, ss, threads))
                            }
                        };
                        record((ss, threads, dir.name(), imp.name()), r, threads);
                    }
                }
            }
        }
    }
    report(
        &runs,
        &cpu_runs,
        &imps,
        &sel,
        &load_before,
        new_version,
        debian_version,
        path_note,
    );
}

/// Per round, `a / b`; then median, min, max.
fn ratio(runs: &BTreeMap<Key, Vec<f64>>, a: &Key, b: &Key) -> Option<(f64, f64, f64)> {
    let (x, y) = (runs.get(a)?, runs.get(b)?);
    let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| x / y).collect();
    Some(stats(&r))
}

#[allow(clippy::too_many_arguments)]
fn report(
    runs: &BTreeMap<Key, Vec<f64>>,
    cpu_runs: &BTreeMap<Key, Vec<f64>>,
    imps: &[Impl],
    sel: &nodecrypt_xts::Selection,
    load_before: &str,
    new_version: Option<String>,
    debian_version: String,
    path_note: serde_json::Value,
) {
    let chosen = Impl::Engine(sel.backend).name();
    let k = |ss, t, dir: &'static str, what: &str| -> Key { (ss, t, dir, what.to_string()) };
    println!();
    println!(
        "AES-256-XTS, {} MiB in place, GB/s (1e9 bytes/s): median [min-max] of {ROUNDS} interleaved runs",
        BUF >> 20
    );
    println!(
        "  wall: per wall-clock second; cpu: per second of the thread's own CPU time (1 thread)"
    );
    println!("  x deb / x new: ratio to Debian's / the newest OpenSSL, taken per run, median");
    println!(
        "{:<19} {:>6} {:>3} {:>7} {:>19} {:>5} {:>5} {:>19} {:>5} {:>5}",
        "impl", "sector", "thr", "dir", "wall", "x deb", "x new", "cpu", "x deb", "x new"
    );
    let mut rows = Vec::new();
    let fmt3 = |v: Option<&Vec<f64>>| {
        v.map(|v| stats(v)).map_or("-".to_string(), |s| {
            format!("{:.2} [{:.2}-{:.2}]", s.0, s.1, s.2)
        })
    };
    let opt = |r: Option<(f64, f64, f64)>| r.map_or("-".to_string(), |r| format!("{:.2}", r.0));
    let json3 = |v: Option<&Vec<f64>>| {
        v.map(|v| {
            let s = stats(v);
            serde_json::json!({"median": s.0, "min": s.1, "max": s.2, "runs": v})
        })
    };
    for (key, v) in runs.iter().filter(|(k, _)| k.0 == 0) {
        let c = cpu_runs.get(key);
        println!(
            "{:<19} {:>10} {:>3} {:>19} {:>5} {:>5} {:>19}",
            key.3,
            key.2,
            key.1,
            fmt3(Some(v)),
            "",
            "",
            fmt3(c)
        );
        rows.push(
            serde_json::json!({"implementation": key.3, "threads": key.1, "what": key.2,
            "wall_gb_per_s": json3(Some(v)), "cpu_gb_per_s": json3(c)}),
        );
    }
    for ss in [512usize, 4096] {
        for threads in [1usize, 2] {
            for dir in Direction::ALL {
                for imp in imps {
                    let key = k(ss, threads, dir.name(), &imp.name());
                    let Some(v) = runs.get(&key) else { continue };
                    let c = cpu_runs.get(&key);
                    let deb = k(ss, threads, dir.name(), "openssl-debian");
                    let new = k(ss, threads, dir.name(), "openssl-new");
                    let r = [
                        ratio(runs, &key, &deb),
                        ratio(runs, &key, &new),
                        ratio(cpu_runs, &key, &deb),
                        ratio(cpu_runs, &key, &new),
                    ];
                    println!(
                        "{:<19} {:>6} {:>3} {:>7} {:>19} {:>5} {:>5} {:>19} {:>5} {:>5}",
                        imp.name(),
                        ss,
                        threads,
                        dir.name(),
                        fmt3(Some(v)),
                        opt(r[0]),
                        opt(r[1]),
                        fmt3(c),
                        opt(r[2]),
                        opt(r[3])
                    );
                    rows.push(serde_json::json!({
                        "implementation": imp.name(), "sector_size": ss, "threads": threads,
                        "direction": dir.name(),
                        "wall_gb_per_s": json3(Some(v)), "cpu_gb_per_s": json3(c),
                        "wall_ratio_to_openssl_debian": r[0].map(|r| r.0),
                        "wall_ratio_to_openssl_new": r[1].map(|r| r.0),
                        "cpu_ratio_to_openssl_debian": r[2].map(|r| r.0),
                        "cpu_ratio_to_openssl_new": r[3].map(|r| r.0),
                    }));
                }
            }
        }
    }

    // One-thread comparisons use CPU time where it was measured: on a shared machine
    // it is what the core does, without the time slices other processes took.
    let one = |a: &Key, b: &Key| {
        ratio(cpu_runs, a, b)
            .or_else(|| ratio(runs, a, b))
            .map(|r| r.0)
    };
    let one_abs = |a: &Key| cpu_runs.get(a).or_else(|| runs.get(a)).map(|v| stats(v).0);

    // The chosen backend against every other, per sector size and direction, 1 thread.
    println!();
    let mut warnings = 0;
    for ss in [512usize, 4096] {
        for dir in Direction::ALL {
            for imp in imps.iter().filter(|i| matches!(i, Impl::Engine(_))) {
                if imp.name() == chosen {
                    continue;
                }
                let Some(r) = one(
                    &k(ss, 1, dir.name(), &chosen),
                    &k(ss, 1, dir.name(), &imp.name()),
                ) else {
                    continue;
                };
                if r < 1.0 {
                    warnings += 1;
                    println!(
                        "WARNING: the chosen backend {chosen} is slower than {} at {ss}-byte sectors, {}: {r:.2}x",
                        imp.name(), dir.name()
                    );
                }
            }
        }
    }
    if warnings == 0 {
        println!("chosen backend {chosen}: at least as fast as every other backend at 512 and 4096, both directions (median, 1 thread)");
    }

    // The goals of docs/benchmarks.md, encrypt and decrypt each.
    let ceiling = ["ceiling-ymm", "ceiling-zmm"]
        .iter()
        .filter_map(|c| one_abs(&k(0, 1, "aes", c)))
        .fold(0.0, f64::max);
    let floor = one_abs(&k(0, 1, "read-xor-write", "floor"));
    let in_cache = one_abs(&k(0, 1, "4096 enc", "chosen, 1 MiB"));
    let mut goals = Vec::new();
    let mut goal = |name: String, value: Option<f64>, want: f64| {
        let verdict = match value {
            Some(v) if v >= want => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        let shown = value.map_or("-".into(), |v| format!("{v:.2}"));
        println!("goal {name}: {shown} (want >= {want:.2}): {verdict}");
        goals.push(
            serde_json::json!({"goal": name, "value": value, "want": want, "verdict": verdict}),
        );
    };
    for dir in Direction::ALL {
        let d = dir.name();
        let c4 = k(4096, 1, d, &chosen);
        let c5 = k(512, 1, d, &chosen);
        goal(
            format!("4096 {d}, x newest OpenSSL"),
            one(&c4, &k(4096, 1, d, "openssl-new")),
            1.1,
        );
        goal(
            format!("4096 {d}, fraction of the ceiling ({ceiling:.2} GB/s)"),
            one_abs(&c4).map(|v| v / ceiling),
            0.85,
        );
        goal(
            format!("512 {d}, x newest OpenSSL"),
            one(&c5, &k(512, 1, d, "openssl-new")),
            1.4,
        );
        goal(format!("512 {d}, fraction of 4096"), one(&c5, &c4), 0.75);
        goal(
            format!("4096 {d}, 2 threads / 1 thread (wall)"),
            ratio(runs, &k(4096, 2, d, &chosen), &c4).map(|r| r.0),
            1.8,
        );
    }
    if let Some(f) = floor {
        println!(
            "floor (read-xor-write over 64 MiB, 1 thread): {f:.2} GB/s; \
             ceiling (AES-256 rounds only, widest registers): {ceiling:.2} GB/s"
        );
    }
    if let Some(c) = in_cache {
        println!(
            "chosen backend, 4096 encrypt on 1 MiB (in cache): {c:.2} GB/s = {:.2} of the ceiling",
            c / ceiling
        );
    }

    let summary = serde_json::json!({
        "buffer_bytes": BUF,
        "rounds": ROUNDS,
        "seconds_per_measurement": SECONDS,
        "cpu": cpu_name(),
        "cpuid": sel.cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "chosen_backend": sel.backend.name(),
        "why": sel.reason,
        "openssl_debian": debian_version,
        "openssl_new": new_version,
        "openssl_new_xts_path": path_note,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "warnings": warnings,
        "ceiling_gb_per_s": ceiling,
        "floor_gb_per_s": floor,
        "chosen_in_cache_4096_encrypt_gb_per_s": in_cache,
        "goals": goals,
        "metric": "GB/s = 1e9 bytes per second over whole 64 MiB calls, of wall-clock time \
                   and (1 thread) of the calling thread's CPU time; median, min and max of \
                   the interleaved runs; ratios per run, then median",
        "results": rows,
    });
    let dir = target_dir().join("bench");
    let path = dir.join("xts.json");
    match std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(&summary).unwrap()))
    {
        Ok(()) => println!("summary written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
