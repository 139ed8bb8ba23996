//! An independent LUKS2 header codec for building hostile images in tests: it reads the
//! two header copies of an image, lets a test change their JSON metadata or binary
//! fields, and writes them back with valid checksums (so that only the semantics are
//! wrong), or writes one copy as it is (to damage exactly that copy).
//!
//! It shares no code with the agent: it follows the LUKS2 on-disk format specification
//! (version 1.1.x, "LUKS2 On-Disk Format Specification") and is checked against the real
//! `cryptsetup` in its unit tests. Each copy is a 4096-byte binary header followed by
//! the JSON area (`hdr_size - 4096` bytes, the JSON text then NUL padding). The primary
//! copy is at offset 0, the secondary at offset `hdr_size`. Binary header, big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic: `LUKS\xba\xbe` (primary), `SKUL\xba\xbe` (secondary) |
//! | 6 | 2 | version (2) |
//! | 8 | 8 | hdr_size (binary header + JSON area) |
//! | 16 | 8 | seqid (bumped on every update; the higher copy wins) |
//! | 24 | 48 | label |
//! | 72 | 32 | checksum algorithm (`sha256`) |
//! | 104 | 64 | salt |
//! | 168 | 40 | uuid |
//! | 208 | 48 | subsystem |
//! | 256 | 8 | hdr_offset (offset of this copy) |
//! | 264 | 184 | padding |
//! | 448 | 64 | checksum (sha256 in its first 32 bytes) |
//! | 512 | 3584 | padding |
//!
//! The checksum is sha256 over the whole copy (binary header with the checksum field
//! zeroed, then the JSON area).
//!
//! Beware: libcryptsetup repairs a damaged or stale copy of a header it loads, even for a
//! read-only command such as `luksDump`; run `cryptsetup` on throwaway copies only.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Size of the binary part of a header copy.
pub const BIN_SIZE: usize = 4096;
/// Magic of the primary copy.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary copy.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 6;
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const LEN_LABEL: usize = 48;
const OFF_CSUM_ALG: usize = 72;
const LEN_CSUM_ALG: usize = 32;
const OFF_UUID: usize = 168;
const LEN_UUID: usize = 40;
const OFF_SUBSYSTEM: usize = 208;
const LEN_SUBSYSTEM: usize = 48;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const LEN_CSUM: usize = 64;

/// The header sizes the specification allows (16 KiB to 4 MiB, powers of two).
pub fn valid_hdr_size(n: u64) -> bool {
    (16 << 10..=4 << 20).contains(&n) && n.is_power_of_two()
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One header copy: its binary header and JSON area, exactly as read (or as changed).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Copy {
    /// Where the copy sits in the image (0 or the primary's `hdr_size`); `write_copy`
    /// writes it back there whatever its own `hdr_offset` field says.
    pub at: u64,
    /// The 4096-byte binary header.
    pub bin: Vec<u8>,
    /// The JSON area (`hdr_size - 4096` bytes).
    pub json_area: Vec<u8>,
}

impl Copy {
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.bin[off..off + 8].try_into().expect("8 bytes"))
    }

    fn set_u64_at(&mut self, off: usize, v: u64) {
        self.bin[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn text_at(&self, off: usize, len: usize) -> String {
        let f = &self.bin[off..off + len];
        let end = f.iter().position(|&b| b == 0).unwrap_or(len);
        String::from_utf8_lossy(&f[..end]).into_owned()
    }

    fn set_text_at(&mut self, off: usize, len: usize, s: &str) {
        assert!(
            s.len() < len,
            "{s:?} does not fit a {len}-byte NUL-terminated field"
        );
        self.bin[off..off + len].fill(0);
        self.bin[off..off + s.len()].copy_from_slice(s.as_bytes());
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 6] {
        self.bin[OFF_MAGIC..OFF_MAGIC + 6]
            .try_into()
            .expect("6 bytes")
    }

    /// Sets the magic bytes.
    pub fn set_magic(&mut self, m: [u8; 6]) {
        self.bin[OFF_MAGIC..OFF_MAGIC + 6].copy_from_slice(&m);
    }

    /// The format version.
    pub fn version(&self) -> u16 {
        u16::from_be_bytes([self.bin[OFF_VERSION], self.bin[OFF_VERSION + 1]])
    }

    /// Sets the format version.
    pub fn set_version(&mut self, v: u16) {
        self.bin[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// The header size field (binary header + JSON area).
    pub fn hdr_size(&self) -> u64 {
        self.u64_at(OFF_HDR_SIZE)
    }

    /// The sequence id.
    pub fn seqid(&self) -> u64 {
        self.u64_at(OFF_SEQID)
    }

    /// Sets the sequence id.
    pub fn set_seqid(&mut self, v: u64) {
        self.set_u64_at(OFF_SEQID, v);
    }

    /// The label (up to the first NUL).
    pub fn label(&self) -> String {
        self.text_at(OFF_LABEL, LEN_LABEL)
    }

    /// Sets the label (at most 47 bytes).
    pub fn set_label(&mut self, s: &str) {
        self.set_text_at(OFF_LABEL, LEN_LABEL, s);
    }

    /// The checksum algorithm name.
    pub fn checksum_alg(&self) -> String {
        self.text_at(OFF_CSUM_ALG, LEN_CSUM_ALG)
    }

    /// The uuid (text).
    pub fn uuid(&self) -> String {
        self.text_at(OFF_UUID, LEN_UUID)
    }

    /// The subsystem (up to the first NUL).
    pub fn subsystem(&self) -> String {
        self.text_at(OFF_SUBSYSTEM, LEN_SUBSYSTEM)
    }

    /// Sets the subsystem (at most 47 bytes).
    pub fn set_subsystem(&mut self, s: &str) {
        self.set_text_at(OFF_SUBSYSTEM, LEN_SUBSYSTEM, s);
    }

    /// The `hdr_offset` field.
    pub fn hdr_offset(&self) -> u64 {
        self.u64_at(OFF_HDR_OFFSET)
    }

    /// The stored checksum (first 32 bytes of the field).
    pub fn stored_checksum(&self) -> [u8; 32] {
        self.bin[OFF_CSUM..OFF_CSUM + 32]
            .try_into()
            .expect("32 bytes")
    }

    /// The checksum this copy should carry: sha256 over the binary header with the
    /// checksum field zeroed, then the JSON area.
    pub fn compute_checksum(&self) -> [u8; 32] {
        let mut bin = self.bin.clone();
        bin[OFF_CSUM..OFF_CSUM + LEN_CSUM].fill(0);
        let mut h = Sha256::new();
        h.update(&bin);
        h.update(&self.json_area);
        h.finalize().into()
    }

    /// Whether the stored checksum matches the contents.
    pub fn checksum_ok(&self) -> bool {
        self.stored_checksum() == self.compute_checksum()
    }

    /// Stores the checksum of the current contents.
    pub fn fix_checksum(&mut self) {
        let c = self.compute_checksum();
        self.bin[OFF_CSUM..OFF_CSUM + LEN_CSUM].fill(0);
        self.bin[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&c);
    }

    /// Flips one bit of the stored checksum (the copy no longer verifies).
    pub fn break_checksum(&mut self) {
        self.bin[OFF_CSUM] ^= 0x01;
    }

    /// The JSON text (the JSON area up to its first NUL).
    pub fn json_text(&self) -> &[u8] {
        let end = self
            .json_area
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.json_area.len());
        &self.json_area[..end]
    }

    /// The JSON metadata, parsed.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(self.json_text()).map_err(|e| {
            bad(format!(
                "header copy at {}: JSON area does not parse: {e}",
                self.at
            ))
        })
    }

    /// Replaces the JSON metadata (compact text, NUL padded). The checksum is not
    /// updated: call [`Copy::fix_checksum`] or [`write_both`].
    pub fn set_json(&mut self, v: &serde_json::Value) -> io::Result<()> {
        let text = serde_json::to_vec(v).expect("serialise JSON");
        if text.len() >= self.json_area.len() {
            return Err(bad(format!(
                "JSON of {} bytes does not fit the {}-byte JSON area",
                text.len(),
                self.json_area.len()
            )));
        }
        self.json_area.fill(0);
        self.json_area[..text.len()].copy_from_slice(&text);
        Ok(())
    }

    /// Changes the JSON metadata with `f` (parse, change, store).
    pub fn edit_json(&mut self, f: impl FnOnce(&mut serde_json::Value)) -> io::Result<()> {
        let mut v = self.json()?;
        f(&mut v);
        self.set_json(&v)
    }

    /// The whole copy as it sits on disk.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.bin.clone();
        b.extend_from_slice(&self.json_area);
        b
    }

    /// Parses a copy from `bytes` (binary header then JSON area) found at `at`. Checks
    /// only that there are enough bytes: a damaged copy is still returned, so that tests
    /// can inspect it; see [`Copy::problems`].
    pub fn parse(at: u64, bytes: &[u8], hdr_size: u64) -> io::Result<Copy> {
        let n = usize::try_from(hdr_size).map_err(|_| bad(format!("hdr_size {hdr_size}")))?;
        if n <= BIN_SIZE || bytes.len() < n {
            return Err(bad(format!(
                "header copy at {at}: {} bytes, want hdr_size {hdr_size} > {BIN_SIZE}",
                bytes.len()
            )));
        }
        Ok(Copy {
            at,
            bin: bytes[..BIN_SIZE].to_vec(),
            json_area: bytes[BIN_SIZE..n].to_vec(),
        })
    }

    /// What is wrong with this copy at the binary level (empty: a valid copy): magic,
    /// version, hdr_size, hdr_offset, checksum algorithm, checksum, JSON parse.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let want_magic = if self.at == 0 {
            MAGIC_PRIMARY
        } else {
            MAGIC_SECONDARY
        };
        if self.magic() != want_magic {
            p.push(format!("magic {:02x?}", self.magic()));
        }
        if self.version() != 2 {
            p.push(format!("version {}", self.version()));
        }
        if self.hdr_size() != (BIN_SIZE + self.json_area.len()) as u64 {
            p.push(format!("hdr_size {}", self.hdr_size()));
        }
        if self.hdr_offset() != self.at {
            p.push(format!("hdr_offset {}", self.hdr_offset()));
        }
        if self.checksum_alg() != "sha256" {
            p.push(format!("checksum algorithm {:?}", self.checksum_alg()));
        }
        if !self.checksum_ok() {
            p.push("checksum".into());
        }
        if let Err(e) = self.json() {
            p.push(e.to_string());
        }
        p
    }
}

/// Reads both header copies of the image at `path`: the primary at 0 (its `hdr_size`
/// must be one the specification allows) and the secondary at that `hdr_size`.
pub fn read(path: &Path) -> io::Result<(Copy, Copy)> {
    let mut f = fs::File::open(path)?;
    let mut bin = vec![0u8; BIN_SIZE];
    f.read_exact(&mut bin)?;
    let hdr_size = u64::from_be_bytes(bin[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].try_into().unwrap());
    if !valid_hdr_size(hdr_size) {
        return Err(bad(format!(
            "{}: primary hdr_size {hdr_size} is not a LUKS2 header size",
            path.display()
        )));
    }
    let mut both = vec![0u8; 2 * hdr_size as usize];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut both)?;
    let primary = Copy::parse(0, &both[..hdr_size as usize], hdr_size)?;
    let secondary = Copy::parse(hdr_size, &both[hdr_size as usize..], hdr_size)?;
    Ok((primary, secondary))
}

/// Writes `copy` at its place in the image, byte for byte: no checksum is recomputed
/// (the way to damage exactly one copy).
pub fn write_copy(path: &Path, copy: &Copy) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(copy.at))?;
    f.write_all(&copy.bytes())?;
    f.sync_data()
}

/// Writes both copies as one consistent update, the way cryptsetup does: both get the
/// same seqid, one above the higher of the two, and a freshly computed checksum.
pub fn write_both(path: &Path, primary: &mut Copy, secondary: &mut Copy) -> io::Result<()> {
    let seqid = primary.seqid().max(secondary.seqid()) + 1;
    for c in [&mut *primary, &mut *secondary] {
        c.set_seqid(seqid);
        c.fix_checksum();
    }
    write_copy(path, primary)?;
    write_copy(path, secondary)
}

/// Applies `f` to the JSON of both copies and writes them with [`write_both`].
pub fn edit_both_json(path: &Path, f: impl Fn(&mut serde_json::Value)) -> io::Result<()> {
    let (mut p, mut s) = read(path)?;
    p.edit_json(&f)?;
    s.edit_json(&f)?;
    write_both(path, &mut p, &mut s)
}

/// Copies the image at `src` to `dst` keeping it sparse: only the non-zero 4 KiB blocks
/// are written, the rest stays a hole, and the length is the same.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let mut from = fs::File::open(src)?;
    let len = from.metadata()?.len();
    let mut to = fs::File::create(dst)?;
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let zeros = [0u8; 4096];
    let mut off = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block != &zeros[..block.len()] {
                to.seek(SeekFrom::Start(off + (i * 4096) as u64))?;
                to.write_all(block)?;
            }
        }
        off += n as u64;
    }
    to.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(cmd: &mut Command) -> (bool, String) {
        let out = cmd.output().expect("spawn");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A 32 MiB image formatted by the real cryptsetup with a sector size.
    fn cryptsetup_image(dir: &Path, name: &str, sector: u32) -> std::path::PathBuf {
        let img = dir.join(name);
        fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let kf = dir.join("key");
        fs::write(&kf, [7u8; 64]).unwrap();
        let (ok, out) = sh(Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--label",
                "vol-codec",
                "--subsystem",
                "nodecrypt",
                "--sector-size",
                &sector.to_string(),
                "--key-file",
            ])
            .arg(&kf)
            .arg(&img));
        assert!(ok, "luksFormat: {out}");
        img
    }

    /// `cryptsetup luksDump --dump-json-metadata` of a throwaway copy of `img`
    /// (libcryptsetup may repair what it loads).
    fn dump_json_of_copy(img: &Path) -> Result<serde_json::Value, String> {
        let tmp = img.with_extension("dumpcopy");
        sparse_copy(img, &tmp).unwrap();
        let (ok, out) = sh(Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&tmp));
        fs::remove_file(&tmp).unwrap();
        if !ok {
            return Err(out);
        }
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    fn squash(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn dump_of_copy(img: &Path) -> Result<String, String> {
        let tmp = img.with_extension("dumpcopy");
        sparse_copy(img, &tmp).unwrap();
        let (ok, out) = sh(Command::new("cryptsetup").arg("luksDump").arg(&tmp));
        fs::remove_file(&tmp).unwrap();
        if ok {
            Ok(out)
        } else {
            Err(out)
        }
    }

    #[test]
    fn reads_what_cryptsetup_wrote_and_round_trips_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        for sector in [512, 4096] {
            let img = cryptsetup_image(dir.path(), &format!("rt{sector}.img"), sector);
            let before = fs::read(&img).unwrap();
            let (p, s) = read(&img).unwrap();
            assert!(p.problems().is_empty(), "{:?}", p.problems());
            assert!(s.problems().is_empty(), "{:?}", s.problems());
            assert_eq!(p.magic(), MAGIC_PRIMARY);
            assert_eq!(s.magic(), MAGIC_SECONDARY);
            assert_eq!(p.version(), 2);
            assert_eq!(p.hdr_size(), s.hdr_size());
            assert_eq!(s.at, p.hdr_size());
            assert_eq!(s.hdr_offset(), p.hdr_size());
            assert_eq!(p.seqid(), s.seqid());
            assert_eq!(p.label(), "vol-codec");
            assert_eq!(p.subsystem(), "nodecrypt");
            assert_eq!(p.checksum_alg(), "sha256");
            assert_eq!(p.json_text(), s.json_text());
            // The fields agree with cryptsetup's own reading.
            let dump = dump_of_copy(&img).unwrap();
            assert!(dump.contains(&p.uuid()), "{dump}");
            assert!(
                squash(&dump).contains(&format!("Epoch: {}", p.seqid())),
                "{dump}"
            );
            assert!(
                squash(&dump).contains(&format!("Metadata area: {} [bytes]", p.hdr_size())),
                "{dump}"
            );
            let meta = dump_json_of_copy(&img).unwrap();
            assert_eq!(p.json().unwrap(), meta);
            assert_eq!(
                meta["config"]["json_size"].as_str().unwrap(),
                p.json_area.len().to_string()
            );
            assert_eq!(meta["segments"]["0"]["sector_size"], sector);
            // Writing the copies back unchanged changes no byte.
            write_copy(&img, &p).unwrap();
            write_copy(&img, &s).unwrap();
            assert!(
                fs::read(&img).unwrap() == before,
                "round trip changed bytes"
            );
            // Recomputing a valid checksum gives the same bytes.
            let mut p2 = p.clone();
            p2.fix_checksum();
            assert_eq!(p2, p);
        }
    }

    #[test]
    fn a_json_mutation_with_recomputed_checksums_is_what_cryptsetup_reads() {
        let dir = tempfile::tempdir().unwrap();
        let img = cryptsetup_image(dir.path(), "m.img", 4096);
        let seq0 = read(&img).unwrap().0.seqid();
        edit_both_json(&img, |v| {
            v["tokens"]["0"] = serde_json::json!({
                "type": "nodecrypt", "keyslots": ["0"], "volume_id": "vol-codec",
                "key_version": 7, "broker": "127.0.0.1:1",
            });
            v["keyslots"]["0"]["kdf"]["iterations"] = serde_json::json!(1234);
        })
        .unwrap();
        let (mut p, mut s) = read(&img).unwrap();
        assert!(p.problems().is_empty() && s.problems().is_empty());
        assert_eq!(p.seqid(), seq0 + 1);
        assert_eq!(s.seqid(), seq0 + 1);
        let meta = dump_json_of_copy(&img).unwrap();
        assert_eq!(meta["tokens"]["0"]["key_version"], 7, "{meta}");
        assert_eq!(meta["keyslots"]["0"]["kdf"]["iterations"], 1234, "{meta}");
        let dump = dump_of_copy(&img).unwrap();
        assert!(
            squash(&dump).contains(&format!("Epoch: {}", seq0 + 1)),
            "{dump}"
        );
        // Binary fields: label and subsystem as cryptsetup shows them.
        p.set_label("hx-77");
        s.set_label("hx-77");
        write_both(&img, &mut p, &mut s).unwrap();
        let dump = dump_of_copy(&img).unwrap();
        assert!(squash(&dump).contains("Label: hx-77"), "{dump}");
        assert!(squash(&dump).contains("Subsystem: nodecrypt"), "{dump}");
    }

    #[test]
    fn checksum_verification_catches_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let img = cryptsetup_image(dir.path(), "c.img", 512);
        let (p, s) = read(&img).unwrap();
        for c in [p, s] {
            // One flipped bit in the binary header, in the JSON text, in the padding.
            let json_len = c.json_text().len();
            for (part, at) in [
                ("bin", OFF_LABEL + 3),
                ("json", json_len / 2),
                ("pad", c.json_area.len() - 1),
            ] {
                let mut d = c.clone();
                if part == "bin" {
                    d.bin[at] ^= 0x20;
                } else {
                    d.json_area[at] ^= 0x20;
                }
                assert!(!d.checksum_ok(), "{part} flip at {at} not caught");
                assert!(d.problems().contains(&"checksum".to_string()));
                d.fix_checksum();
                assert!(d.checksum_ok());
            }
            let mut d = c.clone();
            d.break_checksum();
            assert!(!d.checksum_ok());
        }
        // And cryptsetup agrees that the flipped primary is damaged: it loads the
        // secondary instead (on a throwaway copy: it repairs the primary as it does).
        let (mut p, _) = read(&img).unwrap();
        p.json_area[10] ^= 0x01;
        write_copy(&img, &p).unwrap();
        let tmp = dir.path().join("repair.img");
        sparse_copy(&img, &tmp).unwrap();
        let before = fs::read(&tmp).unwrap();
        let (ok, out) = sh(Command::new("cryptsetup").arg("luksDump").arg(&tmp));
        assert!(ok, "{out}");
        let after = fs::read(&tmp).unwrap();
        assert!(
            before != after,
            "libcryptsetup did not repair the damaged primary (the docs above say it does)"
        );
        assert!(read(&tmp).unwrap().0.checksum_ok());
    }

    #[test]
    fn sparse_copy_is_identical_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let img = cryptsetup_image(dir.path(), "s.img", 4096);
        let dst = dir.path().join("s2.img");
        sparse_copy(&img, &dst).unwrap();
        assert!(fs::read(&img).unwrap() == fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&dst).unwrap();
        assert!(m.blocks() * 512 < m.len() / 2, "not sparse: {m:?}");
    }
}
