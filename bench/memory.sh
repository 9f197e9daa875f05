#!/usr/bin/env bash
# Memory of the request path (issue 5, part 4; not part of CI): one real cds-server with 10
# ipex versions loaded (the bundled ones plus unsigned copies, hence --allow_unsigned),
# audited, takes CALLS calls (default 1 million; 64 in flight, typical patient) while its
# resident memory is sampled after every tenth of them; then a second server runs under
# heaptrack for HEAP_CALLS calls (default 50 000) and heaptrack_print summarises the heap:
# peak, leaks, and the top allocation sites. Writes bench/memory.md (OUT_DIR to change).
#
# Usage: bench/memory.sh   (env: CALLS=1000000, HEAP_CALLS=50000, BUILD_DIR=build/release,
#                          SKIP_BUILD=1 to use the binaries already in BUILD_DIR, OUT_DIR=bench)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build/release}
OUT=${OUT_DIR:-$ROOT/bench}
CALLS=${CALLS:-1000000}
HEAP_CALLS=${HEAP_CALLS:-50000}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== build (Release) in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCDS_BUILD_TESTS=OFF > /dev/null
  cmake --build "$BUILD" -j2 --target cds-server load_generator > "$WORK/build.log" \
    || { cat "$WORK/build.log"; exit 1; }
fi
command -v heaptrack > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq heaptrack > /dev/null

# Ten versions of ipex: the bundled ones and copies of the newest under new numbers.
RULES="$WORK/rules"
mkdir -p "$RULES/ipex"
ln -s "$ROOT/rules/ontology" "$RULES/ontology"
ln -s "$ROOT/rules/keys" "$RULES/keys"
NEWEST=$(ls "$ROOT/rules/ipex" | sort -V | tail -1)
count=0
for v in "$ROOT"/rules/ipex/*/; do cp -r "$v" "$RULES/ipex/"; count=$((count + 1)); done
n=0
while [ "$count" -lt 10 ]; do
  n=$((n + 1))
  mkdir "$RULES/ipex/9.$n.0"
  cp "$ROOT/rules/ipex/$NEWEST"/*.textproto "$RULES/ipex/9.$n.0/"
  sed -i "0,/version: \"$NEWEST\"/s//version: \"9.$n.0\"/" "$RULES/ipex/9.$n.0/ruleset.textproto"
  count=$((count + 1))
done
head -c 48 /dev/urandom > "$WORK/audit.key"

start_server() {  # LOG [PREFIX...] -- starts cds-server (optionally under PREFIX), sets PID/PORT
  local log=$1
  shift
  "$@" "$BUILD/server/cds-server" --listen 127.0.0.1:0 --insecure_dev --rules_dir "$RULES" \
    --allow_unsigned --poll_interval 0 --grace_period 5s --audit_db "$WORK/audit-$RANDOM.db" \
    --audit_key_file "$WORK/audit.key" 2> "$log" &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -1)
    [ -n "$PORT" ] && return 0
    sleep 0.1
  done
  cat "$log" >&2
  exit 1
}
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# Runs load until N more calls were answered; echoes the calls made and errors.
load() {  # PORT N
  local port=$1 want=$2 done_calls=0 errors=0
  while [ "$done_calls" -lt "$want" ]; do
    "$BUILD/bench/load_generator" --real "127.0.0.1:$port" \
      --patient "$ROOT/bench/typical_patient.textproto" --in_flight 64 --channels 4 --rounds 1 \
      --warmup 0s --duration 5s --json_out "$WORK/burst.json" > /dev/null 2>&1
    read -r c e < <(python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['configs'][0]['real']['median']; print(m['calls'], m['errors'])" "$WORK/burst.json")
    done_calls=$((done_calls + c))
    errors=$((errors + e))
  done
  echo "$done_calls $errors"
}

echo "== $CALLS calls against 10 versions"
start_server "$WORK/server.log"
SERVER_PID=$PID
LOADED=$(sed -n 's/.*loaded rule sets from [^:]*: \([0-9]*\) available.*/\1/p' "$WORK/server.log")
echo "| calls | RSS (MiB) | errors so far |" > "$WORK/rss.md"
echo "|---|---|---|" >> "$WORK/rss.md"
echo "| 0 | $(rss_mib "$SERVER_PID") | 0 |" >> "$WORK/rss.md"
total=0
errors=0
step=$((CALLS / 10))
while [ "$total" -lt "$CALLS" ]; do
  read -r c e < <(load "$PORT" "$step")
  total=$((total + c))
  errors=$((errors + e))
  echo "| $total | $(rss_mib "$SERVER_PID") | $errors |" | tee -a "$WORK/rss.md"
done
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true

echo "== heaptrack: $HEAP_CALLS calls"
start_server "$WORK/heap.log" heaptrack -o "$WORK/heap"
HEAP_PID=$PID
read -r heap_calls heap_errors < <(load "$PORT" "$HEAP_CALLS")
# heaptrack runs the server as its child: stop the server, then heaptrack writes its file.
kill -TERM "$(pgrep -P "$HEAP_PID" -f "server/cds-server")"
wait "$HEAP_PID" || true
for _ in $(seq 1 100); do ls "$WORK"/heap*.zst "$WORK"/heap*.gz > /dev/null 2>&1 && break; sleep 0.2; done
HEAP_FILE=$(ls "$WORK"/heap* | grep -E '\.(zst|gz)$' | head -1)
heaptrack_print -f "$HEAP_FILE" --print-peaks 1 --print-allocators 1 --print-leaks 1 \
  --print-temporary 0 \
  -n 8 > "$WORK/heap.txt" 2>&1 || true

{
  echo "# Memory ($(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$ROOT" rev-parse --short HEAD), $(nproc) cores)"
  echo
  echo "Generated by bench/memory.sh. One audited cds-server with $LOADED ipex versions loaded,"
  echo "64 calls in flight (typical patient), resident memory after every tenth of the calls:"
  echo
  cat "$WORK/rss.md"
  echo
  echo "Heap profile (heaptrack, $heap_calls calls, $heap_errors errors) of another such server:"
  echo
  echo '```'
  grep -E "^(total runtime|calls to allocation functions|temporary memory allocations|peak heap memory consumption|peak RSS|total memory leaked|suppressed leaks)" "$WORK/heap.txt" || true
  echo
  echo
  # Each section's top entries: the allocating function and where it is (full backtraces
  # are in the heaptrack file, which heaptrack_print or heaptrack_gui read).
  awk '/^(MOST CALLS TO ALLOCATION FUNCTIONS|PEAK MEMORY CONSUMERS|MEMORY LEAKS)$/ {print; n = 0; next}
       /^[0-9.]+[KMG]?B? .*(calls to allocation functions|peak consumption|peak memory consumed|leaked over)/ && n < 4 {
         getline fn; print "  " $0 "\n    " fn; n++ }' "$WORK/heap.txt" || true
  echo '```'
} > "$OUT/memory.md"
cat "$OUT/memory.md"
