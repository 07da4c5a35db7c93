# Helpers of the e2e cluster scripts: start a daemon in its own session with its PID recorded,
# wait for a condition, stop a recorded daemon by PID.
# shellcheck shell=bash
log() { echo "[e2e $(date +%H:%M:%S)] $*"; }

# start NAME CMD...: run CMD in the background, own session, log and PID under $STATE.
start() {
  local name="$1"
  shift
  mkdir -p "$STATE/pids" "$STATE/logs"
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
}

# wait_for WHAT SECONDS CMD...: until CMD succeeds; on time-out show the log of WHAT and fail.
wait_for() {
  local what="$1" secs="$2"
  shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ -f "$STATE/pids/$what.pid" ] && ! kill -0 "$(cat "$STATE/pids/$what.pid")" 2>/dev/null; then
      echo "$what exited; its log:" >&2
      tail -30 "$STATE/logs/$what.log" >&2
      return 1
    fi
    if [ $SECONDS -ge $end ]; then
      echo "$what not ready after ${secs}s; its log:" >&2
      tail -30 "$STATE/logs/$what.log" >&2 2>/dev/null
      return 1
    fi
    sleep 0.5
  done
}

# stop NAME [SECONDS]: SIGTERM the recorded PID, SIGKILL after SECONDS (default 10).
stop() {
  local name="$1" secs="${2:-10}" f="$STATE/pids/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + secs))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

kubectl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
