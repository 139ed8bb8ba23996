//! Who may do what: pure functions over an [`Identity`], a volume record and the
//! broker's [`Policy`].
//!
//! **Admins manage, nodes read.** A node creates keys bound to itself and reads,
//! rotates, retires, destroys and describes only keys bound to itself. An admin creates
//! (for a named node), rotates, retires, rebinds, destroys, lists and describes any
//! volume, and never reads key bytes: `GetVolumeKey` is refused, and the key field of
//! what `CreateVolumeKey` and `RotateVolumeKey` answer an admin is left empty
//! ([`receives_key_bytes`]). A recovery identity (break-glass) may read and describe any
//! volume's key, and only where [`Policy::allow_recovery_reads`] is set; it changes
//! nothing. A refusal never names the node a volume is bound to.

use crate::identity::Identity;
use crate::store::VolumeRecord;

/// The broker's authorization settings (from its config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Serve `GetVolumeKey` to `spiffe://TD/recovery/NAME` identities (default false).
    pub allow_recovery_reads: bool,
}

/// An operation to authorize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Create a key bound to `node` (the requested node id; empty = the caller).
    Create {
        /// The requested node.
        node: &'a str,
    },
    /// Fetch a key's bytes.
    Get,
    /// Add a version.
    Rotate,
    /// Retire a version.
    Retire,
    /// Destroy the volume's keys.
    Destroy,
    /// Read metadata.
    Describe,
    /// Bind to another node.
    Rebind,
    /// List volumes of `node` (empty = the caller's, or all for an admin).
    List {
        /// The requested node.
        node: &'a str,
    },
}

/// A refusal, phrased for the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Denied(pub String);

/// The node a create binds the new volume to, if the caller may create it.
pub fn create_target<'a>(who: &'a Identity, requested: &'a str) -> Result<&'a str, Denied> {
    match who {
        Identity::Node(me) if requested.is_empty() || requested == me => Ok(me),
        Identity::Node(me) => Err(Denied(format!(
            "node {me} may create keys only for itself, not for node {requested}"
        ))),
        Identity::Admin(_) if requested.is_empty() => Err(Denied(
            "an admin creating a key must name the node to bind it to (node_id)".into(),
        )),
        Identity::Admin(_) => Ok(requested),
        Identity::Recovery(r) => Err(Denied(format!(
            "recovery identity {r} may only read keys; it creates nothing"
        ))),
    }
}

/// Whether a successful answer to `who` may carry key bytes (CreateVolumeKey,
/// RotateVolumeKey): only for a node (the volume's own, as [`check`] has established).
/// An admin's answer carries the metadata with an empty key field.
pub fn receives_key_bytes(who: &Identity) -> bool {
    matches!(who, Identity::Node(_))
}

/// May `who` perform `action` on `record` (or, for listings and creates, at all)?
pub fn check(
    who: &Identity,
    action: Action<'_>,
    record: Option<&VolumeRecord>,
    policy: Policy,
) -> Result<(), Denied> {
    match who {
        Identity::Admin(name) => match action {
            Action::Get => Err(Denied(format!(
                "admin {name} may manage volumes but never read their keys: only the node a \
                 volume is bound to fetches it (a break-glass read needs a recovery identity \
                 on a broker with allow_recovery_reads)"
            ))),
            _ => Ok(()),
        },
        Identity::Recovery(name) => match action {
            Action::Get | Action::Describe if policy.allow_recovery_reads => Ok(()),
            Action::Get | Action::Describe => Err(Denied(format!(
                "recovery identity {name} refused: this broker does not allow recovery reads \
                 (allow_recovery_reads = false in its config)"
            ))),
            _ => Err(Denied(format!(
                "recovery identity {name} may only read keys; it changes nothing"
            ))),
        },
        Identity::Node(me) => match action {
            Action::Rebind => Err(Denied(
                "only an admin may rebind a volume to another node".into(),
            )),
            Action::List { node } if !node.is_empty() && node != me => {
                Err(Denied(format!("node {me} may list only its own volumes")))
            }
            Action::List { .. } => Ok(()),
            Action::Create { node } => {
                create_target(who, node)?;
                bound_to_me(me, record)
            }
            Action::Get | Action::Rotate | Action::Retire | Action::Destroy | Action::Describe => {
                bound_to_me(me, record)
            }
        },
    }
}

fn bound_to_me(me: &str, record: Option<&VolumeRecord>) -> Result<(), Denied> {
    match record {
        Some(r) if r.node_id != me => Err(Denied(format!(
            "volume {} is not bound to node {me}",
            r.volume_id
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: "v1".into(),
            node_id: node.into(),
            versions: vec![],
            labels: Default::default(),
            created_at: String::new(),
            destroyed_at: None,
        }
    }

    #[test]
    fn matrix() {
        let a = Identity::Node("a".into());
        let admin = Identity::Admin("ops".into());
        let rescue = Identity::Recovery("officer".into());
        let off = Policy::default();
        let on = Policy {
            allow_recovery_reads: true,
        };
        let of_b = rec("b");
        for action in [
            Action::Get,
            Action::Rotate,
            Action::Retire,
            Action::Destroy,
            Action::Describe,
        ] {
            let err = check(&a, action, Some(&of_b), off).unwrap_err();
            assert!(
                !err.0.contains("node b"),
                "must not reveal the owner: {err}"
            );
            assert!(check(&a, action, Some(&rec("a")), off).is_ok());
        }
        // Admins manage, nodes read: an admin never reads a key, whatever the policy.
        for p in [off, on] {
            let err = check(&admin, Action::Get, Some(&of_b), p).unwrap_err();
            assert!(err.0.contains("never read"), "{err}");
            assert!(
                !err.0.contains("node b"),
                "must not reveal the owner: {err}"
            );
        }
        for action in [
            Action::Rotate,
            Action::Retire,
            Action::Destroy,
            Action::Describe,
            Action::Rebind,
            Action::List { node: "" },
            Action::Create { node: "b" },
        ] {
            assert!(
                check(&admin, action, Some(&of_b), off).is_ok(),
                "{action:?}"
            );
        }
        assert!(receives_key_bytes(&a));
        assert!(!receives_key_bytes(&admin));
        assert!(!receives_key_bytes(&rescue));
        // Recovery: reads only, and only where enabled.
        for action in [Action::Get, Action::Describe] {
            let err = check(&rescue, action, Some(&of_b), off).unwrap_err();
            assert!(err.0.contains("allow_recovery_reads"), "{err}");
            assert!(check(&rescue, action, Some(&of_b), on).is_ok());
        }
        for action in [
            Action::Rotate,
            Action::Retire,
            Action::Destroy,
            Action::Rebind,
            Action::List { node: "" },
            Action::Create { node: "b" },
        ] {
            assert!(
                check(&rescue, action, Some(&of_b), on).is_err(),
                "{action:?}"
            );
        }
        assert!(create_target(&rescue, "b").is_err());
        assert!(check(&a, Action::Rebind, Some(&rec("a")), off).is_err());
        assert!(check(&a, Action::List { node: "b" }, None, off).is_err());
        assert!(check(&a, Action::List { node: "" }, None, off).is_ok());
        assert!(check(&a, Action::Create { node: "b" }, None, off).is_err());
        assert!(check(&a, Action::Create { node: "" }, Some(&of_b), off).is_err());
        assert_eq!(create_target(&a, "").unwrap(), "a");
        assert!(create_target(&admin, "").is_err());
        assert_eq!(create_target(&admin, "b").unwrap(), "b");
    }
}
