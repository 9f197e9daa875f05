#!/usr/bin/env bash
# A bounded soak of one real cds-server (issue 7, part 7; not part of CI): for SOAK_TIME
# (default 10m) it runs, all at once,
#   - the load generator: unary Evaluate, 8 calls in flight, in back-to-back 30 s rounds;
#   - screening: `cdsctl screen` of 200 patients on one stream, in a loop;
#   - metadata and health calls: `cdsctl rulesets` and `cdsctl health`, in a loop;
#   - rule swaps: every 100 ms the `stable` label moves between two versions, and every
#     60 s a newly signed version is published (and the one before it retired; retired
#     versions stay listed, and in memory, for GetRuleSet and the audit);
# with every call audited to SQLite and metrics on. Every 10 s it samples the server's
# resident memory, open file descriptors and threads (from /proc) and the audit queue
# (from /metrics). At the end it prints a table and the error counts of every part, and
# writes bench/soak.md (OUT_DIR to change). Talks to 127.0.0.1 only; stops by itself.
#
# Usage: bench/soak.sh     (env: SOAK_TIME=10m, BUILD_DIR=build/release, OUT_DIR=bench,
#                          SKIP_BUILD=1 to use the binaries already in BUILD_DIR)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/wait_for_port.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build/release}
OUT=${OUT_DIR:-$ROOT/bench}
SOAK_TIME=${SOAK_TIME:-10m}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

seconds() {  # "10m" / "90s" / "1h" -> seconds
  case "$1" in
    *h) echo $(( ${1%h} * 3600 )) ;; *m) echo $(( ${1%m} * 60 )) ;; *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
TOTAL=$(seconds "$SOAK_TIME")

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== build (Release) in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCDS_BUILD_TESTS=OFF > /dev/null
  cmake --build "$BUILD" -j2 --target cds-server cdsctl load_generator > "$WORK/build.log" \
    || { cat "$WORK/build.log"; exit 1; }
fi
CDSCTL="$BUILD/client/cdsctl"

# A scratch rules directory with the bundled versions, and a soak signing key trusted
# beside the release key, so that new versions can be signed and published.
mkdir -p "$WORK/rules" "$WORK/keys" "$WORK/state" "$WORK/publish/ipex"
ln -s "$ROOT/rules/ontology" "$WORK/publish/ontology"  # `rules sign` compiles, like the server
cp -r "$ROOT/rules/ipex" "$ROOT/rules/ontology" "$WORK/rules/"
cp "$ROOT"/rules/keys/*.pub "$WORK/keys/"
"$CDSCTL" rules keygen --out "$WORK/soak" > /dev/null
cp "$WORK/soak.pub" "$WORK/keys/"
head -c 32 /dev/urandom > "$WORK/audit.key"

"$BUILD/server/cds-server" --listen 127.0.0.1:0 --insecure_dev --rules_dir "$WORK/rules" \
  --trusted_keys_dir "$WORK/keys" --state_dir "$WORK/state" --poll_interval 0 \
  --audit_db "$WORK/audit.db" --audit_key_file "$WORK/audit.key" \
  --metrics_listen 127.0.0.1:0 --grace_period 5s 2> "$WORK/server.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_for_port "$WORK/server.log" "$SERVER_PID" || exit 1
MPORT=$(sed -n 's/.*metrics on http:[^ ]*:\([0-9][0-9]*\)\/metrics.*/\1/p' "$WORK/server.log" | head -1)
SERVER=127.0.0.1:$PORT
echo "== soak of $SOAK_TIME against $SERVER (pid $SERVER_PID), metrics on $MPORT"
END=$(( $(date +%s) + TOTAL ))

# Unary load: back-to-back rounds of the load generator (no no-op target).
(
  while [ "$(date +%s)" -lt "$END" ]; do
    "$BUILD/bench/load_generator" --real "$SERVER" --patient "$ROOT/bench/typical_patient.textproto" \
      --in_flight 8 --channels 2 --warmup 0s --duration 30s --rounds 1 \
      --json_out "$WORK/load.$(date +%s).json" >> "$WORK/load.log" 2>&1 || echo "load_generator failed" >> "$WORK/errors.load"
  done
) &
PIDS+=("$!")

# Screening streams.
python3 - "$ROOT/client/examples/triad_boy.json" "$WORK/patients.jsonl" <<'PY'
import json, sys
patient = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as out:
    for i in range(200):
        out.write(json.dumps(patient) + "\n")
PY
(
  while [ "$(date +%s)" -lt "$END" ]; do
    if "$CDSCTL" screen "$WORK/patients.jsonl" --server "$SERVER" > "$WORK/screen.out" 2>> "$WORK/screen.err"; then
      echo ok >> "$WORK/screen.count"
      grep -c '"error"' "$WORK/screen.out" >> "$WORK/screen.errors" || true
    else
      echo failed >> "$WORK/errors.screen"
    fi
  done
) &
PIDS+=("$!")

# Metadata and health.
(
  while [ "$(date +%s)" -lt "$END" ]; do
    "$CDSCTL" rulesets --server "$SERVER" > /dev/null 2>> "$WORK/errors.meta" || echo rulesets >> "$WORK/errors.meta"
    [ "$("$CDSCTL" health --server "$SERVER" 2>> "$WORK/errors.meta")" = "SERVING" ] || echo health >> "$WORK/errors.meta"
    echo ok >> "$WORK/meta.count"
    sleep 0.2
  done
) &
PIDS+=("$!")

# Rule swaps: the stable label flips every 100 ms; a new signed version every 30 s.
(
  n=0
  last_swap=0
  previous=""
  while [ "$(date +%s)" -lt "$END" ]; do
    for v in 1.0.0 1.1.0; do
      "$CDSCTL" rules label ipex stable "$v" --server "$SERVER" > /dev/null 2>> "$WORK/errors.swap" \
        || echo "label $v" >> "$WORK/errors.swap"
      echo ok >> "$WORK/swap.count"
      sleep 0.1
    done
    now=$(date +%s)
    if [ $(( now - last_swap )) -ge 60 ]; then
      last_swap=$now
      n=$((n + 1))
      version="1.1.$((100 + n))"
      dir="$WORK/publish/ipex/$version"
      mkdir -p "$dir"
      cp "$ROOT"/rules/ipex/1.1.0/*.textproto "$dir/"
      sed -i "s/version: \"1.1.0\"/version: \"$version\"/" "$dir/ruleset.textproto"
      "$CDSCTL" rules sign "$dir" --key "$WORK/soak.key" --author "soak" > /dev/null 2>> "$WORK/errors.publish" \
        && "$CDSCTL" rules publish "$dir" --server "$SERVER" > /dev/null 2>> "$WORK/errors.publish" \
        || echo "publish $version" >> "$WORK/errors.publish"
      if [ -n "$previous" ]; then
        "$CDSCTL" rules retire ipex "$previous" --server "$SERVER" > /dev/null 2>> "$WORK/errors.publish" \
          || echo "retire $previous" >> "$WORK/errors.publish"
      fi
      echo ok >> "$WORK/publish.count"
      previous=$version
    fi
  done
) &
PIDS+=("$!")

# Samples every 10 s.
echo "| t (s) | RSS (MiB) | open fds | threads | audit queue | versions held |" > "$WORK/samples.md"
echo "|---|---|---|---|---|---|" >> "$WORK/samples.md"
START=$(date +%s)
while [ "$(date +%s)" -lt "$END" ]; do
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died"; tail -20 "$WORK/server.log"; exit 1; }
  rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status")
  fds=$(ls "/proc/$SERVER_PID/fd" | wc -l)
  threads=$(awk '/Threads/ {print $2}' "/proc/$SERVER_PID/status")
  read -r queue versions < <(python3 - "$MPORT" <<'PY' 2> /dev/null || echo "? ?"
import sys, urllib.request
lines = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode().splitlines()
queue = next((l.split()[1] for l in lines if l.startswith("cds_audit_queue_depth ")), "?")
versions = sum(float(l.split()[1]) for l in lines if l.startswith("cds_rule_set_versions{"))
print(queue, int(versions))
PY
)
  printf "| %d | %.1f | %d | %d | %s | %s |\n" $(( $(date +%s) - START )) "$(echo "$rss_kb / 1024" | bc -l)" \
    "$fds" "$threads" "$queue" "$versions" >> "$WORK/samples.md"
  sleep 10
done
wait "${PIDS[@]:1}" 2>/dev/null || true

count() { awk 'NF' "$1" 2> /dev/null | wc -l; }
sum() { [ -f "$1" ] && awk '{s+=$1} END {print s+0}' "$1" || echo 0; }
unary_calls=$(python3 - "$WORK" <<'PY'
import glob, json, sys
calls = errors = 0
for path in glob.glob(sys.argv[1] + "/load.*.json"):
    try:
        data = json.load(open(path))
    except Exception:
        continue
    for config in data.get("configs", []):
        for sample in config.get("real", {}).get("rounds", []):
            calls += int(sample.get("calls", 0))
            errors += int(sample.get("errors", 0))
print(calls, errors)
PY
)
metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics').read().decode())" 2>/dev/null || true)
handled_not_ok=$(echo "$metrics" | awk '/^grpc_server_handled_total/ && !/grpc_code="OK"/ {s+=$2} END {print s+0}')
handled_ok=$(echo "$metrics" | awk '/^grpc_server_handled_total/ && /grpc_code="OK"/ {s+=$2} END {print s+0}')
kill -TERM "$SERVER_PID"
wait "$SERVER_PID"; exit_code=$?

{
  echo "# Soak ($(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores, $SOAK_TIME)"
  echo
  echo "Generated by bench/soak.sh. One cds-server (audited, metrics on) under unary load (8 in"
  echo "flight), screening streams of 200 patients, metadata/health calls, the stable label"
  echo "flipping every 100 ms and a newly signed version published (the previous one retired)"
  echo "every 60 s. The machine is shared: this measures errors, memory and descriptors, not speed."
  echo
  echo "| part | runs | failures |"
  echo "|---|---|---|"
  echo "| unary load (calls, errors) | ${unary_calls% *} | ${unary_calls#* } |"
  echo "| screening streams (200 patients) | $(count "$WORK/screen.count") | $(count "$WORK/errors.screen") streams failed, $(sum "$WORK/screen.errors") patient errors |"
  echo "| rulesets + health | $(count "$WORK/meta.count") | $(count "$WORK/errors.meta") |"
  echo "| label flips | $(count "$WORK/swap.count") | $(count "$WORK/errors.swap") |"
  echo "| publish + retire | $(count "$WORK/publish.count") | $(count "$WORK/errors.publish") |"
  echo "| server: calls OK / not OK (from /metrics) | $handled_ok | $handled_not_ok |"
  echo "| server exit code after SIGTERM | | $exit_code |"
  echo
  cat "$WORK/samples.md"
} > "$OUT/soak.md"
cat "$OUT/soak.md"
for f in errors.load errors.screen errors.meta errors.swap errors.publish; do
  [ -s "$WORK/$f" ] && { echo "--- $f"; head -5 "$WORK/$f"; }
done
exit 0
