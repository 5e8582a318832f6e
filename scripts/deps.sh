#!/usr/bin/env bash
# Installs what rmig needs to build, test and benchmark on Debian 12, if it is missing.
# Safe to run again: it installs only what is absent. Needs root (or sudo) for apt.
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# cmake and libclang-dev build the verbs shim of sideway (RDMA); no RDMA library is needed to
# build or run: libibverbs is loaded at run time when present.
for p in gcc libc6-dev make pkg-config cmake libclang-dev libhwloc-dev libudev-dev valgrind iperf3 python3 fonts-dejavu-core ca-certificates; do
  have_pkg "$p" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "rmig: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH"
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "rmig: no Rust toolchain found. Install Rust 1.89 or newer (https://rustup.rs), then run this again." >&2
  exit 1
fi
