#!/usr/bin/env bash
# Post-copy on a real link: two network namespaces joined by a veth pair shaped to 1 gbit
# (tbf), `rmig-bench dest` in one and `rmig-bench source` in the other. The guest outruns its
# link: 512 MiB with a 256 MiB hot set rewritten at 300 MB/s (the link moves ~119 MB/s). The
# source's memory is filled before the migration (prefaulted); the destination's is as
# `rmig-bench dest` allocates it by default: preallocated, transparent huge pages (--thp auto),
# which post-copy splits where it drops pages at the switch.
#   a. pre-copy alone, auto-converge off: it cannot converge; the source fails with
#      not-converged (exit 1) within its round limit and its guest runs on;
#   b. --postcopy: completes and verifies; the downtime (pause to destination resumed) stays
#      under 50 ms; the destination's guest faulted, and every page missing at the switch
#      landed exactly once (on fault or in the background);
#   c. --postcopy with the link down for 2 s once the source reports postcopy-active (TCP rides
#      it out, the 5 s peer timeout is not reached): completes and verifies;
#   d. --postcopy with the source killed (SIGKILL) once it reports postcopy-active: the
#      destination says the guest is lost (status guest-lost, exit 4, a line on stderr) within
#      the peer timeout's bound, and nothing claims success.
# Encrypted (TLS with the pre-shared key, the default). Needs root (namespaces). Addresses from
# 198.18.0.0/15 (benchmarking range). Every child runs under `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$PWD/target/release/rmig-bench
[ -x "$bench" ] || cargo build --release -q -p rmig-bench
if [ "$(id -u)" != 0 ]; then
    echo "netns-postcopy: FAILED: needs root to create network namespaces" >&2
    exit 1
fi
tag=$$
src=rmig-pcs-$tag dst=rmig-pcd-$tag
out=$(mktemp -d /tmp/rmig-postcopy.XXXXXX)
. tests/netns-pair.sh
cleanup() {
    netns_remove "$src" "$dst"
    [ -n "${KEEP_OUT:-}" ] || rm -rf "$out"
}
trap cleanup EXIT
netns_pair "$src" "$dst" ps-$tag pd-$tag 198.18.0.5/30 198.18.0.6/30 1gbit
export RMIG_KEY=netns-postcopy-test-key-$tag
guest=(--size 512MiB --dirty-rate 300 --hot-set 0.5 --writers 1)
port=7950

# Waits until the progress file $1 reports status $2, at most $3 seconds.
wait_status() {
    local i
    for i in $(seq $(($3 * 20))); do
        grep -q "\"status\":\"$2\"" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# Runs one migration; $1 names it, $2 is run once the source reports postcopy-active (or
# `-` for nothing), the rest are extra source flags. Leaves $out/$1.{src,dst}.{json,err},
# $out/$1.rc (source exit, destination exit, seconds, seconds from the break to the
# destination's exit).
migrate() {
    local name=$1 brk=$2
    shift 2
    port=$((port + 1))
    # shellcheck disable=SC2086 # $dest_extra is a list of flags
    timeout -k 5 90 ip netns exec "$dst" "$bench" dest --listen 198.18.0.6:$port --size 512MiB \
        --incoming-timeout 30 --json $dest_extra > "$out/$name.dst.json" 2> "$out/$name.dst.err" &
    local dpid=$!
    for _ in $(seq 100); do
        ip netns exec "$dst" ss -Hltn "sport = :$port" | grep -q . && break
        sleep 0.1
    done
    local t0=$SECONDS
    timeout -k 5 90 ip netns exec "$src" "$bench" source --connect 198.18.0.6:$port "${guest[@]}" \
        --lanes 2 --progress-json "$out/$name.progress" --json "$@" \
        > "$out/$name.src.json" 2> "$out/$name.src.err" &
    local spid=$!
    local tb=$SECONDS
    if [ "$brk" != - ]; then
        if ! wait_status "$out/$name.progress" postcopy-active 60; then
            echo "netns-postcopy: $name: the source never reported postcopy-active" >&2
        fi
        tb=$SECONDS
        $brk "$spid"
    fi
    local src_rc=0 dst_rc=0
    wait "$spid" || src_rc=$?
    wait "$dpid" || dst_rc=$?
    echo "$src_rc $dst_rc $((SECONDS - t0)) $((SECONDS - tb))" > "$out/$name.rc"
    echo "netns-postcopy: $name: source exit $src_rc, destination exit $dst_rc, $((SECONDS - t0)) s"
    # Their last lines, if any (an empty stderr is no failure).
    sed 's/^/  source: /' "$out/$name.src.err" | grep -v '^  source: *$' | tail -3 || true
    sed 's/^/  destination: /' "$out/$name.dst.err" | grep -v '^  destination: *$' | tail -3 || true
}

outage_2s() {
    ip -n "$src" link set ps-$tag down
    sleep 2
    ip -n "$src" link set ps-$tag up
}
kill_source() {
    # $1 is the `timeout` that runs `ip netns exec`, which execs the bench: its only child.
    local pid
    pid=$(pgrep -P "$1")
    kill -9 "$pid"
}

dest_extra=
migrate precopy - --auto-converge off --max-rounds 4
migrate postcopy - --postcopy
migrate outage outage_2s --postcopy
# A killed source closes its connections at once; the destination then waits out its
# reconnect window (2 s here) for a source that could come back.
dest_extra="--reconnect-window 2"
migrate killed kill_source --postcopy

/usr/bin/python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
failed = []
def check(name, cond, why):
    if not cond:
        failed.append(f"{name}: {why}")
def load(name, side):
    try:
        return json.loads(open(f"{out}/{name}.{side}.json").read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return None
def rc(name):
    return [int(x) for x in open(f"{out}/{name}.rc").read().split()]
def err(name, side):
    return open(f"{out}/{name}.{side}.err").read()

# a. Pre-copy alone cannot converge: a clear failure, and the guest runs on.
src, dst = load("precopy", "src"), load("precopy", "dst")
s_rc, d_rc, secs, _ = rc("precopy")
check("precopy", src is not None, "no source report")
if src:
    check("precopy", s_rc == 1, f"source exit {s_rc}")
    check("precopy", src["status"] == "failed", f"source status {src['status']}")
    check("precopy", "not converge" in (src.get("error") or "").lower()
          or "converge" in err("precopy", "src").lower(), f"error: {src.get('error')}")
    check("precopy", src["source_guest"] == "running", f"source guest {src['source_guest']}")
    check("precopy", src["downtime_ms"] == 0, "the source guest was paused")
    check("precopy", src.get("postcopy") is None, "post-copy ran without --postcopy")
    print(f"precopy: failed as expected in {secs} s after {len(src['rounds'])} rounds "
          f"({(src.get('error') or '')[:90]}); source guest {src['source_guest']}")
check("precopy", dst is not None and dst["status"] == "failed",
      f"destination {dst and dst['status']}")

# b-c. Post-copy completes and verifies; the pages missing at the switch all landed once.
for name in ("postcopy", "outage"):
    src, dst = load(name, "src"), load(name, "dst")
    s_rc, d_rc, secs, _ = rc(name)
    if src is None or dst is None:
        failed.append(f"{name}: no report ({src is None}, {dst is None})")
        continue
    check(name, s_rc == 0 and d_rc == 0, f"exit codes {s_rc}/{d_rc}: {src.get('error')} / {dst.get('error')}")
    check(name, src["status"] == "completed", f"source status {src['status']}: {src.get('error')}")
    check(name, dst["status"] == "completed", f"destination status {dst['status']}: {dst.get('error')}")
    check(name, src["verified"] is True and dst["verified"] is True,
          f"verified {src['verified']}/{dst['verified']}")
    check(name, src["source_guest"] == "paused", "the source guest ran again")
    pc = dst.get("postcopy")
    check(name, pc is not None, "the destination ran no post-copy")
    if pc is None:
        continue
    check(name, pc["pages_at_switch"] > 0, f"nothing left at the switch: {pc}")
    check(name, pc["pages_on_fault"] + pc["pages_background"] == pc["pages_at_switch"],
          f"pages on fault + background != at switch: {pc}")
    check(name, pc["faults"] > 0, f"the destination's guest never faulted: {pc}")
    ddown = dst["dest"]["downtime_ms"]
    if name == "postcopy":
        check(name, src["downtime_ms"] < 50, f"downtime {src['downtime_ms']:.1f} ms")
        check(name, ddown is not None and ddown < 50, f"destination downtime {ddown}")
    else:
        # The outage fell in the post-copy phase: that phase outlasted it.
        check(name, pc["duration_ms"] >= 2000, f"post-copy lasted {pc['duration_ms']:.0f} ms")
    g = dst.get("dest_guest") or {}
    print(f"{name}: completed, verified, {secs} s total ({src['total_time_ms'] / 1e3:.1f} s "
          f"migration, {len(src['rounds']) - 1} pre-copy rounds), downtime {src['downtime_ms']:.1f} ms "
          f"(destination: {ddown:.1f} ms), throttle {src['cpu_throttle_percentage']}%; post-copy "
          f"{pc['duration_ms']:.0f} ms, {pc['pages_at_switch']} pages at the switch: "
          f"{pc['pages_on_fault']} on fault, {pc['pages_background']} background; "
          f"{pc['faults']} faults p50 {pc['fault_p50_us']:.0f} us p99 {pc['fault_p99_us']:.0f} us "
          f"max {pc['fault_max_us']:.0f} us; destination guest wrote {g.get('pages_written')} pages")

# d. The source lost during post-copy: the destination says the guest is lost, in bounded time.
dst = load("killed", "dst")
s_rc, d_rc, secs, after = rc("killed")
derr = err("killed", "dst")
check("killed", s_rc == 137, f"source exit {s_rc} (not killed during post-copy?)")
check("killed", d_rc == 4, f"destination exit {d_rc}")
check("killed", dst is not None and dst["status"] == "guest-lost",
      f"destination status {dst and dst['status']}")
if dst:
    check("killed", dst["verified"] is None, f"verified {dst['verified']} after losing the source")
    check("killed", dst.get("postcopy") is not None, "never switched to post-copy")
lost_line = [l for l in derr.splitlines() if l.startswith("rmig-bench: destination:")]
check("killed", any("guest" in l and "lost" in l for l in lost_line), f"stderr: {lost_line}")
check("killed", "completed" not in derr, "something claims completion")
# A closed connection is seen at once, then the 2 s reconnect window; a silent one would
# take the 5 s peer timeout first: 2 + 5 s and a margin at most.
check("killed", after <= 10, f"the destination took {after} s after the kill")
print(f"killed: destination {dst and dst['status']} (exit {d_rc}) {after} s after the kill: "
      f"{(lost_line or [''])[-1][:160]}")
if failed:
    print("netns-postcopy: FAILED\n  " + "\n  ".join(failed))
    sys.exit(1)
print("netns-postcopy: 4 passed, 0 failed")
PY
