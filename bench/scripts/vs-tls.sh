#!/usr/bin/env bash
# Verified cleartext against verified TLS on this machine: `rmig-bench loopback` with
# `--encryption off` and `--encryption on` (PSK mode), alternately, RUNS times each, with the
# CPU seconds per GiB of guest memory: the report's `cpu_seconds` (the whole process, both ends,
# user + system, during the migration only: filling and preallocating memory are not in it).
# Prints each run, the medians and the ratio TLS / cleartext.
# Usage: bench/scripts/vs-tls.sh [extra rmig-bench loopback args...]
# Environment: RUNS (default 5), SIZE (default 2GiB), LANES (default 2), BENCH (path of
# rmig-bench). Memory: loopback fills its source and preallocates (prefaults) its destination
# before its clock starts, in both modes.
set -euo pipefail
runs=${RUNS:-5}
size=${SIZE:-2GiB}
lanes=${LANES:-2}
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${BENCH:-$here/target/release/rmig-bench}
[ -x "$bench" ] || (cd "$here" && cargo build --release -q -p rmig-bench)
tmp=$(mktemp -d /tmp/rmig-vs-tls.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# One run: prints "rate_bytes_per_s cpu_seconds_per_gib".
run() {
  local enc=$1
  timeout -k 5 300 python3 - "$bench" "$enc" "$size" "$lanes" "$@" <<'PY'
import json, subprocess, sys
bench, enc, size, lanes, *extra = sys.argv[1:]
extra = extra[1:]  # the first is `enc` again
out = subprocess.run([bench, "loopback", "--size", size, "--lanes", lanes, "--verify", "on",
                      "--encryption", enc, "--json", *extra], capture_output=True, text=True)
j = json.loads(out.stdout.strip().splitlines()[-1])
assert j["status"] == "completed" and j["memory_equal"] and j["verified"], (j.get("error"), out.stderr[-500:])
want = "tls-psk" if enc == "on" else "off"
assert j["encryption"] == want, j["encryption"]
print(j["data_rate"], j["cpu_seconds"] / (j["ram"]["total"] / 2**30))
PY
}

clear=(); tls=(); clear_cpu=(); tls_cpu=()
for i in $(seq "$runs"); do
  read -r c cc < <(run off "$@")
  read -r t tc < <(run on "$@")
  printf 'run %d: cleartext %.2f GB/s (%.2f CPU s/GiB)   tls %.2f GB/s (%.2f CPU s/GiB)   tls/cleartext %.2f\n' \
    "$i" "$(python3 -c "print($c/1e9)")" "$cc" "$(python3 -c "print($t/1e9)")" "$tc" "$(python3 -c "print($t/$c)")"
  clear+=("$c"); tls+=("$t"); clear_cpu+=("$cc"); tls_cpu+=("$tc")
done
python3 - "${clear[*]}" "${tls[*]}" "${clear_cpu[*]}" "${tls_cpu[*]}" <<'PY'
import statistics, sys
c, t, cc, tc = (statistics.median(map(float, a.split())) for a in sys.argv[1:5])
print(f"median: cleartext {c/1e9:.2f} GB/s ({cc:.2f} CPU s/GiB), tls {t/1e9:.2f} GB/s "
      f"({tc:.2f} CPU s/GiB), tls/cleartext {t/c:.2f}")
PY
