#!/usr/bin/env bash
# Verified cleartext against verified TLS on this machine, alternately, RUNS times each, with
# the CPU seconds per GiB of guest memory: the reports' `cpu_seconds` (user + system, during the
# migration only: filling and preallocating memory are not in it). Prints each run, the medians
# and the ratio TLS / cleartext.
#
# Default: `rmig-bench loopback` with `--encryption off` and `--encryption on` (PSK mode): both
# ends in one process, sharing this host's cores (CPU seconds: the whole process, both ends).
# NETNS=1: `rmig-bench dest` and `rmig-bench source` in two network namespaces joined by a veth
# pair shaped to RATE (default 1gbit) with tc tbf, as tests/netns-blips.sh builds it (addresses
# from 198.18.0.0/15; needs root): the wire is the limit there, so TLS should come close to
# cleartext. CPU seconds are the source's plus the destination's.
#
# Usage: bench/scripts/vs-tls.sh [extra rmig-bench loopback/source args...]
# Environment: RUNS (default 5), SIZE (default 2GiB), LANES (default 2), BENCH (path of
# rmig-bench), NETNS (0 or 1), RATE (NETNS=1 only). Memory: the source is filled and the
# destination preallocated (prefaulted) before the clock starts, in both modes.
set -euo pipefail
runs=${RUNS:-5}
size=${SIZE:-2GiB}
lanes=${LANES:-2}
netns=${NETNS:-0}
rate=${RATE:-1gbit}
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${BENCH:-$here/target/release/rmig-bench}
[ -x "$bench" ] || (cd "$here" && cargo build --release -q -p rmig-bench)
. "$here/tests/netns-pair.sh"
tmp=$(mktemp -d /tmp/rmig-vs-tls.XXXXXX)
tag=$$
src=rmig-vts-$tag dst=rmig-vtd-$tag
cleanup() {
  if [ "$netns" = 1 ]; then
    netns_remove "$src" "$dst"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if [ "$netns" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "vs-tls: NETNS=1 needs root to create network namespaces" >&2
    exit 1
  fi
  netns_pair "$src" "$dst" vs-$tag vd-$tag 198.18.0.1/30 198.18.0.2/30 "$rate"
  export RMIG_KEY=vs-tls-key-$tag-$RANDOM$RANDOM
fi

# Checks one report ($1: JSON file, $2: on/off) and prints "rate_bytes_per_s cpu_seconds".
figures() {
  python3 - "$1" "$2" <<'PY'
import json, sys
path, enc = sys.argv[1:]
j = json.loads(open(path).read().strip().splitlines()[-1])
assert j["status"] == "completed", (j.get("status"), j.get("error"))
assert j.get("memory_equal", True) is not False and j.get("verified", True), j.get("error")
want = "tls-psk" if enc == "on" else "off"
assert j["encryption"] == want, j["encryption"]
print(j["data_rate"], j["cpu_seconds"], j["ram"]["total"])
PY
}

echo 7950 > "$tmp/port"
# One run in two namespaces: the destination listens, the source migrates to it (each run on
# a port of its own; runs happen in subshells, so the last port is kept in a file).
run_netns() {
  local enc=$1 port; shift
  port=$(($(cat "$tmp/port") + 1))
  echo "$port" > "$tmp/port"
  timeout -k 5 300 ip netns exec "$dst" "$bench" dest --listen 198.18.0.2:$port --size "$size" \
    --encryption "$enc" --incoming-timeout 60 --json > "$tmp/dst.json" 2> "$tmp/dst.err" &
  local dpid=$!
  for _ in $(seq 300); do
    ip netns exec "$dst" ss -Hltn "sport = :$port" | grep -q . && break
    sleep 0.1
  done
  timeout -k 5 300 ip netns exec "$src" "$bench" source --connect 198.18.0.2:$port \
    --size "$size" --lanes "$lanes" --verify on --encryption "$enc" --json "$@" \
    > "$tmp/src.json" 2> "$tmp/src.err" || { tail -5 "$tmp/src.err" >&2; return 1; }
  wait "$dpid" || { tail -5 "$tmp/dst.err" >&2; return 1; }
  read -r r cs total < <(figures "$tmp/src.json" "$enc")
  read -r _ cd _ < <(figures "$tmp/dst.json" "$enc")
  python3 -c "print($r, ($cs + $cd) / ($total / 2**30))"
}

# One loopback run: both ends in this process.
run_loopback() {
  local enc=$1; shift
  timeout -k 5 300 "$bench" loopback --size "$size" --lanes "$lanes" --verify on \
    --encryption "$enc" --json "$@" > "$tmp/lo.json" 2> "$tmp/lo.err" \
    || { tail -5 "$tmp/lo.err" >&2; return 1; }
  read -r r c total < <(figures "$tmp/lo.json" "$enc")
  python3 -c "print($r, $c / ($total / 2**30))"
}

# One run: prints "rate_bytes_per_s cpu_seconds_per_gib".
run() {
  if [ "$netns" = 1 ]; then run_netns "$@"; else run_loopback "$@"; fi
}

clear=(); tls=(); clear_cpu=(); tls_cpu=()
for i in $(seq "$runs"); do
  out=$(run off "$@")
  read -r c cc <<< "$out"
  out=$(run on "$@")
  read -r t tc <<< "$out"
  printf 'run %d: cleartext %.3f GB/s (%.2f CPU s/GiB)   tls %.3f GB/s (%.2f CPU s/GiB)   tls/cleartext %.2f\n' \
    "$i" "$(python3 -c "print($c/1e9)")" "$cc" "$(python3 -c "print($t/1e9)")" "$tc" "$(python3 -c "print($t/$c)")"
  clear+=("$c"); tls+=("$t"); clear_cpu+=("$cc"); tls_cpu+=("$tc")
done
python3 - "${clear[*]}" "${tls[*]}" "${clear_cpu[*]}" "${tls_cpu[*]}" <<'PY'
import statistics, sys
c, t, cc, tc = (statistics.median(map(float, a.split())) for a in sys.argv[1:5])
print(f"median: cleartext {c/1e9:.3f} GB/s ({cc:.2f} CPU s/GiB), tls {t/1e9:.3f} GB/s "
      f"({tc:.2f} CPU s/GiB), tls/cleartext {t/c:.2f}")
PY
