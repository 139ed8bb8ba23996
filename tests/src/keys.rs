//! Comparing and looking for keys without ever printing one: equality, difference, key
//! material in logs and files, and a volume's key as its node fetches it.

use crate::broker::Broker;
use crate::pki::Env;

/// Asserts two keys are equal without printing either (`assert_eq!` would put the key
/// bytes in the test log when it fails).
pub fn assert_same_key(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: the keys differ ({} and {} bytes; first difference at byte {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// Asserts two keys differ, without printing them.
pub fn assert_other_key(what: &str, a: &[u8], b: &[u8]) {
    assert!(a != b, "{what}: the same {}-byte key twice", a.len());
}

/// Asserts that none of `keys` appears in `haystack` raw, as lower or upper hex, or as
/// any 16-byte window of the key (partial leaks).
pub fn assert_no_key_material(what: &str, haystack: &[u8], keys: &[Vec<u8>]) {
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    for key in keys {
        assert!(!key.is_empty());
        let hexed = hex::encode(key);
        for w in key.windows(16) {
            assert!(
                !haystack.windows(16).any(|h| h == w),
                "{what}: contains raw key bytes"
            );
        }
        for start in (0..hexed.len().saturating_sub(32)).step_by(2) {
            assert!(
                !text.contains(&hexed[start..start + 32]),
                "{what}: contains key bytes in hex"
            );
        }
        // Decimal byte lists, as a Debug print of Vec<u8> would show them.
        let dec = key[..8]
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            !text.contains(&dec),
            "{what}: contains key bytes as a Debug list"
        );
    }
}

/// The broker's key of `volume_id` (version 0 = current), fetched as the node the volume
/// is bound to (admins manage volumes and never read keys): the admin identity describes
/// the volume to learn its node, then that node's identity fetches the key.
pub fn node_key(env: &Env, broker: &Broker, volume_id: &str, version: u64) -> Vec<u8> {
    use nodecrypt_proto::keybroker::v1 as pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let node = env
            .client(broker, "admin-ops")
            .describe_volume(pb::DescribeVolumeRequest {
                volume_id: volume_id.to_string(),
            })
            .await
            .expect("admin DescribeVolume")
            .into_inner()
            .node_id;
        env.client(broker, &format!("node-{node}"))
            .get_volume_key(pb::GetVolumeKeyRequest {
                volume_id: volume_id.to_string(),
                version,
            })
            .await
            .unwrap_or_else(|e| panic!("node {node} GetVolumeKey {volume_id}: {e}"))
            .into_inner()
            .key
    })
}
