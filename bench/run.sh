#!/usr/bin/env bash
# One command for the performance figures of issue 5: builds Release (cds-server, the engine
# microbenchmarks, the load generator; tests off), runs the engine microbenchmarks, starts a
# real cds-server (auditing every call to a SQLite file) and a --noop_baseline one on
# 127.0.0.1 (plaintext, --insecure_dev; both up at once, pinned to one core and the client to
# the other when taskset and 2+ cores exist), alternates the load generator between them
# (1 and 64 calls in flight, several rounds), measures one EvaluateStream, reads resident
# memory (also with 10 rule-set versions loaded, between bursts of load), measures rule
# updates under load (a third, audited server with a state directory: steady state against a
# new signed version published and labelled `stable` every PUBLISH_EVERY, alternated), and
# writes bench/report.md and bench/report.json. Everything stops by itself; nothing here is
# a test.
#
# Usage: bench/run.sh            (env: BUILD_DIR, OUT_DIR, ROUNDS=5, WARMUP=1s, DURATION=3s,
#                                 PUBLISH_EVERY=100ms, KEEP_VERSIONS=10, PATIENTS=10000)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/wait_for_port.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build/release}  # under build/, which git ignores
OUT=${OUT_DIR:-$ROOT/bench}
ROUNDS=${ROUNDS:-5}
# The typical patient is sent under this many references, in turn, as a hospital's calls
# would name many patients (one reference flatters the audit trail's per-patient index).
PATIENTS=${PATIENTS:-10000}
WARMUP=${WARMUP:-1s}
DURATION=${DURATION:-3s}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start=$(date +%s)
echo "== build (Release) in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCDS_BUILD_TESTS=OFF > /dev/null
cmake --build "$BUILD" -j2 --target cds-server cdsctl engine_benchmark load_generator > "$WORK/build.log" \
  || { cat "$WORK/build.log"; exit 1; }

PIN_CLIENT=()
PIN_SERVER=()
if command -v taskset > /dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_CLIENT=(taskset -c 0)
  PIN_SERVER=(taskset -c 1)
fi

echo "== engine microbenchmarks"
"${PIN_SERVER[@]}" "$BUILD/bench/engine_benchmark" --benchmark_format=json \
  --benchmark_min_time=0.3 > "$WORK/engine.json" 2> "$WORK/engine.err"

# Starts cds-server with the given extra flags; sets PORT and PID.
start_server() {
  local log=$1
  shift
  "${PIN_SERVER[@]}" "$BUILD/server/cds-server" --listen 127.0.0.1:0 --rules_dir "$ROOT/rules" \
    --poll_interval 0 --drain 0s --insecure_dev "$@" 2> "$log" &
  PID=$!
  PIDS+=("$PID")
  wait_for_port "$log" "$PID" || exit 1
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

echo "== servers"
# The real server audits every call, as in production (the issue's targets include auditing).
head -c 48 /dev/urandom | base64 > "$WORK/audit.key"
start_server "$WORK/real.log" --audit_db "$WORK/audit.db" --audit_key_file "$WORK/audit.key"
REAL_PID=$PID REAL_PORT=$PORT
start_server "$WORK/noop.log" --noop_baseline
NOOP_PID=$PID NOOP_PORT=$PORT
REAL_RSS_BEFORE=$(rss_kib "$REAL_PID")

echo "== load: real (pid $REAL_PID) against noop (pid $NOOP_PID), $ROUNDS rounds"
"${PIN_CLIENT[@]}" "$BUILD/bench/load_generator" \
  --real "127.0.0.1:$REAL_PORT" --real_pid "$REAL_PID" \
  --noop "127.0.0.1:$NOOP_PORT" --noop_pid "$NOOP_PID" \
  --patient "$ROOT/bench/typical_patient.textproto" --distinct_patients "$PATIENTS" --in_flight 1,64 --channels 4 \
  --rounds "$ROUNDS" --warmup "$WARMUP" --duration "$DURATION" --stream_duration "$DURATION" \
  --json_out "$WORK/load.json" | tee "$WORK/load.txt"
REAL_RSS_AFTER=$(rss_kib "$REAL_PID")
NOOP_RSS_AFTER=$(rss_kib "$NOOP_PID")
kill "$REAL_PID" "$NOOP_PID"

echo "== rule updates under load: a new signed version every ${PUBLISH_EVERY:-100ms}, 'stable' moved to it"
# A throwaway signing key (the release key's private half is not here), trusted beside the
# release key; the server persists what is published under its own state directory.
UPD="$WORK/updates"
mkdir -p "$UPD/keys"
cp "$ROOT"/rules/keys/*.pub "$UPD/keys/"
"$BUILD/client/cdsctl" rules keygen --out "$UPD/bench" > /dev/null
cp "$UPD/bench.pub" "$UPD/keys/"
KEEP_VERSIONS=${KEEP_VERSIONS:-10}
start_server "$WORK/updates.log" --state_dir "$UPD/state" --trusted_keys_dir "$UPD/keys" \
  --audit_db "$WORK/updates.db" --audit_key_file "$WORK/audit.key" --keep_versions "$KEEP_VERSIONS"
UPD_PID=$PID UPD_PORT=$PORT
UPD_RSS_BEFORE=$(rss_kib "$UPD_PID")
NEWEST_SIGNED=$(ls "$ROOT/rules/ipex" | sort -V | tail -1)
"${PIN_CLIENT[@]}" "$BUILD/bench/load_generator" --real "127.0.0.1:$UPD_PORT" --real_pid "$UPD_PID" \
  --patient "$ROOT/bench/typical_patient.textproto" --distinct_patients "$PATIENTS" --in_flight 64 --channels 4 \
  --rounds "$ROUNDS" --warmup "$WARMUP" --duration "$DURATION" \
  --publish_every "${PUBLISH_EVERY:-100ms}" --publish_key "$UPD/bench.key" \
  --publish_source "$ROOT/rules/ipex/$NEWEST_SIGNED" --publish_label stable \
  --json_out "$WORK/updates.json" | tee "$WORK/updates.txt"
UPD_RSS_AFTER=$(rss_kib "$UPD_PID")
UPD_AVAILABLE=$(grep -c ' AVAILABLE digest=' "$WORK/updates.log" || true)
UPD_UNLOADED=$(grep -c ' UNLOADED by the retention policy' "$WORK/updates.log" || true)
kill "$UPD_PID"
export UPD_RSS_BEFORE UPD_RSS_AFTER UPD_AVAILABLE UPD_UNLOADED KEEP_VERSIONS

echo "== memory: 10 rule-set versions loaded, resident memory between load bursts"
# The bundled versions plus unsigned copies of the newest one (hence --allow_unsigned) under
# new version numbers, up to 10 versions of ipex.
MEM_RULES="$WORK/rules"
mkdir -p "$MEM_RULES/ipex"
ln -s "$ROOT/rules/ontology" "$MEM_RULES/ontology"
ln -s "$ROOT/rules/keys" "$MEM_RULES/keys"
NEWEST=$(ls "$ROOT/rules/ipex" | sort -V | tail -1)
count=0
for v in "$ROOT"/rules/ipex/*/; do cp -r "$v" "$MEM_RULES/ipex/"; count=$((count + 1)); done
n=0
while [ "$count" -lt 10 ]; do
  n=$((n + 1))
  version="9.$n.0"
  mkdir "$MEM_RULES/ipex/$version"
  cp "$ROOT/rules/ipex/$NEWEST"/*.textproto "$MEM_RULES/ipex/$version/"
  sed -i "0,/version: \"$NEWEST\"/s//version: \"$version\"/" "$MEM_RULES/ipex/$version/ruleset.textproto"
  count=$((count + 1))
done
start_server "$WORK/mem.log" --rules_dir "$MEM_RULES" --allow_unsigned
MEM_PID=$PID MEM_PORT=$PORT
LOADED=$(sed -n 's/.*loaded rule sets from [^:]*: \([0-9]*\) available.*/\1/p' "$WORK/mem.log")
MEM_RSS=("$(rss_kib "$MEM_PID")")
MEM_CALLS=(0)
total=0
for burst in $(seq 1 "${MEMORY_BURSTS:-4}"); do
  "${PIN_CLIENT[@]}" "$BUILD/bench/load_generator" --real "127.0.0.1:$MEM_PORT" \
    --patient "$ROOT/bench/typical_patient.textproto" --distinct_patients "$PATIENTS" --in_flight 64 --channels 4 --rounds 1 \
    --warmup 0s --duration "${MEMORY_BURST:-8s}" --json_out "$WORK/mem$burst.json" > /dev/null 2>&1
  calls=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['configs'][0]['real']['median']['calls'])" "$WORK/mem$burst.json")
  total=$((total + calls))
  MEM_CALLS+=("$total")
  MEM_RSS+=("$(rss_kib "$MEM_PID")")
done
echo "versions available: $LOADED; calls: ${MEM_CALLS[*]}; RSS KiB: ${MEM_RSS[*]}"
elapsed=$(( $(date +%s) - start ))

python3 - "$WORK" "$OUT" "$REAL_RSS_BEFORE" "$REAL_RSS_AFTER" "$NOOP_RSS_AFTER" "$elapsed" \
  "${#PIN_SERVER[@]}" "$LOADED" "${MEM_CALLS[*]}" "${MEM_RSS[*]}" << 'EOF'
import datetime, json, os, platform, subprocess, sys
work, out, rss_before, rss_after, noop_rss, elapsed, pinned, loaded, mem_calls, mem_rss = sys.argv[1:]
engine = json.load(open(os.path.join(work, "engine.json")))
load = json.load(open(os.path.join(work, "load.json")))
cpu = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
machine = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
report = {
    "date": now, "machine": machine, "pinned": pinned != "0", "elapsed_s": int(elapsed),
    "engine": [{"name": b["name"], "real_time": b["real_time"], "cpu_time": b["cpu_time"],
                "time_unit": b["time_unit"], "label": b.get("label", "")}
               for b in engine["benchmarks"]],
    "load": load,
    "memory_kib": {"real_rss_before_load": int(rss_before), "real_rss_after_load": int(rss_after),
                   "noop_rss_after_load": int(noop_rss),
                   "ten_versions": {"versions_available": int(loaded or 0),
                                    "calls": [int(x) for x in mem_calls.split()],
                                    "rss_kib": [int(x) for x in mem_rss.split()]}},
}
updates = json.load(open(os.path.join(work, "updates.json")))["rule_updates"]
updates["memory_kib"] = {"rss_before": int(os.environ["UPD_RSS_BEFORE"]),
                         "rss_after": int(os.environ["UPD_RSS_AFTER"]),
                         "versions_loaded_total": int(os.environ["UPD_AVAILABLE"] or 0),
                         "versions_unloaded": int(os.environ["UPD_UNLOADED"] or 0),
                         "keep_versions": int(os.environ["KEEP_VERSIONS"])}
report["rule_updates"] = updates
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=2)

md = [f"# Performance report", "",
      f"{now}; {machine}; client and servers pinned to different cores: "
      f"{'yes' if report['pinned'] else 'no'}; run took {elapsed} s (bench/run.sh).", "",
      "## Engine (build/bench/engine_benchmark)", "",
      "| benchmark | time | label |", "|---|---|---|"]
for b in report["engine"]:
    md.append(f"| {b['name']} | {b['real_time']:.1f} {b['time_unit']} | {b['label']} |")
md += ["", "## Server against its no-op baseline (bench/load_generator)", "",
       "The real server audits every call (--audit_db, SQLite); the no-op one does not evaluate. "
       f"Request {load['request_bytes']} bytes (bench/typical_patient.textproto, sent under "
       f"{load.get('distinct_patients', 1)} patient references in turn); "
       f"{load['warmup_s']} s warm-up then {load['duration_s']} s measured per target and round; "
       "medians over rounds; ratios are medians of each round's real/no-op pair. The client "
       "sends pre-serialized requests and reads only the status and rule-set version of each "
       "response, so that its own CPU does not bound what it measures.", "",
       "| in flight | server | QPS | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | server CPU µs/call | client CPU µs/call |",
       "|---|---|---|---|---|---|---|---|---|---|"]
for c in load["configs"]:
    for name in ("real", "noop"):
        if name not in c: continue
        m = c[name]["median"]
        md.append(f"| {c['in_flight']} | {name} | {m['qps']:.0f} | {m['p50_us']:.1f} | {m['p90_us']:.1f} | "
                  f"{m['p99_us']:.1f} | {m['p999_us']:.1f} | {m['errors']} | "
                  f"{m['server_cpu_us_per_call']:.1f} | {m['client_cpu_us_per_call']:.1f} |")
md += ["", "Each cell: the median of the rounds' real/no-op pairs, then [the lowest .. the highest "
       "pair]: how far one pair of rounds can stray on this machine.", "",
       "| in flight | QPS real/noop | p50 real−noop | p99 real/noop | server CPU real−noop |",
       "|---|---|---|---|---|"]
def spread(c, f, fmt):
    pairs = [f(r, n) for r, n in zip(c["real"]["rounds"], c["noop"]["rounds"])]
    return f"[{format(min(pairs), fmt)} .. {format(max(pairs), fmt)}]" if pairs else ""
for c in load["configs"]:
    r = c.get("real_vs_noop")
    if r:
        qps = spread(c, lambda a, b: a["qps"] / b["qps"] if b["qps"] else 0, ".3f")
        p50 = spread(c, lambda a, b: a["p50_us"] - b["p50_us"], "+.1f")
        p99 = spread(c, lambda a, b: a["p99_us"] / b["p99_us"] if b["p99_us"] else 0, ".3f")
        cpu = spread(c, lambda a, b: a["server_cpu_us_per_call"] - b["server_cpu_us_per_call"], "+.1f")
        md.append(f"| {c['in_flight']} | {r['qps_ratio']:.3f} {qps} | {r['p50_delta_us']:+.1f} µs {p50} | "
                  f"{r['p99_ratio']:.3f} {p99} | {r['server_cpu_delta_us_per_call']:+.1f} µs/call {cpu} |")
if "stream" in load:
    s = load["stream"]
    unary = {c["in_flight"]: c["real"]["median"] for c in load["configs"] if "real" in c}
    ratios = "; ".join(f"{s['patients_per_second'] / u['qps']:.2f}x the unary QPS at {n} in flight"
                       for n, u in sorted(unary.items()) if u["qps"] > 0)
    md += ["", f"One EvaluateStream to the real server (after the rounds): "
           f"{s['patients_per_second']:.0f} patients/s ({s['errors']} errors), "
           f"{s.get('server_cpu_us_per_patient', -1):.1f} µs of server CPU and "
           f"{s.get('client_cpu_us_per_patient', -1):.1f} µs of client CPU per patient; {ratios}."]
m = report["memory_kib"]
md += ["", "## Memory", "",
       f"Real server resident memory: {m['real_rss_before_load'] / 1024:.1f} MiB before the load, "
       f"{m['real_rss_after_load'] / 1024:.1f} MiB after it; no-op server after the load: "
       f"{m['noop_rss_after_load'] / 1024:.1f} MiB.", "",
       f"With {m['ten_versions']['versions_available']} ipex versions loaded, resident memory "
       "after each burst of load (64 in flight): " +
       ", ".join(f"{c} calls: {r / 1024:.1f} MiB" for c, r in
                 zip(m['ten_versions']['calls'], m['ten_versions']['rss_kib'])) + "."]
u = report["rule_updates"]
um = u["memory_kib"]
up = u["updates"]
md += ["", "## Rule updates under load", "",
       f"A third real server (audited, --state_dir, --keep_versions {um['keep_versions']}) under "
       f"{u['in_flight']} calls in flight over {u['channels']} channels; its requests name no "
       f"version, so they resolve through the label `{u['label']}`. Steady state and publishing "
       f"alternate for {u['rounds']} rounds ({report['load']['warmup_s']} s warm-up then "
       f"{report['load']['duration_s']} s measured each). While publishing, every "
       f"{u['publish_every_ms']:.0f} ms bench/load_generator signs a new version (the newest "
       "bundled ipex re-versioned, patch + 1 each time, with a throwaway key the server trusts), "
       "publishes it (RuleSetAdmin.PublishRuleSet: signature, hashes, compile, embedded cases, "
       f"fsync) and moves `{u['label']}` to it (SetLabel). Medians over rounds; errors and "
       "versions are totals.", "",
       "| phase | QPS | p50 µs | p99 µs | p99.9 µs | errors | versions in responses | server CPU µs/call |",
       "|---|---|---|---|---|---|---|---|"]
for phase in ("steady", "publishing"):
    m = u[phase]["median"]
    md.append(f"| {phase} | {m['qps']:.0f} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['p999_us']:.1f} | "
              f"{m['errors']} | {m['versions_seen']} | {m['server_cpu_us_per_call']:.1f} |")
errors = u["steady"]["median"]["errors"] + u["publishing"]["median"]["errors"]
md += ["", f"p99 publishing / steady: {u['p99_ratio']:.2f} (target <= 2; median of the rounds' pairs; "
       f"{u['p99_ratio_of_medians']:.2f} as the ratio of the medians above); "
       f"QPS publishing / steady: {u['qps_ratio']:.2f}; failed calls: {errors} (target 0).", "",
       f"Versions swapped: {up['labelled']} published and labelled ({up['first_version']} .. "
       f"{up['last_version']}; per round: {', '.join(str(x) for x in up['per_round'])}); failed: "
       f"{up['publish_failed']} publishes, {up['label_failed']} label moves"
       + (f" (first: {up['first_error']})" if up['first_error'] else "") +
       f"; {up['late']} updates started late because the previous one overran its interval. "
       f"Publish latency p50 {up['publish']['p50_ms']:.1f} ms, p99 {up['publish']['p99_ms']:.1f} ms, "
       f"max {up['publish']['max_ms']:.1f} ms; label move p50 {up['label_move']['p50_ms']:.1f} ms, "
       f"p99 {up['label_move']['p99_ms']:.1f} ms.", "",
       f"Resident memory: {um['rss_before'] / 1024:.1f} MiB before, {um['rss_after'] / 1024:.1f} MiB "
       f"after all rounds; after each round (steady, publishing): " +
       ", ".join(f"{s['rss_kib'] / 1024:.1f} / {p['rss_kib'] / 1024:.1f}"
                 for s, p in zip(u["steady"]["rounds"], u["publishing"]["rounds"])) +
       f" MiB. {um['versions_loaded_total']} versions were loaded in all, "
       f"{um['versions_unloaded']} of them unloaded by the retention policy."]
open(os.path.join(out, "report.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
echo "== wrote $OUT/report.md and $OUT/report.json in $(( $(date +%s) - start )) s"
