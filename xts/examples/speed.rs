//! Single-thread throughput per CPU-second (robust on a shared machine: the time comes
//! from /proc/thread-self/schedstat, so time slices lost to other processes don't
//! count), for each backend and for OpenSSL EVP aes-256-xts called per sector.
//! `cargo run --release -p nodecrypt-xts --example speed -- [MiB] [seconds] [filter]`

use std::time::Instant;

use nodecrypt_xts::{Backend, Engine};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn measure(label: &str, bytes: usize, secs: f64, mut f: impl FnMut()) {
    f();
    let (c0, w0) = (cpu_ns(), Instant::now());
    let mut n = 0u64;
    while w0.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    let cpu = (cpu_ns() - c0) as f64 / 1e9;
    let wall = w0.elapsed().as_secs_f64();
    let total = (n * bytes as u64) as f64;
    println!(
        "{label:<24} {:>6.2} GB/s per CPU-s   {:>6.2} GB/s wall  (cpu {:.0}%)",
        total / cpu / 1e9,
        total / wall / 1e9,
        100.0 * cpu / wall
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map_or(16, |s| s.parse().unwrap());
    let secs: f64 = args.get(2).map_or(1.0, |s| s.parse().unwrap());
    let filter = args.get(3).cloned().unwrap_or_default();
    let key: [u8; 64] = std::array::from_fn(|i| i as u8 ^ 0x3c);
    let mut buf = vec![0x5au8; mib << 20];
    for ss in [4096usize, 512] {
        for dec in [false, true] {
            let dir = if dec { "dec" } else { "enc" };
            let label = format!("openssl {ss} {dir}");
            if label.contains(&filter) {
                // Key schedule once; per sector only the IV is set (EVP_CipherInit_ex
                // with NULL cipher and key keeps the key).
                let mut ctx = CipherCtx::new().unwrap();
                if dec {
                    ctx.decrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
                        .unwrap();
                } else {
                    ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
                        .unwrap();
                }
                measure(&label, buf.len(), secs, || {
                    for (i, s) in buf.chunks_exact_mut(ss).enumerate() {
                        let iv = ((i * ss / 512) as u128).to_le_bytes();
                        if dec {
                            ctx.decrypt_init(None, None, Some(&iv)).unwrap();
                        } else {
                            ctx.encrypt_init(None, None, Some(&iv)).unwrap();
                        }
                        ctx.cipher_update_inplace(s, ss).unwrap();
                    }
                });
            }
            for b in Backend::ALL.into_iter().filter(|b| b.is_supported()) {
                let label = format!("{b} {ss} {dir}");
                if !label.contains(&filter) {
                    continue;
                }
                let e = Engine::with_backend(&key, ss, b).unwrap();
                measure(&label, buf.len(), secs, || {
                    if dec {
                        e.decrypt(&mut buf, 0).unwrap()
                    } else {
                        e.encrypt(&mut buf, 0).unwrap()
                    }
                });
            }
        }
    }
}
