//! What the real `cryptsetup` makes of a volume: whether a key opens it, and its
//! `luksDump` as text or as JSON metadata.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::pki::Env;
use crate::process::run_ok;

/// Whether the real `cryptsetup open --test-passphrase` accepts `key` for `dev` (the key
/// goes through a 0600 file in the test's own directory, removed at once).
pub fn cryptsetup_opens(env: &Env, dev: &Path, key: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let kf = env.path().join("keyfile");
    fs::write(&kf, key).expect("write key file");
    fs::set_permissions(&kf, fs::Permissions::from_mode(0o600)).expect("chmod key file");
    let ok = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&kf)
        .arg(dev)
        .status()
        .expect("run cryptsetup")
        .success();
    fs::remove_file(&kf).expect("remove key file");
    ok
}

/// `cryptsetup luksDump`, whitespace runs collapsed to one space (panics if it fails).
pub fn luks_dump(dev: &Path) -> String {
    squash(&run_ok(Command::new("cryptsetup").arg("luksDump").arg(dev)))
}

/// `s` with every whitespace run collapsed to one space, as [`luks_dump`] shows it.
pub fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `cryptsetup luksDump --dump-json-metadata` of `dev`, parsed (panics if it fails).
pub fn luks_json(dev: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(dev),
    );
    serde_json::from_str(&out).expect("luksDump JSON")
}
