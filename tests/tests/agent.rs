//! End-to-end tests of the node agent and the `nodecrypt` CLI against the real broker,
//! with the real `cryptsetup` CLI as an independent checker.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodecrypt_keybroker::{client, tls};
use nodecrypt_proto::agent::v1 as pb;
use nodecrypt_tests::*;

fn no_keys_in_logs(env: &Env, broker: &Broker, agent: &Agent, keys: &[Vec<u8>]) {
    assert_no_key_material("agent log", &agent.logs(), keys);
    assert_no_key_material("broker log", &fs::read(&broker.log).unwrap(), keys);
    assert_no_key_material(
        "audit log",
        &fs::read(env.state().join("audit.log")).unwrap(),
        keys,
    );
}

#[test]
fn format_file_and_loop_volumes_that_cryptsetup_opens() {
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());
    let file = sparse_file(&env.path().join("file.img"), 64);
    let lo_img = sparse_file(&env.path().join("loop.img"), 64);
    let lo = LoopDev::attach(&lo_img);

    let v = agent
        .cli(&[
            "--json",
            "format",
            file.to_str().unwrap(),
            "--volume-id",
            "vol-file",
        ])
        .ok()
        .json();
    assert_eq!(v["state"], "closed");
    assert_eq!(v["key_version"], 1);
    assert_eq!(v["sector_size"], 4096);
    assert_eq!(v["cipher"], "aes-xts-plain64");
    assert_eq!(v["key_bits"], 512);
    agent
        .cli(&[
            "format",
            lo.path.to_str().unwrap(),
            "--volume-id",
            "vol-loop",
            "--sector-size",
            "512",
        ])
        .ok();

    let mut keys = Vec::new();
    for (dev, id, sector) in [
        (file.clone(), "vol-file", 4096),
        (lo.path.clone(), "vol-loop", 512),
    ] {
        let dump = luks_dump(&dev);
        for want in [
            "Version: 2".to_string(),
            format!("Label:          {id}"),
            "Subsystem:      nodecrypt".into(),
            "cipher: aes-xts-plain64".into(),
            format!("sector: {sector} [bytes]"),
            "Key:        512 bits".into(),
            "PBKDF:      pbkdf2".into(),
            "nodecrypt".into(),
        ] {
            assert!(
                dump.contains(&squash(&want)),
                "{id}: luksDump lacks {want:?}:\n{dump}"
            );
        }
        let meta = luks_json(&dev);
        let tokens = meta["tokens"].as_object().unwrap();
        assert_eq!(tokens.len(), 1, "{meta}");
        let t = tokens.values().next().unwrap();
        assert_eq!(t["type"], "nodecrypt");
        assert_eq!(t["volume_id"], id);
        assert_eq!(t["key_version"], 1);
        assert_eq!(t["keyslots"], serde_json::json!(["0"]));
        assert_eq!(meta["keyslots"].as_object().unwrap().len(), 1);
        let key = node_key(&env, &broker, id, 0);
        assert_eq!(key.len(), 64);
        assert!(
            cryptsetup_opens(&env, &dev, &key),
            "{id}: broker key refused"
        );
        let mut wrong = key.clone();
        wrong[0] ^= 1;
        assert!(
            !cryptsetup_opens(&env, &dev, &wrong),
            "{id}: wrong key accepted"
        );
        keys.push(key);
    }

    // Formatting again is a no-op success: not one byte changes.
    let before = file_hash(&file);
    let again = agent
        .cli(&[
            "--json",
            "format",
            file.to_str().unwrap(),
            "--volume-id",
            "vol-file",
        ])
        .ok()
        .json();
    assert_eq!(again["luks_uuid"], v["luks_uuid"]);
    assert_eq!(file_hash(&file), before);

    // status lists both.
    let st = agent.cli(&["--json", "status"]).ok().json();
    let ids: Vec<&str> = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"vol-loop"), "{st}");
    drop(lo);
    no_keys_in_logs(&env, &broker, &agent, &keys);
}

#[test]
fn format_refuses_devices_holding_data_and_changes_nothing() {
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());

    let ext4 = sparse_file(&env.path().join("ext4.img"), 64);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&ext4));
    let gpt = sparse_file(&env.path().join("gpt.img"), 64);
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo 'label: gpt' | sfdisk -q {}", gpt.display())),
    );
    let foreign = sparse_file(&env.path().join("foreign.img"), 64);
    let kf = env.path().join("foreign.key");
    fs::write(&kf, b"not a nodecrypt key").unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
            ])
            .arg(&kf)
            .arg(&foreign),
    );

    for (img, what) in [
        (&ext4, "ext4"),
        (&gpt, "gpt partition table"),
        (&foreign, "LUKS2 volume"),
    ] {
        let before = file_hash(img);
        let out = agent.cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-x"]);
        assert_eq!(out.code, 3, "{what}: {out:?}");
        assert!(
            out.stderr.contains(what),
            "{what}: message does not name it: {out:?}"
        );
        assert!(out.stderr.contains("--force"), "{out:?}");
        assert_eq!(file_hash(img), before, "{what}: device changed");
    }
    // Another nodecrypt volume is refused too, naming it.
    let other = sparse_file(&env.path().join("other.img"), 64);
    agent
        .cli(&["format", other.to_str().unwrap(), "--volume-id", "vol-a"])
        .ok();
    let before = file_hash(&other);
    let out = agent.cli(&["format", other.to_str().unwrap(), "--volume-id", "vol-b"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("vol-a"), "{out:?}");
    assert_eq!(file_hash(&other), before);

    // --force overrides the signature check, and only that.
    agent
        .cli(&[
            "format",
            ext4.to_str().unwrap(),
            "--volume-id",
            "vol-x",
            "--force",
        ])
        .ok();
    assert!(luks_dump(&ext4).contains("Label: vol-x"));
}

#[test]
fn bad_input_is_a_clean_error_and_writes_nothing() {
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());
    let img = sparse_file(&env.path().join("ok.img"), 64);
    let dir = env.path().join("a-dir");
    fs::create_dir(&dir).unwrap();
    let small = sparse_file(&env.path().join("small.img"), 16);
    let missing = env.path().join("missing.img");
    let dotdot = format!(
        "{}/../{}/ok.img",
        env.path().display(),
        env.path().file_name().unwrap().to_str().unwrap()
    );
    let cases: Vec<(String, String, i32, &str)> = vec![
        (
            missing.display().to_string(),
            "vol-a".into(),
            4,
            "no such device",
        ),
        (dir.display().to_string(), "vol-a".into(), 2, "directory"),
        ("/dev/null".into(), "vol-a".into(), 2, "character device"),
        ("/dev/zero".into(), "vol-a".into(), 2, "character device"),
        ("ok.img".into(), "vol-a".into(), 2, "absolute"),
        (dotdot, "vol-a".into(), 2, ".."),
        (small.display().to_string(), "vol-a".into(), 3, "32 MiB"),
        (img.display().to_string(), "".into(), 2, "invalid volume id"),
        (
            img.display().to_string(),
            "Vol-A".into(),
            2,
            "invalid volume id",
        ),
        (
            img.display().to_string(),
            "-vol".into(),
            2,
            "invalid volume id",
        ),
        (
            img.display().to_string(),
            "a".repeat(64),
            2,
            "invalid volume id",
        ),
        (
            img.display().to_string(),
            "vol/../x".into(),
            2,
            "invalid volume id",
        ),
        (
            img.display().to_string(),
            "vol_x".into(),
            2,
            "invalid volume id",
        ),
        (
            img.display().to_string(),
            "vol x".into(),
            2,
            "invalid volume id",
        ),
    ];
    let before = file_hash(&img);
    for (device, id, code, msg) in &cases {
        let out = agent.cli(&["format", device, &format!("--volume-id={id}")]);
        assert_eq!(out.code, *code, "format {device:?} {id:?}: {out:?}");
        assert!(
            out.stderr.contains(msg),
            "format {device:?} {id:?}: want {msg:?}: {out:?}"
        );
    }
    assert_eq!(
        file_hash(&img),
        before,
        "a refused request wrote to the device"
    );
    let out = agent.cli(&[
        "format",
        img.to_str().unwrap(),
        "--volume-id",
        "vol-a",
        "--sector-size",
        "1024",
    ]);
    assert_eq!(out.code, 2, "{out:?}");

    // Open: truncated header, foreign token, not LUKS, destroyed at the broker.
    agent
        .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-a"])
        .ok();
    let trunc = env.path().join("trunc.img");
    let mut head = fs::read(&img).unwrap();
    head.truncate(6000);
    fs::write(&trunc, &head).unwrap();
    let out = agent.cli(&["open", trunc.to_str().unwrap()]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("LUKS2"), "{out:?}");

    let foreign = sparse_file(&env.path().join("foreign.img"), 64);
    let kf = env.path().join("f.key");
    fs::write(&kf, b"k").unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
            ])
            .arg(&kf)
            .arg(&foreign),
    );
    let tok = env.path().join("tok.json");
    fs::write(
        &tok,
        r#"{"type":"other","keyslots":["0"],"volume_id":"vol-a","key_version":1}"#,
    )
    .unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args(["token", "import", "--json-file"])
            .arg(&tok)
            .arg(&foreign),
    );
    let fb = file_hash(&foreign);
    let out = agent.cli(&["open", foreign.to_str().unwrap()]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("not a nodecrypt volume"), "{out:?}");
    assert_eq!(file_hash(&foreign), fb);

    let plain = sparse_file(&env.path().join("plain.img"), 64);
    let out = agent.cli(&["open", plain.to_str().unwrap()]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("not a LUKS2 volume"), "{out:?}");

    let out = agent.cli(&["open", "--volume-id", "vol-nowhere"]);
    assert_eq!(out.code, 4, "{out:?}");

    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["admin", "--endpoint", &broker.addr])
            .arg("--cert")
            .arg(env.tls_files("admin-ops").cert)
            .arg("--key")
            .arg(env.tls_files("admin-ops").key)
            .arg("--ca")
            .arg(env.tls_files("admin-ops").ca)
            .args(["destroy", "vol-a", "--yes"]),
    );
    let out = agent.cli(&["open", img.to_str().unwrap()]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("destroyed"), "{out:?}");
    // Usage errors.
    assert_eq!(agent.cli(&["open"]).code, 2);
    assert_eq!(agent.cli(&["frobnicate"]).code, 2);
    assert_eq!(agent.cli(&["erase", "--volume-id", "vol-a"]).code, 2);
}

#[test]
fn broker_down_for_the_deadline_then_up_within_it() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let broker = env.try_start_broker_on(&addr).expect("broker");
    let img = sparse_file(&env.path().join("v.img"), 64);
    {
        let agent = env.start_agent(&addr, &AgentOpts::default());
        agent
            .cli(&["format", img.to_str().unwrap(), "--volume-id", "vol-net"])
            .ok();
    }
    broker.stop();

    // Down for the whole deadline: exit 6 once the deadline has passed, not before.
    let agent = env.start_agent(
        &addr,
        &AgentOpts {
            unlock_deadline: "3s".into(),
            backend: "dm-crypt".into(),
            ..Default::default()
        },
    );
    let t = Instant::now();
    let out = agent.cli(&["open", img.to_str().unwrap()]);
    let took = t.elapsed();
    assert_eq!(out.code, 6, "{out:?}");
    assert!(out.stderr.contains("unavailable"), "{out:?}");
    assert!(took >= Duration::from_secs(3), "gave up after {took:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(agent);

    // Up within the deadline: the open that started while it was down succeeds.
    let agent = env.start_agent(
        &addr,
        &AgentOpts {
            unlock_deadline: "60s".into(),
            backend: "dm-crypt".into(),
            ..Default::default()
        },
    );
    let mut cmd = Command::new(bin("nodecrypt"));
    cmd.arg("--socket")
        .arg(&agent.socket)
        .args(["--json", "status", "--volume-id", "vol-net"]);
    // Wait until the agent has really failed a broker call at least once.
    let opener = {
        let socket = agent.socket.clone();
        let img = img.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new(bin("nodecrypt"));
            cmd.arg("--socket").arg(&socket).arg("open").arg(&img);
            run_cli(cmd)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&agent.logs()).contains("retrying") {
        assert!(Instant::now() < deadline, "agent never retried");
        std::thread::yield_now();
    }
    let _broker = env.try_start_broker_on(&addr).expect("broker restart");
    let out = opener.join().unwrap();
    // dm-crypt is absent on this host, so the open gets past the broker and then fails
    // with the device-mapper message: proof the key was fetched after the broker came up.
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("device-mapper"), "{out:?}");
    assert!(out.stderr.contains("userspace"), "{out:?}");
    let _ = run_cli(cmd);
}

#[test]
fn only_root_on_the_socket_and_only_admins_on_tcp() {
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            tcp: true,
            ..Default::default()
        },
    );
    agent.cli(&["status"]).ok();
    let as_nobody = |agent: &Agent| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("nodecrypt"))
            .arg("--socket")
            .arg(&agent.socket)
            .arg("status");
        run_cli(cmd)
    };
    // The socket file is 0600: the kernel refuses the connection.
    let mode = fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The socket's directory must be traversable for the check below.
    fs::set_permissions(
        agent.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = as_nobody(&agent);
    assert_eq!(out.code, 5, "{out:?}");
    // Even with the file opened up, the agent checks the peer's uid itself.
    fs::set_permissions(&agent.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&agent);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("root only"), "{out:?}");

    let tcp = agent.tcp.clone().expect("tcp listener");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let call = |stem: &str| {
            let cfg = tls::client_config(&env.tls_files(stem)).unwrap();
            let ch = client::channel(&tcp, Arc::new(cfg), client::Deadlines::default()).unwrap();
            async move {
                pb::agent_client::AgentClient::new(ch)
                    .list_volumes(pb::ListVolumesRequest {})
                    .await
            }
        };
        let denied = call("node-n1").await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("admin"), "{denied:?}");
        call("admin-ops").await.expect("admin may list");
    });
}

#[test]
fn unlock_all_reports_each_volume_and_one_failure_blocks_nothing() {
    let env = Env::new();
    let broker = env.start_broker();
    let imgs: Vec<_> = (0..3)
        .map(|i| sparse_file(&env.path().join(format!("u{i}.img")), 64))
        .collect();
    let opts = AgentOpts {
        file_devices: imgs.clone(),
        backend: "userspace".into(),
        ..Default::default()
    };
    let agent = env.start_agent(&broker.addr, &opts);
    // Two formats of one device at once: one format, two clean successes.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let socket = agent.socket.clone();
            let img = imgs[0].clone();
            std::thread::spawn(move || {
                let mut cmd = Command::new(bin("nodecrypt"));
                cmd.arg("--socket")
                    .arg(&socket)
                    .args(["--json", "format"])
                    .arg(&img)
                    .args(["--volume-id", "vol-u0"]);
                run_cli(cmd)
            })
        })
        .collect();
    let outs: Vec<CliOut> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    for o in &outs {
        assert_eq!(o.code, 0, "{o:?}");
    }
    assert_eq!(outs[0].json()["luks_uuid"], outs[1].json()["luks_uuid"]);
    assert_eq!(
        luks_json(&imgs[0])["keyslots"].as_object().unwrap().len(),
        1
    );
    // And two different volumes racing for one device: exactly one wins.
    let racers: Vec<_> = ["vol-r1", "vol-r2"]
        .into_iter()
        .map(|id| {
            let socket = agent.socket.clone();
            let img = imgs[1].clone();
            std::thread::spawn(move || {
                let mut cmd = Command::new(bin("nodecrypt"));
                cmd.arg("--socket")
                    .arg(&socket)
                    .arg("format")
                    .arg(&img)
                    .args(["--volume-id", id]);
                run_cli(cmd)
            })
        })
        .collect();
    let codes: Vec<i32> = racers.into_iter().map(|t| t.join().unwrap().code).collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 3], "{codes:?}");
    agent
        .cli(&["format", imgs[2].to_str().unwrap(), "--volume-id", "vol-u2"])
        .ok();
    let winner = if codes[0] == 0 { "vol-r1" } else { "vol-r2" };
    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["admin", "--endpoint", &broker.addr])
            .arg("--cert")
            .arg(env.tls_files("admin-ops").cert)
            .arg("--key")
            .arg(env.tls_files("admin-ops").key)
            .arg("--ca")
            .arg(env.tls_files("admin-ops").ca)
            .args(["destroy", winner, "--yes"]),
    );
    let out = agent.cli(&["--json", "unlock-all"]);
    let doc = out.json();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{doc}");
    for r in results {
        let msg = r["message"].as_str().unwrap();
        if r["volume_id"] == winner {
            assert_eq!(r["ok"], false, "{r}");
            assert!(msg.contains("destroyed"), "{r}");
        } else {
            assert_eq!(r["ok"], true, "{r}");
            assert_eq!(r["volume"]["state"], "open", "{r}");
            assert!(
                r["volume"]["mapped_device"]
                    .as_str()
                    .unwrap()
                    .starts_with("/dev/loop"),
                "{r}"
            );
        }
    }
    assert_eq!(out.code, 3, "{out:?}");
    // Running it again is safe: the open volumes stay open, the destroyed one still fails.
    let again = agent.cli(&["--json", "unlock-all"]).json();
    assert_eq!(again["failed"], 1, "{again}");
    for id in ["vol-u0", "vol-u2"] {
        agent.cli(&["close", "--volume-id", id]).ok();
    }
}

#[test]
fn doctor_reports_kernel_cpu_broker_and_certificate() {
    let env = Env::new();
    let broker = env.start_broker();
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());
    let doc = agent.cli(&["--json", "doctor"]).ok().json();
    let check = |doc: &serde_json::Value, prefix: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} check: {doc}"))
            .clone()
    };
    let dm = check(&doc, "kernel dm-crypt");
    let has_dm = fs::read_to_string("/proc/misc")
        .unwrap()
        .lines()
        .any(|l| l.ends_with(" device-mapper"));
    // The agent runs the userspace backend: no device-mapper is no failure for it.
    assert_eq!(dm["ok"], true, "{dm}");
    assert_eq!(
        dm["detail"]
            .as_str()
            .unwrap()
            .contains("device-mapper present"),
        has_dm,
        "{dm}"
    );
    let cpu = check(&doc, "cpu aes");
    assert!(
        cpu["detail"]
            .as_str()
            .unwrap()
            .contains(nodecrypt_xts::Backend::best().name()),
        "{cpu}"
    );
    assert_eq!(check(&doc, "broker")["ok"], true, "{doc}");
    let cert = check(&doc, "node certificate");
    assert_eq!(cert["ok"], true, "{cert}");
    assert!(
        cert["detail"].as_str().unwrap().contains("valid for"),
        "{cert}"
    );
    broker.stop();
    // A failed check is a failed doctor: exit 3, the one JSON document says which.
    let out = agent.cli(&["--json", "doctor"]);
    assert_eq!(out.code, 3, "{out:?}");
    let doc = out.json();
    assert_eq!(check(&doc, "broker")["ok"], false, "{doc}");
    assert_eq!(doc["ok"], false, "{doc}");
}

#[test]
fn bench_measures_every_backend_this_cpu_has() {
    let mut cmd = Command::new(bin("nodecrypt"));
    cmd.args(["--json", "bench", "--seconds", "0.02"]);
    let out = run_cli(cmd).ok();
    let rows = out.json()["results"].as_array().unwrap().clone();
    let supported: Vec<_> = nodecrypt_xts::Backend::ALL
        .iter()
        .filter(|b| b.is_supported())
        .collect();
    assert_eq!(rows.len(), supported.len() * 4, "{rows:?}");
    for b in supported {
        for sector in [512, 4096] {
            for dir in ["encrypt", "decrypt"] {
                let r = rows
                    .iter()
                    .find(|r| {
                        r["backend"] == b.name()
                            && r["sector_size"] == sector
                            && r["direction"] == dir
                    })
                    .unwrap_or_else(|| panic!("no {b:?} {sector} {dir}: {rows:?}"));
                assert!(r["gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
            }
        }
    }
    for bad in [["--seconds", "0"], ["--threads", "0"]] {
        let mut cmd = Command::new(bin("nodecrypt"));
        cmd.arg("bench").args(bad);
        assert_eq!(run_cli(cmd).code, 2);
    }
}
