//! `nodecrypt-agent --config FILE`: the privileged per-node daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nodecrypt_agent::config::Config;
use nodecrypt_agent::service::{Gate, Service};
use nodecrypt_agent::volume::Agent;
use nodecrypt_common::serve::Drain;
use nodecrypt_common::tls;
use nodecrypt_proto::agent::v1::agent_server::AgentServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tracing::info;

/// The nodecrypt node agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = "/etc/nodecrypt/agent.toml")]
    config: PathBuf,
    /// Log format on stderr: `json` or `text`.
    #[arg(long, default_value = "json")]
    log_format: String,
}

/// The agent unmounts a userspace mapping itself (so a busy mount is refused and the
/// mapping kept); fuser's session then finds it unmounted on drop and warns "Unmount
/// failed" for every close. That one module's warnings are noise here.
const QUIET: &[&str] = &["fuser::mnt=error"];

fn main() -> ExitCode {
    let args = Args::parse();
    nodecrypt_common::logging::init(&args.log_format, QUIET);
    // No core dumps, no ptrace by non-root, no key page in swap.
    nodecrypt_common::process::harden();
    nodecrypt_agent::luks::route_library_log();
    tls::install_default_provider();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodecrypt-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "nodecrypt-agent stopped");
            eprintln!("nodecrypt-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Connections the agent's TCP (mTLS) listener holds at once; more are closed right
/// after `accept` (its only client is the cluster manager).
const TCP_MAX_CONNECTIONS: usize = 256;

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        // A live agent answers; a stale socket from a crash does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is served by a running agent", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    let agent = Agent::new(cfg.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nodecrypt_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
    };
    let drain = Drain::new();
    let unix = bind_socket(&cfg.socket)?;
    let mut tasks = Vec::new();
    {
        let svc = AgentServer::new(Service::new(agent.clone(), Gate::RootPeer));
        let router = Server::builder()
            .add_service(health_svc.clone())
            .add_service(reflection()?)
            .add_service(svc);
        let stop = drain.signal();
        tasks.push(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stop)
                .await
        }));
    }
    let mut tcp_addr = None;
    if let Some(t) = &cfg.tcp {
        let files = tls::TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            ca: t.ca.clone(),
        };
        let server_cfg = Arc::new(tls::server_config(&files)?);
        let listener = TcpListener::bind(t.listen)
            .await
            .with_context(|| format!("listen on {}", t.listen))?;
        tcp_addr = Some(listener.local_addr()?.to_string());
        // Only the cluster manager calls here: a few connections, each bounded like the
        // broker's (nodecrypt_common::conn).
        let limits = nodecrypt_common::conn::Limits {
            handshake: Duration::from_secs(5),
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_connections: TCP_MAX_CONNECTIONS,
        };
        let (incoming, accept) =
            tls::incoming_with(listener, server_cfg, limits, t.trust_domain.clone());
        let svc = AgentServer::new(Service::new(agent.clone(), Gate::Admin));
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(nodecrypt_common::conn::GrpcContractLayer)
            .add_service(health_svc.clone())
            .add_service(reflection()?)
            .add_service(svc);
        let stop = drain.signal();
        tasks.push(tokio::spawn(async move {
            let r = router.serve_with_incoming_shutdown(incoming, stop).await;
            accept.abort();
            r
        }));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    println!(
        "{}",
        serde_json::json!({"socket": cfg.socket, "tcp": tcp_addr})
    );
    info!(socket = %cfg.socket.display(), tcp = ?tcp_addr, backend = ?cfg.backend, "nodecrypt agent ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    health.set_not_serving::<AgentServer<Service>>().await;
    drain.start();
    drain
        .bounded(async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    agent.shutdown();
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}
