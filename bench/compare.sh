#!/usr/bin/env bash
# Two builds of the project in one run, alternated (for before/after ratios on a noisy shared
# machine): each build's engine_benchmark (CPU time per call, medians over the rounds), then
# each build's cds-server, audited, under bench/load_generator (the NEW build's): unary QPS at
# 1 and 64 calls in flight and one EvaluateStream's patients/s. Server pinned to core 1 and
# client to core 0 when taskset exists. Nothing here is a test; the output is text.
#
# Usage: bench/compare.sh OLD_BUILD_DIR OLD_SOURCE_DIR NEW_BUILD_DIR NEW_SOURCE_DIR
#        (env: ROUNDS=3; both builds need engine_benchmark and cds-server, the new one
#        load_generator)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/wait_for_port.sh"
OLD_BUILD=$1 OLD_SRC=$2 NEW_BUILD=$3 NEW_SRC=$4
ROUNDS=${ROUNDS:-3}
PATIENTS=${PATIENTS:-10000}  # distinct patient references, in turn (bench/run.sh)
W=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
PIN_CLIENT=() PIN_SERVER=()
if command -v taskset > /dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_CLIENT=(taskset -c 0) PIN_SERVER=(taskset -c 1)
fi

echo "== engine_benchmark, $ROUNDS alternated rounds"
for r in $(seq "$ROUNDS"); do
  for side in old new; do
    build=$OLD_BUILD; [ "$side" = new ] && build=$NEW_BUILD
    "${PIN_SERVER[@]}" "$build/bench/engine_benchmark" --benchmark_filter=Evaluate \
      --benchmark_min_time=0.3 --benchmark_format=json 2> /dev/null > "$W/engine.$side.$r.json"
  done
done
python3 - "$W" "$ROUNDS" <<'PY'
import json, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
times = {}
for side in ("old", "new"):
    for r in range(1, rounds + 1):
        for b in json.load(open(f"{w}/engine.{side}.{r}.json"))["benchmarks"]:
            times.setdefault((side, b["name"], b.get("label", "")), []).append(b["cpu_time"] / 1000)
for (side, name, label), v in sorted(times.items()):
    print(f"{side} {name}: median {statistics.median(v):.1f} us CPU ({', '.join(f'{x:.1f}' for x in v)}) {label}")
PY

head -c 48 /dev/urandom | base64 > "$W/key"
start() {  # side build source
  "${PIN_SERVER[@]}" "$2/server/cds-server" --listen 127.0.0.1:0 --rules_dir "$3/rules" \
    --poll_interval 0 --drain 0s --insecure_dev --audit_db "$W/$1.db" --audit_key_file "$W/key" \
    2> "$W/$1.log" &
  local pid=$!
  PIDS+=("$pid")
  wait_for_port "$W/$1.log" "$pid" || exit 1
  eval "${1}_PORT=$PORT ${1}_PID=$pid"
}
start old "$OLD_BUILD" "$OLD_SRC"
start new "$NEW_BUILD" "$NEW_SRC"
echo "== audited servers, $ROUNDS alternated rounds (unary 1 and 64 in flight, one stream)"
for r in $(seq "$ROUNDS"); do
  for side in old new; do
    port=$(eval echo "\$${side}_PORT") pid=$(eval echo "\$${side}_PID")
    "${PIN_CLIENT[@]}" "$NEW_BUILD/bench/load_generator" --real "127.0.0.1:$port" --real_pid "$pid" \
      --patient "$NEW_SRC/bench/typical_patient.textproto" --distinct_patients "$PATIENTS" --in_flight 1,64 --channels 4 \
      --rounds 1 --warmup 1s --duration 3s --stream_duration 3s > "$W/load.$side.$r.txt" 2>&1
    echo "$side round $r:"
    grep -E "^in_flight|EvaluateStream" "$W/load.$side.$r.txt" | sed 's/^/  /'
  done
done
