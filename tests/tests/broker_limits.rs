//! The broker under adversity, end to end: a full state filesystem, the connection cap
//! and first-request deadline, and requests that break the gRPC wire contract. (The
//! 2,000-connection latency test is alone in broker_flood.rs, so that no other test's
//! load skews its measurement.)

use std::fs;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{
    assert_same_key, bin, client_for, run_ok, sparse_file, AgentOpts, Env, SmallFs,
};
use prost::Message;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

fn create(volume_id: &str) -> pb::CreateVolumeKeyRequest {
    pb::CreateVolumeKeyRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

fn get(volume_id: &str) -> pb::GetVolumeKeyRequest {
    pb::GetVolumeKeyRequest {
        volume_id: volume_id.into(),
        version: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_filesystem_is_survived_without_a_restart() {
    let env = Env::new();
    // Declared before the broker: dropped (unmounted, detached) after it stops.
    let small = SmallFs::new(&env.path().join("state.img"), &env.state(), 32);
    let broker = env.start_broker();
    let pid = broker.pid();
    let mut n1 = env.client(&broker, "node-n1");

    let mut keys = Vec::new();
    for i in 0..5 {
        let id = format!("vol-before-{i}");
        let k = n1
            .create_volume_key(create(&id))
            .await
            .unwrap()
            .into_inner();
        keys.push((id, k.key));
    }

    let filler = small.mountpoint.join("filler");
    small.fill(&filler);
    // Creates until the store itself reports the full disk (each new record needs new
    // pages; the first refusals may come from the audit log): bounded attempts.
    // Large labels make each record grow the store by ~2 KiB, past the pages its file
    // already has on disk.
    let labels: std::collections::HashMap<String, String> = (0..16)
        .map(|l| (format!("label-{l:02}-{}", "k".repeat(40)), "v".repeat(63)))
        .collect();
    let mut store_refusal = None;
    let mut others = std::collections::BTreeSet::new();
    for i in 0..1000 {
        let id = format!("vol-full-{i}");
        let req = pb::CreateVolumeKeyRequest {
            labels: labels.clone(),
            ..create(&id)
        };
        match n1.create_volume_key(req).await {
            Ok(k) => keys.push((id, k.into_inner().key)),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                if s.message().contains("key broker store") {
                    store_refusal = Some(s.message().to_string());
                    break;
                }
                others.insert(s.message().to_string());
            }
        }
    }
    let msg = store_refusal.unwrap_or_else(|| {
        panic!("the store never reported the full filesystem; refusals seen: {others:?}")
    });
    assert!(msg.contains("no space left on device"), "{msg}");
    assert!(msg.contains("keys.redb"), "names the store file: {msg}");
    assert!(msg.contains("free space"), "says what to do: {msg}");
    // Still full: refused again, with the same cause (not redb's "previous I/O error").
    let again = n1
        .create_volume_key(create("vol-still-full"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unavailable);
    assert!(
        !again.message().contains("Previous I/O"),
        "{}",
        again.message()
    );

    // The agent's final error carries the broker's cause.
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            unlock_deadline: "2s".into(),
            ..AgentOpts::default()
        },
    );
    let img = sparse_file(&env.path().join("a.img"), 64);
    let out = agent.cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-agent"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("no space left on device") && out.stderr.contains("free space"),
        "the agent's error does not carry the broker's cause: {out:?}"
    );
    drop(agent);

    fs::remove_file(&filler).unwrap();
    nix::unistd::sync();
    // Space is back: the same process serves creates again (a bounded poll: the store
    // retries its reopen at most every 250 ms).
    let until = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match n1.create_volume_key(create("vol-after")).await {
            Ok(k) => break k.into_inner(),
            Err(s) if Instant::now() < until => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                tokio::task::yield_now().await;
            }
            Err(s) => panic!("the broker did not recover once space was freed: {s:?}"),
        }
    };
    assert_eq!(after.key.len(), 64);
    keys.push(("vol-after".into(), after.key));
    assert_eq!(broker.pid(), pid, "no restart");
    // Nothing lost: every key created before (and during) still fetches identical.
    for (id, key) in &keys {
        let got = n1.get_volume_key(get(id)).await.unwrap().into_inner().key;
        assert_same_key(id, &got, key);
    }
    drop(n1);
    broker.stop();
    let out = run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["audit", "verify", "--log"])
            .arg(env.state().join("audit.log")),
    );
    assert!(out.contains("hash chain intact"), "{out}");
}

fn client_tls(env: &Env, stem: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(tls::client_config(&env.tls_files(stem)).unwrap())
}

/// One key fetch on a new connection (TCP, TLS, HTTP/2, the call).
async fn fresh_fetch(addr: &str, cfg: Arc<rustls::ClientConfig>, id: &str) {
    let mut c = client_for(addr, cfg);
    if let Err(s) = c.get_volume_key(get(id)).await {
        panic!("good client's call failed: {s:?}");
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_the_cap_refuses_early() {
    const CAP: usize = 40;
    let env = Env::new();
    env.set_broker_extra(&format!(
        "max_connections = {CAP}\nfirst_request_timeout_ms = 1500\nhandshake_timeout_ms = 5000"
    ));
    let broker = env.start_broker();
    let addr = broker.addr.clone();
    let mut good = env.client(&broker, "node-n1");
    good.create_volume_key(create("vol-c")).await.unwrap();

    // Fill the cap with silent TLS connections (the good client holds one slot).
    let cfg = client_tls(&env, "node-n2");
    let mut silent = Vec::new();
    for _ in 0..CAP - 1 {
        let s = tls_connect(&addr, cfg.clone())
            .await
            .expect("within the cap");
        silent.push((Instant::now(), s));
    }
    // Beyond the cap: closed at once, before any TLS work (no waiting for a deadline).
    for i in 0..20 {
        let t = Instant::now();
        let r = tls_connect(&addr, cfg.clone()).await;
        assert!(r.is_err(), "connection {i} beyond the cap was served");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "refused only after {:?}",
            t.elapsed()
        );
    }
    // The good client still gets through on its connection.
    for _ in 0..5 {
        good.get_volume_key(get("vol-c")).await.unwrap();
    }
    // Each silent connection is closed by the broker within its first-request deadline.
    let deadline = Duration::from_millis(1500);
    let mut waits = tokio::task::JoinSet::new();
    for (done, mut s) in silent {
        waits.spawn(async move {
            let mut buf = [0u8; 256];
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                // The server's HTTP/2 SETTINGS come first, then the end.
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            (closed.is_ok(), done.elapsed())
        });
    }
    while let Some(r) = waits.join_next().await {
        let (closed, after) = r.unwrap();
        assert!(closed, "a silent connection was still open after 10 s");
        assert!(
            after >= deadline - Duration::from_millis(100)
                && after <= deadline + Duration::from_secs(1),
            "a silent connection was closed {after:?} after its handshake (deadline {deadline:?})"
        );
    }
    // Slots are free again: a new client connects.
    fresh_fetch(&addr, client_tls(&env, "node-n1"), "vol-c").await;
    good.get_volume_key(get("vol-c")).await.unwrap();
}

/// A raw HTTP/2 connection (no tonic on the client side), as node n1.
async fn raw_h2(env: &Env, addr: &str) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(addr, client_tls(env, "node-n1")).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Sends one POST to GetVolumeKey; returns the HTTP status, the body bytes and the
/// grpc-status (from the headers or the trailers).
async fn post(
    send: &mut h2::client::SendRequest<Bytes>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>, Option<String>) {
    let req = http::Request::builder()
        .method("POST")
        .uri("https://127.0.0.1/nodecrypt.keybroker.v1.KeyBroker/GetVolumeKey")
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, mut stream) = ready.send_request(req, false).unwrap();
    stream.send_data(Bytes::from(body), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = resp.status().as_u16();
    let mut grpc_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    if let Ok(Some(t)) = body.trailers().await {
        if let Some(v) = t.get("grpc-status") {
            grpc_status = Some(v.to_str().unwrap().to_string());
        }
    }
    (status, data, grpc_status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_content_type_and_a_two_message_unary_call_are_refused() {
    let env = Env::new();
    let broker = env.start_broker();
    let key = env
        .client(&broker, "node-n1")
        .create_volume_key(create("vol-w"))
        .await
        .unwrap()
        .into_inner()
        .key;
    let mut send = raw_h2(&env, &broker.addr).await;
    let one = grpc_frame(&get("vol-w"));

    // The control: one message, application/grpc, is served.
    let (status, data, grpc) = post(&mut send, "application/grpc", one.clone()).await;
    assert_eq!((status, grpc.as_deref()), (200, Some("0")));
    let served = pb::VolumeKey::decode(&data[5..]).unwrap();
    assert_same_key("the control call", &served.key, &key);

    // Not gRPC: HTTP 415, nothing served.
    let (status, data, _) = post(&mut send, "application/json", one.clone()).await;
    assert_eq!(
        status, 415,
        "content-type application/json was answered {status}"
    );
    assert!(
        data.is_empty(),
        "a refused call carried {} bytes",
        data.len()
    );

    // Two messages on a unary call: an error, nothing served.
    let mut two = one.clone();
    two.extend_from_slice(&one);
    let (status, data, grpc) = post(&mut send, "application/grpc", two).await;
    assert_eq!(status, 200);
    assert_eq!(
        grpc.as_deref(),
        Some("3"),
        "a two-message unary call must fail with INVALID_ARGUMENT"
    );
    assert!(
        data.is_empty(),
        "a refused call carried {} bytes",
        data.len()
    );

    // The connection and the broker still serve.
    let (_, _, grpc) = post(&mut send, "application/grpc", one).await;
    assert_eq!(grpc.as_deref(), Some("0"));
}

/// CPU time (user + system) the process `pid` has used.
fn proc_cpu(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_neither_spins_nor_stalls_accept() {
    let env = Env::new();
    // Connections that never start TLS stay until the handshake deadline: long here.
    env.set_broker_extra("handshake_timeout_ms = 60000");
    let broker = env
        .try_start_broker_via("127.0.0.1:0", &["prlimit", "--nofile=96:96", "--"])
        .unwrap();
    let mut good = env.client(&broker, "node-n1");
    good.create_volume_key(create("vol-e")).await.unwrap();
    let warned_at_start = fs::read_to_string(&broker.log).unwrap();
    assert!(
        warned_at_start.contains("RLIMIT_NOFILE is below max_connections"),
        "no warning that the cap cannot prevent EMFILE"
    );

    // More TCP-only connections than the broker has descriptors.
    let flood: Vec<_> = (0..150)
        .map(|_| std::net::TcpStream::connect(&broker.addr).unwrap())
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&broker.log)
        .unwrap()
        .contains("out of file descriptors")
    {
        assert!(
            Instant::now() < until,
            "the broker never ran out of descriptors"
        );
        good.get_volume_key(get("vol-e")).await.unwrap();
    }
    // A measurement window (not a synchronisation): while accept keeps failing, the
    // broker's accept loop must not burn a core retrying.
    let (cpu0, t0) = (proc_cpu(broker.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu, wall) = (proc_cpu(broker.pid()) - cpu0, t0.elapsed());
    assert!(
        cpu < wall / 4,
        "the broker used {cpu:?} of CPU in {wall:?} while out of descriptors (spinning)"
    );
    // The established client is served meanwhile.
    for _ in 0..5 {
        good.get_volume_key(get("vol-e")).await.unwrap();
    }
    // Descriptors come back when the flood goes: accept goes on, a new client connects.
    drop(flood);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let mut fresh = client_for(&broker.addr, client_tls(&env, "node-n1"));
        match fresh.get_volume_key(get("vol-e")).await {
            Ok(_) => break,
            Err(s) => assert!(
                Instant::now() < until,
                "accept did not resume after descriptors were freed: {s:?}"
            ),
        }
    }
    let log = fs::read_to_string(&broker.log).unwrap();
    let warnings = log
        .lines()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert!(
        warnings <= 30,
        "{warnings} EMFILE warnings: the log is not rate-limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_its_timeout_is_closed() {
    let env = Env::new();
    env.set_broker_extra("idle_timeout_ms = 1000");
    let broker = env.start_broker();
    env.client(&broker, "node-n1")
        .create_volume_key(create("vol-i"))
        .await
        .unwrap();
    let tls = tls_connect(&broker.addr, client_tls(&env, "node-n1"))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut send = send;
    let (_, _, grpc) = post(&mut send, "application/grpc", grpc_frame(&get("vol-i"))).await;
    assert_eq!(grpc.as_deref(), Some("0"));
    let t = Instant::now();
    // The broker closes the connection once it has been idle for 1 s.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let after = t.elapsed();
    assert!(
        ended.is_ok(),
        "an idle connection was still open after 10 s"
    );
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_secs(3),
        "closed {after:?} after its last request (idle timeout 1 s)"
    );
}
