#!/usr/bin/env bash
# Network blips on a real link: two network namespaces joined by a veth pair shaped to 1 gbit
# (tbf), `rmig-bench dest` in one and `rmig-bench source` in the other, with a live writer.
# Mid-round 0 the link is broken the way networks break:
#   1. down for 7 s (past the 5 s peer timeout, inside the 10 s reconnect window): the
#      migration reconnects, completes and verifies;
#   2. every connection reset (`ss -K`): it reconnects, completes and verifies;
#   3. down for 10 s with a 2 s reconnect window (the window opens when the 5 s peer timeout
#      ends): it fails cleanly within a bound, says why, the source exits 1 and its guest was
#      never paused; the destination fails too.
# Encrypted (TLS with the pre-shared key, the default): every reconnect is a new TLS session.
# Needs root (namespaces). Addresses from 198.18.0.0/15 (benchmarking range).
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$PWD/target/release/rmig-bench
[ -x "$bench" ] || cargo build --release -q -p rmig-bench
if [ "$(id -u)" != 0 ]; then
    echo "netns-blips: FAILED: needs root to create network namespaces" >&2
    exit 1
fi
tag=$$
src=rmig-src-$tag dst=rmig-dst-$tag
out=$(mktemp -d /tmp/rmig-blips.XXXXXX)
. tests/netns-pair.sh
cleanup() {
    netns_remove "$src" "$dst"
    rm -rf "$out"
}
trap cleanup EXIT
netns_pair "$src" "$dst" vs-$tag vd-$tag 198.18.0.1/30 198.18.0.2/30 1gbit
export RMIG_KEY=netns-blips-test-key-$tag
size=384MiB
port=7900

# Runs one migration; $1 names it, $2 breaks the link (run once round 0 is under way), $3 is
# the reconnect window in seconds. Leaves $out/$1.src.json, $out/$1.dst.json and exit codes.
migrate() {
    local name=$1 brk=$2 window=$3
    port=$((port + 1))
    timeout -k 5 60 ip netns exec "$dst" "$bench" dest --listen 198.18.0.2:$port --size $size \
        --reconnect-window "$window" --incoming-timeout 30 --json \
        > "$out/$name.dst.json" 2> "$out/$name.dst.err" &
    local dpid=$!
    # Ready when the destination listens.
    for _ in $(seq 100); do
        ip netns exec "$dst" ss -Hltn "sport = :$port" | grep -q . && break
        sleep 0.1
    done
    local t0=$SECONDS
    timeout -k 5 60 ip netns exec "$src" "$bench" source --connect 198.18.0.2:$port --size $size \
        --dirty-rate 20 --hot-set 0.05 --lanes 2 --reconnect-window "$window" --json \
        > "$out/$name.src.json" 2> "$out/$name.src.err" &
    local spid=$!
    # Round 0 is under way once lane data flows: wait for established lanes, then 1 s more.
    for _ in $(seq 200); do
        [ "$(ip netns exec "$src" ss -Htn state established "dport = :$port" | wc -l)" -ge 3 ] && break
        sleep 0.1
    done
    sleep 1
    $brk
    local src_rc=0 dst_rc=0
    wait $spid || src_rc=$?
    wait $dpid || dst_rc=$?
    echo "$src_rc $dst_rc $((SECONDS - t0))" > "$out/$name.rc"
    echo "netns-blips: $name: source exit $src_rc, destination exit $dst_rc, $((SECONDS - t0)) s"
    sed 's/^/  source: /' "$out/$name.src.err" | grep -v '^  source: *$' | tail -5
}

outage_7s() {
    ip -n "$src" link set vs-$tag down
    sleep 7
    ip -n "$src" link set vs-$tag up
}
outage_10s() {
    ip -n "$src" link set vs-$tag down
    sleep 10
    ip -n "$src" link set vs-$tag up
}
reset_all() {
    # ss reports the sockets it could not kill (the listening kind); what counts is that
    # the established ones die, which the reconnect count below shows.
    ip netns exec "$src" ss -K dst 198.18.0.2 > /dev/null 2>&1
}

migrate outage 'outage_7s' 10
migrate reset 'reset_all' 10
migrate too-long 'outage_10s' 2

/usr/bin/python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    src = json.load(open(f"{out}/{name}.src.json"))
    dst = json.load(open(f"{out}/{name}.dst.json"))
    rc = [int(x) for x in open(f"{out}/{name}.rc").read().split()]
    return src, dst, rc
failed = []
def check(name, cond, why):
    if not cond:
        failed.append(f"{name}: {why}")
for name in ("outage", "reset"):
    src, dst, (src_rc, dst_rc, secs) = load(name)
    check(name, src_rc == 0 and dst_rc == 0, f"exit codes {src_rc}/{dst_rc}: {src.get('error')}")
    check(name, src["status"] == "completed", f"source status {src['status']}: {src.get('error')}")
    check(name, dst["status"] == "completed", f"destination status {dst['status']}")
    check(name, src["verified"] is True, f"not verified: {src['verified']}")
    check(name, src["reconnects"] >= 1, f"no reconnect: {src['reconnects']}")
    said = open(f"{out}/{name}.src.err").read()
    check(name, "the session came back (reconnect 1)" in said,
          "the source's stderr does not tell the reconnect as it happens")
    check(name, src.get("encryption") == "tls-psk", f"encryption {src.get('encryption')}")
    print(f"{name}: completed, verified, {src['reconnects']} reconnect(s), "
          f"{src['total_time_ms'] / 1e3:.1f} s total, downtime {src['downtime_ms']:.1f} ms")
src, dst, (src_rc, dst_rc, secs) = load("too-long")
check("too-long", src_rc == 1, f"source exit {src_rc}")
check("too-long", src["status"] == "failed", f"source status {src['status']}")
check("too-long", "no reconnect within" in (src.get("error") or ""), f"error: {src.get('error')}")
check("too-long", src["downtime_ms"] == 0, "the source guest was paused")
check("too-long", dst["status"] == "failed", f"destination status {dst['status']}")
# Break at ~1 s, then the 5 s peer timeout and the 2 s window: well under 20 s.
check("too-long", secs < 20, f"took {secs} s")
print(f"too-long: source failed in {secs} s ({(src.get('error') or '')[:100]}); "
      f"destination {dst['status']}")
if failed:
    print("netns-blips: FAILED\n  " + "\n  ".join(failed))
    sys.exit(1)
print("netns-blips: 3 passed, 0 failed")
PY
