//! Any JSON text in an otherwise intact header (checksums recomputed, both copies
//! alike): the judge never panics, and what it accepts keeps the allowlist's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodecrypt_agent::luks::{self, header, Inspection, Stage};
use serde_json::Value;

const SIZE: usize = 16 << 10;

fn image(json: &[u8]) -> Option<Vec<u8>> {
    if json.len() >= SIZE - header::BINARY_SIZE || json.contains(&0) {
        return None;
    }
    let mut out = Vec::new();
    for (magic, offset) in [(b"LUKS\xba\xbe", 0u64), (b"SKUL\xba\xbe", SIZE as u64)] {
        let mut b = vec![0u8; SIZE];
        b[..6].copy_from_slice(magic);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&(SIZE as u64).to_be_bytes());
        b[16..24].copy_from_slice(&1u64.to_be_bytes());
        b[24..28].copy_from_slice(b"vol1");
        b[72..78].copy_from_slice(b"sha256");
        b[208..217].copy_from_slice(b"nodecrypt");
        b[256..264].copy_from_slice(&offset.to_be_bytes());
        b[header::BINARY_SIZE..header::BINARY_SIZE + json.len()].copy_from_slice(json);
        let sum = header::checksum(&b[..header::BINARY_SIZE], &b[header::BINARY_SIZE..]);
        b[448..480].copy_from_slice(&sum);
        out.extend_from_slice(&b);
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some(img) = image(data) else { return };
    for size in [64u64 << 20, (64 << 20) - 512, 1 << 40] {
        if let Inspection::Ours(h) = luks::judge_prefix(&img, size, Stage::Usable) {
            let j: Value = serde_json::from_slice(data).expect("accepted JSON parses");
            let seg = &j["segments"]["0"];
            assert_eq!(seg["type"], "crypt");
            assert_eq!(seg["iv_tweak"], "0");
            assert!(seg.get("integrity").is_none());
            assert!(h.data_offset >= 2 * SIZE as u64 && h.data_offset % h.sector_size as u64 == 0);
            assert!(h.data_offset + h.data_size <= size);
            for k in j["keyslots"].as_object().expect("keyslots").values() {
                assert_eq!(k["kdf"]["type"], "pbkdf2");
                assert!(k["kdf"]["iterations"].as_u64().expect("iterations") <= 100_000);
            }
            assert_eq!(j["tokens"].as_object().expect("tokens").len(), 1);
        }
    }
});
