//! `nodecrypt`: the command line for provisioning scripts and operators. Talks to the
//! agent's Unix socket; `bench` runs locally.
//!
//! Exit codes: [`nodecrypt_common::status::EXIT_CODES`], from the one status table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use nodecrypt_common::status::{self, EXIT_CODES};
use nodecrypt_proto::agent::v1 as pb;
use pb::agent_client::AgentClient;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// nodecrypt: LUKS2 volumes keyed by the platform's key broker.
#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The agent's Unix socket.
    #[arg(long, global = true, default_value = "/run/nodecrypt/agent.sock")]
    socket: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of the whole command (the agent's own broker deadline applies inside).
    #[arg(long, global = true, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format a device as a LUKS2 volume keyed by the broker (no-op if already done).
    Format {
        /// Absolute path of the block device.
        device: String,
        /// The volume id (1-63 of a-z, 0-9, '-').
        #[arg(long)]
        volume_id: String,
        /// Encryption sector size (default: 4096 when the device allows it).
        #[arg(long, value_parser = ["512", "4096"])]
        sector_size: Option<String>,
        /// Format even if the device carries a filesystem, partition table or LUKS header.
        #[arg(long)]
        force: bool,
    },
    /// Unlock and map a volume (already open is success).
    Open {
        /// The device (or use --volume-id).
        device: Option<String>,
        /// The volume id (the agent finds its device).
        #[arg(long)]
        volume_id: Option<String>,
        /// Mapping name (default nodecrypt-<volume-id>).
        #[arg(long)]
        name: Option<String>,
        /// Map through the agent's userspace engine instead of dm-crypt.
        #[arg(long)]
        userspace: bool,
        /// Pass discards (TRIM) through.
        #[arg(long)]
        allow_discards: bool,
    },
    /// Unmap a volume (already closed is success; in use is refused).
    Close {
        /// The volume id.
        #[arg(long)]
        volume_id: String,
    },
    /// Show one volume or all.
    Status {
        /// The volume id.
        #[arg(long)]
        volume_id: Option<String>,
    },
    /// Open every volume found on this node's devices (boot).
    UnlockAll,
    /// Move a volume to a new key version.
    Rotate {
        /// The volume id.
        #[arg(long)]
        volume_id: String,
    },
    /// Crypto-erase a closed volume: keyslots and header wiped, key destroyed at the broker.
    Erase {
        /// The volume id.
        #[arg(long)]
        volume_id: String,
        /// Confirm: the data is unrecoverable afterwards.
        #[arg(long)]
        yes: bool,
    },
    /// Check this node: kernel dm-crypt, CPU AES, broker reachability, certificates
    /// (exit 3 when a check fails).
    Doctor,
    /// Mend a LUKS2 header one of whose copies is damaged (or that disagree) by copying
    /// the intact copy over the other. Says what it would do; writes only with --yes.
    RepairHeader {
        /// Absolute path of the device.
        device: String,
        /// The copy to keep when both are intact but disagree: primary or secondary.
        #[arg(long, value_parser = ["primary", "secondary"])]
        from: Option<String>,
        /// Write the repair.
        #[arg(long)]
        yes: bool,
    },
    /// Measure the userspace XTS engine on this CPU (runs locally, no agent needed).
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// A failed command: its exit code, message, and (from the agent) the status code name
/// and a refusal's reason code.
struct Failure {
    exit: u8,
    message: String,
    code: Option<&'static str>,
    reason: Option<String>,
    /// The command already printed its one JSON document, which carries the outcome.
    reported: bool,
}

impl Failure {
    fn new(exit: u8, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            code: None,
            reason: None,
            reported: false,
        }
    }

    /// A failure whose `--json` document was already printed.
    fn reported(exit: u8, message: impl Into<String>) -> Self {
        Self {
            reported: true,
            ..Self::new(exit, message)
        }
    }

    fn from_status(s: tonic::Status) -> Self {
        let reason = s
            .metadata()
            .get(status::REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Self {
            exit: status::exit_code(s.code()),
            message: s.message().to_string(),
            code: Some(status::name(s.code())),
            reason,
            reported: false,
        }
    }
}

fn backend_name(b: i32) -> &'static str {
    match pb::Backend::try_from(b).unwrap_or(pb::Backend::Unspecified) {
        pb::Backend::DmCrypt => "dm-crypt",
        pb::Backend::Userspace => "userspace",
        pb::Backend::Auto => "auto",
        pb::Backend::Unspecified => "",
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::VolumeState::try_from(s).unwrap_or(pb::VolumeState::Unspecified) {
        pb::VolumeState::Open => "open",
        pb::VolumeState::Closed => "closed",
        pb::VolumeState::Erased => "erased",
        pb::VolumeState::Refused => "refused",
        pb::VolumeState::Unspecified => "unknown",
    }
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "volume_id": v.volume_id,
        "device": v.device,
        "state": state_name(v.state),
        "backend": backend_name(v.backend),
        "name": v.name,
        "mapped_device": v.mapped_device,
        "mapped_file": v.mapped_file,
        "key_version": v.key_version,
        "sector_size": v.sector_size,
        "cipher": v.cipher,
        "key_bits": v.key_bits,
        "luks_uuid": v.luks_uuid,
        "broker": v.broker,
        "data_size": v.data_size,
        "reason": v.reason,
        "message": v.problem,
    })
}

fn volume_line(v: &pb::Volume) -> String {
    let mut s = format!(
        "{}  {}  {}",
        if v.volume_id.is_empty() {
            "-"
        } else {
            &v.volume_id
        },
        state_name(v.state),
        v.device
    );
    if v.state == pb::VolumeState::Refused as i32 {
        s += &format!("  {}", v.problem);
    }
    if v.state == pb::VolumeState::Open as i32 {
        s += &format!("  backend={}", backend_name(v.backend));
        if !v.mapped_device.is_empty() {
            s += &format!("  mapped={}", v.mapped_device);
        }
        if !v.mapped_file.is_empty() {
            s += &format!("  file={}", v.mapped_file);
        }
    }
    if v.key_version > 0 {
        s += &format!(
            "  key_version={}  sector={}  {} {}-bit",
            v.key_version, v.sector_size, v.cipher, v.key_bits
        );
    }
    s
}

async fn connect(socket: PathBuf) -> Result<AgentClient<Channel>, Failure> {
    let path = socket.clone();
    let channel = Endpoint::from_static("http://agent.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| {
            let denied = std::error::Error::source(&e)
                .map(|s| s.to_string().contains("ermission denied"))
                .unwrap_or(false);
            Failure::new(
                if denied { 5 } else { 1 },
                format!(
                    "cannot reach the nodecrypt agent at {}: {e}{} (is nodecrypt-agent running? --socket overrides the path)",
                    socket.display(),
                    std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default()
                ),
            )
        })?;
    Ok(AgentClient::new(channel))
}

fn bench(seconds: f64, threads: usize) -> Vec<Value> {
    nodecrypt_xts::bench(seconds, threads)
        .into_iter()
        .map(|r| {
            json!({
                "backend": r.backend.name(), "sector_size": r.sector_size,
                "direction": serde_json::to_value(r.direction).unwrap_or_default(),
                "threads": r.threads, "bytes": r.bytes, "seconds": r.seconds,
                "gb_per_s": (r.gb_per_s * 1000.0).round() / 1000.0,
            })
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let (json_out, timeout) = (cli.json, cli.timeout);
    let result = match tokio::time::timeout(timeout, run(cli)).await {
        Ok(r) => r,
        Err(_) => Err(Failure {
            code: Some(status::name(tonic::Code::DeadlineExceeded)),
            ..Failure::new(
                status::exit_code(tonic::Code::DeadlineExceeded),
                format!(
                    "no answer within --timeout {}; the agent may still finish the operation (every flow is safe to re-run)",
                    humantime::format_duration(timeout)
                ),
            )
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("nodecrypt: {}", f.message);
            if json_out && !f.reported {
                println!(
                    "{}",
                    json!({"error": {
                        "code": f.code.unwrap_or("UNKNOWN"),
                        "exit": f.exit,
                        "reason": f.reason.unwrap_or_default(),
                        "message": f.message,
                    }})
                );
            }
            ExitCode::from(f.exit)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json_out = cli.json;
    if let Cmd::Bench { seconds, threads } = cli.cmd {
        if !(seconds > 0.0 && seconds <= 600.0) {
            return Err(Failure::new(2, "--seconds must be in (0, 600]"));
        }
        if threads == 0 || threads > 256 {
            return Err(Failure::new(2, "--threads must be in 1..=256"));
        }
        let rows = bench(seconds, threads);
        let chosen = nodecrypt_xts::Backend::selection();
        if json_out {
            println!("{}", json!({ "chosen": chosen, "results": rows }));
        } else {
            println!("chosen backend: {chosen}");
            for r in rows {
                println!(
                    "{:<9} sector {:>4}  {:<7}  {} thread(s)  {:>6.2} GB/s",
                    r["backend"].as_str().unwrap_or(""),
                    r["sector_size"],
                    r["direction"].as_str().unwrap_or(""),
                    r["threads"],
                    r["gb_per_s"].as_f64().unwrap_or(0.0)
                );
            }
        }
        return Ok(());
    }
    let mut c = connect(cli.socket.clone()).await?;
    let st = Failure::from_status;
    let print_volume = |verb: &str, v: &pb::Volume| {
        if json_out {
            println!("{}", volume_json(v));
        } else {
            println!("{verb}: {}", volume_line(v));
        }
    };
    match cli.cmd {
        Cmd::Format {
            device,
            volume_id,
            sector_size,
            force,
        } => {
            let v = c
                .format_volume(pb::FormatVolumeRequest {
                    device,
                    volume_id,
                    sector_size: sector_size.map(|s| s.parse().unwrap_or(0)).unwrap_or(0),
                    force,
                    labels: Default::default(),
                })
                .await
                .map_err(st)?
                .into_inner();
            print_volume("formatted", &v);
        }
        Cmd::Open {
            device,
            volume_id,
            name,
            userspace,
            allow_discards,
        } => {
            if device.is_none() == volume_id.is_none() {
                return Err(Failure::new(2, "give either a DEVICE or --volume-id"));
            }
            let v = c
                .open_volume(pb::OpenVolumeRequest {
                    device: device.unwrap_or_default(),
                    volume_id: volume_id.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    backend: if userspace {
                        pb::Backend::Userspace as i32
                    } else {
                        pb::Backend::Unspecified as i32
                    },
                    allow_discards,
                })
                .await
                .map_err(st)?
                .into_inner();
            print_volume("open", &v);
        }
        Cmd::Close { volume_id } => {
            let v = c
                .close_volume(pb::CloseVolumeRequest {
                    volume_id: volume_id.clone(),
                })
                .await
                .map_err(st)?
                .into_inner();
            if json_out {
                println!("{}", volume_json(&v));
            } else {
                println!("closed: {volume_id}");
            }
        }
        Cmd::Status { volume_id } => {
            let vols = match volume_id {
                Some(volume_id) => vec![c
                    .get_volume(pb::GetVolumeRequest { volume_id })
                    .await
                    .map_err(st)?
                    .into_inner()],
                None => {
                    c.list_volumes(pb::ListVolumesRequest {})
                        .await
                        .map_err(st)?
                        .into_inner()
                        .volumes
                }
            };
            if json_out {
                println!(
                    "{}",
                    json!({ "volumes": vols.iter().map(volume_json).collect::<Vec<_>>() })
                );
            } else if vols.is_empty() {
                println!("no nodecrypt volumes found");
            } else {
                for v in &vols {
                    println!("{}", volume_line(v));
                }
            }
        }
        Cmd::UnlockAll => {
            let r = c
                .unlock_all(pb::UnlockAllRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let failed = r.results.iter().filter(|x| !x.ok).count();
            if json_out {
                let rows: Vec<Value> = r
                    .results
                    .iter()
                    .map(|x| {
                        json!({
                            "volume_id": x.volume_id, "device": x.device, "ok": x.ok,
                            "code": x.code, "reason": x.reason, "message": x.message,
                            "duration_ms": x.duration_ms,
                            "volume": x.volume.as_ref().map(volume_json),
                        })
                    })
                    .collect();
                println!("{}", json!({ "results": rows, "failed": failed }));
            } else {
                for x in &r.results {
                    if x.ok {
                        println!(
                            "unlocked {} ({}) in {} ms",
                            x.volume_id, x.device, x.duration_ms
                        );
                    } else {
                        println!(
                            "FAILED {} ({}): {} {}",
                            x.volume_id, x.device, x.code, x.message
                        );
                    }
                }
                println!("{} volume(s), {} failed", r.results.len(), failed);
            }
            if failed > 0 {
                let worst = r
                    .results
                    .iter()
                    .filter(|x| !x.ok)
                    .map(|x| status::from_name(&x.code).map_or(1, status::exit_code))
                    .max()
                    .unwrap_or(1);
                return Err(Failure::reported(
                    worst,
                    format!("{failed} volume(s) failed to unlock"),
                ));
            }
        }
        Cmd::Rotate { volume_id } => {
            let v = c
                .rotate_volume(pb::RotateVolumeRequest { volume_id })
                .await
                .map_err(st)?
                .into_inner();
            print_volume("rotated", &v);
        }
        Cmd::Erase { volume_id, yes } => {
            if !yes {
                return Err(Failure::new(
                    2,
                    format!(
                        "erasing {volume_id} makes its data unrecoverable; pass --yes to confirm"
                    ),
                ));
            }
            let v = c
                .erase_volume(pb::EraseVolumeRequest {
                    volume_id,
                    confirm: true,
                })
                .await
                .map_err(st)?
                .into_inner();
            print_volume("erased", &v);
        }
        Cmd::Doctor => {
            let r = c
                .doctor(pb::DoctorRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let bad = r.checks.iter().filter(|x| !x.ok).count();
            if json_out {
                let rows: Vec<Value> = r
                    .checks
                    .iter()
                    .map(|x| json!({"name": x.name, "ok": x.ok, "detail": x.detail}))
                    .collect();
                println!("{}", json!({ "checks": rows, "ok": bad == 0 }));
            } else {
                for x in &r.checks {
                    println!(
                        "[{}] {}: {}",
                        if x.ok { " ok " } else { "FAIL" },
                        x.name,
                        x.detail
                    );
                }
            }
            if bad > 0 {
                return Err(Failure::reported(3, format!("{bad} check(s) failed")));
            }
        }
        Cmd::RepairHeader { device, from, yes } => {
            let r = c
                .repair_header(pb::RepairHeaderRequest {
                    device,
                    from: from.unwrap_or_default(),
                    confirm: yes,
                })
                .await
                .map_err(st)?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({
                        "device": r.device, "problem": r.problem, "from": r.from, "to": r.to,
                        "offset": r.offset, "length": r.length, "done": r.done,
                        "volume": r.volume.as_ref().map(volume_json),
                    })
                );
            } else if r.from.is_empty() {
                println!("{}: {}", r.device, r.problem);
            } else {
                println!(
                    "{}: {}\n{} the {} header copy over the {} copy ({} bytes at offset {})",
                    r.device,
                    r.problem,
                    if r.done { "copied" } else { "would copy" },
                    r.from,
                    r.to,
                    r.length,
                    r.offset
                );
            }
            if !r.done {
                return Err(Failure::reported(
                    2,
                    "nothing written: pass --yes to repair",
                ));
            }
        }
        Cmd::Bench { .. } => unreachable!("handled above"),
    }
    Ok(())
}
