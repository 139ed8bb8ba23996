//! The agent's broker client against brokers that cannot help: one whose certificate
//! comes from another CA (permanent: fail at once, saying why) and a black hole that
//! accepts TCP and never answers (transient: retried, but never past the deadline).

use std::time::{Duration, Instant};

use nodecrypt_tests::{sparse_file, AgentOpts, Env};

/// Formats `vol-x` on a file image through a good broker; returns the image path.
fn formatted_image(env: &Env) -> std::path::PathBuf {
    let broker = env.start_broker();
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());
    let img = sparse_file(&env.path().join("x.img"), 64);
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-x"])
        .ok();
    img
}

#[test]
fn a_broker_certificate_from_another_ca_fails_the_open_at_once() {
    let env = Env::new();
    let img = formatted_image(&env);
    // Another PKI: its broker's certificate does not chain to the agent's CA.
    let other = Env::new();
    let wrong = other.start_broker();
    let agent = env.start_agent(
        &wrong.addr,
        &AgentOpts {
            unlock_deadline: "20s".into(),
            ..AgentOpts::default()
        },
    );
    let t = Instant::now();
    let out = agent.cli(&["open", img.to_str().unwrap()]);
    let took = t.elapsed();
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        took < Duration::from_secs(5),
        "a certificate problem was retried for {took:?} (deadline 20 s): {out:?}"
    );
    assert!(
        out.stderr.contains("certificate") && out.stderr.contains("CA"),
        "the error does not name the certificate problem: {out:?}"
    );
    assert!(
        !out.stderr.contains("unavailable for"),
        "reported as an outage: {out:?}"
    );
}

#[test]
fn a_black_hole_broker_costs_no_more_than_the_unlock_deadline() {
    let env = Env::new();
    let img = formatted_image(&env);
    // Accepts and holds every connection, never reads or writes.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hole.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept() {
            held.push(s);
        }
    });
    let deadline = Duration::from_secs(4);
    // The harness's request_timeout is 3 s: without clipping, the second attempt would
    // end near 6 s.
    let agent = env.start_agent(
        &addr,
        &AgentOpts {
            unlock_deadline: "4s".into(),
            ..AgentOpts::default()
        },
    );
    let t = Instant::now();
    let out = agent.cli(&["open", img.to_str().unwrap()]);
    let took = t.elapsed();
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        took <= deadline + Duration::from_secs(1),
        "open took {took:?} with an unlock deadline of {deadline:?}: {out:?}"
    );
    assert!(
        took >= deadline - Duration::from_millis(500),
        "gave up after {took:?}, before the deadline: {out:?}"
    );
    assert!(out.stderr.contains("unavailable"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_tcp_listener_closes_a_silent_connection() {
    use tokio::io::AsyncReadExt;
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            tcp: true,
            ..AgentOpts::default()
        },
    );
    let addr = agent.tcp.clone().expect("the agent's TCP listener");
    let cfg = std::sync::Arc::new(
        nodecrypt_keybroker::tls::client_config(&env.tls_files("admin-ops")).unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let t = Instant::now();
    // TLS done, then silence: the agent must close it within its 10 s first-request
    // deadline (the HTTP/2 SETTINGS it sends first are read and ignored).
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let after = t.elapsed();
    assert!(
        closed.is_ok(),
        "a silent connection was still open after 20 s"
    );
    assert!(
        after >= Duration::from_millis(9500) && after <= Duration::from_secs(12),
        "closed after {after:?}; the agent's first-request deadline is 10 s"
    );
}
