#!/usr/bin/env bash
# Builds the libFuzzer targets (clang++-14, ASan + UBSan, -DCDS_FUZZ=ON) and runs each for a
# fixed time, one after the other, then prints executions, exec/s, corpus size and crashes.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]     # default 60 s each, all three targets
#   nice -n 19 bash fuzz/run.sh 600            # the 10-minute runs of fuzz/README.md
#
# BUILD_DIR (default build/fuzz) holds the build; WORK_DIR (default BUILD_DIR/work) the
# corpus each run grows (WORK_DIR/<target>/corpus, seeded from fuzz/corpus/<target>/ and
# fuzz/regressions/<target>/) and crashing inputs (WORK_DIR/<target>/crashes/). A crash
# stops that target's run; copy the input into fuzz/regressions/<target>/ once fixed, so
# the normal test suite replays it. Exits 1 when any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then TARGETS=(request_fuzzer compiler_fuzzer bundle_fuzzer); fi
BUILD_DIR=${BUILD_DIR:-build/fuzz}
WORK_DIR=${WORK_DIR:-$BUILD_DIR/work}
JOBS=${JOBS:-$(nproc)}

bash scripts/install-deps.sh fuzz
cmake -S . -B "$BUILD_DIR" -DCMAKE_CXX_COMPILER=clang++-14 -DCDS_FUZZ=ON \
  -DCDS_BUILD_TESTS=OFF -DCDS_BUILD_BENCHMARKS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS" --target "${TARGETS[@]}"

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
summary=()
failed=0
for target in "${TARGETS[@]}"; do
  corpus="$WORK_DIR/$target/corpus"
  crashes="$WORK_DIR/$target/crashes"
  log="$WORK_DIR/$target/fuzz.log"
  mkdir -p "$corpus" "$crashes"
  dict=()
  if [ -f "fuzz/$target.dict" ]; then dict=(-dict="fuzz/$target.dict"); fi
  # The bundled rule files (147 and 386 KB) make the compiler and bundle seeds large, and
  # mutating them runs at about 60 executions/s; capped at 32 KB (the seeds are cut there)
  # the small seeds drive the search. FUZZ_MAX_LEN overrides it (0: libFuzzer's choice).
  max_len=0
  case "$target" in compiler_fuzzer|bundle_fuzzer) max_len=32768 ;; esac
  max_len=${FUZZ_MAX_LEN:-$max_len}
  echo "fuzz/run.sh: $target for ${SECONDS_EACH}s (log: $log)" >&2
  status=0
  "$BUILD_DIR/fuzz/$target" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
    -timeout=30 -rss_limit_mb=4096 -max_len="$max_len" -artifact_prefix="$crashes/" "${dict[@]}" \
    "$corpus" "fuzz/corpus/$target" "fuzz/regressions/$target" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  added=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 | sed 's/corp: //' || true)
  found=$(find "$crashes" -type f | wc -l)
  if [ "$status" -ne 0 ] || [ "$found" -ne 0 ]; then failed=1; fi
  summary+=("$(printf '%-16s %10s execs %6s exec/s  corpus %-12s (+%s new)  %-20s crashes %s  exit %s' \
    "$target" "${execs:-?}" "${rate:-?}" "${corp:-?}" "${added:-?}" "$cov" "$found" "$status")")
done
echo
printf '%s\n' "${summary[@]}"
exit "$failed"
