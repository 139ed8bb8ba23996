//! A development PKI: a CA and the broker, node and admin certificates with SPIFFE URI
//! SANs, for the demo and the tests. Production uses the operator's CA.
//!
//! Idempotent: an existing CA is reused and existing certificates are kept, so running
//! `pki init` again only adds what is missing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::validate;

/// A PKI problem, naming the file or name at fault.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A bad name or trust domain.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `pki init` should create.
#[derive(Debug, Clone)]
pub struct PkiRequest {
    /// Output directory (created 0700).
    pub dir: PathBuf,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// Node names (`spiffe://TD/node/NAME`).
    pub nodes: Vec<String>,
    /// Admin names (`spiffe://TD/admin/NAME`).
    pub admins: Vec<String>,
    /// Break-glass recovery names (`spiffe://TD/recovery/NAME`): served key reads only
    /// by a broker whose config sets `allow_recovery_reads`.
    pub recovery: Vec<String>,
    /// Extra DNS names for the broker's server certificate (localhost and 127.0.0.1 are always in).
    pub broker_dns: Vec<String>,
}

/// File names of the PKI in its directory.
pub mod files {
    /// CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// CA private key.
    pub const CA_KEY: &str = "ca.key";
    /// Broker certificate and key.
    pub const BROKER: &str = "broker";
    /// Certificate path stem of a node.
    pub fn node(name: &str) -> String {
        format!("node-{name}")
    }
    /// Certificate path stem of an admin.
    pub fn admin(name: &str) -> String {
        format!("admin-{name}")
    }
    /// Certificate path stem of a recovery identity.
    pub fn recovery(name: &str) -> String {
        format!("recovery-{name}")
    }
}

fn write_secret(path: &Path, data: &str) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn write_public(path: &Path, data: &str) -> Result<(), PkiError> {
    fs::write(path, data).map_err(io(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io(path))
}

fn load_or_create_ca(req: &PkiRequest) -> Result<(Issuer<'static, KeyPair>, bool), PkiError> {
    let cert_path = req.dir.join(files::CA_CERT);
    let key_path = req.dir.join(files::CA_KEY);
    if key_path.exists() && cert_path.exists() {
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        return Ok((Issuer::from_ca_cert_pem(&cert_pem, key)?, false));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("nodecrypt dev CA ({})", req.trust_domain),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_secret(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok((Issuer::new(params, key), true))
}

fn issue(
    dir: &Path,
    stem: &str,
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    uri: &str,
    server_names: &[String],
    created: &mut Vec<PathBuf>,
) -> Result<(), PkiError> {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok(());
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    let mut sans = vec![SanType::URI(uri.try_into()?)];
    for name in server_names {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(name.clone().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    // A stale half (cert without key or the reverse) is replaced.
    let _ = fs::remove_file(&key_path);
    write_secret(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    created.push(cert_path);
    Ok(())
}

/// Creates the CA (if missing) and every requested certificate that is missing.
/// Returns the certificate files it created.
pub fn init(req: &PkiRequest) -> Result<Vec<PathBuf>, PkiError> {
    validate::name(&req.trust_domain.replace('.', "-"))
        .map_err(|e| PkiError::Invalid(format!("trust domain {:?} {e}", req.trust_domain)))?;
    for n in req.nodes.iter().chain(&req.admins).chain(&req.recovery) {
        validate::name(n).map_err(|e| PkiError::Invalid(format!("name {n:?} {e}")))?;
    }
    fs::create_dir_all(&req.dir).map_err(io(&req.dir))?;
    fs::set_permissions(&req.dir, fs::Permissions::from_mode(0o700)).map_err(io(&req.dir))?;
    let (issuer, _) = load_or_create_ca(req)?;
    let td = &req.trust_domain;
    let local = [
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let mut broker_names = local.to_vec();
    broker_names.extend(req.broker_dns.iter().cloned());
    let mut created = Vec::new();
    issue(
        &req.dir,
        files::BROKER,
        &issuer,
        "nodecrypt-keybroker",
        &format!("spiffe://{td}/broker/keybroker"),
        &broker_names,
        &mut created,
    )?;
    for n in &req.nodes {
        // Node certificates also serve the agent's optional TCP listener.
        issue(
            &req.dir,
            &files::node(n),
            &issuer,
            n,
            &format!("spiffe://{td}/node/{n}"),
            &local,
            &mut created,
        )?;
    }
    for a in &req.admins {
        issue(
            &req.dir,
            &files::admin(a),
            &issuer,
            a,
            &format!("spiffe://{td}/admin/{a}"),
            &[],
            &mut created,
        )?;
    }
    for r in &req.recovery {
        issue(
            &req.dir,
            &files::recovery(r),
            &issuer,
            r,
            &format!("spiffe://{td}/recovery/{r}"),
            &[],
            &mut created,
        )?;
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{from_cert_der, Identity};

    #[test]
    fn certificates_carry_their_spiffe_ids_and_init_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let req = PkiRequest {
            dir: dir.path().join("pki"),
            trust_domain: "rack.test".into(),
            nodes: vec!["n1".into()],
            admins: vec!["ops".into()],
            recovery: vec!["officer".into()],
            broker_dns: vec![],
        };
        let created = init(&req).unwrap();
        assert_eq!(created.len(), 4);
        let certs = crate::tls::load_certs(&req.dir.join("node-n1.pem")).unwrap();
        assert_eq!(
            from_cert_der(&certs[0], "rack.test").unwrap(),
            Identity::Node("n1".into())
        );
        let certs = crate::tls::load_certs(&req.dir.join("admin-ops.pem")).unwrap();
        assert_eq!(
            from_cert_der(&certs[0], "rack.test").unwrap(),
            Identity::Admin("ops".into())
        );
        assert!(from_cert_der(&certs[0], "other.test").is_err());
        let certs = crate::tls::load_certs(&req.dir.join("recovery-officer.pem")).unwrap();
        assert_eq!(
            from_cert_der(&certs[0], "rack.test").unwrap(),
            Identity::Recovery("officer".into())
        );
        let mode = fs::metadata(req.dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Again: nothing new; a new node is added under the same CA.
        let before = fs::read(req.dir.join("ca.pem")).unwrap();
        assert!(init(&req).unwrap().is_empty());
        let mut more = req.clone();
        more.nodes.push("n2".into());
        assert_eq!(init(&more).unwrap().len(), 1);
        assert_eq!(before, fs::read(req.dir.join("ca.pem")).unwrap());
    }
}
