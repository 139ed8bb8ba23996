//! The VAES backend: AES rounds on 256-bit registers (two blocks each, VAES with AVX2,
//! no AVX-512 needed), 8 registers = 16 blocks in flight; the tweaks of a group are
//! computed ahead of it, each register advanced by x¹⁶ with one VPCLMULQDQ; the tweak
//! encryptions of 8 sectors are batched on 4 registers with VAES.
//!
//! Everything from [`Cipher::process`] down is VEX-encoded: no legacy SSE instruction
//! runs between the first 256-bit instruction and the `vzeroupper` at the exit (Intel
//! cores charge a state transition for each mix; `tests/disasm.rs` guards it). Only the
//! one-off key expansion at [`Cipher::new`] uses the AES-NI backend's (SSE) code, before
//! any 256-bit state exists.
//!
//! Every `unsafe` here is a call into a `#[target_feature]` function, an unaligned
//! load/store inside a slice or array whose length has been checked, or a register-only
//! `asm!` block of AES round instructions. A [`Cipher`] can only be built after
//! [`supported`] returned true, so holding one proves the CPU has the features its
//! methods enable.

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::aesni::{self, Schedule, ROUND_KEYS};
use crate::KEY_LEN;

/// 256-bit registers per group (two blocks each).
const VECS: usize = 8; // `round8!` is written for 8

/// Bytes per group.
const GROUP: usize = 32 * VECS;

/// Sectors whose tweaks are encrypted together (two per register).
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

/// Round keys, each repeated in the `N` 128-bit lanes of a 16·`N`-byte register. Wiped
/// on drop. (`N` = 2 here, 4 for the 512-bit backend.)
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
pub(crate) struct WideSchedule<const B: usize> {
    pub(crate) enc: [[u8; B]; ROUND_KEYS],
    pub(crate) dec: [[u8; B]; ROUND_KEYS],
}

impl<const B: usize> WideSchedule<B> {
    pub(crate) fn new(narrow: &Schedule) -> Self {
        let mut w = WideSchedule {
            enc: [[0; B]; ROUND_KEYS],
            dec: [[0; B]; ROUND_KEYS],
        };
        for i in 0..ROUND_KEYS {
            for lane in 0..B / 16 {
                w.enc[i][16 * lane..16 * lane + 16].copy_from_slice(&narrow.enc[i]);
                w.dec[i][16 * lane..16 * lane + 16].copy_from_slice(&narrow.dec[i]);
            }
        }
        w
    }
}

impl WideSchedule<32> {
    /// The round keys for one direction as registers.
    #[inline]
    #[target_feature(enable = "avx")]
    fn load(&self, decrypt: bool) -> [__m256i; ROUND_KEYS] {
        let src = if decrypt { &self.dec } else { &self.enc };
        let mut out = [_mm256_setzero_si256(); ROUND_KEYS];
        for (o, k) in out.iter_mut().zip(src) {
            // SAFETY: each `k` is 32 readable bytes; `loadu` has no alignment need.
            *o = unsafe { _mm256_loadu_si256(k.as_ptr().cast()) };
        }
        out
    }
}

/// The data and tweak key schedules of an XTS-AES-256 key.
pub(crate) struct Cipher {
    data: WideSchedule<32>,
    tweak: WideSchedule<32>,
}

impl Cipher {
    /// Expands both keys; `None` if the CPU lacks any feature [`supported`] checks.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Option<Self> {
        if !supported() {
            return None;
        }
        let (k1, k2) = key.split_at(KEY_LEN / 2);
        Some(Self {
            data: WideSchedule::new(&Schedule::new(k1.try_into().ok()?)),
            tweak: WideSchedule::new(&Schedule::new(k2.try_into().ok()?)),
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
        // AVX, AVX2, VAES and VPCLMULQDQ.
        unsafe {
            if decrypt {
                vaes_xts::<true>(self, buf, sector_size, first_tweak, step)
            } else {
                vaes_xts::<false>(self, buf, sector_size, first_tweak, step)
            }
        }
    }
}

/// `t · xᵏ` in GF(2¹²⁸) (XTS bit order) with `k` per 64-bit half in `left` (both halves
/// of a lane equal, `0 <= k <= 63`) and `64 - k` in `right`.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_xv(t: __m256i, left: __m256i, right: __m256i, poly: __m256i) -> __m256i {
    // Shift the 128-bit number left by k: each half, plus the bits crossing halves
    // (a variable shift by 64 gives 0, so k = 0 works).
    let shifted = _mm256_or_si256(
        _mm256_sllv_epi64(t, left),
        _mm256_bslli_epi128::<8>(_mm256_srlv_epi64(t, right)),
    );
    // The k bits shifted out at the top, times x¹²⁸ mod the polynomial.
    let carry = _mm256_srlv_epi64(_mm256_bsrli_epi128::<8>(t), right);
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

/// The encrypted initial tweaks of `SECTOR_BATCH` consecutive sectors (tweak numbers
/// `first + s·step`), 16 bytes each, encrypted two per register.
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn vaes_sector_tweaks(
    tk: &[__m256i; ROUND_KEYS],
    first: u128,
    step: u128,
    out: &mut [u128; SECTOR_BATCH],
) {
    for (s, t) in out.iter_mut().enumerate() {
        *t = first.wrapping_add(step.wrapping_mul(s as u128));
    }
    let p: *mut __m256i = out.as_mut_ptr().cast();
    let mut b = [_mm256_setzero_si256(); SECTOR_BATCH / 2];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: `out` is 16·SECTOR_BATCH bytes; register `i` lies inside it.
        *x = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p.add(i)) }, tk[0]);
    }
    for k in &tk[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = _mm256_aesenc_epi128(*x, *k);
        }
    }
    for (i, x) in b.iter().enumerate() {
        let y = _mm256_aesenclast_epi128(*x, tk[ROUND_KEYS - 1]);
        // SAFETY: as for the load above.
        unsafe { _mm256_storeu_si256(p.add(i), y) };
    }
}

#[inline(never)]
#[target_feature(enable = "avx,avx2,vaes,vpclmulqdq")]
fn vaes_xts<const DEC: bool>(
    c: &Cipher,
    buf: &mut [u8],
    sector_size: usize,
    tweak: u128,
    step: u128,
) {
    let mut rk = c.data.load(DEC);
    let mut tk = c.tweak.load(false);
    let mut tweaks = [0u128; SECTOR_BATCH];
    let mut first = tweak;
    for batch in buf.chunks_mut(sector_size * SECTOR_BATCH) {
        vaes_sector_tweaks(&tk, first, step, &mut tweaks);
        for (sector, t0) in batch.chunks_exact_mut(sector_size).zip(&tweaks) {
            // SAFETY: `t0` is 16 readable bytes; `loadu` has no alignment need.
            let t0 = unsafe { _mm_loadu_si128((t0 as *const u128).cast()) };
            vaes_sector::<DEC>(&rk, sector, _mm256_broadcastsi128_si256(t0));
        }
        first = first.wrapping_add(step.wrapping_mul(SECTOR_BATCH as u128));
    }
    // Wipe this call's copies of the round keys and tweaks (register spills the
    // compiler made elsewhere on the stack are out of reach).
    rk.zeroize();
    tk.zeroize();
    tweaks.zeroize();
}

/// One sector, `GROUP` bytes at a time; `t0` is its encrypted tweak in both lanes.
#[inline]
#[target_feature(enable = "avx,avx2,vaes,vpclmulqdq")]
fn vaes_sector<const DEC: bool>(rk: &[__m256i; ROUND_KEYS], sector: &mut [u8], t0: __m256i) {
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    // Register i holds the tweaks of blocks 2i and 2i+1 (low lane first, as in memory),
    // each computed from the first, not in a chain: no long dependency at the start.
    let mut t = [t0; VECS];
    for (i, ti) in t.iter_mut().enumerate() {
        let k = 2 * i as i64;
        let left = _mm256_set_epi64x(k + 1, k + 1, k, k);
        let right = _mm256_sub_epi64(_mm256_set1_epi64x(64), left);
        *ti = mul_xv(t0, left, right, poly);
    }
    let groups = sector.len() / GROUP;
    for (g, group) in sector.chunks_exact_mut(GROUP).enumerate() {
        // The last group's tweaks are not advanced: nothing follows them.
        let more = g + 1 < groups;
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
            if more {
                t[i] = mul_x16(t[i], poly);
            }
        }
    }
}
