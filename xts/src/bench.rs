//! A quick throughput measurement of every backend this CPU supports, behind
//! `nodecrypt bench`. (The side-by-side comparison with OpenSSL and `xts-mode` is the
//! criterion bench `benches/benches/xts.rs`.)

use std::time::{Duration, Instant};

use crate::{Backend, Direction, Engine, KEY_LEN};

/// Bytes pushed through the engine per call: large enough to split across threads and
/// to amortise the call, small enough to sit in the L3 cache of a server core complex.
pub const BENCH_BUFFER: usize = 16 << 20;

/// One measurement of [`bench()`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchResult {
    /// The backend measured.
    pub backend: Backend,
    /// Encryption sector size in bytes (512 or 4096).
    pub sector_size: usize,
    /// Encrypt or decrypt.
    pub direction: Direction,
    /// Threads per request ([`Engine::with_threads`]).
    pub threads: usize,
    /// Bytes processed while timing.
    pub bytes: u64,
    /// Time spent, in seconds.
    pub seconds: f64,
    /// Throughput in GB/s (10⁹ bytes per second).
    pub gb_per_s: f64,
}

/// Measures every supported backend, sector sizes 512 and 4096, both directions, for
/// about `seconds` each (at least one pass over a [`BENCH_BUFFER`]-byte buffer), with
/// up to `threads` threads per request (0 means 1). Uses a fixed, non-secret key.
/// Takes about `16 · seconds` on a CPU with all four backends.
pub fn bench(seconds: f64, threads: usize) -> Vec<BenchResult> {
    let budget = if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds.min(3600.0))
    } else {
        Duration::ZERO
    };
    let threads = threads.max(1);
    let key: [u8; KEY_LEN] = std::array::from_fn(|i| i as u8 ^ 0xa5);
    let mut buf = vec![0x5au8; BENCH_BUFFER];
    let mut out = Vec::new();
    for backend in Backend::ALL.into_iter().filter(|b| b.is_supported()) {
        for sector_size in [512usize, 4096] {
            let Ok(engine) = Engine::with_backend(&key, sector_size, backend) else {
                continue;
            };
            let engine = engine.with_threads(threads);
            for direction in Direction::ALL {
                let run = |buf: &mut [u8]| match direction {
                    Direction::Encrypt => engine.encrypt(buf, 0),
                    Direction::Decrypt => engine.decrypt(buf, 0),
                };
                // One untimed pass: page faults, caches, CPU frequency.
                let _ = run(&mut buf);
                let start = Instant::now();
                let mut bytes = 0u64;
                loop {
                    let _ = run(&mut buf);
                    bytes += buf.len() as u64;
                    if start.elapsed() >= budget {
                        break;
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                out.push(BenchResult {
                    backend,
                    sector_size,
                    direction,
                    threads,
                    bytes,
                    seconds: secs,
                    gb_per_s: bytes as f64 / secs / 1e9,
                });
            }
        }
    }
    out
}
