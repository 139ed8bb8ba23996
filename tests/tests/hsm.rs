//! The broker with its KEK sealed by an HSM (`[seal] kind = "pkcs11"`), against SoftHSM2.
//!
//! Each test makes its own token in its own directory (`SOFTHSM2_CONF` names a config
//! whose `directories.tokendir` is in the test's temporary directory, set on each child
//! process only). SoftHSM2 and OpenSC's `pkcs11-tool` are installed by
//! `scripts/deps.sh`; without them these tests fail, naming what is missing.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nodecrypt_keybroker::tls;
use nodecrypt_proto::keybroker::v1 as pb;
use nodecrypt_tests::{
    assert_no_key_material, assert_same_key, bin, client_for, file_hash, run_cli, run_ok, CliOut,
    Env, TRUST_DOMAIN,
};

/// Debian's SoftHSM2 module.
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "nodecrypt-test";
const KEY: &str = "nodecrypt-kek-wrap";
const USER_PIN: &str = "246810";
const SO_PIN: &str = "13579246";

/// A SoftHSM2 token in `<dir>/hsm`, and the broker config that uses it.
struct Hsm {
    /// `SOFTHSM2_CONF` for the children that use the token.
    conf: PathBuf,
    /// The user PIN (0600), outside the state directory (a systemd credential, in life).
    pin_file: PathBuf,
}

impl Hsm {
    /// A fresh token labelled [`TOKEN`] with user PIN [`USER_PIN`].
    fn new(env: &Env) -> Hsm {
        assert!(
            Path::new(MODULE).is_file(),
            "{MODULE} is missing: SoftHSM2 is needed for these tests (scripts/deps.sh installs softhsm2)"
        );
        let dir = env.path().join("hsm");
        let conf = softhsm_conf(&dir.join("tokens"), &dir.join("softhsm2.conf"));
        run_ok(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", TOKEN])
                .args(["--so-pin", SO_PIN, "--pin", USER_PIN]),
        );
        let secrets = env.path().join("credentials");
        fs::create_dir_all(&secrets).unwrap();
        let pin_file = secrets.join("hsm-pin");
        write_private(&pin_file, &format!("{USER_PIN}\n"));
        Hsm { conf, pin_file }
    }

    /// Deletes the wrapping key from the token (OpenSC's `pkcs11-tool`).
    fn delete_key(&self) {
        assert!(
            Command::new("pkcs11-tool")
                .arg("--version")
                .output()
                .is_ok(),
            "pkcs11-tool is missing (scripts/deps.sh installs opensc)"
        );
        run_ok(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.conf)
                .args(["--module", MODULE, "--token-label", TOKEN, "--login"])
                .args(["--pin", USER_PIN, "--delete-object", "--type", "secrkey"])
                .args(["--label", KEY]),
        );
    }
}

/// Writes a SoftHSM2 config at `conf` keeping tokens in `tokendir` (created).
fn softhsm_conf(tokendir: &Path, conf: &Path) -> PathBuf {
    fs::create_dir_all(tokendir).unwrap();
    fs::write(
        conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokendir.display()
        ),
    )
    .unwrap();
    conf.to_path_buf()
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// The `[seal]` fields of a test config.
struct SealFields {
    module: String,
    token: String,
    key: String,
    pin_file: PathBuf,
}

impl SealFields {
    fn of(hsm: &Hsm) -> Self {
        SealFields {
            module: MODULE.into(),
            token: TOKEN.into(),
            key: KEY.into(),
            pin_file: hsm.pin_file.clone(),
        }
    }
}

/// Writes `<dir>/<name>`: a broker config for `state` sealed by `seal`.
fn broker_config(env: &Env, name: &str, state: &Path, seal: &SealFields) -> PathBuf {
    let t = env.tls_files("broker");
    let path = env.path().join(name);
    fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{}\"\n\n\
             [seal]\nkind = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\nkey_label = \"{}\"\n\
             pin_file = \"{}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            state.display(),
            seal.module,
            seal.token,
            seal.key,
            seal.pin_file.display(),
            t.cert.display(),
            t.key.display(),
            t.ca.display()
        ),
    )
    .unwrap();
    path
}

/// `nodecrypt-keybroker <args…>` with `SOFTHSM2_CONF=conf`.
fn broker_cli(conf: &Path, args: &[&str]) -> CliOut {
    let mut cmd = Command::new(bin("nodecrypt-keybroker"));
    cmd.env("SOFTHSM2_CONF", conf).args(args);
    run_cli(cmd)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A broker serving from an HSM-sealed state; SIGTERM and reaped on drop.
struct HsmBroker {
    child: Child,
    addr: String,
}

impl Drop for HsmBroker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Starts `serve --config config` with `SOFTHSM2_CONF=conf`, its stderr appended to `log`;
/// `Err(log)` if it exits before it is ready (it prints one JSON line on stdout then).
fn start(config: &Path, conf: &Path, log: &Path) -> Result<HsmBroker, String> {
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(bin("nodecrypt-keybroker"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .env("SOFTHSM2_CONF", conf)
        .env("NODECRYPT_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(v) => Ok(HsmBroker {
            addr: v["listen"].as_str().expect("listen address").to_string(),
            child,
        }),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(fs::read_to_string(log).unwrap_or_default())
        }
    }
}

fn client(
    env: &Env,
    b: &HsmBroker,
    stem: &str,
) -> pb::key_broker_client::KeyBrokerClient<tonic::transport::Channel> {
    let cfg = tls::client_config(&env.tls_files(stem)).expect("client TLS config");
    client_for(&b.addr, Arc::new(cfg))
}

/// SHA-256 of every file under `dir`, by path: what "wrote nothing" is checked against
/// (a new file, a removed one or a changed byte all show).
fn tree_hashes(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), file_hash(&p));
            }
        }
    }
    out
}

/// Every file under `dir`, with its contents.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    tree_hashes(dir)
        .into_keys()
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// A state directory sealed into a fresh token by `init --seal pkcs11 --create-key`.
fn sealed_state(env: &Env) -> (Hsm, PathBuf, PathBuf) {
    let hsm = Hsm::new(env);
    let state = env.path().join("state");
    let config = broker_config(env, "broker-hsm.toml", &state, &SealFields::of(&hsm));
    let out = broker_cli(
        &hsm.conf,
        &[
            "init",
            "--seal",
            "pkcs11",
            "--config",
            path_str(&config),
            "--create-key",
        ],
    );
    assert_eq!(out.code, 0, "init: {}{}", out.stdout, out.stderr);
    (hsm, state, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pkcs11_sealed_broker_serves_keys_and_its_kek_is_in_no_file() {
    let env = Env::new();
    let hsm = Hsm::new(&env);
    // How the test knows the KEK's bytes, to look for them, without any test-only path in
    // the broker: the wrapping key cannot leave the HSM, and a KEK made by
    // `init --seal pkcs11` exists in plaintext only inside the broker's memory. So the
    // test makes the KEK the way an operator moving a dev broker to an HSM would: a KEK
    // file, outside the broker's state, sealed into the HSM with `--import-kek` (the
    // production migration), then deleted. From then on the test holds the only copy
    // outside the HSM's seal, and the broker's start is the ordinary one: unseal the
    // sealed KEK from the store's metadata through the HSM. That the bytes are the KEK
    // the broker uses is checked through its id (a hash of the bytes), which the store
    // records and `status` reports.
    let staging = env.path().join("kek-staging");
    let made = run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["init", "--state-dir"])
            .arg(&staging),
    );
    let kek_file = staging.join("kek");
    let kek_bytes = fs::read(&kek_file).unwrap();
    assert_eq!(kek_bytes.len(), 32);
    let kek_id = made.split_whitespace().nth(2).unwrap().to_string();
    assert!(kek_id.starts_with("kek-"), "{made}");

    let state = env.path().join("state");
    let config = broker_config(&env, "broker-hsm.toml", &state, &SealFields::of(&hsm));
    let init = broker_cli(
        &hsm.conf,
        &[
            "init",
            "--seal",
            "pkcs11",
            "--config",
            path_str(&config),
            "--create-key",
            "--import-kek",
            path_str(&kek_file),
        ],
    );
    assert_eq!(init.code, 0, "init: {}{}", init.stdout, init.stderr);
    assert!(init.stdout.contains(&kek_id), "{}", init.stdout);
    fs::remove_dir_all(&staging).unwrap();
    assert!(
        !state.join("kek").exists(),
        "no KEK file in the state directory"
    );

    let log = env.path().join("broker.log");
    let broker = start(&config, &hsm.conf, &log).unwrap_or_else(|e| panic!("broker: {e}"));
    let mut n1 = client(&env, &broker, "node-n1");
    let mut volume_keys = Vec::new();
    for v in ["vol-hsm-a", "vol-hsm-b"] {
        let created = n1
            .create_volume_key(pb::CreateVolumeKeyRequest {
                volume_id: v.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let fetched = n1
            .get_volume_key(pb::GetVolumeKeyRequest {
                volume_id: v.into(),
                version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_same_key(v, &fetched.key, &created.key);
        volume_keys.push(created.key);
    }
    let info = client(&env, &broker, "admin-ops")
        .describe_volume(pb::DescribeVolumeRequest {
            volume_id: "vol-hsm-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.kek_id, kek_id, "records name the sealed KEK");
    drop(broker);

    // Keys survive a restart through the HSM again.
    let broker = start(&config, &hsm.conf, &log).unwrap_or_else(|e| panic!("restart: {e}"));
    let again = client(&env, &broker, "node-n1")
        .get_volume_key(pb::GetVolumeKeyRequest {
            volume_id: "vol-hsm-a".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_same_key("after restart", &again.key, &volume_keys[0]);
    drop(broker);

    let status = broker_cli(
        &hsm.conf,
        &["status", "--config", path_str(&config), "--json"],
    );
    assert_eq!(status.code, 0, "status: {}{}", status.stdout, status.stderr);
    let st = status.json();
    assert_eq!(st["seal"], "pkcs11");
    assert_eq!(st["hsm_reachable"], true);
    assert_eq!(st["kek_id"], kek_id.as_str());
    assert_eq!(st["store_kek_id"], kek_id.as_str());
    assert_eq!(st["volumes"], 2);
    assert_eq!(st["wrapped_keys_by_kek"][&kek_id], 2);
    let human = broker_cli(&hsm.conf, &["status", "--config", path_str(&config)]);
    assert!(human.stdout.contains("hsm: reachable"), "{}", human.stdout);

    // The KEK's bytes are in no file the broker or its tools touched: the state directory
    // (store, audit log), the logs, the configs, the token's own files (the HSM holds
    // only the wrapping key, never the KEK), nor in what init and status printed.
    let secrets = [kek_bytes.clone()];
    let files = all_files(env.path());
    assert!(files.iter().any(|(p, _)| p.ends_with("keys.redb")));
    assert!(files.iter().any(|(p, _)| p.ends_with("audit.log")));
    assert!(files.iter().any(|(p, _)| p.ends_with("broker.log")));
    for (path, bytes) in &files {
        assert_no_key_material(&path.display().to_string(), bytes, &secrets);
    }
    for (what, out) in [
        ("init", &init),
        ("status --json", &status),
        ("status", &human),
    ] {
        assert_no_key_material(
            what,
            format!("{}{}", out.stdout, out.stderr).as_bytes(),
            &secrets,
        );
        assert_no_key_material(
            what,
            format!("{}{}", out.stdout, out.stderr).as_bytes(),
            &volume_keys,
        );
    }
    // Nor the volume keys, in the state directory or the logs.
    for (path, bytes) in &files {
        assert_no_key_material(&path.display().to_string(), bytes, &volume_keys);
    }
}

#[test]
fn init_is_idempotent_and_never_overwrites_a_wrapping_key() {
    let env = Env::new();
    let (hsm, state, config) = sealed_state(&env);
    let before = tree_hashes(&state);
    let kek_line = broker_cli(
        &hsm.conf,
        &["status", "--config", path_str(&config), "--json"],
    )
    .json();
    let kek_id = kek_line["kek_id"].as_str().unwrap().to_string();

    // A second init, with or without --create-key: says so, changes nothing.
    for extra in [&["--create-key"][..], &[][..]] {
        let mut args = vec!["init", "--seal", "pkcs11", "--config", path_str(&config)];
        args.extend_from_slice(extra);
        let out = broker_cli(&hsm.conf, &args);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("nothing to do") && out.stdout.contains(&kek_id),
            "{}",
            out.stdout
        );
        assert_eq!(tree_hashes(&state), before, "a second init wrote nothing");
    }

    // Another state directory on the same token: --create-key refuses the existing key
    // (it seals the first broker's KEK), and writes no store.
    let other = env.path().join("state-2");
    let config2 = broker_config(&env, "broker-2.toml", &other, &SealFields::of(&hsm));
    let out = broker_cli(
        &hsm.conf,
        &[
            "init",
            "--seal",
            "pkcs11",
            "--config",
            path_str(&config2),
            "--create-key",
        ],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("already holds a key labelled") && out.stderr.contains(KEY),
        "{}",
        out.stderr
    );
    assert!(!other.exists(), "a refused init creates no state");
    // Without --create-key it seals a second KEK under the same wrapping key.
    let out = broker_cli(
        &hsm.conf,
        &["init", "--seal", "pkcs11", "--config", path_str(&config2)],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains(&kek_id), "a new KEK: {}", out.stdout);
    // The first broker's state is untouched throughout.
    assert_eq!(tree_hashes(&state), before);

    // A store written under a file KEK: sealing a new KEK for it is refused (its records
    // would not open), and nothing is written; --import-kek of that file is the way.
    drop(env.start_broker());
    let file_state = env.state();
    let file_before = tree_hashes(&file_state);
    let config3 = broker_config(&env, "broker-3.toml", &file_state, &SealFields::of(&hsm));
    let out = broker_cli(
        &hsm.conf,
        &["init", "--seal", "pkcs11", "--config", path_str(&config3)],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("was written with KEK") && out.stderr.contains("--import-kek"),
        "{}",
        out.stderr
    );
    assert_eq!(
        tree_hashes(&file_state),
        file_before,
        "a refused init wrote nothing"
    );

    // --seal pkcs11 with a config that says file is refused, naming the config.
    let file_cfg = env.broker_config();
    let out = broker_cli(
        &hsm.conf,
        &["init", "--seal", "pkcs11", "--config", path_str(&file_cfg)],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not \"pkcs11\""), "{}", out.stderr);
}

/// Starts `serve`, which must fail naming `cause`s; every file of `state` unchanged.
fn assert_refused(env: &Env, config: &Path, conf: &Path, state: &Path, causes: &[&str]) -> String {
    let before = tree_hashes(state);
    let log = env.path().join(format!(
        "refused-{}.log",
        config.file_stem().unwrap().to_str().unwrap()
    ));
    let err = match start(config, conf, &log) {
        Ok(_) => panic!("the broker started with {}", config.display()),
        Err(e) => e,
    };
    for c in causes {
        assert!(err.contains(c), "the error should name {c:?}: {err}");
    }
    assert!(err.contains("refusing to start"), "{err}");
    assert_eq!(
        tree_hashes(state),
        before,
        "a refused start wrote nothing: {err}"
    );
    let st = broker_cli(conf, &["status", "--config", path_str(config), "--json"]);
    assert_eq!(
        st.code, 1,
        "status of a broker that cannot start: {}",
        st.stdout
    );
    assert_eq!(st.json()["ok"], false);
    assert_eq!(tree_hashes(state), before, "status wrote nothing either");
    err
}

#[test]
fn a_copy_of_the_state_without_the_hsm_refuses_to_start_and_writes_nothing() {
    let env = Env::new();
    let (hsm, state, config) = sealed_state(&env);
    let log = env.path().join("broker.log");
    // Serve once, so the copy has records and an audit log.
    let b = start(&config, &hsm.conf, &log).unwrap_or_else(|e| panic!("broker: {e}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        client(&env, &b, "node-n1")
            .create_volume_key(pb::CreateVolumeKeyRequest {
                volume_id: "vol-copied".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    drop(b);

    // The stolen copy: store, audit log, the config and even the PIN file, but another
    // machine's (empty) token directory.
    let copy = env.path().join("elsewhere");
    fs::create_dir_all(&copy).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&state)
            .arg(copy.join("state")),
    );
    let copied_state = copy.join("state");
    assert!(copied_state.join("audit.log").exists());
    let no_hsm = softhsm_conf(&copy.join("tokens"), &copy.join("softhsm2.conf"));
    let config2 = broker_config(
        &env,
        "broker-copy.toml",
        &copied_state,
        &SealFields::of(&hsm),
    );
    let err = assert_refused(
        &env,
        &config2,
        &no_hsm,
        &copied_state,
        &[TOKEN, "is not present"],
    );
    assert!(!err.contains(USER_PIN), "the PIN is never printed");

    // The original, with its HSM, still serves.
    drop(start(&config, &hsm.conf, &log).unwrap_or_else(|e| panic!("original: {e}")));
}

#[test]
fn hsm_faults_at_start_are_named_and_write_nothing() {
    let env = Env::new();
    let (hsm, state, config) = sealed_state(&env);
    let seal = || SealFields::of(&hsm);

    // The module is missing (a wrong path, or the HSM's library not installed).
    let missing = "/usr/lib/softhsm/libsofthsm2-absent.so";
    let c = broker_config(
        &env,
        "bad-module.toml",
        &state,
        &SealFields {
            module: missing.into(),
            ..seal()
        },
    );
    assert_refused(&env, &c, &hsm.conf, &state, &[missing, "cannot load it"]);

    // The token is absent (no token of that label).
    let c = broker_config(
        &env,
        "bad-token.toml",
        &state,
        &SealFields {
            token: "no-such-token".into(),
            ..seal()
        },
    );
    assert_refused(
        &env,
        &c,
        &hsm.conf,
        &state,
        &["\"no-such-token\" is not present"],
    );

    // A wrong PIN: named as such, with the file it came from, and never printed.
    let wrong = env.path().join("credentials").join("wrong-pin");
    write_private(&wrong, "999999\n");
    let c = broker_config(
        &env,
        "bad-pin.toml",
        &state,
        &SealFields {
            pin_file: wrong.clone(),
            ..seal()
        },
    );
    let err = assert_refused(
        &env,
        &c,
        &hsm.conf,
        &state,
        &["refused the PIN", "incorrect", path_str(&wrong)],
    );
    assert!(!err.contains("999999") && !err.contains(USER_PIN), "{err}");

    // The right PIN still works (a wrong one did not lock the token).
    let log = env.path().join("broker.log");
    drop(start(&config, &hsm.conf, &log).unwrap_or_else(|e| panic!("broker: {e}")));

    // The wrapping key was deleted: the sealed KEK cannot be opened.
    hsm.delete_key();
    assert_refused(
        &env,
        &config,
        &hsm.conf,
        &state,
        &["holds no AES key labelled", KEY, "wrapping key is gone"],
    );
}

#[test]
fn a_pin_file_readable_by_others_is_refused() {
    let env = Env::new();
    let (hsm, state, config) = sealed_state(&env);
    fs::set_permissions(&hsm.pin_file, fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(
        &env,
        &config,
        &hsm.conf,
        &state,
        &[path_str(&hsm.pin_file), "mode 644", "0600 or stricter"],
    );
    // init refuses it too, before it asks the HSM anything.
    let out = broker_cli(
        &hsm.conf,
        &["init", "--seal", "pkcs11", "--config", path_str(&config)],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(path_str(&hsm.pin_file)),
        "{}",
        out.stderr
    );
    // 0400 (a systemd credential's mode) is fine.
    fs::set_permissions(&hsm.pin_file, fs::Permissions::from_mode(0o400)).unwrap();
    drop(
        start(&config, &hsm.conf, &env.path().join("broker.log"))
            .unwrap_or_else(|e| panic!("0400: {e}")),
    );
}
