//! The VAES backend: AES rounds on 256-bit registers (two blocks each, VAES with AVX2,
//! no AVX-512 needed), 8 registers = 16 blocks in flight; the tweaks of a group are
//! computed ahead of it, each register advanced by x¹⁶ with one VPCLMULQDQ; the tweak
//! encryptions of 8 sectors are batched (AES-NI, shared with the `aesni` module).
//!
//! Every `unsafe` here is a call into a `#[target_feature]` function, an unaligned
//! load/store inside a slice whose length has been checked, or a register-only `asm!`
//! block of AES round instructions. A [`Cipher`] can only be built after [`supported`]
//! returned true, so holding one proves the CPU has the features its methods enable.

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::aesni::{self, Schedule, ROUND_KEYS};
use crate::KEY_LEN;

/// 256-bit registers per group (two blocks each).
const VECS: usize = 8; // `round8!` is written for 8

/// Bytes per group.
const GROUP: usize = 32 * VECS;

/// Sectors whose tweaks are encrypted together.
const SECTOR_BATCH: usize = 8;

/// One AES round (`$op`: `vaesenc` or `vaesdec`) of all 8 registers of `$b` (16 blocks)
/// with round key `$k`, as 8 independent instructions back to back. Written with `asm!`
/// because LLVM, given intrinsics, schedules each register's 14 dependent rounds back to
/// back, which starves the two pipelined AES units.
macro_rules! round8 {
    ($op:literal, $b:expr, $k:expr) => {
        // SAFETY: register-only VAES instructions, no memory, stack or flags touched;
        // only expanded inside functions that enable the `vaes` and `avx` features.
        unsafe {
            asm!(
                concat!($op, " {0}, {0}, {8}"),
                concat!($op, " {1}, {1}, {8}"),
                concat!($op, " {2}, {2}, {8}"),
                concat!($op, " {3}, {3}, {8}"),
                concat!($op, " {4}, {4}, {8}"),
                concat!($op, " {5}, {5}, {8}"),
                concat!($op, " {6}, {6}, {8}"),
                concat!($op, " {7}, {7}, {8}"),
                inout(ymm_reg) $b[0],
                inout(ymm_reg) $b[1],
                inout(ymm_reg) $b[2],
                inout(ymm_reg) $b[3],
                inout(ymm_reg) $b[4],
                inout(ymm_reg) $b[5],
                inout(ymm_reg) $b[6],
                inout(ymm_reg) $b[7],
                in(ymm_reg) $k,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Whether this CPU has what [`Cipher`] uses.
pub(crate) fn supported() -> bool {
    aesni::supported()
        && is_x86_feature_detected!("avx")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

/// The data key's round keys, each repeated in both 128-bit lanes. Wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
struct WideSchedule {
    enc: [[u8; 32]; ROUND_KEYS],
    dec: [[u8; 32]; ROUND_KEYS],
}

impl WideSchedule {
    fn new(narrow: &Schedule) -> Self {
        let mut w = WideSchedule {
            enc: [[0; 32]; ROUND_KEYS],
            dec: [[0; 32]; ROUND_KEYS],
        };
        for i in 0..ROUND_KEYS {
            w.enc[i][..16].copy_from_slice(&narrow.enc[i]);
            w.enc[i][16..].copy_from_slice(&narrow.enc[i]);
            w.dec[i][..16].copy_from_slice(&narrow.dec[i]);
            w.dec[i][16..].copy_from_slice(&narrow.dec[i]);
        }
        w
    }

    /// The round keys for one direction as registers.
    #[inline]
    #[target_feature(enable = "avx")]
    fn load(&self, decrypt: bool) -> [__m256i; ROUND_KEYS] {
        let src = if decrypt { &self.dec } else { &self.enc };
        // SAFETY: each `src[i]` is 32 readable bytes; `loadu` has no alignment need.
        src.map(|k| unsafe { _mm256_loadu_si256(k.as_ptr().cast()) })
    }
}

/// The data and tweak key schedules of an XTS-AES-256 key.
pub(crate) struct Cipher {
    data: WideSchedule,
    tweak: Schedule,
}

impl Cipher {
    /// Expands both keys; `None` if the CPU lacks any feature [`supported`] checks.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Option<Self> {
        if !supported() {
            return None;
        }
        let (k1, k2) = key.split_at(KEY_LEN / 2);
        let narrow = Schedule::new(k1.try_into().ok()?);
        Some(Self {
            data: WideSchedule::new(&narrow),
            tweak: Schedule::new(k2.try_into().ok()?),
        })
    }

    /// Encrypts or decrypts whole sectors in place; sector `i` of `buf` has tweak
    /// `first_tweak + i * step`. `sector_size` is a multiple of 256 and divides
    /// `buf.len()`.
    pub(crate) fn process(
        &self,
        decrypt: bool,
        buf: &mut [u8],
        sector_size: usize,
        first_tweak: u128,
        step: u128,
    ) {
        debug_assert!(sector_size.is_multiple_of(GROUP) && buf.len().is_multiple_of(sector_size));
        // SAFETY: `self` exists, so `supported()` held when it was built: the CPU has
        // AES-NI, PCLMULQDQ, SSE4.1, AVX, AVX2, VAES and VPCLMULQDQ.
        unsafe {
            if decrypt {
                xts::<true>(self, buf, sector_size, first_tweak, step)
            } else {
                xts::<false>(self, buf, sector_size, first_tweak, step)
            }
        }
    }
}

/// `t · xᵏ` in each 128-bit lane (XTS bit order), for `1 <= k <= 63`.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_xk(t: __m256i, k: i32, poly: __m256i) -> __m256i {
    let left = _mm_cvtsi32_si128(k);
    let right = _mm_cvtsi32_si128(64 - k);
    let shifted = _mm256_or_si256(
        _mm256_sll_epi64(t, left),
        _mm256_bslli_epi128::<8>(_mm256_srl_epi64(t, right)),
    );
    let carry = _mm256_srl_epi64(_mm256_bsrli_epi128::<8>(t), right);
    _mm256_xor_si256(shifted, _mm256_clmulepi64_epi128::<0x00>(carry, poly))
}

/// `t · x¹⁶` in each lane: a two-byte shift and one carry-less multiply.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_x16(t: __m256i, poly: __m256i) -> __m256i {
    let carry = _mm256_bsrli_epi128::<14>(t);
    _mm256_xor_si256(
        _mm256_bslli_epi128::<2>(t),
        _mm256_clmulepi64_epi128::<0x00>(carry, poly),
    )
}

#[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1,avx,avx2,vaes,vpclmulqdq")]
fn xts<const DEC: bool>(c: &Cipher, buf: &mut [u8], sector_size: usize, tweak: u128, step: u128) {
    let mut rk = c.data.load(DEC);
    let mut tk = c.tweak.load(false);
    let mut first = tweak;
    for batch in buf.chunks_mut(sector_size * SECTOR_BATCH) {
        let t = aesni::sector_tweaks(&tk, first, step);
        for (sector, t0) in batch.chunks_exact_mut(sector_size).zip(t) {
            xts_sector::<DEC>(&rk, sector, t0);
        }
        first = first.wrapping_add(step.wrapping_mul(SECTOR_BATCH as u128));
    }
    // Wipe this call's copies of the round keys (register spills the compiler made
    // elsewhere on the stack are out of reach).
    rk.zeroize();
    tk.zeroize();
}

/// One sector, `GROUP` bytes at a time; `t0` is its encrypted tweak.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1,avx,avx2,vaes,vpclmulqdq")]
fn xts_sector<const DEC: bool>(rk: &[__m256i; ROUND_KEYS], sector: &mut [u8], t0: __m128i) {
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    // Register i holds the tweaks of blocks 2i and 2i+1 (low lane first, as in memory).
    // Each from the first, not in a chain: no long dependency at the start of a sector.
    let mut t = [_mm256_set_m128i(aesni::mul_xk(t0, 1), t0); VECS];
    for (i, ti) in t.iter_mut().enumerate().skip(1) {
        *ti = mul_xk(*ti, 2 * i as i32, poly);
    }
    for group in sector.chunks_exact_mut(GROUP) {
        let p: *mut __m256i = group.as_mut_ptr().cast();
        let mut b = [_mm256_setzero_si256(); VECS];
        for i in 0..VECS {
            // SAFETY: `group` is 32·VECS bytes, register `i` lies inside it; `loadu` has
            // no alignment need.
            let x = unsafe { _mm256_loadu_si256(p.add(i)) };
            b[i] = _mm256_xor_si256(_mm256_xor_si256(x, t[i]), rk[0]);
        }
        for k in &rk[1..ROUND_KEYS - 1] {
            if DEC {
                round8!("vaesdec", b, *k);
            } else {
                round8!("vaesenc", b, *k);
            }
        }
        for i in 0..VECS {
            // The last round ends by XORing its key: fold the tweak into that key.
            let last = _mm256_xor_si256(rk[ROUND_KEYS - 1], t[i]);
            let y = if DEC {
                _mm256_aesdeclast_epi128(b[i], last)
            } else {
                _mm256_aesenclast_epi128(b[i], last)
            };
            // SAFETY: as for the load above.
            unsafe { _mm256_storeu_si256(p.add(i), y) };
            t[i] = mul_x16(t[i], poly);
        }
    }
}
