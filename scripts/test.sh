#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, then runs every
# unit and end-to-end test (release build: the tests move real amounts of memory), then the C
# example against the installed librmig under valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -q -- -D warnings
cargo test --workspace --release
bash scripts/test-c-example.sh
