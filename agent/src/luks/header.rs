//! The LUKS2 header as bytes: both binary headers and both JSON areas, read and checked
//! by pure code before libcryptsetup ever sees the device.
//!
//! libcryptsetup repairs a damaged header copy from the other one whenever it loads a
//! header, so letting it look at an untrusted disk writes to that disk. Here nothing is
//! written: [`parse`] takes the first `2 × hdr_size` bytes of a device and either returns
//! both copies, intact and identical, or a [`Refusal`] that names the copy and the field.
//! A header that passes needs no repair, so libcryptsetup has no reason to write to it.
//!
//! The on-disk format is the LUKS2 specification's (version 1.1.x): a 4096-byte binary
//! header (big-endian) followed by a NUL-padded JSON area, twice; the secondary copy
//! starts at `hdr_size`.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The binary part of one header copy.
pub const BINARY_SIZE: usize = 4096;
/// The header sizes (binary + JSON) the specification allows.
pub const HEADER_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
/// Where a secondary copy may start when the primary is unreadable (the allowed sizes).
pub const SECONDARY_OFFSETS: [u64; 9] = HEADER_SIZES;
/// The bytes [`parse`] needs at most: two copies of the largest header.
pub const MAX_PREFIX: u64 = 2 * (4 << 20);

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";

/// Which header copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The copy at offset 0.
    Primary,
    /// The copy at offset `hdr_size`.
    Secondary,
}

impl Which {
    /// "primary" or "secondary".
    pub fn name(self) -> &'static str {
        match self {
            Which::Primary => "primary",
            Which::Secondary => "secondary",
        }
    }
}

/// Why a header is not used: a stable reason code (`segment.offset`, `header.checksum`,
/// …; scripts read it from `--json`) and a sentence naming the field and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    /// The stable reason code.
    pub reason: &'static str,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Refusal {
    /// A refusal with a reason code and a message.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The fields of one binary header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    /// Header size (binary + JSON area).
    pub hdr_size: u64,
    /// Sequence id (bumped on every write).
    pub seqid: u64,
    /// Label (nodecrypt: the volume id).
    pub label: String,
    /// Checksum algorithm.
    pub checksum_alg: String,
    /// Header UUID.
    pub uuid: String,
    /// Subsystem (nodecrypt: `nodecrypt`).
    pub subsystem: String,
    /// Offset of this copy on the device.
    pub hdr_offset: u64,
}

/// One header copy, intact: its binary fields and its JSON metadata.
#[derive(Debug, Clone)]
pub struct HeaderCopy {
    /// Which copy.
    pub which: Which,
    /// The binary header.
    pub binary: Binary,
    /// The JSON text (up to the first NUL).
    pub json_text: Vec<u8>,
    /// The parsed JSON metadata.
    pub json: Value,
}

/// Both copies of a header, intact and identical: what the policy judges.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The primary copy (the secondary is identical in every field that matters).
    pub primary: HeaderCopy,
}

impl Parsed {
    /// The binary fields.
    pub fn binary(&self) -> &Binary {
        &self.primary.binary
    }
    /// The JSON metadata.
    pub fn json(&self) -> &Value {
        &self.primary.json
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A NUL-terminated string field; `None` when it is not NUL-terminated or not UTF-8.
fn cstr(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&raw[..end]).ok().map(str::to_string)
}

/// Whether `bytes` starts with a LUKS2 primary header magic and version 2.
pub fn has_primary_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..6] == MAGIC_PRIMARY && bytes[6..8] == [0, 2]
}

/// Whether `bytes` starts with a LUKS2 secondary header magic and version 2.
pub fn has_secondary_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..6] == MAGIC_SECONDARY && bytes[6..8] == [0, 2]
}

/// The subsystem field of a binary header that carries either magic (whatever its
/// version), if readable: how a damaged nodecrypt header is still recognised as one.
pub fn subsystem_of(bytes: &[u8]) -> Option<String> {
    (bytes.len() >= 256 && (&bytes[..6] == MAGIC_PRIMARY || &bytes[..6] == MAGIC_SECONDARY))
        .then(|| cstr(&bytes[208..256]))
        .flatten()
}

/// The header size the primary binary header declares, if it is one the format allows.
pub fn declared_size(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= 16 && has_primary_magic(bytes))
        .then(|| be64(bytes, 8))
        .filter(|s| HEADER_SIZES.contains(s))
}

/// The checksum a binary header must carry over `binary` (csum zeroed) and `area`.
pub fn checksum(binary: &[u8], area: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&binary[..448]);
    h.update([0u8; 64]);
    h.update(&binary[512..BINARY_SIZE]);
    h.update(area);
    h.finalize().into()
}

/// Parses and checks one copy: `bytes` holds its binary header and JSON area.
fn parse_copy(which: Which, bytes: &[u8], hdr_size: u64) -> Result<HeaderCopy, Refusal> {
    let w = which.name();
    let bad = |reason, what: String| Refusal::new(reason, format!("{w} header copy: {what}"));
    let magic = match which {
        Which::Primary => MAGIC_PRIMARY,
        Which::Secondary => MAGIC_SECONDARY,
    };
    if bytes.len() < BINARY_SIZE || &bytes[..6] != magic {
        return Err(bad("header.magic", "no LUKS2 magic".into()));
    }
    let version = u16::from_be_bytes([bytes[6], bytes[7]]);
    if version != 2 {
        return Err(bad(
            "header.version",
            format!("version {version}, not LUKS2"),
        ));
    }
    let declared = be64(bytes, 8);
    if declared != hdr_size {
        return Err(bad(
            "header.size",
            format!("hdr_size {declared} differs from the primary's {hdr_size}"),
        ));
    }
    if (bytes.len() as u64) < hdr_size {
        return Err(bad(
            "header.size",
            format!("the device ends inside the header ({hdr_size} bytes)"),
        ));
    }
    let field = |name: &str, range: std::ops::Range<usize>| {
        cstr(&bytes[range]).ok_or_else(|| {
            bad(
                "header.field",
                format!("{name} is not a NUL-terminated UTF-8 string"),
            )
        })
    };
    let binary = Binary {
        hdr_size,
        seqid: be64(bytes, 16),
        label: field("label", 24..72)?,
        checksum_alg: field("checksum_alg", 72..104)?,
        uuid: field("uuid", 168..208)?,
        subsystem: field("subsystem", 208..256)?,
        hdr_offset: be64(bytes, 256),
    };
    let want_offset = match which {
        Which::Primary => 0,
        Which::Secondary => hdr_size,
    };
    if binary.hdr_offset != want_offset {
        return Err(bad(
            "header.offset",
            format!(
                "hdr_offset {} but the copy lies at {want_offset}",
                binary.hdr_offset
            ),
        ));
    }
    if binary.checksum_alg != "sha256" {
        return Err(bad(
            "header.checksum",
            format!(
                "checksum algorithm {:?}; nodecrypt writes sha256",
                binary.checksum_alg
            ),
        ));
    }
    let end = hdr_size as usize;
    let area = &bytes[BINARY_SIZE..end];
    let stored = &bytes[448..512];
    if stored[..32] != checksum(&bytes[..BINARY_SIZE], area) || stored[32..].iter().any(|&b| b != 0)
    {
        return Err(bad(
            "header.checksum",
            "the checksum does not match its contents (damaged or tampered)".into(),
        ));
    }
    let nul = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad("header.json", "the JSON area is not NUL-terminated".into()))?;
    if area[nul..].iter().any(|&b| b != 0) {
        return Err(bad(
            "header.json",
            "bytes after the JSON text are not zero".into(),
        ));
    }
    let json_text = area[..nul].to_vec();
    let json: Value = serde_json::from_slice(&json_text).map_err(|e| {
        bad(
            "header.json",
            format!("the JSON area is not valid JSON ({e})"),
        )
    })?;
    if !json.is_object() {
        return Err(bad(
            "header.json",
            "the JSON metadata is not an object".into(),
        ));
    }
    Ok(HeaderCopy {
        which,
        binary,
        json_text,
        json,
    })
}

/// Reads both header copies from `prefix` (the device's first bytes: at least two
/// headers' worth, at most [`MAX_PREFIX`]) and checks magic, version, size, offsets,
/// checksums and JSON syntax of each, then that the two copies agree. Pure: no I/O.
pub fn parse(prefix: &[u8]) -> Result<Parsed, Refusal> {
    if prefix.len() < BINARY_SIZE || !has_primary_magic(prefix) {
        return Err(match prefix.len() >= 8 && &prefix[..6] == MAGIC_PRIMARY {
            true => Refusal::new("header.version", "primary header copy: not LUKS version 2"),
            false => Refusal::new("header.magic", "primary header copy: no LUKS2 magic"),
        });
    }
    let hdr_size = be64(prefix, 8);
    if !HEADER_SIZES.contains(&hdr_size) {
        return Err(Refusal::new(
            "header.size",
            format!("primary header copy: hdr_size {hdr_size} is not a LUKS2 header size"),
        ));
    }
    let size = hdr_size as usize;
    if prefix.len() < 2 * size {
        return Err(Refusal::new(
            "header.size",
            format!(
                "the device is shorter than two {hdr_size}-byte header copies ({} bytes)",
                prefix.len()
            ),
        ));
    }
    let primary = parse_copy(Which::Primary, &prefix[..size], hdr_size);
    let secondary = parse_copy(Which::Secondary, &prefix[size..2 * size], hdr_size);
    let (primary, secondary) = match (primary, secondary) {
        (Ok(p), Ok(s)) => (p, s),
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    let (p, s) = (&primary.binary, &secondary.binary);
    let differs = [
        ("seqid", p.seqid != s.seqid),
        ("label", p.label != s.label),
        ("uuid", p.uuid != s.uuid),
        ("subsystem", p.subsystem != s.subsystem),
        ("JSON metadata", primary.json_text != secondary.json_text),
    ];
    if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
        return Err(Refusal::new(
            "header.copies",
            format!(
                "the primary and secondary header copies disagree ({what}; seqid {} vs {}): one was rewritten",
                p.seqid, s.seqid
            ),
        ));
    }
    Ok(Parsed { primary })
}

/// The two copies as they are, each intact or with the reason it is not: what
/// `repair-header` decides from.
#[derive(Debug)]
pub struct Copies {
    /// The header size used to locate the copies.
    pub hdr_size: u64,
    /// The primary copy.
    pub primary: Result<HeaderCopy, Refusal>,
    /// The secondary copy.
    pub secondary: Result<HeaderCopy, Refusal>,
}

/// Parses each copy on its own, finding the secondary at the allowed offsets when the
/// primary is unreadable. Pure: no I/O.
pub fn copies(prefix: &[u8]) -> Option<Copies> {
    let hdr_size = declared_size(prefix).or_else(|| {
        SECONDARY_OFFSETS
            .iter()
            .copied()
            .find(|&o| prefix.len() as u64 >= o + 16 && has_secondary_magic(&prefix[o as usize..]))
            .filter(|&o| be64(prefix, o as usize + 8) == o)
    })?;
    let size = hdr_size as usize;
    if prefix.len() < 2 * size {
        return None;
    }
    Some(Copies {
        hdr_size,
        primary: parse_copy(Which::Primary, &prefix[..size], hdr_size),
        secondary: parse_copy(Which::Secondary, &prefix[size..2 * size], hdr_size),
    })
}

/// The bytes of copy `to` rebuilt from an intact `from` copy: the same fields and JSON,
/// the magic and offset of `to`, a fresh checksum. Pure.
pub fn rebuild(from: &[u8], hdr_size: u64, to: Which) -> Vec<u8> {
    let size = hdr_size as usize;
    let mut out = from[..size].to_vec();
    let (magic, offset) = match to {
        Which::Primary => (MAGIC_PRIMARY, 0),
        Which::Secondary => (MAGIC_SECONDARY, hdr_size),
    };
    out[..6].copy_from_slice(magic);
    out[256..264].copy_from_slice(&offset.to_be_bytes());
    out[448..512].fill(0);
    let sum = checksum(&out[..BINARY_SIZE], &out[BINARY_SIZE..size]);
    out[448..480].copy_from_slice(&sum);
    out
}

/// How to mend a header: rewrite copy `to` (at `offset`) with `bytes`, rebuilt from the
/// intact copy `from`.
#[derive(Debug)]
pub struct RepairPlan {
    /// What is wrong now.
    pub problem: Refusal,
    /// The copy kept.
    pub from: Which,
    /// The copy rewritten.
    pub to: Which,
    /// Where `bytes` go on the device.
    pub offset: u64,
    /// The new copy.
    pub bytes: Vec<u8>,
}

/// Why a header cannot be mended by copying one copy over the other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    /// Both copies are intact and identical.
    #[error("both header copies are intact and identical: nothing to repair")]
    Intact,
    /// No LUKS2 header copy could be located.
    #[error("no LUKS2 header copy found")]
    NoHeader,
    /// Neither copy is intact.
    #[error("both header copies are damaged (primary: {primary}; secondary: {secondary}); nothing intact to copy from")]
    BothDamaged {
        /// The primary's damage.
        primary: Refusal,
        /// The secondary's damage.
        secondary: Refusal,
    },
    /// Both are intact but disagree and the caller did not choose.
    #[error("both header copies are intact but disagree ({0}); choose the copy to keep (--from primary or --from secondary)")]
    Choose(Refusal),
    /// The chosen copy is the damaged one.
    #[error("the {0} copy is the damaged one ({1}); it cannot be the source")]
    DamagedSource(&'static str, Refusal),
}

/// Plans the repair of `prefix`'s header, keeping `from` (or the one intact copy). Pure;
/// the caller judges the result before writing it.
pub fn plan_repair(prefix: &[u8], from: Option<Which>) -> Result<RepairPlan, RepairError> {
    let c = copies(prefix).ok_or(RepairError::NoHeader)?;
    let problem = match parse(prefix) {
        Ok(_) => return Err(RepairError::Intact),
        Err(r) => r,
    };
    let from = match (&c.primary, &c.secondary, from) {
        (Err(p), Err(s), _) => {
            return Err(RepairError::BothDamaged {
                primary: p.clone(),
                secondary: s.clone(),
            })
        }
        (Ok(_), Ok(_), None) => return Err(RepairError::Choose(problem)),
        (Ok(_), Ok(_), Some(w)) => w,
        (Ok(_), Err(_), None | Some(Which::Primary)) => Which::Primary,
        (Err(_), Ok(_), None | Some(Which::Secondary)) => Which::Secondary,
        (Ok(_), Err(e), Some(Which::Secondary)) => {
            return Err(RepairError::DamagedSource("secondary", e.clone()))
        }
        (Err(e), Ok(_), Some(Which::Primary)) => {
            return Err(RepairError::DamagedSource("primary", e.clone()))
        }
    };
    let size = c.hdr_size as usize;
    let (src, to, offset) = match from {
        Which::Primary => (&prefix[..size], Which::Secondary, c.hdr_size),
        Which::Secondary => (&prefix[size..2 * size], Which::Primary, 0),
    };
    Ok(RepairPlan {
        problem,
        from,
        to,
        offset,
        bytes: rebuild(src, c.hdr_size, to),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header as nodecrypt writes it (16 KiB copies), built in memory.
    pub(crate) fn image(json: &Value, seqid: u64) -> Vec<u8> {
        let size = 16 << 10;
        let mut out = Vec::new();
        for which in [Which::Primary, Which::Secondary] {
            let mut b = vec![0u8; size];
            b[..6].copy_from_slice(match which {
                Which::Primary => MAGIC_PRIMARY,
                Which::Secondary => MAGIC_SECONDARY,
            });
            b[6..8].copy_from_slice(&2u16.to_be_bytes());
            b[8..16].copy_from_slice(&(size as u64).to_be_bytes());
            b[16..24].copy_from_slice(&seqid.to_be_bytes());
            b[24..28].copy_from_slice(b"vol1");
            b[72..78].copy_from_slice(b"sha256");
            b[168..172].copy_from_slice(b"uuid");
            b[208..217].copy_from_slice(b"nodecrypt");
            let off = if which == Which::Primary {
                0
            } else {
                size as u64
            };
            b[256..264].copy_from_slice(&off.to_be_bytes());
            let text = serde_json::to_vec(json).unwrap();
            b[BINARY_SIZE..BINARY_SIZE + text.len()].copy_from_slice(&text);
            let sum = checksum(&b[..BINARY_SIZE], &b[BINARY_SIZE..]);
            b[448..480].copy_from_slice(&sum);
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn intact_copies_parse() {
        let img = image(&serde_json::json!({"a": 1}), 3);
        let p = parse(&img).unwrap();
        assert_eq!(p.binary().seqid, 3);
        assert_eq!(p.binary().subsystem, "nodecrypt");
        assert_eq!(p.json()["a"], 1);
    }

    #[test]
    fn damage_names_the_copy_and_the_field() {
        let img = image(&serde_json::json!({"a": 1}), 3);
        let mut bad = img.clone();
        bad[BINARY_SIZE + 2] ^= 1;
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.reason, "header.checksum");
        assert!(e.message.contains("primary"), "{e}");
        let mut bad = img.clone();
        bad[(16 << 10) + 100] ^= 1;
        let e = parse(&bad).unwrap_err();
        assert_eq!(
            (e.reason, e.message.contains("secondary")),
            ("header.checksum", true),
            "{e}"
        );
        let mut bad = img.clone();
        bad[16 << 10] = b'X';
        assert_eq!(parse(&bad).unwrap_err().reason, "header.magic");
        assert_eq!(parse(&img[..20000]).unwrap_err().reason, "header.size");
    }

    #[test]
    fn copies_that_disagree_are_refused_and_one_can_rebuild_the_other() {
        let a = image(&serde_json::json!({"a": 1}), 3);
        let b = image(&serde_json::json!({"a": 2}), 4);
        let size = 16 << 10;
        let mut mixed = a[..size].to_vec();
        mixed.extend_from_slice(&b[size..]);
        let e = parse(&mixed).unwrap_err();
        assert_eq!(e.reason, "header.copies", "{e}");
        // Rebuilding the secondary from the primary makes the header whole again.
        let rebuilt = rebuild(&mixed[..size], size as u64, Which::Secondary);
        mixed[size..].copy_from_slice(&rebuilt);
        assert_eq!(parse(&mixed).unwrap().json()["a"], 1);
        assert_eq!(mixed, a);
    }

    #[test]
    fn a_repair_keeps_the_intact_copy_and_asks_when_both_are_intact() {
        let size = 16 << 10;
        let good = image(&serde_json::json!({"a": 1}), 3);
        let mut bad = good.clone();
        bad[size + BINARY_SIZE] ^= 1; // the secondary's JSON, so its checksum fails
        let plan = plan_repair(&bad, None).unwrap();
        assert_eq!(
            (plan.from, plan.to, plan.offset),
            (Which::Primary, Which::Secondary, size as u64)
        );
        bad[size..].copy_from_slice(&plan.bytes);
        assert_eq!(bad, good);
        assert_eq!(plan_repair(&good, None).unwrap_err(), RepairError::Intact);
        let other = image(&serde_json::json!({"a": 2}), 9);
        let mut mixed = good[..size].to_vec();
        mixed.extend_from_slice(&other[size..]);
        assert!(matches!(
            plan_repair(&mixed, None),
            Err(RepairError::Choose(_))
        ));
        let plan = plan_repair(&mixed, Some(Which::Secondary)).unwrap();
        assert_eq!((plan.to, plan.offset), (Which::Primary, 0));
        let mut both = good.clone();
        both[100] ^= 1;
        both[size + 100] ^= 1;
        assert!(matches!(
            plan_repair(&both, None),
            Err(RepairError::BothDamaged { .. })
        ));
    }

    #[test]
    fn a_lost_primary_is_found_through_its_secondary() {
        let mut img = image(&serde_json::json!({"a": 1}), 3);
        img[..BINARY_SIZE].fill(0);
        let c = copies(&img).expect("secondary located");
        assert_eq!(c.hdr_size, 16 << 10);
        assert_eq!(c.primary.unwrap_err().reason, "header.magic");
        assert!(c.secondary.is_ok());
    }
}
