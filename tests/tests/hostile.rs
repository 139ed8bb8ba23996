//! The disk is untrusted input: a corpus of hostile LUKS2 headers, built from volumes
//! that nodecrypt itself formatted, each refused by the agent with its own reason code,
//! before any key is asked for, without writing a byte, without delaying healthy
//! volumes, and visibly in `status` and `unlock-all`.
//!
//! Each variant is a copy of a healthy base image. It first gets its own volume id
//! (`hx-<nn>`, in the token and the label, so the broker's audit log tells them apart),
//! then one defect, applied to both header copies with the checksums recomputed (only
//! the meaning is wrong), except for the classes that are about damage to one copy.
//! The headers are rewritten by the independent codec in `nodecrypt_tests::luks2`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodecrypt_tests::luks2::{self, Copy};
use nodecrypt_tests::*;
use serde_json::{json, Value};

/// Size of every image: at least the agent's 32 MiB minimum even after the truncation
/// variant takes 512 bytes off.
const IMAGE_MIB: u64 = 33;

/// The code every policy refusal carries.
const REFUSED_CODE: &str = "FAILED_PRECONDITION";

/// Layout of a healthy base image, as its header says.
#[derive(Clone, Debug)]
struct Geo {
    sector: u64,
    len: u64,
    hdr_size: u64,
    data_offset: u64,
    keyslots_size: u64,
}

impl Geo {
    fn of(path: &Path) -> Geo {
        let (p, _) = luks2::read(path).expect("read base header");
        let v = p.json().expect("base JSON");
        let num = |x: &Value| -> u64 {
            x.as_str()
                .map(|s| s.parse().expect("number string"))
                .or_else(|| x.as_u64())
                .unwrap_or_else(|| panic!("not a number: {x}"))
        };
        Geo {
            sector: num(&v["segments"]["0"]["sector_size"]),
            len: fs::metadata(path).expect("stat base").len(),
            hdr_size: p.hdr_size(),
            data_offset: num(&v["segments"]["0"]["offset"]),
            keyslots_size: num(&v["config"]["keyslots_size"]),
        }
    }
}

/// The `nodecrypt` token of a header's JSON.
fn token(v: &mut Value) -> &mut Value {
    let tokens = v["tokens"].as_object_mut().expect("tokens object");
    let id = tokens
        .iter()
        .find(|(_, t)| t["type"] == "nodecrypt")
        .map(|(k, _)| k.clone())
        .expect("a nodecrypt token");
    &mut tokens[&id]
}

fn keyslots(v: &mut Value) -> impl Iterator<Item = &mut Value> {
    v["keyslots"]
        .as_object_mut()
        .expect("keyslots object")
        .values_mut()
}

fn segment(v: &mut Value) -> &mut Value {
    &mut v["segments"]["0"]
}

/// Changes the JSON of both copies, checksums recomputed.
fn both(path: &Path, f: impl Fn(&mut Value)) {
    luks2::edit_both_json(path, f).expect("rewrite both header copies");
}

/// Garbles the middle of a copy's JSON text (invalid UTF-8 and unbalanced brackets)
/// and recomputes that copy's checksum: it verifies but does not parse.
fn garble_json(c: &mut Copy) {
    let mid = c.json_text().len() / 2;
    c.json_area[mid..mid + 6].copy_from_slice(b"\x01}{\xff\"]");
    c.fix_checksum();
    assert!(c.json().is_err() && c.checksum_ok());
}

/// One class of defect.
struct Class {
    name: &'static str,
    reason: &'static str,
    only_4096: bool,
    apply: fn(&Path, &Geo),
}

fn classes() -> Vec<Class> {
    let c = |name, reason, apply: fn(&Path, &Geo)| Class {
        name,
        reason,
        only_4096: false,
        apply,
    };
    let c4096 = |name, reason, apply: fn(&Path, &Geo)| Class {
        name,
        reason,
        only_4096: true,
        apply,
    };
    vec![
        c("checksum-primary", "header.checksum", |p, _| {
            let (mut pri, _) = luks2::read(p).unwrap();
            pri.break_checksum();
            luks2::write_copy(p, &pri).unwrap();
        }),
        c("checksum-secondary", "header.checksum", |p, _| {
            let (_, mut sec) = luks2::read(p).unwrap();
            sec.break_checksum();
            luks2::write_copy(p, &sec).unwrap();
        }),
        c("json-primary", "header.json", |p, _| {
            let (mut pri, _) = luks2::read(p).unwrap();
            garble_json(&mut pri);
            luks2::write_copy(p, &pri).unwrap();
        }),
        c("json-secondary", "header.json", |p, _| {
            let (_, mut sec) = luks2::read(p).unwrap();
            garble_json(&mut sec);
            luks2::write_copy(p, &sec).unwrap();
        }),
        c("secondary-newer-and-different", "header.copies", |p, _| {
            let (pri, mut sec) = luks2::read(p).unwrap();
            sec.edit_json(|v| {
                token(v)["key_version"] = json!(2);
                for k in keyslots(v) {
                    k["kdf"]["iterations"] = json!(2000);
                }
            })
            .unwrap();
            sec.set_seqid(pri.seqid() + 1);
            sec.fix_checksum();
            luks2::write_copy(p, &sec).unwrap();
        }),
        c("secondary-magic", "header.magic", |p, _| {
            let (_, mut sec) = luks2::read(p).unwrap();
            sec.set_magic(*b"XKUL\xba\xbe");
            sec.fix_checksum();
            luks2::write_copy(p, &sec).unwrap();
        }),
        c("keyslot-iterations-1e7", "keyslot.iterations", |p, _| {
            both(p, |v| {
                for k in keyslots(v) {
                    k["kdf"]["iterations"] = json!(10_000_000);
                }
            })
        }),
        c("keyslot-argon2id-1gib", "keyslot.kdf", |p, _| {
            both(p, |v| {
                for k in keyslots(v) {
                    let salt = k["kdf"]["salt"].clone();
                    k["kdf"] = json!({
                        "type": "argon2id", "time": 4, "memory": 1_048_576, "cpus": 4,
                        "salt": salt,
                    });
                }
            })
        }),
        c("keyslot-key-size-32", "keyslot.key_size", |p, _| {
            both(p, |v| {
                for k in keyslots(v) {
                    k["key_size"] = json!(32);
                }
            })
        }),
        c(
            "keyslot-area-offset-past-keyslots",
            "keyslot.area",
            |p, g| {
                let end = 2 * g.hdr_size + g.keyslots_size;
                both(p, |v| {
                    for k in keyslots(v) {
                        k["area"]["offset"] = json!(end.to_string());
                    }
                })
            },
        ),
        c("keyslot-area-size-past-keyslots", "keyslot.area", |p, g| {
            // The area starts at 2 * hdr_size: this size ends it 4 KiB past the end of
            // the keyslots area (2 * hdr_size + keyslots_size).
            let size = g.keyslots_size + 4096;
            both(p, |v| {
                for k in keyslots(v) {
                    k["area"]["size"] = json!(size.to_string());
                }
            })
        }),
        c("digest-iterations-1e7", "digest.iterations", |p, _| {
            both(p, |v| {
                for d in v["digests"].as_object_mut().unwrap().values_mut() {
                    d["iterations"] = json!(10_000_000);
                }
            })
        }),
        c("segment-offset-0", "segment.offset", |p, _| {
            both(p, |v| segment(v)["offset"] = json!("0"))
        }),
        c("segment-iv-tweak-1", "segment.iv_tweak", |p, _| {
            both(p, |v| segment(v)["iv_tweak"] = json!("1"))
        }),
        c("segment-integrity", "segment.integrity", |p, _| {
            both(p, |v| {
                segment(v)["integrity"] = json!({
                    "type": "hmac(sha256)", "journal_encryption": "none",
                    "journal_integrity": "none",
                })
            })
        }),
        c("segment-flag-in-reencryption", "segment.flags", |p, _| {
            both(p, |v| segment(v)["flags"] = json!(["in-reencryption"]))
        }),
        c("segment-linear", "segment.type", |p, g| {
            let off = g.data_offset.to_string();
            both(p, |v| {
                *segment(v) = json!({"type": "linear", "offset": off, "size": "dynamic"})
            })
        }),
        c("segment-aes-cbc-essiv", "segment.encryption", |p, _| {
            both(p, |v| {
                segment(v)["encryption"] = json!("aes-cbc-essiv:sha256")
            })
        }),
        c(
            "requirement-online-reencrypt",
            "config.requirements",
            |p, _| {
                both(p, |v| {
                    v["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]})
                })
            },
        ),
        // libcryptsetup rejects the one above at load (online-reencrypt-v2 is a known
        // requirement and wants a reencryption backup segment), but loads a header whose
        // mandatory requirement it does not know: the policy must refuse that one itself.
        c("requirement-unknown", "config.requirements", |p, _| {
            both(p, |v| {
                v["config"]["requirements"] = json!({"mandatory": ["frobnicate-v9"]})
            })
        }),
        c("two-nodecrypt-tokens", "token.count", |p, _| {
            both(p, |v| {
                let t = token(v).clone();
                let tokens = v["tokens"].as_object_mut().unwrap();
                let free = (0..32)
                    .map(|i| i.to_string())
                    .find(|k| !tokens.contains_key(k))
                    .unwrap();
                tokens.insert(free, t);
            })
        }),
        c("token-key-version-0", "token.key_version", |p, _| {
            both(p, |v| token(v)["key_version"] = json!(0))
        }),
        c("token-volume-id-bad", "token.volume_id", |p, _| {
            both(p, |v| token(v)["volume_id"] = json!("BAD_ID!"))
        }),
        c("token-keyslot-7-missing", "token.keyslot", |p, _| {
            both(p, |v| token(v)["keyslots"] = json!(["7"]))
        }),
        c("segment-size-beyond-device", "segment.size", |p, g| {
            let size = (g.len - g.data_offset + g.sector).to_string();
            both(p, |v| segment(v)["size"] = json!(size))
        }),
        c4096(
            "device-size-not-sector-multiple",
            "geometry.device_size",
            |p, g| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(g.len - 512)
                    .unwrap();
            },
        ),
        c4096("data-area-below-one-sector", "segment.size", |p, _| {
            both(p, |v| segment(v)["size"] = json!("512"))
        }),
        c4096("segment-offset-unaligned", "segment.alignment", |p, g| {
            let off = (g.data_offset + 512).to_string();
            both(p, |v| segment(v)["offset"] = json!(off))
        }),
    ]
}

/// A built hostile image.
struct Variant {
    id: String,
    class: &'static str,
    sector: u64,
    reason: &'static str,
    path: PathBuf,
    /// What `cryptsetup luksDump` makes of (a throwaway copy of) it.
    cryptsetup: String,
}

impl Variant {
    fn dev(&self) -> String {
        self.path.display().to_string()
    }
}

/// Gives the image at `path` the volume id `id`, in its token and its label.
fn relabel(path: &Path, id: &str) {
    let (mut p, mut s) = luks2::read(path).unwrap();
    for c in [&mut p, &mut s] {
        c.set_label(id);
        c.edit_json(|v| token(v)["volume_id"] = json!(id)).unwrap();
    }
    luks2::write_both(path, &mut p, &mut s).unwrap();
}

/// What libcryptsetup does when it loads the image: run `cryptsetup luksDump` on a
/// throwaway copy and say whether it loaded, repaired (wrote) or rejected it.
fn cryptsetup_verdict(path: &Path) -> String {
    let tmp = path.with_extension("cs-copy");
    luks2::sparse_copy(path, &tmp).unwrap();
    // A repair rewrites header copies only: compare the first 16 MiB (the headers and
    // keyslot area of a nodecrypt volume) rather than hash the whole image twice.
    let head = |p: &Path| {
        let mut b = fs::read(p).unwrap();
        b.truncate(16 << 20);
        b
    };
    let before = head(&tmp);
    let out = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&tmp)
        .output()
        .expect("run cryptsetup");
    let wrote = head(&tmp) != before;
    fs::remove_file(&tmp).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    match (out.status.success(), wrote) {
        (true, false) => "loads".into(),
        (true, true) => "loads, REPAIRS the image".into(),
        (false, w) => format!(
            "rejects{}: {}",
            if w { " (and wrote)" } else { "" },
            err.lines().next().unwrap_or("").trim()
        ),
    }
}

/// Formats each `(path, volume_id, sector)` through a temporary agent (stopped before
/// returning, so the test's own agent is the only one running afterwards).
fn format_volumes(env: &Env, broker: &Broker, vols: &[(&Path, &str, u64)]) {
    let agent = env.start_agent(&broker.addr, &AgentOpts::default());
    for (path, id, sector) in vols {
        agent
            .cli(&[
                "format",
                path.to_str().unwrap(),
                "--volume-id",
                id,
                "--sector-size",
                &sector.to_string(),
            ])
            .ok();
    }
}

/// The audit log's lines, parsed; asserts every line has the fields the checks rely on.
fn audit_lines(env: &Env) -> Vec<Value> {
    let text = fs::read_to_string(env.state().join("audit.log")).expect("audit log");
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect();
    assert!(!lines.is_empty(), "empty audit log");
    for l in &lines {
        assert!(
            l["rpc"].is_string() && l["volume_id"].is_string(),
            "audit line without the rpc/volume_id fields this test relies on: {l}"
        );
    }
    lines
}

fn get_key_calls<'a>(lines: &'a [Value], pred: impl Fn(&str) -> bool + 'a) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["rpc"] == "GetVolumeKey" && pred(l["volume_id"].as_str().unwrap()))
        .collect()
}

/// Stdout as one JSON document (`None`, with the reason on stderr, if it is not).
fn parse_json(out: &CliOut) -> Option<Value> {
    serde_json::from_str(&out.stdout)
        .map_err(|e| eprintln!("stdout is not one JSON document ({e}): {:.300}", out.stdout))
        .ok()
}

fn entries_for<'a>(list: &'a Value, key: &str, dev: &str) -> Vec<&'a Value> {
    list[key]
        .as_array()
        .map(|a| a.iter().filter(|e| e["device"] == dev).collect())
        .unwrap_or_default()
}

/// Runs `nodecrypt open <dev>` in its own process and returns how long it took.
fn timed_open(socket: &Path, dev: &Path) -> (CliOut, Duration) {
    let mut cmd = Command::new(bin("nodecrypt"));
    cmd.arg("--socket").arg(socket).arg("open").arg(dev);
    let t = Instant::now();
    let out = run_cli(cmd);
    (out, t.elapsed())
}

/// Times a healthy open alone and while every `heavy` device is being opened over and
/// over by other clients (median of three each); fails if the second is over
/// max(2 × solo, solo + 200 ms). Leaves the healthy volume open.
fn healthy_open_not_delayed(
    agent: &Agent,
    good: &Path,
    good_id: &str,
    heavy: &[PathBuf],
) -> Result<String, String> {
    let mut solo = Vec::new();
    for _ in 0..3 {
        let out = agent.cli(&["close", "--volume-id", good_id]);
        if out.code != 0 {
            return Err(format!("timing: close {good_id}: {out:?}"));
        }
        let (out, took) = timed_open(&agent.socket, good);
        if out.code != 0 {
            return Err(format!("timing: healthy open of {good_id}: {out:?}"));
        }
        solo.push(took);
    }
    solo.sort();
    let solo = solo[1];
    let out = agent.cli(&["close", "--volume-id", good_id]);
    if out.code != 0 {
        return Err(format!("timing: close {good_id}: {out:?}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let spans: Arc<Mutex<Vec<(Instant, Instant, i32)>>> = Arc::default();
    let hammers: Vec<_> = heavy
        .iter()
        .map(|dev| {
            let (socket, dev) = (agent.socket.clone(), dev.clone());
            let (stop, started, spans) = (stop.clone(), started.clone(), spans.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    started.fetch_add(1, Ordering::SeqCst);
                    let (out, _) = timed_open(&socket, &dev);
                    spans.lock().unwrap().push((t, Instant::now(), out.code));
                }
            })
        })
        .collect();
    while started.load(Ordering::SeqCst) < heavy.len() {
        std::thread::yield_now();
    }
    // Three samples, as for the solo time: a KDF run for the hostile volume in the way
    // would slow every one of them, a busy neighbour on the test host only one.
    let mut samples = Vec::new();
    let mut result = Ok(());
    for i in 0..3 {
        let begin = Instant::now();
        let (out, took) = timed_open(&agent.socket, good);
        let end = Instant::now();
        if out.code != 0 {
            result = Err(format!("healthy open during hostile opens: {out:?}"));
            break;
        }
        samples.push((begin, end, took));
        if i < 2 {
            let out = agent.cli(&["close", "--volume-id", good_id]);
            if out.code != 0 {
                result = Err(format!("timing: close {good_id}: {out:?}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in hammers {
        h.join().unwrap();
    }
    result?;
    let spans = spans.lock().unwrap();
    let overlapping: Vec<usize> = samples
        .iter()
        .map(|(begin, end, _)| {
            spans
                .iter()
                .filter(|(s, e, _)| s < end && e > begin)
                .count()
        })
        .collect();
    if overlapping.contains(&0) {
        return Err(format!(
            "timing: a healthy open overlapped no hostile open (overlaps per sample {overlapping:?}): the check would be vacuous"
        ));
    }
    let mut concurrent: Vec<Duration> = samples.iter().map(|s| s.2).collect();
    concurrent.sort();
    let median = concurrent[1];
    let bound = std::cmp::max(2 * solo, solo + Duration::from_millis(200));
    let summary = format!(
        "healthy open: solo {solo:?} (median of 3); during hostile opens {concurrent:?}, median {median:?} (bound {bound:?}), overlapping hostile opens per sample {overlapping:?}, their exit codes {:?}",
        spans.iter().map(|s| s.2).collect::<std::collections::BTreeSet<_>>()
    );
    if median > bound {
        return Err(format!("healthy open delayed by hostile opens: {summary}"));
    }
    Ok(summary)
}

#[test]
fn hostile_headers_are_refused_with_their_reason_before_any_key_is_asked_for() {
    let t0 = Instant::now();
    let env = Env::new();
    let broker = env.start_broker();
    // Two healthy bases, and a control: a healthy volume whose header went through the
    // codec exactly as every variant's does before its defect (JSON re-serialised, seqid
    // bumped, checksums recomputed), so a refusal can only be the defect's doing.
    let bases: Vec<(PathBuf, String, u64)> = [
        ("base512.img", "vol-good-512", 512u64),
        ("base4096.img", "vol-good-4096", 4096),
        ("control.img", "vol-rewritten", 4096),
    ]
    .into_iter()
    .map(|(file, id, s)| {
        (
            sparse_file(&env.path().join(file), IMAGE_MIB),
            id.to_string(),
            s,
        )
    })
    .collect();
    format_volumes(
        &env,
        &broker,
        &bases
            .iter()
            .map(|(p, id, s)| (p.as_path(), id.as_str(), *s))
            .collect::<Vec<_>>(),
    );
    let seqid = luks2::read(&bases[2].0).unwrap().0.seqid();
    relabel(&bases[2].0, &bases[2].1);
    assert_eq!(luks2::read(&bases[2].0).unwrap().1.seqid(), seqid + 1);

    // Build the corpus.
    let mut variants = Vec::new();
    for (base, _, sector) in &bases[..2] {
        let geo = Geo::of(base);
        assert_eq!(geo.sector, *sector, "{geo:?}");
        for class in classes() {
            if class.only_4096 && *sector != 4096 {
                continue;
            }
            let id = format!("hx-{:02}", variants.len() + 1);
            let path = env.path().join(format!("{id}.img"));
            luks2::sparse_copy(base, &path).unwrap();
            relabel(&path, &id);
            (class.apply)(&path, &geo);
            let cryptsetup = cryptsetup_verdict(&path);
            variants.push(Variant {
                id,
                class: class.name,
                sector: *sector,
                reason: class.reason,
                path,
                cryptsetup,
            });
        }
    }
    eprintln!("built {} variants in {:?}", variants.len(), t0.elapsed());
    let hashes: Vec<String> = variants.iter().map(|v| file_hash(&v.path)).collect();
    // Only what the broker logs from here on is the corpus agent's doing.
    let audit_before = audit_lines(&env).len();

    let mut devices: Vec<PathBuf> = variants.iter().map(|v| v.path.clone()).collect();
    devices.extend(bases.iter().map(|b| b.0.clone()));
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: devices,
            backend: "userspace".into(),
            ..Default::default()
        },
    );

    // Every mismatch is collected (the table below shows the whole corpus at once).
    let mut failures: Vec<String> = Vec::new();
    let mut got: BTreeMap<String, [String; 3]> = BTreeMap::new();
    let mut cli_ms: BTreeMap<String, u128> = BTreeMap::new();

    // 1. open, human and --json.
    for v in &variants {
        let dev = v.dev();
        let t = Instant::now();
        let out = agent.cli(&["open", &dev]);
        cli_ms.insert(v.id.clone(), t.elapsed().as_millis());
        if out.code != 3 || !out.stderr.contains(v.reason) || !out.stderr.contains("refused") {
            failures.push(format!(
                "{} {}: open: want exit 3, {:?} and \"refused\" in stderr: {out:?}",
                v.id, v.class, v.reason
            ));
        }
        let out = agent.cli(&["--json", "open", &dev]);
        let doc = parse_json(&out);
        let reason = doc
            .as_ref()
            .and_then(|d| d["error"]["reason"].as_str())
            .unwrap_or("-")
            .to_string();
        got.entry(v.id.clone()).or_default()[0] = if reason == "-" {
            format!("(exit {})", out.code)
        } else {
            reason.clone()
        };
        let ok = out.code == 3
            && doc.as_ref().is_some_and(|d| {
                let e = &d["error"];
                let msg = e["message"].as_str().unwrap_or("");
                e["code"] == REFUSED_CODE
                    && e["exit"] == 3
                    && reason == v.reason
                    && !msg.is_empty()
                    && msg.contains(&dev)
            });
        if !ok {
            failures.push(format!(
                "{} {}: open --json: want exit 3 and {{\"error\":{{\"code\":{REFUSED_CODE:?},\"exit\":3,\"reason\":{:?},\"message\":<naming {dev}>}}}}: {out:?}",
                v.id, v.class, v.reason
            ));
        }
    }

    // 2. status lists every variant as refused, and the bases as closed.
    let st = agent.cli(&["--json", "status"]);
    let st_doc = parse_json(&st).unwrap_or(Value::Null);
    if st.code != 0 || st_doc.is_null() {
        failures.push(format!("status --json: want exit 0 and JSON: {st:?}"));
    }
    for v in &variants {
        let es = entries_for(&st_doc, "volumes", &v.dev());
        let reason = es
            .first()
            .and_then(|e| e["reason"].as_str())
            .unwrap_or("-")
            .to_string();
        got.entry(v.id.clone()).or_default()[1] = match es.first() {
            None => "(absent)".into(),
            Some(_) if reason != "-" => reason.clone(),
            Some(e) => format!("({})", e["state"].as_str().unwrap_or("?")),
        };
        let ok = es.len() == 1 && {
            let e = es[0];
            e["state"] == "refused"
                && reason == v.reason
                && e["message"].as_str().is_some_and(|m| !m.is_empty())
        };
        if !ok {
            failures.push(format!(
                "{} {}: status: want one entry {{state: refused, reason: {:?}, message}} for {}: {es:?}",
                v.id,
                v.class,
                v.reason,
                v.dev()
            ));
        }
    }
    for (base, id, _) in &bases {
        let es = entries_for(&st_doc, "volumes", &base.display().to_string());
        if es.len() != 1 || es[0]["state"] != "closed" || es[0]["volume_id"] != id.as_str() {
            failures.push(format!(
                "{id}: status: want one closed entry for {}: {es:?}",
                base.display()
            ));
        }
    }

    // 3. unlock-all opens the bases and refuses every variant.
    let ua = agent.cli(&["--json", "unlock-all"]);
    let ua_doc = parse_json(&ua).unwrap_or(Value::Null);
    if ua.code != 3 || ua_doc["failed"] != variants.len() {
        failures.push(format!(
            "unlock-all: want exit 3 and failed = {}: exit {}, failed = {}, stderr {:?}, stdout {:.600}",
            variants.len(),
            ua.code,
            ua_doc["failed"],
            ua.stderr,
            ua.stdout
        ));
    }
    let mut iter_duration_ms = Vec::new();
    for v in &variants {
        let rs = entries_for(&ua_doc, "results", &v.dev());
        let reason = rs
            .first()
            .and_then(|r| r["reason"].as_str())
            .unwrap_or("-")
            .to_string();
        got.entry(v.id.clone()).or_default()[2] = match rs.first() {
            None => "(absent)".into(),
            Some(_) if reason != "-" => reason.clone(),
            Some(r) => format!("({})", r["code"].as_str().unwrap_or("?")),
        };
        let ok = rs.len() == 1
            && rs[0]["ok"] == false
            && rs[0]["code"] == REFUSED_CODE
            && reason == v.reason;
        if !ok {
            failures.push(format!(
                "{} {}: unlock-all: want one result {{ok: false, code: {REFUSED_CODE}, reason: {:?}}} for {}: {rs:?}",
                v.id,
                v.class,
                v.reason,
                v.dev()
            ));
        }
        if v.class == "keyslot-iterations-1e7" {
            iter_duration_ms.push((v.id.clone(), rs.first().map(|r| r["duration_ms"].clone())));
        }
    }
    for (base, id, _) in &bases {
        let rs = entries_for(&ua_doc, "results", &base.display().to_string());
        if rs.len() != 1 || rs[0]["ok"] != true {
            failures.push(format!("{id}: unlock-all: want one ok result: {rs:?}"));
        }
    }
    let st2 = parse_json(&agent.cli(&["--json", "status"])).unwrap_or(Value::Null);
    for (base, id, _) in &bases {
        let es = entries_for(&st2, "volumes", &base.display().to_string());
        if es.len() != 1 || es[0]["state"] != "open" {
            failures.push(format!("{id}: status after unlock-all: want open: {es:?}"));
        }
    }

    // 4. Timing: the 10^7-iteration keyslot is refused without running its KDF.
    for (id, ms) in &iter_duration_ms {
        eprintln!(
            "{id} (keyslot iterations 10^7): unlock-all duration_ms {ms:?}, CLI open wall time {} ms",
            cli_ms[id]
        );
        match ms.as_ref().and_then(Value::as_u64) {
            Some(ms) if ms < 100 => {}
            _ => failures.push(format!(
                "{id}: unlock-all duration_ms of the 10^7-iteration keyslot: want < 100, got {ms:?}"
            )),
        }
    }
    // ...and a healthy open is not delayed by opens of it running at the same time.
    let (good, good_id) = (&bases[1].0, bases[1].1.as_str());
    let heavy: Vec<PathBuf> = variants
        .iter()
        .filter(|v| v.class == "keyslot-iterations-1e7")
        .map(|v| v.path.clone())
        .collect();
    match healthy_open_not_delayed(&agent, good, good_id, &heavy) {
        Ok(summary) => eprintln!("{summary}"),
        Err(e) => failures.push(e),
    }

    // 5. Nothing was written, the agent still answers, no key was asked for.
    for (v, before) in variants.iter().zip(&hashes) {
        if file_hash(&v.path) != *before {
            failures.push(format!(
                "{} {}: the agent WROTE to the image (sha256 changed)",
                v.id, v.class
            ));
        }
    }
    let out = agent.cli(&["--json", "status"]);
    if out.code != 0 || parse_json(&out).is_none() {
        failures.push(format!("the agent no longer answers status: {out:?}"));
    }
    let audit = audit_lines(&env).split_off(audit_before);
    let leaked = get_key_calls(&audit, |id| id.starts_with("hx-"));
    if !leaked.is_empty() {
        let ids: std::collections::BTreeSet<&str> = leaked
            .iter()
            .map(|l| l["volume_id"].as_str().unwrap())
            .collect();
        failures.push(format!(
            "GetVolumeKey was called for {} hostile volume(s) ({} calls): {ids:?}",
            ids.len(),
            leaked.len()
        ));
    }
    for (_, id, _) in &bases {
        if get_key_calls(&audit, |v| v == id).is_empty() {
            failures.push(format!(
                "no GetVolumeKey for the healthy {id}: the audit check would be vacuous"
            ));
        }
    }

    // The corpus, side by side ("*": some answer is not the expected reason).
    eprintln!(
        "\n  {:<6} {:<5} {:<34} {:<20} {:<22} {:<22} {:<22} cryptsetup luksDump (a copy)",
        "id", "sect", "variant", "expected", "open --json", "status", "unlock-all"
    );
    for v in &variants {
        let g = &got[&v.id];
        let mark = if g.iter().all(|r| r == v.reason) {
            " "
        } else {
            "*"
        };
        eprintln!(
            "{mark} {:<6} {:<5} {:<34} {:<20} {:<22} {:<22} {:<22} {}",
            v.id, v.sector, v.class, v.reason, g[0], g[1], g[2], v.cryptsetup
        );
    }
    eprintln!("took {:?}", t0.elapsed());
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn two_devices_naming_one_volume() {
    let env = Env::new();
    let broker = env.start_broker();
    let a = sparse_file(&env.path().join("a.img"), IMAGE_MIB);
    let b = sparse_file(&env.path().join("b.img"), IMAGE_MIB);
    format_volumes(&env, &broker, &[(&a, "vol-twin", 4096)]);
    luks2::sparse_copy(&a, &b).unwrap();
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![a.clone(), b.clone()],
            backend: "userspace".into(),
            ..Default::default()
        },
    );
    let (da, db) = (a.display().to_string(), b.display().to_string());
    let state_of = |doc: &Value, dev: &str| -> Vec<String> {
        entries_for(doc, "volumes", dev)
            .iter()
            .map(|e| e["state"].as_str().unwrap_or("?").to_string())
            .collect()
    };

    agent.cli(&["open", &da]).ok();
    let out = agent.cli(&["open", &db]);
    assert_eq!(
        out.code, 3,
        "the clone opened while the original is open: {out:?}"
    );
    assert!(
        out.stderr.contains(&da) && out.stderr.contains(&db),
        "the refusal does not name both devices: {out:?}"
    );
    let st = agent.cli(&["--json", "status"]).ok().json();
    assert_eq!(state_of(&st, &da), ["open"], "{st}");
    assert_eq!(state_of(&st, &db), ["closed"], "{st}");
    assert_eq!(entries_for(&st, "volumes", &da)[0]["volume_id"], "vol-twin");

    agent.cli(&["close", "--volume-id", "vol-twin"]).ok();
    let st = agent.cli(&["--json", "status"]).ok().json();
    assert_eq!(state_of(&st, &da), ["closed"], "{st}");
    assert_eq!(state_of(&st, &db), ["closed"], "{st}");

    // The clone alone is fine; then the original is the one refused.
    agent.cli(&["open", &db]).ok();
    let out = agent.cli(&["open", &da]);
    assert_eq!(
        out.code, 3,
        "the original opened while the clone is open: {out:?}"
    );
    let st = agent.cli(&["--json", "status"]).ok().json();
    assert_eq!(state_of(&st, &db), ["open"], "{st}");
    assert_eq!(state_of(&st, &da), ["closed"], "{st}");
    agent.cli(&["close", "--volume-id", "vol-twin"]).ok();
}

#[test]
fn unreadable_nodecrypt_header_is_reported_not_skipped() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("garbled.img"), IMAGE_MIB);
    format_volumes(&env, &broker, &[(&img, "vol-garbled", 4096)]);
    let (mut p, s) = luks2::read(&img).unwrap();
    p.set_version(0x7a02);
    p.fix_checksum();
    assert_eq!(p.subsystem(), "nodecrypt");
    luks2::write_copy(&img, &p).unwrap();
    // Garbage over the whole secondary copy (a fixed pseudo-random pattern).
    let mut x: u32 = 0x9e37_79b9;
    let junk: Vec<u8> = (0..s.bytes().len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    luks2::write_copy(
        &img,
        &Copy {
            bin: junk[..luks2::BIN_SIZE].to_vec(),
            json_area: junk[luks2::BIN_SIZE..].to_vec(),
            ..s
        },
    )
    .unwrap();
    let before = file_hash(&img);
    let audit_before = audit_lines(&env).len();

    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![img.clone()],
            backend: "userspace".into(),
            ..Default::default()
        },
    );
    let out = agent.cli(&["--json", "unlock-all"]);
    assert_eq!(out.code, 3, "{out:?}");
    let doc = out.json();
    let rs = entries_for(&doc, "results", &img.display().to_string());
    assert_eq!(rs.len(), 1, "the garbled device is not reported: {doc}");
    assert_eq!(rs[0]["ok"], false, "{doc}");
    assert!(
        rs[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("header.")),
        "want a header.* reason: {doc}"
    );
    assert_eq!(doc["failed"], 1, "{doc}");
    assert_eq!(
        file_hash(&img),
        before,
        "the agent wrote to the garbled image"
    );
    let audit = audit_lines(&env).split_off(audit_before);
    assert!(
        get_key_calls(&audit, |id| id == "vol-garbled").is_empty(),
        "a key was asked for the garbled volume"
    );
}
