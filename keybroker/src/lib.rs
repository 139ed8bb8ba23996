//! nodecrypt key broker: creates, wraps, stores, serves, rotates and destroys per-volume
//! keys; authenticates callers by their mTLS certificate's SPIFFE id; audits every key
//! operation. The agent reuses [`tls`], [`identity`] and [`client`] from here.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod client;
pub mod config;
pub mod conn;
pub mod identity;
pub mod keys;
pub mod pki;
pub mod process;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod validate;
pub mod wrap;

/// The current UTC time, RFC 3339 with microseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}
