#!/usr/bin/env bash
# Runs `ib_write_bw -s 65536` and `rmig-bench loopback --transport rdma` (default coalescing)
# on the same RDMA device, alternately RUNS times each, and prints both rates, their medians
# and the ratio; then the CPU time of the whole machine (from /proc/stat: rxe works in kernel
# threads) per GiB moved, RDMA against TCP, in the same run.
#
# Needs an RDMA device: set RMIG_RDMA_IP (its address) and RMIG_RDMA_DEV (its name), e.g. an
# rxe device on an ordinary Linux host. Without them the script runs itself in a soft-RoCE QEMU
# guest (tests/vm/vm.sh --rxe), as on machines whose kernel has no RDMA.
# Environment: RUNS (3), SIZE (rmig's memory, 128MiB), ITERS (ib_write_bw -n, 2000: the
# same 125 MiB), LANES (rmig's lanes; default: rmig's own default, one per CPU), IB_ARGS
# (more ib_write_bw flags, e.g. "-q 2" for as many QPs as rmig has lanes), BENCH (path of
# rmig-bench), RMIG_ARGS (more rmig-bench flags, e.g. "--verify off").
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${BENCH:-$here/target/release/rmig-bench}
[ -x "$bench" ] || (cd "$here" && cargo build --release -q -p rmig-bench)
if [ -z "${RMIG_RDMA_IP:-}" ]; then
  exec env VM_MEM="${VM_MEM:-2G}" bash "$here/tests/vm/vm.sh" --rxe \
    "RMIG_ARGS='${RMIG_ARGS:-}' RUNS=${RUNS:-3} SIZE=${SIZE:-128MiB} ITERS=${ITERS:-2000} LANES=${LANES:-} IB_ARGS='${IB_ARGS:-}' BENCH=$bench bash $here/bench/scripts/vs-ib_write_bw.sh"
fi
runs=${RUNS:-3}; size=${SIZE:-128MiB}; iters=${ITERS:-2000}; lanes=()
[ -n "${LANES:-}" ] && lanes=(--lanes "$LANES")
dev=${RMIG_RDMA_DEV:?set RMIG_RDMA_DEV}; ip=$RMIG_RDMA_IP
gid=${RMIG_RDMA_GID_INDEX:-}
command -v ib_write_bw >/dev/null || { echo "ib_write_bw missing (apt-get install perftest)" >&2; exit 1; }
ulimit -l unlimited 2>/dev/null || true
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }   # user nice system irq softirq
hz=$(getconf CLK_TCK)
ibw() {
  local port=$((20000 + RANDOM % 20000)) g=()
  [ -n "$gid" ] && g=(-x "$gid")
  ib_write_bw -d "$dev" "${g[@]}" -s 65536 -n "$iters" -p "$port" ${IB_ARGS:-} >/dev/null 2>&1 &
  local srv=$!
  sleep 1
  ib_write_bw -d "$dev" "${g[@]}" -s 65536 -n "$iters" -p "$port" ${IB_ARGS:-} "$ip" 2>/dev/null |
    awk '$1 == 65536 {print $4 * 1048576}'   # BW average [MiB/s] -> bytes/s
  wait $srv || true
}
rmig() {   # prints "bytes/s cpu_seconds bytes transport"
  local t=$1 b0 js
  b0=$(busy)
  js=$("$bench" loopback --addr "$ip" --transport "$t" --size "$size" "${lanes[@]}" --json ${RMIG_ARGS:-} | tail -1)
  printf '%s %s\n' "$js" "$(( $(busy) - b0 ))" | python3 -c '
import json, sys
line = sys.stdin.read().rsplit(" ", 1)
j = json.loads(line[0]); ticks = int(line[1])
assert j["status"] == "completed" and j["memory_equal"] and j["verified"] is not False, j.get("error")
print(j["data_rate"], ticks / '"$hz"', j["ram"]["transferred"], j["transport"])'
}
ibs=(); rms=()
for i in $(seq "$runs"); do
  a=$(ibw); read -r r _ _ t <<<"$(rmig rdma)"
  [ "$t" = rdma ] || { echo "rmig did not use RDMA" >&2; exit 1; }
  printf 'run %d: ib_write_bw %.1f MB/s   rmig rdma %.1f MB/s   ratio %.2f\n' "$i" \
    "$(python3 -c "print($a/1e6)")" "$(python3 -c "print($r/1e6)")" "$(python3 -c "print($r/$a)")"
  ibs+=("$a"); rms+=("$r")
done
python3 - "${ibs[*]}" "${rms[*]}" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]; r = [float(x) for x in sys.argv[2].split()]
ma, mr = statistics.median(a), statistics.median(r)
print(f"median: ib_write_bw {ma/1e6:.1f} MB/s, rmig rdma {mr/1e6:.1f} MB/s, ratio {mr/ma:.2f}")
PY
# CPU of the whole machine per GiB moved (rxe's work is in kernel threads, not in rmig).
for t in rdma tcp rdma tcp; do
  read -r r cpu bytes tr <<<"$(rmig $t)"
  printf 'cpu: %-4s %.1f MB/s, %.2f CPU-seconds per GiB (whole machine)\n' "$tr" \
    "$(python3 -c "print($r/1e6)")" "$(python3 -c "print($cpu/($bytes/2**30))")"
done
