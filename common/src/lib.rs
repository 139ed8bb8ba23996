//! What the nodecrypt agent and key broker both stand on, so neither depends on the
//! other: the names that cross the API, parsed once at the edge ([`name`]), and the one
//! table of outcomes ([`status`]).

#![forbid(unsafe_code)]

pub mod name;
pub mod status;

pub use name::{InvalidName, VolumeId};
