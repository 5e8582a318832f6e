#!/usr/bin/env bash
# Mutation testing with cargo-mutants on the files where a silent mistake hurts most. Slow
# (each mutant is a rebuild and a test run): run it on demand, not in CI.
#
#   scripts/mutants.sh                      # verify.rs, converge.rs, bitmap.rs
#   scripts/mutants.sh engine/src/verify.rs # just these files
#
# Each mutant is built in a copy of the tree and judged by the engine's unit tests (`--lib`:
# the doctests and the whole end-to-end suite are too slow to run hundreds of times), or by the
# tests named in MUTANTS_TESTS. Results go to $MUTANTS_OUT (default target/mutants-out):
# mutants.out/{caught,missed,timeout,unviable}.txt.
# Knobs: MUTANTS_JOBS (default 1), MUTANTS_TIMEOUT (seconds per test run, default 120),
# MUTANTS_ITERATE=1 (test again only what the previous run in $MUTANTS_OUT did not catch),
# MUTANTS_TEST_PACKAGE (judge by this package's tests instead of the engine's),
# MUTANTS_TESTS (cargo test's target selection, default `--lib`), MUTANTS_RE (only mutants
# whose name matches this regex, e.g. the functions a change touched).
# Mutants build in the dev profile (incremental, so each mutant rebuilds little) with the
# dependencies optimised: the end-to-end tests hash and move real memory. That first build
# compiles every dependency in a copy of the tree (about 25 min on a loaded 2-core host).
# MUTANTS_IN_PLACE=1 MUTANTS_PROFILE=release instead mutates this tree itself (restoring each
# file after its mutant; do not edit or build here meanwhile) and builds in ./target's release
# profile, so a tree whose release build is done rebuilds only the engine and its tests
# (measured on the codec, loaded 2-core host: baseline 2 min, then 0.5-2 min a mutant).
# MUTANTS_PROFILE=mutants (Cargo.toml: release dependencies, rmig's crates at opt-level 1,
# incremental) builds a mutant of the destination session with its test targets in 16-27 s
# once the profile's first build (5 min) is done (release: about 45 s).
# (A copied ./target does not help: cargo sees every dependency as changed, and a C
# dependency's CMake cache refuses the new path.)
#
# The files and the tests that judge them, as run for issue 17 (last whole runs: the codec's
# 186 mutants and converge.rs's 46, 2026-12-02; none missed after the tests they led to):
#   scripts/mutants.sh engine/src/verify.rs engine/src/converge.rs engine/src/bitmap.rs
#   MUTANTS_IN_PLACE=1 MUTANTS_PROFILE=mutants MUTANTS_TIMEOUT=60 \
#       MUTANTS_TESTS="--lib --test golden --test codec_props" \
#       scripts/mutants.sh engine/src/protocol/codec.rs engine/src/protocol/field.rs
#   MUTANTS_IN_PLACE=1 MUTANTS_PROFILE=mutants MUTANTS_TIMEOUT=60 MUTANTS_TEST_PACKAGE=rmig-tests \
#       MUTANTS_TESTS="--test blips --test callbacks --test faults --test hostile --test migrate \
#       --test postcopy --test report --test verify" \
#       scripts/mutants.sh engine/src/dest/phase.rs engine/src/dest/mod.rs
# (cargo runs the test targets in name order and stops at the first that fails. The RDMA
# paths of the destination session are judged only by tests/tests/rdma.rs, which needs a
# device: tests/vm/rdma.sh runs it in the soft-RoCE guest, not under cargo-mutants.)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-mutants >/dev/null; then
    cargo install cargo-mutants --locked
fi
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    # The codec and the destination session are left out while they are being rewritten.
    files=(engine/src/verify.rs engine/src/converge.rs engine/src/bitmap.rs)
fi
args=()
if [ -n "${MUTANTS_ITERATE:-}" ]; then
    args+=(--iterate)
fi
for f in "${files[@]}"; do
    args+=(--file "$f")
done
if [ -n "${MUTANTS_TEST_PACKAGE:-}" ]; then
    # cargo-mutants runs its unmutated baseline with the mutated package's tests only, where
    # another package's test targets do not exist: skip it (the suite is green before this).
    args+=(--test-package "$MUTANTS_TEST_PACKAGE" --baseline skip)
fi
if [ -n "${MUTANTS_RE:-}" ]; then
    args+=(--re "$MUTANTS_RE")
fi
read -r -a tests <<<"${MUTANTS_TESTS:---lib}"
out="${MUTANTS_OUT:-target/mutants-out}"
mkdir -p "$out"
# Exit status 2 means some mutants were missed: report it, but let the summary print.
profile=(--cargo-arg=--config='profile.dev.package."*".opt-level=2')
if [ -n "${MUTANTS_PROFILE:-}" ]; then
    profile=(--profile "$MUTANTS_PROFILE")
fi
jobs=(--jobs "${MUTANTS_JOBS:-1}")
if [ -n "${MUTANTS_IN_PLACE:-}" ]; then
    jobs=(--in-place)
fi
status=0
nice -n 10 cargo mutants \
    --package rmig-engine \
    "${args[@]}" \
    "${jobs[@]}" \
    --timeout "${MUTANTS_TIMEOUT:-120}" \
    --build-timeout 900 \
    --no-shuffle \
    "${profile[@]}" \
    --output "$out" \
    -- "${tests[@]}" || status=$?
for k in caught missed timeout unviable; do
    f="$out/mutants.out/$k.txt"
    printf '%-9s %s\n' "$k" "$( [ -f "$f" ] && wc -l <"$f" || echo 0)"
done
exit "$status"
