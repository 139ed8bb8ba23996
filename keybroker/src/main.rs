//! `nodecrypt-keybroker`: argument parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nodecrypt_keybroker::seal::{init, status};
use nodecrypt_keybroker::{audit, client, config::Config, pki, server, tls, wrap::Kek};
use nodecrypt_proto::keybroker::v1 as pb;

/// The nodecrypt key broker.
#[derive(Parser)]
#[command(version, about, after_help = "Exit codes: 0 ok, 1 error, 2 usage.")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new 256-bit KEK, sealed. `--seal file` (the default): the state directory
    /// (0700) and a KEK file in it (0600). `--seal pkcs11`: the KEK sealed by the HSM key
    /// the config's [seal] section names, stored in the key store; idempotent (an existing
    /// sealed KEK is checked and left as it is). Never overwrites a KEK.
    Init {
        /// State directory (`--seal file`; or taken from --config).
        #[arg(long, required_unless_present = "config")]
        state_dir: Option<PathBuf>,
        /// How to seal the KEK.
        #[arg(long, default_value = "file", value_parser = ["file", "pkcs11"])]
        seal: String,
        /// Broker configuration (required with `--seal pkcs11`: its [seal] section names
        /// the module, token, key and PIN file).
        #[arg(long)]
        config: Option<PathBuf>,
        /// pkcs11: create the wrapping key in the token first (AES-256, sensitive, not
        /// extractable); refused if a key of that label exists.
        #[arg(long)]
        create_key: bool,
        /// pkcs11: seal the KEK of this KEK file instead of a new one (moving a
        /// file-sealed store to the HSM; shred the file afterwards).
        #[arg(long)]
        import_kek: Option<PathBuf>,
    },
    /// The seal, whether the HSM answers, the KEK's id, and wrapped keys per KEK id (run
    /// while the broker is stopped: it holds the store's lock). No key material. Exit 1
    /// unless the broker would start.
    Status {
        /// Broker configuration.
        #[arg(long)]
        config: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the KeyBroker gRPC API (TLS 1.3, client certificates required).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Administration over gRPC with an admin identity (the cluster manager's commands):
    /// admins manage volumes and never read keys.
    Admin(AdminArgs),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create (or complete) a dev CA with broker, node, admin and recovery certificates.
    Init {
        /// Output directory (0700).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Node names (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Admin names (repeatable): manage volumes, never read keys.
        #[arg(long = "admin")]
        admins: Vec<String>,
        /// Break-glass recovery names (repeatable): `spiffe://TD/recovery/NAME`, which may
        /// read any volume's key only where the broker sets `allow_recovery_reads`.
        #[arg(long = "recovery")]
        recovery: Vec<String>,
        /// Extra DNS names or IPs for the broker certificate (repeatable).
        #[arg(long = "broker-dns")]
        broker_dns: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain; names the first bad line.
    Verify {
        /// The audit log.
        #[arg(long)]
        log: PathBuf,
    },
}

#[derive(Parser)]
struct AdminArgs {
    /// Broker endpoint host:port.
    #[arg(long)]
    endpoint: String,
    /// Admin certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Admin private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// One JSON document on stdout.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// List volumes (all, or one node's).
    List {
        /// Only this node's volumes.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show one volume's metadata.
    Describe {
        /// Volume id.
        volume_id: String,
    },
    /// Bind a volume to another node (VM migration).
    Rebind {
        /// Volume id.
        volume_id: String,
        /// The new node.
        #[arg(long)]
        to: String,
        /// Refuse unless currently bound to this node.
        #[arg(long)]
        from: Option<String>,
    },
    /// Destroy every key version of a volume (crypto-erase). Irreversible.
    Destroy {
        /// Volume id.
        volume_id: String,
        /// Reason recorded in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Required: confirms the data becomes unrecoverable.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    tls::install_default_provider();
    let cli = Cli::parse();
    nodecrypt_common::logging::init(&cli.log_format, &[]);
    // No core dumps and no ptrace by non-root, for every command; no key page in swap for
    // the ones that hold keys (serve: the KEK and unwrapped keys; init: the new KEK;
    // status: the KEK, unsealed to learn its id). The
    // others (an operator's admin CLI, pki, audit verify) hold none and stay quiet.
    match cli.cmd {
        Cmd::Serve { .. } | Cmd::Init { .. } | Cmd::Status { .. } => {
            nodecrypt_keybroker::process::harden()
        }
        _ => nodecrypt_keybroker::process::non_dumpable(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodecrypt-keybroker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Init {
            state_dir,
            seal,
            config,
            create_key,
            import_kek,
        } => init(state_dir, &seal, config, create_key, import_kek).await,
        Cmd::Status { config, json } => {
            let st = status::status(&Config::load(&config)?).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", st.human());
            }
            anyhow::ensure!(
                st.ok,
                "the broker would not start with {}",
                config.display()
            );
            Ok(())
        }
        Cmd::Serve { config } => serve(Config::load(&config)?).await,
        Cmd::Pki {
            cmd:
                PkiCmd::Init {
                    dir,
                    trust_domain,
                    nodes,
                    admins,
                    recovery,
                    broker_dns,
                },
        } => {
            let created = pki::init(&pki::PkiRequest {
                dir: dir.clone(),
                trust_domain,
                nodes,
                admins,
                recovery,
                broker_dns,
            })?;
            for c in &created {
                println!("created {}", c.display());
            }
            if created.is_empty() {
                println!(
                    "nothing to do: every certificate exists in {}",
                    dir.display()
                );
            }
            Ok(())
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { log },
        } => {
            let n = audit::verify(&log).map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
            println!("{}: {n} lines, hash chain intact", log.display());
            Ok(())
        }
        Cmd::Admin(args) => admin(args).await,
    }
}

async fn init(
    state_dir: Option<PathBuf>,
    seal: &str,
    config: Option<PathBuf>,
    create_key: bool,
    import_kek: Option<PathBuf>,
) -> anyhow::Result<()> {
    if seal == "file" {
        anyhow::ensure!(
            !create_key && import_kek.is_none(),
            "--create-key and --import-kek go with --seal pkcs11"
        );
        let state_dir = match (state_dir, config) {
            (Some(d), _) => d,
            (None, Some(c)) => Config::load(&c)?.state_dir,
            (None, None) => anyhow::bail!("--state-dir or --config is required"),
        };
        let kek = Kek::create(&state_dir)?;
        println!("created KEK {} in {}", kek.id(), state_dir.display());
        return Ok(());
    }
    let config = config.context("--seal pkcs11 needs --config (its [seal] section)")?;
    anyhow::ensure!(
        state_dir.is_none(),
        "--seal pkcs11 takes the state directory from --config, not --state-dir"
    );
    let cfg = Config::load(&config)?;
    match init::init_pkcs11(&cfg, &config, create_key, import_kek.as_deref()).await? {
        init::InitOutcome::AlreadySealed { kek_id } => println!(
            "nothing to do: the store in {} already holds sealed KEK {kek_id}, and it unseals",
            cfg.state_dir.display()
        ),
        init::InitOutcome::Sealed {
            kek_id,
            created_key,
            imported,
        } => {
            if created_key {
                println!("created the wrapping key in the HSM");
            }
            println!(
                "sealed {} KEK {kek_id} into the store in {}",
                if imported { "imported" } else { "new" },
                cfg.state_dir.display()
            );
            if let Some(f) = import_kek {
                println!(
                    "the KEK file {} is no longer needed: shred it (shred -u)",
                    f.display()
                );
            }
        }
    }
    Ok(())
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let bound = server::bind(cfg).await?;
    let addr = bound.local_addr()?;
    // The handlers exist before anyone is told we are ready: a SIGTERM right after
    // readiness is a graceful stop (store closed), not the default action's kill.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // Readiness for scripts and tests (stdout) and for systemd (sd_notify).
    println!(
        "{}",
        serde_json::json!({ "ready": true, "listen": addr.to_string() })
    );
    let _ = sd_notify_ready();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        let _ = sd_notify_stopping();
    };
    bound.serve(shutdown).await?;
    Ok(())
}

fn sd_notify_ready() -> std::io::Result<()> {
    sd_notify::notify(&[sd_notify::NotifyState::Ready])
}

fn sd_notify_stopping() -> std::io::Result<()> {
    sd_notify::notify(&[sd_notify::NotifyState::Stopping])
}

async fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let files = tls::TlsFiles {
        cert: a.cert,
        key: a.key,
        ca: a.ca,
    };
    let cfg = Arc::new(tls::client_config(&files)?);
    let ch = client::channel(&a.endpoint, cfg, client::Deadlines::default())?;
    let mut c = pb::key_broker_client::KeyBrokerClient::new(ch);
    let ctx = || format!("broker {}", a.endpoint);
    let infos: Vec<pb::VolumeInfo> = match a.cmd {
        AdminCmd::List { node } => {
            c.list_volume_keys(pb::ListVolumeKeysRequest {
                node_id: node.unwrap_or_default(),
            })
            .await
            .with_context(ctx)?
            .into_inner()
            .volumes
        }
        AdminCmd::Describe { volume_id } => {
            vec![c
                .describe_volume(pb::DescribeVolumeRequest { volume_id })
                .await
                .with_context(ctx)?
                .into_inner()]
        }
        AdminCmd::Rebind {
            volume_id,
            to,
            from,
        } => vec![c
            .rebind_volume_key(pb::RebindVolumeKeyRequest {
                volume_id,
                new_node_id: to,
                expected_node_id: from.unwrap_or_default(),
            })
            .await
            .with_context(ctx)?
            .into_inner()],
        AdminCmd::Destroy {
            volume_id,
            reason,
            yes,
        } => {
            anyhow::ensure!(
                yes,
                "destroying {volume_id}'s key makes its data unrecoverable; pass --yes to confirm"
            );
            vec![c
                .destroy_volume_key(pb::DestroyVolumeKeyRequest { volume_id, reason })
                .await
                .with_context(ctx)?
                .into_inner()]
        }
    };
    if a.json {
        let docs: Vec<_> = infos.iter().map(info_json).collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
    } else {
        for i in &infos {
            let state = if i.destroyed_at.is_empty() {
                "active".to_string()
            } else {
                format!("destroyed at {}", i.destroyed_at)
            };
            println!(
                "{}  node={}  version={}  {}",
                i.volume_id, i.node_id, i.current_version, state
            );
        }
    }
    Ok(())
}

fn info_json(i: &pb::VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "volume_id": i.volume_id,
        "node_id": i.node_id,
        "current_version": i.current_version,
        "versions": i.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "state": pb::KeyState::try_from(v.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
            "created_at": v.created_at,
            "retired_at": v.retired_at,
        })).collect::<Vec<_>>(),
        "labels": i.labels,
        "created_at": i.created_at,
        "destroyed_at": i.destroyed_at,
        "kek_id": i.kek_id,
    })
}
