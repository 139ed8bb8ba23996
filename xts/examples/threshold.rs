//! Measures where splitting a request across two threads starts to pay, for
//! `PARALLEL_MIN_BYTES`, and the two-thread speed-up on large requests:
//! `cargo run --release -p nodecrypt-xts --example threshold [backend] [rounds]`.
//!
//! For request sizes from 64 KiB to 64 MiB it times one request on one thread and on
//! two (the threshold forced to 0), alternating, many times, and keeps the fastest of
//! each: on a shared machine preemption only ever adds time, so the minimum is the best
//! estimate of the unloaded cost. Also prints the cost of spawning and joining one
//! scoped thread that does nothing.

use std::time::{Duration, Instant};

use nodecrypt_xts::{Backend, Engine};

fn fastest(rounds: usize, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let only = std::env::args().nth(1);
    let rounds: usize = std::env::args().nth(2).map_or(200, |s| s.parse().unwrap());
    let spawn = fastest(rounds * 10, || std::thread::scope(|s| drop(s.spawn(|| ()))));
    println!(
        "spawn + join of an empty scoped thread: {:.1} µs (fastest)",
        spawn.as_secs_f64() * 1e6
    );
    let key: [u8; 64] = std::array::from_fn(|i| i as u8);
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
        println!("{backend}, 4096-byte sectors: size, 1 thread, 2 threads, speed-up (fastest of {rounds})");
        let mut kib = 64;
        while kib <= 64 * 1024 {
            let mut buf = vec![0u8; kib * 1024];
            let n = (rounds * 1024 / kib).clamp(rounds / 4, rounds);
            let mut t1 = Duration::MAX;
            let mut t2 = Duration::MAX;
            for _ in 0..n {
                t1 = t1.min(fastest(1, || one.encrypt(&mut buf, 0).unwrap()));
                t2 = t2.min(fastest(1, || two.encrypt(&mut buf, 0).unwrap()));
            }
            println!(
                "  {kib:>6} KiB  {:>9.1} µs ({:>5.2} GB/s)  {:>9.1} µs ({:>5.2} GB/s)  x{:.2}",
                t1.as_secs_f64() * 1e6,
                buf.len() as f64 / t1.as_secs_f64() / 1e9,
                t2.as_secs_f64() * 1e6,
                buf.len() as f64 / t2.as_secs_f64() / 1e9,
                t1.as_secs_f64() / t2.as_secs_f64()
            );
            kib *= 2;
        }
    }
}
