#!/usr/bin/env bash
# Builds the project with sanitizers and runs the test suite under them (CI runs this after
# scripts/test.sh; see .ci/run). Exits non-zero on any failure or sanitizer report.
#
#   bash scripts/test-sanitizers.sh            # both: asan then tsan
#   bash scripts/test-sanitizers.sh asan       # ASan + UBSan: the whole suite, in build/asan
#   bash scripts/test-sanitizers.sh tsan       # TSan: the concurrency tests, in build/tsan
#
# BUILD_ROOT (default build/) holds build/asan and build/tsan. Both builds use gcc (Debian's
# gRPC, Protobuf and Abseil are uninstrumented), -O1 with assertions on, and no benchmarks.
# Runtime options and suppressions are in sanitizers/ (each suppression says why).
#
# Under TSan only the tests whose subject is concurrency run (TSAN_TESTS below): the
# rule-store hot swap (RuleStoreTest.*, N threads evaluating while versions are published),
# the lifecycle against a real server (concurrent clients while bundles are published and
# labels move), EvaluateStream and the audit trail's group commit. The rest are
# single-threaded request/response checks already covered by ASan + UBSan, and TSan's 5-15x
# slowdown on 2 cores would push CI past its limit.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
BUILD_ROOT=${BUILD_ROOT:-build}
JOBS=${JOBS:-$(nproc)}
TSAN_TESTS='^(RuleStoreTest|LifecycleTest|StreamTest|AuditTest)\.'

bash scripts/install-deps.sh

configure_and_build() {  # DIR SANITIZERS
  cmake -S . -B "$1" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCDS_SANITIZE="$2" -DCDS_BUILD_BENCHMARKS=OFF -DCDS_WERROR=OFF
  cmake --build "$1" -j"$JOBS"
}

# Every child process (cds-server and cdsctl started by the tests) inherits these, so a
# finding in the server fails the test that started it.
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1:abort_on_error=0:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$SRC/sanitizers/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="suppressions=$SRC/sanitizers/tsan.supp:halt_on_error=1:second_deadlock_stack=1:print_suppressions=0"

run_asan() {
  configure_and_build "$BUILD_ROOT/asan" address,undefined
  ctest --test-dir "$BUILD_ROOT/asan" --output-on-failure -j"$JOBS" --timeout 600
}

run_tsan() {
  configure_and_build "$BUILD_ROOT/tsan" thread
  ctest --test-dir "$BUILD_ROOT/tsan" --output-on-failure -j"$JOBS" --timeout 900 \
    -R "$TSAN_TESTS"
}

case "${1:-all}" in
  asan) run_asan ;;
  tsan) run_tsan ;;
  all) run_asan; run_tsan ;;
  *) echo "usage: $0 [asan|tsan|all]" >&2; exit 2 ;;
esac
