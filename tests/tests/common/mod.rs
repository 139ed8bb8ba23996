//! Request builders shared by the broker test files (`broker_keys.rs`,
//! `broker_identity.rs`, `broker_process.rs`); a directory module, so not a test binary
//! of its own.

use nodecrypt_proto::keybroker::v1 as pb;

pub fn get(volume_id: &str, version: u64) -> pb::GetVolumeKeyRequest {
    pb::GetVolumeKeyRequest {
        volume_id: volume_id.into(),
        version,
    }
}

pub fn create(volume_id: &str) -> pb::CreateVolumeKeyRequest {
    pb::CreateVolumeKeyRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}
