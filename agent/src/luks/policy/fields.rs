//! Reading LUKS2 JSON fields strictly: each helper refuses with the reason code it is
//! given and a message naming the field and (cut short) its value.

use serde_json::{Map, Value};

use super::Refusal;

pub(super) type Judged<T> = Result<T, Refusal>;

pub(super) fn refuse<T>(reason: &'static str, message: impl Into<String>) -> Judged<T> {
    Err(Refusal::new(reason, message))
}

/// A JSON object's fields must be exactly among `allowed`.
pub(super) fn only_fields(
    obj: &Map<String, Value>,
    allowed: &[&str],
    reason: &'static str,
    what: &str,
) -> Judged<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => refuse(
            reason,
            format!("{what} has a field {} nodecrypt does not write", q(k)),
        ),
        None => Ok(()),
    }
}

pub(super) fn object<'a>(
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
pub(super) fn json_u64(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<u64> {
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
pub(super) fn json_int(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<u64> {
    match v.and_then(Value::as_u64) {
        Some(n) => Ok(n),
        None => refuse(reason, format!("{what} is {}, not an integer", shown(v))),
    }
}

pub(super) fn json_str<'a>(
    v: Option<&'a Value>,
    reason: &'static str,
    what: &str,
) -> Judged<&'a str> {
    match v.and_then(Value::as_str) {
        Some(s) => Ok(s),
        None => refuse(reason, format!("{what} is {}, not a string", shown(v))),
    }
}

/// A value for a message, cut short (hostile headers may hold megabytes).
pub(super) fn shown(v: Option<&Value>) -> String {
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
pub(super) fn ids(obj: &Map<String, Value>, reason: &'static str, what: &str) -> Judged<Vec<u32>> {
    obj.keys()
        .map(|k| {
            k.parse::<u32>()
                .ok()
                .filter(|n| n.to_string() == *k && *n < 32)
                .ok_or_else(|| {
                    Refusal::new(reason, format!("{what} id {} is not a number 0-31", q(k)))
                })
        })
        .collect()
}

/// A list of id strings (`"keyslots": ["0"]`).
pub(super) fn id_list(v: Option<&Value>, reason: &'static str, what: &str) -> Judged<Vec<u32>> {
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

/// A string from the header for a message: quoted, control characters escaped, cut at 64
/// characters (a hostile header's strings can be megabytes; messages travel in HTTP/2
/// headers and logs).
pub(super) fn q(s: &str) -> String {
    nodecrypt_common::name::quote(s)
}
