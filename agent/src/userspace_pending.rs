//! Placeholder until the userspace data path lands (same API).
#![allow(missing_docs)]
use std::path::{Path, PathBuf};

pub struct Geometry {
    pub data_offset: u64,
    pub data_size: u64,
    pub sector_size: u32,
}
pub enum Cipher {
    Xts(nodecrypt_xts::Engine),
}
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("in use: {what}")]
    InUse { what: String },
    #[error("the userspace backend is not available in this build")]
    Unavailable,
}
pub struct Mapping;
impl Mapping {
    pub fn mount(_: &Path, _: &Path, _: Geometry, _: Cipher, _: bool) -> Result<Mapping, Error> {
        Err(Error::Unavailable)
    }
    pub fn file(&self) -> PathBuf {
        PathBuf::new()
    }
    pub fn loop_device(&self) -> Option<PathBuf> {
        None
    }
    pub fn close(self) -> Result<(), (Mapping, Error)> {
        Ok(())
    }
}
pub fn cleanup_stale(_: &Path) -> Result<(), Error> {
    Ok(())
}
