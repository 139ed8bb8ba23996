//! End-to-end tests of the real `nodecrypt-keybroker` binary as a process: its store and
//! KEK across restarts (tampered records, a wrong KEK, kill -9), SIGTERM, and memory
//! locking.

mod common;

use std::fs;
use std::process::Command;

use common::{create, get};
use nodecrypt_keybroker::store::redb::{RedbStore, STORE_FILE};
use nodecrypt_keybroker::store::KeyStore;
use nodecrypt_tests::{assert_same_key, bin, run_ok, Env};
use sha2::{Digest, Sha256};
use tonic::Code;

fn sha256_file(p: &std::path::Path) -> Vec<u8> {
    Sha256::digest(fs::read(p).unwrap()).to_vec()
}

/// Puts a fresh KEK in place of the state directory's and asserts that the broker refuses
/// to start with it and changes neither the store nor the audit log. Returns the original
/// KEK's bytes (the file now holds the fresh one).
fn assert_another_kek_is_refused(env: &Env) -> Vec<u8> {
    let kek = env.state().join("kek");
    let original = fs::read(&kek).unwrap();
    let store_hash = sha256_file(&env.state().join(STORE_FILE));
    let audit_hash = sha256_file(&env.state().join("audit.log"));
    fs::remove_file(&kek).unwrap();
    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["init", "--state-dir"])
            .arg(env.state()),
    );
    let err = match env.try_start_broker() {
        Ok(_) => panic!("the broker started with the wrong KEK"),
        Err(log) => log,
    };
    assert!(
        err.contains("is not the KEK this store was written with"),
        "{err}"
    );
    assert_eq!(
        sha256_file(&env.state().join(STORE_FILE)),
        store_hash,
        "store untouched"
    );
    assert_eq!(
        sha256_file(&env.state().join("audit.log")),
        audit_hash,
        "audit log untouched"
    );
    original
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_records_and_a_wrong_kek_are_refused() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    n1.create_volume_key(create("vol-t")).await.unwrap();
    let ok = n1
        .create_volume_key(create("vol-ok"))
        .await
        .unwrap()
        .into_inner();
    broker.stop();

    // Flip one byte of vol-t's wrapped key in the store file's record.
    {
        let store = RedbStore::open(&env.state().join(STORE_FILE)).unwrap();
        let (rev, rec) = store.get("vol-t").await.unwrap().unwrap();
        let mut rec = std::sync::Arc::unwrap_or_clone(rec);
        let w = rec.versions[0].wrapped.as_mut().unwrap();
        let mut ct = hex::decode(&w.ciphertext).unwrap();
        ct[7] ^= 0x01;
        w.ciphertext = hex::encode(ct);
        store.put(&rec, Some(rev)).await.unwrap();
    }
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let e = n1.get_volume_key(get("vol-t", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("vol-t"), "{e:?}");
    assert_eq!(
        n1.get_volume_key(get("vol-ok", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        ok.key,
        "other volumes still served"
    );
    broker.stop();

    // Another KEK: the broker refuses to start, and changes nothing.
    let kek = env.state().join("kek");
    let original = assert_another_kek_is_refused(&env);

    // `init` never overwrites a KEK.
    let out = Command::new(bin("nodecrypt-keybroker"))
        .args(["init", "--state-dir"])
        .arg(env.state())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));

    // The right KEK back: served again.
    fs::write(&kek, &original).unwrap();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    assert_eq!(
        n1.get_volume_key(get("vol-ok", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        ok.key
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_restarts_and_still_checks_its_kek() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let key = n1
        .create_volume_key(create("vol-crash"))
        .await
        .unwrap()
        .into_inner()
        .key;
    broker.kill9();
    let store = env.state().join(STORE_FILE);
    let mode = fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "store file mode {mode:o}");

    // The store was not closed. With another KEK the broker still refuses to start, and
    // the store, the audit log and the state directory are as the crash left them.
    let kek = env.state().join("kek");
    let original = assert_another_kek_is_refused(&env);
    let mut names: Vec<_> = fs::read_dir(env.state())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["audit.log", "kek", STORE_FILE],
        "nothing left behind"
    );

    // The right KEK: it starts (repairing the store) and serves the key, crash after crash.
    fs::write(&kek, &original).unwrap();
    for _ in 0..2 {
        let broker = env.start_broker();
        let mut n1 = env.client(&broker, "node-n1");
        let got = n1
            .get_volume_key(get("vol-crash", 0))
            .await
            .unwrap()
            .into_inner();
        assert_same_key("after a kill -9", &got.key, &key);
        broker.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_broker_promptly_with_a_client_connected() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    n1.create_volume_key(create("vol-idle")).await.unwrap();
    // The client keeps its HTTP/2 connection open and idle while the broker stops.
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || broker.stop())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took < nodecrypt_keybroker::server::DRAIN_LIMIT + std::time::Duration::from_secs(3),
        "stop took {took:?}"
    );
    drop(n1);
}

/// Readiness is announced only once SIGTERM is handled: a stop right after it is graceful
/// (exit 0, store closed), never the signal's default kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_readiness_is_a_graceful_stop() {
    let env = Env::new();
    for round in 0..5 {
        let status = env.start_broker().stop_status();
        assert!(
            status.success(),
            "round {round}: SIGTERM right after readiness ended the broker with {status:?}"
        );
    }
}

/// `VmLck` of process `pid`, in kB.
fn locked_kb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .expect("VmLck in /proc/<pid>/status");
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_locks_its_memory_or_says_why_not_and_serves_either_way() {
    let env = Env::new();
    // As root (CAP_IPC_LOCK): every page locked, so no key page can reach swap.
    let broker = env.start_broker();
    assert!(
        locked_kb(broker.pid()) > 1024,
        "memory not locked: VmLck {} kB",
        locked_kb(broker.pid())
    );
    broker.stop();

    // Without CAP_IPC_LOCK and under an 8 MiB RLIMIT_MEMLOCK: locking all future pages would
    // make allocations fail once 8 MiB are locked, so the broker leaves memory unlocked,
    // warns, and serves.
    let limited = env
        .try_start_broker_via(
            "127.0.0.1:0",
            &[
                "setpriv",
                "--inh-caps=-ipc_lock",
                "--bounding-set=-ipc_lock",
                "prlimit",
                "--memlock=8388608",
                "--",
            ],
        )
        .unwrap_or_else(|e| panic!("broker under a memlock limit did not start: {e}"));
    assert_eq!(locked_kb(limited.pid()), 0, "locked under a limit");
    let mut n1 = env.client(&limited, "node-n1");
    let created = n1
        .create_volume_key(create("vol-memlock"))
        .await
        .unwrap()
        .into_inner();
    let fetched = n1
        .get_volume_key(get("vol-memlock", 0))
        .await
        .unwrap()
        .into_inner();
    assert_same_key("under a memlock limit", &fetched.key, &created.key);
    let log = fs::read_to_string(&limited.log).unwrap();
    assert!(
        log.contains("memory not locked: RLIMIT_MEMLOCK is limited"),
        "no warning: {log}"
    );
}
