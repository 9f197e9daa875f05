#!/usr/bin/env bash
# The load generator against a real, audited cds-server and its --noop_baseline twin, briefly:
# both targets answer every call, and --distinct_patients sends the patient under that many
# references (the audit trail holds that many pseudonyms). Then one EvaluateStream at full
# speed to the audited server, pinned to one core when taskset is there: every patient is
# answered (the audit importer keeps up on a core the stream keeps busy; while it yielded
# to the calls at every chance it fell behind and patients were refused unaudited). Checks
# the tool and that, not speed.
# Usage: load_generator_test.sh SOURCE_DIR CDS_SERVER CDSCTL LOAD_GENERATOR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/wait_for_port.sh"
SRC=$1 SERVER_BIN=$2 CDSCTL=$3 LOAD_GENERATOR=$4
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cds_load_generator_XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
head -c 48 /dev/urandom > "$WORK/audit.key"

PIN=()
if command -v taskset > /dev/null; then PIN=(taskset -c 0); fi
start() {  # NAME FLAGS...: sets PORT and PID
  local name=$1; shift
  "${PIN[@]}" "$SERVER_BIN" --listen 127.0.0.1:0 --insecure_dev --rules_dir "$SRC/rules" --poll_interval 0s \
    --drain 0s "$@" 2> "$WORK/$name.log" &
  PID=$!
  PIDS+=("$PID")
  wait_for_port "$WORK/$name.log" "$PID" || exit 1
}
start real --audit_db "$WORK/audit.db" --audit_key_file "$WORK/audit.key"
REAL_PORT=$PORT REAL_PID=$PID
start noop --noop_baseline
NOOP_PORT=$PORT NOOP_PID=$PID

"$LOAD_GENERATOR" --real "127.0.0.1:$REAL_PORT" --real_pid "$REAL_PID" \
  --noop "127.0.0.1:$NOOP_PORT" --noop_pid "$NOOP_PID" \
  --patient "$SRC/bench/typical_patient.textproto" --distinct_patients 7 --in_flight 1,3 \
  --channels 2 --rounds 2 --warmup 0s --duration 300ms --stream_duration 3s \
  --json_out "$WORK/load.json" \
  > "$WORK/load.txt" 2>&1 || { cat "$WORK/load.txt"; exit 1; }
"$CDSCTL" audit --db "$WORK/audit.db" --limit 100000 --json > "$WORK/audit.json"

python3 - "$WORK/load.json" "$WORK/audit.json" << 'PY'
import json, sys
load = json.load(open(sys.argv[1]))
assert load["distinct_patients"] == 7, load
for config in load["configs"]:
    for name in ("real", "noop"):
        m = config[name]["median"]
        assert m["errors"] == 0 and m["calls"] > 0, (config["in_flight"], name, m)
        assert m["server_cpu_us_per_call"] > 0, (config["in_flight"], name, m)
    assert "real_vs_noop" in config, config
stream = load["stream"]
assert stream["errors"] == 0 and stream["patients_per_second"] > 0, stream
records = [json.loads(line) for line in open(sys.argv[2])]  # cdsctl audit --json: one per line
pseudonyms = {r.get("pseudonym", "") for r in records}
assert len(records) > 7 and len(pseudonyms) == 7, (len(records), len(pseudonyms))
print(f"ok: {len(records)} audited calls, {len(pseudonyms)} patients; "
      f"one stream: {stream['patients_per_second']:.0f} patients/s, no errors")
PY
