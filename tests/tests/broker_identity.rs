//! End-to-end tests of the real `nodecrypt-keybroker` binary on 127.0.0.1 over mTLS: who
//! may do what. The authorization matrix between nodes, refused handshakes, a certificate
//! for another trust domain, admins who manage but never read, and opt-in recovery reads.

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use common::{create, get};
use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{
    assert_no_key_material, assert_other_key, assert_same_key, bin, client_for, run_ok, Env,
};
use tonic::Code;

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
