//! What the nodecrypt agent and key broker both stand on, so neither depends on the
//! other: TLS configurations and the peer's SPIFFE identity ([`tls`], [`identity`]), the
//! gRPC client with deadlines ([`client`]), connection bounds ([`conn`]), process
//! hardening ([`process`]), the names that cross the API, parsed once at the edge
//! ([`name`]), the one table of outcomes ([`status`]), and one way to load a config
//! ([`config`]), set up logging ([`logging`]) and stop serving ([`serve`]).

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod conn;
pub mod identity;
pub mod logging;
pub mod name;
pub mod process;
pub mod serve;
pub mod status;
pub mod tls;

pub use name::{InvalidName, VolumeId};
