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
# Under TSan run the tests whose subject is concurrency (TSAN_TESTS below). In-process, fully
# checked: rule_store_test.cc (RuleStoreTest: N threads evaluating while versions are
# published, rejected and unloaded), audit_log_test.cc (SqliteAuditTest, SlowStoreTest,
# PseudonymizerTest: concurrent writers sharing journal writes, the watchdog, the importer
# and syncer threads, pseudonyms from many threads) and registry_test.cc (metrics from many
# threads). Against a real TSan-built
# server: lifecycle_test.cc (concurrent clients while bundles are published and labels move,
# SIGKILL mid-publish, restarts, rescans), stream_test.cc (EvaluateStream), audit_test.cc
# (fail closed, SIGKILL under load) and operations_test.cc (SIGTERM with calls in flight,
# metrics scrapes). Debian's gRPC is not instrumented, so races between two gRPC callbacks of
# one call cannot be judged and are suppressed (sanitizers/tsan.supp says exactly what and
# why); the server-based tests check our other threads. Only these binaries are built. The
# remaining tests are single-threaded request/response checks that ASan + UBSan cover.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
BUILD_ROOT=${BUILD_ROOT:-build}
JOBS=${JOBS:-$(nproc)}
TSAN_TESTS='^(RuleStoreTest|SemverLessTest|RetentionTest|SqliteAuditTest|SyncIntervals/SlowStoreTest|PseudonymizerTest|RegistryTest|ServerMetricsTest|LifecycleTest|StreamTest|StreamAuditTest|NoopBaselineTest|AuditTest|OperationsTest)\.|CrashTest\.'

bash scripts/install-deps.sh

configure_and_build() {  # DIR SANITIZERS [TARGET...]
  local dir=$1 sanitizers=$2
  shift 2
  local targets=()
  if [ $# -gt 0 ]; then targets=(--target "$@"); fi
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCDS_SANITIZE="$sanitizers" -DCDS_BUILD_BENCHMARKS=OFF -DCDS_WERROR=OFF
  cmake --build "$dir" -j"$JOBS" "${targets[@]}"
}

# Every child process (cds-server and cdsctl started by the tests) inherits these, so a
# finding in the server fails the test that started it.
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1:abort_on_error=0:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$SRC/sanitizers/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# ignore_noninstrumented_modules: interceptors called from Debian's uninstrumented gRPC and
# Abseil report false races (sanitizers/tsan.supp lists the ones seen and why).
export TSAN_OPTIONS="suppressions=$SRC/sanitizers/tsan.supp:ignore_noninstrumented_modules=1:halt_on_error=1:second_deadlock_stack=1:print_suppressions=0"

run_asan() {
  configure_and_build "$BUILD_ROOT/asan" address,undefined
  # deploy_manifests checks that the Dockerfile's runtime stage installs every shared library
  # the cds-server binary links, which for this build includes libasan: not applicable.
  ctest --test-dir "$BUILD_ROOT/asan" --output-on-failure -j"$JOBS" --timeout 600 \
    -E '^deploy_manifests$'
}

run_tsan() {
  # Only the binaries of TSAN_TESTS (and the server and CLI they run) are built.
  configure_and_build "$BUILD_ROOT/tsan" thread cds-server cdsctl cds_unit_tests lifecycle_test \
    stream_test audit_test operations_test
  ctest --test-dir "$BUILD_ROOT/tsan" --output-on-failure -j"$JOBS" --timeout 900 \
    -R "$TSAN_TESTS"
}

case "${1:-all}" in
  asan) run_asan ;;
  tsan) run_tsan ;;
  all) run_asan; run_tsan ;;
  *) echo "usage: $0 [asan|tsan|all]" >&2; exit 2 ;;
esac
