//! Reading a LUKS2 disk image on the host, independently of the agent: the real
//! `cryptsetup` CLI gives the header's data segment and (with the keyslot key) the volume
//! key; the data segment is then read or written with the project's XTS engine.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodecrypt_xts::Engine;

use crate::harness::run_limited;

/// The data segment of a LUKS2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the data segment in the image.
    pub offset: u64,
    /// Encryption sector size (512 or 4096).
    pub sector_size: usize,
}

/// The header as `cryptsetup luksDump --dump-json-metadata` prints it.
pub fn metadata(img: &Path) -> serde_json::Value {
    let out = run_limited(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(img),
        Duration::from_secs(60),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("luksDump JSON of {img:?}: {e}\n{out}"))
}

/// Segment 0 of the header: checks it is `aes-xts-plain64` and dynamic-sized.
pub fn segment(img: &Path) -> Segment {
    let meta = metadata(img);
    let seg = &meta["segments"]["0"];
    assert_eq!(seg["type"], "crypt", "segment 0 of {img:?}: {seg}");
    assert_eq!(
        seg["encryption"], "aes-xts-plain64",
        "segment 0 of {img:?}: {seg}"
    );
    assert_eq!(seg["iv_tweak"], "0", "segment 0 of {img:?}: {seg}");
    let offset = seg["offset"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("segment offset in {seg}"));
    let sector_size = seg["sector_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("segment sector_size in {seg}")) as usize;
    Segment {
        offset,
        sector_size,
    }
}

/// The 64-byte LUKS2 volume key, unlocked with `slot_key` by the real libcryptsetup
/// (`luksDump --dump-volume-key`). Both keys pass through files in `dir` (the test's own
/// temp dir, mode 0600) and are deleted at once.
pub fn volume_key(img: &Path, slot_key: &[u8], dir: &Path) -> Vec<u8> {
    let slot_file = dir.join("slot.key");
    let vk_file = dir.join("volume.key");
    let _ = fs::remove_file(&vk_file);
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&slot_file)
        .and_then(|mut f| f.write_all(slot_key))
        .expect("write slot key file");
    run_limited(
        Command::new("cryptsetup")
            .args([
                "luksDump",
                "--batch-mode",
                "--dump-volume-key",
                "--key-file",
            ])
            .arg(&slot_file)
            .arg("--volume-key-file")
            .arg(&vk_file)
            .arg(img),
        Duration::from_secs(60),
    );
    let vk = fs::read(&vk_file).expect("read volume key file");
    fs::remove_file(&slot_file).expect("remove slot key file");
    fs::remove_file(&vk_file).expect("remove volume key file");
    assert_eq!(
        vk.len(),
        64,
        "volume key of {img:?}: aes-xts-plain64 with 512 bits"
    );
    vk
}

/// Reads `len` bytes at `pos` of the data segment and decrypts them with the engine.
pub fn read_plain(img: &Path, seg: Segment, key: &[u8], pos: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut f = fs::File::open(img).expect("open image");
    f.seek(SeekFrom::Start(seg.offset + pos)).expect("seek");
    f.read_exact(&mut buf).expect("read data segment");
    Engine::new(key, seg.sector_size)
        .expect("engine")
        .decrypt(&mut buf, pos)
        .expect("decrypt");
    buf
}
