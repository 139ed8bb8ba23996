//! Who may do what: pure functions over an [`Identity`] and a volume record.
//!
//! A node creates keys bound to itself and reads, rotates, retires, destroys and
//! describes only keys bound to itself; an admin may do everything, and only an admin
//! may rebind. A refusal never names the node a volume is bound to.

use crate::identity::Identity;
use crate::store::VolumeRecord;

/// An operation to authorize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Create a key bound to `node` (the requested node id; empty = the caller).
    Create {
        /// The requested node.
        node: &'a str,
    },
    /// Fetch a key.
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
    }
}

/// May `who` perform `action` on `record` (or, for listings and creates, at all)?
pub fn check(
    who: &Identity,
    action: Action<'_>,
    record: Option<&VolumeRecord>,
) -> Result<(), Denied> {
    let Identity::Node(me) = who else {
        return Ok(()); // admins may do everything
    };
    match action {
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
        let of_b = rec("b");
        for action in [
            Action::Get,
            Action::Rotate,
            Action::Retire,
            Action::Destroy,
            Action::Describe,
        ] {
            let err = check(&a, action, Some(&of_b)).unwrap_err();
            assert!(
                !err.0.contains("node b"),
                "must not reveal the owner: {err}"
            );
            assert!(check(&a, action, Some(&rec("a"))).is_ok());
            assert!(check(&admin, action, Some(&of_b)).is_ok());
        }
        assert!(check(&a, Action::Rebind, Some(&rec("a"))).is_err());
        assert!(check(&admin, Action::Rebind, Some(&of_b)).is_ok());
        assert!(check(&a, Action::List { node: "b" }, None).is_err());
        assert!(check(&a, Action::List { node: "" }, None).is_ok());
        assert!(check(&a, Action::Create { node: "b" }, None).is_err());
        assert!(check(&a, Action::Create { node: "" }, Some(&of_b)).is_err());
        assert_eq!(create_target(&a, "").unwrap(), "a");
        assert!(create_target(&admin, "").is_err());
        assert_eq!(create_target(&admin, "b").unwrap(), "b");
    }
}
