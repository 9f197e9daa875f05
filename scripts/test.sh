#!/usr/bin/env bash
# Builds everything and runs the whole test suite (unit, bundled rule-set cases,
# integration against the real server, CLI). Exits non-zero on any failure.
# CDS_WERROR=ON turns compiler warnings into errors (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCDS_WERROR="${CDS_WERROR:-OFF}"
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
