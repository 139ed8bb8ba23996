//! `nodecrypt repair-header`, and the CLI's smaller contracts (its own `--timeout`, quiet
//! userspace closes), against the real agent and broker.

use std::time::{Duration, Instant};

use nodecrypt_tests::luks2;
use nodecrypt_tests::*;
use serde_json::Value;

fn status_of(agent: &Agent, dev: &str) -> Value {
    let doc = agent.cli(&["--json", "status"]).ok().json();
    doc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["device"] == dev)
        .cloned()
        .unwrap_or_else(|| panic!("{dev} not listed: {doc}"))
}

#[test]
fn a_damaged_copy_is_repaired_only_when_asked_and_then_opens() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("r.img"), 40);
    let twin = sparse_file(&env.path().join("t.img"), 40);
    let opts = AgentOpts {
        file_devices: vec![img.clone(), twin.clone()],
        ..Default::default()
    };
    let agent = env.start_agent(&broker.addr, &opts);
    let (dev, dtwin) = (img.display().to_string(), twin.display().to_string());
    agent.cli(&["format", &dev, "--volume-id", "vol-r"]).ok();
    agent.cli(&["format", &dtwin, "--volume-id", "vol-t"]).ok();

    // An intact header: nothing to repair, success, nothing written.
    let before = file_hash(&img);
    let out = agent.cli(&["repair-header", &dev, "--yes"]).ok();
    assert!(out.stdout.contains("intact"), "{out:?}");
    assert_eq!(file_hash(&img), before);

    // Damage the secondary copy: refused, not silently mended by a look.
    let (_, mut secondary) = luks2::read(&img).unwrap();
    secondary.break_checksum();
    luks2::write_copy(&img, &secondary).unwrap();
    let damaged = file_hash(&img);
    let v = status_of(&agent, &dev);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("refused"), Some("header.checksum")),
        "{v}"
    );
    let out = agent.cli(&["open", &dev]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(file_hash(&img), damaged, "open wrote to a refused disk");

    // Without --yes: the plan, exit 2, nothing written.
    let out = agent.cli(&["--json", "repair-header", &dev]);
    assert_eq!(out.code, 2, "{out:?}");
    let plan = out.json();
    assert_eq!(
        (plan["from"].as_str(), plan["to"].as_str()),
        (Some("primary"), Some("secondary")),
        "{plan}"
    );
    assert_eq!(plan["done"], false);
    assert!(
        plan["problem"].as_str().unwrap().contains("checksum"),
        "{plan}"
    );
    assert_eq!(file_hash(&img), damaged, "an unconfirmed repair wrote");

    // With --yes: mended, usable, opens with its key; the repair is in the agent's log.
    let out = agent.cli(&["--json", "repair-header", &dev, "--yes"]).ok();
    assert_eq!(out.json()["done"], true, "{out:?}");
    let (p, s) = luks2::read(&img).unwrap();
    assert!(p.checksum_ok() && s.checksum_ok());
    assert_eq!(p.json_text(), s.json_text());
    assert_eq!(status_of(&agent, &dev)["state"], "closed");
    agent.cli(&["open", &dev]).ok();
    agent.cli(&["close", "--volume-id", "vol-r"]).ok();
    let logs = String::from_utf8_lossy(&agent.logs()).into_owned();
    assert!(
        logs.contains("LUKS2 header repaired on request"),
        "no audit line"
    );
    // Running it again is a no-op.
    agent.cli(&["repair-header", &dev, "--yes"]).ok();

    // Two intact copies that disagree: the operator must choose the copy to keep, and a
    // copy the policy refuses is never copied.
    let (mut p, mut s) = luks2::read(&twin).unwrap();
    s.set_seqid(s.seqid() + 1);
    s.edit_json(|j| j["tokens"]["0"]["key_version"] = Value::from(7))
        .unwrap();
    s.fix_checksum();
    luks2::write_copy(&twin, &s).unwrap();
    let out = agent.cli(&["repair-header", &dtwin, "--yes"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("--from"), "{out:?}");
    p.edit_json(|j| j["segments"]["0"]["offset"] = Value::from("0"))
        .unwrap();
    p.fix_checksum();
    luks2::write_copy(&twin, &p).unwrap();
    let hostile = file_hash(&twin);
    let out = agent.cli(&["repair-header", &dtwin, "--from", "primary", "--yes"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("segment.offset"), "{out:?}");
    assert_eq!(file_hash(&twin), hostile, "a refused copy was copied");
    let out = agent
        .cli(&["repair-header", &dtwin, "--from", "secondary", "--yes"])
        .ok();
    assert!(out.stdout.contains("copied the secondary"), "{out:?}");
    let v = status_of(&agent, &dtwin);
    assert_eq!(
        (v["state"].as_str(), v["key_version"].as_u64()),
        (Some("closed"), Some(7)),
        "{v}"
    );
}

#[test]
fn the_clis_own_timeout_is_exit_6_and_userspace_closes_are_quiet() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("q.img"), 40);
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![img.clone()],
            ..Default::default()
        },
    );
    let dev = img.display().to_string();
    agent.cli(&["format", &dev, "--volume-id", "vol-q"]).ok();
    agent.cli(&["open", &dev, "--userspace"]).ok();
    agent.cli(&["close", "--volume-id", "vol-q"]).ok();
    let logs = String::from_utf8_lossy(&agent.logs()).into_owned();
    assert!(logs.contains("userspace mapping closed"), "no close logged");
    assert!(
        !logs.contains("Unmount failed"),
        "a clean close warned:\n{logs}"
    );

    // With the broker gone the agent retries up to its 20 s deadline; the CLI's own
    // 300 ms deadline ends the command first, as DEADLINE_EXCEEDED, exit 6.
    broker.stop();
    let t = Instant::now();
    let out = agent.cli(&["--json", "--timeout", "300ms", "open", &dev]);
    assert_eq!(out.code, 6, "{out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let doc = out.json();
    assert_eq!(doc["error"]["code"], "DEADLINE_EXCEEDED", "{doc}");
    assert_eq!(doc["error"]["exit"], 6, "{doc}");
}

#[test]
fn erasing_a_volume_whose_header_is_refused_destroys_its_key_and_leaves_the_disk() {
    let env = Env::new();
    let broker = env.start_broker();
    let img = sparse_file(&env.path().join("x.img"), 40);
    let agent = env.start_agent(
        &broker.addr,
        &AgentOpts {
            file_devices: vec![img.clone()],
            ..Default::default()
        },
    );
    let dev = img.display().to_string();
    agent.cli(&["format", &dev, "--volume-id", "vol-x"]).ok();
    luks2::edit_both_json(&img, |j| j["segments"]["0"]["offset"] = Value::from("0")).unwrap();
    let hostile = file_hash(&img);
    let out = agent
        .cli(&["--json", "erase", "--volume-id", "vol-x", "--yes"])
        .ok();
    let v = out.json();
    assert_eq!(v["state"], "erased", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("segment.offset"),
        "the refusal is reported: {v}"
    );
    assert_eq!(
        file_hash(&img),
        hostile,
        "a refused header was wiped by what it says"
    );
    // The key is gone at the broker: the volume's status names the destroy.
    let info = env.admin_cli(&broker, &["describe", "vol-x"]).ok().json()[0].clone();
    assert!(
        !info["destroyed_at"].as_str().unwrap_or_default().is_empty(),
        "{info}"
    );
}
