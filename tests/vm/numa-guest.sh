#!/usr/bin/env bash
# A real migration on a two-node NUMA machine: boots a QEMU guest with two nodes (tests/vm/vm.sh
# --numa), binds the bench's memory to node 1 with numactl, migrates with --numa auto, and
# checks that the plan put every lane on node 1, that move_pages found the memory there, and
# that the lanes really ran on node 1's CPU (sched_getcpu at every batch).
set -euo pipefail
cd "$(dirname "$0")/../.."
bench=$PWD/target/release/rmig-bench
[ -x "$bench" ] || cargo build --release -q -p rmig-bench
out=$(mktemp -d /tmp/rmig-numa.XXXXXX)
trap 'rm -rf "$out"' EXIT
cat > "$out/guest.sh" <<GUEST
set -e
numactl --hardware
numactl --membind=1 $bench loopback --size 64MiB --lanes 2 --numa auto --json > $out/membind1.json
numactl --membind=0 $bench loopback --size 64MiB --lanes 2 --numa auto --json > $out/membind0.json
$bench topology --size 64MiB --lanes 2 > $out/topology.txt
GUEST
VM_RWDIR="$out" bash tests/vm/vm.sh --numa "bash $out/guest.sh"
cat "$out/topology.txt"
/usr/bin/python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for node in (1, 0):
    j = json.load(open(f"{out}/membind{node}.json"))
    n = j["numa"]
    assert j["status"] == "completed" and j["memory_equal"] is True, j.get("error")
    assert n["nodes"] == 2 and n["fallback"] is None, n
    spans = n["plan"]["spans"]
    assert spans and all(s["span"]["node"] == node for s in spans), spans
    assert all(l["node"] == node for l in n["plan"]["lanes"]), n["plan"]["lanes"]
    for o in n["observed"]:
        assert o["nodes"] == [node], o
    print(f"memory bound to node {node}: plan " +
          ", ".join(f"lane {l['lane']} on node {l['node']} (CPUs {l['cpus']})" for l in n["plan"]["lanes"]) +
          "; observed " + ", ".join(f"lane {o['lane']} on CPUs {o['cpus']} = node(s) {o['nodes']}" for o in n["observed"]) +
          f"; move_pages: {sum(s['span']['npages'] for s in spans)} pages on node {node}")
print("numa-guest: 2 passed, 0 failed")
PY
