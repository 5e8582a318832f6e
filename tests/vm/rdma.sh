#!/usr/bin/env bash
# The RDMA tests on soft-RoCE (rxe): the transport's lane tests and post-copy's RDMA READ tests
# (rdma_read), the engine's migrations over RDMA (tests/tests/rdma.rs, the ones marked `ignore`
# elsewhere) and a bench run.
#
# Where the kernel has rdma_rxe (an ordinary Linux host), it runs natively: a network namespace
# with a veth pair on 198.18.0.1/24 and an rxe device on it, removed again at the end.
# Otherwise (this project's CI machines: no RDMA, no module loading) it runs in a QEMU guest
# booted by tests/vm/vm.sh --rxe. Installs what is missing (rdma-core, perftest, QEMU, kernel).
# RMIG_RDMA_ONLY=NAME runs only the tests whose names contain NAME, and no bench (development);
# RMIG_RDMA_REPEAT=N runs the tests N times over (to catch a rare failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# Test binaries built here run unchanged in the guest (it shares this root filesystem).
bins=$(cargo test --release -q --no-run --message-format=json \
         -p rmig-transport --test rdma_lane --test rdma_read -p rmig-tests --test rdma 2>/dev/null \
       | /usr/bin/python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$bins" ] || { echo "rdma.sh: test binaries did not build" >&2; exit 1; }
cargo build --release -q -p rmig-bench
out=$(mktemp -d /tmp/rmig-rdma.XXXXXX)
trap 'rm -rf "$out"' EXIT
cat > "$out/body.sh" <<BODY
set -e
ulimit -l unlimited
for i in \$(seq ${RMIG_RDMA_REPEAT:-1}); do
for b in $(echo $bins); do
  echo "== \$b" >&2
  \$b --ignored --test-threads 1 ${RMIG_RDMA_ONLY:+--nocapture $RMIG_RDMA_ONLY}
done
done
[ -z "${RMIG_RDMA_ONLY:-}" ] || exit 0
echo "== rmig-bench loopback --transport rdma" >&2
$root/target/release/rmig-bench loopback --addr \$RMIG_RDMA_IP --transport rdma --size 128MiB --lanes 2 --json > $out/bench.json
/usr/bin/python3 -c 'import json,sys; j=json.load(open("$out/bench.json")); assert j["status"]=="completed" and j["transport"]=="rdma" and j["verified"] and j["memory_equal"], j; print("bench over rdma: %.1f MB/s, verified, memories equal" % (j["data_rate"]/1e6))'
BODY

native() {
  command -v rdma >/dev/null && modprobe rdma_rxe 2>/dev/null && [ "$(id -u)" = 0 ]
}
if native; then
  echo "rdma.sh: rdma_rxe available: running natively in a network namespace" >&2
  ns=rmig-rxe-$$
  ip netns add "$ns"
  cleanup() { ip netns exec "$ns" rdma link delete rmig_rxe0 2>/dev/null || true; ip netns delete "$ns" 2>/dev/null || true; rm -rf "$out"; }
  trap cleanup EXIT
  ip netns exec "$ns" sh -c 'ip link set lo up; ip link add v0 type veth peer name v1;
    ip addr add 198.18.0.1/24 dev v0; ip link set v1 up; ip link set v0 up;
    rdma link add rmig_rxe0 type rxe netdev v0'
  sleep 1
  ip netns exec "$ns" env RMIG_RDMA_IP=198.18.0.1 RMIG_RDMA_DEV=rmig_rxe0 bash "$out/body.sh"
else
  echo "rdma.sh: no rdma_rxe on this kernel: running in a QEMU guest" >&2
  VM_MEM=${VM_MEM:-2G} VM_RWDIR="$out" bash tests/vm/vm.sh --rxe "bash $out/body.sh"
fi
