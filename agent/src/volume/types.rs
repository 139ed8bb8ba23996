//! What the flows take and return: domain types, with requests already parsed (a
//! [`VolumeId`] is valid by construction). The gRPC service converts to and from the
//! wire (`service.rs`); nothing here knows protobuf.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use nodecrypt_common::VolumeId;

use super::VolumeError;
use crate::config::BackendChoice;

/// Which data path serves an open volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's dm-crypt.
    DmCrypt,
    /// The agent's XTS engine behind a FUSE file and a loop device.
    Userspace,
}

/// A live mapping of a volume, as a caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingInfo {
    /// The data path.
    pub backend: Backend,
    /// The mapping name.
    pub name: String,
    /// dm-crypt: `/dev/mapper/<name>`; userspace: the loop device, if attached.
    pub mapped_device: Option<PathBuf>,
    /// userspace: the decrypted FUSE file.
    pub mapped_file: Option<PathBuf>,
}

/// A volume's state on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Usable, not mapped.
    Closed,
    /// Mapped.
    Open(MappingInfo),
    /// Crypto-erased by this call.
    Erased,
    /// The device looks like nodecrypt's but its header is not used as it is.
    Refused {
        /// The stable reason code (`segment.offset`, …), if the error has one.
        reason: Option<&'static str>,
        /// What is wrong, naming the device and the field.
        problem: String,
    },
}

/// What the header of a usable volume says (empty for refused and erased ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The broker key version the token names.
    pub key_version: u64,
    /// Encryption sector size.
    pub sector_size: u32,
    /// Cipher spec.
    pub cipher: String,
    /// Volume key bits.
    pub key_bits: u32,
    /// LUKS2 header UUID.
    pub luks_uuid: String,
    /// The broker endpoint that formatted it (informational).
    pub broker: String,
    /// Bytes of decrypted data.
    pub data_size: u64,
}

/// A volume as the flows report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The volume id (for a refused header: the one it claims, if valid; else none).
    pub volume_id: Option<String>,
    /// The device, if known.
    pub device: Option<PathBuf>,
    /// Its state.
    pub state: State,
    /// What its header says.
    pub layout: Layout,
    /// A note for the caller (e.g. an erase that left a refused device untouched).
    pub note: Option<String>,
}

/// Format a device for a volume.
#[derive(Debug, Clone)]
pub struct FormatRequest {
    /// The device path as given (validated by the flow).
    pub device: String,
    /// The volume.
    pub volume_id: VolumeId,
    /// 512 or 4096; `None`: 4096 when the device allows it.
    pub sector_size: Option<u32>,
    /// Overwrite what the device holds.
    pub force: bool,
    /// Labels for the broker's record.
    pub labels: HashMap<String, String>,
}

/// What to open.
#[derive(Debug, Clone)]
pub enum Target {
    /// A device path (validated by the flow); `expect` is the volume it must carry.
    Device {
        /// The path as given.
        path: String,
        /// The volume the device must carry, if the caller says.
        expect: Option<VolumeId>,
    },
    /// The one device carrying this volume.
    Volume(VolumeId),
}

/// Open a volume.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// What to open.
    pub target: Target,
    /// Mapping name; `None`: `nodecrypt-<volume id>`.
    pub name: Option<String>,
    /// Data path; `None`: the agent's configured default.
    pub backend: Option<BackendChoice>,
    /// Pass discards through.
    pub allow_discards: bool,
}

/// One volume's outcome at unlock-all.
#[derive(Debug)]
pub struct UnlockResult {
    /// The volume id (claimed, for a refused header).
    pub volume_id: Option<String>,
    /// The device.
    pub device: PathBuf,
    /// Opened, or why not.
    pub result: std::result::Result<Volume, VolumeError>,
    /// How long it took.
    pub duration: Duration,
}

/// One doctor check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// A `repair-header` plan, or its outcome.
#[derive(Debug, Clone)]
pub struct Repair {
    /// The device.
    pub device: PathBuf,
    /// What is wrong (or "none").
    pub problem: String,
    /// The copy kept and the copy rewritten, when there is something to repair.
    pub copy: Option<(&'static str, &'static str)>,
    /// The byte range rewritten (or to be).
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// Written (or nothing to write) and judged usable.
    pub done: bool,
    /// The volume after the repair.
    pub volume: Option<Volume>,
}
