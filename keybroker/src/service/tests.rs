//! The service's one mapping of key-flow errors to status codes, as a table.
use super::*;

#[test]
fn every_key_error_has_its_status_code_and_keeps_its_message() {
    let v = || "vol-s".to_string();
    let table = [
        (
            KeysError::Denied {
                volume_id: v(),
                reason: crate::authz::Denied("no".into()),
            },
            Code::PermissionDenied,
        ),
        (KeysError::NotFound { volume_id: v() }, Code::NotFound),
        (
            KeysError::NoVersion {
                volume_id: v(),
                version: 3,
                current: 2,
            },
            Code::NotFound,
        ),
        (
            KeysError::NoVersionToRetire {
                volume_id: v(),
                version: 3,
            },
            Code::NotFound,
        ),
        (
            KeysError::Destroyed {
                volume_id: v(),
                at: "t".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            KeysError::Retired {
                volume_id: v(),
                version: 1,
                retired_at: "t".into(),
                current: 2,
            },
            Code::FailedPrecondition,
        ),
        (
            KeysError::AheadOfBroker {
                volume_id: v(),
                expected: 3,
                current: 2,
            },
            Code::FailedPrecondition,
        ),
        (
            KeysError::RetireCurrent {
                volume_id: v(),
                version: 2,
            },
            Code::FailedPrecondition,
        ),
        (
            KeysError::NotOnExpectedNode {
                volume_id: v(),
                bound: "n1".into(),
                expected: "n2".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            KeysError::ActiveWithoutKey {
                volume_id: v(),
                version: 1,
            },
            Code::DataLoss,
        ),
        (
            KeysError::BoundElsewhere {
                volume_id: v(),
                node_id: "n1".into(),
            },
            Code::AlreadyExists,
        ),
        (
            KeysError::NoVersionsLeft { volume_id: v() },
            Code::ResourceExhausted,
        ),
        (KeysError::Contention { volume_id: v() }, Code::Aborted),
        (
            KeysError::Store {
                volume_id: v(),
                source: StoreError::Backend("down".into()),
            },
            Code::Unavailable,
        ),
        (
            KeysError::Store {
                volume_id: v(),
                source: StoreError::Corrupt {
                    volume_id: v(),
                    what: "bad".into(),
                },
            },
            Code::DataLoss,
        ),
        (
            KeysError::Wrap {
                volume_id: v(),
                source: WrapError::Unwrap {
                    volume_id: v(),
                    version: 1,
                },
            },
            Code::DataLoss,
        ),
        (
            KeysError::Wrap {
                volume_id: v(),
                source: WrapError::Random("none".into()),
            },
            Code::Internal,
        ),
    ];
    for (err, code) in table {
        let message = err.to_string();
        let s = status(err);
        assert_eq!(s.code(), code, "{message}");
        assert_eq!(s.message(), message);
    }
}
