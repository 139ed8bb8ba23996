//! The allowlist: a header is used only if it is exactly what nodecrypt writes. Pure code
//! over a [`Parsed`] header and the device size; every refusal carries a stable reason
//! code naming the field. Judged before any key is fetched and before libcryptsetup
//! loads the header.
//!
//! What nodecrypt writes (and so all that is accepted):
//! - one `crypt` segment `"0"`: `aes-xts-plain64`, sector 512 or 4096, `iv_tweak` `"0"`,
//!   no integrity, no flags, offset aligned to the sector and past the keyslot area, size
//!   `dynamic` or a whole number of sectors inside the device;
//! - one or two `luks2` keyslots (two only while a rotation is under way): 64-byte keys,
//!   `luks1` anti-forensic split with 4000 sha256 stripes, a `raw` area encrypted with
//!   `aes-xts-plain64` inside the keyslot area, and pbkdf2-sha256 with at most
//!   [`MAX_PBKDF2_ITERATIONS`] (nodecrypt writes 1000);
//! - one `pbkdf2` sha256 digest over every keyslot and segment 0, iterations capped alike;
//! - exactly one token, of type `nodecrypt`, with exactly its fields, well typed;
//! - no config flags and no requirements; label = the token's volume id, subsystem
//!   `nodecrypt`.
//!
//! The iteration cap bounds what a hostile keyslot can cost: libcryptsetup accepts up to
//! 2³²−1 pbkdf2 iterations (about 48 minutes per try on this project's machines), or
//! argon2 with a GiB of memory, and every libcryptsetup call of the agent waits on one
//! library lock meanwhile.

use serde_json::{Map, Value};

mod fields;
mod keyslot;

use fields::{
    id_list, ids, json_int, json_str, json_u64, object, only_fields, q, refuse, shown, Judged,
};
use keyslot::{digest, keyslots};

use super::header::{Parsed, Refusal};
use super::{Header, Token, CIPHER_SPEC, SUBSYSTEM, TOKEN_TYPE};

/// The most pbkdf2 iterations a keyslot or digest may ask for. nodecrypt writes 1000
/// (libcryptsetup's minimum): the keyslot key is 512 random bits, so stretching buys
/// nothing. 100,000 sha256 iterations cost a few tens of milliseconds.
pub const MAX_PBKDF2_ITERATIONS: u64 = 100_000;
/// The most keyslots a nodecrypt header holds (two while a rotation is under way).
pub const MAX_KEYSLOTS: usize = 2;
/// Anti-forensic stripes of every keyslot libcryptsetup writes.
pub(crate) const AF_STRIPES: u64 = 4000;
/// Volume and keyslot key size in bytes (AES-256-XTS).
pub(crate) const KEY_BYTES: u64 = 64;

/// Which stage of a volume's life the header is judged for: the stages differ only in
/// what a flow interrupted by a crash may have left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In use (open, status, rotate): exactly one token, one or two keyslots.
    Usable,
    /// Resuming a format that stopped before its token: no token, at most two keyslots
    /// (none if it stopped before the first; a keyslot is checked with the broker's key
    /// before it is trusted).
    Formatting,
    /// Resuming an erase that stopped after destroying the keyslots: the token, and no
    /// more than two keyslots.
    Erasing,
}

pub(crate) struct Geometry {
    pub(crate) hdr_size: u64,
    pub(crate) keyslots_end: u64,
}

/// Judges a parsed header against nodecrypt's allowlist for a device of `device_size`
/// bytes. Returns the header's facts on success.
pub fn judge(parsed: &Parsed, device_size: u64, rule: Stage) -> Judged<Header> {
    let bin = parsed.binary();
    let root = parsed
        .json()
        .as_object()
        .ok_or_else(|| Refusal::new("header.json", "the JSON metadata is not an object"))?;
    only_fields(
        root,
        &["keyslots", "tokens", "segments", "digests", "config"],
        "header.json",
        "the JSON metadata",
    )?;
    if bin.subsystem != SUBSYSTEM {
        return refuse(
            "header.subsystem",
            format!(
                "subsystem {:?} is not {SUBSYSTEM:?}: not a nodecrypt volume",
                bin.subsystem
            ),
        );
    }
    let geo = config(root, bin.hdr_size)?;
    let (offset, size, sector_size) = segment(root, &geo, device_size)?;
    // A format that stopped before its token may also have stopped before its keyslot.
    let min_keyslots = if rule == Stage::Usable { 1 } else { 0 };
    let keyslots = keyslots(root, &geo, min_keyslots)?;
    digest(root, &keyslots)?;
    let token = token(root, &keyslots, rule)?;
    if let Some((_, t)) = &token {
        if bin.label != t.volume_id {
            return refuse(
                "header.label",
                format!(
                    "label {:?} differs from the token's volume id {:?}",
                    bin.label, t.volume_id
                ),
            );
        }
    }
    Ok(Header {
        uuid: bin.uuid.clone(),
        label: bin.label.clone(),
        subsystem: bin.subsystem.clone(),
        cipher: CIPHER_SPEC.to_string(),
        key_bits: (KEY_BYTES * 8) as u32,
        sector_size,
        data_offset: offset,
        data_size: size,
        keyslots,
        token,
        hdr_size: bin.hdr_size,
        seqid: bin.seqid,
    })
}

fn config(root: &Map<String, Value>, hdr_size: u64) -> Judged<Geometry> {
    let c = object(root.get("config"), "config.field", "config")?;
    only_fields(
        c,
        &["json_size", "keyslots_size", "flags", "requirements"],
        "config.field",
        "config",
    )?;
    let json_size = json_u64(c.get("json_size"), "config.field", "config.json_size")?;
    if json_size != hdr_size - super::header::BINARY_SIZE as u64 {
        return refuse(
            "config.field",
            format!("config.json_size {json_size} does not match the header size {hdr_size}"),
        );
    }
    let keyslots_size = json_u64(
        c.get("keyslots_size"),
        "config.field",
        "config.keyslots_size",
    )?;
    if keyslots_size % 4096 != 0 || keyslots_size > (1 << 40) {
        return refuse(
            "config.field",
            format!("config.keyslots_size {keyslots_size} is not a sane keyslot area size"),
        );
    }
    match c.get("flags") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return refuse(
                "config.flags",
                format!("config.flags is {}; nodecrypt writes none", shown(Some(v))),
            )
        }
    }
    match c.get("requirements") {
        None => {}
        Some(Value::Object(o)) if o.values().all(|v| v.as_array().is_some_and(Vec::is_empty)) => {}
        Some(v) => {
            return refuse(
                "config.requirements",
                format!("config.requirements is {} (e.g. an unfinished re-encryption); nodecrypt declares none", shown(Some(v))),
            )
        }
    }
    Ok(Geometry {
        hdr_size,
        keyslots_end: 2 * hdr_size + keyslots_size,
    })
}

/// Returns (offset, data size, sector size) of segment 0.
fn segment(root: &Map<String, Value>, geo: &Geometry, device_size: u64) -> Judged<(u64, u64, u32)> {
    let segs = object(root.get("segments"), "segment.count", "segments")?;
    if segs.len() != 1 || !segs.contains_key("0") {
        return refuse(
            "segment.count",
            format!(
                "{} data segments; nodecrypt writes exactly one, segment 0",
                segs.len()
            ),
        );
    }
    let s = object(segs.get("0"), "segment.type", "segment 0")?;
    let kind = json_str(s.get("type"), "segment.type", "segment 0 type")?;
    if kind != "crypt" {
        return refuse(
            "segment.type",
            format!(
                "segment 0 is of type {}, not \"crypt\": its data would not be encrypted",
                q(kind)
            ),
        );
    }
    only_fields(
        s,
        &[
            "type",
            "offset",
            "size",
            "iv_tweak",
            "encryption",
            "sector_size",
            "integrity",
            "flags",
        ],
        "segment.field",
        "segment 0",
    )?;
    let enc = json_str(
        s.get("encryption"),
        "segment.encryption",
        "segment 0 encryption",
    )?;
    if enc != CIPHER_SPEC {
        return refuse(
            "segment.encryption",
            format!("segment 0 encryption {} is not {CIPHER_SPEC:?}", q(enc)),
        );
    }
    let sector = json_int(
        s.get("sector_size"),
        "segment.sector_size",
        "segment 0 sector_size",
    )?;
    if sector != 512 && sector != 4096 {
        return refuse(
            "segment.sector_size",
            format!("segment 0 sector_size {sector} is not 512 or 4096"),
        );
    }
    match s.get("iv_tweak") {
        Some(Value::String(t)) if t == "0" => {}
        v => return refuse("segment.iv_tweak", format!("segment 0 iv_tweak is {}; nodecrypt writes \"0\" (dm-crypt would honour it, the userspace engine would not)", shown(v))),
    }
    if let Some(v) = s.get("integrity") {
        return refuse(
            "segment.integrity",
            format!(
                "segment 0 has integrity {}; nodecrypt volumes have none",
                shown(Some(v))
            ),
        );
    }
    match s.get("flags") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return refuse(
                "segment.flags",
                format!(
                    "segment 0 has flags {} (e.g. in re-encryption); nodecrypt writes none",
                    shown(Some(v))
                ),
            )
        }
    }
    let offset = json_u64(s.get("offset"), "segment.offset", "segment 0 offset")?;
    if offset < geo.keyslots_end {
        return refuse(
            "segment.offset",
            format!("segment 0 starts at {offset}, inside the header and keyslot area (which ends at {}): it would map the headers as data", geo.keyslots_end),
        );
    }
    if offset % sector != 0 {
        return refuse(
            "segment.alignment",
            format!("segment 0 offset {offset} is not a multiple of its sector size {sector}"),
        );
    }
    if offset >= device_size {
        return refuse(
            "segment.size",
            format!(
                "segment 0 starts at {offset}, at or past the end of the {device_size}-byte device"
            ),
        );
    }
    let size = match s.get("size") {
        Some(Value::String(d)) if d == "dynamic" => {
            let left = device_size - offset;
            if !left.is_multiple_of(sector) {
                return refuse(
                    "geometry.device_size",
                    format!("the device's data area ({left} bytes after offset {offset}) is not a whole number of {sector}-byte sectors"),
                );
            }
            left
        }
        v => {
            let size = json_u64(v, "segment.size", "segment 0 size")?;
            if size < sector || size % sector != 0 {
                return refuse("segment.size", format!("segment 0 size {size} is not a whole, non-zero number of {sector}-byte sectors"));
            }
            if offset.checked_add(size).is_none_or(|end| end > device_size) {
                return refuse("segment.size", format!("segment 0 ({size} bytes at {offset}) reaches past the end of the {device_size}-byte device"));
            }
            size
        }
    };
    if size < sector {
        return refuse(
            "segment.size",
            format!("segment 0 holds {size} bytes, less than one {sector}-byte sector"),
        );
    }
    Ok((offset, size, sector as u32))
}

fn token(root: &Map<String, Value>, keyslots: &[u32], rule: Stage) -> Judged<Option<(u32, Token)>> {
    let tokens = object(root.get("tokens"), "token.count", "tokens")?;
    let ids = ids(tokens, "token.count", "token")?;
    match (rule, ids.len()) {
        (Stage::Formatting, 0) => return Ok(None),
        (Stage::Formatting, n) => {
            return refuse("token.count", format!("{n} tokens where none was expected"))
        }
        (_, 0) => {
            return refuse(
                "token.missing",
                "no nodecrypt token: not a nodecrypt volume, or a format that did not finish",
            )
        }
        (_, 1) => {}
        (_, n) => {
            return refuse(
                "token.count",
                format!("{n} tokens; nodecrypt writes exactly one"),
            )
        }
    }
    let id = ids[0];
    let what = format!("token {id}");
    let t = object(tokens.get(&id.to_string()), "token.type", &what)?;
    let kind = json_str(t.get("type"), "token.type", &format!("{what} type"))?;
    if kind != TOKEN_TYPE {
        return refuse(
            "token.type",
            format!("{what} is of type {}, not {TOKEN_TYPE:?}", q(kind)),
        );
    }
    only_fields(
        t,
        &["type", "keyslots", "volume_id", "key_version", "broker"],
        "token.field",
        &what,
    )?;
    let slots = id_list(
        t.get("keyslots"),
        "token.keyslot",
        &format!("{what} keyslots"),
    )?;
    // libcryptsetup drops a destroyed keyslot from the token too.
    let erased = rule == Stage::Erasing && keyslots.is_empty() && slots.is_empty();
    let slot = match slots[..] {
        [slot] => slot,
        _ if erased => 0,
        _ => {
            return refuse(
                "token.keyslot",
                format!(
                    "{what} names {} keyslots; nodecrypt's names one",
                    slots.len()
                ),
            )
        }
    };
    if !(keyslots.contains(&slot) || erased) {
        return refuse(
            "token.keyslot",
            format!("{what} names keyslot {slot}, which is not in the header"),
        );
    }
    let volume_id = json_str(
        t.get("volume_id"),
        "token.volume_id",
        &format!("{what} volume_id"),
    )?;
    if let Err(e) = crate::volume::validate_volume_id(volume_id) {
        return refuse("token.volume_id", format!("{what}: {e}"));
    }
    let key_version = match t.get("key_version").and_then(Value::as_u64) {
        Some(v) if v >= 1 => v,
        _ => {
            return refuse(
                "token.key_version",
                format!(
                    "{what} key_version is {}, not a version ≥ 1",
                    shown(t.get("key_version"))
                ),
            )
        }
    };
    let broker = match t.get("broker") {
        None => String::new(),
        Some(Value::String(b)) if b.len() <= 256 => b.clone(),
        Some(v) => {
            return refuse(
                "token.field",
                format!("{what} broker is {}, not a short string", shown(Some(v))),
            )
        }
    };
    Ok(Some((
        id,
        Token {
            keyslot: slot,
            volume_id: volume_id.to_string(),
            key_version,
            broker,
        },
    )))
}

#[cfg(test)]
mod tests;
