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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{ext4_image, ext4_read_dir, pattern, raw_disk, sha256_hex, Console, Vm};
use nodecrypt_tests::{
    assert_no_key_material, bin, node_key, run_ok, AgentOpts, Env, TRUST_DOMAIN,
};

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
fn guest_state(env: &Env, extra: &[(&str, &[u8])]) -> PathBuf {
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

/// The value of a `Field: value` line of `cryptsetup luksDump`.
fn dump_field<'a>(dump: &'a str, field: &str) -> &'a str {
    dump.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// Must-show 1 and 2: the agent formats two virtio disks (512- and 4096-byte sectors)
/// and opens them through the guest kernel's dm-crypt; what the guest wrote through
/// /dev/mapper is decrypted on the host from the raw disk images by the userspace XTS
/// engine, and what the host's agent wrote on its userspace path (FUSE + loop) is read
/// back by the guest through dm-crypt. The dm tables carry a keyring reference and the
/// no-workqueue flags; no key byte shows in any console or log.
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

    // On the host: a broker on the state the guest left; the keyslot keys (admin).
    ext4_read_dir(&state, "/broker-state", tmp);
    let broker = env.start_broker();
    let mut secrets = Vec::new();
    for (id, dev, sector) in VOLUMES {
        let img = tmp.join(format!("{dev}.img"));
        let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(&img));
        assert_eq!(
            dump_field(&dump, "Label"),
            id,
            "{id}: header label:\n{dump}"
        );
        assert_eq!(
            dump_field(&dump, "Subsystem"),
            "nodecrypt",
            "{id}: header subsystem"
        );
        let seg = luks::segment(&img);
        assert_eq!(seg.sector_size, sector, "{id}: data segment sector size");
        let slot_key = node_key(&env, &broker, id, 1);
        let vk = luks::volume_key(&img, &slot_key, tmp);
        let plain = luks::read_plain(&img, seg, &vk, 0, PATTERN_LEN);
        let want = pattern(&format!("guest-{id}"), PATTERN_LEN);
        assert!(
            plain == want,
            "{id}: the engine's decryption of the guest's dm-crypt writes differs \
             (engine {} vs written {})",
            sha256_hex(&plain),
            sha256_hex(&want)
        );
        secrets.push(slot_key);
        secrets.push(vk);
    }

    // Host → guest: the host's agent opens the images on its userspace path (FUSE +
    // loop, the XTS engine) and writes a new pattern through the loop device.
    let images: Vec<PathBuf> = VOLUMES
        .iter()
        .map(|(_, dev, _)| tmp.join(format!("{dev}.img")))
        .collect();
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            backend: "userspace".into(),
            file_devices: images.clone(),
            ..Default::default()
        },
    );
    for (id, _, _) in VOLUMES {
        let v = agent
            .cli(&["--json", "open", "--volume-id", id])
            .ok()
            .json();
        assert_eq!(v["backend"], "userspace", "{v}");
        let dev = v["mapped_device"]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: {v}"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .unwrap_or_else(|e| panic!("{id}: open {dev}: {e}"));
        f.write_all(&pattern(&format!("host-{id}"), PATTERN_LEN))
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("{id}: write through {dev}: {e}"));
        drop(f);
        agent.cli(&["close", "--volume-id", id]).ok();
    }
    let host_logs = agent.logs();
    drop(agent);
    broker.stop();
    assert_no_key_material("host agent log", &host_logs, &secrets);

    let boot2 = vm.run_scenario(tmp, "dmcrypt-read", &disks, SCENARIO_LIMIT);
    for (id, _, _) in VOLUMES {
        assert_eq!(
            boot2.marker("SHA", id),
            sha256_hex(&pattern(&format!("host-{id}"), PATTERN_LEN)),
            "{id}: dm-crypt in the guest read something else than the host agent wrote"
        );
    }

    // No key byte in anything the guests printed or logged.
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

/// Boot test settings, written into the root image.
const UNLOCK_DEADLINE_S: u64 = 50;
/// How long the `delayed` phase keeps the broker down once unlock is retrying.
const BROKER_DELAY_S: u64 = 6;
/// The fstab options the systemd README documents for a nodecrypt volume.
const FSTAB_OPTIONS: &str =
    "nofail,_netdev,x-systemd.requires=nodecrypt-unlock.service,x-systemd.device-timeout=5min";
/// Limit of one systemd guest boot.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// One `NCVM:UNIT` line: a unit's state and its monotonic timestamps (µs, 0 = never).
#[derive(Debug)]
struct UnitState {
    active: String,
    result: String,
    exec_start: u64,
    active_enter: u64,
    inactive_enter: u64,
}

fn unit(console: &Console, name: &str) -> UnitState {
    let line = console.marker("UNIT", name);
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
    if f.len() < 5 {
        console.fail(&format!("bad NCVM:UNIT line for {name}: {line}"));
    }
    UnitState {
        active: f[0].to_string(),
        result: f[1].to_string(),
        exec_start: num(2),
        active_enter: num(3),
        inactive_enter: num(4),
    }
}

/// The files the provision phase copies onto the volume, and their `sha256sum` lines.
fn boot_files() -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let files = vec![
        ("a.bin".to_string(), pattern("boot-a", 300_000)),
        ("b.txt".to_string(), b"written in the first boot\n".to_vec()),
    ];
    let sums = files
        .iter()
        .map(|(n, d)| format!("{}  files/{n}", sha256_hex(d)))
        .collect();
    (files, sums)
}

/// The overlay of the root image: binaries, units, configs, PKI, test files.
fn boot_overlay(env: &Env, files: &[(String, Vec<u8>)]) -> PathBuf {
    let o = env.path().join("overlay");
    let usr_bin = o.join("usr/bin");
    let units = o.join("usr/lib/systemd/system");
    let etc = o.join("etc/nodecrypt");
    let pki = etc.join("pki");
    let share = o.join("usr/share/nodecrypt-vmtest");
    for d in [&usr_bin, &units, &pki, &share.join("files")] {
        fs::create_dir_all(d).expect("overlay dir");
    }
    for b in harness::BINARIES {
        run_ok(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(usr_bin.join(b))
                .arg(bin(b)),
        );
    }
    let unit_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let mut n = 0;
    for entry in fs::read_dir(&unit_src).expect("systemd/ units in the repository") {
        let path = entry.expect("unit").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".service") || name.ends_with(".target") {
            fs::copy(&path, units.join(name)).expect("copy unit");
            n += 1;
        }
    }
    assert!(n >= 4, "expected the nodecrypt units in {unit_src:?}");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("broker.pem", "broker.pem"),
        ("broker.key", "broker.key"),
        ("node-n1.pem", "node.pem"),
        ("node-n1.key", "node.key"),
    ] {
        fs::copy(env.pki().join(from), pki.join(to)).expect("copy PKI");
    }
    fs::write(
        etc.join("agent.toml"),
        format!(
            "backend = \"dm-crypt\"\nunlock_deadline = \"{UNLOCK_DEADLINE_S}s\"\n\n[broker]\n\
             endpoint = \"{GUEST_BROKER}\"\ncert = \"/etc/nodecrypt/pki/node.pem\"\n\
             key = \"/etc/nodecrypt/pki/node.key\"\nca = \"/etc/nodecrypt/pki/ca.pem\"\n"
        ),
    )
    .expect("agent.toml");
    let cred = "/run/credentials/nodecrypt-keybroker.service";
    fs::write(
        etc.join("keybroker.toml"),
        format!(
            "listen = \"{GUEST_BROKER}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\
             state_dir = \"/var/lib/nodecrypt-keybroker\"\n\n[tls]\ncert = \"{cred}/broker.pem\"\n\
             key = \"{cred}/broker.key\"\nca = \"{cred}/ca.pem\"\n"
        ),
    )
    .expect("keybroker.toml");
    for (name, data) in files {
        fs::write(share.join("files").join(name), data).expect("test file");
    }
    fs::write(share.join("fstab-options"), FSTAB_OPTIONS).expect("fstab options");
    fs::write(share.join("broker-delay"), BROKER_DELAY_S.to_string()).expect("delay");
    o
}

/// Must-show 3: a volume formatted in a first boot is unlocked by the units in the next
/// boots before the fstab mount that needs it. (a) The broker comes up only after unlock
/// has been retrying for a while, within the deadline: the mount succeeds after unlock,
/// and the files are there. (b) The broker never comes: unlock gives up at the deadline,
/// the mount fails cleanly (dependency), the system still reaches multi-user.target.
#[test]
fn boot_units_unlock_before_the_mount() {
    let vm = Vm::get();
    let tree = vm.rootfs();
    let env = Env::new();
    let tmp = env.path();
    let (files, sums) = boot_files();
    let overlay = boot_overlay(&env, &files);
    let root = tmp.join("root.img");
    harness::run_limited(
        Command::new(harness::scripts().join("root-image.sh"))
            .arg(&tree)
            .arg(&root)
            .arg("1024")
            .arg(harness::scripts().join("root"))
            .arg(&overlay)
            .args(["--", "nodecrypt-agent.service", "nodecrypt-volumes.target"])
            .arg("nodecrypt-vmtest.service"),
        Duration::from_secs(180),
    );
    let data = tmp.join("data.img");
    raw_disk(&data, DISK_SIZE);
    let disks = [root.as_path(), data.as_path()];
    let boot = |phase: &str| {
        let c = vm.boot(
            tmp,
            &format!("boot-{phase}"),
            &format!("nc.root=/dev/vda nc.phase={phase}"),
            &vm.initramfs,
            &disks,
            BOOT_LIMIT,
        );
        c.assert_end_ok();
        c
    };

    // First boot: provision the volume.
    let first = boot("provision");
    check_table(&first, "data", 4096);
    assert_eq!(
        first.markers("FILE"),
        sums,
        "files written in the first boot"
    );
    let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(&data));
    assert_eq!(
        dump_field(&dump, "Label"),
        "data",
        "the data disk's header:\n{dump}"
    );

    // (a) Broker late, within the deadline.
    let late = boot("delayed");
    let unlock = unit(&late, "nodecrypt-unlock.service");
    let broker = unit(&late, "nodecrypt-keybroker.service");
    let mount = unit(&late, "srv-data.mount");
    let starting = late.markers("BROKER");
    if !(unlock.active == "active"
        && unlock.result == "success"
        && broker.active == "active"
        && mount.active == "active"
        && starting.len() == 1
        && starting[0].ends_with("unlock=activating")
        && unlock.exec_start > 0
        && unlock.exec_start < broker.active_enter
        && broker.active_enter < unlock.active_enter
        && unlock.active_enter <= mount.active_enter)
    {
        late.fail(&format!(
            "want: unlock started, broker came up while unlock was retrying, unlock \
             succeeded, then the mount; got unlock {unlock:?}, broker {broker:?}, mount \
             {mount:?}, broker start {starting:?}"
        ));
    }
    assert_eq!(
        late.markers("FILE"),
        sums,
        "the files of the first boot, after unlock"
    );
    assert_eq!(late.markers("SYSTEM"), vec!["running".to_string()]);
    assert_eq!(
        late.markers("JOB"),
        Vec::<String>::new(),
        "jobs left after boot"
    );
    assert_eq!(unit(&late, "nodecrypt-volumes.target").active, "active");

    // (b) Broker absent past the deadline.
    let absent = boot("absent");
    let unlock = unit(&absent, "nodecrypt-unlock.service");
    let mount = unit(&absent, "srv-data.mount");
    let gave_up_after =
        Duration::from_micros(unlock.inactive_enter.saturating_sub(unlock.exec_start));
    if !(unlock.active == "failed"
        && unlock.result == "exit-code"
        && gave_up_after >= Duration::from_secs(UNLOCK_DEADLINE_S)
        && mount.active == "inactive"
        && absent.markers("MOUNTJOB") == vec!["dependency-failed".to_string()]
        && unit(&absent, "multi-user.target").active == "active"
        && unit(&absent, "emergency.target").active == "inactive"
        && unit(&absent, "rescue.target").active == "inactive")
    {
        absent.fail(&format!(
            "want: unlock failed after retrying for {UNLOCK_DEADLINE_S}s, the mount failed \
             on its dependency, multi-user.target reached, no emergency/rescue; got unlock \
             {unlock:?} (gave up after {gave_up_after:?}), mount {mount:?}, mount job {:?}",
            absent.markers("MOUNTJOB")
        ));
    }
    assert_eq!(absent.markers("FILE"), vec!["none".to_string()]);
    // The boot is over but for the wait on the volume's device (and its fsck), which
    // only x-systemd.device-timeout= ends: is-system-running says "starting" until then.
    let device = r"dev-mapper-nodecrypt\x2ddata.device";
    let jobs = absent.markers("JOB");
    let only_device_wait = jobs.iter().all(|j| {
        j.starts_with(&format!("{device} start"))
            || j.starts_with(r"systemd-fsck@dev-mapper-nodecrypt\x2ddata.service start")
    });
    let system = absent.markers("SYSTEM");
    assert!(
        only_device_wait
            && (system == ["degraded"] || (system == ["starting"] && !jobs.is_empty())),
        "after a failed unlock: is-system-running {system:?}, pending jobs {jobs:?}"
    );
}
