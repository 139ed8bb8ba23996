//! Keyslots and the digest: luks2 keyslots with pbkdf2-sha256 under the iteration cap,
//! areas inside the keyslot area, one digest over every keyslot and segment 0.

use serde_json::{Map, Value};

use super::fields::{
    id_list, ids, json_int, json_str, json_u64, object, only_fields, q, refuse, shown, Judged,
};
use super::{Geometry, AF_STRIPES, KEY_BYTES, MAX_KEYSLOTS, MAX_PBKDF2_ITERATIONS};
use crate::luks::CIPHER_SPEC;

fn pbkdf2(
    kdf: &Map<String, Value>,
    reason_kdf: &'static str,
    reason_iter: &'static str,
    what: &str,
) -> Judged<()> {
    let kind = json_str(kdf.get("type"), reason_kdf, &format!("{what} kdf type"))?;
    if kind != "pbkdf2" {
        return refuse(reason_kdf, format!("{what} uses {}; nodecrypt writes pbkdf2 (a memory-hard kdf on a 512-bit random key only stalls the agent)", q(kind)));
    }
    let hash = json_str(kdf.get("hash"), reason_kdf, &format!("{what} hash"))?;
    if hash != "sha256" {
        return refuse(reason_kdf, format!("{what} hash {} is not sha256", q(hash)));
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

pub(super) fn keyslots(root: &Map<String, Value>, geo: &Geometry, min: usize) -> Judged<Vec<u32>> {
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
                format!("{what} is of type {}, not \"luks2\"", q(kind)),
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

pub(super) fn digest(root: &Map<String, Value>, keyslots: &[u32]) -> Judged<()> {
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
            format!(
                "{what} covers keyslots {}, not the header's {keyslots:?}",
                shown(d.get("keyslots"))
            ),
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
