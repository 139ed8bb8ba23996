//! The 512-bit VAES backend: AES rounds on zmm registers (four blocks each, VAES with
//! AVX-512 F/BW/VL), 8 registers = 32 blocks = 512 bytes in flight, so a 512-byte sector
//! is exactly one group. The tweaks of a group are computed ahead of it: at the start of
//! a sector each register straight from the sector's encrypted tweak (one variable shift
//! and one VPCLMULQDQ per register, combined with one ternary-logic XOR), then advanced
//! by x³² per group. The tweak encryptions of 16 sectors are batched on 4 registers.
//!
//! Like the 256-bit backend it is VEX/EVEX-encoded from [`Cipher::process`] down
//! (`tests/disasm.rs` guards it); only the one-off key expansion at [`Cipher::new`] runs
//! the AES-NI backend's SSE code.
//!
//! Every `unsafe` here is a call into a `#[target_feature]` function, an unaligned
//! load/store inside a slice or array whose length has been checked, a register-only
//! `asm!` block of AES round instructions, or `cpuid`. A [`Cipher`] can only be built
//! after [`supported`] returned true, so holding one proves the CPU has the features its
//! methods enable.

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::Zeroize;

use crate::aesni::{self, Schedule, ROUND_KEYS};
use crate::vaes::WideSchedule;
use crate::KEY_LEN;

/// 512-bit registers per group (four blocks each).
const VECS: usize = 8; // `round8!` is written for 8

/// Bytes per group.
const GROUP: usize = 64 * VECS;

/// Sectors whose tweaks are encrypted together (four per register).
const SECTOR_BATCH: usize = 16;

/// One AES round (`$op`: `vaesenc` or `vaesdec`) of all 8 registers of `$b` (32 blocks)
/// with round key `$k`, as 8 independent instructions back to back (see `vaes.rs`). 8 data
/// registers, their 8 tweaks and 15 round keys do not all fit in 32 registers; LLVM
/// reloads the keys it cannot keep. Measured against the key as a memory operand of each
/// instruction: the same at 4096-byte sectors, 9% faster at 512 (Zen 4, 3 pairs).
macro_rules! round8 {
    ($op:literal, $b:expr, $k:expr) => {
        // SAFETY: register-only VAES instructions, no memory, stack or flags touched;
        // only expanded inside functions that enable the `vaes` and `avx512f` features.
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
                inout(zmm_reg) $b[0],
                inout(zmm_reg) $b[1],
                inout(zmm_reg) $b[2],
                inout(zmm_reg) $b[3],
                inout(zmm_reg) $b[4],
                inout(zmm_reg) $b[5],
                inout(zmm_reg) $b[6],
                inout(zmm_reg) $b[7],
                in(zmm_reg) $k,
                options(pure, nomem, nostack, preserves_flags),
            )
        }
    };
}

/// Runs `$body` once for each register index `$i` of a group (0 to 7), with `$k` = 4·`$i`
/// (the power of x from the sector's first tweak to the register's first block), both
/// literals: written out, not a loop, so that the arrays indexed by `$i` stay in registers
/// (LLVM rolled such loops back up and kept the registers on the stack).
macro_rules! for8 {
    ($i:ident, $k:ident => $body:block) => {
        for8!(@ $i, $k, $body, (0, 0), (1, 4), (2, 8), (3, 12), (4, 16), (5, 20), (6, 24), (7, 28));
    };
    (@ $i:ident, $k:ident, $body:block, $(($iv:literal, $kv:literal)),*) => {
        $(
            {
                #[allow(unused)]
                const $i: usize = $iv;
                #[allow(unused)]
                const $k: u32 = $kv;
                $body
            }
        )*
    };
}

/// `t · x^K` in each lane (XTS bit order) for a constant `1 <= K <= 63`.
macro_rules! mul_xk {
    ($t:expr, $K:expr, $poly:expr) => {{
        let t: __m512i = $t;
        let carry = _mm512_srli_epi64::<{ 64 - $K }>(_mm512_bsrli_epi128::<8>(t));
        xor3(
            _mm512_slli_epi64::<{ $K }>(t),
            _mm512_bslli_epi128::<8>(_mm512_srli_epi64::<{ 64 - $K }>(t)),
            _mm512_clmulepi64_epi128::<0x00>(carry, $poly),
        )
    }};
}

/// The powers of x of the four lanes of a group's first register, per 64-bit half
/// (`LEFT`), and 64 minus them (`RIGHT`), for [`mul_xv`].
#[repr(C, align(64))]
struct Counts([u64; 8]);

static LEFT: Counts = Counts([0, 0, 1, 1, 2, 2, 3, 3]);
static RIGHT: Counts = Counts([64, 64, 63, 63, 62, 62, 61, 61]);

/// Whether this CPU (and its OS, which must save zmm state) has what [`Cipher`] uses.
pub(crate) fn supported() -> bool {
    aesni::supported()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

/// CPUID vendor string, family and model (with the extended fields folded in, as Linux's
/// `x86_family`/`x86_model` compute them).
pub(crate) fn cpu_id() -> ([u8; 12], u32, u32) {
    // SAFETY: CPUID exists on every x86-64 CPU; leaves 0 and 1 always exist. (Safe to
    // call in newer toolchains; the block keeps the crate's MSRV building.)
    #[allow(unused_unsafe)]
    let (l0, l1) = unsafe { (__cpuid(0), __cpuid(1)) };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&l0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&l0.ecx.to_le_bytes());
    let base_family = (l1.eax >> 8) & 0xf;
    let mut family = base_family;
    if base_family == 0xf {
        family += (l1.eax >> 20) & 0xff;
    }
    let mut model = (l1.eax >> 4) & 0xf;
    if base_family >= 6 {
        model |= ((l1.eax >> 16) & 0xf) << 4;
    }
    (vendor, family, model)
}

/// The data and tweak key schedules of an XTS-AES-256 key, round keys in all 4 lanes.
pub(crate) struct Cipher {
    data: WideSchedule<64>,
    tweak: WideSchedule<64>,
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
    /// `first_tweak + i * step`. `sector_size` is a multiple of 512 and divides
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
        // AVX2, AVX-512 F/BW/VL, VAES and VPCLMULQDQ, and the OS saves zmm state.
        unsafe {
            if decrypt {
                vaes512_xts::<true>(self, buf, sector_size, first_tweak, step)
            } else {
                vaes512_xts::<false>(self, buf, sector_size, first_tweak, step)
            }
        }
    }
}

/// The round keys for one direction as registers.
#[inline]
#[target_feature(enable = "avx512f")]
fn load(s: &WideSchedule<64>, decrypt: bool) -> [__m512i; ROUND_KEYS] {
    let src = if decrypt { &s.dec } else { &s.enc };
    let mut out = [_mm512_setzero_si512(); ROUND_KEYS];
    for (o, k) in out.iter_mut().zip(src) {
        // SAFETY: each `k` is 64 readable bytes; `loadu` has no alignment need.
        *o = unsafe { _mm512_loadu_si512(k.as_ptr().cast()) };
    }
    out
}

/// `a ⊕ b ⊕ c` in one instruction.
#[inline]
#[target_feature(enable = "avx512f")]
fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi64::<0x96>(a, b, c)
}

/// `t · xᵏ` in GF(2¹²⁸) (XTS bit order) with `k` per 64-bit half in `left` (both halves
/// of a lane equal, `0 <= k <= 63`) and `64 - k` in `right`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_xv(t: __m512i, left: __m512i, right: __m512i, poly: __m512i) -> __m512i {
    // Each half shifted left, the bits crossing halves (a variable shift by 64 gives 0,
    // so k = 0 works), and the k bits shifted out at the top times x¹²⁸ mod the
    // polynomial; the three have no bit in common where it matters, so XOR them.
    let carry = _mm512_srlv_epi64(_mm512_bsrli_epi128::<8>(t), right);
    xor3(
        _mm512_sllv_epi64(t, left),
        _mm512_bslli_epi128::<8>(_mm512_srlv_epi64(t, right)),
        _mm512_clmulepi64_epi128::<0x00>(carry, poly),
    )
}

/// `t · x³²` in each lane: a four-byte shift, and the 32 bits shifted out times
/// x⁷ + x² + x + 1 as shifts and XORs (the product stays below bit 40 of the low half).
/// Measured on Zen 4 against one VPCLMULQDQ for that product: 3 interleaved pairs,
/// 4-6% faster at 4096-byte sectors (the multiplier competes with the AES units there).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_x32(t: __m512i) -> __m512i {
    let c = _mm512_bsrli_epi128::<12>(t);
    let r = xor3(c, _mm512_slli_epi64::<1>(c), _mm512_slli_epi64::<2>(c));
    xor3(_mm512_bslli_epi128::<4>(t), r, _mm512_slli_epi64::<7>(c))
}

/// The encrypted initial tweaks of `SECTOR_BATCH` consecutive sectors (tweak numbers
/// `first + s·step`), 16 bytes each, encrypted four per register.
#[inline]
#[target_feature(enable = "avx512f,vaes")]
fn vaes512_sector_tweaks(
    tk: &[__m512i; ROUND_KEYS],
    first: u128,
    step: u128,
    out: &mut [u128; SECTOR_BATCH],
) {
    for (s, t) in out.iter_mut().enumerate() {
        *t = first.wrapping_add(step.wrapping_mul(s as u128));
    }
    let p: *mut __m512i = out.as_mut_ptr().cast();
    let mut b = [_mm512_setzero_si512(); SECTOR_BATCH / 4];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: `out` is 16·SECTOR_BATCH bytes; register `i` lies inside it.
        *x = _mm512_xor_si512(unsafe { _mm512_loadu_si512(p.add(i)) }, tk[0]);
    }
    for k in &tk[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = _mm512_aesenc_epi128(*x, *k);
        }
    }
    for (i, x) in b.iter().enumerate() {
        let y = _mm512_aesenclast_epi128(*x, tk[ROUND_KEYS - 1]);
        // SAFETY: as for the load above.
        unsafe { _mm512_storeu_si512(p.add(i), y) };
    }
}

#[inline(never)]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")]
fn vaes512_xts<const DEC: bool>(
    c: &Cipher,
    buf: &mut [u8],
    sector_size: usize,
    tweak: u128,
    step: u128,
) {
    let mut rk = load(&c.data, DEC);
    let mut tk = load(&c.tweak, false);
    let mut tweaks = [0u128; SECTOR_BATCH];
    let mut first = tweak;
    for batch in buf.chunks_mut(sector_size * SECTOR_BATCH) {
        vaes512_sector_tweaks(&tk, first, step, &mut tweaks);
        for (sector, t0) in batch.chunks_exact_mut(sector_size).zip(&tweaks) {
            // SAFETY: `t0` is 16 readable bytes; `loadu` has no alignment need.
            let t0 = unsafe { _mm_loadu_si128((t0 as *const u128).cast()) };
            vaes512_sector::<DEC>(&rk, sector, _mm512_broadcast_i32x4(t0));
        }
        first = first.wrapping_add(step.wrapping_mul(SECTOR_BATCH as u128));
    }
    // Wipe this call's copies of the round keys and tweaks (register spills the
    // compiler made elsewhere on the stack are out of reach).
    rk.zeroize();
    tk.zeroize();
    tweaks.zeroize();
}

/// One sector, `GROUP` bytes at a time; `t0` is its encrypted tweak in all four lanes.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")]
fn vaes512_sector<const DEC: bool>(rk: &[__m512i; ROUND_KEYS], sector: &mut [u8], t0: __m512i) {
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    // Register i holds the tweaks of blocks 4i..4i+3 (lowest lane first, as in memory):
    // register 0 is t0·(1, x, x², x³), register i register 0 times x^4i, each straight
    // from register 0 (no chain of dependent multiplications at the start of a sector).
    // SAFETY: `LEFT.0` and `RIGHT.0` are 64 readable bytes.
    let (left, right) = unsafe {
        (
            _mm512_loadu_si512(LEFT.0.as_ptr().cast()),
            _mm512_loadu_si512(RIGHT.0.as_ptr().cast()),
        )
    };
    let first = mul_xv(t0, left, right, poly);
    let mut t = [first; VECS];
    for8!(I, K => {
        // Register 0 is `first` itself (the check is constant in each expansion).
        #[allow(clippy::absurd_extreme_comparisons)]
        if I > 0 {
            t[I] = mul_xk!(first, K, poly);
        }
    });
    let groups = sector.len() / GROUP;
    for (g, group) in sector.chunks_exact_mut(GROUP).enumerate() {
        // The last group's tweaks are not advanced: nothing follows them.
        let more = g + 1 < groups;
        let p: *mut __m512i = group.as_mut_ptr().cast();
        for8!(I, K => {
            // Prefetch 4 groups ahead (a hint: any address is allowed).
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * VECS + I).cast());
        });
        let mut b = [_mm512_setzero_si512(); VECS];
        for8!(I, K => {
            // SAFETY: `group` is 64·VECS bytes, register `I` lies inside it; `loadu` has
            // no alignment need.
            let x = unsafe { _mm512_loadu_si512(p.add(I)) };
            b[I] = xor3(x, t[I], rk[0]);
        });
        for k in &rk[1..ROUND_KEYS - 1] {
            if DEC {
                round8!("vaesdec", b, *k);
            } else {
                round8!("vaesenc", b, *k);
            }
        }
        for8!(I, K => {
            // The last round ends by XORing its key: fold the tweak into that key.
            let last = _mm512_xor_si512(rk[ROUND_KEYS - 1], t[I]);
            let y = if DEC {
                _mm512_aesdeclast_epi128(b[I], last)
            } else {
                _mm512_aesenclast_epi128(b[I], last)
            };
            // SAFETY: as for the load above.
            unsafe { _mm512_storeu_si512(p.add(I), y) };
            if more {
                t[I] = mul_x32(t[I]);
            }
        });
    }
}
