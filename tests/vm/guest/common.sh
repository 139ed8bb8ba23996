# Sourced by the scenarios: the state disk, the broker and the agent inside the guest.
# /dev/vda is the state disk (ext4, built on the host): pki/, broker-state/, broker.toml,
# agent.toml, pattern files. Logs go to /state/logs so the host can read them back.
mkdir -p /state /run/cryptsetup /run/nodecrypt
mount -t ext4 /dev/vda /state
mkdir -p /state/logs

# wait_line FILE SECONDS: waits until FILE holds a line (a daemon's readiness line).
wait_line() {
  i=0
  while ! grep -q . "$1" 2>/dev/null; do
    i=$((i + 1))
    [ $i -le $(($2 * 10)) ] || { echo "no readiness line in $1 after $2 s"; return 1; }
    kill -0 "$3" 2>/dev/null || { echo "process $3 exited before it was ready"; return 1; }
    usleep 100000
  done
}

start_broker() {
  nodecrypt-keybroker serve --config /state/broker.toml \
    >/run/broker.out 2>>/state/logs/broker.log &
  BROKER_PID=$!
  wait_line /run/broker.out 60 $BROKER_PID
  echo "broker ready: $(cat /run/broker.out)"
}

start_agent() {
  nodecrypt-agent --config /state/agent.toml >/run/agent.out 2>>/state/logs/agent.log &
  AGENT_PID=$!
  wait_line /run/agent.out 60 $AGENT_PID
  echo "agent ready: $(cat /run/agent.out)"
}

# stop PID: SIGTERM and wait for the exit (graceful: the broker's store is closed cleanly).
stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  wait "$1" || true
}

# On failure, show the daemons' log tails on the console (the host prints the console).
on_exit() {
  rc=$?
  if [ $rc -ne 0 ]; then
    for f in /state/logs/*.log; do echo "--- $f"; tail -n 20 "$f"; done
    echo "--- dmesg"; dmesg | tail -n 20
  fi
  [ -n "${AGENT_PID:-}" ] && stop "$AGENT_PID"
  [ -n "${BROKER_PID:-}" ] && stop "$BROKER_PID"
  sync
  umount /state 2>/dev/null || true
  exit $rc
}
trap on_exit EXIT
