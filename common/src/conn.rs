//! Bounds on every accepted connection, shared by the broker and the agent's TCP
//! listener: how many may be open at once, how long one may stay silent after its TLS
//! handshake (no HTTP/2 preface, no request) or idle between requests, and the gRPC
//! wire contract each request must keep (an `application/grpc` content type; one
//! message on a call that takes one).
//!
//! The timers live in the connection's I/O ([`Watch::poll_expired`], polled by
//! [`crate::tls::PeerStream`] on every read), so a connection past its deadline fails its
//! next read and hyper closes it: no task per connection, nothing to cancel.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body::Frame;
use tonic::body::Body;
use tonic::Status;

/// The bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TCP accept to the end of the TLS handshake.
    pub handshake: Duration,
    /// End of the TLS handshake to the first request's headers (the HTTP/2 preface comes
    /// first): a client that connects and says nothing is closed after this.
    pub first_request: Duration,
    /// A connection with no request in flight for this long is closed (the client's
    /// channel reconnects when it next needs to).
    pub idle: Duration,
    /// Open connections (handshaking or established) at most; one more is closed right
    /// after `accept`, before any TLS work.
    pub max_connections: usize,
}

impl Default for Limits {
    /// The broker's defaults (see [`crate::config::Config`]).
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_connections: 4096,
        }
    }
}

/// What one connection has done, shared by its I/O (which enforces the deadlines) and
/// its requests (which report themselves through [`Watch::request`]).
#[derive(Debug)]
pub struct Watch {
    start: Instant,
    /// Milliseconds after `start` of the last request's start or end; `u64::MAX`: none yet.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    limits: Limits,
}

/// Why a connection was closed by its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No request within [`Limits::first_request`] of the handshake.
    NoRequest,
    /// No request in flight for [`Limits::idle`].
    Idle,
}

impl Watch {
    /// A new connection's watch, its clock starting now (at the end of its handshake).
    pub fn new(limits: Limits) -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
            in_flight: AtomicUsize::new(0),
            limits,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// A request started; it counts as in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.last_ms.store(self.now_ms(), Ordering::Release);
        InFlight(self.clone())
    }

    /// When the connection must next be judged: `None` while a request is in flight.
    pub fn deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_ms.load(Ordering::Acquire) {
            u64::MAX => self.start + self.limits.first_request,
            ms => self.start + Duration::from_millis(ms) + self.limits.idle,
        })
    }

    /// Whether the connection has passed its deadline now.
    pub fn expired(&self) -> Option<Expired> {
        let deadline = self.deadline()?;
        if Instant::now() < deadline {
            return None;
        }
        Some(if self.last_ms.load(Ordering::Acquire) == u64::MAX {
            Expired::NoRequest
        } else {
            Expired::Idle
        })
    }

    /// Polls `timer` (re-armed to the current deadline) and reports expiry as the error
    /// the connection's read should fail with. While a request is in flight the timer is
    /// armed for one idle period and judged again then.
    pub fn poll_expired(
        &self,
        timer: &mut Pin<Box<tokio::time::Sleep>>,
        cx: &mut Context<'_>,
    ) -> Option<std::io::Error> {
        loop {
            if let Some(why) = self.expired() {
                let (what, limit) = match why {
                    Expired::NoRequest => ("sent no request", self.limits.first_request),
                    Expired::Idle => ("was idle", self.limits.idle),
                };
                return Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connection {what} for {limit:?}; closed"),
                ));
            }
            let next = self
                .deadline()
                .unwrap_or_else(|| Instant::now() + self.limits.idle);
            if timer.deadline().into_std() != next {
                timer.as_mut().reset(next.into());
            }
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

/// A request in flight on a watched connection (see [`Watch::request`]).
#[derive(Debug)]
pub struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The gRPC contract of each request, as a tower layer for tonic's `Server::layer`:
/// refuses a content type other than `application/grpc[+proto]` with HTTP 415, fails a
/// call that carries a second request message (every nodecrypt RPC and the health
/// service take exactly one; reflection, a streaming service, is exempt) and reports each
/// request to its connection's [`Watch`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcContractLayer;

impl<S> tower::Layer<S> for GrpcContractLayer {
    type Service = GrpcContract<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcContract { inner }
    }
}

/// See [`GrpcContractLayer`].
#[derive(Clone, Debug)]
pub struct GrpcContract<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn grpc_content_type(req: &http::Request<Body>) -> bool {
    let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let base = b"application/grpc";
    ct.len() >= base.len()
        && ct[..base.len()].eq_ignore_ascii_case(base)
        && matches!(ct.get(base.len()), None | Some(b'+') | Some(b';'))
}

impl<S> tower::Service<http::Request<Body>> for GrpcContract<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<crate::tls::Peer>()
            .and_then(|p| p.watch())
            .map(|w| w.request());
        if !grpc_content_type(&req) {
            let mut resp = http::Response::new(Body::empty());
            *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            return Box::pin(async move {
                drop(guard);
                Ok(resp)
            });
        }
        let one_message = !req.uri().path().starts_with("/grpc.reflection.");
        let req = if one_message {
            let (parts, body) = req.into_parts();
            http::Request::from_parts(parts, Body::new(OneMessage::new(body)))
        } else {
            req
        };
        // The clone is the one poll_ready readied (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // In flight until the response body ends (a server-streaming call, e.g. the
            // health service's Watch, is not idle while it streams).
            let r = inner.call(req).await;
            r.map(|resp| match guard {
                Some(g) => resp.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _guard: g,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its request [`InFlight`] until it is dropped.
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails if it carries more than one gRPC message (5-byte
/// length-prefixed frames, split across DATA frames however the client likes).
struct OneMessage {
    inner: Body,
    /// Messages whose prefix has been seen.
    messages: u32,
    /// Bytes of the current prefix seen so far (0..5).
    prefix: [u8; 5],
    prefix_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: u64,
}

impl OneMessage {
    fn new(inner: Body) -> Self {
        Self {
            inner,
            messages: 0,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
        }
    }

    /// Counts the messages that start in `data`.
    fn scan(&mut self, mut data: Bytes) -> Result<(), Status> {
        while data.has_remaining() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.remaining() as u64);
                data.advance(n as usize);
                self.remaining -= n;
                continue;
            }
            let take = (5 - self.prefix_len).min(data.remaining());
            self.prefix[self.prefix_len..self.prefix_len + take]
                .copy_from_slice(&data.slice(..take));
            data.advance(take);
            self.prefix_len += take;
            if self.prefix_len == 5 {
                self.messages += 1;
                if self.messages > 1 {
                    return Err(Status::invalid_argument(
                        "this call takes one request message and the request carried more; \
                         send one message per call",
                    ));
                }
                self.remaining = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                self.prefix_len = 0;
            }
        }
        Ok(())
    }
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = self.scan(data.clone()) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn one_message_counts_messages_across_any_split() {
        let mut two = msg(3);
        two.extend(msg(0));
        for split in 0..two.len() {
            let mut b = OneMessage::new(Body::empty());
            let first = b.scan(Bytes::copy_from_slice(&two[..split]));
            let second = b.scan(Bytes::copy_from_slice(&two[split..]));
            assert!(first.is_ok(), "split {split}");
            assert!(second.is_err(), "split {split}: a second message must fail");
        }
        let one = msg(300);
        let mut b = OneMessage::new(Body::empty());
        for chunk in one.chunks(7) {
            b.scan(Bytes::copy_from_slice(chunk)).unwrap();
        }
        assert_eq!(b.messages, 1);
    }

    #[test]
    fn deadlines_follow_requests() {
        let limits = Limits {
            first_request: Duration::from_millis(0),
            idle: Duration::from_secs(3600),
            ..Limits::default()
        };
        let w = Arc::new(Watch::new(limits));
        assert_eq!(w.expired(), Some(Expired::NoRequest));
        let g = w.request();
        assert_eq!(w.deadline(), None, "a request in flight has no deadline");
        assert_eq!(w.expired(), None);
        drop(g);
        assert_eq!(w.expired(), None, "idle for less than an hour");
        let w = Arc::new(Watch::new(Limits {
            idle: Duration::from_millis(0),
            ..limits
        }));
        drop(w.request());
        assert_eq!(w.expired(), Some(Expired::Idle));
    }

    #[test]
    fn content_types() {
        let req = |ct: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(ct) = ct {
                b = b.header("content-type", ct);
            }
            b.body(Body::empty()).unwrap()
        };
        assert!(grpc_content_type(&req(Some("application/grpc"))));
        assert!(grpc_content_type(&req(Some("application/grpc+proto"))));
        assert!(!grpc_content_type(&req(Some("application/json"))));
        assert!(!grpc_content_type(&req(Some("application/grpcx"))));
        assert!(!grpc_content_type(&req(None)));
    }
}
