//! nodecrypt node agent: formats, opens, closes, rotates and erases LUKS2 volumes keyed
//! by the key broker; the CLI, the gRPC service and boot-time unlock share every flow
//! implemented here ([`volume`]).

pub mod broker;
pub mod config;
pub mod device;
pub mod discover;
pub mod key;
pub mod luks;
pub mod mapping;
pub mod service;
pub mod userspace;
pub mod volume;
