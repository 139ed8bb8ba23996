//! Measures where splitting a request across two threads starts to pay, for
//! `PARALLEL_MIN_BYTES`: `cargo run --release -p nodecrypt-xts --example threshold [backend]`.
//! Prints, for request sizes from 64 KiB to 16 MiB, the time per request on one thread
//! and on two (the threshold forced to each size), and the speed-up.

use std::time::Instant;

use nodecrypt_xts::{Backend, Engine};

fn main() {
    let key: [u8; 64] = std::array::from_fn(|i| i as u8);
    let only = std::env::args().nth(1);
    let wanted = |b: &Backend| only.as_deref().is_none_or(|o| o == b.name());
    for backend in Backend::ALL
        .into_iter()
        .filter(|b| b.is_supported() && wanted(b))
    {
        let one = Engine::with_backend(&key, 4096, backend).unwrap();
        let two = Engine::with_backend(&key, 4096, backend)
            .unwrap()
            .with_threads(2)
            .with_parallel_min(0);
        println!("{backend}: single-thread GB/s at 16 MiB, then size, 1 thread, 2 threads, ratio");
        let mut kib = 64;
        while kib <= 16 * 1024 {
            let mut buf = vec![0u8; kib * 1024];
            let iters = (256 * 1024 * 1024 / buf.len()).clamp(8, 4096);
            let time = |e: &Engine, buf: &mut [u8]| {
                e.encrypt(buf, 0).unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    e.encrypt(buf, 0).unwrap();
                }
                t.elapsed().as_secs_f64() / iters as f64
            };
            let t1 = time(&one, &mut buf);
            let t2 = time(&two, &mut buf);
            println!(
                "  {kib:>6} KiB  {:>8.1} µs ({:.2} GB/s)  {:>8.1} µs  x{:.2}",
                t1 * 1e6,
                buf.len() as f64 / t1 / 1e9,
                t2 * 1e6,
                t1 / t2
            );
            kib *= 2;
        }
    }
}
