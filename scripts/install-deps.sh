#!/usr/bin/env bash
# Installs the Debian 12 packages the build and tests need. Idempotent: when every package is
# already present it only runs dpkg-query and returns in well under a second.
# `install-deps.sh fuzz` adds clang 14 and its runtimes (libFuzzer, ASan, UBSan) for
# fuzz/run.sh; the sanitizer builds (scripts/test-sanitizers.sh) use gcc's runtimes
# (libasan8, libubsan1, libtsan2), which come with g++.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc grpc-proto
  libprotobuf-dev protobuf-compiler
  libabsl-dev
  libssl-dev libsqlite3-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-grpcio
  python3-yaml systemd
)
if [ "${1:-}" = "fuzz" ]; then
  PACKAGES+=(clang-14 libclang-rt-14-dev)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
