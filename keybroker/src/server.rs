//! Wiring of the running broker: KEK and store checks, the TLS accept loop (one deadline
//! per handshake, so a silent client costs nothing but a timer), gRPC health and
//! reflection, graceful shutdown (NOT_SERVING, drain).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nodecrypt_proto::keybroker::v1::key_broker_server::KeyBrokerServer;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tracing::info;

use crate::audit::{AuditError, AuditLog};
use crate::config::Config;
use crate::seal::{self, SealError, SealedKek, META_SEALED_KEK};
use crate::service::Broker;
use crate::store::etcd::EtcdBackend;
use crate::store::redb::{RedbBackend, STORE_FILE};
use crate::store::{Backend, KeyStore, StoreError};
use crate::tls::{self, TlsError};
use crate::wrap::Kek;
use nodecrypt_common::serve::Drain;

/// Metadata key holding the id of the KEK the store was written with.
pub use crate::store::META_KEK_ID;

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The KEK could not be unsealed (KEK file, HSM, PIN, wrapping key). Nothing was
    /// written.
    #[error("cannot unseal the KEK, refusing to start and changing nothing: {0}")]
    Seal(#[from] SealError),
    /// The KEK is not the one the store was written with.
    #[error("the KEK in {kek_path} (id {loaded}) is not the KEK this store was written with (id {expected}); refusing to start and changing nothing. Restore the KEK file that belongs to {store_path}")]
    WrongKek {
        /// Where the KEK came from (the KEK file; the HSM key).
        kek_path: String,
        /// Loaded id.
        loaded: String,
        /// Id recorded in the store.
        expected: String,
        /// Store file.
        store_path: String,
    },
    /// Store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Audit log problem.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// TLS configuration problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Socket or server problem.
    #[error("{0}")]
    Io(String),
}

/// Unseals the KEK through the configured seal and opens the store, refusing a KEK the
/// store was not written with. Nothing is written before the KEK is known to be the
/// store's: the sealed KEK and the KEK id are read without writing.
pub async fn open_state(cfg: &Config) -> Result<(Arc<Kek>, Arc<dyn KeyStore>), ServeError> {
    let backend: Box<dyn Backend> = match cfg.store.etcd() {
        Some(settings) => Box::new(EtcdBackend::connect(settings).await?),
        None => Box::new(RedbBackend::new(cfg.state_dir.join(STORE_FILE))),
    };
    let seal: Arc<dyn seal::Seal> = seal::from_config(&cfg.seal, &cfg.state_dir).into();
    let sealed = match seal.in_store() {
        true => Some(SealedKek::from_stored(
            backend
                .recorded_meta(META_SEALED_KEK)
                .await?
                .ok_or_else(|| SealError::NotSealed {
                    store: backend.location(),
                })?,
        )),
        false => None,
    };
    // The HSM (or the file) is blocking I/O: off the reactor.
    let s = seal.clone();
    let kek = tokio::task::spawn_blocking(move || s.unseal(sealed.as_ref()))
        .await
        .map_err(|e| ServeError::Io(e.to_string()))??;
    let kek = Arc::new(kek);
    if let Some(expected) = backend.recorded_kek_id().await? {
        if expected != kek.id() {
            return Err(ServeError::WrongKek {
                kek_path: seal.describe(),
                loaded: kek.id().to_string(),
                expected,
                store_path: backend.location(),
            });
        }
    }
    let store = backend.open().await?;
    if store.meta_get(META_KEK_ID).await?.is_none() {
        store.meta_put(META_KEK_ID, kek.id()).await?;
    }
    info!(seal = seal.kind(), kek_id = kek.id(), "KEK unsealed");
    Ok((kek, store))
}

/// A bound, ready broker.
pub struct Bound {
    listener: TcpListener,
    broker: Broker,
    cfg: Config,
    tls: Arc<rustls::ServerConfig>,
}

impl Bound {
    /// The address actually listened on.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener
            .local_addr()
            .map_err(|e| ServeError::Io(e.to_string()))
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING and drains.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Bound {
            listener,
            broker,
            cfg,
            tls,
        } = self;
        let (incoming, accept_loop) =
            tls::incoming_with(listener, tls, cfg.limits(), cfg.trust_domain.clone());

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<KeyBrokerServer<Broker>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nodecrypt_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Io(e.to_string()))?;
        let drain = Drain::new();
        let d = drain.clone();
        let signal = async move {
            shutdown.await;
            info!("shutting down: NOT_SERVING, draining in-flight calls");
            health.set_not_serving::<KeyBrokerServer<Broker>>().await;
            d.start();
        };
        let serve = Server::builder()
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(crate::conn::GrpcContractLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(KeyBrokerServer::new(broker))
            .serve_with_incoming_shutdown(incoming, signal);
        // In-flight calls get DRAIN_LIMIT to finish; idle client connections that never
        // hang up do not hold the shutdown any longer than that.
        let result = match drain.bounded(serve).await {
            Some(r) => r.map_err(|e| ServeError::Io(e.to_string())),
            None => Ok(()),
        };
        accept_loop.abort();
        result
    }
}

pub use nodecrypt_common::serve::DRAIN_LIMIT;

/// Checks state, binds the listener; serve with [`Bound::serve`].
pub async fn bind(cfg: Config) -> Result<Bound, ServeError> {
    let tls = Arc::new(tls::server_config(&cfg.tls)?);
    let (kek, store) = open_state(&cfg).await?;
    let audit = AuditLog::open(&cfg.audit_path(), cfg.audit_fsync, cfg.audit_commit_delay())?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServeError::Io(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let broker = Broker::new(store, kek.clone(), audit).with_policy(crate::authz::Policy {
        allow_recovery_reads: cfg.allow_recovery_reads,
    });
    if cfg.allow_recovery_reads {
        tracing::warn!("allow_recovery_reads is on: recovery identities may read any volume's key (each read audited)");
    }
    crate::process::check_fd_budget(cfg.max_connections);
    info!(listen = %listener.local_addr().map_err(|e| ServeError::Io(e.to_string()))?, kek_id = kek.id(), "key broker ready");
    Ok(Bound {
        listener,
        broker,
        cfg,
        tls,
    })
}
