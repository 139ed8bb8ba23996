//! The agent's outcome contract as a script reads it: `UnlockResult.code` is the gRPC
//! status code's canonical name (agent.proto), and the CLI's exit code is the one the
//! status table gives for it.

use std::collections::BTreeMap;

use nodecrypt_tests::luks2;
use nodecrypt_tests::*;
use serde_json::Value;

/// The status table's exit code of a canonical name, as the README documents it.
fn documented_exit(code: &str) -> i32 {
    match code {
        "OK" => 0,
        "INVALID_ARGUMENT" | "OUT_OF_RANGE" => 2,
        "FAILED_PRECONDITION" | "ALREADY_EXISTS" | "ABORTED" => 3,
        "NOT_FOUND" => 4,
        "PERMISSION_DENIED" | "UNAUTHENTICATED" => 5,
        "UNAVAILABLE" | "DEADLINE_EXCEEDED" => 6,
        _ => 1,
    }
}

fn codes(doc: &Value) -> BTreeMap<String, (bool, String)> {
    doc["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {doc}"))
        .iter()
        .map(|r| {
            (
                r["volume_id"].as_str().unwrap().to_string(),
                (
                    r["ok"].as_bool().unwrap(),
                    r["code"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn unlock_all_codes_are_canonical_names_and_exit_codes_follow_the_table() {
    let env = Env::new();
    let broker = env.start_broker();
    let files: Vec<_> = ["ok", "destroyed", "unknown"]
        .iter()
        .map(|n| sparse_file(&env.path().join(format!("{n}.img")), 40))
        .collect();
    let opts = AgentOpts {
        file_devices: files.clone(),
        unlock_deadline: "2s".into(),
        ..Default::default()
    };
    {
        let agent = env.start_agent(&broker.addr, &opts);
        for (f, id) in files.iter().zip(["vol-ok", "vol-destroyed", "vol-unknown"]) {
            agent
                .cli(&["format", f.to_str().unwrap(), "--volume-id", id])
                .ok();
        }
    }
    // A volume the broker never heard of: a disk from another rack, as its header says.
    luks2::edit_both_json(&files[2], |j| {
        j["tokens"]["0"]["volume_id"] = Value::from("vol-elsewhere")
    })
    .unwrap();
    let (mut p, mut s) = luks2::read(&files[2]).unwrap();
    p.set_label("vol-elsewhere");
    s.set_label("vol-elsewhere");
    luks2::write_both(&files[2], &mut p, &mut s).unwrap();
    env.admin_cli(&broker, &["destroy", "vol-destroyed", "--yes"])
        .ok();

    let agent = env.start_agent(&broker.addr, &opts);
    let out = agent.cli(&["--json", "unlock-all"]);
    let got = codes(&out.json());
    let want: BTreeMap<String, (bool, String)> = [
        ("vol-ok", (true, "")),
        ("vol-destroyed", (false, "FAILED_PRECONDITION")),
        ("vol-elsewhere", (false, "NOT_FOUND")),
    ]
    .into_iter()
    .map(|(id, (ok, c))| (id.to_string(), (ok, c.to_string())))
    .collect();
    assert_eq!(got, want, "{out:?}");
    // The worst failure decides the exit code: NOT_FOUND (4) over FAILED_PRECONDITION (3).
    assert_eq!(out.code, documented_exit("NOT_FOUND"), "{out:?}");
    agent.cli(&["close", "--volume-id", "vol-ok"]).ok();

    // The broker gone: every volume UNAVAILABLE once the 2 s deadline passes, exit 6.
    broker.stop();
    let out = agent.cli(&["--json", "unlock-all"]);
    let got = codes(&out.json());
    assert_eq!(got.len(), 3, "{out:?}");
    for (id, (ok, code)) in &got {
        assert!(!ok, "{id}");
        assert_eq!(code, "UNAVAILABLE", "{id}: {out:?}");
    }
    assert_eq!(out.code, documented_exit("UNAVAILABLE"), "{out:?}");

    // Single commands: the exit code of each error class is the table's.
    let out = agent.cli(&["--json", "open", files[0].to_str().unwrap()]);
    assert_eq!(out.json()["error"]["code"], "UNAVAILABLE", "{out:?}");
    assert_eq!(out.code, documented_exit("UNAVAILABLE"));
    let out = agent.cli(&["--json", "open", "--volume-id", "vol-nowhere"]);
    assert_eq!(out.json()["error"]["code"], "NOT_FOUND", "{out:?}");
    assert_eq!(out.code, documented_exit("NOT_FOUND"));
    let out = agent.cli(&["--json", "open", "--volume-id", "Bad_Id"]);
    assert_eq!(out.json()["error"]["code"], "INVALID_ARGUMENT", "{out:?}");
    assert_eq!(out.code, documented_exit("INVALID_ARGUMENT"));
}
