//! The AES-NI backend: AES-NI rounds on 128-bit registers, 8 blocks in flight, the tweaks
//! of a group computed ahead of it (PCLMULQDQ multiplies each by x⁸ in one step), the
//! tweak encryptions of 8 sectors batched.
//!
//! Every `unsafe` here is a call into a `#[target_feature]` function, an unaligned
//! load/store inside a slice whose length has been checked, or a register-only `asm!`
//! block of AES round instructions. A [`Cipher`] can only be built after [`supported`]
//! returned true, so holding one proves the CPU has the features its methods enable.
//!
//! The round-key expansion also serves the VAES backend ([`Schedule`]).

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::KEY_LEN;

/// AES-256 has 14 rounds, so 15 round keys.
pub(crate) const ROUND_KEYS: usize = 15;

/// Blocks in flight per group.
const LANES: usize = 8; // `round8!` is written for 8

/// One AES round (`$op`: `aesenc` or `aesdec`) of all 8 blocks of `$b` with round key
/// `$k`, as 8 independent instructions back to back. Written with `asm!` because LLVM,
/// given intrinsics, schedules each block's 14 dependent rounds back to back, which
/// starves the two pipelined AES units (measured: 4.5 instead of 6+ GB/s).
macro_rules! round8 {
    ($op:literal, $b:expr, $k:expr) => {
        // SAFETY: register-only AES-NI instructions, no memory, stack or flags touched;
        // only expanded inside functions that enable the `aes` target feature.
        unsafe {
            asm!(
                concat!($op, " {0}, {8}"),
                concat!($op, " {1}, {8}"),
                concat!($op, " {2}, {8}"),
                concat!($op, " {3}, {8}"),
                concat!($op, " {4}, {8}"),
                concat!($op, " {5}, {8}"),
                concat!($op, " {6}, {8}"),
                concat!($op, " {7}, {8}"),
                inout(xmm_reg) $b[0],
                inout(xmm_reg) $b[1],
                inout(xmm_reg) $b[2],
                inout(xmm_reg) $b[3],
                inout(xmm_reg) $b[4],
                inout(xmm_reg) $b[5],
                inout(xmm_reg) $b[6],
                inout(xmm_reg) $b[7],
                in(xmm_reg) $k,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Whether this CPU has what [`Cipher`] uses.
pub(crate) fn supported() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("pclmulqdq")
        && is_x86_feature_detected!("sse4.1")
}

/// One AES-256 key schedule, in the form AES-NI consumes: encryption round keys, and the
/// equivalent inverse cipher's round keys (`aesimc`, reversed). Wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
pub(crate) struct Schedule {
    pub(crate) enc: [[u8; 16]; ROUND_KEYS],
    pub(crate) dec: [[u8; 16]; ROUND_KEYS],
}

impl Schedule {
    /// Expands `key`; the caller must have checked [`supported`].
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let mut s = Schedule {
            enc: [[0; 16]; ROUND_KEYS],
            dec: [[0; 16]; ROUND_KEYS],
        };
        debug_assert!(supported());
        // SAFETY: every caller (`Cipher::new` here and in `vaes`) checked `supported()`,
        // so the CPU has AES-NI and SSE2.
        unsafe { expand(key, &mut s) };
        s
    }

    /// The round keys for one direction as registers.
    #[inline]
    #[target_feature(enable = "sse2")]
    pub(crate) fn load(&self, decrypt: bool) -> [__m128i; ROUND_KEYS] {
        let src = if decrypt { &self.dec } else { &self.enc };
        // SAFETY: each `src[i]` is 16 readable bytes; `loadu` has no alignment need.
        src.map(|k| unsafe { _mm_loadu_si128(k.as_ptr().cast()) })
    }
}

/// Computes both halves of a [`Schedule`].
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8; 32], out: &mut Schedule) {
    /// `k ⊕ (k ≪ 32) ⊕ (k ≪ 64) ⊕ (k ≪ 96)`: the running XOR of the previous words.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn spread(mut k: __m128i) -> __m128i {
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, _mm_slli_si128::<4>(k))
    }
    // SAFETY: `key` is 32 readable bytes; `loadu` has no alignment need.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    let mut rk = [_mm_setzero_si128(); ROUND_KEYS];
    rk[0] = a;
    rk[1] = b;
    macro_rules! step {
        ($i:expr, $rcon:expr) => {
            a = _mm_xor_si128(
                spread(a),
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[$i] = a;
        };
        ($i:expr, $rcon:expr, odd) => {
            step!($i, $rcon);
            b = _mm_xor_si128(
                spread(b),
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            );
            rk[$i + 1] = b;
        };
    }
    step!(2, 0x01, odd);
    step!(4, 0x02, odd);
    step!(6, 0x04, odd);
    step!(8, 0x08, odd);
    step!(10, 0x10, odd);
    step!(12, 0x20, odd);
    step!(14, 0x40);
    for i in 0..ROUND_KEYS {
        let d = if i == 0 || i == ROUND_KEYS - 1 {
            rk[ROUND_KEYS - 1 - i]
        } else {
            _mm_aesimc_si128(rk[ROUND_KEYS - 1 - i])
        };
        // SAFETY: `out.enc[i]`/`out.dec[i]` are 16 writable bytes; `storeu` has no
        // alignment need.
        unsafe {
            _mm_storeu_si128(out.enc[i].as_mut_ptr().cast(), rk[i]);
            _mm_storeu_si128(out.dec[i].as_mut_ptr().cast(), d);
        }
    }
    rk.zeroize();
    a.zeroize();
    b.zeroize();
}

/// The XTS reduction constant x¹²⁸ = x⁷ + x² + x + 1, in the low lane.
#[inline]
#[target_feature(enable = "sse2")]
pub(crate) fn poly() -> __m128i {
    _mm_set_epi64x(0, 0x87)
}

/// `t · xᵏ` in GF(2¹²⁸) (XTS bit order: the 16 bytes as a little-endian number), for
/// `1 <= k <= 63`.
#[inline]
#[target_feature(enable = "sse2,pclmulqdq")]
pub(crate) fn mul_xk(t: __m128i, k: i32) -> __m128i {
    let left = _mm_cvtsi32_si128(k);
    let right = _mm_cvtsi32_si128(64 - k);
    // Shift the 128-bit number left by k: each half, plus the bits crossing halves.
    let shifted = _mm_or_si128(
        _mm_sll_epi64(t, left),
        _mm_slli_si128::<8>(_mm_srl_epi64(t, right)),
    );
    // The k bits shifted out at the top, times x¹²⁸ mod the polynomial.
    let carry = _mm_srl_epi64(_mm_srli_si128::<8>(t), right);
    _mm_xor_si128(shifted, _mm_clmulepi64_si128::<0x00>(carry, poly()))
}

/// `t · x⁸`: one byte shift and one carry-less multiply of the byte shifted out.
#[inline]
#[target_feature(enable = "sse2,pclmulqdq")]
fn mul_x8(t: __m128i, poly: __m128i) -> __m128i {
    let carry = _mm_srli_si128::<15>(t);
    _mm_xor_si128(
        _mm_slli_si128::<1>(t),
        _mm_clmulepi64_si128::<0x00>(carry, poly),
    )
}

/// A tweak number as the 16 little-endian bytes XTS encrypts.
#[inline]
#[target_feature(enable = "sse2")]
pub(crate) fn tweak_block(tweak: u128) -> __m128i {
    _mm_set_epi64x((tweak >> 64) as u64 as i64, tweak as u64 as i64)
}

/// Encrypts `LANES` blocks with one key, interleaved.
#[inline]
#[target_feature(enable = "aes,sse2")]
pub(crate) fn encrypt_lanes(rk: &[__m128i; ROUND_KEYS], b: &mut [__m128i; LANES]) {
    for x in b.iter_mut() {
        *x = _mm_xor_si128(*x, rk[0]);
    }
    for k in &rk[1..ROUND_KEYS - 1] {
        round8!("aesenc", b, *k);
    }
    for x in b.iter_mut() {
        *x = _mm_aesenclast_si128(*x, rk[ROUND_KEYS - 1]);
    }
}

/// The data and tweak key schedules of an XTS-AES-256 key.
pub(crate) struct Cipher {
    data: Schedule,
    tweak: Schedule,
}

impl Cipher {
    /// Expands both keys; `None` if the CPU lacks AES-NI, PCLMULQDQ or SSE4.1.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Option<Self> {
        if !supported() {
            return None;
        }
        let (k1, k2) = key.split_at(KEY_LEN / 2);
        Some(Self {
            data: Schedule::new(k1.try_into().ok()?),
            tweak: Schedule::new(k2.try_into().ok()?),
        })
    }

    /// Encrypts or decrypts whole sectors in place; sector `i` of `buf` has tweak
    /// `first_tweak + i * step`. `sector_size` is a multiple of 128 and divides
    /// `buf.len()`.
    pub(crate) fn process(
        &self,
        decrypt: bool,
        buf: &mut [u8],
        sector_size: usize,
        first_tweak: u128,
        step: u128,
    ) {
        debug_assert!(
            sector_size.is_multiple_of(16 * LANES) && buf.len().is_multiple_of(sector_size)
        );
        // SAFETY: `self` exists, so `supported()` held when it was built: the CPU has
        // AES-NI, PCLMULQDQ and SSE4.1.
        unsafe {
            if decrypt {
                xts::<true>(self, buf, sector_size, first_tweak, step)
            } else {
                xts::<false>(self, buf, sector_size, first_tweak, step)
            }
        }
    }
}

/// Encrypts the initial tweaks of up to `LANES` sectors at once.
#[inline]
#[target_feature(enable = "aes,sse2")]
pub(crate) fn sector_tweaks(
    tk: &[__m128i; ROUND_KEYS],
    first: u128,
    step: u128,
) -> [__m128i; LANES] {
    let mut t = [_mm_setzero_si128(); LANES];
    for (i, x) in t.iter_mut().enumerate() {
        *x = tweak_block(first.wrapping_add(step.wrapping_mul(i as u128)));
    }
    encrypt_lanes(tk, &mut t);
    t
}

#[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
fn xts<const DEC: bool>(c: &Cipher, buf: &mut [u8], sector_size: usize, tweak: u128, step: u128) {
    let mut rk = c.data.load(DEC);
    let mut tk = c.tweak.load(false);
    let mut first = tweak;
    for group in buf.chunks_mut(sector_size * LANES) {
        let t = sector_tweaks(&tk, first, step);
        for (sector, t0) in group.chunks_exact_mut(sector_size).zip(t) {
            xts_sector::<DEC>(&rk, sector, t0);
        }
        first = first.wrapping_add(step.wrapping_mul(LANES as u128));
    }
    // Wipe this call's copies of the round keys (register spills the compiler made
    // elsewhere on the stack are out of reach).
    rk.zeroize();
    tk.zeroize();
}

/// One sector, `LANES` blocks at a time; `t0` is its encrypted tweak.
#[inline]
#[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
fn xts_sector<const DEC: bool>(rk: &[__m128i; ROUND_KEYS], sector: &mut [u8], t0: __m128i) {
    let poly = poly();
    // Each from the first, not in a chain: no long dependency at the start of a sector.
    let mut t = [t0; LANES];
    for (i, ti) in t.iter_mut().enumerate().skip(1) {
        *ti = mul_xk(t0, i as i32);
    }
    for group in sector.chunks_exact_mut(16 * LANES) {
        let p: *mut __m128i = group.as_mut_ptr().cast();
        let mut b = [_mm_setzero_si128(); LANES];
        for i in 0..LANES {
            // SAFETY: `group` is 16·LANES bytes, block `i` lies inside it; `loadu` has
            // no alignment need.
            let x = unsafe { _mm_loadu_si128(p.add(i)) };
            b[i] = _mm_xor_si128(_mm_xor_si128(x, t[i]), rk[0]);
        }
        for k in &rk[1..ROUND_KEYS - 1] {
            if DEC {
                round8!("aesdec", b, *k);
            } else {
                round8!("aesenc", b, *k);
            }
        }
        for i in 0..LANES {
            // The last round ends by XORing its key: fold the tweak into that key.
            let last = _mm_xor_si128(rk[ROUND_KEYS - 1], t[i]);
            let y = if DEC {
                _mm_aesdeclast_si128(b[i], last)
            } else {
                _mm_aesenclast_si128(b[i], last)
            };
            // SAFETY: as for the load above.
            unsafe { _mm_storeu_si128(p.add(i), y) };
            t[i] = mul_x8(t[i], poly);
        }
    }
}
