//! The nodecrypt gRPC contracts: `nodecrypt.keybroker.v1` and `nodecrypt.agent.v1`.
//!
//! Contracts only: the generated messages and services, the descriptor set that
//! reflection serves, and the strict codec every service uses (unknown fields are
//! rejected with `INVALID_ARGUMENT` instead of being silently dropped).
#![forbid(unsafe_code)]
#![allow(missing_docs)] // generated code carries the proto comments, not rustdoc on every item

pub mod codec;

/// The encoded `FileDescriptorSet` of both packages, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nodecrypt_descriptor.bin"));

/// `nodecrypt.keybroker.v1`
pub mod keybroker {
    /// `nodecrypt.keybroker.v1`
    pub mod v1 {
        tonic::include_proto!("nodecrypt.keybroker.v1");

        impl std::fmt::Debug for VolumeKey {
            /// Prints the metadata and the key's length, never a key byte.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("VolumeKey")
                    .field("volume_id", &self.volume_id)
                    .field("version", &self.version)
                    .field("key", &format_args!("<redacted {} bytes>", self.key.len()))
                    .field("current_version", &self.current_version)
                    .finish()
            }
        }
    }
}

/// `nodecrypt.agent.v1`
pub mod agent {
    /// `nodecrypt.agent.v1`
    pub mod v1 {
        tonic::include_proto!("nodecrypt.agent.v1");
    }
}

#[cfg(test)]
mod tests {
    use super::keybroker::v1::VolumeKey;

    #[test]
    fn volume_key_debug_never_prints_key_bytes() {
        let k = VolumeKey {
            volume_id: "vol-a".into(),
            version: 3,
            key: vec![0xAB; 64],
            current_version: 3,
        };
        let s = format!("{k:?}");
        assert!(
            s.contains("vol-a") && s.contains("redacted 64 bytes"),
            "{s}"
        );
        assert!(
            !s.to_lowercase().contains("ab, ") && !s.contains("171"),
            "{s}"
        );
    }
}
