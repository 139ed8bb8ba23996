//! The one table of outcomes: each gRPC status code with its canonical name (as
//! `UnlockResult.code` and `--json` carry it) and the CLI exit code it becomes. The CLI,
//! the gRPC service and boot-time unlock all read it from here.

use tonic::Code;

/// The metadata key under which the agent sends a refusal's reason code with a status.
pub const REASON_KEY: &str = "nodecrypt-reason";

/// One row: a code, its canonical name, its CLI exit code.
struct Row(Code, &'static str, u8);

/// Exit codes: 0 ok, 1 internal, 2 usage, 3 precondition, 4 not found, 5 permission
/// denied, 6 broker unavailable or deadline passed.
const TABLE: &[Row] = &[
    Row(Code::Ok, "OK", 0),
    Row(Code::Cancelled, "CANCELLED", 1),
    Row(Code::Unknown, "UNKNOWN", 1),
    Row(Code::InvalidArgument, "INVALID_ARGUMENT", 2),
    Row(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", 6),
    Row(Code::NotFound, "NOT_FOUND", 4),
    Row(Code::AlreadyExists, "ALREADY_EXISTS", 3),
    Row(Code::PermissionDenied, "PERMISSION_DENIED", 5),
    Row(Code::ResourceExhausted, "RESOURCE_EXHAUSTED", 1),
    Row(Code::FailedPrecondition, "FAILED_PRECONDITION", 3),
    Row(Code::Aborted, "ABORTED", 3),
    Row(Code::OutOfRange, "OUT_OF_RANGE", 2),
    Row(Code::Unimplemented, "UNIMPLEMENTED", 1),
    Row(Code::Internal, "INTERNAL", 1),
    Row(Code::Unavailable, "UNAVAILABLE", 6),
    Row(Code::DataLoss, "DATA_LOSS", 1),
    Row(Code::Unauthenticated, "UNAUTHENTICATED", 5),
];

/// The CLI's exit-code legend, for `--help` and the README.
pub const EXIT_CODES: &str = "Exit codes: 0 ok, 1 internal error, 2 usage, 3 precondition (device holds data, in use, wrong state, header refused, a doctor check failed), 4 not found, 5 permission denied, 6 broker unavailable or deadline passed.";

fn row(code: Code) -> &'static Row {
    TABLE.iter().find(|r| r.0 == code).unwrap_or(&TABLE[2]) // UNKNOWN: every tonic code is in the table
}

/// The canonical gRPC name of `code` (`"UNAVAILABLE"`).
pub fn name(code: Code) -> &'static str {
    row(code).1
}

/// The code of a canonical name.
pub fn from_name(name: &str) -> Option<Code> {
    TABLE.iter().find(|r| r.1 == name).map(|r| r.0)
}

/// The CLI exit code of `code`.
pub fn exit_code(code: Code) -> u8 {
    row(code).2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_row_and_names_round_trip() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            let rows = TABLE.iter().filter(|r| r.0 == code).count();
            assert_eq!(rows, 1, "{code:?}");
            assert_eq!(from_name(name(code)), Some(code));
        }
        assert_eq!(name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(exit_code(Code::FailedPrecondition), 3);
        assert_eq!(exit_code(Code::DeadlineExceeded), 6);
    }
}
