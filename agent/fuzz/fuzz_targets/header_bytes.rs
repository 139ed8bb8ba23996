//! Any bytes as the start of a device: the judge never panics, never accepts bytes whose
//! checksums do not hold, and reads only what it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodecrypt_agent::luks::{self, header, Inspection, Stage};

fuzz_target!(|data: &[u8]| {
    let size = 64 << 20;
    if let Inspection::Ours(_) = luks::judge_prefix(data, size, Stage::Usable) {
        // Accepted: both copies must really be intact and identical.
        assert!(header::parse(data).is_ok());
    }
    let _ = header::copies(data);
    let _ = header::plan_repair(data, None);
});
