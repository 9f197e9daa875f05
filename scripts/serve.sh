#!/usr/bin/env bash
# Builds everything (installing missing Debian packages first) and runs cds-server in the
# foreground on 127.0.0.1:50051 with the bundled rule sets. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCDS_WERROR="${CDS_WERROR:-OFF}" >/dev/null
cmake --build build -j"$(nproc)" --target cds-server cdsctl
# Plaintext on loopback for development (--insecure_dev); see docs/running.md for TLS.
exec ./build/server/cds-server --listen 127.0.0.1:50051 --insecure_dev --rules_dir rules \
  --state_dir build/state "$@"
