//! Known answers (IEEE 1619-2007), cross-checks of every backend against `xts-mode` and
//! OpenSSL, the threaded path, and the error cases.

use std::cell::Cell;

use aes::cipher::KeyInit;
use aes::Aes256;
use openssl::cipher::Cipher as OsslCipher;
use openssl::cipher_ctx::CipherCtx;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use xts_mode::{get_tweak_default, Xts128};

use super::*;

mod vectors;

thread_local! {
    /// Backends a test pretends this CPU lacks (per test thread).
    static HIDDEN: Cell<[bool; 4]> = const { Cell::new([false; 4]) };
}

/// Whether the current test hid `backend` (see [`Backend::is_supported`]).
pub(crate) fn hidden(backend: Backend) -> bool {
    HIDDEN.with(|h| h.get()[backend as usize])
}

fn hide(backend: Backend) {
    HIDDEN.with(|h| {
        let mut v = h.get();
        v[backend as usize] = true;
        h.set(v);
    });
}

/// A seeded generator; the seed goes into every assertion message.
fn rng() -> (StdRng, u64) {
    let seed: u64 = rand::rng().random();
    (StdRng::seed_from_u64(seed), seed)
}

/// Fills `buf` with SplitMix64 output seeded from `rng`: `rand`'s ChaCha is built without
/// optimization in test builds and would dominate the run time on multi-MiB buffers.
fn fill(rng: &mut StdRng, buf: &mut [u8]) {
    let mut state: u64 = rng.random();
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn random_key(rng: &mut StdRng) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    // OpenSSL rejects XTS keys whose halves are equal; 2^-256 odds, but be exact.
    while k[..32] == k[32..] {
        rng.fill_bytes(&mut k);
    }
    k
}

/// The dm-crypt `plain64` tweak of sector `i` of a buffer at byte `offset`.
fn tweak_of(offset: u64, sector_size: usize, i: usize) -> u128 {
    (offset / 512) as u128 + (i * (sector_size / 512)) as u128
}

/// The reference: RustCrypto `xts-mode`, one sector at a time.
fn with_xts_mode(key: &[u8], decrypt: bool, buf: &mut [u8], sector_size: usize, offset: u64) {
    let xts = Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
        let tweak = get_tweak_default(tweak_of(offset, sector_size, i));
        if decrypt {
            xts.decrypt_sector(sector, tweak);
        } else {
            xts.encrypt_sector(sector, tweak);
        }
    }
}

/// The independent peer: OpenSSL EVP aes-256-xts, one call per sector, IV = tweak as
/// 16 little-endian bytes.
fn with_openssl(key: &[u8], decrypt: bool, buf: &mut [u8], sector_size: usize, offset: u64) {
    let mut ctx = CipherCtx::new().unwrap();
    let cipher = OsslCipher::aes_256_xts();
    let mut out = vec![0u8; sector_size + 16];
    for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
        let iv = tweak_of(offset, sector_size, i).to_le_bytes();
        if decrypt {
            ctx.decrypt_init(Some(cipher), Some(key), Some(&iv))
                .unwrap();
        } else {
            ctx.encrypt_init(Some(cipher), Some(key), Some(&iv))
                .unwrap();
        }
        let n = ctx.cipher_update(sector, Some(&mut out)).unwrap();
        assert_eq!(n, sector_size);
        sector.copy_from_slice(&out[..sector_size]);
    }
}

fn run(engine: &Engine, decrypt: bool, buf: &mut [u8], offset: u64) -> Result<(), Error> {
    if decrypt {
        engine.decrypt(buf, offset)
    } else {
        engine.encrypt(buf, offset)
    }
}

fn supported() -> Vec<Backend> {
    Backend::ALL
        .into_iter()
        .filter(|b| b.is_supported())
        .collect()
}

#[test]
fn ieee1619_vectors_10_to_14_on_every_backend_and_both_peers() {
    let key = hex::decode(vectors::KEY).unwrap();
    let pt = vectors::plaintext();
    for v in &vectors::VECTORS {
        let ct = hex::decode(v.ciphertext).unwrap();
        assert_eq!(ct.len(), 512, "vector {}", v.number);
        // Offset of data unit `dusn` with 512-byte sectors: its tweak is the DUSN.
        let offset = v.dusn * 512;
        // The transcription is checked by both peers too.
        for peer in [with_xts_mode, with_openssl] {
            let mut buf = pt.clone();
            peer(&key, false, &mut buf, 512, offset);
            assert_eq!(buf, ct, "peer disagrees with vector {}", v.number);
        }
        for backend in supported() {
            let engine = Engine::with_backend(&key, 512, backend).unwrap();
            let mut buf = pt.clone();
            engine.encrypt(&mut buf, offset).unwrap();
            assert_eq!(buf, ct, "{backend} encrypt, vector {}", v.number);
            engine.decrypt(&mut buf, offset).unwrap();
            assert_eq!(buf, pt, "{backend} decrypt, vector {}", v.number);
        }
    }
}

#[test]
fn this_cpu_runs_the_fast_backends() {
    // A CPU with the instructions must get the backends.
    #[cfg(target_arch = "x86_64")]
    {
        let ni = is_x86_feature_detected!("aes") && is_x86_feature_detected!("pclmulqdq");
        assert_eq!(Backend::AesNi.is_supported(), ni);
        let wide = ni && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("vaes");
        let wide = wide && is_x86_feature_detected!("vpclmulqdq");
        assert_eq!(Backend::Vaes.is_supported(), wide);
        let zmm = wide
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        assert_eq!(Backend::Vaes512.is_supported(), zmm);
        for b in Backend::ALL {
            if !b.is_supported() {
                eprintln!("WARNING: this CPU lacks the {b} backend; its tests only check refusal");
            }
        }
    }
    assert!(Backend::Portable.is_supported());
    let sel = Backend::selection();
    assert!(sel.backend.is_supported(), "{sel}");
    eprintln!("backend selection here: {sel}");
    let engine = Engine::new(&[7u8; KEY_LEN], 4096).unwrap();
    assert_eq!(engine.backend(), Backend::best());
    assert_eq!(engine.sector_size(), 4096);
    assert_eq!(engine.threads(), 1);
}

#[test]
fn the_backend_rule_on_the_cpus_it_names() {
    use crate::select::{choose, Cpu};
    let all = |_: Backend| true;
    let no_avx512 = |b: Backend| b != Backend::Vaes512;
    let no_vaes = |b: Backend| b <= Backend::AesNi;
    let none = |b: Backend| b == Backend::Portable;
    fn cpu<'a>(
        supported: &'a dyn Fn(Backend) -> bool,
        vendor: &'a str,
        family: u32,
        model: u32,
    ) -> Cpu<'a> {
        Cpu {
            supported,
            vendor,
            family,
            model,
        }
    }
    let table: [(Cpu<'_>, Backend); 10] = [
        // AMD EPYC Zen 4 (Genoa), the build machine; Zen 5 (Turin).
        (cpu(&all, "AuthenticAMD", 25, 0x11), Backend::Vaes512),
        (cpu(&all, "AuthenticAMD", 26, 0x02), Backend::Vaes512),
        // Zen 3: VAES, no AVX-512.
        (cpu(&no_avx512, "AuthenticAMD", 25, 0x01), Backend::Vaes),
        // Intel Emerald Rapids, Sapphire Rapids: zmm without downclocking.
        (cpu(&all, "GenuineIntel", 6, 0xcf), Backend::Vaes512),
        (cpu(&all, "GenuineIntel", 6, 0x8f), Backend::Vaes512),
        // Ice Lake-SP and Tiger Lake downclock: ymm.
        (cpu(&all, "GenuineIntel", 6, 0x6a), Backend::Vaes),
        (cpu(&all, "GenuineIntel", 6, 0x8c), Backend::Vaes),
        // Skylake-SP: AVX-512 but no VAES.
        (cpu(&no_vaes, "GenuineIntel", 6, 0x55), Backend::AesNi),
        (cpu(&no_vaes, "AuthenticAMD", 23, 0x31), Backend::AesNi),
        (cpu(&none, "GenuineIntel", 6, 0x0f), Backend::Portable),
    ];
    for (c, want) in table {
        let got = choose(c);
        assert_eq!(got.backend, want, "{got}");
        assert!(!got.reason.is_empty());
    }
}

/// Sector counts and offsets (in sectors) for the cross-checks: small and odd counts,
/// one full 4096-sector buffer, offsets at 0, around 2^32 sectors, beyond, and at the top
/// of the u64 byte range.
fn cases(rng: &mut StdRng, sector_size: usize) -> Vec<(usize, u64)> {
    let top = u64::MAX / sector_size as u64;
    let mut cases = vec![
        (1, 0),
        (2, 1),
        (7, 3),
        (8, 8),
        (9, (1 << 32) - 4),
        (33, (1 << 32) + 5),
        (4096, (1 << 32) - 2048),
        (1, top - 1),
        (17, top - 17),
    ];
    for _ in 0..6 {
        let n = rng.random_range(1..=4096 / (sector_size / 512));
        let first = rng.random_range(0..top - n as u64);
        cases.push((n, first));
    }
    cases
}

fn cross_check(backend: Backend) {
    let (mut rng, seed) = rng();
    let mut key = random_key(&mut rng);
    if !backend.is_supported() {
        eprintln!(
            "WARNING: this CPU lacks the {backend} backend: its cross-checks did NOT run, \
             only its refusal is checked"
        );
        // On a CPU without it, the backend must refuse rather than misbehave.
        let e = Engine::with_backend(&key, 512, backend).err();
        assert_eq!(e, Some(Error::Unsupported(backend)));
        return;
    }
    for sector_size in [512usize, 4096] {
        for (n, first) in cases(&mut rng, sector_size) {
            key = random_key(&mut rng);
            let engine = Engine::with_backend(&key, sector_size, backend).unwrap();
            let offset = first * sector_size as u64;
            for decrypt in [false, true] {
                let mut input = vec![0u8; n * sector_size];
                fill(&mut rng, &mut input);
                let what = format!(
                    "{backend} {} {n}x{sector_size} at sector {first} (seed {seed})",
                    if decrypt { "decrypt" } else { "encrypt" }
                );
                let mut ours = input.clone();
                run(&engine, decrypt, &mut ours, offset).unwrap();
                assert_ne!(ours, input, "{what}: nothing happened");
                let mut theirs = input.clone();
                with_openssl(&key, decrypt, &mut theirs, sector_size, offset);
                assert!(ours == theirs, "{what}: differs from OpenSSL");
                let mut theirs = input.clone();
                with_xts_mode(&key, decrypt, &mut theirs, sector_size, offset);
                assert!(ours == theirs, "{what}: differs from xts-mode");
                run(&engine, !decrypt, &mut ours, offset).unwrap();
                assert!(ours == input, "{what}: no round trip");
            }
        }
    }
}

#[test]
fn portable_matches_xts_mode_and_openssl() {
    cross_check(Backend::Portable);
}

#[test]
fn aesni_matches_xts_mode_and_openssl() {
    cross_check(Backend::AesNi);
}

#[test]
fn vaes_matches_xts_mode_and_openssl() {
    cross_check(Backend::Vaes);
}

#[test]
fn vaes512_matches_xts_mode_and_openssl() {
    cross_check(Backend::Vaes512);
}

#[test]
fn a_4096_byte_sector_is_one_data_unit_with_tweak_8k() {
    // The rule DESIGN.md calls easy to get wrong, spelled out against OpenSSL directly.
    let (mut rng, seed) = rng();
    let key = random_key(&mut rng);
    let k: u64 = rng.random_range(0..1 << 40);
    let mut sector = vec![0u8; 4096];
    fill(&mut rng, &mut sector);
    for backend in supported() {
        let mut ours = sector.clone();
        let engine = Engine::with_backend(&key, 4096, backend).unwrap();
        engine.encrypt(&mut ours, k * 4096).unwrap();
        let mut ctx = CipherCtx::new().unwrap();
        let iv = (8 * k as u128).to_le_bytes();
        ctx.encrypt_init(Some(OsslCipher::aes_256_xts()), Some(&key), Some(&iv))
            .unwrap();
        let mut theirs = vec![0u8; 4096 + 16];
        ctx.cipher_update(&sector, Some(&mut theirs)).unwrap();
        assert!(ours == theirs[..4096], "{backend}, k = {k}, seed {seed}");
    }
}

#[test]
fn threaded_requests_equal_single_threaded() {
    let (mut rng, seed) = rng();
    let key = random_key(&mut rng);
    for backend in supported() {
        for sector_size in [512usize, 4096] {
            let single = Engine::with_backend(&key, sector_size, backend).unwrap();
            let min_sectors = PARALLEL_MIN_BYTES / sector_size;
            // Just below and at the threshold, and an odd count well above it.
            for n in [min_sectors - 1, min_sectors, 2 * min_sectors + 3] {
                let mut input = vec![0u8; n * sector_size];
                fill(&mut rng, &mut input);
                let offset = rng.random_range(0..1u64 << 40) * sector_size as u64;
                for threads in [2, 3, 7] {
                    let multi = Engine::with_backend(&key, sector_size, backend)
                        .unwrap()
                        .with_threads(threads);
                    assert_eq!(multi.threads(), threads);
                    for decrypt in [false, true] {
                        let mut a = input.clone();
                        let mut b = input.clone();
                        run(&single, decrypt, &mut a, offset).unwrap();
                        run(&multi, decrypt, &mut b, offset).unwrap();
                        assert!(
                            a == b,
                            "{backend} {n}x{sector_size} threads {threads} (seed {seed})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn splitting_tiny_requests_across_more_threads_than_sectors() {
    let (mut rng, seed) = rng();
    let key = random_key(&mut rng);
    for backend in supported() {
        for sector_size in [512usize, 4096] {
            let single = Engine::with_backend(&key, sector_size, backend).unwrap();
            let multi = Engine::with_backend(&key, sector_size, backend)
                .unwrap()
                .with_threads(7)
                .with_parallel_min(0);
            for n in [1usize, 2, 3, 5, 8, 13] {
                let mut a = vec![0u8; n * sector_size];
                fill(&mut rng, &mut a);
                let mut b = a.clone();
                let offset = rng.random_range(0..1u64 << 40) * sector_size as u64;
                single.encrypt(&mut a, offset).unwrap();
                multi.encrypt(&mut b, offset).unwrap();
                assert!(a == b, "{backend} {n}x{sector_size} (seed {seed})");
            }
        }
    }
}

#[test]
fn one_engine_serves_concurrent_callers() {
    // As the FUSE threads do: one shared engine, each thread its own region.
    let (mut rng, seed) = rng();
    let key = random_key(&mut rng);
    for backend in supported() {
        let engine = Engine::with_backend(&key, 4096, backend).unwrap();
        let mut regions: Vec<(u64, Vec<u8>)> = (0..4u64)
            .map(|i| {
                let mut v = vec![0u8; 64 * 4096];
                fill(&mut rng, &mut v);
                (i * (1 << 32) * 4096, v)
            })
            .collect();
        let want: Vec<Vec<u8>> = regions
            .iter()
            .map(|(offset, v)| {
                let mut w = v.clone();
                with_openssl(&key, false, &mut w, 4096, *offset);
                w
            })
            .collect();
        std::thread::scope(|s| {
            for (offset, v) in regions.iter_mut() {
                let engine = &engine;
                s.spawn(move || engine.encrypt(v, *offset).unwrap());
            }
        });
        for (i, ((_, got), want)) in regions.iter().zip(&want).enumerate() {
            assert!(got == want, "{backend} region {i} (seed {seed})");
        }
    }
}

#[test]
fn bad_input_is_an_error_and_leaves_the_buffer_alone() {
    let key = [0x42u8; KEY_LEN];
    for len in [0, 1, 32, 63, 65, 128] {
        let e = Engine::new(&vec![1u8; len], 512).err();
        assert_eq!(e, Some(Error::KeyLength(len)));
    }
    for ss in [0, 1, 256, 1024, 2048, 8192] {
        assert_eq!(Engine::new(&key, ss).err(), Some(Error::SectorSize(ss)));
    }
    for backend in supported() {
        for ss in [512usize, 4096] {
            let engine = Engine::with_backend(&key, ss, backend)
                .unwrap()
                .with_threads(2);
            for len in [1, 16, ss - 16, ss + 16, 3 * ss - 1] {
                let mut buf = vec![9u8; len];
                for decrypt in [false, true] {
                    let e = run(&engine, decrypt, &mut buf, 0).err();
                    assert_eq!(
                        e,
                        Some(Error::PartialSector {
                            len,
                            sector_size: ss
                        })
                    );
                    assert!(buf.iter().all(|&b| b == 9));
                }
            }
            for offset in [1, 16, 256, ss as u64 / 2, ss as u64 + 512, u64::MAX] {
                if offset.is_multiple_of(ss as u64) {
                    continue;
                }
                let mut buf = vec![9u8; ss];
                for decrypt in [false, true] {
                    let e = run(&engine, decrypt, &mut buf, offset).err();
                    assert_eq!(
                        e,
                        Some(Error::Misaligned {
                            offset,
                            sector_size: ss
                        })
                    );
                    assert!(buf.iter().all(|&b| b == 9));
                }
            }
            // An empty request is a whole number of sectors: nothing to do.
            engine.encrypt(&mut [], 0).unwrap();
        }
    }
    assert_eq!(Engine::new(&key, 512).unwrap().with_threads(0).threads(), 1);
}

#[test]
fn a_backend_the_cpu_lacks_is_refused() {
    // This thread pretends the CPU lacks AVX-512, then VAES, then AES-NI too.
    let key = [0x42u8; KEY_LEN];
    hide(Backend::Vaes512);
    assert!(!Backend::Vaes512.is_supported());
    let e = Engine::with_backend(&key, 4096, Backend::Vaes512).err();
    assert_eq!(e, Some(Error::Unsupported(Backend::Vaes512)));
    assert_ne!(Backend::best(), Backend::Vaes512);
    hide(Backend::Vaes);
    assert!(!Backend::Vaes.is_supported());
    let e = Engine::with_backend(&key, 4096, Backend::Vaes).err();
    assert_eq!(e, Some(Error::Unsupported(Backend::Vaes)));
    assert_ne!(Backend::best(), Backend::Vaes);
    hide(Backend::AesNi);
    let e = Engine::with_backend(&key, 512, Backend::AesNi).err();
    assert_eq!(e, Some(Error::Unsupported(Backend::AesNi)));
    assert_eq!(Backend::best(), Backend::Portable);
    assert_eq!(Engine::new(&key, 512).unwrap().backend(), Backend::Portable);
    assert!(Error::Unsupported(Backend::Vaes)
        .to_string()
        .contains("vaes"));
}

#[test]
fn engine_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Engine>();
}

#[test]
fn bench_measures_every_supported_backend() {
    let results = bench(0.0, 2);
    let backends = supported();
    assert_eq!(results.len(), backends.len() * 2 * 2);
    for b in backends {
        for ss in [512, 4096] {
            for dir in Direction::ALL {
                let r = results
                    .iter()
                    .find(|r| r.backend == b && r.sector_size == ss && r.direction == dir)
                    .unwrap_or_else(|| panic!("no result for {b} {ss} {dir:?}"));
                assert_eq!(r.threads, 2);
                assert!(r.bytes >= BENCH_BUFFER as u64);
                assert!(r.gb_per_s.is_finite() && r.gb_per_s > 0.0, "{r:?}");
            }
        }
    }
    let json = serde_json::to_value(&results[0]).unwrap();
    assert_eq!(json["backend"], "portable");
    assert_eq!(json["direction"], "encrypt");
}
