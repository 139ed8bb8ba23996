# Shared helpers for the VM harness scripts (sourced, not run).
# VM_DIR: the cache (default <repo>/target/vm); everything the harness downloads or
# builds lives there, keyed by version, so a second run reuses it.
set -euo pipefail

VM_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$VM_SRC/../.." && pwd)"
VM_DIR="${VM_DIR:-$REPO_ROOT/target/vm}"
mkdir -p "$VM_DIR"

log() { echo "vm: $*" >&2; }
die() { echo "vm: error: $*" >&2; exit 1; }

# Runs "$@" under flock on $VM_DIR/<name>.lock so concurrent callers build a cache
# entry once.
with_lock() {
  local name=$1; shift
  (
    exec 9>"$VM_DIR/$name.lock"
    flock -w 900 9 || die "timed out waiting for the $name lock"
    "$@"
  )
}
