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

use crate::conn::{Limits, Watch};
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
    watch: Option<Arc<Watch>>,
}

impl Peer {
    /// The peer of a connection from `addr` that presented the certificate chain `certs`,
    /// under `trust_domain`.
    pub fn new(addr: SocketAddr, certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Self {
        Self::watched(addr, certs, trust_domain, None)
    }

    fn watched(
        addr: SocketAddr,
        certs: Option<&[CertificateDer<'_>]>,
        trust_domain: &str,
        watch: Option<Arc<Watch>>,
    ) -> Self {
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
            watch,
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

    /// The deadlines of this peer's connection (accepted by [`incoming`]).
    pub fn watch(&self) -> Option<&Arc<Watch>> {
        self.0.watch.as_ref()
    }
}

/// An accepted, handshaken TLS connection with its [`Peer`]. Holds one of the listener's
/// [`Limits::max_connections`] slots until it is dropped, and fails its next read once
/// the connection passes its first-request or idle deadline (so hyper closes it).
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    timer: Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
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
        let this = &mut *self;
        if let Some(watch) = this.peer.0.watch.as_ref() {
            if let Some(e) = watch.poll_expired(&mut this.timer, cx) {
                tracing::debug!(peer = %this.peer.addr(), error = %e, "closing connection");
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
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

/// Whether an `accept` error means the process (or system) is out of a resource, so the
/// loop should pause before trying again rather than spin.
fn out_of_resources(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// How long the accept loop pauses after running out of file descriptors (or memory):
/// long enough not to spin, short enough that a slot freed meanwhile is used at once.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

/// [`incoming_with`] with the default [`Limits`] but this `handshake` deadline (the
/// agent's listener before it took explicit limits; kept for callers of that API).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake: std::time::Duration,
    trust_domain: String,
) -> (
    impl tokio_stream::Stream<Item = Result<PeerStream, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let limits = Limits {
        handshake,
        ..Limits::default()
    };
    incoming_with(listener, config, limits, trust_domain)
}

/// Accepted, handshaken TLS connections of `listener`, as a stream for tonic's
/// `serve_with_incoming`, each with its [`Peer`] (identities of `trust_domain`), under
/// `limits`:
///
/// - at most [`Limits::max_connections`] at once: one more is closed right after
///   `accept`, before any TLS work, so a flood costs a file descriptor for an instant and
///   never starves `accept`;
/// - each handshake runs in its own task under [`Limits::handshake`], so a client that
///   connects and says nothing blocks no one;
/// - an established connection that sends no request within [`Limits::first_request`],
///   or none for [`Limits::idle`], is closed (serve with
///   [`crate::conn::GrpcContractLayer`] so requests are seen);
/// - `accept` failing for want of file descriptors pauses the loop for
///   [`ACCEPT_BACKOFF`] (logged at most once a second), then goes on.
///
/// Refused handshakes (no certificate, another CA) are logged. Abort the returned task
/// to stop accepting.
pub fn incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Limits,
    trust_domain: String,
) -> (
    impl tokio_stream::Stream<Item = Result<PeerStream, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let trust_domain: Arc<str> = trust_domain.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        let mut last_warn: Option<std::time::Instant> = None;
        let mut refused: u64 = 0;
        let warn_due = |last: &mut Option<std::time::Instant>| {
            let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) if out_of_resources(&e) => {
                    if warn_due(&mut last_warn) {
                        tracing::warn!(error = %e, max_connections = limits.max_connections, "accept failed: out of file descriptors; pausing briefly (raise LimitNOFILE or lower max_connections)");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                Err(e) => {
                    // ECONNABORTED and the like concern one connection only.
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused += 1;
                drop(tcp);
                if warn_due(&mut last_warn) {
                    tracing::warn!(peer = %addr, max_connections = limits.max_connections, refused_so_far = refused, "connection limit reached; closing new connections at once");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, td) = (acceptor.clone(), tx.clone(), trust_domain.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let watch = Arc::new(Watch::new(limits));
                        let peer = Peer::watched(
                            addr,
                            inner.get_ref().1.peer_certificates(),
                            &td,
                            Some(watch),
                        );
                        let timer = Box::pin(tokio::time::sleep(limits.first_request));
                        let _ = tx
                            .send(PeerStream {
                                inner,
                                peer,
                                timer,
                                _slot: slot,
                            })
                            .await;
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %addr, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx).map(Ok), task)
}
