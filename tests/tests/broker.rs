//! End-to-end tests of the real `nodecrypt-keybroker` binary on 127.0.0.1 over mTLS.

use std::fs;
use std::process::Command;
use std::sync::Arc;

use nodecrypt_keybroker::store::redb::{RedbStore, STORE_FILE};
use nodecrypt_keybroker::store::KeyStore;
use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{
    assert_no_key_material, assert_other_key, assert_same_key, bin, client_for, run_ok, Env,
};
use sha2::{Digest, Sha256};
use tonic::Code;

fn get(volume_id: &str, version: u64) -> pb::GetVolumeKeyRequest {
    pb::GetVolumeKeyRequest {
        volume_id: volume_id.into(),
        version,
    }
}

fn create(volume_id: &str) -> pb::CreateVolumeKeyRequest {
    pb::CreateVolumeKeyRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips_and_keys_survive_a_restart() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let mut admin = env.client(&broker, "admin-ops");

    let k1 = n1
        .create_volume_key(create("vol-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((k1.version, k1.current_version, k1.key.len()), (1, 1, 64));
    let again = n1
        .create_volume_key(create("vol-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.version, &again.key),
        (1, &k1.key),
        "create is idempotent"
    );
    assert_eq!(
        n1.get_volume_key(get("vol-a", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        k1.key
    );
    assert_eq!(
        n1.get_volume_key(get("vol-a", 1))
            .await
            .unwrap()
            .into_inner()
            .key,
        k1.key
    );

    let rot = pb::RotateVolumeKeyRequest {
        volume_id: "vol-a".into(),
        expected_current_version: 1,
    };
    let k2 = n1
        .rotate_volume_key(rot.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k2.version, 2);
    assert_other_key("a rotation", &k2.key, &k1.key);
    let k2b = n1.rotate_volume_key(rot).await.unwrap().into_inner();
    assert_eq!(
        (k2b.version, &k2b.key),
        (2, &k2.key),
        "a repeated rotate adds nothing"
    );
    assert_eq!(
        n1.get_volume_key(get("vol-a", 1))
            .await
            .unwrap()
            .into_inner()
            .key,
        k1.key,
        "old version still fetchable"
    );

    let retire = pb::RetireVolumeKeyVersionRequest {
        volume_id: "vol-a".into(),
        version: 2,
    };
    assert_eq!(
        n1.retire_volume_key_version(retire)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let retire = pb::RetireVolumeKeyVersionRequest {
        volume_id: "vol-a".into(),
        version: 1,
    };
    n1.retire_volume_key_version(retire.clone()).await.unwrap();
    n1.retire_volume_key_version(retire).await.unwrap();
    let e = n1.get_volume_key(get("vol-a", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("retired"), "{e:?}");

    let info = n1
        .describe_volume(pb::DescribeVolumeRequest {
            volume_id: "vol-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.node_id.as_str(),
            info.current_version,
            info.versions.len()
        ),
        ("n1", 2, 2)
    );
    assert_eq!(info.versions[0].state, pb::KeyState::Retired as i32);

    let kb = n1
        .create_volume_key(create("vol-b"))
        .await
        .unwrap()
        .into_inner();
    let list = n1
        .list_volume_keys(pb::ListVolumeKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.volumes.iter().map(|v| v.volume_id.as_str()).collect();
    assert_eq!(ids, ["vol-a", "vol-b"]);

    // Admin creates on behalf of n2.
    let on_behalf = pb::CreateVolumeKeyRequest {
        volume_id: "vol-c".into(),
        node_id: "n2".into(),
        ..Default::default()
    };
    admin.create_volume_key(on_behalf).await.unwrap();
    let all = admin
        .list_volume_keys(pb::ListVolumeKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.volumes.len(), 3);

    let d = pb::DestroyVolumeKeyRequest {
        volume_id: "vol-a".into(),
        reason: "test".into(),
    };
    n1.destroy_volume_key(d.clone()).await.unwrap();
    n1.destroy_volume_key(d).await.unwrap();
    let e = n1.get_volume_key(get("vol-a", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("destroyed at"), "{e:?}");
    let e = n1.create_volume_key(create("vol-a")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "a destroyed volume id is never re-keyed"
    );

    // Restart: every key is still there.
    broker.stop();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    assert_eq!(
        n1.get_volume_key(get("vol-b", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        kb.key
    );
    assert_eq!(
        n1.get_volume_key(get("vol-a", 2)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // The whole run's logs and audit log hold no key, and the audit chain verifies.
    broker.stop();
    let keys = vec![k1.key.clone(), k2.key.clone(), kb.key.clone()];
    assert_no_key_material(
        "broker log",
        &fs::read(env.path().join("broker.log")).unwrap(),
        &keys,
    );
    let audit_path = env.state().join("audit.log");
    let audit = fs::read(&audit_path).unwrap();
    assert_no_key_material("audit log", &audit, &keys);
    let text = String::from_utf8(audit).unwrap();
    assert!(
        text.contains("\"rpc\":\"GetVolumeKey\"")
            && text.contains("spiffe://nodecrypt.test/node/n1")
    );
    assert!(
        text.lines()
            .all(|l| l.contains("\"peer_addr\":\"127.0.0.1:")),
        "every line has the peer address"
    );
    let out = run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["audit", "verify", "--log"])
            .arg(&audit_path),
    );
    assert!(out.contains("hash chain intact"), "{out}");

    // Edit one line's result: verify fails and names that line.
    let edited_line = 5;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[edited_line - 1] =
        lines[edited_line - 1].replacen("\"result\":\"OK\"", "\"result\":\"NOT_FOUND\"", 1);
    assert_ne!(
        lines[edited_line - 1],
        text.lines().nth(edited_line - 1).unwrap()
    );
    fs::write(&audit_path, lines.join("\n") + "\n").unwrap();
    let out = Command::new(bin("nodecrypt-keybroker"))
        .args(["audit", "verify", "--log"])
        .arg(&audit_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {edited_line}:")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let mut n2 = env.client(&broker, "node-n2");
    let mut n3 = env.client(&broker, "node-n3");
    let mut admin = env.client(&broker, "admin-ops");
    let ka = n1
        .create_volume_key(create("vol-a"))
        .await
        .unwrap()
        .into_inner();

    let denied = |e: tonic::Status| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            !e.message().contains("n1"),
            "the refusal must not name the owner: {e:?}"
        );
    };
    denied(n2.get_volume_key(get("vol-a", 0)).await.unwrap_err());
    denied(n2.create_volume_key(create("vol-a")).await.unwrap_err());
    denied(
        n2.rotate_volume_key(pb::RotateVolumeKeyRequest {
            volume_id: "vol-a".into(),
            expected_current_version: 1,
        })
        .await
        .unwrap_err(),
    );
    denied(
        n2.destroy_volume_key(pb::DestroyVolumeKeyRequest {
            volume_id: "vol-a".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err(),
    );
    denied(
        n2.retire_volume_key_version(pb::RetireVolumeKeyVersionRequest {
            volume_id: "vol-a".into(),
            version: 1,
        })
        .await
        .unwrap_err(),
    );
    denied(
        n2.describe_volume(pb::DescribeVolumeRequest {
            volume_id: "vol-a".into(),
        })
        .await
        .unwrap_err(),
    );
    let e = n2
        .rebind_volume_key(pb::RebindVolumeKeyRequest {
            volume_id: "vol-a".into(),
            new_node_id: "n2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = n2
        .list_volume_keys(pb::ListVolumeKeysRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(n2
        .list_volume_keys(pb::ListVolumeKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .is_empty());
    let e = n2
        .create_volume_key(pb::CreateVolumeKeyRequest {
            volume_id: "vol-x".into(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a node creates keys only for itself"
    );

    // Nothing changed for the owner.
    assert_eq!(
        n1.get_volume_key(get("vol-a", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        ka.key
    );

    // Rebind by the admin: then only n2 reads it, with the same key.
    let rb = pb::RebindVolumeKeyRequest {
        volume_id: "vol-a".into(),
        new_node_id: "n2".into(),
        expected_node_id: "n3".into(),
    };
    assert_eq!(
        admin.rebind_volume_key(rb).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let rb = pb::RebindVolumeKeyRequest {
        volume_id: "vol-a".into(),
        new_node_id: "n2".into(),
        expected_node_id: "n1".into(),
    };
    admin.rebind_volume_key(rb.clone()).await.unwrap();
    admin.rebind_volume_key(rb).await.unwrap();
    assert_eq!(
        n2.get_volume_key(get("vol-a", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        ka.key
    );
    denied_for(n1.get_volume_key(get("vol-a", 0)).await.unwrap_err());
    denied_for(n3.get_volume_key(get("vol-a", 0)).await.unwrap_err());

    // A client with no certificate, and one from another CA, are refused at the handshake.
    let no_cert = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            for c in tls::load_certs(&env.pki().join("ca.pem")).unwrap() {
                roots.add(c).unwrap();
            }
            roots
        })
        .with_no_client_auth();
    let mut anon = client_for(&broker.addr, Arc::new(no_cert));
    let e = anon.get_volume_key(get("vol-a", 0)).await.unwrap_err();
    assert_refused_at_handshake(&e);

    let other = Env::new(); // another CA, same names
    let mut foreign_files = other.tls_files("node-n2");
    foreign_files.ca = env.pki().join("ca.pem"); // trusts our broker, but its cert is from another CA
    let mut foreign = client_for(
        &broker.addr,
        Arc::new(tls::client_config(&foreign_files).unwrap()),
    );
    let e = foreign.get_volume_key(get("vol-a", 0)).await.unwrap_err();
    assert_refused_at_handshake(&e);
    // The broker is still serving.
    n2.get_volume_key(get("vol-a", 0)).await.unwrap();
    let log = fs::read_to_string(&broker.log).unwrap();
    assert!(
        log.contains("TLS handshake refused"),
        "refused handshakes are logged"
    );
}

/// The connection died before any gRPC exchange: with TLS 1.3 the client learns of the
/// refused certificate from the server's alert or close, so tonic says UNAVAILABLE,
/// CANCELLED or UNKNOWN (transport error) depending on timing — never a gRPC answer.
fn assert_refused_at_handshake(e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{e:?}"
    );
    let text = format!("{e:?}");
    assert!(
        [
            "CertificateRequired",
            "BadCertificate",
            "UnknownCA",
            "connection closed",
            "operation was canceled",
            "transport error"
        ]
        .iter()
        .any(|t| text.contains(t)),
        "{text}"
    );
    assert!(
        e.metadata().get("content-type").is_none(),
        "no gRPC response was received: {e:?}"
    );
}

fn denied_for(e: tonic::Status) {
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_creates_make_one_version() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = env.client(&broker, "node-n1");
        tasks.push(tokio::spawn(async move {
            c.create_volume_key(create("vol-race"))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        let k = t.await.unwrap().unwrap();
        assert_eq!(k.version, 1);
        keys.push(k.key);
    }
    keys.dedup();
    assert_eq!(keys.len(), 1, "every caller got the same key");
    let mut n1 = env.client(&broker, "node-n1");
    let info = n1
        .describe_volume(pb::DescribeVolumeRequest {
            volume_id: "vol-race".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.versions.len(), 1);
}

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
async fn destroyed_keys_are_gone_from_the_store_file() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let mut keys = Vec::new();
    for i in 0..20 {
        keys.push(
            n1.create_volume_key(create(&format!("vol-{i}")))
                .await
                .unwrap()
                .into_inner()
                .key,
        );
    }
    let doomed = n1
        .create_volume_key(create("vol-doomed"))
        .await
        .unwrap()
        .into_inner();
    let rot = pb::RotateVolumeKeyRequest {
        volume_id: "vol-doomed".into(),
        expected_current_version: 1,
    };
    let doomed2 = n1.rotate_volume_key(rot).await.unwrap().into_inner();
    broker.stop();
    let wrapped: Vec<String> = {
        let store = RedbStore::open(&env.state().join(STORE_FILE)).unwrap();
        let (_, rec) = store.get("vol-doomed").await.unwrap().unwrap();
        rec.versions
            .iter()
            .map(|v| v.wrapped.clone().unwrap().ciphertext)
            .collect()
    };
    let file = fs::read(env.state().join(STORE_FILE)).unwrap();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(&file, wrapped[0].as_bytes()),
        "the wrapped key is in the store before destroy"
    );
    assert_no_key_material("store file", &file, std::slice::from_ref(&doomed.key));

    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    n1.destroy_volume_key(pb::DestroyVolumeKeyRequest {
        volume_id: "vol-doomed".into(),
        reason: "decommissioned".into(),
    })
    .await
    .unwrap();
    let e = n1.get_volume_key(get("vol-doomed", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("destroyed at"), "{e:?}");
    broker.stop();

    let file = fs::read(env.state().join(STORE_FILE)).unwrap();
    for w in &wrapped {
        assert!(
            !contains(&file, w.as_bytes()),
            "a wrapped key of the destroyed volume is still in the store file"
        );
        assert!(
            !contains(&file, &w.as_bytes()[..32]),
            "part of a wrapped key of the destroyed volume survives"
        );
    }
    assert_no_key_material("store file", &file, &[doomed.key, doomed2.key]);
    // The other volumes are intact.
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            &n1.get_volume_key(get(&format!("vol-{i}"), 0))
                .await
                .unwrap()
                .into_inner()
                .key,
            k
        );
    }
}

/// A request message with a field the contract does not have (number 99).
#[derive(Clone, PartialEq, prost::Message)]
struct GetWithExtra {
    #[prost(string, tag = "1")]
    volume_id: String,
    #[prost(uint64, tag = "2")]
    version: u64,
    #[prost(bool, tag = "99")]
    force: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_the_broker_keeps_serving() {
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let k = n1
        .create_volume_key(create("vol-ok"))
        .await
        .unwrap()
        .into_inner();
    let long = "a".repeat(64);
    for bad in [
        "",
        "A",
        "-a",
        "a-",
        "../etc",
        "a/b",
        "a b",
        "vol\u{0}x",
        "é",
        long.as_str(),
        &"x".repeat(100_000),
    ] {
        let shown = &bad[..bad.len().min(40)];
        let e = n1.create_volume_key(create(bad)).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{shown:?}: {}",
            e.message()
        );
        assert!(e.message().len() < 300, "errors quote input bounded");
        let e = n1.get_volume_key(get(bad, 0)).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{shown:?}: {}",
            e.message()
        );
    }
    for v in [1u64 << 63, u64::MAX, (u32::MAX as u64) + 1] {
        let e = n1.get_volume_key(get("vol-ok", v)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{v}: {e:?}");
    }
    let e = n1
        .retire_volume_key_version(pb::RetireVolumeKeyVersionRequest {
            volume_id: "vol-ok".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut labels = std::collections::HashMap::new();
    labels.insert("Bad Key".to_string(), "v".to_string());
    let e = n1
        .create_volume_key(pb::CreateVolumeKeyRequest {
            volume_id: "vol-l".into(),
            labels,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Unknown field: sent with a hand-made message on the real method path.
    let cfg = tls::client_config(&env.tls_files("node-n1")).unwrap();
    let ch = nodecrypt_keybroker::client::channel(&broker.addr, Arc::new(cfg), Default::default())
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/nodecrypt.keybroker.v1.KeyBroker/GetVolumeKey",
    );
    let codec = tonic_prost_codec::Codec::<GetWithExtra, pb::VolumeKey>::default();
    let req = GetWithExtra {
        volume_id: "vol-ok".into(),
        version: 0,
        force: true,
    };
    let e = grpc
        .unary(tonic::Request::new(req), path, codec)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("unknown field 99"), "{e:?}");

    assert_eq!(
        n1.get_volume_key(get("vol-ok", 0))
            .await
            .unwrap()
            .into_inner()
            .key,
        k.key,
        "still serving"
    );
}

/// prost's codec under a short name, for the hand-made request above.
mod tonic_prost_codec {
    pub type Codec<T, U> = tonic_prost::ProstCodec<T, U>;
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

/// The identity is settled once per connection, at the TLS handshake: a certificate that
/// our CA signed for another trust domain passes the handshake but is no one here, on
/// every call; the refusal is audited; and callers on other connections stay themselves.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_trust_domain_is_no_one() {
    let env = Env::new();
    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["pki", "init", "--dir"])
            .arg(env.pki())
            .args(["--trust-domain", "other.test", "--node", "spy"]),
    );
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let k = n1
        .create_volume_key(create("vol-a"))
        .await
        .unwrap()
        .into_inner();
    let mut spy = env.client(&broker, "node-spy");
    let refusals = [
        spy.get_volume_key(get("vol-a", 0)).await.unwrap_err(),
        spy.create_volume_key(create("vol-spy")).await.unwrap_err(),
        spy.list_volume_keys(pb::ListVolumeKeysRequest::default())
            .await
            .unwrap_err(),
        spy.get_volume_key(get("vol-a", 0)).await.unwrap_err(),
    ];
    for e in refusals {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("spiffe://other.test/node/spy"),
            "the refusal names the presented id: {e:?}"
        );
    }
    // n1's connection, interleaved with the spy's, is still n1's.
    let again = n1
        .get_volume_key(get("vol-a", 0))
        .await
        .unwrap()
        .into_inner();
    assert_same_key("after the restart", &again.key, &k.key);
    broker.stop();

    let audit = fs::read_to_string(env.state().join("audit.log")).unwrap();
    let spy_lines: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("other.test/node/spy"))
        .collect();
    assert_eq!(spy_lines.len(), 4, "every refused call is audited: {audit}");
    for l in &spy_lines {
        assert!(l.contains("\"peer\":\"unauthenticated: "), "{l}");
        assert!(l.contains("\"result\":\"PERMISSION_DENIED\""), "{l}");
    }
    assert!(
        !audit.contains("vol-spy\",\"version\":1"),
        "nothing was created for the spy: {audit}"
    );
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

/// The audit lines of `rpc` by `peer` (SPIFFE id) with `result`.
fn audit_lines<'a>(audit: &'a str, rpc: &str, peer: &str, result: &str) -> Vec<&'a str> {
    audit
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["rpc"] == rpc && v["peer"] == peer && v["result"] == result
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_nodes_read_and_recovery_reads_are_opt_in() {
    let td = nodecrypt_tests::TRUST_DOMAIN;
    let (admin_id, officer_id) = (
        format!("spiffe://{td}/admin/ops"),
        format!("spiffe://{td}/recovery/officer"),
    );
    let env = Env::new();
    let broker = env.start_broker();
    let mut n1 = env.client(&broker, "node-n1");
    let mut admin = env.client(&broker, "admin-ops");
    let mut officer = env.client(&broker, "recovery-officer");

    // An admin creates for a node and rotates, and is never handed key bytes.
    let made = admin
        .create_volume_key(pb::CreateVolumeKeyRequest {
            volume_id: "vol-m".into(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (made.version, made.key.len()),
        (1, 0),
        "admin got key bytes"
    );
    let again = admin
        .create_volume_key(pb::CreateVolumeKeyRequest {
            volume_id: "vol-m".into(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.key.is_empty(),
        "admin got key bytes of an existing volume"
    );
    let k1 = n1
        .get_volume_key(get("vol-m", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((k1.version, k1.key.len()), (1, 64));
    let rotated = admin
        .rotate_volume_key(pb::RotateVolumeKeyRequest {
            volume_id: "vol-m".into(),
            expected_current_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rotated.version, rotated.key.len()),
        (2, 0),
        "admin got key bytes"
    );
    let k2 = n1
        .get_volume_key(get("vol-m", 2))
        .await
        .unwrap()
        .into_inner();
    assert_other_key("rotation", &k1.key, &k2.key);

    // An admin's GetVolumeKey: PERMISSION_DENIED, for any version.
    for v in [0, 1, 2] {
        let e = admin.get_volume_key(get("vol-m", v)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("never read"), "{e:?}");
    }
    // Still managed by the admin: describe, list, rebind.
    admin
        .describe_volume(pb::DescribeVolumeRequest {
            volume_id: "vol-m".into(),
        })
        .await
        .unwrap();

    // Recovery, disabled by default: refused, and audited as a recovery read.
    let e = officer.get_volume_key(get("vol-m", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("allow_recovery_reads"), "{e:?}");
    drop((n1, admin, officer));
    broker.stop();
    let audit = fs::read_to_string(env.state().join("audit.log")).unwrap();
    assert_eq!(
        audit_lines(&audit, "GetVolumeKey", &admin_id, "PERMISSION_DENIED").len(),
        3,
        "every refused admin read is audited"
    );
    assert_eq!(
        audit_lines(
            &audit,
            "GetVolumeKey:RECOVERY_READ",
            &officer_id,
            "PERMISSION_DENIED"
        )
        .len(),
        1
    );

    // Enabled: served, audited as a recovery read, and logged at WARN.
    env.set_broker_extra("allow_recovery_reads = true");
    let broker = env.start_broker();
    let mut officer = env.client(&broker, "recovery-officer");
    let got = officer
        .get_volume_key(get("vol-m", 2))
        .await
        .unwrap()
        .into_inner();
    assert_same_key("recovery read", &got.key, &k2.key);
    // Reads only: a recovery identity changes nothing.
    let e = officer
        .destroy_volume_key(pb::DestroyVolumeKeyRequest {
            volume_id: "vol-m".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An admin still reads nothing with recovery reads enabled.
    let e = env
        .client(&broker, "admin-ops")
        .get_volume_key(get("vol-m", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    drop(officer);
    let log_path = broker.log.clone();
    broker.stop();
    let audit = fs::read_to_string(env.state().join("audit.log")).unwrap();
    let served = audit_lines(&audit, "GetVolumeKey:RECOVERY_READ", &officer_id, "OK");
    assert_eq!(served.len(), 1, "{audit}");
    assert!(served[0].contains("break-glass"), "{}", served[0]);
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("BREAK-GLASS") && l.contains("\"WARN\"")),
        "no WARN line for the recovery read"
    );
    assert_no_key_material(
        "logs",
        format!("{log}{audit}").as_bytes(),
        &[k1.key.clone(), k2.key.clone()],
    );
    let out = run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["audit", "verify", "--log"])
            .arg(env.state().join("audit.log")),
    );
    assert!(out.contains("hash chain intact"), "{out}");
}
