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

use super::header::{Parsed, Refusal};
use super::{Header, Token, CIPHER_SPEC, SUBSYSTEM, TOKEN_TYPE};

/// The most pbkdf2 iterations a keyslot or digest may ask for. nodecrypt writes 1000
/// (libcryptsetup's minimum): the keyslot key is 512 random bits, so stretching buys
/// nothing. 100,000 sha256 iterations cost a few tens of milliseconds.
pub const MAX_PBKDF2_ITERATIONS: u64 = 100_000;
/// The most keyslots a nodecrypt header holds (two while a rotation is under way).
pub const MAX_KEYSLOTS: usize = 2;
/// Anti-forensic stripes of every keyslot libcryptsetup writes.
const AF_STRIPES: u64 = 4000;
/// Volume and keyslot key size in bytes (AES-256-XTS).
const KEY_BYTES: u64 = 64;

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

type Judged<T> = Result<T, Refusal>;

fn refuse<T>(reason: &'static str, message: impl Into<String>) -> Judged<T> {
    Err(Refusal::new(reason, message))
}

/// A JSON object's fields must be exactly among `allowed`.
fn only_fields(
    obj: &Map<String, Value>,
    allowed: &[&str],
    reason: &'static str,
    what: &str,
) -> Judged<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => refuse(
            reason,
            format!("{what} has a field {k:?} nodecrypt does not write"),
        ),
        None => Ok(()),
    }
}

fn object<'a>(
    v: Option<&'a Value>,
    reason: &'static str,
    what: &str,
) -> Judged<&'a Map<String, Value>> {
    match v.and_then(Value::as_object) {
        Some(o) => Ok(o),
        None => refuse(reason, format!("{what} is missing or not an object")),
    }
}

/// LUKS2 writes 64-bit numbers as decimal strings.
fn json_u64(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<u64> {
    match v {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse()
                .or_else(|_| refuse(reason, format!("{what} {s:?} is out of range")))
        }
        other => refuse(
            reason,
            format!("{what} is {}, not a decimal string", shown(other)),
        ),
    }
}

/// Small numbers are JSON integers.
fn json_int(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<u64> {
    match v.and_then(Value::as_u64) {
        Some(n) => Ok(n),
        None => refuse(reason, format!("{what} is {}, not an integer", shown(v))),
    }
}

fn json_str<'a>(v: Option<&'a Value>, reason: &'static str, what: &str) -> Judged<&'a str> {
    match v.and_then(Value::as_str) {
        Some(s) => Ok(s),
        None => refuse(reason, format!("{what} is {}, not a string", shown(v))),
    }
}

/// A value for a message, cut short (hostile headers may hold megabytes).
fn shown(v: Option<&Value>) -> String {
    match v {
        None => "missing".into(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 60 {
                format!("{}…", s.chars().take(60).collect::<String>())
            } else {
                s
            }
        }
    }
}

/// The single key of an object whose keys are decimal ids.
fn ids(obj: &Map<String, Value>, reason: &'static str, what: &str) -> Judged<Vec<u32>> {
    obj.keys()
        .map(|k| {
            k.parse::<u32>()
                .ok()
                .filter(|n| n.to_string() == *k && *n < 32)
                .ok_or_else(|| {
                    Refusal::new(reason, format!("{what} id {k:?} is not a number 0-31"))
                })
        })
        .collect()
}

/// A list of id strings (`"keyslots": ["0"]`).
fn id_list(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<Vec<u32>> {
    let Some(arr) = v.and_then(Value::as_array) else {
        return refuse(reason, format!("{what} is {}, not a list", shown(v)));
    };
    arr.iter()
        .map(|x| {
            x.as_str()
                .and_then(|s| s.parse::<u32>().ok().filter(|n| n.to_string() == s))
                .ok_or_else(|| Refusal::new(reason, format!("{what} holds {x}, not an id string")))
        })
        .collect()
}

struct Geometry {
    hdr_size: u64,
    keyslots_end: u64,
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
                "segment 0 is of type {kind:?}, not \"crypt\": its data would not be encrypted"
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
            format!("segment 0 encryption {enc:?} is not {CIPHER_SPEC:?}"),
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

fn pbkdf2(
    kdf: &Map<String, Value>,
    reason_kdf: &'static str,
    reason_iter: &'static str,
    what: &str,
) -> Judged<()> {
    let kind = json_str(kdf.get("type"), reason_kdf, &format!("{what} kdf type"))?;
    if kind != "pbkdf2" {
        return refuse(reason_kdf, format!("{what} uses {kind:?}; nodecrypt writes pbkdf2 (a memory-hard kdf on a 512-bit random key only stalls the agent)"));
    }
    let hash = json_str(kdf.get("hash"), reason_kdf, &format!("{what} hash"))?;
    if hash != "sha256" {
        return refuse(reason_kdf, format!("{what} hash {hash:?} is not sha256"));
    }
    let iterations = json_int(
        kdf.get("iterations"),
        reason_iter,
        &format!("{what} iterations"),
    )?;
    if !(1000..=MAX_PBKDF2_ITERATIONS).contains(&iterations) {
        return refuse(reason_iter, format!("{what} asks for {iterations} pbkdf2 iterations; nodecrypt accepts 1000 to {MAX_PBKDF2_ITERATIONS}"));
    }
    json_str(kdf.get("salt"), reason_kdf, &format!("{what} salt"))?;
    Ok(())
}

fn keyslots(root: &Map<String, Value>, geo: &Geometry, min: usize) -> Judged<Vec<u32>> {
    let slots = object(root.get("keyslots"), "keyslot.count", "keyslots")?;
    let mut ids = ids(slots, "keyslot.count", "keyslot")?;
    if ids.len() < min || ids.len() > MAX_KEYSLOTS {
        return refuse(
            "keyslot.count",
            format!(
                "{} keyslots; nodecrypt writes one (two during a rotation)",
                ids.len()
            ),
        );
    }
    ids.sort_unstable();
    let mut areas: Vec<(u64, u64)> = Vec::new();
    for id in &ids {
        let what = format!("keyslot {id}");
        let k = object(slots.get(&id.to_string()), "keyslot.type", &what)?;
        let kind = json_str(k.get("type"), "keyslot.type", &format!("{what} type"))?;
        if kind != "luks2" {
            return refuse(
                "keyslot.type",
                format!("{what} is of type {kind:?}, not \"luks2\""),
            );
        }
        only_fields(
            k,
            &["type", "key_size", "af", "area", "kdf", "priority"],
            "keyslot.field",
            &what,
        )?;
        let key_size = json_int(
            k.get("key_size"),
            "keyslot.key_size",
            &format!("{what} key_size"),
        )?;
        if key_size != KEY_BYTES {
            return refuse(
                "keyslot.key_size",
                format!("{what} key_size {key_size}; nodecrypt volume keys are {KEY_BYTES} bytes"),
            );
        }
        if let Some(p) = k.get("priority") {
            if !matches!(p.as_u64(), Some(0..=2)) {
                return refuse(
                    "keyslot.field",
                    format!("{what} priority {} is not 0, 1 or 2", shown(Some(p))),
                );
            }
        }
        let af = object(k.get("af"), "keyslot.af", &format!("{what} af"))?;
        only_fields(
            af,
            &["type", "stripes", "hash"],
            "keyslot.af",
            &format!("{what} af"),
        )?;
        let af_ok = af.get("type").and_then(Value::as_str) == Some("luks1")
            && af.get("stripes").and_then(Value::as_u64) == Some(AF_STRIPES)
            && af.get("hash").and_then(Value::as_str) == Some("sha256");
        if !af_ok {
            return refuse(
                "keyslot.af",
                format!(
                    "{what} af {}; nodecrypt writes luks1, {AF_STRIPES} stripes, sha256",
                    shown(k.get("af"))
                ),
            );
        }
        let area = object(k.get("area"), "keyslot.area", &format!("{what} area"))?;
        only_fields(
            area,
            &["type", "offset", "size", "encryption", "key_size"],
            "keyslot.area",
            &format!("{what} area"),
        )?;
        let area_ok = area.get("type").and_then(Value::as_str) == Some("raw")
            && area.get("encryption").and_then(Value::as_str) == Some(CIPHER_SPEC)
            && area.get("key_size").and_then(Value::as_u64) == Some(KEY_BYTES);
        if !area_ok {
            return refuse(
                "keyslot.area",
                format!("{what} area is not a raw {CIPHER_SPEC} area with a {KEY_BYTES}-byte key"),
            );
        }
        let a_off = json_u64(
            area.get("offset"),
            "keyslot.area",
            &format!("{what} area offset"),
        )?;
        let a_size = json_u64(
            area.get("size"),
            "keyslot.area",
            &format!("{what} area size"),
        )?;
        let need = (KEY_BYTES * AF_STRIPES).div_ceil(4096) * 4096;
        let inside = a_off >= 2 * geo.hdr_size
            && a_off
                .checked_add(a_size)
                .is_some_and(|e| e <= geo.keyslots_end);
        if !inside || a_off % 4096 != 0 || a_size < need || a_size % 4096 != 0 {
            return refuse(
                "keyslot.area",
                format!("{what} area ({a_size} bytes at {a_off}) is not a 4096-aligned area of at least {need} bytes inside the keyslot area [{}, {})", 2 * geo.hdr_size, geo.keyslots_end),
            );
        }
        if areas
            .iter()
            .any(|&(o, s)| a_off < o + s && o < a_off + a_size)
        {
            return refuse(
                "keyslot.area",
                format!("{what} area overlaps another keyslot's"),
            );
        }
        areas.push((a_off, a_size));
        let kdf = object(k.get("kdf"), "keyslot.kdf", &format!("{what} kdf"))?;
        only_fields(
            kdf,
            &["type", "hash", "iterations", "salt"],
            "keyslot.kdf",
            &format!("{what} kdf"),
        )?;
        pbkdf2(kdf, "keyslot.kdf", "keyslot.iterations", &what)?;
    }
    Ok(ids)
}

fn digest(root: &Map<String, Value>, keyslots: &[u32]) -> Judged<()> {
    let digests = object(root.get("digests"), "digest.count", "digests")?;
    if digests.len() != 1 {
        return refuse(
            "digest.count",
            format!("{} digests; nodecrypt writes one", digests.len()),
        );
    }
    ids(digests, "digest.count", "digest")?;
    let (id, d) = digests.iter().next().expect("one digest");
    let what = format!("digest {id}");
    let d = object(Some(d), "digest.type", &what)?;
    only_fields(
        d,
        &[
            "type",
            "keyslots",
            "segments",
            "hash",
            "iterations",
            "salt",
            "digest",
        ],
        "digest.field",
        &what,
    )?;
    pbkdf2(d, "digest.type", "digest.iterations", &what)?;
    json_str(d.get("digest"), "digest.field", &format!("{what} digest"))?;
    let mut slots = id_list(
        d.get("keyslots"),
        "digest.field",
        &format!("{what} keyslots"),
    )?;
    slots.sort_unstable();
    if slots != keyslots {
        return refuse(
            "digest.field",
            format!("{what} covers keyslots {slots:?}, not the header's {keyslots:?}"),
        );
    }
    if id_list(
        d.get("segments"),
        "digest.field",
        &format!("{what} segments"),
    )? != [0]
    {
        return refuse(
            "digest.field",
            format!("{what} does not cover exactly segment 0"),
        );
    }
    Ok(())
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
            format!("{what} is of type {kind:?}, not {TOKEN_TYPE:?}"),
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
