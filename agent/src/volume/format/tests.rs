//! The format decision as a table: what is on the device, `--force`, and the outcome.
//! No root, no device: the facts are built by hand.

use std::cell::Cell;

use super::*;
use crate::luks::Refusal;

fn header(label: &str, token: Option<&str>) -> Header {
    Header {
        uuid: "u".into(),
        label: label.into(),
        subsystem: "nodecrypt".into(),
        cipher: "aes-xts-plain64".into(),
        key_bits: 512,
        sector_size: 4096,
        data_offset: 16 << 20,
        data_size: 16 << 20,
        keyslots: vec![0],
        token: token.map(|id| {
            (
                0,
                Token {
                    keyslot: 0,
                    volume_id: id.into(),
                    key_version: 1,
                    broker: String::new(),
                },
            )
        }),
        hdr_size: 16 << 10,
        seqid: 1,
    }
}

fn refused(reason: &'static str) -> Inspection {
    Inspection::Refused {
        claimed_volume_id: None,
        refusal: Refusal::new(reason, "test"),
    }
}

fn facts(usable: Inspection, formatting: Inspection) -> Facts {
    Facts { usable, formatting }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Fresh,
    Resume,
    Done,
    Overwrite,
    HoldsData,
}

fn outcome(f: Facts, force: bool, sigs: &[&str]) -> (Outcome, bool) {
    let asked = Cell::new(false);
    let sigs: Vec<String> = sigs.iter().map(|s| s.to_string()).collect();
    let probe = || {
        asked.set(true);
        Ok(sigs.clone())
    };
    let o = match decide(Path::new("/dev/x"), f, "vol-a", force, &probe) {
        Ok(Precheck::Fresh) => Outcome::Fresh,
        Ok(Precheck::Resume) => Outcome::Resume,
        Ok(Precheck::Done(_)) => Outcome::Done,
        Err(VolumeError::WouldOverwrite { .. }) => Outcome::Overwrite,
        Err(VolumeError::HoldsData { .. }) => Outcome::HoldsData,
        Err(e) => panic!("unexpected {e}"),
    };
    (o, asked.get())
}

#[test]
fn the_format_decision_table() {
    use Outcome::*;
    let ours = || Inspection::Ours(header("vol-a", Some("vol-a")));
    let other = || Inspection::Ours(header("vol-b", Some("vol-b")));
    let untokened = |label| Inspection::Ours(header(label, None));
    let foreign = || Inspection::Foreign {
        uuid: "f".into(),
        label: String::new(),
    };
    #[rustfmt::skip]
    let table: Vec<(&str, Facts, bool, &[&str], Outcome)> = vec![
        ("already this volume", facts(ours(), refused("token.count")), false, &[], Done),
        ("already this volume, forced", facts(ours(), refused("token.count")), true, &[], Done),
        ("another volume", facts(other(), refused("token.count")), false, &[], Overwrite),
        ("another volume, forced", facts(other(), refused("token.count")), true, &[], Fresh),
        ("stopped before the token", facts(refused("token.missing"), untokened("vol-a")), false, &[], Resume),
        ("stopped before the keyslot", facts(refused("keyslot.count"), untokened("vol-a")), false, &[], Resume),
        ("another's unfinished format", facts(refused("token.missing"), untokened("vol-b")), false, &[], Overwrite),
        ("another's unfinished, forced", facts(refused("token.missing"), untokened("vol-b")), true, &["crypto_LUKS"], Fresh),
        ("a refused header", facts(refused("segment.offset"), refused("segment.offset")), false, &[], Overwrite),
        ("a refused header, forced", facts(refused("header.checksum"), refused("header.checksum")), true, &["crypto_LUKS"], Fresh),
        ("foreign LUKS2", facts(foreign(), foreign()), false, &[], Overwrite),
        ("foreign LUKS2, forced", facts(foreign(), foreign()), true, &["crypto_LUKS"], Fresh),
        ("blank", facts(Inspection::NotLuks, Inspection::NotLuks), false, &[], Fresh),
        ("a filesystem", facts(Inspection::NotLuks, Inspection::NotLuks), false, &["ext4"], HoldsData),
        ("a filesystem, forced", facts(Inspection::NotLuks, Inspection::NotLuks), true, &["ext4"], Fresh),
    ];
    for (name, f, force, sigs, want) in table {
        let (got, asked) = outcome(f, force, sigs);
        assert_eq!(got, want, "{name}");
        // libblkid is asked only when no LUKS2 header decided.
        let decided_by_header = matches!(want, Done | Resume | Overwrite);
        assert_eq!(asked, !decided_by_header, "{name}: libblkid asked: {asked}");
    }
}
