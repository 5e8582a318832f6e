#!/usr/bin/env bash
# Post-copy's RDMA READs measured on soft-RoCE next to perftest on the same device, in one guest
# (or natively with RMIG_RDMA_IP/RMIG_RDMA_DEV set, e.g. inside tests/vm/vm.sh --rxe):
#   - rmig: latency of one 4 KiB read on the fault path (RdmaPageReader::read), p50/p99/max over
#     READS (2000) reads, and the throughput of pipelined 64 KiB reads (32 in flight) over MIB
#     (128) MiB (transport/tests/rdma_read_bench.rs);
#   - ib_read_lat -s 4096 -n READS and ib_read_bw -s 65536 -n ITERS (2000), client and server
#     on the one device, connected to its own address.
# RUNS (2) alternates the two RUNS times. Soft-RoCE under TCG varies ±40 % with host load:
# compare figures of one run only.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${RMIG_RDMA_IP:-}" ]; then
  bin=$(cd "$here" && cargo test --release -q --no-run --message-format=json \
          -p rmig-transport --test rdma_read_bench 2>/dev/null \
        | /usr/bin/python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
  [ -n "$bin" ] || { echo "rdma-read-bench.sh: the bench did not build" >&2; exit 1; }
  exec env VM_MEM="${VM_MEM:-2G}" bash "$here/tests/vm/vm.sh" --rxe \
    "BIN=$bin RUNS=${RUNS:-2} READS=${READS:-2000} MIB=${MIB:-128} ITERS=${ITERS:-2000} bash $here/tests/vm/rdma-read-bench.sh"
fi
: "${BIN:?BIN: the rdma_read_bench test binary}"
dev=${RMIG_RDMA_DEV:-rxe0} ip=$RMIG_RDMA_IP
g=(); [ -n "${RMIG_RDMA_GID_INDEX:-}" ] && g=(-x "$RMIG_RDMA_GID_INDEX")
command -v ib_read_lat >/dev/null || { echo "ib_read_lat missing (apt-get install perftest)" >&2; exit 1; }
ulimit -l unlimited
perftest() {  # tool, port, args...: server in the background, client to our own address
  local tool=$1 port=$2; shift 2
  timeout 300 "$tool" -d "$dev" "${g[@]}" -p "$port" "$@" >/dev/null 2>&1 &
  local srv=$!
  sleep 1
  timeout 300 "$tool" -d "$dev" "${g[@]}" -p "$port" "$@" "$ip" 2>&1 || true
  wait "$srv" || true
}
for i in $(seq 1 "${RUNS:-2}"); do
  echo "== run $i"
  READS=${READS:-2000} MIB=${MIB:-128} timeout 600 "$BIN" --ignored --nocapture --test-threads 1 2>&1 \
    | grep -o 'rmig read.*' || echo "rmig bench failed"
  echo "-- ib_read_lat -s 4096 -n ${READS:-2000}"
  perftest ib_read_lat $((18515 + i)) -s 4096 -n "${READS:-2000}" | grep -E '#bytes|^ *4096' || true
  echo "-- ib_read_bw -s 65536 -n ${ITERS:-2000}"
  perftest ib_read_bw $((18615 + i)) -s 65536 -n "${ITERS:-2000}" | grep -E '#bytes|^ *65536' || true
done
