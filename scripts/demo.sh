#!/usr/bin/env bash
# nodecrypt end to end on this machine: dev PKI, key broker, agent, a 512 MiB file-backed
# LUKS2 volume opened with dm-crypt (or the userspace engine where the kernel has no
# device-mapper), ext4 on it, files written, closed, reopened, verified. Everything it
# starts (processes, mounts, loop devices) is cleaned up on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${NODECRYPT_BIN:-target/release}
DEMO=${NODECRYPT_DEMO_DIR:-$PWD/target/demo}
VOL=demo-vol
SIZE_MIB=${NODECRYPT_DEMO_SIZE_MIB:-512}

step() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'demo failed: %s\n' "$*" >&2; exit 1; }
# Waits (30 s at most) for a server's one-line readiness report, or for it to die.
wait_ready() {
  for _ in $(seq 300); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

[ "$(id -u)" -eq 0 ] || die "run as root (dm-crypt, FUSE, loop devices and mounts need it)"
for b in nodecrypt nodecrypt-agent nodecrypt-keybroker; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run 'make demo' (it builds first)"
done

BROKER_PID="" AGENT_PID="" MNT="$DEMO/mnt"
cleanup() {
  set +e
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
  [ -S "$DEMO/agent.sock" ] && "$BIN/nodecrypt" --socket "$DEMO/agent.sock" close --volume-id "$VOL" >/dev/null 2>&1
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null
  # A killed agent can leave a dead FUSE mount and its loop device behind.
  for m in $(awk -v d="$DEMO/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r); do umount -l "$m"; done
  for l in $(losetup -nO NAME -j "$DEMO/run/mnt/$VOL/disk" 2>/dev/null); do losetup -d "$l"; done
  for l in $(losetup -nO NAME -j "$DEMO/volume.img" 2>/dev/null); do losetup -d "$l"; done
}
trap cleanup EXIT
trap 'echo; step "interrupted: cleaning up"; exit 130' INT TERM

rm -rf "$DEMO" && mkdir -p "$DEMO" && chmod 700 "$DEMO"

step "dev PKI (CA, broker, node n1, admin ops) in $DEMO/pki"
"$BIN/nodecrypt-keybroker" pki init --dir "$DEMO/pki" --trust-domain demo.nodecrypt \
  --node n1 --admin ops >/dev/null

step "key broker: new KEK, embedded redb store in $DEMO/broker"
"$BIN/nodecrypt-keybroker" init --state-dir "$DEMO/broker" >/dev/null
cat >"$DEMO/broker.toml" <<EOF
listen = "127.0.0.1:0"
trust_domain = "demo.nodecrypt"
state_dir = "$DEMO/broker"
[tls]
cert = "$DEMO/pki/broker.pem"
key = "$DEMO/pki/broker.key"
ca = "$DEMO/pki/ca.pem"
EOF
"$BIN/nodecrypt-keybroker" serve --config "$DEMO/broker.toml" >"$DEMO/broker.ready" 2>>"$DEMO/broker.log" &
BROKER_PID=$!
wait_ready "$DEMO/broker.ready" "$BROKER_PID" || die "broker did not start: $(tail -5 "$DEMO/broker.log")"
ADDR=$(sed -E 's/.*"listen":"([^"]+)".*/\1/' "$DEMO/broker.ready")
step "key broker serving mTLS on $ADDR"

if grep -q ' device-mapper$' /proc/misc 2>/dev/null || [ -d /sys/module/dm_mod ]; then BACKEND=dm-crypt; else BACKEND=userspace; fi
truncate -s "${SIZE_MIB}M" "$DEMO/volume.img"
cat >"$DEMO/agent.toml" <<EOF
socket = "$DEMO/agent.sock"
run_dir = "$DEMO/run"
backend = "$BACKEND"
unlock_deadline = "30s"
allow_file_devices = true
file_devices = ["$DEMO/volume.img"]
[broker]
endpoint = "$ADDR"
cert = "$DEMO/pki/node-n1.pem"
key = "$DEMO/pki/node-n1.key"
ca = "$DEMO/pki/ca.pem"
EOF
"$BIN/nodecrypt-agent" --config "$DEMO/agent.toml" >"$DEMO/agent.ready" 2>>"$DEMO/agent.log" &
AGENT_PID=$!
wait_ready "$DEMO/agent.ready" "$AGENT_PID" || die "agent did not start: $(tail -5 "$DEMO/agent.log")"
step "node agent serving on $DEMO/agent.sock (backend: $BACKEND)"
nc() { "$BIN/nodecrypt" --socket "$DEMO/agent.sock" "$@"; }

step "format a ${SIZE_MIB} MiB file as LUKS2 volume $VOL (key created by the broker, never seen)"
nc format "$DEMO/volume.img" --volume-id "$VOL"
step "open it"
nc open --volume-id "$VOL"
DEV=$(nc --json status --volume-id "$VOL" | sed -E 's/.*"mapped_device":"([^"]*)".*/\1/')
[ -b "$DEV" ] || die "no block device for the open volume"
step "mkfs.ext4 on $DEV"
mkfs.ext4 -q -F "$DEV"
mkdir -p "$MNT" && mount "$DEV" "$MNT"
step "write 20 files with random contents"
for i in $(seq 1 20); do head -c $((RANDOM * 8)) /dev/urandom >"$MNT/file-$i"; done
(cd "$MNT" && sha256sum file-*) >"$DEMO/sums"
sync
step "nodecrypt status"
nc status
umount "$MNT"
step "close the volume"
nc close --volume-id "$VOL"
step "reopen it"
nc open --volume-id "$VOL"
DEV=$(nc --json status --volume-id "$VOL" | sed -E 's/.*"mapped_device":"([^"]*)".*/\1/')
fsck.ext4 -n "$DEV" >/dev/null 2>&1 || die "fsck found problems"
mount "$DEV" "$MNT"
(cd "$MNT" && sha256sum --quiet -c "$DEMO/sums") || die "files differ after reopen"
step "fsck clean; all 20 files identical after close and reopen"
umount "$MNT"
nc close --volume-id "$VOL"
step "done: broker audit log has $(wc -l <"$DEMO/broker/audit.log") hash-chained lines; cleaning up"
