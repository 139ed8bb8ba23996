//! nodecrypt node agent: formats, opens, closes, rotates and erases LUKS2 volumes keyed
//! by the key broker; the CLI and the daemon share every flow implemented here.

pub mod device;
pub mod key;
pub mod luks;
pub mod userspace;
