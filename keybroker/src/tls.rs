//! rustls configurations shared by the broker, the agent and their clients: TLS 1.3 only,
//! the `ring` provider only, client certificates required by every server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;

use crate::identity::{self, Identity, IdentityError};

/// A TLS setup problem, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The one crypto provider of the workspace (see STYLE.md: mixing providers panics).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default; call once at the top of `main`.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("holds no certificate".into()));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("cannot read a private key: {e}"),
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: ca.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Paths of a certificate, its key, and the CA that peers must chain to.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain of this endpoint.
    pub cert: PathBuf,
    /// PEM private key of this endpoint (mode 0600).
    pub key: PathBuf,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
}

/// A TLS 1.3 server that requires a client certificate chaining to `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.key.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS 1.3 client presenting `files.cert` and trusting only `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.key.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Who is on the other end of an accepted connection, established once at its TLS
/// handshake: every request of the connection shares it (an `Arc`), so no call parses a
/// certificate again. tonic puts it in each request's extensions.
#[derive(Clone, Debug)]
pub struct Peer(Arc<PeerInner>);

#[derive(Debug)]
struct PeerInner {
    addr: Arc<str>,
    identity: Result<(Identity, Arc<str>), IdentityError>,
}

impl Peer {
    /// The peer of a connection from `addr` that presented the certificate chain `certs`,
    /// under `trust_domain`.
    pub fn new(addr: SocketAddr, certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Self {
        let identity = certs
            .and_then(|c| c.first())
            .ok_or(IdentityError::NoCertificate)
            .and_then(|leaf| identity::from_cert_der(leaf, trust_domain))
            .map(|id| {
                let spiffe = id.spiffe_id(trust_domain).into();
                (id, spiffe)
            });
        Self(Arc::new(PeerInner {
            addr: addr.to_string().into(),
            identity,
        }))
    }

    /// The peer's socket address, as text (shared: clone it to keep it, a reference
    /// count).
    pub fn addr(&self) -> &Arc<str> {
        &self.0.addr
    }

    /// The peer's identity and its SPIFFE id (shared: clone it to keep it, a reference
    /// count), or why its certificate carries none.
    pub fn identity(&self) -> Result<(&Identity, &Arc<str>), &IdentityError> {
        match &self.0.identity {
            Ok((id, spiffe)) => Ok((id, spiffe)),
            Err(e) => Err(e),
        }
    }
}

/// An accepted, handshaken TLS connection with its [`Peer`].
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepted, handshaken TLS connections of `listener`, as a stream for tonic's
/// `serve_with_incoming`, each with its [`Peer`] (identities of `trust_domain`). Each
/// handshake runs in its own task under the `handshake` deadline, so a client that
/// connects and says nothing blocks no one. Refused handshakes (no certificate, another
/// CA) are logged. Abort the returned task to stop accepting.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake: std::time::Duration,
    trust_domain: String,
) -> (
    impl tokio_stream::Stream<Item = Result<PeerStream, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let trust_domain: Arc<str> = trust_domain.into();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, td) = (acceptor.clone(), tx.clone(), trust_domain.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let peer = Peer::new(addr, inner.get_ref().1.peer_certificates(), &td);
                        let _ = tx.send(PeerStream { inner, peer }).await;
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %addr, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx).map(Ok), task)
}
