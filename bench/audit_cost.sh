#!/usr/bin/env bash
# What auditing costs per call: for each cds-server binary given, one server with --audit_db
# and one without are up at once, and bench/load_generator alternates between them ("real" =
# audited, "noop" = not audited; both evaluate), so the server CPU delta per call and the
# QPS ratio are the audit trail's. Several binaries (e.g. before and after a change) are
# measured in the same run, one after the other, so that their figures can be compared.
#
# Usage: bench/audit_cost.sh LOAD_GENERATOR SERVER_BINARY [SERVER_BINARY...]
#        (env: ROUNDS=3, WARMUP=1s, DURATION=3s, IN_FLIGHT=1,64, REPEAT=1, PATIENTS=10000)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/wait_for_port.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOADGEN=$1
shift
ROUNDS=${ROUNDS:-3}
PATIENTS=${PATIENTS:-10000}  # distinct patient references, in turn (bench/run.sh)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
PIN_CLIENT=()
PIN_SERVER=()
if command -v taskset > /dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_CLIENT=(taskset -c 0)
  PIN_SERVER=(taskset -c 1)
fi
head -c 48 /dev/urandom > "$WORK/audit.key"

# Starts BINARY with extra flags; sets PORT and PID.
start_server() {
  local binary=$1 log=$2
  shift 2
  "${PIN_SERVER[@]}" "$binary" --listen 127.0.0.1:0 --rules_dir "$ROOT/rules" \
    --poll_interval 0 --drain 0s --insecure_dev "$@" 2> "$log" &
  PID=$!
  PIDS+=("$PID")
  wait_for_port "$log" "$PID" || exit 1
}

for repeat in $(seq 1 "${REPEAT:-1}"); do
  n=0
  for binary in "$@"; do
    n=$((n + 1))
    start_server "$binary" "$WORK/audited$n-$repeat.log" --audit_db "$WORK/audit$n-$repeat.db" \
      --audit_key_file "$WORK/audit.key"
    AUDITED_PID=$PID AUDITED_PORT=$PORT
    start_server "$binary" "$WORK/plain$n-$repeat.log"
    PLAIN_PID=$PID PLAIN_PORT=$PORT
    echo "== $binary (audited = real, not audited = noop), repeat $repeat"
    "${PIN_CLIENT[@]}" "$LOADGEN" --real "127.0.0.1:$AUDITED_PORT" --real_pid "$AUDITED_PID" \
      --noop "127.0.0.1:$PLAIN_PORT" --noop_pid "$PLAIN_PID" \
      --patient "$ROOT/bench/typical_patient.textproto" --distinct_patients "$PATIENTS" --in_flight "${IN_FLIGHT:-1,64}" \
      --channels 4 --rounds "$ROUNDS" --warmup "${WARMUP:-1s}" --duration "${DURATION:-3s}" \
      2> /dev/null
    kill "$AUDITED_PID" "$PLAIN_PID"
    wait "$AUDITED_PID" "$PLAIN_PID" 2> /dev/null || true
  done
done
