//! nodecrypt key broker: creates, wraps, stores, serves, rotates and destroys per-volume
//! keys; authenticates callers by their mTLS certificate's SPIFFE id; audits every key
//! operation. TLS, identity, the client, connection bounds and process hardening live in
//! `nodecrypt-common` (re-exported here under their old paths), which the agent shares.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod config;
pub mod keys;
pub mod pki;
pub mod seal;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;
pub mod wrap;

pub use nodecrypt_common::{client, conn, identity, process, tls};

/// The current UTC time, RFC 3339 with microseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}
