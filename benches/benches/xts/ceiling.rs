//! The references of the XTS bench: the per-core AES-256 ceiling and the memory floor.

use core::arch::asm;
use core::arch::x86_64::*;

/// Encryptions of 8 registers per timed call of the ceiling loops.
const ITERS: usize = 1 << 14;

/// 14 AES rounds (`vaesenc` with one key register) on 8 independent `$reg` registers,
/// `$n` times: the AES units' throughput with nothing else in the loop.
macro_rules! rounds_loop {
    ($reg:ident, $n:expr, $ty:ty, $zero:expr) => {{
        let mut b: [$ty; 8] = [$zero; 8];
        let k: $ty = $zero;
        for _ in 0..$n {
            for _ in 0..14 {
                // SAFETY: register-only VAES instructions; the callers enable the
                // features of the register class and check them before calling.
                unsafe {
                    asm!(
                        "vaesenc {0}, {0}, {8}",
                        "vaesenc {1}, {1}, {8}",
                        "vaesenc {2}, {2}, {8}",
                        "vaesenc {3}, {3}, {8}",
                        "vaesenc {4}, {4}, {8}",
                        "vaesenc {5}, {5}, {8}",
                        "vaesenc {6}, {6}, {8}",
                        "vaesenc {7}, {7}, {8}",
                        inout($reg) b[0], inout($reg) b[1], inout($reg) b[2], inout($reg) b[3],
                        inout($reg) b[4], inout($reg) b[5], inout($reg) b[6], inout($reg) b[7],
                        in($reg) k,
                        options(pure, nomem, nostack, preserves_flags),
                    )
                }
            }
        }
        std::hint::black_box(b);
    }};
}

#[target_feature(enable = "avx2,vaes")]
fn ymm_rounds(n: usize) {
    rounds_loop!(ymm_reg, n, __m256i, _mm256_setzero_si256());
}

#[target_feature(enable = "avx512f,vaes")]
fn zmm_rounds(n: usize) {
    rounds_loop!(zmm_reg, n, __m512i, _mm512_setzero_si512());
}

/// AES-256 bytes per second (GB/s) of the rounds loop on ymm and, where the CPU has
/// AVX-512, zmm registers: `("ceiling-ymm", GB/s)`, `("ceiling-zmm", GB/s)`.
pub fn ceilings() -> Vec<(String, super::Rate)> {
    let mut out = Vec::new();
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("vaes") {
        // SAFETY: the CPU has AVX2 and VAES (checked above).
        let gbps = super::rate(ITERS * 8 * 32, || unsafe { ymm_rounds(ITERS) });
        out.push(("ceiling-ymm".to_string(), gbps));
    }
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("vaes") {
        // SAFETY: the CPU has AVX-512 F and VAES (checked above).
        let gbps = super::rate(ITERS * 8 * 64, || unsafe { zmm_rounds(ITERS) });
        out.push(("ceiling-zmm".to_string(), gbps));
    }
    out
}

/// One read-XOR-write pass: each byte of `buf` loaded, XORed and stored back, 32 bytes
/// per instruction where the CPU has AVX2.
pub fn xor_pass(buf: &mut [u8]) {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { xor_avx2(buf) }
    } else {
        buf.iter_mut().for_each(|b| *b ^= 0x5a);
    }
}

#[target_feature(enable = "avx2")]
fn xor_avx2(buf: &mut [u8]) {
    buf.iter_mut().for_each(|b| *b ^= 0x5a);
}
