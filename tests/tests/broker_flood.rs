//! 2,000 idle and half-open connections against the real broker while a good client
//! fetches keys: alone in its test binary (cargo runs test binaries one at a time), so
//! the latencies it compares are not skewed by other tests running beside it.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{client_for, Env};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn get(volume_id: &str) -> pb::GetVolumeKeyRequest {
    pb::GetVolumeKeyRequest {
        volume_id: volume_id.into(),
        version: 0,
    }
}

/// The broker unit's `LimitNOFILE` (what it runs with in production).
fn unit_nofile() -> u64 {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd/nodecrypt-keybroker.service");
    let text = fs::read_to_string(&unit).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .map(|v| v.trim().parse().expect("LimitNOFILE is a number"))
        // No line: systemd's default soft limit.
        .unwrap_or(1024)
}

/// Lets this test process hold thousands of sockets.
fn raise_own_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= want,
        "this test needs RLIMIT_NOFILE >= {want} (hard limit is {hard})"
    );
    setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
}

fn client_tls(env: &Env, stem: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(tls::client_config(&env.tls_files(stem)).unwrap())
}

/// One key fetch on a new connection (TCP, TLS, HTTP/2, the call), as a freshly started
/// `nodecrypt open` makes it.
async fn fresh_fetch(addr: &str, cfg: Arc<rustls::ClientConfig>, id: &str) -> Duration {
    let t = Instant::now();
    let mut c = client_for(addr, cfg);
    match c.get_volume_key(get(id)).await {
        Ok(_) => t.elapsed(),
        Err(s) => panic!("good client's call failed after {:?}: {s:?}", t.elapsed()),
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

async fn tls_connect(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_slow_a_good_client() {
    const CALLS: usize = 250;
    const FLOOD: usize = 2000;
    raise_own_nofile(8192);
    eprintln!("broker unit LimitNOFILE={}", unit_nofile());
    let env = Env::new();
    // Long deadlines, so that the whole flood is held during the measurement.
    env.set_broker_extra("handshake_timeout_ms = 60000\nfirst_request_timeout_ms = 60000");
    // Like the unit, unless this machine's hard limit is lower (said in the output).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let nofile = unit_nofile().min(hard);
    let limit = format!("--nofile={nofile}:{nofile}");
    let broker = env
        .try_start_broker_via("127.0.0.1:0", &["prlimit", &limit, "--"])
        .unwrap();
    let addr = broker.addr.clone();
    let good = client_tls(&env, "node-n1");
    env.client(&broker, "node-n1")
        .create_volume_key(pb::CreateVolumeKeyRequest {
            volume_id: "vol-p".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Warm-up, then the baseline.
    for _ in 0..10 {
        fresh_fetch(&addr, good.clone(), "vol-p").await;
    }
    let mut base = Vec::new();
    for _ in 0..CALLS {
        base.push(fresh_fetch(&addr, good.clone(), "vol-p").await);
    }

    // The flood: half TCP-only (no ClientHello ever), half TLS done and then silent.
    let mut tcp_only = Vec::new();
    for _ in 0..FLOOD / 2 {
        tcp_only.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    let silent_cfg = client_tls(&env, "node-n2");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..FLOOD / 2 {
        let (addr, cfg) = (addr.clone(), silent_cfg.clone());
        tasks.spawn(async move { tls_connect(&addr, cfg).await });
    }
    let mut silent = Vec::new();
    while let Some(r) = tasks.join_next().await {
        silent.push(r.unwrap().expect("flood TLS handshake"));
    }
    // The broker's side of each handshake (verifying the client certificate) ends after
    // ours: wait for its HTTP/2 SETTINGS on every silent connection, so the measurement
    // starts once the flood is fully established and idle.
    for s in &mut silent {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte))
            .await
            .expect("the broker's HTTP/2 preface within 30 s")
            .unwrap();
        assert_eq!(n, 1);
    }
    // The broker holds them all (each one a file descriptor).
    let until = Instant::now() + Duration::from_secs(30);
    while open_fds(broker.pid()) < FLOOD && Instant::now() < until {
        tokio::task::yield_now().await;
    }
    assert!(
        open_fds(broker.pid()) >= FLOOD,
        "the broker does not hold the flood: {} fds",
        open_fds(broker.pid())
    );

    let mut flooded = Vec::new();
    for _ in 0..CALLS {
        flooded.push(fresh_fetch(&addr, good.clone(), "vol-p").await);
    }
    let (b, f) = (p99(base), p99(flooded));
    let allowed = (b * 2).max(b + Duration::from_millis(20));
    eprintln!(
        "fresh-connection fetch p99: {b:?} without, {f:?} with {FLOOD} idle connections \
         (allowed {allowed:?}; broker nofile {nofile})"
    );
    assert!(
        f <= allowed,
        "p99 {f:?} with the flood, {b:?} without (allowed {allowed:?})"
    );
    drop((tcp_only, silent));
}
