//! Per-sector AES-256-XTS throughput of the OpenSSL this crate links (built from source by
//! `openssl-src`), measured exactly like the in-process OpenSSL runner of
//! `benches/benches/xts.rs`: one EVP context, key set once, then per sector an
//! `EVP_CipherInit_ex` with the IV only and one in-place `EVP_CipherUpdate`.
//!
//! ```text
//! openssl-new version
//! openssl-new run <sector_size> <encrypt|decrypt> <threads> <buffer_bytes> <seconds>
//! openssl-new check <sector_size>     (hex of 64 sectors of a known pattern, encrypted)
//! ```
//!
//! `run` makes one untimed pass, then times whole passes over the buffer for about
//! `seconds` and prints one JSON line: `{"gb_per_s": .., "cpu_gb_per_s": .., ...}`
//! (`cpu_gb_per_s`: per second of the thread's CPU time, one thread only, else null).
#![forbid(unsafe_code)]

use std::time::Instant;

use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;

/// The bench's fixed, non-secret key (the same function as in benches/benches/xts.rs).
fn key() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5c)
}

fn sectors(decrypt: bool, buf: &mut [u8], sector_size: usize, first_tweak: u128) {
    let key = key();
    let mut ctx = CipherCtx::new().expect("EVP_CIPHER_CTX_new");
    let init = |ctx: &mut CipherCtx, c: Option<&CipherRef>, k: Option<&[u8]>, iv: Option<&[u8]>| {
        if decrypt {
            ctx.decrypt_init(c, k, iv).expect("EVP_DecryptInit_ex")
        } else {
            ctx.encrypt_init(c, k, iv).expect("EVP_EncryptInit_ex")
        }
    };
    init(&mut ctx, Some(Cipher::aes_256_xts()), Some(&key[..]), None);
    let step = (sector_size / 512) as u128;
    for (i, s) in buf.chunks_exact_mut(sector_size).enumerate() {
        let iv = (first_tweak + i as u128 * step).to_le_bytes();
        init(&mut ctx, None, None, Some(&iv[..]));
        ctx.cipher_update_inplace(s, sector_size)
            .expect("EVP_CipherUpdate");
    }
}

/// One pass over `buf` on 1 or 2 threads, split at a sector boundary as the bench does.
fn pass(decrypt: bool, buf: &mut [u8], sector_size: usize, threads: usize) {
    if threads <= 1 {
        return sectors(decrypt, buf, sector_size, 0);
    }
    let half = buf.len() / sector_size / 2 * sector_size;
    let (a, b) = buf.split_at_mut(half);
    let tweak_b = (half / 512) as u128;
    std::thread::scope(|s| {
        s.spawn(|| sectors(decrypt, a, sector_size, 0));
        sectors(decrypt, b, sector_size, tweak_b);
    });
}

/// Nanoseconds this thread has run on a CPU (time slices lost to other processes do not
/// count), from /proc/thread-self/schedstat.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn usage() -> ! {
    eprintln!("usage: openssl-new version | check <ss> | run <ss> <encrypt|decrypt> <threads> <bytes> <seconds>");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.first().map(String::as_str) {
        Some("version") => println!("{}", openssl::version::version()),
        Some("check") => {
            let ss = num(1);
            let mut buf: Vec<u8> = (0..64 * 4096).map(|i| (i * 7 + 3) as u8).collect();
            sectors(false, &mut buf, ss, 0);
            let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            println!("{hex}");
        }
        Some("run") => {
            let ss = num(1);
            let decrypt = match args.get(2).map(String::as_str) {
                Some("encrypt") => false,
                Some("decrypt") => true,
                _ => usage(),
            };
            let threads = num(3);
            let bytes = num(4);
            let seconds: f64 = args
                .get(5)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| usage());
            let mut buf = vec![0x3au8; bytes / ss * ss];
            pass(decrypt, &mut buf, ss, threads);
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let mut calls = 0u64;
            let mut fastest = f64::MAX;
            loop {
                let t = Instant::now();
                pass(decrypt, &mut buf, ss, threads);
                fastest = fastest.min(t.elapsed().as_secs_f64());
                calls += 1;
                if start.elapsed().as_secs_f64() >= seconds {
                    break;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let total = calls as f64 * buf.len() as f64;
            // Per second of this thread's CPU time: meaningful for one thread only.
            let cpu = match (threads, cpu0, thread_cpu_ns()) {
                (1, Some(a), Some(b)) => format!("{}", total / ((b - a).max(1) as f64 / 1e9) / 1e9),
                _ => "null".to_string(),
            };
            println!(
                "{{\"gb_per_s\": {}, \"cpu_gb_per_s\": {cpu}, \"best_gb_per_s\": {}, \"calls\": {calls}, \"seconds\": {secs}}}",
                total / secs / 1e9,
                buf.len() as f64 / fastest / 1e9
            );
        }
        _ => usage(),
    }
}
