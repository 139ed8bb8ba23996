//! AES-256-XTS throughput, side by side: every backend of `nodecrypt-xts` this CPU runs,
//! OpenSSL EVP aes-256-xts called once per sector (key set once, IV reset per sector),
//! and RustCrypto `xts-mode` — 64 MiB buffers, 1 and 2 threads, 512- and 4096-byte
//! sectors, encrypt and decrypt, in place.
//!
//! `cargo bench -p nodecrypt-benches --bench xts` (about 4 minutes). At the end it prints
//! a table (GB/s, ratio to OpenSSL in the same configuration) and writes it to
//! `target/bench/xts.json`. Figures are the median over criterion's samples of bytes per
//! second of wall time, so on a shared machine they include time lost to other loads
//! (the JSON records the load average before and after the run). Two more columns resist
//! such loads: single-thread rows give bytes per second of the thread's own CPU time, and
//! every row gives its fastest single call, from which the two-thread speed-up is taken.
//!
//! Two-thread runs split each 64 MiB request in two at a sector boundary: the engine
//! through `Engine::with_threads(2)`, the peers with one scoped thread per half.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use aes::Aes256;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use nodecrypt_xts::{Backend, Direction, Engine};
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use xts_mode::{get_tweak_default, Xts128};

/// Bytes per request.
const BUF: usize = 64 << 20;

/// A fixed, non-secret benchmark key (distinct halves, as OpenSSL requires).
fn key() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5c)
}

/// What is measured.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Impl {
    Engine(Backend),
    OpenSsl,
    XtsMode,
}

impl Impl {
    fn name(self) -> String {
        match self {
            Impl::Engine(b) => format!("nodecrypt-{b}"),
            Impl::OpenSsl => "openssl-evp".into(),
            Impl::XtsMode => "xts-mode".into(),
        }
    }

    /// Slow implementations get one call per sample and a longer budget.
    fn slow(self) -> bool {
        matches!(self, Impl::XtsMode | Impl::Engine(Backend::Portable))
    }
}

/// A ready-to-run implementation for one (sector size, threads) configuration.
enum Runner {
    Engine(Engine),
    OpenSsl {
        threads: usize,
    },
    XtsMode {
        xts: Box<Xts128<Aes256>>,
        threads: usize,
    },
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
            Impl::OpenSsl => Runner::OpenSsl { threads },
            Impl::XtsMode => Runner::XtsMode {
                xts: Box::new(Xts128::new(
                    Aes256::new_from_slice(&key[..32]).unwrap(),
                    Aes256::new_from_slice(&key[32..]).unwrap(),
                )),
                threads,
            },
        }
    }

    fn run(&self, dir: Direction, buf: &mut [u8], sector_size: usize) {
        let decrypt = dir == Direction::Decrypt;
        match self {
            Runner::Engine(e) => match dir {
                Direction::Encrypt => e.encrypt(buf, 0).unwrap(),
                Direction::Decrypt => e.decrypt(buf, 0).unwrap(),
            },
            Runner::OpenSsl { threads } => split(buf, sector_size, *threads, |part, tweak| {
                openssl_sectors(decrypt, part, sector_size, tweak)
            }),
            Runner::XtsMode { xts, threads } => split(buf, sector_size, *threads, |part, t0| {
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

type Key = (usize, usize, &'static str, Impl);

/// Per configuration: bytes per wall-clock second of each timed batch.
static RATES: Mutex<BTreeMap<Key, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Per single-thread configuration: bytes per second of the calling thread's CPU time.
static CPU_RATES: Mutex<BTreeMap<Key, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Per configuration: bytes per second of the fastest single call of each batch. On a
/// shared machine preemption only adds time, so the best call estimates the unloaded
/// speed; it is what the two-thread speed-up is computed from.
static BEST: Mutex<BTreeMap<Key, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Nanoseconds this thread has spent on a CPU (unaffected by time slices lost to other
/// processes), from /proc/thread-self/schedstat; `None` where that file is missing.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn implementations() -> Vec<Impl> {
    let mut v: Vec<Impl> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_supported())
        .map(Impl::Engine)
        .collect();
    v.push(Impl::OpenSsl);
    v.push(Impl::XtsMode);
    v
}

/// Every implementation must produce OpenSSL's bytes before it is timed.
fn check_agreement(buf: &mut [u8]) {
    for ss in [512usize, 4096] {
        let sample = &mut buf[..64 * 4096];
        for (i, b) in sample.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let mut want = sample.to_vec();
        openssl_sectors(false, &mut want, ss, 0);
        for imp in implementations() {
            for threads in [1, 2] {
                let mut got = sample.to_vec();
                Runner::new(imp, ss, threads).run(Direction::Encrypt, &mut got, ss);
                assert!(
                    got == want,
                    "{} disagrees with OpenSSL ({ss}, {threads}t)",
                    imp.name()
                );
            }
        }
    }
}

fn bench_xts(c: &mut Criterion) {
    let mut buf = vec![0x3au8; BUF];
    check_agreement(&mut buf);
    for imp in implementations() {
        for threads in [1usize, 2] {
            let mut group = c.benchmark_group(format!("xts/{}/{threads}t", imp.name()));
            group.throughput(Throughput::Bytes(BUF as u64));
            group.sample_size(10);
            if imp.slow() {
                group.sampling_mode(SamplingMode::Flat);
                group.warm_up_time(Duration::from_millis(300));
                group.measurement_time(Duration::from_secs(2));
            } else {
                group.warm_up_time(Duration::from_millis(500));
                group.measurement_time(Duration::from_millis(2000));
            }
            for ss in [512usize, 4096] {
                let runner = Runner::new(imp, ss, threads);
                for dir in Direction::ALL {
                    let id = BenchmarkId::new(dir.name(), ss);
                    let key: Key = (ss, threads, dir.name(), imp);
                    group.bench_function(id, |b| {
                        b.iter_custom(|iters| {
                            let cpu0 = thread_cpu_ns();
                            let start = Instant::now();
                            let mut fastest = f64::MAX;
                            for _ in 0..iters {
                                let call = Instant::now();
                                runner.run(dir, &mut buf, ss);
                                fastest = fastest.min(call.elapsed().as_secs_f64());
                            }
                            let took = start.elapsed();
                            BEST.lock()
                                .unwrap()
                                .entry(key)
                                .or_default()
                                .push(BUF as f64 / fastest);
                            let bytes = (iters as usize * BUF) as f64;
                            let rate = bytes / took.as_secs_f64();
                            RATES.lock().unwrap().entry(key).or_default().push(rate);
                            if let (1, Some(a), Some(b)) = (threads, cpu0, thread_cpu_ns()) {
                                let cpu_rate = bytes / ((b - a).max(1) as f64 / 1e9);
                                CPU_RATES
                                    .lock()
                                    .unwrap()
                                    .entry(key)
                                    .or_default()
                                    .push(cpu_rate);
                            }
                            took
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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

fn summarize(load_before: &str) {
    let medians_of = |m: &Mutex<BTreeMap<Key, Vec<f64>>>| -> BTreeMap<Key, (f64, usize)> {
        let mut m = m.lock().unwrap();
        m.iter_mut()
            .map(|(k, v)| (*k, (median(v) / 1e9, v.len())))
            .collect()
    };
    let wall = medians_of(&RATES);
    let cpu = medians_of(&CPU_RATES);
    let best: BTreeMap<Key, f64> = BEST
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (*k, v.iter().copied().fold(0.0, f64::max) / 1e9))
        .collect();
    let mut rows = Vec::new();
    println!();
    println!(
        "AES-256-XTS, {} MiB in place, GB/s (1e9 bytes/s); x = ratio to OpenSSL EVP",
        BUF >> 20
    );
    println!("  median: of criterion samples, wall clock");
    println!("  cpu:    median per second of the calling thread's CPU time (1 thread only)");
    println!("  best:   fastest single call; 2t/1t = best speed-up over the same row at 1 thread");
    println!(
        "{:<19} {:>6} {:>3} {:>7} {:>7} {:>5} {:>7} {:>5} {:>7} {:>5} {:>6}",
        "impl", "sector", "thr", "dir", "median", "x", "cpu", "x", "best", "x", "2t/1t"
    );
    let text = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    for ss in [512usize, 4096] {
        for threads in [1usize, 2] {
            for dir in Direction::ALL {
                let k = |imp, t| (ss, t, dir.name(), imp);
                let base = wall.get(&k(Impl::OpenSsl, threads)).map(|m| m.0);
                let cpu_base = cpu.get(&k(Impl::OpenSsl, threads)).map(|m| m.0);
                let best_base = best.get(&k(Impl::OpenSsl, threads)).copied();
                for imp in implementations() {
                    let Some(&(gbps, samples)) = wall.get(&k(imp, threads)) else {
                        continue;
                    };
                    let ratio = base.map(|b| gbps / b);
                    let cpu_gbps = cpu.get(&k(imp, threads)).map(|m| m.0);
                    let cpu_ratio = cpu_gbps.zip(cpu_base).map(|(a, b)| a / b);
                    let best_gbps = best.get(&k(imp, threads)).copied();
                    let best_ratio = best_gbps.zip(best_base).map(|(a, b)| a / b);
                    let speedup = (threads > 1)
                        .then(|| best_gbps.zip(best.get(&k(imp, 1)).copied()))
                        .flatten()
                        .map(|(a, b)| a / b);
                    println!(
                        "{:<19} {:>6} {:>3} {:>7} {:>7.2} {:>5} {:>7} {:>5} {:>7} {:>5} {:>6}",
                        imp.name(),
                        ss,
                        threads,
                        dir.name(),
                        gbps,
                        text(ratio),
                        text(cpu_gbps),
                        text(cpu_ratio),
                        text(best_gbps),
                        text(best_ratio),
                        text(speedup),
                    );
                    rows.push(serde_json::json!({
                        "implementation": imp.name(),
                        "sector_size": ss,
                        "threads": threads,
                        "direction": dir.name(),
                        "gb_per_s": gbps,
                        "ratio_to_openssl": ratio,
                        "cpu_gb_per_s": cpu_gbps,
                        "cpu_ratio_to_openssl": cpu_ratio,
                        "best_gb_per_s": best_gbps,
                        "best_ratio_to_openssl": best_ratio,
                        "best_speedup_over_1_thread": speedup,
                        "samples": samples,
                    }));
                }
            }
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let summary = serde_json::json!({
        "buffer_bytes": BUF,
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "best_backend": Backend::best().name(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "metric": "gb_per_s: median over criterion samples of bytes per wall-clock second; \
                   cpu_gb_per_s (1 thread only): median per second of the thread's CPU time; \
                   best_gb_per_s: fastest single call; GB = 1e9 bytes",
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

fn main() {
    let load_before = loadavg();
    let mut c = Criterion::default().without_plots().configure_from_args();
    bench_xts(&mut c);
    c.final_summary();
    summarize(&load_before);
}
