#!/usr/bin/env bash
# Builds examples/c/minivmm.c with gcc against an installed librmig (make install into a
# temporary prefix, found through pkg-config) and runs it under valgrind: a live migration of
# the C program's memory through the C ABI, checked by the program itself, with no leaks and
# no invalid accesses.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(mktemp -d /tmp/rmig-prefix.XXXXXX)
trap 'rm -rf "$prefix"' EXIT
make -s install PREFIX="$prefix" >/dev/null
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
gcc -std=c11 -O1 -g -Wall -Wextra -Werror -o "$prefix/minivmm" examples/c/minivmm.c \
    $(pkg-config --cflags --libs rmig) -pthread
# The shared library: a plain run at full size first, then valgrind on a smaller guest.
LD_LIBRARY_PATH="$prefix/lib" "$prefix/minivmm" 64 | tail -1 | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["status"] == "completed" and j["verified"] is True, j
assert j["encryption"] == "tls-psk", j
print("minivmm 64 MiB: completed, verified, %s, downtime %.1f ms" % (j["encryption"], j["downtime_ms"]))'
# valgrind-tls.supp: memcheck's false positives on ring's AES-GCM assembly (see the file).
# One failed run under valgrind is shown whole and retried once: a run failed once in CI
# (2026-12-01) with no message, and never since; the output says which case it was.
vg() {
    LD_LIBRARY_PATH="$prefix/lib" timeout -k 10 600 valgrind -q --suppressions=scripts/valgrind-tls.supp \
        --leak-check=full --show-leak-kinds=definite,indirect \
        --errors-for-leak-kinds=definite,indirect --error-exitcode=99 \
        "$prefix/minivmm" 8 2000 > "$prefix/vg.out"
}
vg || {
    rc=$?
    echo "c-example: minivmm under valgrind failed (exit $rc); its output:" >&2
    tail -c 4000 "$prefix/vg.out" >&2 || true
    echo "c-example: retrying once" >&2
    vg
}
echo "minivmm under valgrind: no leaks, no invalid accesses"
echo "c-example: 2 passed, 0 failed"
