//! Peer certificate → [`Identity`]: the SPIFFE URI SAN of an mTLS client certificate.
//!
//! Accepted forms: `spiffe://<trust-domain>/node/<node-id>`,
//! `spiffe://<trust-domain>/admin/<name>` and `spiffe://<trust-domain>/recovery/<name>`
//! (break-glass key reads, served only where the broker's config enables them). A
//! certificate with no such SAN, with several, or from another trust domain has no
//! identity here.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::name;

/// Who is calling, as proven by its client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A node agent: may use only the volumes bound to this node id.
    Node(String),
    /// An operator or the cluster manager: manages every volume (create, rebind,
    /// destroy, list, describe) but never reads key bytes.
    Admin(String),
    /// A break-glass recovery officer: may read any volume's key, only where the broker's
    /// config sets `allow_recovery_reads`, every read audited as a recovery read.
    Recovery(String),
}

impl Identity {
    /// The node id, if this is a node.
    pub fn node_id(&self) -> Option<&str> {
        match self {
            Identity::Node(n) => Some(n),
            Identity::Admin(_) | Identity::Recovery(_) => None,
        }
    }

    /// True for an admin identity.
    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Admin(_))
    }

    /// The SPIFFE id in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        match self {
            Identity::Node(n) => format!("spiffe://{trust_domain}/node/{n}"),
            Identity::Admin(a) => format!("spiffe://{trust_domain}/admin/{a}"),
            Identity::Recovery(r) => format!("spiffe://{trust_domain}/recovery/{r}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node/{n}"),
            Identity::Admin(a) => write!(f, "admin/{a}"),
            Identity::Recovery(r) => write!(f, "recovery/{r}"),
        }
    }
}

/// Why a certificate carries no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The peer presented no certificate (the TLS layer should have refused it already).
    #[error("no client certificate was presented")]
    NoCertificate,
    /// The certificate did not parse.
    #[error("the client certificate does not parse: {0}")]
    Malformed(String),
    /// No `spiffe://` URI SAN.
    #[error("the client certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// More than one `spiffe://` URI SAN: ambiguous, refused.
    #[error("the client certificate has {0} spiffe:// URI SANs; exactly one is accepted")]
    SeveralSpiffeIds(usize),
    /// The SPIFFE id names another trust domain or an unknown path.
    #[error("SPIFFE id {id:?} is not spiffe://{trust_domain}/node/<id>, spiffe://{trust_domain}/admin/<name> or spiffe://{trust_domain}/recovery/<name>")]
    Unrecognized {
        /// The id found.
        id: String,
        /// The trust domain this server accepts.
        trust_domain: String,
    },
}

/// Parses a SPIFFE id string in `trust_domain`.
pub fn parse_spiffe_id(id: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
    let unrecognized = || IdentityError::Unrecognized {
        id: id.to_string(),
        trust_domain: trust_domain.to_string(),
    };
    let rest = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(trust_domain))
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(unrecognized)?;
    let (kind, name) = rest.split_once('/').ok_or_else(unrecognized)?;
    if name::dns_label(name).is_err() {
        return Err(unrecognized());
    }
    match kind {
        "node" => Ok(Identity::Node(name.to_string())),
        "admin" => Ok(Identity::Admin(name.to_string())),
        "recovery" => Ok(Identity::Recovery(name.to_string())),
        _ => Err(unrecognized()),
    }
}

/// The identity of the leaf certificate `der`.
pub fn from_cert_der(der: &[u8], trust_domain: &str) -> Result<Identity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    ids.push(uri.to_string());
                }
            }
        }
    }
    match ids.len() {
        0 => Err(IdentityError::NoSpiffeId),
        1 => parse_spiffe_id(&ids[0], trust_domain),
        n => Err(IdentityError::SeveralSpiffeIds(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_strictly() {
        let td = "rack.example";
        assert_eq!(
            parse_spiffe_id("spiffe://rack.example/node/n1", td),
            Ok(Identity::Node("n1".into()))
        );
        assert_eq!(
            parse_spiffe_id("spiffe://rack.example/admin/ops", td),
            Ok(Identity::Admin("ops".into()))
        );
        assert_eq!(
            parse_spiffe_id("spiffe://rack.example/recovery/officer1", td),
            Ok(Identity::Recovery("officer1".into()))
        );
        for bad in [
            "spiffe://other.example/node/n1",
            "spiffe://rack.example.evil/node/n1",
            "spiffe://rack.example/node/",
            "spiffe://rack.example/node/n1/x",
            "spiffe://rack.example/root/n1",
            "spiffe://rack.example/node/../admin/x",
            "https://rack.example/node/n1",
            "spiffe://rack.example/node/N1",
        ] {
            assert!(parse_spiffe_id(bad, td).is_err(), "{bad} should be refused");
        }
    }
}
