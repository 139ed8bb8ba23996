//! End-to-end tests of the real `nodecrypt-keybroker` binary on 127.0.0.1 over mTLS: the
//! key lifecycle (create, get, rotate, retire, describe, list, destroy) and its audit
//! trail, concurrent creates, destroyed keys gone from the store file, and request
//! validation.

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use common::{create, get};
use nodecrypt_keybroker::store::redb::{RedbStore, STORE_FILE};
use nodecrypt_keybroker::store::KeyStore;
use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{assert_no_key_material, assert_other_key, bin, run_ok, Env};
use tonic::Code;

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
