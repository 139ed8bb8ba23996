//! What the key flows refuse or fail with: [`KeysError`].

use crate::authz::Denied;
use crate::store::StoreError;
use crate::wrap::WrapError;

/// Why a flow refused or failed. Each variant names the volume; its message is what the
/// caller is told.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The caller may not do this to this volume (the message never names the node the
    /// volume is bound to).
    #[error("{reason}")]
    Denied {
        /// The volume (empty for a listing).
        volume_id: String,
        /// Why, phrased for the caller.
        reason: Denied,
    },
    /// The broker has no record of the volume.
    #[error("volume {volume_id} has no key at this broker")]
    NotFound {
        /// The volume.
        volume_id: String,
    },
    /// A key read named a version the volume never had.
    #[error("volume {volume_id} has no key version {version} (current is {current})")]
    NoVersion {
        /// The volume.
        volume_id: String,
        /// The version asked for.
        version: u64,
        /// The volume's current version.
        current: u64,
    },
    /// A retire named a version the volume never had.
    #[error("volume {volume_id} has no key version {version}")]
    NoVersionToRetire {
        /// The volume.
        volume_id: String,
        /// The version asked for.
        version: u64,
    },
    /// The volume was destroyed (crypto-erased): only its tombstone is left.
    #[error("volume {volume_id} was destroyed at {at}: its key no longer exists and its data is unrecoverable")]
    Destroyed {
        /// The volume.
        volume_id: String,
        /// When (RFC 3339).
        at: String,
    },
    /// A key read named a retired version, whose key is gone.
    #[error("version {version} of volume {volume_id} was retired at {retired_at}; use the current version {current}")]
    Retired {
        /// The volume.
        volume_id: String,
        /// The retired version.
        version: u64,
        /// When it was retired (RFC 3339, or `?`).
        retired_at: String,
        /// The volume's current version.
        current: u64,
    },
    /// An active version has no wrapped key: the record is damaged.
    #[error("volume {volume_id} version {version}: active but no wrapped key is stored")]
    ActiveWithoutKey {
        /// The volume.
        volume_id: String,
        /// The version.
        version: u64,
    },
    /// A create of a volume that exists, bound to another node than the one asked for.
    #[error("volume {volume_id} already exists, bound to node {node_id}; rebind it instead")]
    BoundElsewhere {
        /// The volume.
        volume_id: String,
        /// The node it is bound to.
        node_id: String,
    },
    /// A rotate expected a newer current version than the broker has.
    #[error(
        "volume {volume_id}: expected current version {expected}, but the broker's is {current}"
    )]
    AheadOfBroker {
        /// The volume.
        volume_id: String,
        /// What the caller expected.
        expected: u64,
        /// The broker's current version.
        current: u64,
    },
    /// A rotate of a volume at [`crate::validate::MAX_VERSION`].
    #[error("volume {volume_id}: no versions left")]
    NoVersionsLeft {
        /// The volume.
        volume_id: String,
    },
    /// A retire of the current version.
    #[error(
        "version {version} is the current version of volume {volume_id}; rotate before retiring it"
    )]
    RetireCurrent {
        /// The volume.
        volume_id: String,
        /// The current version.
        version: u64,
    },
    /// A rebind expected the volume on another node than the one it is bound to.
    #[error("volume {volume_id} is bound to node {bound}, not {expected}")]
    NotOnExpectedNode {
        /// The volume.
        volume_id: String,
        /// The node it is bound to.
        bound: String,
        /// The node the caller expected.
        expected: String,
    },
    /// Every compare-and-swap of [`super::CAS_ATTEMPTS`] lost to a concurrent update.
    #[error("volume {volume_id}: too much contention, retry")]
    Contention {
        /// The volume.
        volume_id: String,
    },
    /// The store failed.
    #[error("{source}")]
    Store {
        /// The volume (empty for a listing).
        volume_id: String,
        /// What failed.
        source: StoreError,
    },
    /// Generating, wrapping or unwrapping a key failed.
    #[error("{source}")]
    Wrap {
        /// The volume.
        volume_id: String,
        /// What failed.
        source: WrapError,
    },
}
