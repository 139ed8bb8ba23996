//! Harness for the end-to-end tests in `tests/tests/` (and the broker bench): runs the
//! real binaries (built by `make test` before the tests), waits for readiness (never
//! sleeps), and gives each test a private directory, PKI and broker on 127.0.0.1 with a
//! kernel-chosen port.
//!
//! One module per concern, all re-exported here so that `use nodecrypt_tests::*;` is all
//! a test needs:
//!
//! - [`process`]: where the binaries are, [`run_with_deadline`], [`spawn_ready`] (the
//!   readiness line), reaping with a deadline, and the CLI runner;
//! - [`pki`]: [`Env`] (the test's directory and dev PKI), TLS files and broker clients;
//! - [`broker`] and [`agent`]: starting, stopping and crashing the two daemons;
//! - [`volumes`]: sparse files, loop devices, file hashes, [`SmallFs`];
//! - [`cryptsetup`]: what the real `cryptsetup` makes of a volume;
//! - [`keys`]: comparing and looking for keys without printing them;
//! - [`luks2`]: an independent LUKS2 header codec for building hostile images.

pub mod agent;
pub mod broker;
pub mod cryptsetup;
pub mod etcd;
pub mod keys;
pub mod luks2;
pub mod pki;
pub mod process;
pub mod volumes;

pub use agent::{Agent, AgentOpts};
pub use broker::Broker;
pub use cryptsetup::{cryptsetup_opens, luks_dump, luks_json, squash};
pub use keys::{assert_no_key_material, assert_other_key, assert_same_key, node_key};
pub use pki::{client_for, Env, TRUST_DOMAIN};
pub use process::{
    bin, profile_dir, run_cli, run_ok, run_with_deadline, spawn_ready, stop_within,
    wait_with_deadline, CliOut,
};
pub use volumes::{file_hash, sparse_file, LoopDev, SmallFs};
