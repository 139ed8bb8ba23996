//! Hardening of a process that holds keys: the broker (the KEK, unwrapped volume keys)
//! and the agent (volume keys on their way to dm-crypt).

use nix::sys::mman::{mlockall, MlockAllFlags};
use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};

/// `CAP_IPC_LOCK`: lock memory past `RLIMIT_MEMLOCK`.
const CAP_IPC_LOCK: u32 = 14;

/// No core dumps, no ptrace by non-root; a failure is logged (warn), never fatal. For
/// every command; [`harden`] adds memory locking for the ones that hold keys.
pub fn non_dumpable() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not make the process non-dumpable");
    }
}

/// [`non_dumpable`], and all memory locked (current and future pages), logging (warn)
/// whatever could not be done; never fatal. Call at the top of `main`, once logging is
/// set up, in a process that will hold keys.
///
/// Memory is locked only when nothing can run out of lockable memory later: no
/// `RLIMIT_MEMLOCK` limit, or `CAP_IPC_LOCK`. Under a limit, `MCL_FUTURE` would make
/// allocations fail, and the process abort, once the limit is reached under load; so
/// there it stays unlocked and says so (systemd: `LimitMEMLOCK=infinity`).
pub fn harden() {
    non_dumpable();
    if let Some(limit) = memlock_limit() {
        tracing::warn!(
            limit_bytes = limit,
            "memory not locked: RLIMIT_MEMLOCK is limited and CAP_IPC_LOCK is missing, so key \
             pages may be swapped (systemd: LimitMEMLOCK=infinity)"
        );
    } else if let Err(e) = mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        tracing::warn!(error = %e, "mlockall failed; key pages may be swapped");
    }
}

/// File descriptors a server needs besides its client connections (store, audit log,
/// listener, runtime, logging), with room to spare.
pub const FD_RESERVE: u64 = 64;

/// Warns (once, at start) when `max_connections` client connections plus
/// [`FD_RESERVE`] do not fit in `RLIMIT_NOFILE`: the cap then cannot keep `accept` from
/// failing with EMFILE (the accept loop still backs off instead of spinning).
pub fn check_fd_budget(max_connections: usize) {
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let need = max_connections as u64 + FD_RESERVE;
    if soft != RLIM_INFINITY && soft < need {
        tracing::warn!(
            nofile = soft,
            max_connections,
            "RLIMIT_NOFILE is below max_connections + {FD_RESERVE}: a flood of connections \
             can exhaust file descriptors before the cap refuses them (systemd: LimitNOFILE, \
             or lower max_connections)"
        );
    }
}

/// The `RLIMIT_MEMLOCK` soft limit in bytes, if it binds this process (`None`: no limit,
/// or `CAP_IPC_LOCK` in the effective set).
fn memlock_limit() -> Option<u64> {
    let soft = match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) => soft,
        Err(_) => return Some(0),
    };
    if soft == RLIM_INFINITY || effective_caps().is_some_and(|c| c & (1 << CAP_IPC_LOCK) != 0) {
        None
    } else {
        Some(soft)
    }
}

/// The effective capability set, from `/proc/self/status`.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_caps_are_read() {
        // The tests run as root (loop devices, dm-crypt), which has CAP_IPC_LOCK.
        let caps = effective_caps().expect("CapEff in /proc/self/status");
        assert_ne!(caps & (1 << CAP_IPC_LOCK), 0, "no CAP_IPC_LOCK: {caps:x}");
        assert_eq!(memlock_limit(), None);
    }
}
