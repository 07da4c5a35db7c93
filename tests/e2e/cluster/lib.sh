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
stop() { stop_all "${2:-10}" "$1"; }

# stop_all SECONDS NAME...: SIGTERM every recorded PID at once, wait for all of them, SIGKILL
# those still there after SECONDS: a group stops in the time of its slowest, not of their sum.
stop_all() {
  local secs="$1" name f pid pids=()
  shift
  for name in "$@"; do
    f="$STATE/pids/$name.pid"
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  local end=$((SECONDS + secs)) alive
  while :; do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] || [ $SECONDS -ge $end ] && break
    sleep 0.1
  done
  for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  for name in "$@"; do rm -f "$STATE/pids/$name.pid"; done
  return 0
}

kubectl() { "$KUBECTL" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
