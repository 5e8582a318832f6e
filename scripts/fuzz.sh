#!/usr/bin/env bash
# The property tests of the wire formats, run long: the control codec (round trip, decode
# never panics, allocation bounded by the frame), the RDMA lane messages, the TCP lane
# headers and a TCP destination lane fed valid and damaged streams.
#
#   scripts/fuzz.sh [TOTAL_CASES]     (default 1000000)
#
# `cargo test` runs the same properties with proptest's default of 256 cases each; here each
# property gets TOTAL_CASES / (number of properties) cases, rounded up. A failure is shrunk
# and its seed saved next to the test (`*.proptest-regressions`; keep those in git: they are
# re-run first). Each test binary has a deadline of FUZZ_TIMEOUT seconds (default 3600).
set -euo pipefail
cd "$(dirname "$0")/.."

total=${1:-1000000}
deadline=${FUZZ_TIMEOUT:-3600}
suites=(
    "rmig-engine engine/tests/codec_props.rs"
    "rmig-engine engine/tests/codec_alloc.rs"
    "rmig-transport transport/tests/wire_props.rs"
)
# Properties are the tests inside `proptest! { ... }`, indented one level.
count() { grep -c '^    #\[test\]' "$1"; }
props=0
for s in "${suites[@]}"; do props=$((props + $(count "${s#* }"))); done
per=$(((total + props - 1) / props))
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cargo build --release --tests -q -p rmig-engine -p rmig-transport
echo "fuzz: $props properties x $per cases = $((props * per)) cases"
start=$(now)
for s in "${suites[@]}"; do
    pkg=${s%% *} file=${s#* }
    test=$(basename "$file" .rs) n=$(count "$file")
    t0=$(now)
    PROPTEST_CASES=$per timeout "$deadline" cargo test --release -q -p "$pkg" --test "$test"
    echo "fuzz: $test: $n properties x $per cases in $(since "$t0") s"
done
echo "fuzz: $((props * per)) cases in $(since "$start") s"
