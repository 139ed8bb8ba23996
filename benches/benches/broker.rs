//! Key broker throughput and latency, end to end over loopback.
//!
//! Starts the real `nodecrypt-keybroker` binary (the release build in the same target
//! directory: `make bench` builds it first) with a dev PKI in a temporary directory, has
//! every client create its volumes, then runs 64 concurrent mTLS clients, each on its own
//! connection with its own node identity, for a fixed time:
//!
//! - `GetVolumeKey` round-robin over the client's volumes (store read, KEK unwrap,
//!   authorization, one audit line), and
//! - the peer measured in the same run by the same clients on the same connections:
//!   `grpc.health.v1.Health/Check` (TLS, HTTP/2 and gRPC only: no crypto, no store, no
//!   audit), so `keys/s ÷ health/s` says how much of the transport's capacity a key fetch
//!   leaves.
//!
//! Each flat out (closed loop: a client sends its next call when the last is answered,
//! the "64 concurrent clients"), then paced at the goal's 10,000 calls/s offered
//! in all (open loop by default: each call sent when due, whatever is still in flight;
//! latency counted from the scheduled send, so a stall is charged to every call it holds
//! up, where a closed loop would just send fewer). Both with the audit log fsynced before
//! each answer (the default) and without (`audit_fsync = false`). Writes
//! `target/bench/broker.json` and prints a table.
//!
//! The load generator shares the machine's cores with the broker, so what the clients
//! spend per call is taken from the broker. By default each client is the generated
//! tonic client over a lean transport ([`lean`]): one HTTP/2 connection driven with `h2`
//! directly, each request sent from the caller's task. `NODECRYPT_BENCH_CLIENT=channel`
//! uses tonic's `Channel` instead (what the agent uses: reconnects, a `Buffer` task hop
//! per request), which costs about as much CPU per call as the broker does.
//!
//! Knobs (environment): `NODECRYPT_BENCH_SECONDS` (default 10 per phase),
//! `NODECRYPT_BENCH_CLIENTS` (64), `NODECRYPT_BENCH_VOLUMES` (1024 in all),
//! `NODECRYPT_BENCH_FSYNC` (`both`, `on` or `off`), `NODECRYPT_BENCH_BROKER` (another
//! broker binary, for comparing two builds in interleaved runs), `NODECRYPT_BENCH_CLIENT`
//! (`lean` or `channel`), `NODECRYPT_BENCH_RATE` (the paced phases' calls/s, default the
//! goal's 10,000), `NODECRYPT_BENCH_PACED` (`open` or `serial`), `NODECRYPT_BENCH_AUDIT_DIR`
//! (where the audit log goes instead of the state directory: tmpfs, another disk),
//! `NODECRYPT_BENCH_COMMIT_DELAY_US` (the audit log's group-commit delay; default the
//! broker's), `NODECRYPT_BENCH_CLIENT_THREADS` (the load generator's tokio worker threads;
//! unset, tokio's `TOKIO_WORKER_THREADS` or one per core). The broker's runtime reads
//! `TOKIO_WORKER_THREADS` from the environment it inherits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodecrypt_keybroker::{client, tls};
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{profile_dir, run_with_deadline, spawn_ready, stop_within};
use pb::key_broker_client::KeyBrokerClient;
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TRUST_DOMAIN: &str = "bench.nodecrypt.test";
/// Goal on the 2-core reference machine (issue 2).
const GOAL_KEYS_PER_SEC: f64 = 10_000.0;
const GOAL_P99_MS: f64 = 10.0;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs a command to completion with a deadline; panics with its output on failure.
fn run_ok(cmd: &mut Command, deadline: Duration) {
    let out = run_with_deadline(cmd, deadline);
    assert!(out.status.success(), "{cmd:?} failed: {out:?}");
}

/// A broker process; SIGTERM (then SIGKILL past 10 s) on drop.
struct Broker {
    child: Option<Child>,
    addr: String,
    /// An audit log outside the bench's temporary directory, removed on drop.
    audit_log: Option<PathBuf>,
}

impl Broker {
    fn start(bin: &Path, dir: &Path, fsync: bool) -> Self {
        let pki = dir.join("pki");
        let state = dir.join(format!("state-fsync-{fsync}"));
        run_ok(
            Command::new(bin).args(["init", "--state-dir"]).arg(&state),
            Duration::from_secs(30),
        );
        let config = dir.join(format!("broker-fsync-{fsync}.toml"));
        // NODECRYPT_BENCH_AUDIT_DIR: the audit log on other storage (tmpfs, another disk),
        // to see what the flush costs.
        let audit_log = std::env::var_os("NODECRYPT_BENCH_AUDIT_DIR").map(|d| {
            let log = Path::new(&d).join(format!(
                "nodecrypt-bench-audit-{}-fsync-{fsync}.log",
                std::process::id()
            ));
            let _ = fs::remove_file(&log);
            log
        });
        let mut audit_line = audit_log.as_ref().map_or(String::new(), |l| {
            format!("audit_log = \"{}\"\n", l.display())
        });
        // NODECRYPT_BENCH_COMMIT_DELAY_US: the audit log's group-commit delay (the
        // broker's default when unset).
        if let Ok(us) = std::env::var("NODECRYPT_BENCH_COMMIT_DELAY_US") {
            let us: u64 = us
                .parse()
                .unwrap_or_else(|_| panic!("NODECRYPT_BENCH_COMMIT_DELAY_US={us:?}: microseconds"));
            audit_line.push_str(&format!("audit_commit_delay_us = {us}\n"));
        }
        fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{}\"\n\
                 audit_fsync = {fsync}\n{audit_line}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
                state.display(),
                pki.join("broker.pem").display(),
                pki.join("broker.key").display(),
                pki.join("ca.pem").display(),
            ),
        )
        .expect("write broker config");
        let log = fs::File::create(dir.join(format!("broker-fsync-{fsync}.log"))).unwrap();
        let (child, line) = spawn_ready(
            Command::new(bin)
                .args(["--log-format", "json", "serve", "--config"])
                .arg(&config)
                .stderr(log),
            Duration::from_secs(60),
        );
        let mut broker = Self {
            child: Some(child),
            addr: String::new(),
            audit_log,
        };
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("broker did not become ready; see {}", dir.display()));
        broker.addr = ready["listen"].as_str().expect("listen").to_string();
        broker
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// CPU time (user + system) the broker has used so far.
    fn cpu(&self) -> Duration {
        proc_cpu(self.pid())
    }
}

/// CPU time (user + system, all threads) process `pid` has used so far.
fn proc_cpu(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

impl Drop for Broker {
    fn drop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        let _ = stop_within(child, Duration::from_secs(10));
        if let Some(log) = &self.audit_log {
            let _ = fs::remove_file(log);
        }
    }
}

/// A boxed error, as tonic's client traits take it.
type StdError = Box<dyn std::error::Error + Send + Sync>;

/// The load generator's transport: the generated tonic clients over one HTTP/2
/// connection driven with `h2` directly. Same TLS 1.3 client config, same HTTP/2 and gRPC
/// framing as tonic's `Channel`, but a request is sent from the caller's task and its
/// answer read there too: no `Buffer` worker, no per-request dispatch or body-pipe tasks.
/// Unary calls only (the request body is gathered before it is sent).
mod lean {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{ready, Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use rustls::pki_types::ServerName;
    use tokio::net::TcpStream;

    use super::StdError;

    /// A handle on one HTTP/2 connection; clones share it. (The bench puts its deadline
    /// around each whole call, body and trailers included.)
    #[derive(Clone)]
    pub struct H2 {
        send: h2::client::SendRequest<Bytes>,
    }

    /// TCP connect, TLS handshake and HTTP/2 handshake to `addr` (`ip:port`), within
    /// `deadline`; the connection is driven by a task on the current runtime.
    pub async fn connect(
        addr: &str,
        tls: Arc<rustls::ClientConfig>,
        deadline: Duration,
    ) -> Result<H2, StdError> {
        let connect = async {
            let sock: std::net::SocketAddr = addr.parse()?;
            let tcp = TcpStream::connect(sock).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(sock.ip().into());
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            let (send, conn) = h2::client::handshake(tls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    eprintln!("bench connection {e}");
                }
            });
            Ok::<_, StdError>(H2 { send })
        };
        tokio::time::timeout(deadline, connect)
            .await
            .map_err(|_| format!("connect to {addr} took longer than {deadline:?}"))?
    }

    impl tower::Service<http::Request<tonic::body::Body>> for H2 {
        type Response = http::Response<Recv>;
        type Error = StdError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, StdError>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StdError>> {
            self.send.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let send = self.send.clone();
            let call = async move {
                let (parts, mut body) = req.into_parts();
                let mut data = Vec::with_capacity(1);
                while let Some(frame) = body.frame().await {
                    if let Ok(d) = frame?.into_data() {
                        data.push(d);
                    }
                }
                let mut send = send.ready().await?;
                let (answer, mut stream) =
                    send.send_request(http::Request::from_parts(parts, ()), data.is_empty())?;
                let n = data.len();
                for (i, d) in data.into_iter().enumerate() {
                    stream.send_data(d, i + 1 == n)?;
                }
                Ok::<_, StdError>(answer.await?.map(|body| Recv {
                    body,
                    data_done: false,
                }))
            };
            Box::pin(call)
        }
    }

    /// A response body: the DATA frames, then the trailers (where gRPC puts its status).
    pub struct Recv {
        body: h2::RecvStream,
        data_done: bool,
    }

    impl http_body::Body for Recv {
        type Data = Bytes;
        type Error = h2::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
            let this = self.get_mut();
            if !this.data_done {
                match ready!(this.body.poll_data(cx)) {
                    Some(Ok(d)) => {
                        // Give the window back, or a long run stalls on flow control.
                        this.body.flow_control().release_capacity(d.len())?;
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    None => this.data_done = true,
                }
            }
            Poll::Ready(
                ready!(this.body.poll_trailers(cx))
                    .transpose()
                    .map(|t| t.map(Frame::trailers)),
            )
        }

        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }
    }
}

/// What the bench's clients can run on: tonic's `Channel` or the [`lean`] transport.
trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<StdError>,
        Future: Send,
        ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<StdError>,
            Future: Send,
            ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<StdError> + Send>
                              + Send
                              + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// One benchmark client: its own connection and node identity, its own volumes.
#[derive(Clone)]
struct BenchClient<T> {
    keys: KeyBrokerClient<T>,
    health: HealthClient<T>,
    volumes: Arc<Vec<String>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    GetVolumeKey,
    HealthCheck,
}

/// Percentile `p` (0..=1) of sorted microseconds, in ms.
fn pct_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// What a phase measured.
struct Stats {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    broker_cpu: Duration,
    client_cpu: Duration,
    /// Latencies in microseconds, sorted.
    lat_us: Vec<u32>,
    /// Paced phases: how late each send left after its scheduled time (the load
    /// generator's own timer and scheduling, included in `lat_us`), µs, sorted.
    lag_us: Vec<u32>,
}

impl Stats {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct_ms(&self, p: f64) -> f64 {
        pct_ms(&self.lat_us, p)
    }
    fn cpu_us_per_op(&self) -> f64 {
        self.broker_cpu.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }
    fn client_cpu_us_per_op(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }
    /// What `cpus` otherwise idle cores would sustain if broker and clients were CPU
    /// bound at the CPU cost per call measured here (a model, not a measurement: on a
    /// shared machine the measured rate is whatever CPU the other tenants left).
    fn cpu_bound_ceiling(&self, cpus: usize) -> f64 {
        cpus as f64 * 1e6 / (self.cpu_us_per_op() + self.client_cpu_us_per_op())
    }
    fn json(&self, cpus: usize) -> serde_json::Value {
        json!({
            "ops": self.ops,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "per_sec": self.per_sec(),
            "p50_ms": self.pct_ms(0.50),
            "p99_ms": self.pct_ms(0.99),
            "max_ms": self.pct_ms(1.0),
            "send_lag_p99_ms": pct_ms(&self.lag_us, 0.99),
            "broker_cpu_seconds": self.broker_cpu.as_secs_f64(),
            "broker_cpu_us_per_op": self.cpu_us_per_op(),
            "client_cpu_seconds": self.client_cpu.as_secs_f64(),
            "client_cpu_us_per_op": self.client_cpu_us_per_op(),
            "loadavg_1m_after": loadavg_1m(),
            "cpu_bound_ceiling_per_sec": self.cpu_bound_ceiling(cpus),
        })
    }
}

/// How a phase loads the broker.
#[derive(Clone, Copy)]
enum Load {
    /// Closed loop: each client sends its next call as soon as the last one is answered
    /// (what the broker sustains flat out; latency is then the queue the 64 clients make).
    Saturate,
    /// `calls_per_sec` offered in all, each client sending on its own fixed schedule
    /// (staggered). Latency is counted from the *scheduled* send, so a call sent late
    /// because the load generator was held up is charged for the wait (no coordinated
    /// omission), and the throughput is the scheduled rate only if every call completed.
    Paced {
        calls_per_sec: f64,
        /// One call in flight per client (a caller that waits for each answer), or each
        /// call sent when due whatever is still in flight on the connection (independent
        /// callers behind each connection: open loop, HTTP/2 streams side by side).
        serial: bool,
    },
}

/// One call; whether it returned what it should.
async fn one_call<T: Transport>(c: &mut BenchClient<T>, call: Call, i: usize) -> bool {
    match call {
        Call::GetVolumeKey => {
            let volume_id = c.volumes[i % c.volumes.len()].clone();
            let req = pb::GetVolumeKeyRequest {
                volume_id,
                version: 0,
            };
            // The key is dropped unread: only its arrival is measured.
            let call = c.keys.get_volume_key(req);
            matches!(tokio::time::timeout(DEADLINE, call).await,
                Ok(Ok(r)) if r.get_ref().key.len() == 64)
        }
        Call::HealthCheck => {
            let req = HealthCheckRequest {
                service: String::new(),
            };
            let call = c.health.check(req);
            matches!(tokio::time::timeout(DEADLINE, call).await, Ok(Ok(_)))
        }
    }
}

/// Microseconds since `t0`, saturating.
fn us_since(t0: Instant) -> u32 {
    t0.elapsed().as_micros().min(u32::MAX as u128) as u32
}

async fn phase<T: Transport>(
    broker: &Broker,
    clients: &[BenchClient<T>],
    call: Call,
    dur: Duration,
    load: Load,
) -> Stats {
    let (cpu0, me0) = (broker.cpu(), proc_cpu(std::process::id()));
    let start = Instant::now();
    let end = start + dur;
    let n = clients.len();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .enumerate()
        .map(|(j, mut c)| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut lag = Vec::new();
                let mut errors = 0u64;
                let mut record = |ok: bool, us: u32| {
                    if ok {
                        lat.push(us);
                    } else {
                        errors += 1;
                    }
                };
                match load {
                    Load::Saturate => {
                        let mut i = 0;
                        while Instant::now() < end {
                            let t0 = Instant::now();
                            let ok = one_call(&mut c, call, i).await;
                            record(ok, us_since(t0));
                            i += 1;
                        }
                    }
                    Load::Paced {
                        calls_per_sec,
                        serial,
                    } => {
                        // Client j's sends are due at start + (j + k·n) / rate.
                        let period = Duration::from_secs_f64(n as f64 / calls_per_sec);
                        let mut due = start + Duration::from_secs_f64(j as f64 / calls_per_sec);
                        let mut in_flight = Vec::new();
                        let mut i = 0;
                        while due < end {
                            tokio::time::sleep_until(due.into()).await;
                            lag.push(us_since(due));
                            if serial {
                                let ok = one_call(&mut c, call, i).await;
                                record(ok, us_since(due));
                            } else {
                                let (mut c, t0) = (c.clone(), due);
                                in_flight.push(tokio::spawn(async move {
                                    let ok = one_call(&mut c, call, i).await;
                                    (ok, us_since(t0))
                                }));
                            }
                            due += period;
                            i += 1;
                        }
                        for t in in_flight {
                            let (ok, us) = t.await.expect("call task");
                            record(ok, us);
                        }
                    }
                }
                (lat, lag, errors)
            })
        })
        .collect();
    let mut lat_us = Vec::new();
    let mut lag_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, g, e) = t.await.expect("client task");
        lat_us.extend(l);
        lag_us.extend(g);
        errors += e;
    }
    let finished = start.elapsed();
    let broker_cpu = broker.cpu() - cpu0;
    let client_cpu = proc_cpu(std::process::id()) - me0;
    lat_us.sort_unstable();
    lag_us.sort_unstable();
    Stats {
        ops: lat_us.len() as u64,
        errors,
        // Paced: the calls scheduled in `dur`, each answered (late ones are charged in
        // their latency); closed loop: the time it took.
        elapsed: match load {
            Load::Saturate => finished,
            Load::Paced { .. } => dur,
        },
        broker_cpu,
        client_cpu,
        lat_us,
        lag_us,
    }
}

/// Which transport the clients use (`NODECRYPT_BENCH_CLIENT`).
#[derive(Clone, Copy, PartialEq)]
enum ClientKind {
    Lean,
    Channel,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            Self::Lean => "lean (h2 from the caller's task)",
            Self::Channel => "tonic Channel",
        }
    }
}

/// Client `i`'s TLS config (its own node certificate) and its volume names.
fn identity(
    dir: &Path,
    i: usize,
    per_client: usize,
) -> (Arc<rustls::ClientConfig>, Arc<Vec<String>>) {
    let files = tls::TlsFiles {
        cert: dir.join(format!("pki/node-n{i}.pem")),
        key: dir.join(format!("pki/node-n{i}.key")),
        ca: dir.join("pki/ca.pem"),
    };
    let cfg = Arc::new(tls::client_config(&files).expect("client TLS"));
    let volumes = (0..per_client)
        .map(|v| format!("bench-n{i}-v{v}"))
        .collect();
    (cfg, Arc::new(volumes))
}

/// Deadline of every connect and every request the bench makes.
const DEADLINE: Duration = Duration::from_secs(10);

/// Clients on tonic `Channel`s (lazy: connections open on first use, on the runtime
/// entered by the caller).
fn channel_clients(
    dir: &Path,
    broker: &Broker,
    n_clients: usize,
    volumes: usize,
) -> Vec<BenchClient<Channel>> {
    let per_client = volumes.div_ceil(n_clients);
    (0..n_clients)
        .map(|i| {
            let (cfg, volumes) = identity(dir, i, per_client);
            let deadlines = client::Deadlines {
                connect: DEADLINE,
                request: DEADLINE,
            };
            let ch = client::channel(&broker.addr, cfg, deadlines).expect("channel");
            BenchClient {
                keys: KeyBrokerClient::new(ch.clone()),
                health: HealthClient::new(ch),
                volumes,
            }
        })
        .collect()
}

/// Clients on [`lean`] connections (connected here).
async fn lean_clients(
    dir: &Path,
    broker: &Broker,
    n_clients: usize,
    volumes: usize,
) -> Vec<BenchClient<lean::H2>> {
    let per_client = volumes.div_ceil(n_clients);
    let origin: tonic::codegen::http::Uri =
        format!("https://{}", broker.addr).parse().expect("origin");
    let mut clients = Vec::with_capacity(n_clients);
    for i in 0..n_clients {
        let (cfg, volumes) = identity(dir, i, per_client);
        let h2 = lean::connect(&broker.addr, cfg, DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("client n{i}: {e}"));
        clients.push(BenchClient {
            keys: KeyBrokerClient::with_origin(h2.clone(), origin.clone()),
            health: HealthClient::with_origin(h2, origin.clone()),
            volumes,
        });
    }
    clients
}

/// What one broker run measured: each call flat out, and each paced at the goal rate.
struct Measured {
    health: Stats,
    keys: Stats,
    health_paced: Stats,
    keys_paced: Stats,
}

/// Creates the volumes, warms up, then measures the health peer and the key fetches,
/// flat out and then `paced`.
async fn measure<T: Transport>(
    broker: &Broker,
    clients: Vec<BenchClient<T>>,
    dur: Duration,
    paced: Load,
) -> Measured {
    create_volumes(&clients).await;
    // Warm-up: connections, handshakes, page cache, allocator.
    let warm = Duration::from_secs(1);
    phase(broker, &clients, Call::GetVolumeKey, warm, Load::Saturate).await;
    Measured {
        health: phase(broker, &clients, Call::HealthCheck, dur, Load::Saturate).await,
        keys: phase(broker, &clients, Call::GetVolumeKey, dur, Load::Saturate).await,
        health_paced: phase(broker, &clients, Call::HealthCheck, dur, paced).await,
        keys_paced: phase(broker, &clients, Call::GetVolumeKey, dur, paced).await,
    }
}

async fn create_volumes<T: Transport>(clients: &[BenchClient<T>]) {
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut c| {
            tokio::spawn(async move {
                for v in c.volumes.iter() {
                    let call = c.keys.create_volume_key(pb::CreateVolumeKeyRequest {
                        volume_id: v.clone(),
                        node_id: String::new(),
                        labels: Default::default(),
                    });
                    match tokio::time::timeout(DEADLINE, call).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => panic!("create {v}: {e}"),
                        Err(_) => panic!("create {v}: no answer within {DEADLINE:?}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("create task");
    }
}

/// The 1-minute load average: the reference machine is shared, so every figure says how
/// busy it was.
fn loadavg_1m() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn row(name: &str, s: &Stats, cpus: usize) {
    println!(
        "  {name:<20} {:>8.0} {:>7.2} {:>7.2} {:>8.2} {:>6} {:>12.1} {:>12.1} {:>9.0}",
        s.per_sec(),
        s.pct_ms(0.50),
        s.pct_ms(0.99),
        s.pct_ms(1.0),
        s.errors,
        s.cpu_us_per_op(),
        s.client_cpu_us_per_op(),
        s.cpu_bound_ceiling(cpus)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run either way.
    let seconds = env_or("NODECRYPT_BENCH_SECONDS", 10);
    let n_clients = env_or("NODECRYPT_BENCH_CLIENTS", 64) as usize;
    let n_volumes = env_or("NODECRYPT_BENCH_VOLUMES", 1024) as usize;
    let dur = Duration::from_secs(seconds);
    let rate = env_or("NODECRYPT_BENCH_RATE", GOAL_KEYS_PER_SEC as u64) as f64;
    let serial = match std::env::var("NODECRYPT_BENCH_PACED").as_deref() {
        Ok("open") | Err(_) => false,
        Ok("serial") => true,
        Ok(other) => panic!("NODECRYPT_BENCH_PACED={other:?}: use open or serial"),
    };
    let paced = Load::Paced {
        calls_per_sec: rate,
        serial,
    };

    tls::install_default_provider();
    let profile = profile_dir();
    let bin = std::env::var_os("NODECRYPT_BENCH_BROKER")
        .map_or_else(|| profile.join("nodecrypt-keybroker"), PathBuf::from);
    let fsync_modes: &[bool] = match std::env::var("NODECRYPT_BENCH_FSYNC").as_deref() {
        Ok("on") => &[true],
        Ok("off") => &[false],
        Ok("both") | Err(_) => &[true, false],
        Ok(other) => panic!("NODECRYPT_BENCH_FSYNC={other:?}: use both, on or off"),
    };
    let kind = match std::env::var("NODECRYPT_BENCH_CLIENT").as_deref() {
        Ok("lean") | Err(_) => ClientKind::Lean,
        Ok("channel") => ClientKind::Channel,
        Ok(other) => panic!("NODECRYPT_BENCH_CLIENT={other:?}: use lean or channel"),
    };
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --release -p nodecrypt-keybroker`, \
         which `make bench` runs)",
        bin.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("nodecrypt-bench")
        .tempdir()
        .expect("tempdir");
    let mut pki = Command::new(&bin);
    pki.args(["pki", "init", "--dir"])
        .arg(dir.path().join("pki"))
        .args(["--trust-domain", TRUST_DOMAIN]);
    for i in 0..n_clients {
        pki.arg("--node").arg(format!("n{i}"));
    }
    run_ok(&mut pki, Duration::from_secs(60));

    // The load generator's worker threads. Set here, they no longer follow
    // TOKIO_WORKER_THREADS, which the broker (spawned with this environment) then reads
    // alone; unset, both runtimes follow it (tokio's default: one per core).
    let client_threads: Option<usize> =
        std::env::var("NODECRYPT_BENCH_CLIENT_THREADS")
            .ok()
            .map(|n| {
                n.parse().ok().filter(|&n| n > 0).unwrap_or_else(|| {
                    panic!("NODECRYPT_BENCH_CLIENT_THREADS={n:?}: a thread count, 1 or more")
                })
            });
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = client_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().expect("runtime");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "broker bench: {n_clients} mTLS clients (own connection and node identity each; \
         transport: {}; {} client threads), {n_volumes} volumes, {seconds} s per phase, {cpus} CPUs shared \
         by clients and broker, load average {}",
        kind.name(),
        client_threads.map_or_else(|| "default".to_string(), |n| n.to_string()),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut runs = Vec::new();
    // The verdicts of the default config's run (audit fsync on): closed loop, paced.
    let (mut goal_met, mut goal_met_paced) = (None, None);
    let (mut peer_goal_met, mut peer_goal_met_paced) = (None, None);
    for &fsync in fsync_modes {
        let broker = Broker::start(&bin, dir.path(), fsync);
        let m = match kind {
            ClientKind::Lean => rt.block_on(async {
                let clients = lean_clients(dir.path(), &broker, n_clients, n_volumes).await;
                measure(&broker, clients, dur, paced).await
            }),
            ClientKind::Channel => {
                let clients = {
                    let _rt = rt.enter(); // lazy channels spawn their connection task on it
                    channel_clients(dir.path(), &broker, n_clients, n_volumes)
                };
                rt.block_on(measure(&broker, clients, dur, paced))
            }
        };
        drop(broker);
        let ratio = m.keys.per_sec() / m.health.per_sec();
        println!("\naudit_fsync = {fsync}");
        println!(
            "  {:<20} {:>8} {:>7} {:>7} {:>8} {:>6} {:>12} {:>12} {:>9}",
            "call",
            "per s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "broker µs/op",
            "client µs/op",
            "ceiling/s"
        );
        row("GetVolumeKey", &m.keys, cpus);
        row("Health/Check", &m.health, cpus);
        let at = format!("@ {rate:.0}/s");
        row(&format!("GetVolumeKey {at}"), &m.keys_paced, cpus);
        row(&format!("Health/Check {at}"), &m.health_paced, cpus);
        println!(
            "  flat out: keys/s ÷ health/s = {ratio:.2}; paced {at}: keys p99 ÷ health p99 = {:.2} \
             (send lag p99 {:.2} / {:.2} ms); 1-min load average after: {:.1}",
            m.keys_paced.pct_ms(0.99) / m.health_paced.pct_ms(0.99),
            pct_ms(&m.keys_paced.lag_us, 0.99),
            pct_ms(&m.health_paced.lag_us, 0.99),
            loadavg_1m()
        );
        // The goal as the issue states it: 64 concurrent clients (closed loop) get
        // ≥ 10,000 keys/s with p99 ≤ 10 ms. And the stricter reading beside it: with
        // 10,000 keys/s offered (paced, latency from the scheduled send), p99 ≤ 10 ms.
        let meets = |s: &Stats, offered: f64| {
            offered >= GOAL_KEYS_PER_SEC && s.pct_ms(0.99) <= GOAL_P99_MS && s.errors == 0
        };
        let (met, met_paced) = (meets(&m.keys, m.keys.per_sec()), meets(&m.keys_paced, rate));
        // The floor: the same goal applied to the no-op peer on the same connections in
        // the same run. Where a call that does nothing misses it, so must any key fetch,
        // and the miss belongs to the machine and the transport, not to the broker.
        let (peer_met, peer_met_paced) = (
            meets(&m.health, m.health.per_sec()),
            meets(&m.health_paced, rate),
        );
        if fsync {
            (goal_met, goal_met_paced) = (Some(met), Some(met_paced));
            (peer_goal_met, peer_goal_met_paced) = (Some(peer_met), Some(peer_met_paced));
        }
        runs.push(json!({
            "audit_fsync": fsync,
            "get_volume_key": m.keys.json(cpus),
            "health_check": m.health.json(cpus),
            "paced_calls_per_sec": rate,
            "get_volume_key_paced": m.keys_paced.json(cpus),
            "health_check_paced": m.health_paced.json(cpus),
            "keys_per_health": ratio,
            "goal_met": met,
            "goal_met_paced": met_paced,
            "peer_goal_met": peer_met,
            "peer_goal_met_paced": peer_met_paced,
        }));
    }
    let report = json!({
        "bench": "broker",
        "clients": n_clients,
        "client_transport": kind.name(),
        "client_threads": client_threads,
        "volumes": n_volumes,
        "seconds_per_phase": seconds,
        "paced_calls_per_sec": rate,
        "cpus": cpus,
        "loadavg_at_start": loadavg.trim(),
        "goal": {"keys_per_sec": GOAL_KEYS_PER_SEC, "p99_ms": GOAL_P99_MS,
                 "met_with_default_config": goal_met,
                 "met_paced_with_default_config": goal_met_paced,
                 "no_op_peer_met": peer_goal_met,
                 "no_op_peer_met_paced": peer_goal_met_paced},
        "runs": runs,
    });
    let out = profile.parent().expect("target dir").join("bench");
    fs::create_dir_all(&out).expect("target/bench");
    let path = out.join("broker.json");
    fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n")
        .expect("write broker.json");
    let verdict = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not run (audit_fsync = true is the default)",
    };
    println!(
        "\ngoal, default config: {GOAL_KEYS_PER_SEC} keys/s with p99 ≤ {GOAL_P99_MS} ms from \
         {n_clients} concurrent clients: {}; p99 ≤ {GOAL_P99_MS} ms with {GOAL_KEYS_PER_SEC} \
         keys/s offered: {}",
        verdict(goal_met),
        verdict(goal_met_paced),
    );
    println!(
        "the same goal for the no-op peer (Health/Check, same connections, same run): {}; \
         paced: {}",
        verdict(peer_goal_met),
        verdict(peer_goal_met_paced),
    );
    println!(
        "ceiling/s: what {cpus} otherwise idle cores would sustain at the measured CPU cost per \
         call (broker + clients); the measured rate is what other tenants left"
    );
    println!("wrote {}", path.display());
}
