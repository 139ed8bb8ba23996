//! Key lifecycle end to end: a crash (SIGKILL) at every step of format, rotate and erase,
//! then a re-run that completes; crypto-erase local and remote; rebinding between nodes.
//! Uses the agent built with the test-only `failpoints` feature
//! (`nodecrypt-agent-failpoints`, built by `make test`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodecrypt_tests::*;

fn fp_opts(point: Option<&str>, files: &[PathBuf]) -> AgentOpts {
    AgentOpts {
        file_devices: files.to_vec(),
        binary: "nodecrypt-agent-failpoints".into(),
        env: point
            .map(|p| vec![("FAILPOINTS".to_string(), format!("{p}=return"))])
            .unwrap_or_default(),
        ..Default::default()
    }
}

fn luks_json(dev: &Path) -> Option<serde_json::Value> {
    let out = Command::new("cryptsetup")
        .args(["luksDump", "--dump-json-metadata"])
        .arg(dev)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("luksDump JSON"))
}

fn admin(env: &Env, broker: &Broker, args: &[&str]) -> CliOut {
    env.admin_cli(broker, args)
}

fn describe(env: &Env, broker: &Broker, id: &str) -> serde_json::Value {
    let out = admin(env, broker, &["describe", id]).ok();
    out.json()[0].clone()
}

fn active_versions(info: &serde_json::Value) -> Vec<u64> {
    info["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "KEY_STATE_ACTIVE")
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

/// Runs `args` on an agent that dies at `point`; asserts it really died there.
fn crash_at(env: &Env, broker: &Broker, files: &[PathBuf], point: &str, args: &[&str]) {
    let mut agent = env.start_agent(&broker.addr, &fp_opts(Some(point), files));
    let out = agent.cli(args);
    assert_ne!(out.code, 0, "{point}: the command succeeded: {out:?}");
    let st = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{point}: the agent did not die"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "{point}: {st:?}");
    assert!(
        String::from_utf8_lossy(&agent.logs()).contains(point),
        "{point}: failpoint not reached"
    );
}

#[test]
fn a_crash_at_every_step_then_a_rerun_completes() {
    let env = Env::new();
    let broker = env.start_broker();
    let names = ["f0", "f1", "f2", "f3", "r0", "r1", "r2", "r3", "e0", "e1"];
    let files: Vec<PathBuf> = names
        .iter()
        .map(|n| sparse_file(&env.path().join(format!("{n}.img")), 64))
        .collect();
    let files = files.as_slice();

    // format
    for (i, point) in [
        "format-after-broker-create",
        "format-after-luksformat",
        "format-after-keyslot",
        "format-after-token",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("vol-f{i}");
        let img = env.path().join(format!("f{i}.img"));
        let args = ["format", img.to_str().unwrap(), "--volume-id", &id];
        crash_at(&env, &broker, files, point, &args);
        let agent = env.start_agent(&broker.addr, &fp_opts(None, files));
        agent.cli(&args).ok();
        let meta = luks_json(&img).expect("a LUKS2 header");
        assert_eq!(meta["keyslots"].as_object().unwrap().len(), 1, "{point}");
        assert_eq!(meta["tokens"]["0"]["volume_id"], id.as_str(), "{point}");
        let info = describe(&env, &broker, &id);
        assert_eq!(info["current_version"], 1, "{point}: {info}");
        assert_eq!(active_versions(&info), vec![1], "{point}: {info}");
        assert!(
            cryptsetup_opens(&env, &img, &node_key(&env, &broker, &id, 1)),
            "{point}"
        );
    }

    // rotate
    for (i, point) in [
        "rotate-after-broker-rotate",
        "rotate-after-add-keyslot",
        "rotate-after-token",
        "rotate-after-destroy-keyslot",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("vol-r{i}");
        let img = env.path().join(format!("r{i}.img"));
        {
            let agent = env.start_agent(&broker.addr, &fp_opts(None, files));
            agent
                .cli(&["format", img.to_str().unwrap(), "--volume-id", &id])
                .ok();
        }
        // Data "written before the crash": ciphertext in the data segment, which rotation
        // must never touch, and the volume key digest, which must not change.
        let data = vec![0xA5u8; 1 << 20];
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.seek(SeekFrom::Start(20 << 20)).unwrap();
            f.write_all(&data).unwrap();
        }
        let digest_before = luks_json(&img).unwrap()["digests"]["0"]["digest"].clone();
        let key1 = node_key(&env, &broker, &id, 1);
        crash_at(&env, &broker, files, point, &["rotate", "--volume-id", &id]);
        let agent = env.start_agent(&broker.addr, &fp_opts(None, files));
        let v = agent
            .cli(&["--json", "rotate", "--volume-id", &id])
            .ok()
            .json();
        assert_eq!(v["key_version"], 2, "{point}: {v}");
        let meta = luks_json(&img).unwrap();
        assert_eq!(
            meta["keyslots"].as_object().unwrap().len(),
            1,
            "{point}: {meta}"
        );
        assert_eq!(meta["tokens"]["0"]["key_version"], 2, "{point}");
        assert_eq!(
            meta["digests"]["0"]["digest"], digest_before,
            "{point}: volume key changed"
        );
        let info = describe(&env, &broker, &id);
        assert_eq!(info["current_version"], 2, "{point}: {info}");
        assert_eq!(
            active_versions(&info),
            vec![2],
            "{point}: orphaned version: {info}"
        );
        assert!(
            cryptsetup_opens(&env, &img, &node_key(&env, &broker, &id, 2)),
            "{point}"
        );
        assert!(
            !cryptsetup_opens(&env, &img, &key1),
            "{point}: old key still opens"
        );
        let mut back = vec![0u8; data.len()];
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = fs::File::open(&img).unwrap();
            f.seek(SeekFrom::Start(20 << 20)).unwrap();
            f.read_exact(&mut back).unwrap();
        }
        assert!(back == data, "{point}: data segment changed");
        // A rotation that completed is not repeated by accident: a new run rotates again.
        let v = agent
            .cli(&["--json", "rotate", "--volume-id", &id])
            .ok()
            .json();
        assert_eq!(v["key_version"], 3);
    }

    // erase
    for (i, point) in ["erase-after-keyslots", "erase-after-wipe"]
        .into_iter()
        .enumerate()
    {
        let id = format!("vol-e{i}");
        let img = env.path().join(format!("e{i}.img"));
        {
            let agent = env.start_agent(&broker.addr, &fp_opts(None, files));
            agent
                .cli(&["format", img.to_str().unwrap(), "--volume-id", &id])
                .ok();
        }
        let key = node_key(&env, &broker, &id, 1);
        crash_at(
            &env,
            &broker,
            files,
            point,
            &["erase", "--volume-id", &id, "--yes"],
        );
        let agent = env.start_agent(&broker.addr, &fp_opts(None, files));
        agent.cli(&["erase", "--volume-id", &id, "--yes"]).ok();
        let usable = luks_json(&img)
            .map(|m| !m["keyslots"].as_object().unwrap().is_empty())
            .unwrap_or(false);
        assert!(!usable, "{point}: a usable keyslot survived");
        assert!(
            !cryptsetup_opens(&env, &img, &key),
            "{point}: captured key still opens"
        );
        let info = describe(&env, &broker, &id);
        assert!(
            !info["destroyed_at"].as_str().unwrap().is_empty(),
            "{point}: {info}"
        );
        let out = agent.cli(&["open", img.to_str().unwrap()]);
        assert_eq!(out.code, 3, "{point}: {out:?}");
    }
}

#[test]
fn erase_destroys_everything_and_remote_erase_kills_a_copied_disk() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("a.img"), 64);
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![img.clone()],
            ..Default::default()
        },
    );
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-a"])
        .ok();
    let key = node_key(&env, &broker, "vol-a", 0);
    let out = agent.cli(&["erase", "--volume-id", "vol-a"]);
    assert_eq!(out.code, 2, "erase without --yes: {out:?}");
    assert!(
        cryptsetup_opens(&env, &img, &key),
        "refused erase changed the disk"
    );
    let v = agent
        .cli(&["--json", "erase", "--volume-id", "vol-a", "--yes"])
        .ok()
        .json();
    assert_eq!(v["state"], "erased");
    assert!(luks_json(&img).is_none(), "header survived the erase");
    assert!(!cryptsetup_opens(&env, &img, &key));
    let out = agent.cli(&["open", "--volume-id", "vol-a"]);
    assert_eq!(out.code, 4, "{out:?}");
    // Erasing again is success.
    agent.cli(&["erase", "--volume-id", "vol-a", "--yes"]).ok();

    // Remote crypto-erase: the disk image has left the rack.
    let img = sparse_file(&env.path().join("b.img"), 64);
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-b"])
        .ok();
    let elsewhere = env.path().join("stolen.img");
    fs::copy(&img, &elsewhere).unwrap();
    admin(&env, &broker, &["destroy", "vol-b", "--yes"]).ok();
    for dev in [&img, &elsewhere] {
        let out = agent.cli(&["open", dev.to_str().unwrap()]);
        assert_eq!(out.code, 3, "{out:?}");
        assert!(out.stderr.contains("destroyed at"), "{out:?}");
    }
    let state = fs::read(env.state().join("keys.redb")).unwrap_or_default();
    assert_no_key_material("broker store", &state, &[key]);
}

#[test]
fn rebind_moves_a_volume_between_nodes_and_the_audit_shows_it() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("m.img"), 64);
    let n1 = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![img.clone()],
            ..Default::default()
        },
    );
    let n2 = env.start_agent(
        &broker.addr,
        &AgentOpts {
            node: "n2".into(),
            file_devices: vec![img.clone()],
            ..Default::default()
        },
    );
    n1.cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-m"])
        .ok();
    // n2 may not touch n1's volume.
    let out = n2.cli(&["rotate", "--volume-id", "vol-m"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        !out.stderr.contains("n1"),
        "the refusal names the owner: {out:?}"
    );
    admin(
        &env,
        &broker,
        &["rebind", "vol-m", "--to", "n2", "--from", "n1"],
    )
    .ok();
    // Now n1 is refused and n2 may use the key (a rotation fetches both versions).
    let out = n1.cli(&["rotate", "--volume-id", "vol-m"]);
    assert_ne!(out.code, 0, "{out:?}");
    let v = n2
        .cli(&["--json", "rotate", "--volume-id", "vol-m"])
        .ok()
        .json();
    assert_eq!(v["key_version"], 2);
    let out = n1.cli(&["open", img.to_str().unwrap()]);
    assert!(matches!(out.code, 4 | 5), "{out:?}");

    let audit = env.state().join("audit.log");
    let lines: Vec<serde_json::Value> = fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["volume_id"] == "vol-m")
        .collect();
    let seq: Vec<String> = lines
        .iter()
        .map(|l| {
            let who = l["peer"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            format!(
                "{}:{}:{}",
                who,
                l["rpc"].as_str().unwrap(),
                l["result"].as_str().unwrap()
            )
        })
        .collect();
    let pos = |want: &str| {
        seq.iter()
            .position(|s| s == want)
            .unwrap_or_else(|| panic!("audit lacks {want}: {seq:#?}"))
    };
    let created = pos("n1:CreateVolumeKey:OK");
    let rebound = pos("ops:RebindVolumeKey:OK");
    let n2_rotated = pos("n2:RotateVolumeKey:OK");
    assert!(created < rebound && rebound < n2_rotated, "{seq:#?}");
    assert!(
        seq[rebound..]
            .iter()
            .any(|s| s.starts_with("n1:") && !s.ends_with(":OK")),
        "n1's refused fetch after the rebind is not audited: {seq:#?}"
    );
    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["audit", "verify", "--log"])
            .arg(&audit),
    );
}
