//! The allowlist's table tests, and a bounded fuzz over mutated headers: no panic, every
//! byte-level change refused, and no structural mutation accepted that breaks a rule.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;
use crate::luks::header::{self, tests::image};

const DEVICE: u64 = 64 << 20;

/// The JSON metadata nodecrypt writes (16 KiB header copies, as libcryptsetup lays out).
fn good() -> Value {
    json!({
        "keyslots": {"0": {
            "type": "luks2", "key_size": 64,
            "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
            "area": {"type": "raw", "offset": "32768", "size": "258048",
                     "encryption": "aes-xts-plain64", "key_size": 64},
            "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "c2FsdA=="}
        }},
        "tokens": {"0": {"type": "nodecrypt", "keyslots": ["0"], "volume_id": "vol1",
                         "key_version": 1, "broker": "127.0.0.1:7443"}},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64", "sector_size": 4096}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
                          "iterations": 1000, "salt": "c2FsdA==", "digest": "ZGlnZXN0"}},
        "config": {"json_size": "12288", "keyslots_size": "16744448"}
    })
}

fn verdict(json: &Value, device: u64) -> Result<Header, Refusal> {
    judge(
        &header::parse(&image(json, 1)).unwrap(),
        device,
        Stage::Usable,
    )
}

#[test]
fn what_nodecrypt_writes_is_accepted() {
    let h = verdict(&good(), DEVICE).unwrap();
    assert_eq!((h.sector_size, h.data_offset), (4096, 16 << 20));
    assert_eq!(h.data_size, DEVICE - (16 << 20));
    assert_eq!(h.token().unwrap().key_version, 1);
    // A rotation under way: two keyslots, the digest over both.
    let mut two = good();
    two["keyslots"]["1"] = two["keyslots"]["0"].clone();
    two["keyslots"]["1"]["area"]["offset"] = json!("290816");
    two["digests"]["0"]["keyslots"] = json!(["0", "1"]);
    assert_eq!(verdict(&two, DEVICE).unwrap().keyslots, [0, 1]);
}

type Mutation = (&'static str, fn(&mut Value), &'static str);

/// Each hostile variant the review found, and the reason it must be refused with.
const TABLE: &[Mutation] = &[
    (
        "segment at 0",
        |j| j["segments"]["0"]["offset"] = json!("0"),
        "segment.offset",
    ),
    (
        "segment in keyslots",
        |j| j["segments"]["0"]["offset"] = json!("65536"),
        "segment.offset",
    ),
    (
        "unaligned segment",
        |j| j["segments"]["0"]["offset"] = json!("16777728"),
        "segment.alignment",
    ),
    (
        "iv_tweak",
        |j| j["segments"]["0"]["iv_tweak"] = json!("1"),
        "segment.iv_tweak",
    ),
    (
        "integrity",
        |j| j["segments"]["0"]["integrity"] = json!({"type": "hmac(sha256)"}),
        "segment.integrity",
    ),
    (
        "reencrypt flag",
        |j| j["segments"]["0"]["flags"] = json!(["in-reencryption"]),
        "segment.flags",
    ),
    (
        "linear",
        |j| j["segments"]["0"]["type"] = json!("linear"),
        "segment.type",
    ),
    (
        "cbc",
        |j| j["segments"]["0"]["encryption"] = json!("aes-cbc-essiv:sha256"),
        "segment.encryption",
    ),
    (
        "sector 1024",
        |j| j["segments"]["0"]["sector_size"] = json!(1024),
        "segment.sector_size",
    ),
    (
        "two segments",
        |j| j["segments"]["1"] = j["segments"]["0"].clone(),
        "segment.count",
    ),
    (
        "tiny segment",
        |j| j["segments"]["0"]["size"] = json!("512"),
        "segment.size",
    ),
    (
        "segment past end",
        |j| j["segments"]["0"]["size"] = json!("68719476736"),
        "segment.size",
    ),
    (
        "requirements",
        |j| j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}),
        "config.requirements",
    ),
    (
        "config flags",
        |j| j["config"]["flags"] = json!(["allow-discards"]),
        "config.flags",
    ),
    (
        "slow keyslot",
        |j| j["keyslots"]["0"]["kdf"]["iterations"] = json!(10_000_000),
        "keyslot.iterations",
    ),
    (
        "max keyslot",
        |j| j["keyslots"]["0"]["kdf"]["iterations"] = json!(4_294_967_295u64),
        "keyslot.iterations",
    ),
    (
        "argon2id",
        |j| j["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 4, "memory": 1048576, "cpus": 4, "salt": "c2FsdA=="}),
        "keyslot.kdf",
    ),
    (
        "sha1 keyslot",
        |j| j["keyslots"]["0"]["kdf"]["hash"] = json!("sha1"),
        "keyslot.kdf",
    ),
    (
        "32-byte key",
        |j| j["keyslots"]["0"]["key_size"] = json!(32),
        "keyslot.key_size",
    ),
    (
        "area outside",
        |j| j["keyslots"]["0"]["area"]["offset"] = json!("16777216"),
        "keyslot.area",
    ),
    (
        "area in header",
        |j| j["keyslots"]["0"]["area"]["offset"] = json!("4096"),
        "keyslot.area",
    ),
    (
        "slow digest",
        |j| j["digests"]["0"]["iterations"] = json!(10_000_000),
        "digest.iterations",
    ),
    (
        "two tokens",
        |j| j["tokens"]["1"] = j["tokens"]["0"].clone(),
        "token.count",
    ),
    ("no token", |j| j["tokens"] = json!({}), "token.missing"),
    (
        "foreign token",
        |j| j["tokens"]["0"]["type"] = json!("systemd-tpm2"),
        "token.type",
    ),
    (
        "version 0",
        |j| j["tokens"]["0"]["key_version"] = json!(0),
        "token.key_version",
    ),
    (
        "version string",
        |j| j["tokens"]["0"]["key_version"] = json!("1"),
        "token.key_version",
    ),
    (
        "bad id",
        |j| j["tokens"]["0"]["volume_id"] = json!("BAD_ID!"),
        "token.volume_id",
    ),
    (
        "missing slot",
        |j| j["tokens"]["0"]["keyslots"] = json!(["7"]),
        "token.keyslot",
    ),
    (
        "extra field",
        |j| j["tokens"]["0"]["exec"] = json!("/bin/sh"),
        "token.field",
    ),
    (
        "label mismatch",
        |j| j["tokens"]["0"]["volume_id"] = json!("other"),
        "header.label",
    ),
];

#[test]
fn every_hostile_variant_is_refused_with_its_reason() {
    for (name, mutate, want) in TABLE {
        let mut j = good();
        mutate(&mut j);
        let got = verdict(&j, DEVICE).map(|_| ()).unwrap_err();
        assert_eq!(got.reason, *want, "{name}: {got}");
        assert!(!got.message.is_empty());
    }
}

#[test]
fn geometry_is_judged_against_the_device() {
    // A data area that is not a whole number of 4096-byte sectors.
    let e = verdict(&good(), DEVICE - 512).unwrap_err();
    assert_eq!(e.reason, "geometry.device_size", "{e}");
    // A device that ends at the data offset.
    assert_eq!(
        verdict(&good(), 16 << 20).unwrap_err().reason,
        "segment.size"
    );
    let mut j = good();
    j["segments"]["0"]["sector_size"] = json!(512);
    assert!(verdict(&j, DEVICE - 512).is_ok(), "512-byte sectors fit");
}

#[test]
fn a_format_that_stopped_before_its_token_is_judged_without_one() {
    let mut j = good();
    j["tokens"] = json!({});
    let p = header::parse(&image(&j, 1)).unwrap();
    assert!(judge(&p, DEVICE, Stage::Formatting)
        .unwrap()
        .token
        .is_none());
    let p = header::parse(&image(&good(), 1)).unwrap();
    assert_eq!(
        judge(&p, DEVICE, Stage::Formatting).unwrap_err().reason,
        "token.count"
    );
}

/// Independent of the policy's code: the rules an accepted header must satisfy.
fn oracle(j: &Value) -> Result<(), String> {
    let seg = &j["segments"];
    let ok = seg.as_object().is_some_and(|s| s.len() == 1)
        && seg["0"]["type"] == "crypt"
        && seg["0"]["encryption"] == CIPHER_SPEC
        && seg["0"]["iv_tweak"] == "0"
        && seg["0"].get("integrity").is_none()
        && seg["0"]
            .get("flags")
            .is_none_or(|f| f.as_array().is_some_and(Vec::is_empty));
    if !ok {
        return Err("segment rules".into());
    }
    let sector = seg["0"]["sector_size"].as_u64().ok_or("sector")?;
    let offset: u64 = seg["0"]["offset"]
        .as_str()
        .ok_or("offset")?
        .parse()
        .map_err(|_| "offset")?;
    if offset < 16 << 20 || !offset.is_multiple_of(sector) {
        return Err(format!("offset {offset}"));
    }
    for k in j["keyslots"].as_object().ok_or("keyslots")?.values() {
        if k["kdf"]["type"] != "pbkdf2"
            || k["kdf"]["iterations"]
                .as_u64()
                .is_none_or(|i| i > MAX_PBKDF2_ITERATIONS)
        {
            return Err("keyslot kdf".into());
        }
    }
    let digests = j["digests"].as_object().ok_or("digests")?;
    if digests.len() != 1
        || digests.values().any(|d| {
            d["iterations"]
                .as_u64()
                .is_none_or(|i| i > MAX_PBKDF2_ITERATIONS)
        })
    {
        return Err("digest".into());
    }
    let tokens = j["tokens"].as_object().ok_or("tokens")?;
    if tokens.len() != 1
        || tokens
            .values()
            .any(|t| t["type"] != TOKEN_TYPE || t["key_version"].as_u64().is_none_or(|v| v < 1))
    {
        return Err("token".into());
    }
    if j["config"].get("requirements").is_some_and(|r| {
        r.as_object().is_none_or(|o| {
            o.values()
                .any(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        })
    }) {
        return Err("requirements".into());
    }
    Ok(())
}

/// Every place in the tree, as a JSON pointer.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = format!("{at}/{k}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn hostile_value(rng: &mut StdRng) -> Value {
    let pool = [
        json!(null),
        json!(0),
        json!(1),
        json!(-1),
        json!(1.5),
        json!(4096),
        json!(512),
        json!(u64::MAX),
        json!(10_000_000),
        json!("0"),
        json!("1"),
        json!("dynamic"),
        json!("18446744073709551615"),
        json!("99999999999999999999"),
        json!(""),
        json!("-1"),
        json!("linear"),
        json!("crypt"),
        json!("pbkdf2"),
        json!("argon2id"),
        json!("sha1"),
        json!("nodecrypt"),
        json!([]),
        json!(["0"]),
        json!(["0", "1"]),
        json!(["9"]),
        json!({}),
        json!({"type": "x"}),
        json!(true),
        json!("16777216"),
        json!("aes-xts-plain64"),
        json!("a".repeat(300)),
    ];
    pool[rng.random_range(0..pool.len())].clone()
}

#[test]
fn fuzz_mutated_headers_never_panic_and_never_pass_a_broken_rule() {
    let mut rng = StdRng::seed_from_u64(0x6e6f_6465_6372_7970);
    let base = good();
    let mut places = Vec::new();
    pointers(&base, String::new(), &mut places);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..4000 {
        let mut j = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let p = &places[rng.random_range(0..places.len())];
            let (parent, key) = p.rsplit_once('/').expect("a pointer");
            let Some(parent) = j.pointer_mut(parent) else {
                continue;
            };
            match (rng.random_range(0..4), parent) {
                (0, Value::Object(o)) => {
                    o.remove(key);
                }
                (1, Value::Object(o)) => {
                    o.insert(format!("{key}x"), hostile_value(&mut rng));
                }
                (_, Value::Object(o)) => {
                    o.insert(key.to_string(), hostile_value(&mut rng));
                }
                (_, Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if i < a.len() {
                            a[i] = hostile_value(&mut rng);
                        }
                    }
                }
                _ => {}
            }
        }
        let device = [DEVICE, DEVICE - 512, 16 << 20, 1 << 40][rng.random_range(0..4)];
        match verdict(&j, device) {
            Ok(_) => {
                accepted += 1;
                if let Err(rule) = oracle(&j) {
                    panic!("accepted a header that breaks {rule}: {j}");
                }
            }
            Err(r) => {
                refused += 1;
                assert!(r.reason.contains('.') && !r.message.is_empty(), "{r:?}");
            }
        }
    }
    assert!(
        refused > 3000 && accepted > 0,
        "a fuzz that explores: {accepted} accepted, {refused} refused"
    );
}

#[test]
fn fuzz_any_changed_byte_of_the_header_is_refused() {
    let img = image(&good(), 1);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..4000 {
        let mut bad = img.clone();
        let at = rng.random_range(0..bad.len());
        bad[at] ^= rng.random_range(1..=255u8);
        let r = header::parse(&bad).and_then(|p| judge(&p, DEVICE, Stage::Usable));
        assert!(r.is_err(), "a changed byte at {at} was accepted");
        // A truncated header never panics either.
        let cut = rng.random_range(0..img.len());
        assert!(header::parse(&img[..cut]).is_err());
    }
}

#[test]
fn an_erase_that_stopped_after_the_keyslots_is_judged_for_that_stage() {
    let mut j = good();
    j["keyslots"] = json!({});
    j["digests"]["0"]["keyslots"] = json!([]);
    j["tokens"]["0"]["keyslots"] = json!([]);
    assert_eq!(verdict(&j, DEVICE).unwrap_err().reason, "keyslot.count");
    let p = header::parse(&image(&j, 1)).unwrap();
    let h = judge(&p, DEVICE, Stage::Erasing).unwrap();
    assert!(h.keyslots.is_empty() && h.token.is_some());
}

#[test]
fn a_refusal_quotes_the_headers_strings_cut_short() {
    let long = "x\n".repeat(3_000); // as much as a 16 KiB header holds
    let cases: [fn(&mut Value, &str); 3] = [
        |j, s| j["segments"]["0"]["type"] = json!(s),
        |j, s| j["keyslots"]["0"]["kdf"]["type"] = json!(s),
        |j, s| {
            j["tokens"]["0"][s] = json!(1);
        },
    ];
    for set in cases {
        let mut j = good();
        set(&mut j, &long);
        let e = verdict(&j, DEVICE).unwrap_err();
        assert!(
            e.message.len() < 400,
            "{} bytes: {}…",
            e.message.len(),
            &e.message[..80]
        );
        assert!(!e.message.contains('\n'), "control characters are escaped");
    }
}
