//! Which backend [`Engine::new`](crate::Engine::new) uses, and why.
//!
//! The rule, widest first (the Linux kernel's `arch/x86/crypto` AES-XTS choice, since
//! 6.10, is the model):
//!
//! 1. [`Backend::Vaes512`] where the CPU has VAES, VPCLMULQDQ and AVX-512 F/BW/VL, unless
//!    it is one of the Intel models that lower their clock while 512-bit instructions run
//!    (Skylake-SP/Cascade Lake/Cooper Lake, Ice Lake client and server, Tiger Lake: the
//!    kernel's `X86_FEATURE_PREFER_YMM` list). Sapphire Rapids, Emerald Rapids, Granite
//!    Rapids and AMD Zen 4/Zen 5 get zmm. On Zen 4, which splits a 512-bit operation in
//!    two 256-bit halves, zmm halves the instruction count at the same AES throughput.
//! 2. [`Backend::Vaes`] (ymm) where the CPU has VAES, VPCLMULQDQ and AVX2: Zen 3, Alder
//!    Lake and later client cores without AVX-512, and the models excluded above.
//! 3. [`Backend::AesNi`] where the CPU has AES-NI, PCLMULQDQ and SSE4.1.
//! 4. [`Backend::Portable`] otherwise.
//!
//! The bench (`benches/benches/xts.rs`) checks on each machine it runs on that the chosen
//! backend is at least as fast as every other one at both sector sizes and prints a
//! WARNING line if not; the figures per CPU are in `docs/benchmarks.md`.

use crate::Backend;

/// The backend chosen for this CPU and the reason, as `nodecrypt bench` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Selection {
    /// The backend [`Backend::best`] returns.
    pub backend: Backend,
    /// The CPU as CPUID names it (`GenuineIntel family 6 model 207`).
    pub cpu: String,
    /// One sentence: which rule picked the backend.
    pub reason: String,
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}: {}", self.backend, self.cpu, self.reason)
    }
}

/// Intel family-6 models that downclock for zmm (Linux `zmm_exclusion_list`).
const ZMM_DOWNCLOCKS: [(u32, &str); 8] = [
    (0x55, "Skylake-SP/Cascade Lake/Cooper Lake"),
    (0x6a, "Ice Lake-SP"),
    (0x6c, "Ice Lake-D"),
    (0x7d, "Ice Lake"),
    (0x7e, "Ice Lake-L"),
    (0x9d, "Ice Lake-NNPI"),
    (0x8c, "Tiger Lake-L"),
    (0x8d, "Tiger Lake"),
];

/// What the rule looks at: which backends the CPU runs, and its CPUID identity.
#[derive(Clone, Copy)]
pub(crate) struct Cpu<'a> {
    pub(crate) supported: &'a dyn Fn(Backend) -> bool,
    pub(crate) vendor: &'a str,
    pub(crate) family: u32,
    pub(crate) model: u32,
}

/// The rule of the module documentation, as a pure function.
pub(crate) fn choose(cpu: Cpu<'_>) -> Selection {
    let name = format!("{} family {} model {}", cpu.vendor, cpu.family, cpu.model);
    let sel = |backend, reason: String| Selection {
        backend,
        cpu: name.clone(),
        reason,
    };
    let downclocks = (cpu.vendor == "GenuineIntel" && cpu.family == 6)
        .then(|| ZMM_DOWNCLOCKS.iter().find(|(m, _)| *m == cpu.model))
        .flatten();
    if (cpu.supported)(Backend::Vaes512) {
        match downclocks {
            None => {
                return sel(
                    Backend::Vaes512,
                    "VAES and AVX-512 on a CPU not known to lower its clock for 512-bit \
                     instructions: zmm registers, four blocks per instruction"
                        .into(),
                )
            }
            Some((_, model)) if (cpu.supported)(Backend::Vaes) => {
                return sel(
                    Backend::Vaes,
                    format!(
                        "VAES and AVX-512, but this Intel {model} lowers its clock for \
                         512-bit instructions (as the Linux kernel's list has it): ymm"
                    ),
                )
            }
            Some(_) => {}
        }
    }
    if (cpu.supported)(Backend::Vaes) {
        return sel(
            Backend::Vaes,
            "VAES and AVX2 without usable AVX-512: ymm registers, two blocks per instruction"
                .into(),
        );
    }
    if (cpu.supported)(Backend::AesNi) {
        return sel(
            Backend::AesNi,
            "AES-NI without VAES: xmm registers, one block per instruction".into(),
        );
    }
    sel(
        Backend::Portable,
        "no AES-NI: RustCrypto's portable code".into(),
    )
}

/// [`choose`] for this CPU.
pub(crate) fn select() -> Selection {
    #[cfg(target_arch = "x86_64")]
    let (vendor, family, model) = crate::vaes512::cpu_id();
    #[cfg(not(target_arch = "x86_64"))]
    let (vendor, family, model) = (*b"not x86-64  ", 0, 0);
    let vendor = String::from_utf8_lossy(&vendor).trim().to_string();
    let supported = |b: Backend| b.is_supported();
    choose(Cpu {
        supported: &supported,
        vendor: &vendor,
        family,
        model,
    })
}
