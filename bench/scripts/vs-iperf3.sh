#!/usr/bin/env bash
# Runs `iperf3 -P N`, `rmig-bench loopback --lanes N` and `rmig-bench bare --lanes N` (the same
# bytes over N plain TCP connections, no protocol: the honest TCP limit of a migration here) on
# this machine in one run, alternately (RUNS times each), and prints the rates, their medians
# and the ratios rmig / iperf3 and rmig / bare.
# Usage: bench/scripts/vs-iperf3.sh [N] [extra rmig-bench args...]
# Environment: RUNS (default 5), SIZE (default 2GiB), BENCH (path of rmig-bench),
# IPERF_SECONDS (default 1: about as long as rmig moving 2 GiB, so both see the same noise),
# IPERF_ARGS (default "-l 1M": iperf3's own default of 128 KiB writes reaches only about half
# of this machine's loopback TCP rate, so 1 MiB writes make the stricter yardstick; set it to ""
# for iperf3's defaults),
# BARE_MEMORY (default prefaulted: both ends of the bare transfer faulted in first, because
# `loopback` by default fills its source and preallocates its destination before it starts the
# clock, so the ratio rmig / bare isolates rmig's own cost; set it to unfaulted when passing
# --no-prealloc, or to see what first-touch page faults cost here).
set -euo pipefail
n=${1:-2}
shift || true
runs=${RUNS:-5}
size=${SIZE:-2GiB}
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${BENCH:-$here/target/release/rmig-bench}
command -v iperf3 >/dev/null || { echo "iperf3 missing (apt-get install iperf3)" >&2; exit 1; }
[ -x "$bench" ] || (cd "$here" && cargo build --release -q -p rmig-bench)
port=$((20000 + RANDOM % 20000))
iperf3 -s -p "$port" -D --pidfile /tmp/rmig-iperf3.$$.pid >/dev/null
trap 'kill $(cat /tmp/rmig-iperf3.$$.pid) 2>/dev/null; rm -f /tmp/rmig-iperf3.$$.pid' EXIT
sleep 0.5
bare_memory=${BARE_MEMORY:-prefaulted}
case $bare_memory in
  prefaulted) bare_flag=--prefault ;;
  unfaulted) bare_flag= ;;
  *) echo "BARE_MEMORY must be prefaulted or unfaulted" >&2; exit 2 ;;
esac
ips=(); rms=(); bas=()
for i in $(seq "$runs"); do
  ip=$(timeout 60 iperf3 -c 127.0.0.1 -p "$port" -P "$n" -t "${IPERF_SECONDS:-1}" ${IPERF_ARGS--l 1M} -J |
       python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8)')
  js=$("$bench" loopback --size "$size" --lanes "$n" --json "$@" | tail -1)
  rm_rate=$(printf '%s' "$js" | python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["status"]=="completed" and j["memory_equal"], j.get("error"); print(j["data_rate"])')
  ba=$("$bench" bare --size "$size" --lanes "$n" $bare_flag --json | tail -1 |
       python3 -c 'import json,sys; print(json.load(sys.stdin)["data_rate"])')
  printf 'run %d: iperf3 -P %d %.2f GB/s   rmig %.2f GB/s   bare (%s) %.2f GB/s   rmig/iperf3 %.2f   rmig/bare %.2f\n' \
    "$i" "$n" "$(python3 -c "print($ip/1e9)")" "$(python3 -c "print($rm_rate/1e9)")" "$bare_memory" \
    "$(python3 -c "print($ba/1e9)")" "$(python3 -c "print($rm_rate/$ip)")" "$(python3 -c "print($rm_rate/$ba)")"
  ips+=("$ip"); rms+=("$rm_rate"); bas+=("$ba")
done
python3 - "${ips[*]}" "${rms[*]}" "${bas[*]}" "$bare_memory" <<'PY'
import statistics, sys
ip = statistics.median(map(float, sys.argv[1].split()))
rm = statistics.median(map(float, sys.argv[2].split()))
ba = statistics.median(map(float, sys.argv[3].split()))
print(f"median: iperf3 {ip/1e9:.2f} GB/s, rmig {rm/1e9:.2f} GB/s, bare ({sys.argv[4]}) {ba/1e9:.2f} GB/s, "
      f"rmig/iperf3 {rm/ip:.2f}, rmig/bare {rm/ba:.2f}")
PY
