//! The broker client: mTLS channel with deadlines on every call, retries with backoff for
//! transient failures until a caller-given deadline, keys taken into zeroizing types at
//! once.
//!
//! Transient: connection refused or reset, timeouts, UNAVAILABLE (the broker's message is
//! kept, e.g. its store's "no space left on device", and ends the final error). Permanent,
//! failing at once: a TLS handshake refused on certificates, and every other gRPC code.
//! No attempt runs past the deadline: each one's time is clipped to what is left of it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodecrypt_common::{client, tls};
use nodecrypt_proto::keybroker::v1 as pb;
use pb::key_broker_client::KeyBrokerClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, warn};

use crate::config::BrokerConfig;
use crate::key::SlotKey;

/// A broker call that failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached (or kept failing transiently) until the deadline.
    #[error("key broker {endpoint} unavailable for {waited:?} (deadline): {last}")]
    Unavailable {
        /// Endpoint.
        endpoint: String,
        /// How long we tried.
        waited: Duration,
        /// The last error.
        last: String,
    },
    /// The broker answered with an error.
    #[error("key broker {endpoint}: {}", .status.message())]
    Refused {
        /// Endpoint.
        endpoint: String,
        /// Its answer.
        status: Status,
    },
    /// The client could not be set up (certificates, endpoint).
    #[error("key broker client: {0}")]
    Setup(String),
    /// The TLS handshake with the broker failed on a certificate: not retried.
    #[error("key broker {endpoint}: {what}")]
    Tls {
        /// Endpoint.
        endpoint: String,
        /// The reason, with what to check.
        what: String,
    },
    /// The broker sent a key of the wrong size.
    #[error("key broker {endpoint} sent a malformed key for {volume_id}")]
    BadKey {
        /// Endpoint.
        endpoint: String,
        /// Volume.
        volume_id: String,
    },
}

impl BrokerError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::Unavailable { .. } => Code::Unavailable,
            BrokerError::Refused { status, .. } => status.code(),
            BrokerError::Setup(_) | BrokerError::Tls { .. } => Code::FailedPrecondition,
            BrokerError::BadKey { .. } => Code::DataLoss,
        }
    }
}

/// A connected (lazily) broker client.
#[derive(Clone)]
pub struct Broker {
    client: KeyBrokerClient<Channel>,
    endpoint: String,
}

fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

impl Broker {
    /// A client for the configured broker; nothing is sent until the first call.
    pub fn new(cfg: &BrokerConfig) -> Result<Broker, BrokerError> {
        let files = tls::TlsFiles {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            ca: cfg.ca.clone(),
        };
        let tls = tls::client_config(&files).map_err(|e| BrokerError::Setup(e.to_string()))?;
        let deadlines = client::Deadlines {
            connect: cfg.request_timeout,
            request: cfg.request_timeout,
        };
        let channel = client::channel(&cfg.endpoint, Arc::new(tls), deadlines)
            .map_err(|e| BrokerError::Setup(e.to_string()))?;
        Ok(Broker {
            client: KeyBrokerClient::new(channel),
            endpoint: cfg.endpoint.clone(),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs `call` until it succeeds, fails for good, or `deadline` passes (backoff
    /// 100 ms doubling to 2 s; each attempt and the last wait are clipped to the
    /// deadline, so the whole retry never outlasts it).
    async fn retry<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &str,
        call: F,
    ) -> Result<T, BrokerError>
    where
        F: Fn(KeyBrokerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut last: Option<String> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = if left.is_zero() {
                None
            } else {
                tokio::time::timeout(left, call(self.client.clone()))
                    .await
                    .ok()
            };
            let s = match outcome {
                Some(Ok(r)) => return Ok(r.into_inner()),
                Some(Err(s)) => s,
                None => Status::deadline_exceeded(format!(
                    "no answer within the {:?} left of the deadline{}",
                    left,
                    last.as_deref()
                        .map(|l| format!(" (before that: {l})"))
                        .unwrap_or_default()
                )),
            };
            if let Some(t) = client::tls_rejection(&s) {
                warn!(what, error = %t, "broker TLS handshake refused; not retrying");
                return Err(BrokerError::Tls {
                    endpoint: self.endpoint.clone(),
                    what: t.to_string(),
                });
            }
            if !transient(&s) {
                warn!(what, code = ?s.code(), error = s.message(), "broker refused");
                return Err(BrokerError::Refused {
                    endpoint: self.endpoint.clone(),
                    status: s,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BrokerError::Unavailable {
                    endpoint: self.endpoint.clone(),
                    waited: now - start,
                    last: s.message().to_string(),
                });
            }
            debug!(what, error = s.message(), "broker call failed; retrying");
            last = Some(s.message().to_string());
            let wait = backoff.min(deadline - now);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn key(&self, k: pb::VolumeKey) -> Result<(SlotKey, u64), BrokerError> {
        let pb::VolumeKey {
            volume_id,
            version,
            key,
            ..
        } = k;
        SlotKey::from_vec(key)
            .map(|k| (k, version))
            .map_err(|_| BrokerError::BadKey {
                endpoint: self.endpoint.clone(),
                volume_id,
            })
    }

    /// CreateVolumeKey (idempotent: the same volume gives the same key and version).
    pub async fn create(
        &self,
        volume_id: &str,
        labels: HashMap<String, String>,
        deadline: Instant,
    ) -> Result<(SlotKey, u64), BrokerError> {
        let k = self
            .retry(deadline, "CreateVolumeKey", |mut c| {
                let req = pb::CreateVolumeKeyRequest {
                    volume_id: volume_id.to_string(),
                    node_id: String::new(),
                    labels: labels.clone(),
                };
                async move { c.create_volume_key(req).await }
            })
            .await?;
        self.key(k)
    }

    /// GetVolumeKey of one version (0 = current); returns the key, its version and the
    /// broker's current version.
    pub async fn get(
        &self,
        volume_id: &str,
        version: u64,
        deadline: Instant,
    ) -> Result<(SlotKey, u64, u64), BrokerError> {
        let k = self
            .retry(deadline, "GetVolumeKey", |mut c| {
                let req = pb::GetVolumeKeyRequest {
                    volume_id: volume_id.to_string(),
                    version,
                };
                async move { c.get_volume_key(req).await }
            })
            .await?;
        let current = k.current_version;
        let (key, v) = self.key(k)?;
        Ok((key, v, current))
    }

    /// RotateVolumeKey from `expected_current`.
    pub async fn rotate(
        &self,
        volume_id: &str,
        expected_current: u64,
        deadline: Instant,
    ) -> Result<(SlotKey, u64), BrokerError> {
        let k = self
            .retry(deadline, "RotateVolumeKey", |mut c| {
                let req = pb::RotateVolumeKeyRequest {
                    volume_id: volume_id.to_string(),
                    expected_current_version: expected_current,
                };
                async move { c.rotate_volume_key(req).await }
            })
            .await?;
        self.key(k)
    }

    /// RetireVolumeKeyVersion (idempotent).
    pub async fn retire(
        &self,
        volume_id: &str,
        version: u64,
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        self.retry(deadline, "RetireVolumeKeyVersion", |mut c| {
            let req = pb::RetireVolumeKeyVersionRequest {
                volume_id: volume_id.to_string(),
                version,
            };
            async move { c.retire_volume_key_version(req).await }
        })
        .await
        .map(|_| ())
    }

    /// DestroyVolumeKey (idempotent).
    pub async fn destroy(
        &self,
        volume_id: &str,
        reason: &str,
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        self.retry(deadline, "DestroyVolumeKey", |mut c| {
            let req = pb::DestroyVolumeKeyRequest {
                volume_id: volume_id.to_string(),
                reason: reason.to_string(),
            };
            async move { c.destroy_volume_key(req).await }
        })
        .await
        .map(|_| ())
    }

    /// DescribeVolume: metadata only.
    pub async fn describe(
        &self,
        volume_id: &str,
        deadline: Instant,
    ) -> Result<pb::VolumeInfo, BrokerError> {
        self.retry(deadline, "DescribeVolume", |mut c| {
            let req = pb::DescribeVolumeRequest {
                volume_id: volume_id.to_string(),
            };
            async move { c.describe_volume(req).await }
        })
        .await
    }
}
