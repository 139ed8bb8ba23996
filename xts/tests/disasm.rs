//! The wide backends run no legacy (non-VEX) SSE instruction: Intel cores charge an
//! SSE/AVX state transition for each one met inside 256/512-bit code. And the AES-NI
//! backend runs no VEX/EVEX instruction: it must work on CPUs without AVX.
//!
//! The test disassembles its own executable (which links every backend, whatever this
//! CPU supports) with binutils' `nm` and `objdump` (`make deps` installs them) and reads
//! the functions of each backend module by symbol name. A missing tool or a missing
//! function fails the test; it never skips.

use std::path::Path;
use std::process::Command;

use nodecrypt_xts::{Backend, Engine};

/// One function of the executable: demangled name, start address, size.
struct Symbol {
    name: String,
    addr: u64,
    size: u64,
}

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{name}` ({e}): install binutils (`make deps` does)")
    });
    assert!(
        out.status.success(),
        "`{name} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

/// The functions of the executable whose demangled name starts with `prefix`.
fn functions(exe: &Path, prefix: &str) -> Vec<Symbol> {
    let exe = exe.to_str().expect("UTF-8 path");
    tool("nm", &["-C", "-S", "--defined-only", exe])
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let (addr, size, kind, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
            if !(matches!(kind, "t" | "T") && name.starts_with(prefix)) {
                return None;
            }
            Some(Symbol {
                name: name.to_string(),
                addr: u64::from_str_radix(addr, 16).ok()?,
                size: u64::from_str_radix(size, 16).ok()?,
            })
        })
        .collect()
}

/// `(mnemonic, operands)` of each instruction of `sym`.
fn instructions(exe: &Path, sym: &Symbol) -> Vec<(String, String)> {
    let start = format!("--start-address=0x{:x}", sym.addr);
    let stop = format!("--stop-address=0x{:x}", sym.addr + sym.size);
    let exe = exe.to_str().expect("UTF-8 path");
    tool("objdump", &["-d", "--no-show-raw-insn", &start, &stop, exe])
        .lines()
        .filter_map(|l| {
            // "  4012a0:\tvaesenc %ymm1,%ymm2,%ymm2"
            let (addr, rest) = l.split_once(":\t")?;
            u64::from_str_radix(addr.trim(), 16).ok()?;
            let rest = rest.trim();
            let (m, ops) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            Some((m.to_string(), ops.trim().to_string()))
        })
        .collect()
}

fn uses_vector_registers(ops: &str) -> bool {
    ops.contains("%xmm") || ops.contains("%ymm") || ops.contains("%zmm")
}

/// Symbols of `module` that are setup code, run once per key before any wide state
/// exists (and built without AVX): not part of the guarded data path.
fn is_setup(name: &str) -> bool {
    let base = name.split("::h").next().unwrap_or(name);
    ["::Cipher::new", "::supported", "::cpu_id"]
        .iter()
        .any(|s| base.ends_with(s))
        || (base.contains("::WideSchedule<") && base.ends_with(">::new"))
}

/// The legacy-SSE instructions among the data-path functions of `module`, after checking
/// that each function in `required` is among them.
fn legacy_sse_in(exe: &Path, module: &str, required: &[&str]) -> Vec<String> {
    let syms = functions(exe, module);
    for r in required {
        assert!(
            syms.iter().any(|s| s.name.starts_with(r)),
            "{r} is not in {} (found: {:?})",
            exe.display(),
            syms.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    }
    let mut bad = Vec::new();
    let checked: Vec<_> = syms.iter().filter(|s| !is_setup(&s.name)).collect();
    eprintln!(
        "{module}: checking {:?}",
        checked.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    for sym in checked {
        let ins = instructions(exe, sym);
        assert!(
            !ins.is_empty(),
            "no instructions disassembled for {}",
            sym.name
        );
        for (m, ops) in ins {
            if uses_vector_registers(&ops) && !m.starts_with('v') {
                bad.push(format!("{}: {m} {ops}", sym.name));
            }
        }
    }
    bad
}

/// Keeps every backend's code reachable in this executable.
fn link_every_backend() {
    let key: [u8; 64] = std::array::from_fn(|i| i as u8);
    for b in Backend::ALL {
        if let Ok(e) = Engine::with_backend(&key, 4096, b) {
            let mut buf = vec![0u8; 4096];
            e.encrypt(&mut buf, 0).unwrap();
            e.decrypt(&mut buf, 0).unwrap();
        }
    }
}

#[test]
fn the_wide_backends_run_only_vex_encoded_vector_instructions() {
    link_every_backend();
    let exe = std::env::current_exe().expect("test executable");
    let mut bad = legacy_sse_in(
        &exe,
        "nodecrypt_xts::vaes::",
        &["nodecrypt_xts::vaes::vaes_xts"],
    );
    bad.extend(legacy_sse_in(
        &exe,
        "nodecrypt_xts::vaes512::",
        &["nodecrypt_xts::vaes512::vaes512_xts"],
    ));
    assert!(
        bad.is_empty(),
        "legacy SSE instructions in the VEX backends:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_aesni_backend_runs_no_avx_instruction() {
    link_every_backend();
    let exe = std::env::current_exe().expect("test executable");
    let syms = functions(&exe, "nodecrypt_xts::aesni::");
    assert!(
        syms.iter()
            .any(|s| s.name.starts_with("nodecrypt_xts::aesni::xts")),
        "nodecrypt_xts::aesni::xts is not in {}",
        exe.display()
    );
    let mut bad = Vec::new();
    for sym in &syms {
        for (m, ops) in instructions(&exe, sym) {
            if m.starts_with('v') && uses_vector_registers(&ops) {
                bad.push(format!("{}: {m} {ops}", sym.name));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "AVX instructions in the AES-NI backend:\n{}",
        bad.join("\n")
    );
}
