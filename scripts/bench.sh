#!/usr/bin/env bash
# The main job: installs what is missing, builds rmig-bench and runs `rmig-bench loopback`
# (2 GiB of random memory migrated over 127.0.0.1, verified, compared byte for byte).
# Extra arguments go to `rmig-bench loopback`, e.g. `--json` or `--dirty-rate 500`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release -q -p rmig-bench
exec ./target/release/rmig-bench loopback "$@"
