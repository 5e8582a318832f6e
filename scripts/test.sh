#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, then runs every
# unit and end-to-end test (release build: the tests move real amounts of memory), the unit and
# lane tests again in a debug build (overflow checks, debug assertions), then the C example
# against the installed librmig under valgrind, then network blips between two network
# namespaces (tests/netns-blips.sh), then a migration in a two-node NUMA
# guest and the RDMA tests on soft-RoCE (QEMU guests; tests/vm/vm.sh installs what is missing),
# then a real QEMU migrating a guest through librmig (integrations/qemu/demo.sh), and QEMU's own
# qtest with librmig over TCP and, inside the soft-RoCE guest, over RDMA.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -q -- -D warnings
cargo test --workspace --release
# The unit and lane tests again in a debug build, where overflow checks and debug_assert!s run
# (the release build above compiles them out).
cargo test --workspace --lib
cargo test -p rmig-transport --test tcp_lane
bash scripts/test-c-example.sh
# Network blips on a veth pair between two network namespaces (needs root).
bash tests/netns-blips.sh
bash tests/netns-postcopy.sh
# A migration on a real two-node NUMA machine: a QEMU guest with two nodes.
bash tests/vm/numa-guest.sh
# RDMA on soft-RoCE: natively where the kernel has rdma_rxe, else in a QEMU guest.
bash tests/vm/rdma.sh
# A real QEMU (10.0.2 with integrations/qemu/patches) migrates a self-checking guest through
# librmig: ~2.5 min, plus the QEMU build into /var/cache/rmig-qemu when the patch or librmig
# changed (~4 min on 2 idle cores; instant otherwise).
bash integrations/qemu/demo.sh
# QEMU's own migration qtest, its two x-rmig cases (the patch adds them): ~2 min.
bash integrations/qemu/qtest.sh
# Its RDMA case: two QEMU processes inside the soft-RoCE guest, librmig's lanes on RDMA: ~2.5 min.
bash tests/vm/qemu-rdma.sh
