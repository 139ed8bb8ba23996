//! nodecrypt on a real kernel: QEMU guests (TCG, no network) booting Debian's cloud
//! kernel. The host has no device-mapper, so everything dm-crypt and everything systemd
//! is proven here: the agent's dm-crypt mappings against the userspace XTS engine in both
//! directions, the dm table (keyring key, no workqueues), and boot-time unlock by the units.
//!
//! The scripts and guest files are in `tests/vm/`; the kernel, root tree and initramfs are
//! cached under `target/vm/`. Guests boot one at a time (two cores).

#[path = "vm/harness.rs"]
mod harness;
#[path = "vm/luks.rs"]
mod luks;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{ext4_image, ext4_read_dir, pattern, raw_disk, sha256_hex, Console, Vm};
use nodecrypt_proto::keybroker::v1::GetVolumeKeyRequest;
use nodecrypt_tests::{assert_no_key_material, bin, run_ok, Env, TRUST_DOMAIN};

/// The broker's fixed address inside a guest (its own loopback).
const GUEST_BROKER: &str = "127.0.0.1:7443";
/// Each data disk: 16 MiB of LUKS2 header + 16 MiB of data.
const DISK_SIZE: u64 = 32 << 20;
/// Bytes of pattern per volume: a whole number of 4096-byte sectors, > 1 MiB.
const PATTERN_LEN: usize = 259 * 4096;
/// The volumes of the dm-crypt test: (volume id, guest device, sector size).
const VOLUMES: [(&str, &str, usize); 2] = [("v512", "vdb", 512), ("v4096", "vdc", 4096)];
/// Limit of one initramfs guest run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);

/// The state disk of an initramfs guest: PKI (node n1, broker), initialized broker state,
/// broker and agent configs, and the given extra files.
fn guest_state(env: &Env, extra: &[(&str, &[u8])]) -> std::path::PathBuf {
    let dir = env.path().join("guest-state");
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).expect("state dir");
    for f in [
        "ca.pem",
        "broker.pem",
        "broker.key",
        "node-n1.pem",
        "node-n1.key",
    ] {
        fs::copy(env.pki().join(f), pki.join(f)).expect("copy PKI file");
    }
    run_ok(
        Command::new(bin("nodecrypt-keybroker"))
            .args(["init", "--state-dir"])
            .arg(dir.join("broker-state")),
    );
    fs::write(
        dir.join("broker.toml"),
        format!(
            "listen = \"{GUEST_BROKER}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\
             state_dir = \"/state/broker-state\"\naudit_log = \"/state/logs/audit.log\"\n\n\
             [tls]\ncert = \"/state/pki/broker.pem\"\nkey = \"/state/pki/broker.key\"\n\
             ca = \"/state/pki/ca.pem\"\n"
        ),
    )
    .expect("broker.toml");
    fs::write(
        dir.join("agent.toml"),
        format!(
            "backend = \"dm-crypt\"\nunlock_deadline = \"60s\"\n\n[broker]\n\
             endpoint = \"{GUEST_BROKER}\"\ncert = \"/state/pki/node-n1.pem\"\n\
             key = \"/state/pki/node-n1.key\"\nca = \"/state/pki/ca.pem\"\n"
        ),
    )
    .expect("agent.toml");
    for (name, data) in extra {
        fs::write(dir.join(name), data).expect("extra state file");
    }
    let img = env.path().join("state.img");
    ext4_image(&dir, &img, 64);
    img
}

/// Checks one `dmsetup table` line of a volume the agent opened.
fn check_table(console: &Console, id: &str, sector: usize) {
    let table = console.marker("TABLE", id);
    let fields: Vec<&str> = table.split_whitespace().collect();
    let ok_cipher = fields.get(2) == Some(&"crypt") && fields.get(3) == Some(&"aes-xts-plain64");
    let key = fields.get(4).copied().unwrap_or("");
    let hexy = key.len() >= 64 && key.chars().all(|c| c.is_ascii_hexdigit());
    let flags = &fields[fields.len().min(9)..];
    let has = |f: &str| flags.contains(&f);
    if !ok_cipher
        || !key.starts_with(":64:logon:cryptsetup:")
        || hexy
        || !has("no_read_workqueue")
        || !has("no_write_workqueue")
        || has("iv_large_sectors")
        || (sector == 4096) != has("sector_size:4096")
    {
        console.fail(&format!(
            "dm table of {id} (sector {sector}): want aes-xts-plain64, a :64:logon:cryptsetup: \
             keyring key (never hex), no_read_workqueue and no_write_workqueue, no \
             iv_large_sectors, sector_size:4096 iff 4096; got: {table}"
        ));
    }
}

/// The keyslot key of `id`, fetched with the admin identity from a host broker running
/// on the state the guest left.
fn slot_keys(env: &Env, state_img: &Path) -> Vec<(String, Vec<u8>)> {
    let _ = fs::remove_dir_all(env.state());
    ext4_read_dir(state_img, "/broker-state", env.path());
    let broker = env.start_broker();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys = rt.block_on(async {
        let mut admin = env.client(&broker, "admin-ops");
        let mut keys = Vec::new();
        for (id, _, _) in VOLUMES {
            let resp = admin
                .get_volume_key(GetVolumeKeyRequest {
                    volume_id: id.to_string(),
                    version: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("the guest's broker state has no key for {id}: {e}"));
            let key = resp.into_inner();
            assert_eq!(key.version, 1, "{id}: a fresh volume is at key version 1");
            keys.push((id.to_string(), key.key));
        }
        keys
    });
    broker.stop();
    keys
}

/// Must-show 1 and 2: the agent formats two virtio disks (512- and 4096-byte sectors)
/// and opens them through the guest kernel's dm-crypt; what the guest wrote through
/// /dev/mapper is decrypted on the host from the raw disk images by the userspace XTS
/// engine, and what the host encrypted with the engine is read back by the guest through
/// dm-crypt. The dm tables carry a keyring reference and the no-workqueue flags.
#[test]
fn dm_crypt_matches_userspace_engine_both_ways() {
    let vm = Vm::get();
    let env = Env::new();
    let tmp = env.path();
    let guest_patterns: Vec<(String, Vec<u8>)> = VOLUMES
        .iter()
        .map(|(id, _, _)| {
            (
                format!("pattern-{id}.bin"),
                pattern(&format!("guest-{id}"), PATTERN_LEN),
            )
        })
        .collect();
    let extra: Vec<(&str, &[u8])> = guest_patterns
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let state = guest_state(&env, &extra);
    let vdb = tmp.join("vdb.img");
    let vdc = tmp.join("vdc.img");
    raw_disk(&vdb, DISK_SIZE);
    raw_disk(&vdc, DISK_SIZE);
    let disks = [state.as_path(), vdb.as_path(), vdc.as_path()];

    // Guest → host.
    let boot1 = vm.run_scenario(tmp, "dmcrypt-write", &disks, SCENARIO_LIMIT);
    for (id, _, sector) in VOLUMES {
        check_table(&boot1, id, sector);
        let want = sha256_hex(&pattern(&format!("guest-{id}"), PATTERN_LEN));
        assert_eq!(
            boot1.marker("SHA", id),
            want,
            "{id}: the guest read back through dm-crypt something else than it wrote"
        );
    }
    assert_eq!(
        boot1.markers("CLOSED"),
        vec!["control".to_string()],
        "close left mappings behind"
    );

    let keys = slot_keys(&env, &state);
    let mut secrets = Vec::new();
    let mut volume_keys = Vec::new();
    for ((id, dev, sector), (kid, slot_key)) in VOLUMES.iter().zip(&keys) {
        assert_eq!(id, kid);
        let img = tmp.join(format!("{dev}.img"));
        let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(&img));
        assert!(
            dump.contains(&format!("Label:          {id}"))
                && dump.contains("Subsystem:      nodecrypt"),
            "{id}: header label/subsystem:\n{dump}"
        );
        let seg = luks::segment(&img);
        assert_eq!(seg.sector_size, *sector, "{id}: data segment sector size");
        let vk = luks::volume_key(&img, slot_key, tmp);
        let plain = luks::read_plain(&img, seg, &vk, 0, PATTERN_LEN);
        let want = pattern(&format!("guest-{id}"), PATTERN_LEN);
        assert!(
            plain == want,
            "{id}: the engine's decryption of the guest's dm-crypt writes differs \
             (engine {} vs written {})",
            sha256_hex(&plain),
            sha256_hex(&want)
        );
        // Host → guest: the engine encrypts a new pattern into the image.
        let host = pattern(&format!("host-{id}"), PATTERN_LEN);
        luks::write_plain(&img, seg, &vk, 0, &host);
        secrets.push(slot_key.clone());
        volume_keys.push(vk);
    }

    let boot2 = vm.run_scenario(tmp, "dmcrypt-read", &disks, SCENARIO_LIMIT);
    for (id, _, _) in VOLUMES {
        assert_eq!(
            boot2.marker("SHA", id),
            sha256_hex(&pattern(&format!("host-{id}"), PATTERN_LEN)),
            "{id}: dm-crypt in the guest decrypted the engine's ciphertext to something else"
        );
    }

    // No key byte in anything the guests printed or logged.
    secrets.extend(volume_keys);
    let logs = tmp.join("guest-logs");
    ext4_read_dir(&state, "/logs", &logs);
    for console in [&boot1, &boot2] {
        assert_no_key_material(&console.name, console.text.as_bytes(), &secrets);
    }
    for entry in fs::read_dir(logs.join("logs")).expect("guest logs") {
        let path = entry.expect("log entry").path();
        let data = fs::read(&path).expect("read guest log");
        assert_no_key_material(&path.display().to_string(), &data, &secrets);
    }
}
