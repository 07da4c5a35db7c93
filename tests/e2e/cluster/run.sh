#!/usr/bin/env bash
# `make e2e`: build what is missing (cached under .tools/), start the cluster, run the e2e checks
# (tests/test_e2e.py) against it, and take it all down again, on success, failure or Ctrl-C.
# Each stage is timed; the times are printed at the end, and so is what each check printed (-rA:
# the lifecycles' step times, how long the HPA took to scale, the roll's resumes).
set -euo pipefail
source "$(dirname "$0")/versions.sh"
source "$E2E_DIR/lib.sh"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
times=()
stage() { # stage NAME CMD...: run and time one stage
  local name="$1" t0=$SECONDS
  shift
  log "== $name"
  "$@"
  times+=("$name $((SECONDS - t0))s")
}
report() { printf '[e2e] stage times: %s\n' "${times[*]:-none}"; }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local t0=$SECONDS
  "$E2E_DIR/cluster-down.sh" || rc=1
  times+=("down $((SECONDS - t0))s")
  report
  exit $rc
}
"$REPO/scripts/ensure-system-deps.sh" e2e
stage build-cluster "$E2E_DIR/build-cluster-bins.sh"
stage build-monitoring "$E2E_DIR/build-monitoring-bins.sh"
stage build-images "$E2E_DIR/build-images.sh"
[ -x "$HELM" ] || { echo "no helm at $HELM: make helm" >&2; exit 1; }
trap cleanup EXIT
trap 'exit 130' INT TERM
stage up "$E2E_DIR/cluster-up.sh"
stage monitoring-up "$E2E_DIR/monitoring-up.sh"
# Extra pytest arguments, parsed as a shell would (quotes kept together), e.g.
# E2E_PYTEST_ARGS="-k 'burn or fault'" make e2e
eval "pytest_args=(${E2E_PYTEST_ARGS:-})"
stage checks env PRICESTREAM_E2E=1 E2E_STATE="$STATE" HELM="$HELM" "$PYTHON" -m pytest \
  -p no:cacheprovider -o addopts= -v -rA --durations=0 "$REPO/tests/test_e2e.py" "${pytest_args[@]}"
