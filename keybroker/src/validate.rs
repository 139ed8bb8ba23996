//! Validation of the names that cross the API: volume ids, node ids, versions, labels.

/// Largest key version accepted on the wire (versions start at 1 and grow by rotation).
pub const MAX_VERSION: u64 = u32::MAX as u64;
/// Most labels on one volume.
pub const MAX_LABELS: usize = 16;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// A name that is not acceptable, with the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A DNS-label-like name: 1–63 bytes of `[a-z0-9-]`, not starting or ending with `-`
/// (the one rule, [`nodecrypt_common::name::dns_label`]).
pub fn name(s: &str) -> Result<(), Invalid> {
    nodecrypt_common::name::dns_label(s).map_err(Invalid)
}

pub use nodecrypt_common::name::quote;

/// A volume id: a DNS-label-like name, or a UUID (lowercase, hyphenated), which is one
/// too; the message is [`nodecrypt_common::VolumeId`]'s, the same as the agent's.
pub fn volume_id(s: &str) -> Result<(), Invalid> {
    nodecrypt_common::VolumeId::parse(s)
        .map(|_| ())
        .map_err(|e| Invalid(e.to_string()))
}

/// A node id: a DNS-label-like name.
pub fn node_id(s: &str) -> Result<(), Invalid> {
    name(s).map_err(|Invalid(why)| Invalid(format!("node_id {} {why}", quote(s))))
}

/// A key version on the wire: `0` (meaning "current") is allowed only when `allow_zero`.
pub fn version(v: u64, allow_zero: bool) -> Result<(), Invalid> {
    if v == 0 && !allow_zero {
        return Err(Invalid("version must be at least 1".into()));
    }
    if v > MAX_VERSION {
        return Err(Invalid(format!(
            "version {v} is out of range (at most {MAX_VERSION})"
        )));
    }
    Ok(())
}

/// Labels: at most [`MAX_LABELS`], keys DNS-label-like, values printable and short.
pub fn labels<'a>(
    it: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), Invalid> {
    if it.len() > MAX_LABELS {
        return Err(Invalid(format!("at most {MAX_LABELS} labels are allowed")));
    }
    for (k, v) in it {
        name(k).map_err(|Invalid(why)| Invalid(format!("label key {} {why}", quote(k))))?;
        if v.len() > MAX_LABEL_LEN || v.chars().any(|c| c.is_control()) {
            return Err(Invalid(format!(
                "label {}: values are at most {MAX_LABEL_LEN} bytes with no control characters",
                quote(k)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "vol-1",
            "0",
            "123e4567-e89b-12d3-a456-426614174000",
            &"a".repeat(63),
        ] {
            assert!(name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "..",
            " a",
            "é",
            &"a".repeat(64),
        ] {
            assert!(name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quotes_are_bounded() {
        let q = quote(&"x".repeat(100_000));
        assert!(q.len() < 100 && q.contains("100000 bytes"), "{q}");
        assert_eq!(quote("a\u{0}b"), "\"a\\0b\"");
    }

    #[test]
    fn versions() {
        assert!(version(0, true).is_ok());
        assert!(version(0, false).is_err());
        assert!(version(1 << 63, true).is_err());
        assert!(version(MAX_VERSION, false).is_ok());
    }
}
