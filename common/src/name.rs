//! Names that cross the API. One rule (a DNS label), one message, one place: a
//! [`VolumeId`] is parsed once where a request comes in and carried typed after that.

use std::fmt;

/// A name that breaks the rule: which name, the value (quoted, cut short), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {given}: {why}")]
pub struct InvalidName {
    /// Which name (`volume id`, `node id`).
    pub what: &'static str,
    /// The value as given, quoted by [`quote`].
    pub given: String,
    /// What is wrong with it.
    pub why: String,
}

/// The DNS-label rule: 1–63 bytes of `[a-z0-9-]`, not starting or ending with `-`.
/// UUIDs (lowercase, hyphenated) qualify.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > 63 {
        return Err(format!("is {} bytes long; at most 63 are allowed", s.len()));
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok || s.starts_with('-') || s.ends_with('-') {
        return Err("use 1-63 characters a-z, 0-9 and '-', not starting or ending with '-'".into());
    }
    Ok(())
}

/// A bounded, printable quotation of untrusted input for error messages (which travel in
/// HTTP/2 headers and logs): at most 64 characters, control characters escaped.
pub fn quote(s: &str) -> String {
    let mut q: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        q.push_str(&format!("… ({} bytes)", s.len()));
    }
    format!("\"{q}\"")
}

/// Checks `s` as the name `what` under the DNS-label rule.
pub fn check(what: &'static str, s: &str) -> Result<(), InvalidName> {
    dns_label(s).map_err(|why| InvalidName {
        what,
        given: quote(s),
        why,
    })
}

/// A volume id, valid by construction: chosen by the caller (cluster manager or a
/// provisioning script), a DNS label or a UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct VolumeId(String);

impl VolumeId {
    /// Parses a volume id; the one place the rule is applied to one.
    pub fn parse(s: &str) -> Result<VolumeId, InvalidName> {
        check("volume id", s)?;
        Ok(VolumeId(s.to_string()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VolumeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for VolumeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VolumeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_and_its_one_message() {
        for ok in [
            "a",
            "vol-1",
            "0e4c7a3e-8d3f-4c1b-9a4e-0c1d2e3f4a5b",
            &"a".repeat(63),
        ] {
            assert_eq!(VolumeId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a b", "é", &"a".repeat(64)] {
            let e = VolumeId::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid volume id \""), "{e}");
        }
        let e = VolumeId::parse(&"x\n".repeat(100)).unwrap_err();
        assert!(e.given.contains("\\n") && e.given.contains("bytes)"), "{e}");
    }

    #[test]
    fn a_deserialized_id_is_a_valid_one() {
        let id: VolumeId = serde_json::from_str("\"vol-a\"").unwrap();
        assert_eq!(id.to_string(), "vol-a");
        assert!(serde_json::from_str::<VolumeId>("\"Vol_A\"").is_err());
    }
}
