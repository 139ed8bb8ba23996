//! gRPC channels over mTLS (TLS 1.3, the workspace's rustls provider) with deadlines on
//! everything: TCP connect and TLS handshake share `connect_timeout`, and every request
//! carries `request_timeout`. A server that accepts and never answers costs one deadline.
//!
//! A TLS handshake that fails on a certificate (the server's does not chain to our CA or
//! does not name the host; the server refused ours) is not transient: the connect error
//! carries a [`TlsRejected`] that [`tls_rejection`] finds in a call's error, so a retry
//! loop can stop at once and say why.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A bad endpoint string.
#[derive(Debug, thiserror::Error)]
#[error("endpoint {endpoint:?}: {what}")]
pub struct EndpointError {
    /// The endpoint given.
    pub endpoint: String,
    /// What is wrong.
    pub what: String,
}

/// A TLS handshake failed on certificates or protocol (a rustls error, or an alert from
/// the peer): retrying will not help until someone fixes a certificate or a CA file.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {endpoint} failed: {what}; check that the configured CA issued the server's certificate, that it names {endpoint}'s host, and that the server trusts this client's certificate")]
pub struct TlsRejected {
    /// The endpoint.
    pub endpoint: String,
    /// rustls' reason ("invalid peer certificate: UnknownIssuer").
    pub what: String,
}

/// The [`TlsRejected`] somewhere in the source chain of `err` (e.g. a `tonic::Status` of
/// a call whose connection failed), if any.
pub fn tls_rejection<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsRejected> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<TlsRejected>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<TlsRejected>()) {
                return Some(t);
            }
        }
        cur = e.source();
    }
    None
}

/// Deadlines of a channel.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// TCP connect plus TLS handshake.
    pub connect: Duration,
    /// Each request, end to end.
    pub request: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(10),
        }
    }
}

/// A lazily connecting channel to `endpoint` (`host:port`, or `https://host:port`); the
/// server certificate must be valid for `host` under the configured CA.
pub fn channel(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    deadlines: Deadlines,
) -> Result<Channel, EndpointError> {
    let err = |what: &str| EndpointError {
        endpoint: endpoint.to_string(),
        what: what.to_string(),
    };
    let authority = endpoint
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let uri: Uri = format!("http://{authority}")
        .parse()
        .map_err(|_| err("not host:port"))?;
    let host = uri
        .host()
        .ok_or_else(|| err("no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().ok_or_else(|| err("no port"))?;
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| err("host is not a DNS name or IP"))?;
    let shown = authority.to_string();
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, host, server_name) = (tls.clone(), host.clone(), server_name.clone());
        let shown = shown.clone();
        async move {
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(tls)
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| {
                        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                            Some(tls_err) => std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                TlsRejected {
                                    endpoint: shown.clone(),
                                    what: tls_err.to_string(),
                                },
                            ),
                            None => e,
                        }
                    })
            };
            match tokio::time::timeout(deadlines.connect, connect).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connect and TLS handshake took longer than {:?}",
                        deadlines.connect
                    ),
                )),
            }
        }
    });
    let ep = Endpoint::from(uri)
        .connect_timeout(deadlines.connect)
        .timeout(deadlines.request)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(ep.connect_with_connector_lazy(connector))
}
